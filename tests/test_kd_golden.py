"""CrossKD and BCKD losses against the official code's numbers in ../shared/golden (crosskd/bckd.safetensors)."""

import pytest
import torch
from safetensors.torch import load_file

from hf_kd import GFLConfig, GFLForObjectDetection
from hf_kd.convert.mmdet import convert_state_dict, load_converted_weights
from hf_kd.distill.losses import DistillationConfig, GFLDistillationLoss
from hf_kd.models.gfl.modeling_gfl import assign_targets, flatten_levels, gfl_loss

SCENARIOS = ("main", "one_empty", "all_empty")
# hf_kd loss name -> the official code's name, per method
LOSS_NAMES = {
    "crosskd": {"loss_cls": "loss_cls", "loss_bbox": "loss_bbox", "loss_dfl": "loss_dfl",
                "loss_cls_kd": "loss_cls_kd", "loss_loc_kd": "loss_reg_kd"},
    "bckd": {"loss_cls": "loss_cls", "loss_bbox": "loss_bbox", "loss_dfl": "loss_dfl",
             "loss_cls_kd": "loss_kd", "loss_loc_kd": "loss_score_kd"},
}  # fmt: skip


def small_config() -> GFLConfig:
    return GFLConfig(backbone="resnet18", fpn_channels=64, head_channels=64, num_labels=3)


@pytest.fixture(scope="module")
def golden(golden_dir):
    """Student (from pixels) and teacher (head on its saved FPN outputs) outputs with tower states after 3 convs."""
    student = GFLForObjectDetection(small_config()).eval()
    load_converted_weights(student, load_file(golden_dir / "student_r18.safetensors"))
    # The golden teacher's narrow ResNet-50 (stem 16) is not a timm model: its FPN outputs are saved instead.
    teacher = GFLForObjectDetection(small_config()).eval()
    teacher_weights = load_file(golden_dir / "teacher_r50.safetensors")
    head_weights = convert_state_dict({k: v for k, v in teacher_weights.items() if k.startswith("bbox_head.")})
    teacher.load_state_dict(head_weights, strict=False)
    pixel_values = load_file(golden_dir / "inputs.safetensors")["inputs"]
    pixel_mask = torch.zeros(2, 256, 320, dtype=torch.long)
    pixel_mask[0] = 1
    pixel_mask[1, :200, :250] = 1
    teacher_saved = load_file(golden_dir / "teacher_outputs.safetensors")
    with torch.no_grad():
        student_outputs = student(pixel_values, pixel_mask=pixel_mask, tower_state_index=3, output_detections=False)
        teacher_outputs = teacher.head_outputs(
            [teacher_saved[f"neck/{level}"] for level in range(5)], student_outputs.image_sizes, tower_state_index=3
        )
    return {
        "student": student,
        "teacher": teacher,
        "student_outputs": student_outputs,
        "teacher_outputs": teacher_outputs,
        "targets": load_file(golden_dir / "targets.safetensors"),
        "crosskd": load_file(golden_dir / "crosskd.safetensors"),
        "bckd": load_file(golden_dir / "bckd.safetensors"),
    }


def ground_truth(targets: dict, scenario: str) -> list[dict]:
    return [
        {"boxes": targets[f"gt/{scenario}/img{i}/bboxes"], "class_labels": targets[f"gt/{scenario}/img{i}/labels"]}
        for i in range(2)
    ]


def per_level(per_prior: torch.Tensor, num_per_level: tuple[int, ...]) -> torch.Tensor:
    return torch.stack([chunk.sum() for chunk in per_prior.split(num_per_level, dim=1)])


def test_tower_states_and_cross_head(golden):
    crosskd = golden["crosskd"]
    student, teacher = golden["student_outputs"], golden["teacher_outputs"]
    for level in range(5):
        for name, outputs in (("student", student), ("teacher", teacher)):
            torch.testing.assert_close(outputs.cls_tower_states[level], crosskd[f"{name}_cls_hold/{level}"],
                                       atol=1e-4, rtol=1e-4)  # fmt: skip
            torch.testing.assert_close(outputs.reg_tower_states[level], crosskd[f"{name}_reg_hold/{level}"],
                                       atol=1e-4, rtol=1e-4)  # fmt: skip
    loss = GFLDistillationLoss(DistillationConfig.from_method("crosskd"), small_config(), small_config())
    with torch.no_grad():
        logits, box_logits = loss.cross_head_predictions(student, teacher, golden["teacher"].head)
    expected_logits = flatten_levels([crosskd[f"reused_cls_scores/{level}"] for level in range(5)])
    expected_boxes = flatten_levels([crosskd[f"reused_bbox_preds/{level}"] for level in range(5)])
    torch.testing.assert_close(logits, expected_logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(box_logits.flatten(2), expected_boxes, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("method", ["crosskd", "bckd"])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_losses_per_level(golden, method, scenario):
    config = DistillationConfig.from_method(method)
    student, teacher = golden["student_outputs"], golden["teacher_outputs"]
    targets = assign_targets(student, ground_truth(golden["targets"], scenario))
    loss = GFLDistillationLoss(config, small_config(), small_config())
    with torch.no_grad():
        losses = gfl_loss(
            student, targets, quality_weight_offset=config.quality_weight_offset,
            quality_norm_eps=config.quality_norm_eps,
        )  # fmt: skip
        losses.update(loss(student, teacher, targets, golden["teacher"].head))
    for ours, theirs in LOSS_NAMES[method].items():
        expected = torch.stack([golden[method][f"losses/{scenario}/{theirs}/{level}"] for level in range(5)])
        actual = per_level(losses[ours], student.priors.num_per_level)
        torch.testing.assert_close(actual, expected, rtol=1e-4, atol=1e-7, msg=f"{method} {scenario} {ours}")


def test_crosskd_gradients_reach_student_and_spare_teacher(golden):
    student, teacher = golden["student"], golden["teacher"]
    student.train()
    teacher_before = {name: value.clone() for name, value in teacher.state_dict().items()}
    inputs = torch.randn(2, 3, 128, 160)
    outputs = student(inputs, tower_state_index=3, output_detections=False)
    with torch.no_grad():
        teacher.requires_grad_(False)
        teacher_outputs = teacher.head_outputs(
            [torch.randn_like(feature) for feature in outputs.feature_maps], outputs.image_sizes, tower_state_index=3
        )
    labels = [{"boxes": torch.tensor([[10.0, 12.0, 90.0, 100.0]]), "class_labels": torch.tensor([1])}] * 2
    targets = assign_targets(outputs, labels)
    loss = GFLDistillationLoss(DistillationConfig.from_method("crosskd"), small_config(), small_config())
    kd = loss(outputs, teacher_outputs, targets, teacher.head)
    student.zero_grad()
    (kd["loss_cls_kd"].sum() + kd["loss_loc_kd"].sum()).backward()
    for prefix in ("head.cls_convs.0", "head.reg_convs.2", "neck.", "backbone.layer4"):
        grads = [p.grad for name, p in student.named_parameters() if name.startswith(prefix) and p.requires_grad]
        assert grads and all(g is not None and g.abs().sum() > 0 for g in grads), prefix
    # the student's own predictors and the layers after the cross-head point are not used by the KD losses
    assert student.head.gfl_cls.weight.grad is None
    assert all(p.grad is None for p in teacher.parameters())
    for name, value in teacher.state_dict().items():
        assert torch.equal(value, teacher_before[name]), name
    student.eval()


def test_crosskd_is_finite_with_one_value_per_channel():
    """Batch 1 with a 1x1 pyramid level: a single value per channel has std 0, not NaN."""
    config = small_config()
    student, teacher = GFLForObjectDetection(config).train(), GFLForObjectDetection(config).eval()
    pixel_values = torch.randn(1, 3, 96, 128)  # P7 is 1x1
    outputs = student(pixel_values, tower_state_index=3, output_detections=False)
    with torch.no_grad():
        teacher_outputs = teacher(pixel_values, tower_state_index=3, output_detections=False)
    assert outputs.spatial_shapes[-1] == (1, 1)
    labels = [{"boxes": torch.tensor([[10.0, 12.0, 60.0, 70.0]]), "class_labels": torch.tensor([1])}]
    targets = assign_targets(outputs, labels)
    loss = GFLDistillationLoss(DistillationConfig.from_method("crosskd+pkd"), config, config)
    losses = loss(outputs, teacher_outputs, targets, teacher.head)
    assert all(torch.isfinite(value).all() for value in losses.values())
