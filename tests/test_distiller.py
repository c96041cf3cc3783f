"""`DetectionDistiller` and the Trainer around it: what the module holds (and what it leaves out), the precision
policy (bf16 autocast, a reduced-precision teacher), one wait for the device per training step, and the light
`import hf_kd`."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from hf_kd import DetectionDistiller, DistillationConfig, GFLConfig, GFLForObjectDetection
from hf_kd.distill import DistillationArguments, DistillationTrainer
from hf_kd.distill.losses import align_to, channel_statistics, standardize

LABELS = [
    {
        "boxes": torch.tensor([[8.0, 10.0, 70.0, 90.0], [60.0, 20.0, 150.0, 120.0]]),
        "class_labels": torch.tensor([1, 2]),
    },
    {"boxes": torch.tensor([[30.0, 30.0, 100.0, 110.0]]), "class_labels": torch.tensor([0])},
]


def detector(width: int, seed: int) -> GFLForObjectDetection:
    torch.manual_seed(seed)
    config = GFLConfig(backbone="resnet18", fpn_channels=width, head_channels=width, num_labels=3)
    return GFLForObjectDetection(config)


@pytest.fixture(scope="module")
def batch() -> dict:
    pixel_values = torch.randn(2, 3, 128, 160, generator=torch.Generator().manual_seed(0))
    return {"pixel_values": pixel_values, "pixel_mask": torch.ones(2, 128, 160, dtype=torch.bool), "labels": LABELS}


def test_distiller_holds_student_and_adapters_but_not_the_teacher():
    student, teacher = detector(32, 0), detector(64, 1)
    distiller = DetectionDistiller(student, teacher, DistillationConfig.from_method("crosskd+pkd"))
    assert set(distiller.state_dict()) == {f"student.{name}" for name in student.state_dict()} | {
        f"adapters.{adapter}_adapter.{kind}" for adapter in ("cls", "reg", "feature") for kind in ("weight", "bias")
    }
    teacher_parameters = {id(parameter) for parameter in teacher.parameters()}
    assert not teacher_parameters & {id(parameter) for parameter in distiller.parameters()}
    distiller.train()
    assert student.training and not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    distiller.to(torch.float64)  # moves (and casts) the teacher with the distiller
    assert next(teacher.parameters()).dtype == torch.float64 == next(student.parameters()).dtype


@pytest.mark.parametrize(
    ("student_type", "message"),
    [
        ("other", r"student is a 'other' detector and the teacher a 'gfl' one"),
        ("gfl", r"stacked_convs: student 2 vs teacher 4"),
    ],
)
def test_teacher_of_another_family_or_shape_is_a_clear_error(student_type, message):
    student, teacher = detector(32, 0), detector(64, 1)
    if student_type == "other":
        student.config.model_type = "other"
    else:
        student.config.stacked_convs = 2
    with pytest.raises(ValueError, match=message):
        DetectionDistiller(student, teacher, DistillationConfig.from_method("crosskd"))


class ConvDtypes:
    """Records, per conv call of the teacher's cross-head layers, its output dtype and whether it ran with gradients
    (the cross-head: the student's states flow through it) or without (the teacher's own forward)."""

    def __init__(self, teacher: GFLForObjectDetection):
        self.calls: list[tuple[torch.dtype, bool]] = []
        convs = [teacher.head.cls_convs[3].conv, teacher.head.reg_convs[3].conv, teacher.head.gfl_cls]
        self.handles = [conv.register_forward_hook(self.record) for conv in convs]

    def record(self, module, inputs, output):
        self.calls.append((output.dtype, torch.is_grad_enabled()))

    def dtypes(self, with_grad: bool) -> set[torch.dtype]:
        return {dtype for dtype, grad in self.calls if grad == with_grad}


def run_distiller(batch: dict, autocast_dtype: torch.dtype | None, teacher_dtype: torch.dtype | None = None):
    student, teacher = detector(64, 0).train(), detector(64, 1)
    distiller = DetectionDistiller(student, teacher, DistillationConfig.from_method("crosskd"), teacher_dtype)
    recorder = ConvDtypes(teacher)
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        outputs = distiller(**batch)
    outputs.loss.backward()
    return outputs, recorder, student


def test_bf16_runs_the_cross_head_in_bf16_and_keeps_losses_in_float32(batch):
    """Under the Trainer's bf16 autocast, the teacher and the cross-head (the teacher's last tower conv and predictors
    on the student's states) run in bf16; statistics and losses are float32 and match an fp32 run within 3%
    (bf16 keeps 8 bits of mantissa: per-element errors ~0.4%, sums over thousands of priors average them out)."""
    reference, _, _ = run_distiller(batch, None)
    outputs, recorder, student = run_distiller(batch, torch.bfloat16)
    assert recorder.dtypes(with_grad=True) == {torch.bfloat16}  # cross-head, forward
    assert recorder.dtypes(with_grad=False) == {torch.bfloat16}  # the teacher's own forward
    assert all(value.dtype == torch.float32 for value in outputs.loss_dict.values())
    assert set(outputs.loss_dict) == {"loss_cls", "loss_bbox", "loss_dfl", "loss_cls_kd", "loss_loc_kd"}
    for name, value in outputs.loss_dict.items():
        torch.testing.assert_close(value, reference.loss_dict[name], rtol=3e-2, atol=1e-4, msg=name)
    assert student.head.cls_convs[0].conv.weight.grad.abs().sum() > 0


def test_reduced_precision_teacher_with_a_float32_student(batch):
    """`teacher_dtype=bf16` with an fp32 student: the teacher's forward runs in bf16, the cross-head in the student's
    fp32, and the losses match the all-fp32 run within the same tolerance."""
    reference, _, _ = run_distiller(batch, None)
    outputs, recorder, _ = run_distiller(batch, None, teacher_dtype=torch.bfloat16)
    assert recorder.dtypes(with_grad=False) == {torch.bfloat16}
    assert recorder.dtypes(with_grad=True) == {torch.float32}
    for name, value in outputs.loss_dict.items():
        torch.testing.assert_close(value, reference.loss_dict[name], rtol=3e-2, atol=1e-4, msg=name)
    exact, _, _ = run_distiller(batch, None, teacher_dtype=torch.float32)
    for name, value in exact.loss_dict.items():
        torch.testing.assert_close(value, reference.loss_dict[name], rtol=1e-5, atol=1e-7, msg=name)


class DeviceWaits(TorchDispatchMode):
    """Counts the operators that make the host wait for the device: reading a value (`.item()`, `bool()`,
    `.tolist()`) and data-dependent shapes (`nonzero`, boolean-mask indexing)."""

    WAITING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique"}

    def __init__(self):
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name in self.WAITING:
            self.ops.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def stepping_trainer(output_dir, method: str) -> DistillationTrainer:
    """A trainer whose `training_step` can be called as the training loop calls it."""
    args = DistillationArguments(output_dir=str(output_dir), kd_method=method, use_cpu=True, report_to="none")
    teacher = detector(64, 1) if method != "none" else None
    trainer = DistillationTrainer(model=detector(32, 0), args=args, teacher=teacher)
    trainer.current_gradient_accumulation_steps = 1  # set by the training loop
    return trainer


@pytest.mark.parametrize("method", ["crosskd+pkd", "bckd", "none"])
def test_a_training_step_waits_for_the_device_once(batch, tmp_path, method):
    """Forward, losses, backward and the step's check of labels and losses: one wait (the check, after the
    backward pass, where the Trainer's own NaN filter of the logged loss waits anyway)."""
    trainer = stepping_trainer(tmp_path, method)
    trainer.training_step(trainer.model, batch)  # warm-up (lazy initialisations)
    with DeviceWaits() as waits:
        loss = trainer.training_step(trainer.model, batch)
    assert torch.isfinite(loss)
    assert waits.ops == ["aten::_local_scalar_dense"], waits.ops


def test_bad_labels_are_found_at_that_wait(batch, tmp_path):
    trainer = stepping_trainer(tmp_path, "crosskd")
    labels = [dict(LABELS[0]), dict(LABELS[1], class_labels=torch.tensor([7]), image_id=torch.tensor(41))]
    with pytest.raises(ValueError, match=r"image 41 \(batch index 1\): class_labels must be in \[0, 2\]"):
        trainer.training_step(trainer.model, dict(batch, labels=labels))


def test_import_hf_kd_leaves_data_and_metrics_libraries_out():
    code = (
        "import sys, hf_kd; "
        "assert hf_kd.GFLForObjectDetection; "
        "print(sorted(m for m in ('datasets', 'evaluate', 'pandas', 'pycocotools') if m in sys.modules)); "
        "hf_kd.DistillationTrainer; print('datasets' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["[]", "True"], result.stdout


def test_channel_statistics_of_constant_channels_have_finite_gradients():
    """A dead (all-zero) channel of a tower state, or one value per channel: std 0 and a gradient of 0, not NaN, as
    `Tensor.std`'s; the statistics equal torch's."""
    features = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(0))
    features[:, 3] = 0.0
    features.requires_grad_(True)
    reference = torch.randn(2, 8, 5, 5, generator=torch.Generator().manual_seed(1))
    (align_to(features, reference).square().sum() + standardize(features).sum()).backward()
    assert torch.isfinite(features.grad).all() and features.grad[:, 3].abs().sum() == 0
    mean, std = channel_statistics(reference)
    torch.testing.assert_close(std.flatten(), reference.transpose(0, 1).flatten(1).std(dim=1))
    torch.testing.assert_close(mean.flatten(), reference.mean(dim=(0, 2, 3)))
    single = torch.randn(1, 8, 1, 1, requires_grad=True)
    align_to(single, reference).sum().backward()
    assert torch.isfinite(single.grad).all()
