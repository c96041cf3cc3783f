"""Accuracy benchmark: does a distilled student beat the same student trained alone?

On BCCD (blood cells, 3 classes; train / val / test) a GFL teacher with an ImageNet-pretrained EfficientNet-Lite2
backbone is trained once; then the student (EfficientNet-Lite0 backbone, narrower FPN/head) is trained with each
method (`none`, `crosskd`, `crosskd+pkd`, `bckd`) with the same schedule and seeds. The same is done on the synthetic
dataset with ResNet backbones from scratch. Every run goes through `examples/run_distill.py`, as a user's would.

Prints and writes (`--output_dir`): a Markdown table of the 12 COCO numbers on val and test (mean and std over the
seeds) per method and dataset, `results.json`, and `accuracy.png` (AP per method with error bars; val AP over
training steps) when matplotlib is installed; logs to TensorBoard when it is installed.

    pip install -e ".[bench]"
    python benchmarks/accuracy.py --preset cpu-mini --output_dir outputs/accuracy   # 2-core CPU, about an hour
    python benchmarks/accuracy.py --preset gpu-full --output_dir outputs/accuracy   # one H100, under 9 minutes

A teacher already in `--output_dir` is reused.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))

from run_distill import main as run_distill  # noqa: E402

from hf_kd.data.synthetic import generate_synthetic_coco  # noqa: E402
from hf_kd.metrics import COCO_STAT_NAMES  # noqa: E402

METHODS = ("none", "crosskd", "crosskd+pkd", "bckd")
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


@dataclass(frozen=True)
class Setup:
    """One dataset's teacher and student and their schedule."""

    name: str
    teacher_backbone: str
    teacher_width: int
    student_backbone: str
    student_width: int
    teacher_weights: str | None  # "lite0" / "lite2": offline EfficientNet-Lite ImageNet weights
    student_weights: str | None
    teacher_steps: int
    student_steps: int
    image_size: int
    batch_size: int
    learning_rate: float
    eval_every: int
    frozen_stages: int


@dataclass(frozen=True)
class Preset:
    setups: tuple[Setup, ...]
    seeds: tuple[int, ...]
    device_arguments: tuple[str, ...]
    synthetic_images: int


BCCD = Setup(
    name="bccd",
    teacher_backbone="tf_efficientnet_lite2",
    teacher_width=96,
    student_backbone="tf_efficientnet_lite0",
    student_width=48,
    teacher_weights="lite2",
    student_weights="lite0",
    teacher_steps=600,
    student_steps=300,
    image_size=256,
    batch_size=8,
    learning_rate=2e-3,
    eval_every=100,
    frozen_stages=1,
)
SYNTHETIC = Setup(
    name="synthetic",
    teacher_backbone="resnet18",
    teacher_width=64,
    student_backbone="resnet10t",
    student_width=32,
    teacher_weights=None,
    student_weights=None,
    teacher_steps=600,
    student_steps=300,
    image_size=160,
    batch_size=8,
    learning_rate=2e-3,
    eval_every=100,
    frozen_stages=-1,
)
PRESETS = {
    "cpu-mini": Preset((BCCD, SYNTHETIC), seeds=(0, 1, 2), device_arguments=("--use_cpu",), synthetic_images=500),
    "gpu-full": Preset(
        (
            replace(BCCD, teacher_steps=3000, student_steps=1500, image_size=480, batch_size=16, eval_every=250),
            replace(SYNTHETIC, teacher_steps=3000, student_steps=1500, image_size=320, batch_size=16, eval_every=250),
        ),
        seeds=(0, 1, 2),
        device_arguments=("--bf16", "--dataloader_num_workers", "8"),
        synthetic_images=2000,
    ),
    # A few steps of everything, for the smoke test.
    "smoke": Preset(
        (
            replace(
                SYNTHETIC,
                name="synthetic",
                teacher_steps=2,
                student_steps=2,
                image_size=96,
                batch_size=2,
                eval_every=1,
            ),
        ),  # fmt: skip
        seeds=(0,),
        device_arguments=("--use_cpu",),
        synthetic_images=12,
    ),
}


def run_arguments(setup: Setup, data_dir: Path, output_dir: Path, steps: int, seed: int, preset: Preset) -> list[str]:
    """`run_distill.py` arguments shared by the teacher and the students of `setup`."""
    report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    return [
        "--data_dir", str(data_dir),
        "--train_split", "train",
        "--eval_split", "val",
        "--test_split", "test" if setup.name == "bccd" else "",
        "--output_dir", str(output_dir),
        "--max_steps", str(steps),
        "--per_device_train_batch_size", str(setup.batch_size),
        "--per_device_eval_batch_size", str(2 * setup.batch_size),
        "--optim", "adamw_torch",
        "--learning_rate", str(setup.learning_rate),
        "--weight_decay", "0.05",
        "--warmup_steps", str(max(steps // 10, 1)),
        "--lr_scheduler_type", "cosine",
        "--shortest_edge", str(setup.image_size),
        "--longest_edge", str(setup.image_size * 4 // 3),
        "--flip_prob", "0.5",
        "--backbone_frozen_stages", str(setup.frozen_stages),
        "--logging_steps", str(max(steps // 20, 1)),
        "--eval_strategy", "steps",
        "--eval_steps", str(setup.eval_every),
        "--save_strategy", "no",
        "--report_to", report_to,
        "--seed", str(seed),
        "--disable_tqdm", "true",
        *preset.device_arguments,
    ]  # fmt: skip


def backbone_arguments(backbone: str, width: int, weights: str | None) -> list[str]:
    arguments = ["--student_backbone", backbone, "--student_fpn_channels", str(width)]
    arguments += ["--student_head_channels", str(width)]
    if weights is not None:
        from hf_kd.models.efficientnet_lite import efficientnet_lite_checkpoint

        arguments += ["--backbone_checkpoint", str(efficientnet_lite_checkpoint(weights, features_only=True))]
    return arguments


def dataset_dir(setup: Setup, preset: Preset, output_dir: Path) -> Path:
    if setup.name == "bccd":
        if not (SHARED_DATA / "bccd" / "annotations_train.json").is_file():
            raise FileNotFoundError(f"BCCD not found at {SHARED_DATA / 'bccd'}.")
        return SHARED_DATA / "bccd"
    data_dir = output_dir / "synthetic_data"
    if not (data_dir / "instances_val.json").is_file():
        generate_synthetic_coco(data_dir, num_images=preset.synthetic_images, image_size=setup.image_size, seed=0)
    return data_dir


def read_run(run_dir: Path) -> dict:
    """Final val/test COCO numbers and the val AP curve of one run."""
    history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
    evaluations = [entry for entry in history if "eval_map" in entry]
    results = json.loads((run_dir / "all_results.json").read_text())
    return {
        "val": {name: results[f"eval_{name}"] for name in COCO_STAT_NAMES},
        "test": {name: results[f"test_{name}"] for name in COCO_STAT_NAMES} if "test_map" in results else None,
        "curve": [(entry["step"], entry["eval_map"]) for entry in evaluations],
    }


def summarize(runs: list[dict], split: str) -> dict[str, tuple[float, float]]:
    """Mean and sample std over seeds of each COCO number."""
    values = {name: [run[split][name] for run in runs] for name in COCO_STAT_NAMES}
    return {name: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for name, v in values.items()}


def markdown(results: dict, preset_name: str, device: str) -> str:
    lines = [f"## Accuracy ({preset_name}, {device})", ""]
    for dataset, methods in results.items():
        for split in ("val", "test"):
            if methods["none"]["summary"].get(split) is None:
                continue
            lines += [f"### {dataset} {split} (mean ± std over {len(methods['none']['runs'])} seeds)", ""]
            lines += ["| method | " + " | ".join(COCO_STAT_NAMES) + " | ΔAP vs none |"]
            lines += ["| --- |" + " ---: |" * (len(COCO_STAT_NAMES) + 1)]
            baseline_mean, baseline_std = methods["none"]["summary"][split]["map"]
            for method, entry in methods.items():
                summary = entry["summary"][split]
                cells = [f"{100 * mean:.1f} ± {100 * std:.1f}" for mean, std in summary.values()]
                mean, std = summary["map"]
                delta = 100 * (mean - baseline_mean)
                significant = method != "none" and (mean - baseline_mean) > 2 * max(std, baseline_std)
                gain = "" if method == "none" else f"{delta:+.1f}{' (> 2 std)' if significant else ''}"
                lines.append(f"| {method} | " + " | ".join(cells) + f" | {gain} |")
            lines.append("")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    """Bar chart of AP per method (val and test, error bars) and val AP over steps; False without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(results), 2, figsize=(12, 4 * len(results)), squeeze=False)
    for row, (dataset, methods) in enumerate(results.items()):
        bars, curves = axes[row]
        for offset, split in enumerate(("val", "test")):
            if methods["none"]["summary"].get(split) is None:
                continue
            means = [100 * methods[m]["summary"][split]["map"][0] for m in methods]
            stds = [100 * methods[m]["summary"][split]["map"][1] for m in methods]
            positions = [index + 0.4 * offset for index in range(len(methods))]
            bars.bar(positions, means, width=0.4, yerr=stds, capsize=4, label=split)
        bars.set_xticks([index + 0.2 for index in range(len(methods))], list(methods))
        bars.set_ylabel("AP")
        bars.set_title(f"{dataset}: student AP per method")
        bars.legend()
        for method, entry in methods.items():
            steps = [step for step, _ in entry["runs"][0]["curve"]]
            means = [100 * statistics.fmean(run["curve"][k][1] for run in entry["runs"]) for k in range(len(steps))]
            curves.plot(steps, means, marker="o", label=method)
        curves.set_xlabel("training step")
        curves.set_ylabel("val AP")
        curves.set_title(f"{dataset}: val AP over training (mean over seeds)")
        curves.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return True


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-mini")
    parser.add_argument("--output_dir", default="outputs/accuracy")
    parser.add_argument("--datasets", nargs="+", default=None, help="subset of the preset's datasets")
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    output_dir = Path(args.output_dir)
    start = time.time()

    import torch

    device = torch.cuda.get_device_name() if torch.cuda.is_available() and args.preset != "cpu-mini" else "CPU"
    results = {}
    for setup in preset.setups:
        if args.datasets and setup.name not in args.datasets:
            continue
        data_dir = dataset_dir(setup, preset, output_dir)
        teacher_dir = output_dir / setup.name / "teacher"
        if not (teacher_dir / "model.safetensors").is_file():
            print(f"[{time.time() - start:.0f}s] {setup.name}: training the teacher", flush=True)
            run_distill(
                ["--kd_method", "none"]
                + backbone_arguments(setup.teacher_backbone, setup.teacher_width, setup.teacher_weights)
                + run_arguments(setup, data_dir, teacher_dir, setup.teacher_steps, 0, preset)
            )
        methods = {}
        for method in METHODS:
            runs = []
            for seed in preset.seeds:
                run_dir = output_dir / setup.name / f"{method}_seed{seed}"
                if not (run_dir / "all_results.json").is_file():
                    print(f"[{time.time() - start:.0f}s] {setup.name}: {method}, seed {seed}", flush=True)
                    teacher = [] if method == "none" else ["--teacher_model_name_or_path", str(teacher_dir)]
                    run_distill(
                        ["--kd_method", method, *teacher]
                        + backbone_arguments(setup.student_backbone, setup.student_width, setup.student_weights)
                        + run_arguments(setup, data_dir, run_dir, setup.student_steps, seed, preset)
                    )
                runs.append(read_run(run_dir))
            summary = {"val": summarize(runs, "val"), "test": summarize(runs, "test") if runs[0]["test"] else None}
            methods[method] = {"runs": runs, "summary": summary}
        results[setup.name] = methods

    table = markdown(results, args.preset, device)
    table += f"\nTotal time: {time.time() - start:.0f} s.\n"
    print("\n" + table)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.md").write_text(table)
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    if plot(results, output_dir / "accuracy.png"):
        print(f"Plot: {output_dir / 'accuracy.png'}")
    return results


if __name__ == "__main__":
    main()
