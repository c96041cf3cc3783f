"""End-to-end tests of `DistillationTrainer` through `examples/run_distill.py` on a tiny synthetic COCO folder (CPU).

Presets and their logged loss components, evaluation (the 12 COCO numbers), saved folders that load back, narrower
students (adapters), argument errors before training, gradient accumulation, JSON configs, a 2-process `accelerate
launch` against a 1-process evaluation, SIGKILL + resume, `--push_to_hub` with the Hub API mocked, bf16 autocast.

Models are tiny (ResNet-18 backbone, 32-64 wide FPN/head), images 128-160 px, runs 1-4 steps. The teacher (64 wide)
and a narrower student (32 wide) start from freshly initialised weights saved with `save_pretrained`; evaluation keeps
detections down to a score of 0.001, so that it has detections to count; the presets build their students from
arguments.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import signal
import subprocess
import sys
from concurrent.futures import Future
from pathlib import Path
from unittest import mock

import pytest
import torch
import transformers
from huggingface_hub import HfApi, ModelCard, RepoUrl
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import AutoModelForObjectDetection, TrainerCallback, pipeline

from hf_kd import GFLConfig, GFLForObjectDetection, GFLImageProcessor
from hf_kd.cli import train as run_distill  # what examples/run_distill.py and hf-kd-train run
from hf_kd.data import get_id2label
from hf_kd.data.synthetic import CLASS_NAMES, generate_synthetic_coco
from hf_kd.distill import DetectionDistiller, DistillationArguments, DistillationTrainer
from hf_kd.distill.distiller import check_compatible
from hf_kd.distill.trainer import ADAPTERS_NAME
from hf_kd.metrics import COCO_STAT_NAMES, coco_compute_metrics
from hf_kd.models.detection.modeling_dense import DenseDetectorPreTrainedModel
from hf_kd.models.detection.modeling_gfl import GFLLoss

REPO_DIR = Path(__file__).resolve().parents[1]
TESTS_DIR = Path(__file__).resolve().parent

ID2LABEL = dict(enumerate(CLASS_NAMES))
NUM_TRAIN, NUM_VAL = 16, 8
TRAIN_IDS = set(range(1, NUM_TRAIN + 1))  # the synthetic generator numbers images from 1, train split first
VAL_IDS = list(range(NUM_TRAIN + 1, NUM_TRAIN + NUM_VAL + 1))
GFL_LOSSES = {"loss_cls", "loss_bbox", "loss_dfl"}
KD_LOSSES = {
    "crosskd": {"loss_cls_kd", "loss_loc_kd"},
    "crosskd+pkd": {"loss_cls_kd", "loss_loc_kd", "loss_feature_kd"},
    "bckd": {"loss_cls_kd", "loss_loc_kd"},
    "none": set(),
}
ALL_KD_LOSSES = set().union(*KD_LOSSES.values())
HUB_MODEL_ID = "user/name"
HUB_TOKEN = "hf_SecretTokenThatMustNotLeave0123456789"


# --------------------------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------------------------


class _KillAfterSave(TrainerCallback):
    """SIGKILLs this process once the checkpoint of `step` is complete (`trainer_state.json` is written last)."""

    def __init__(self, step: int):
        self.step = step

    def on_save(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class _TerminateAtStep(TrainerCallback):
    """Sends this process SIGTERM at the end of optimizer step `step`, as a cluster scheduler would."""

    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


class RecordingTrainer(DistillationTrainer):
    """A `DistillationTrainer` that writes, per training micro-batch, the image ids, the collator's augmentation
    epoch and the world size, and per evaluation the image ids `compute_metrics` receives (one jsonl per process);
    optionally SIGKILLs itself after a checkpoint."""

    record_dir: str | None = None
    kill_after_save_step: int | None = None
    terminate_at_step: int | None = None

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.kill_after_save_step is not None:
            self.add_callback(_KillAfterSave(self.kill_after_save_step))
        if self.terminate_at_step is not None:
            self.add_callback(_TerminateAtStep(self.terminate_at_step))
        if self.compute_metrics is not None:
            compute_metrics = self.compute_metrics

            def recording_compute_metrics(prediction):
                ids = [int(i) for batch in prediction.label_ids for i in batch]
                self._record("eval", {"ids": ids})
                return compute_metrics(prediction)

            self.compute_metrics = recording_compute_metrics

    def _record(self, kind: str, entry: dict) -> None:
        if self.record_dir is not None:
            path = Path(self.record_dir) / f"{kind}_rank{self.args.process_index}.jsonl"
            with path.open("a") as file:
                file.write(json.dumps(entry) + "\n")

    def training_step(self, model, inputs, num_items_in_batch=None):
        self._record(
            "train",
            {
                "step": self.state.global_step,
                "ids": [int(target["image_id"]) for target in inputs["labels"]],
                "epoch": self.data_collator.transform.epoch,
                "world_size": self.args.world_size,
            },
        )
        return super().training_step(model, inputs, num_items_in_batch)


def run_distill_recorded(
    argv: list[str],
    record_dir: str | os.PathLike | None = None,
    kill_after_save_step: int | None = None,
    terminate_at_step: int | None = None,
) -> dict[str, float]:
    """`run_distill.run(argv)` with a [`RecordingTrainer`] (also the entry point of the subprocess driver)."""
    attributes = {"record_dir": None if record_dir is None else str(record_dir)}
    attributes.update(kill_after_save_step=kill_after_save_step, terminate_at_step=terminate_at_step)
    trainer_class = type("RecordingTrainerRun", (RecordingTrainer,), attributes)
    with mock.patch.object(run_distill, "DistillationTrainer", trainer_class):
        return run_distill.run(argv)


DRIVER = """\
import os
import sys

sys.path.insert(0, os.environ["HF_KD_TESTS_DIR"])
from test_trainer import run_distill_recorded

kill = os.environ.get("HF_KD_KILL_AFTER_SAVE_STEP")
terminate = os.environ.get("HF_KD_TERMINATE_AT_STEP")
run_distill_recorded(
    sys.argv[1:],
    os.environ.get("HF_KD_RECORD_DIR"),
    int(kill) if kill else None,
    int(terminate) if terminate else None,
)
"""


def write_driver(directory: Path) -> Path:
    path = directory / "driver.py"
    path.write_text(DRIVER)
    return path


def subprocess_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_KD_TESTS_DIR=str(TESTS_DIR), **extra)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_DIR), env.get("PYTHONPATH")]))
    return env


def read_records(record_dir: Path, kind: str, rank: int = 0) -> list[dict]:
    path = record_dir / f"{kind}_rank{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def base_args(coco_dir: Path, output_dir: Path, *extra: str) -> list[str]:
    return [
        "--data_dir", str(coco_dir),
        "--output_dir", str(output_dir),
        "--shortest_edge", "128",
        "--longest_edge", "160",
        "--use_cpu",
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--dataloader_num_workers", "0",
        "--seed", "0",
        "--logging_steps", "1",
        "--learning_rate", "1e-3",
        "--per_device_train_batch_size", "2",
        "--per_device_eval_batch_size", "2",
        "--eval_score_threshold", "0.001",
        *extra,
    ]  # fmt: skip


def save_detector(path: Path, width: int = 64, id2label: dict | None = None, seed: int = 0, **config_kwargs) -> Path:
    """A freshly initialised (from `seed`) tiny GFL detector and its image processor, saved to `path`."""
    config = GFLConfig(
        backbone="resnet18",
        backbone_frozen_stages=-1,
        fpn_channels=width,
        head_channels=width,
        id2label=id2label or ID2LABEL,
        **config_kwargs,
    )
    torch.manual_seed(seed)
    GFLForObjectDetection(config).save_pretrained(path)
    GFLImageProcessor(size={"shortest_edge": 128, "longest_edge": 160}).save_pretrained(path)
    return path


def log_history(output_dir: Path) -> list[dict]:
    return json.loads((output_dir / "trainer_state.json").read_text())["log_history"]


def train_logs(output_dir: Path) -> list[dict]:
    return [entry for entry in log_history(output_dir) if "loss" in entry]


def assert_components_add_up(entry: dict, components: set[str]) -> None:
    """The logged loss is the sum of the logged components (each rounded to 6 decimals)."""
    assert all(math.isfinite(entry[name]) for name in components), entry
    assert entry["loss"] == pytest.approx(sum(entry[name] for name in components), rel=1e-4, abs=1e-5), entry


class TransformersLogs:
    """Collects the `transformers` loggers' records (they do not propagate to the root logger)."""

    def __enter__(self):
        self.stream = io.StringIO()
        self.handler = logging.StreamHandler(self.stream)
        self.handler.setLevel(logging.DEBUG)
        transformers.utils.logging.get_logger().addHandler(self.handler)
        return self

    def __exit__(self, *exc_info):
        transformers.utils.logging.get_logger().removeHandler(self.handler)

    @property
    def text(self) -> str:
        return self.stream.getvalue()


def load_quietly(folder: Path) -> tuple[GFLForObjectDetection, str]:
    """`AutoModelForObjectDetection.from_pretrained(folder)` and what transformers logged meanwhile."""
    with TransformersLogs() as logs:
        model = AutoModelForObjectDetection.from_pretrained(folder)
    return model, logs.text


# --------------------------------------------------------------------------------------------------------------------
# Fixtures: data, models, preset runs
# --------------------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory) -> Path:
    """16 train + 8 val synthetic images (about 144 px), plus a `tiny` split: the first 4 training images."""
    root = tmp_path_factory.mktemp("coco")
    generate_synthetic_coco(
        root, num_images=NUM_TRAIN + NUM_VAL, image_size=144, val_fraction=NUM_VAL / (NUM_TRAIN + NUM_VAL)
    )
    train = json.loads((root / "instances_train.json").read_text())
    assert {image["id"] for image in train["images"]} == TRAIN_IDS
    tiny_ids = {image["id"] for image in train["images"][:4]}
    tiny = dict(train, images=train["images"][:4])
    tiny["annotations"] = [a for a in train["annotations"] if a["image_id"] in tiny_ids]
    (root / "instances_tiny.json").write_text(json.dumps(tiny))
    return root


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return save_detector(tmp_path_factory.mktemp("teacher") / "model", width=64)


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory) -> Path:
    """A student narrower than the teacher (32 vs 64 wide: CrossKD trains head adapters) to start from with
    `--model_name_or_path`."""
    return save_detector(tmp_path_factory.mktemp("student") / "model", width=32, seed=1)


class FakeHub:
    """Stands in for the Hub API: `create_repo` answers, `upload_folder` copies what it would commit (filtered with
    the real ignore patterns) into `root/commit<n>/`; `create_commit` fails, other Hub calls fail offline."""

    def __init__(self, root: Path):
        self.root = root
        self.created: list[tuple] = []
        self.commits: list[dict] = []

    def create_repo(self, api, repo_id, **kwargs):
        self.created.append((repo_id, kwargs))
        return RepoUrl(f"https://huggingface.co/{repo_id}")

    def upload_folder(self, api, *, repo_id, folder_path, commit_message=None, ignore_patterns=None, **kwargs):
        assert repo_id == HUB_MODEL_ID
        assert not kwargs.get("path_in_repo"), "only the model folder is pushed (hub_strategy every_save)"
        folder = Path(folder_path)
        files = sorted(str(path.relative_to(folder)) for path in folder.rglob("*") if path.is_file())
        patterns = list(ignore_patterns or []) + DEFAULT_IGNORE_PATTERNS
        kept = sorted(filter_repo_objects(files, ignore_patterns=patterns))
        target = self.root / f"commit{len(self.commits)}"
        for name in kept:
            (target / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(folder / name, target / name)
        self.commits.append({"message": commit_message, "files": kept, "folder": target})
        if kwargs.get("run_as_future"):
            future = Future()
            future.set_result(None)
            return future
        return None

    def patch(self):
        fake = self

        def create_repo(api, repo_id, **kwargs):
            return fake.create_repo(api, repo_id, **kwargs)

        def upload_folder(api, **kwargs):
            return fake.upload_folder(api, **kwargs)

        def create_commit(api, *args, **kwargs):
            raise AssertionError("unexpected create_commit outside upload_folder")

        return mock.patch.multiple(
            HfApi, create_repo=create_repo, upload_folder=upload_folder, create_commit=create_commit
        )


@pytest.fixture(scope="module")
def preset_run(coco_dir, teacher_dir, tmp_path_factory):
    """Runs each preset once (2 steps, batch 2, evaluation on 4 images) with a new ResNet-18 student: as wide as the
    teacher for `crosskd` (64, the default), narrower (32-wide FPN and head) for the others (`crosskd+pkd` then
    needs head and FPN adapters); `crosskd` also pushes to a mocked Hub. Returns `method -> (output_dir, metrics,
    FakeHub or None)`."""
    runs = {}

    def run(method: str):
        if method not in runs:
            output_dir = tmp_path_factory.mktemp("preset") / method
            args = base_args(coco_dir, output_dir, "--kd_method", method, "--max_steps", "2")
            # crosskd+pkd (adapters) keeps its step-2 checkpoint; the others save only the final folder
            args += ["--save_steps", "2"] if method == "crosskd+pkd" else ["--save_strategy", "no"]
            args += ["--max_eval_samples", "4", "--student_backbone", "resnet18", "--backbone_frozen_stages", "-1"]
            if method != "crosskd":
                args += ["--student_fpn_channels", "32", "--student_head_channels", "32"]
            if method != "none":
                args += ["--teacher_model_name_or_path", str(teacher_dir)]
            if method == "bckd":
                args += ["--paper_recipe"]
            hub = None
            if method == "crosskd":
                hub = FakeHub(tmp_path_factory.mktemp("hub"))
                with hub.patch():
                    push = ["--push_to_hub", "--hub_model_id", HUB_MODEL_ID, "--hub_token", HUB_TOKEN]
                    metrics = run_distill.run(args + push)
            else:
                metrics = run_distill.run(args)
            runs[method] = (output_dir, metrics, hub)
        return runs[method]

    return run


# --------------------------------------------------------------------------------------------------------------------
# 1. Presets, logging, evaluation, saving; adapters; errors; gradient accumulation; JSON config
# --------------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["crosskd", "crosskd+pkd", "bckd", "none"])
def test_preset_trains_logs_evaluates_and_saves(preset_run, method):
    output_dir, metrics, _ = preset_run(method)
    components = GFL_LOSSES | KD_LOSSES[method]

    logs = train_logs(output_dir)
    assert [entry["step"] for entry in logs] == [1, 2]
    for entry in logs:
        assert components <= set(entry), f"missing components in {entry}"
        assert not (ALL_KD_LOSSES - KD_LOSSES[method]) & set(entry), f"components of another method in {entry}"
        assert_components_add_up(entry, components)

    saved_metrics = json.loads((output_dir / "eval_results.json").read_text())
    for name in COCO_STAT_NAMES:
        assert -1 <= metrics[f"eval_{name}"] <= 1, name
        assert saved_metrics[f"eval_{name}"] == metrics[f"eval_{name}"]
    assert {f"eval_{name}" for name in GFL_LOSSES} <= set(metrics)

    model, logs = load_quietly(output_dir)
    assert isinstance(model, GFLForObjectDetection)
    width = 64 if method == "crosskd" else 32
    assert (model.config.head_channels, model.config.fpn_channels, model.config.backbone) == (width, width, "resnet18")
    assert model.config.id2label == ID2LABEL
    # The final folder is the student alone: exactly its keys, nothing for loading to skip or report.
    saved = load_file(output_dir / "model.safetensors")
    loaded = model.state_dict()
    assert set(saved) == set(loaded)
    for name, tensor in loaded.items():
        assert torch.equal(tensor, saved[name]), name
    assert "unexpected" not in logs and "not used" not in logs, logs
    assert not (output_dir / ADAPTERS_NAME).exists()


def test_narrower_student_checkpoint_keeps_the_adapters_beside_a_clean_student(preset_run):
    output_dir, _, _ = preset_run("crosskd+pkd")
    checkpoint = output_dir / "checkpoint-2"
    adapters = load_file(checkpoint / ADAPTERS_NAME)
    assert set(adapters) == {
        f"{adapter}_adapter.{kind}" for adapter in ("cls", "reg", "feature") for kind in ("weight", "bias")
    }
    assert adapters["cls_adapter.weight"].shape == (64, 32, 1, 1)
    model, logs = load_quietly(checkpoint)
    assert set(load_file(checkpoint / "model.safetensors")) == set(model.state_dict())
    assert "adapter" not in logs, logs
    for name, tensor in load_file(output_dir / "model.safetensors").items():  # the last checkpoint is the final model
        assert torch.equal(tensor, model.state_dict()[name]), name


def test_students_saved_with_adapter_keys_load_silently(student_dir, tmp_path):
    """Students distilled by hf_kd 0.1 carried `distillation_adapters.*` keys in `model.safetensors`; they still load
    without a word."""
    folder = tmp_path / "old_student"
    shutil.copytree(student_dir, folder)
    weights = load_file(folder / "model.safetensors")
    weights["distillation_adapters.cls_adapter.weight"] = torch.zeros(64, 32, 1, 1)
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    model, logs = load_quietly(folder)
    assert "distillation_adapters" not in logs, logs
    assert not hasattr(model, "distillation_adapters")
    # The check above can fail: without the ignore rule, loading reports the adapters.
    with mock.patch.object(GFLForObjectDetection, "_keys_to_ignore_on_load_unexpected", None):
        _, logs = load_quietly(folder)
    assert "distillation_adapters" in logs


def mismatch_args(case: str, tmp_path: Path, teacher_dir: Path) -> tuple[list[str], str]:
    """Teacher/student arguments of an error `case`, and the pattern the error message must match."""
    teacher = ["--teacher_model_name_or_path", str(teacher_dir)]
    if case == "stacked_convs":
        return teacher + ["--student_stacked_convs", "2"], "stacked_convs: student 2 vs teacher 4"
    if case == "classes":
        other = save_detector(tmp_path / "other_classes", id2label={0: "cat", 1: "dog"})
        return ["--teacher_model_name_or_path", str(other)], "teacher's classes .* differ from the dataset's"
    if case == "reg_max":
        student = save_detector(tmp_path / "student_reg_max", reg_max=8)
        return teacher + ["--model_name_or_path", str(student)], "reg_max: student 8 vs teacher 16"
    if case == "cross_head_index":
        return teacher + ["--kd_cross_head_index", "5"], r"cross_head_index 5 not in \[1, 4\]"
    if case == "missing_teacher":
        missing = tmp_path / "no_such_teacher"
        return ["--teacher_model_name_or_path", str(missing)], f"teacher {re.escape(repr(str(missing)))}"
    assert case == "no_teacher"
    return [], "needs --teacher_model_name_or_path"


@pytest.mark.parametrize(
    "case", ["stacked_convs", "classes", "reg_max", "cross_head_index", "missing_teacher", "no_teacher"]
)
def test_mismatched_or_missing_teacher_is_a_clear_error_before_training(coco_dir, teacher_dir, tmp_path, case):
    extra, message = mismatch_args(case, tmp_path, teacher_dir)
    output_dir = tmp_path / "out"
    args = base_args(coco_dir, output_dir, "--kd_method", "crosskd", "--max_steps", "1", *extra)
    args += ["--student_fpn_channels", "32", "--student_head_channels", "32"]
    with (
        mock.patch.object(DistillationTrainer, "train", side_effect=AssertionError("training started")),
        pytest.raises((ValueError, OSError), match=message),
    ):
        run_distill.run(args)
    assert not output_dir.exists() or not any(output_dir.iterdir())


def test_new_student_takes_the_teachers_box_settings():
    """A teacher with non-default bins and prior scale gets a student they fit (there are no student flags for them)."""
    teacher = GFLForObjectDetection(
        GFLConfig(
            backbone="resnet18", fpn_channels=32, head_channels=32, reg_max=8, prior_scale=5.0, id2label=ID2LABEL
        )
    )
    model_args = run_distill.ModelArguments(student_head_channels=64)
    student = run_distill.build_student(model_args, teacher, ID2LABEL)
    assert (student.config.reg_max, student.config.prior_scale, student.config.head_channels) == (8, 5.0, 64)
    config = DistillationArguments(output_dir="unused", kd_method="crosskd").distillation_config()
    check_compatible(config, student.config, teacher.config)  # raises on a mismatch


def test_gradient_accumulation_logs_the_same_loss_scale_and_a_json_config_works(
    coco_dir, teacher_dir, student_dir, tmp_path
):
    """The same two batches of 2 with learning rate 0: two steps logged together, and one step accumulating both
    (configured by a JSON file). The logged losses and components must be equal: the loss a step logs is the mean over
    its micro-batches, not scaled by the accumulation steps."""
    records = {name: tmp_path / f"records_{name}" for name in ("steps", "accumulated")}
    for path in records.values():
        path.mkdir()
    common = {
        "kd_method": "crosskd",
        "teacher_model_name_or_path": str(teacher_dir),
        "model_name_or_path": str(student_dir),
        "learning_rate": 0.0,
        "save_strategy": "no",
        "eval_split": "",
    }
    argv = base_args(coco_dir, tmp_path / "steps", "--max_steps", "2", "--logging_steps", "2")
    argv += [item for key, value in common.items() for item in (f"--{key}", str(value))]
    run_distill_recorded(argv, records["steps"])

    config = {
        "data_dir": str(coco_dir),
        "output_dir": str(tmp_path / "accumulated"),
        "shortest_edge": 128,
        "longest_edge": 160,
        "use_cpu": True,
        "report_to": "none",
        "disable_tqdm": True,
        "dataloader_num_workers": 0,
        "seed": 0,
        "per_device_train_batch_size": 2,
        "gradient_accumulation_steps": 2,
        "max_steps": 1,
        "logging_steps": 1,
        **common,
    }
    config_file = tmp_path / "config.json"
    config_file.write_text(json.dumps(config))
    run_distill_recorded([str(config_file)], records["accumulated"])
    args = torch.load(tmp_path / "accumulated" / "training_args.bin", weights_only=False)
    assert (args.gradient_accumulation_steps, args.max_steps, args.kd_method) == (2, 1, "crosskd")

    steps = read_records(records["steps"], "train")
    accumulated = read_records(records["accumulated"], "train")
    assert [r["ids"] for r in steps] == [r["ids"] for r in accumulated] and len(steps) == 2

    components = GFL_LOSSES | KD_LOSSES["crosskd"]
    (log_steps,) = train_logs(tmp_path / "steps")
    (log_accumulated,) = train_logs(tmp_path / "accumulated")
    assert (log_steps["step"], log_accumulated["step"]) == (2, 1)
    assert log_accumulated["loss_cls_kd"] > 0 and log_accumulated["loss_loc_kd"] > 0
    for name in ["loss", *sorted(components)]:
        assert log_accumulated[name] == pytest.approx(log_steps[name], rel=1e-4, abs=1e-6), name
    assert_components_add_up(log_accumulated, components)


def test_non_finite_loss_stops_training_naming_step_and_component(coco_dir, teacher_dir, student_dir, tmp_path):
    kd_loss_maps, calls = DetectionDistiller.kd_loss_maps, []

    def nan_on_second_step(self, *args, **kwargs):
        losses = kd_loss_maps(self, *args, **kwargs)
        calls.append(None)
        if len(calls) == 2:
            losses["loss_cls_kd"] = losses["loss_cls_kd"] * float("nan")
        return losses

    args = base_args(coco_dir, tmp_path / "out", "--kd_method", "crosskd", "--max_steps", "3", "--eval_split", "")
    args += ["--teacher_model_name_or_path", str(teacher_dir), "--model_name_or_path", str(student_dir)]
    args += ["--save_strategy", "no"]
    with (
        mock.patch.object(DetectionDistiller, "kd_loss_maps", nan_on_second_step),
        pytest.raises(FloatingPointError, match=r"step 2 .*: loss_cls_kd \(here nan\)\. ") as error,
    ):
        run_distill.run(args)
    assert "loss_loc_kd" not in str(error.value) and len(calls) == 2


# --------------------------------------------------------------------------------------------------------------------
# 2. Two processes (accelerate launch, gloo on CPU) vs one-process evaluation
# --------------------------------------------------------------------------------------------------------------------


def test_two_process_accelerate_launch_matches_one_process_evaluation(coco_dir, teacher_dir, student_dir, tmp_path):
    """2 processes x 2 steps x batch 2 of CrossKD with a narrower student (adapters, trained under DDP) on the 4-image
    split: each step is one epoch and reads each image once (4 shards split over the processes, no batch
    dispatching), the second with the next augmentation epoch; evaluation on 7 images
    (the second process pads with a duplicate) gathers each once and gives the COCO numbers of a 1-process
    evaluation of the saved model. Evaluation batches of 1: detections of an image then do not depend on what it is
    batched with (padding, GroupNorm statistics)."""
    record_dir = tmp_path / "records"
    record_dir.mkdir()
    output_dir = tmp_path / "out"
    args = base_args(coco_dir, output_dir, "--kd_method", "crosskd", "--teacher_model_name_or_path", str(teacher_dir))
    args += [
        "--model_name_or_path",
        str(student_dir),
        "--train_split",
        "tiny",
        "--max_steps",
        "2",
        "--num_shards",
        "4",
    ]
    args += ["--per_device_eval_batch_size", "1", "--max_eval_samples", "7", "--save_steps", "2"]
    command = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2"]
    command += ["--main_process_port", "0", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command += [str(write_driver(tmp_path)), *args]
    env = subprocess_env(ACCELERATE_USE_CPU="true", HF_KD_RECORD_DIR=str(record_dir), OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]

    ranks = [read_records(record_dir, "train", rank) for rank in (0, 1)]
    for records in ranks:
        assert [(r["step"], r["epoch"]) for r in records] == [(0, 0), (1, 1)], records
        assert all(r["world_size"] == 2 and len(r["ids"]) == 2 for r in records), records
    for step in (0, 1):
        seen = [image_id for records in ranks for image_id in records[step]["ids"]]
        assert sorted(seen) == [1, 2, 3, 4], f"epoch {step}: each image once over both processes, got {seen}"

    for rank in (0, 1):
        (evaluation,) = read_records(record_dir, "eval", rank)
        assert sorted(evaluation["ids"]) == VAL_IDS[:7], evaluation

    logs = train_logs(output_dir)
    assert [entry["step"] for entry in logs] == [1, 2]
    for entry in logs:
        assert_components_add_up(entry, GFL_LOSSES | KD_LOSSES["crosskd"])

    adapters = load_file(output_dir / "checkpoint-2" / ADAPTERS_NAME)  # trained under DDP, kept in the checkpoint
    assert adapters and not any(tensor.abs().sum() == 0 for tensor in adapters.values())
    two_process = json.loads((output_dir / "eval_results.json").read_text())
    assert two_process["eval_mar_100"] > 0, "no detections: the comparison would be vacuous"
    data_args = run_distill.DataArguments(data_dir=str(coco_dir), max_eval_samples=7)
    eval_dataset, ground_truth = run_distill.load_evaluation_split(data_args, "val")
    id2label = get_id2label(eval_dataset)
    processor = GFLImageProcessor.from_pretrained(output_dir)
    trainer = DistillationTrainer(
        model=AutoModelForObjectDetection.from_pretrained(output_dir),
        args=DistillationArguments(
            output_dir=str(tmp_path / "one_process"),
            kd_method="none",
            use_cpu=True,
            report_to="none",
            disable_tqdm=True,
            per_device_eval_batch_size=1,
            eval_score_threshold=0.001,
        ),
        eval_dataset=eval_dataset,
        data_collator=run_distill.DetectionCollator(processor),
        compute_metrics=coco_compute_metrics(ground_truth, id2label),
    )
    one_process = trainer.evaluate()
    for name in COCO_STAT_NAMES:
        assert one_process[f"eval_{name}"] == pytest.approx(two_process[f"eval_{name}"], abs=1e-12), name


# --------------------------------------------------------------------------------------------------------------------
# 3. SIGKILL after a checkpoint, then resume
# --------------------------------------------------------------------------------------------------------------------


def interruption_args(
    coco_dir: Path, teacher_dir: Path, student_dir: Path, output_dir: Path, *extra: str
) -> list[str]:
    """CrossKD with a narrower student (adapters): 4 steps of batch 2 on a 4-image streamed split (epochs of 2
    steps), with seeded flips, colour jitter and multi-scale."""
    extra = ["--kd_method", "crosskd", "--teacher_model_name_or_path", str(teacher_dir), *extra]
    extra += ["--model_name_or_path", str(student_dir), "--train_split", "tiny", "--eval_split", ""]
    extra += ["--max_steps", "4", "--seed", "7"]
    extra += ["--flip_prob", "0.5", "--color_jitter", "0.4", "--multi_scale_min", "112"]
    return base_args(coco_dir, output_dir, *extra)


@pytest.fixture(scope="module")
def uninterrupted_run(coco_dir, teacher_dir, student_dir, tmp_path_factory) -> tuple[Path, list[dict]]:
    """The run the interrupted ones must reproduce: its output folder and its training records."""
    root = tmp_path_factory.mktemp("uninterrupted")
    (root / "records").mkdir()
    args = interruption_args(coco_dir, teacher_dir, student_dir, root / "out", "--save_strategy", "no")
    run_distill_recorded(args, root / "records")
    records = read_records(root / "records", "train")
    assert [(r["step"], r["epoch"]) for r in records] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    for epoch in range(2):
        assert sorted(i for r in records if r["epoch"] == epoch for i in r["ids"]) == [1, 2, 3, 4]
    return root / "out", records


def assert_same_weights(expected_dir: Path, actual_dir: Path) -> None:
    expected = load_file(expected_dir / "model.safetensors")
    actual = load_file(actual_dir / "model.safetensors")
    assert expected.keys() == actual.keys()
    different = [name for name in expected if not torch.equal(expected[name], actual[name])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:5]}"
    assert json.loads((actual_dir / "trainer_state.json").read_text())["global_step"] == 4


@pytest.mark.parametrize("interruption", ["sigkill", "sigterm"])
def test_interrupted_run_resumes_to_bit_identical_weights(
    coco_dir, teacher_dir, student_dir, tmp_path, uninterrupted_run, interruption, caplog
):
    """Killed (SIGKILL) right after checkpoint-3 and then again while writing checkpoint-4 (a partial folder), or sent
    SIGTERM after step 2 (it saves checkpoint-3 at the end of step 3, says so and exits with 143); then resumed by
    run_distill from the newest complete checkpoint. The resumed run sees the batches and augmentation epochs it
    missed and ends with bit-identical weights: on CPU, with the same threads, every step is deterministic, so any
    difference means lost or wrong state (weights, adapters, optimizer, scheduler, RNG, data position)."""
    full_dir, full = uninterrupted_run
    interrupted = tmp_path / "interrupted"
    records = tmp_path / "records"
    records.mkdir()
    args = interruption_args(coco_dir, teacher_dir, student_dir, interrupted, "--save_steps", "3")
    command = [sys.executable, str(write_driver(tmp_path)), *args]
    # Same CPU threads as this process: the reduction order of some kernels depends on them.
    env = {"HF_KD_KILL_AFTER_SAVE_STEP": "3"} if interruption == "sigkill" else {"HF_KD_TERMINATE_AT_STEP": "2"}
    env = subprocess_env(**env, OMP_NUM_THREADS=str(torch.get_num_threads()))
    result = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    if interruption == "sigkill":
        assert result.returncode == -signal.SIGKILL, result.stderr[-6000:]
        # a second kill while saving checkpoint-4: its weights are written, its trainer state is not
        shutil.copytree(interrupted / "checkpoint-3", interrupted / "checkpoint-4")
        (interrupted / "checkpoint-4" / "trainer_state.json").unlink()
    else:
        assert result.returncode == 128 + signal.SIGTERM, result.stderr[-6000:]
        assert "Stopped by SIGTERM at step 3" in result.stderr and "run the same command again" in result.stderr
    assert (interrupted / "checkpoint-3" / "trainer_state.json").is_file()
    assert not (interrupted / "model.safetensors").exists()

    with caplog.at_level(logging.WARNING):
        run_distill_recorded(args, records)
    assert f"Resuming from {interrupted / 'checkpoint-3'} (step 3)" in caplog.text
    if interruption == "sigkill":
        assert "checkpoint-4 is incomplete (no readable trainer_state.json" in caplog.text
    assert read_records(records, "train") == full[3:], "the resumed run must see the batches it missed"
    assert_same_weights(full_dir, interrupted)


def test_overwrite_output_dir_starts_afresh_and_keeps_other_files(coco_dir, teacher_dir, student_dir, tmp_path):
    output_dir = tmp_path / "out"
    args = interruption_args(coco_dir, teacher_dir, student_dir, output_dir, "--save_steps", "2")
    args[args.index("--max_steps") + 1] = "2"
    run_distill.run(args)
    assert (output_dir / "checkpoint-2" / "trainer_state.json").is_file()
    (output_dir / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="Cannot resume from .*nowhere: no readable trainer_state.json"):
        run_distill.run(args + ["--resume_from_checkpoint", str(tmp_path / "nowhere")])
    run_distill.run(args + ["--overwrite_output_dir"])
    assert [entry["step"] for entry in train_logs(output_dir)] == [1, 2]  # from step 0, not resumed at 2
    assert (output_dir / "notes.txt").read_text() == "mine"


def test_student_with_other_classes_is_an_error_or_reheaded(coco_dir, tmp_path):
    """A saved student whose classes are not the dataset's: an error before training that names the way out; with
    --ignore_mismatched_sizes it takes the dataset's classes (a new classifier) and trains."""
    other = save_detector(tmp_path / "other", width=32, id2label={0: "cat", 1: "dog"})
    args = base_args(coco_dir, tmp_path / "out", "--kd_method", "none", "--max_steps", "1", "--eval_split", "")
    args += ["--model_name_or_path", str(other), "--save_strategy", "no"]
    with (
        mock.patch.object(DistillationTrainer, "train", side_effect=AssertionError("training started")),
        pytest.raises(ValueError, match=r"student's classes .* differ from the dataset's .*--ignore_mismatched_sizes"),
    ):
        run_distill.run(args)
    run_distill.run(args + ["--ignore_mismatched_sizes"])
    model, _ = load_quietly(tmp_path / "out")
    assert model.config.id2label == ID2LABEL and model.head.gfl_cls.out_channels == len(ID2LABEL)


# --------------------------------------------------------------------------------------------------------------------
# 4. push_to_hub (Hub API mocked)
# --------------------------------------------------------------------------------------------------------------------


def test_push_to_hub_sends_model_processor_and_card_that_load(preset_run, teacher_dir, coco_dir):
    output_dir, metrics, hub = preset_run("crosskd")
    assert [repo_id for repo_id, _ in hub.created] == [HUB_MODEL_ID]
    assert hub.commits, "nothing was pushed"
    final = hub.commits[-1]
    assert final["message"] == "End of training"
    assert {"README.md", "config.json", "model.safetensors", "preprocessor_config.json"} <= set(final["files"])
    assert not any(name.startswith(("checkpoint-", "_")) for commit in hub.commits for name in commit["files"])
    # the Hub token reaches no file that is written or pushed (transformers pickles it into training_args.bin)
    written = [path for path in output_dir.rglob("*") if path.is_file()]
    pushed = [commit["folder"] / name for commit in hub.commits for name in commit["files"]]
    assert "training_args.bin" in {path.name for path in pushed}
    assert not [path for path in written + pushed if HUB_TOKEN.encode() in path.read_bytes()]

    folder = final["folder"]
    card = ModelCard.load(folder / "README.md")
    assert {"crosskd", "knowledge-distillation", "object-detection", "gfl", "hf_kd"} <= set(card.data.tags)
    assert (card.data.pipeline_tag, card.data.library_name, card.data.model_name) == (
        "object-detection",
        "transformers",
        HUB_MODEL_ID,
    )
    text = card.text
    assert f"trained from scratch on {coco_dir.name}" in text and "[](" not in text
    assert "`kd_method=crosskd`" in text and "a teacher GFL with a timm `resnet18` backbone, a 64-wide FPN" in text
    assert f'pipeline("object-detection", model="{HUB_MODEL_ID}")' in text and "trust_remote_code=True" in text
    assert "- Optimizer: AdamW lr 0.001" in text
    for local_path in (str(coco_dir), str(teacher_dir), str(output_dir)):
        assert local_path not in (folder / "README.md").read_text(), local_path
    for name in COCO_STAT_NAMES:
        assert f"| {name} | {metrics[f'eval_{name}']:.4f} |" in text, name
    index = {result.metric_type: result.metric_value for result in card.data.eval_results}
    assert index == {name: round(metrics[f"eval_{name}"], 4) for name in COCO_STAT_NAMES}

    model, _ = load_quietly(folder)
    pushed = load_file(folder / "model.safetensors")
    assert all(torch.equal(tensor, pushed[name]) for name, tensor in model.state_dict().items())
    assert GFLImageProcessor.from_pretrained(folder).size == GFLImageProcessor.from_pretrained(output_dir).size

    # With hf_kd imported the pipeline must not ask (on stdin) whether to run the folder's remote code.
    with (
        mock.patch("builtins.input", side_effect=AssertionError("the pipeline asked about remote code")),
        TransformersLogs() as logs,
    ):
        detector = pipeline("object-detection", model=str(folder))
    assert "not supported" not in logs.text
    detections = detector(Image.open(coco_dir / "images" / f"{VAL_IDS[0] - 1:06d}.jpg"), threshold=0.0)
    assert detections, "the pushed model detects nothing"
    assert all({"score", "label", "box"} <= set(d) and d["label"] in CLASS_NAMES for d in detections)


# --------------------------------------------------------------------------------------------------------------------
# 5. bf16 autocast on CPU
# --------------------------------------------------------------------------------------------------------------------


def test_bf16_autocast_runs_teacher_and_student_in_bf16_with_float32_losses(
    coco_dir, teacher_dir, student_dir, tmp_path
):
    calls, loss_dtypes = [], []
    extract, kd_loss_maps, detection_loss_maps = (
        DenseDetectorPreTrainedModel.extract_features,
        DetectionDistiller.kd_loss_maps,
        GFLLoss.loss_maps,
    )

    def recording_extract(self, pixel_values):
        features = extract(self, pixel_values)
        calls.append(
            {
                "model": self.config._name_or_path,
                "training": self.training,
                "autocast": torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16,
                "features": features[0].dtype,
            }
        )
        return features

    def recording_loss_maps(original):
        def record(self, *args, **kwargs):
            maps = original(self, *args, **kwargs)
            loss_dtypes.extend(value.dtype for value in maps.values())
            return maps

        return record

    args = base_args(coco_dir, tmp_path / "out", "--bf16", "--kd_method", "crosskd", "--max_steps", "2")
    args += ["--teacher_model_name_or_path", str(teacher_dir), "--model_name_or_path", str(student_dir)]
    args += ["--save_strategy", "no", "--max_eval_samples", "2"]
    with (
        mock.patch.object(DenseDetectorPreTrainedModel, "extract_features", recording_extract),
        mock.patch.object(DetectionDistiller, "kd_loss_maps", recording_loss_maps(kd_loss_maps)),
        mock.patch.object(GFLLoss, "loss_maps", recording_loss_maps(detection_loss_maps)),
    ):
        metrics = run_distill.run(args)

    teacher_calls = [c for c in calls if c["model"] == str(teacher_dir)]
    student_calls = [c for c in calls if c["model"] == str(student_dir) and c["training"]]
    assert len(teacher_calls) == len(student_calls) == 2
    assert all(c["autocast"] and c["features"] == torch.bfloat16 for c in teacher_calls + student_calls), calls
    assert loss_dtypes and set(loss_dtypes) == {torch.float32}
    for entry in train_logs(tmp_path / "out"):
        assert_components_add_up(entry, GFL_LOSSES | KD_LOSSES["crosskd"])
    assert all(f"eval_{name}" in metrics for name in COCO_STAT_NAMES)


def test_model_card_links_only_a_hub_student_as_base_model(student_dir, tmp_path):
    """A student loaded from a local folder is neither linked as a Hub base model nor named by its path."""
    model = load_quietly(student_dir)[0]
    args = DistillationArguments(output_dir=str(tmp_path), kd_method="none", report_to="none", use_cpu=True)
    trainer = DistillationTrainer(model=model, args=args)
    trainer.create_model_card(dataset="bccd")
    card = ModelCard.load(tmp_path / "README.md")
    assert "base_model" not in card.data.to_dict() and "trained from scratch on bccd" in card.text
    assert str(student_dir) not in card.text and "Trained without a teacher" in card.text

    trainer.create_model_card(finetuned_from="hf-kd/gfl-r18-coco", dataset="bccd")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "hf-kd/gfl-r18-coco"
    assert "fine-tuned from [`hf-kd/gfl-r18-coco`](https://huggingface.co/hf-kd/gfl-r18-coco)" in card.text
    assert card.text.count("## Training") == 1


def test_paper_recipe_model_card_states_the_optimizer_and_schedule_used(preset_run):
    """The bckd preset runs with --paper_recipe: SGD at the papers' lr for its batch (0.01 x 2 / 16), the step
    decay; no AdamW, no local path."""
    output_dir, _, _ = preset_run("bckd")
    text = (output_dir / "README.md").read_text()
    assert "- Optimizer: SGD lr 0.00125, momentum 0.9, weight_decay 0.0001" in text
    assert "the papers' schedule: linear warm-up over 500 steps from 0.001x, then x0.1 at steps 1 and 1" in text
    assert "AdamW" not in text and str(output_dir.parent) not in text
    assert "BCKD ([Yang et al., ICCV 2023]" in text


def test_prepared_training_set_trains_from_parquet_shards(coco_dir, teacher_dir, tmp_path):
    """`--prepared_dir` prepares the training json once into verified parquet shards and trains from them."""
    prepared_dir, output_dir = tmp_path / "prepared", tmp_path / "run"
    args = base_args(coco_dir, output_dir, "--kd_method", "crosskd", "--teacher_model_name_or_path", str(teacher_dir))
    args += ["--prepared_dir", str(prepared_dir), "--num_shards", "2", "--max_steps", "2", "--save_strategy", "no"]
    metrics = run_distill.run(args + ["--max_eval_samples", "2"])
    assert len(list(prepared_dir.glob("train-*.parquet"))) == 2
    manifest = json.loads((prepared_dir / "hf_kd_prepared.json").read_text())
    assert manifest["counts"]["images"] == NUM_TRAIN
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    assert [entry["step"] for entry in history if "loss_cls_kd" in entry] == [1, 2]
    assert set(COCO_STAT_NAMES) <= {name.removeprefix("eval_") for name in metrics}


def test_evaluation_counts_and_reports_nan_predictions(coco_dir, student_dir, tmp_path, caplog):
    """A model whose outputs turn NaN on some priors: the evaluation reports how many (a warning and
    `eval_num_nonfinite_predictions`) instead of losing them silently in the post-processing."""
    data_args = run_distill.DataArguments(data_dir=str(coco_dir), max_eval_samples=4)
    eval_dataset, ground_truth = run_distill.load_evaluation_split(data_args, "val")
    model = load_quietly(student_dir)[0]
    processor = GFLImageProcessor(size={"shortest_edge": 128, "longest_edge": 160})
    arguments = {"kd_method": "none", "use_cpu": True, "report_to": "none", "per_device_eval_batch_size": 2}
    trainer = DistillationTrainer(
        model=model,
        args=DistillationArguments(output_dir=str(tmp_path), eval_score_threshold=0.001, **arguments),
        eval_dataset=eval_dataset,
        data_collator=run_distill.DetectionCollator(processor),
        compute_metrics=coco_compute_metrics(ground_truth, get_id2label(eval_dataset)),
    )
    forward = type(model).forward

    def nan_on_ten_priors(self, *args, **kwargs):
        outputs = forward(self, *args, **kwargs)
        outputs.logits[0, :10] = float("nan")
        return outputs

    assert trainer.evaluate()["eval_num_nonfinite_predictions"] == 0
    with mock.patch.object(type(model), "forward", nan_on_ten_priors), caplog.at_level(logging.WARNING):
        metrics = trainer.evaluate()
    assert metrics["eval_num_nonfinite_predictions"] == 20  # 10 in the first image of each of the 2 batches
    assert "20 predictions (priors) were NaN or infinite" in caplog.text
