"""The command-line interface: the console scripts and their `--help`, argument validation, the shipped JSON configs
(a 2-step run of one), and evaluation without training (`--do_eval`, `hf-kd-eval`)."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import logging
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest
import tomllib
import torch
from test_trainer import base_args, save_detector
from transformers import pipeline

from hf_kd.cli import train
from hf_kd.cli.arguments import DataArguments, parse_arguments
from hf_kd.cli.data import load_data
from hf_kd.data import read_coco_detection
from hf_kd.data.synthetic import generate_synthetic_coco
from hf_kd.distill import DistillationArguments
from hf_kd.metrics import COCO_STAT_NAMES

REPO_DIR = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO_DIR / "configs").glob("*.json"))
SCRIPTS = tomllib.loads((REPO_DIR / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.fixture(scope="module")
def coco_dir(tmp_path_factory) -> Path:
    """12 train + 4 val synthetic images (about 144 px)."""
    root = tmp_path_factory.mktemp("coco")
    generate_synthetic_coco(root, num_images=16, image_size=144, val_fraction=0.25)
    return root


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory) -> Path:
    return save_detector(tmp_path_factory.mktemp("teacher") / "model", width=32)


@pytest.fixture(scope="module")
def config_run(coco_dir, teacher_dir, tmp_path_factory) -> tuple[Path, dict]:
    """Two steps of the shipped CrossKD config, with the data, the teacher and the sizes overridden for a CPU."""
    output_dir = tmp_path_factory.mktemp("config_run")
    sizes = base_args(coco_dir, output_dir, "--train_split", "train", "--eval_split", "val")
    overrides = [*sizes, "--teacher_model_name_or_path", str(teacher_dir), "--pretrained_backbone", "false"]
    overrides += ["--max_steps", "2", "--dataloader_num_workers", "0", "--logging_steps", "1"]
    metrics = train.run([str(REPO_DIR / "configs" / "crosskd_gfl_r101_r50_coco.json"), *overrides])
    return output_dir, metrics


def test_console_scripts_are_declared_and_installed():
    assert set(SCRIPTS) == {"hf-kd-train", "hf-kd-eval", "hf-kd-predict", "hf-kd-convert", "hf-kd-export"}
    for target in SCRIPTS.values():
        module, function = target.split(":")
        assert callable(getattr(importlib.import_module(module), function)), target
    try:
        installed = importlib.metadata.distribution("hf_kd").entry_points
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("hf_kd is not installed (pip install -e .): the console scripts are not on PATH")
    assert {entry.name: entry.value for entry in installed if entry.group == "console_scripts"} == SCRIPTS


@pytest.mark.parametrize("script", ["hf-kd-train", "hf-kd-eval", "hf-kd-predict", "hf-kd-convert", "hf-kd-export"])
def test_help_works_and_lists_hf_kd_options_before_the_trainers(script, capsys):
    module, function = SCRIPTS[script].split(":")
    with pytest.raises(SystemExit) as exit_info:
        getattr(importlib.import_module(module), function)(["--help"])
    assert exit_info.value.code == 0
    help_text = capsys.readouterr().out
    if script in ("hf-kd-train", "hf-kd-eval"):
        titles = [line for line in help_text.splitlines() if line.endswith("):")]
        assert titles == [
            "student and teacher (hf_kd):",
            "data (hf_kd):",
            "distillation (hf_kd):",
            "training (transformers TrainingArguments):",
        ]
        assert "--kd_method {crosskd,crosskd+pkd,bckd,none}" in help_text


def test_installed_train_script_runs():
    script = Path(sys.executable).parent / "hf-kd-train"
    if not script.exists():
        pytest.skip("hf_kd is not installed (pip install -e .): no hf-kd-train next to the interpreter")
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "distillation (hf_kd):" in result.stdout


def test_kd_method_is_checked_when_parsing(tmp_path, capsys):
    with pytest.raises(SystemExit):
        parse_arguments(["--kd_method", "crossKD", "--output_dir", str(tmp_path)])
    assert (
        "invalid choice: 'crossKD' (choose from 'crosskd', 'crosskd+pkd', 'bckd', 'none')" in capsys.readouterr().err
    )


@pytest.mark.parametrize("config", CONFIGS, ids=[path.stem for path in CONFIGS])
def test_shipped_configs_hold_the_papers_settings(config, tmp_path):
    model_args, data_args, training_args = parse_arguments([str(config), "--output_dir", str(tmp_path)])
    assert training_args.kd_method == config.stem.split("_")[0]
    assert training_args.paper_recipe and training_args.max_steps == 87960  # 1x: 12 epochs at a batch of 16
    assert training_args.per_device_train_batch_size == 2 and training_args.output_dir == str(tmp_path)
    assert (model_args.student_backbone, model_args.student_architecture) == ("resnet50.tv_in1k", "gfl")
    assert (data_args.train_split, data_args.eval_split, data_args.shortest_edge) == ("train2017", "val2017", 800)


def test_a_shipped_config_trains_two_steps_with_overrides(config_run):
    output_dir, metrics = config_run
    state = json.loads((output_dir / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    assert {f"eval_{name}" for name in COCO_STAT_NAMES} <= set(metrics)
    student = json.loads((output_dir / "config.json").read_text())
    assert (student["backbone"], student["model_type"]) == ("resnet50.tv_in1k", "gfl")
    card = (output_dir / "README.md").read_text()
    assert "SGD" in card and "crosskd" in card


def test_do_eval_evaluates_a_saved_detector_without_a_training_set(coco_dir, teacher_dir, tmp_path):
    """`--do_eval --model_name_or_path` (and `hf-kd-eval`) on a folder with a validation split only, whose ground
    truth is the detector's own most confident detections (from `pipeline`): AP 1.0, saved to `eval_results.json`,
    and no training output."""
    data_dir = tmp_path / "val_only"
    data_dir.mkdir()
    (data_dir / "images").symlink_to(coco_dir / "images")
    val = json.loads((coco_dir / "instances_val.json").read_text())
    detector = pipeline("object-detection", model=str(teacher_dir), device="cpu")
    label2id = {category["name"]: category["id"] for category in val["categories"]}
    detections = [
        (detection["score"], image["id"], detection)
        for image in val["images"]
        for detection in detector(str(coco_dir / "images" / image["file_name"]), threshold=0.0)
    ]
    detections.sort(key=lambda item: item[0], reverse=True)
    val["annotations"] = []
    for _, image_id, detection in detections[:12]:  # every detection above the 12th score is right
        box = detection["box"]
        width, height = box["xmax"] - box["xmin"], box["ymax"] - box["ymin"]
        val["annotations"].append(
            {
                "id": len(val["annotations"]) + 1,
                "image_id": image_id,
                "category_id": label2id[detection["label"]],
                "bbox": [box["xmin"], box["ymin"], width, height],
                "area": width * height,
                "iscrowd": 0,
            }
        )
    (data_dir / "instances_val.json").write_text(json.dumps(val))

    argv = base_args(data_dir, tmp_path / "eval", "--eval_split", "val", "--model_name_or_path", str(teacher_dir))
    argv += ["--per_device_eval_batch_size", "1"]  # as the pipeline: no padding between images
    metrics = train.run(["--do_eval", *argv])
    assert metrics["eval_map"] == pytest.approx(1.0) and metrics["eval_mar_100"] == pytest.approx(1.0)
    assert sorted(path.name for path in (tmp_path / "eval").iterdir()) == ["all_results.json", "eval_results.json"]

    # hf-kd-eval: --do_eval implied, evaluation only even with training options (e.g. from a config file)
    train.evaluate_main([*argv[:3], str(tmp_path / "eval_script"), *argv[4:], "--eval_strategy", "steps"])
    assert sorted(path.name for path in (tmp_path / "eval_script").iterdir()) == [
        "all_results.json",
        "eval_results.json",
    ]
    saved = json.loads((tmp_path / "eval_script" / "eval_results.json").read_text())
    assert saved["eval_map"] == metrics["eval_map"]


def test_do_predict_evaluates_the_test_split_and_needs_a_model(coco_dir, teacher_dir, tmp_path):
    argv = base_args(coco_dir, tmp_path / "out", "--eval_split", "", "--test_split", "val")
    metrics = train.run(["--do_predict", "--model_name_or_path", str(teacher_dir), *argv])
    assert "test_map" in metrics and not any(name.startswith("eval_") for name in metrics)
    assert (tmp_path / "out" / "test_results.json").exists()
    with pytest.raises(ValueError, match="give --model_name_or_path"):
        train.run(["--do_eval", *argv])


# --------------------------------------------------------------------------------------------------------------------
# The dataset flags of run_object_detection.py, and what is logged
# --------------------------------------------------------------------------------------------------------------------


def hub_layout_dataset(coco_dir: Path, folder: Path, splits: dict[str, str]) -> Path:
    """A local dataset in a Hub repository's layout (`data/<split>-00000-of-00001.parquet`), from COCO splits."""
    (folder / "data").mkdir(parents=True)
    for split, coco_split in splits.items():
        source = read_coco_detection(coco_dir / f"instances_{coco_split}.json")
        source.to_dataset().to_parquet(str(folder / "data" / f"{split}-00000-of-00001.parquet"))
    return folder


def data_arguments(*argv: str) -> tuple[DataArguments, DistillationArguments]:
    _, data_args, training_args = parse_arguments([*argv, "--output_dir", "unused", "--use_cpu"])
    return data_args, training_args


def test_evaluation_split_defaults_to_validation_or_val(coco_dir, tmp_path, caplog):
    hub_dir = hub_layout_dataset(coco_dir, tmp_path / "hub", {"train": "train", "validation": "val"})
    data_args, training_args = data_arguments("--dataset_name", str(hub_dir), "--no_streaming")
    with caplog.at_level(logging.INFO, logger="hf_kd"):
        train_dataset, eval_dataset, *_ = load_data(data_args, training_args)
    assert (len(train_dataset), len(eval_dataset)) == (12, 4)
    logged = [record.getMessage() for record in caplog.records]
    boxes = sum(map(len, eval_dataset["objects"]))
    assert f"Evaluation split {hub_dir} split 'validation': 4 images, {boxes} boxes, 6 classes" in logged

    caplog.clear()
    data_args, training_args = data_arguments("--data_dir", str(coco_dir))
    with caplog.at_level(logging.INFO, logger="hf_kd"):
        _, eval_dataset, _, ground_truth, _ = load_data(data_args, training_args)
    assert len(eval_dataset) == 4 and ground_truth == str(coco_dir / "instances_val.json")
    train_json = json.loads((coco_dir / "instances_train.json").read_text())
    expected = f"12 images, {len(train_json['annotations'])} boxes, 6 classes; skipped 0 images, 0 boxes"
    assert f"Training split {coco_dir / 'instances_train.json'}: {expected}" in caplog.messages


def test_train_val_split_evaluates_on_part_of_a_training_only_dataset(coco_dir, tmp_path, caplog):
    hub_dir = hub_layout_dataset(coco_dir, tmp_path / "hub", {"train": "train"})
    data_args, training_args = data_arguments("--dataset_name", str(hub_dir))
    with caplog.at_level(logging.WARNING, logger="hf_kd"):
        _, eval_dataset, *_ = load_data(data_args, training_args)
    assert eval_dataset is None and "has no evaluation split (validation or val)" in caplog.text

    data_args, training_args = data_arguments("--dataset_name", str(hub_dir), "--train_val_split", "0.25")
    train_dataset, eval_dataset, _, ground_truth, _ = load_data(data_args, training_args)
    train_ids, eval_ids = set(train_dataset["image_id"]), set(eval_dataset["image_id"])
    assert (len(train_ids), len(eval_ids)) == (9, 3) and not train_ids & eval_ids
    assert train_ids | eval_ids == set(range(1, 13))
    assert sorted(image["id"] for image in ground_truth["images"]) == sorted(eval_ids)
    with pytest.raises(ValueError, match="not both"):
        load_data(*data_arguments("--dataset_name", str(hub_dir), "--train_val_split", "0.25", "--eval_split", "x"))


def test_max_train_samples_and_hub_access_arguments(coco_dir, tmp_path):
    """`--max_train_samples` keeps the first N images (streamed or not); `--token`, `--cache_dir` and the revisions
    reach `datasets.load_dataset` and `from_pretrained`."""
    data_args, training_args = data_arguments("--data_dir", str(coco_dir), "--max_train_samples", "5")
    train_dataset = load_data(data_args, training_args)[0]
    assert len(train_dataset) == 5 and train_dataset["image_id"] == [1, 2, 3, 4, 5]
    hub_dir = hub_layout_dataset(coco_dir, tmp_path / "hub", {"train": "train", "val": "val"})
    data_args, training_args = data_arguments("--dataset_name", str(hub_dir), "--max_train_samples", "5")
    assert len(list(load_data(data_args, training_args)[0])) == 5  # streamed

    load_dataset = mock.Mock(side_effect=RuntimeError("stop"))
    argv = ["--dataset_name", "user/data", "--dataset_revision", "v1", "--dataset_config_name", "default"]
    argv += ["--token", "hf_abc", "--cache_dir", str(tmp_path / "cache"), "--teacher_model_name_or_path", "user/t"]
    argv += ["--revision", "r2", "--teacher_revision", "r1", "--eval_split", "", "--output_dir", "x"]
    model_args, data_args, training_args = parse_arguments(argv)
    with mock.patch("datasets.load_dataset", load_dataset), pytest.raises(RuntimeError, match="stop"):
        load_data(data_args, training_args, model_args.hub_kwargs())
    assert load_dataset.call_args.args == ("user/data",)
    assert load_dataset.call_args.kwargs == {
        "split": "train",
        "streaming": True,
        "name": "default",
        "revision": "v1",
        "token": "hf_abc",
        "cache_dir": str(tmp_path / "cache"),
    }
    from_pretrained = mock.Mock(side_effect=OSError("offline"))
    with (
        mock.patch("transformers.AutoModelForObjectDetection.from_pretrained", from_pretrained),
        pytest.raises(OSError, match="--teacher_model_name_or_path"),
    ):
        train.load_teacher(model_args, training_args, {0: "a"})
    assert from_pretrained.call_args.kwargs == {
        "revision": "r1",
        "trust_remote_code": False,
        "token": "hf_abc",
        "cache_dir": str(tmp_path / "cache"),
    }


def test_arguments_summary_hides_tokens(caplog):
    argv = ["--output_dir", "out", "--use_cpu", "--token", "hf_abc", "--hub_token", "hf_def", "--kd_method", "bckd"]
    with caplog.at_level(logging.INFO, logger="hf_kd"):
        train.log_arguments(*parse_arguments(argv))
    assert "Process 0 of 1, device cpu, precision fp32" in caplog.messages
    (summary,) = [message for message in caplog.messages if message.startswith("Arguments")]
    assert "kd_method=bckd" in summary and "token=<hidden>" in summary and "hub_token=<hidden>" in summary
    assert "hf_abc" not in caplog.text and "hf_def" not in caplog.text and "learning_rate" not in summary


class _Built(Exception):
    """Raised by a stand-in Trainer with the student it was given."""


def _initial_student(argv: list[str]) -> dict[str, torch.Tensor]:
    def capture(*args, model, **kwargs):
        raise _Built({name: value.clone() for name, value in model.state_dict().items()})

    with mock.patch.object(train, "DistillationTrainer", capture), pytest.raises(_Built) as built:
        train.run(argv)
    return built.value.args[0]


def test_a_new_students_initial_weights_follow_the_seed(coco_dir, tmp_path):
    argv = base_args(coco_dir, tmp_path, "--kd_method", "none", "--eval_split", "", "--student_fpn_channels", "32")
    argv += ["--student_head_channels", "32"]
    torch.manual_seed(1)
    first = _initial_student(argv)
    torch.rand(1000)  # whatever else ran in the process before
    second = _initial_student(argv)
    other_seed = _initial_student([*argv, "--seed", "1"])
    assert all(torch.equal(first[name], second[name]) for name in first)
    assert not torch.equal(first["head.gfl_cls.weight"], other_seed["head.gfl_cls.weight"])
