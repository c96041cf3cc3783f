"""Accuracy benchmark: does a distilled student beat the same student trained alone?

On BCCD (blood cells, 3 classes; train / val / test) a teacher with an ImageNet-pretrained EfficientNet-Lite2
backbone is trained once per detector family (`--families`: GFL by default; RetinaNet, FCOS, ATSS); then the student
of that family (EfficientNet-Lite0 backbone, narrower FPN/head) is trained with each method (`none`, `crosskd`,
`crosskd+pkd`, `bckd`) with the same schedule and seeds. The same is done on the synthetic dataset
(`hf_kd.data.synthetic`, 160 px). Every run is an `examples/run_distill.py` process, as a user's would be; `--jobs`
of them run at a time.

Prints and writes (`--output_dir`): a Markdown table of the 12 COCO numbers on val and test (mean and std over the
seeds) per method and dataset, `results.json`, and `accuracy.png` (AP per method with error bars; val AP over
training steps) when matplotlib is installed; logs to TensorBoard when it is installed.

    pip install -e ".[bench]"
    python benchmarks/accuracy.py --preset cpu-mini --output_dir outputs/accuracy   # 2-core CPU, about an hour
    python benchmarks/accuracy.py --preset gpu-full --output_dir outputs/accuracy   # one H100, under 9 minutes
    python benchmarks/accuracy.py --families retinanet atss --datasets bccd --methods crosskd  # other families
    python benchmarks/accuracy.py --methods crosskd --teacher_dtype bf16  # the teacher's forward in bf16

A finished run (teacher or student) already in `--output_dir` is reused.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import os
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

from hf_kd.data.synthetic import generate_synthetic_coco
from hf_kd.metrics import COCO_STAT_NAMES
from hf_kd.models.detection import FAMILIES

METHODS = ("none", "crosskd", "crosskd+pkd", "bckd")
RUN_DISTILL = Path(__file__).resolve().parents[1] / "examples" / "run_distill.py"
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
    student_eval_every: int  # the teacher is evaluated once, at the end
    frozen_stages: int


@dataclass(frozen=True)
class Preset:
    setups: tuple[Setup, ...]
    seeds: tuple[int, ...]
    device_arguments: tuple[str, ...]
    synthetic_images: int
    jobs: int  # runs at a time, each in its own process with an equal share of the CPU cores


BCCD = Setup(
    name="bccd",
    teacher_backbone="tf_efficientnet_lite2",
    teacher_width=96,
    student_backbone="tf_efficientnet_lite0",
    student_width=48,
    teacher_weights="lite2",
    student_weights="lite0",
    teacher_steps=400,
    student_steps=120,
    image_size=256,
    batch_size=8,
    learning_rate=2e-3,
    student_eval_every=60,
    frozen_stages=3,
)
SYNTHETIC = replace(
    BCCD, name="synthetic", teacher_steps=300, student_steps=150, student_eval_every=50, image_size=160
)
PRESETS = {
    "cpu-mini": Preset(
        (BCCD, SYNTHETIC), seeds=(0, 1, 2), device_arguments=("--use_cpu",), synthetic_images=500, jobs=2
    ),
    # Not run yet (no GPU so far): the step counts are estimates for a 9-minute budget on one H100.
    "gpu-full": Preset(
        (
            replace(
                BCCD, teacher_steps=2000, student_steps=800, image_size=480, batch_size=16, student_eval_every=200
            ),
            replace(
                SYNTHETIC, teacher_steps=2000, student_steps=800, image_size=320, batch_size=16, student_eval_every=200
            ),
        ),
        seeds=(0, 1, 2),
        device_arguments=("--bf16", "--dataloader_num_workers", "3"),
        synthetic_images=2000,
        jobs=4,  # small detectors leave an H100 mostly idle: four runs share it
    ),
    # A few steps of everything, for the smoke test.
    "smoke": Preset(
        (
            replace(
                SYNTHETIC,
                teacher_weights=None,
                student_weights=None,
                teacher_steps=2,
                student_steps=2,
                image_size=96,
                batch_size=2,
                student_eval_every=1,
            ),
        ),
        seeds=(0,),
        device_arguments=("--use_cpu",),
        synthetic_images=12,
        jobs=2,
    ),
}


def run_arguments(
    setup: Setup, data_dir: Path, output_dir: Path, steps: int, eval_steps: int, seed: int, preset: Preset
) -> list[str]:
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
        "--eval_steps", str(eval_steps),
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


def method_name(method: str, teacher_dtype: str | None) -> str:
    """A method's name in the tables and its runs' folders: with a teacher precision, e.g. `crosskd+teacher_bf16`."""
    return method if method == "none" or teacher_dtype is None else f"{method}+teacher_{teacher_dtype}"


def run_folder(setup: Setup, family: str) -> str:
    """The folder of a dataset's and family's runs in the output folder (GFL's: the dataset's name)."""
    return setup.name if family == "gfl" else f"{setup.name}_{family}"


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
        "curve": sorted({entry["step"]: entry["eval_map"] for entry in evaluations}.items()),  # the final eval repeats
    }


def summarize(runs: list[dict], split: str) -> dict[str, tuple[float, float]]:
    """Mean and sample std over seeds of each COCO number."""
    values = {name: [run[split][name] for run in runs] for name in COCO_STAT_NAMES}
    return {name: (statistics.fmean(v), statistics.stdev(v) if len(v) > 1 else 0.0) for name, v in values.items()}


def markdown(results: dict, teachers: dict, preset_name: str, device: str) -> str:
    lines = [f"## Accuracy ({preset_name}, {device})", ""]
    for dataset, methods in results.items():
        for split in ("val", "test"):
            if methods["none"]["summary"].get(split) is None:
                continue
            num_seeds = len(methods["none"]["runs"])
            teacher_ap = 100 * teachers[dataset][split]["map"]
            lines += [f"### {dataset} {split} (mean ± std over {num_seeds} seeds; teacher AP {teacher_ap:.1f})", ""]
            lines += ["| method | " + " | ".join(COCO_STAT_NAMES) + " | ΔAP vs none (relative) |"]
            lines += ["| --- |" + " ---: |" * (len(COCO_STAT_NAMES) + 1)]
            baseline_mean, baseline_std = methods["none"]["summary"][split]["map"]
            for method, entry in methods.items():
                summary = entry["summary"][split]
                cells = [
                    f"{100 * mean:.1f} ± {100 * std:.1f}" if mean >= 0 else "n/a" for mean, std in summary.values()
                ]
                mean, std = summary["map"]
                significant = num_seeds > 1 and mean - baseline_mean > 2 * max(std, baseline_std)
                gain = (
                    f"{100 * (mean - baseline_mean):+.1f} ({mean / baseline_mean - 1:+.0%})" if baseline_mean else ""
                )
                gain = "" if method == "none" else gain + (", > 2 std" if significant else "")
                lines.append(f"| {method} | " + " | ".join(cells) + f" | {gain} |")
            lines.append("")
    return "\n".join(lines)


def plot(results: dict, teachers: dict, path: Path) -> bool:
    """Bar chart of AP per method (val and test, error bars; the teacher's val AP dashed) and val AP over steps; False
    without matplotlib."""
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
        bars.axhline(100 * teachers[dataset]["val"]["map"], color="gray", linestyle="--", label="teacher (val)")
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


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@dataclass(frozen=True)
class Run:
    """One `examples/run_distill.py` call, started once the run writing `after` (its teacher) has finished."""

    output_dir: Path
    arguments: list[str]
    after: Path | None = None


def launch(runs: list[Run], jobs: int, start: float) -> None:
    """Runs `examples/run_distill.py` for each run, as a user would, `jobs` at a time in the given order (as soon as
    its teacher is trained), each process with an equal share of the CPU cores and its log in `<output_dir>.log`."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(max(1, available_cores() // jobs))}
    pending, running, finished = list(runs), {}, set()
    while pending or running:
        for run in [run for run in pending if run.after is None or run.after in finished][: jobs - len(running)]:
            pending.remove(run)
            run.output_dir.parent.mkdir(parents=True, exist_ok=True)
            log = run.output_dir.parent / f"{run.output_dir.name}.log"
            command = [sys.executable, str(RUN_DISTILL), *run.arguments]
            with log.open("w") as output:
                process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment)
            running[run.output_dir] = (process, log)
            print(f"[{time.time() - start:.0f}s] started {run.output_dir}", flush=True)
        time.sleep(0.5)
        for output_dir, (process, log) in list(running.items()):
            if process.poll() is None:
                continue
            del running[output_dir]
            if process.returncode != 0:
                for other, _ in running.values():
                    other.kill()
                raise RuntimeError(f"{output_dir} failed with exit code {process.returncode}; its log: {log}")
            finished.add(output_dir)
            print(f"[{time.time() - start:.0f}s] finished {output_dir}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-mini")
    parser.add_argument("--output_dir", default="outputs/accuracy")
    parser.add_argument("--datasets", nargs="+", default=None, help="subset of the preset's datasets")
    parser.add_argument("--families", nargs="+", choices=sorted(FAMILIES), default=["gfl"], help="detector families")
    parser.add_argument("--methods", nargs="+", choices=METHODS, default=METHODS, help="subset (with none)")
    parser.add_argument("--seeds", nargs="+", type=int, default=None, help="instead of the preset's seeds")
    parser.add_argument("--jobs", type=int, default=None, help="runs at a time instead of the preset's")
    parser.add_argument(
        "--teacher_dtype",
        choices=("bf16", "fp16", "fp32"),
        help="the KD methods' teacher forward in this precision (run_distill's --teacher_dtype); their runs and rows "
        "are named <method>+teacher_<dtype>, the baseline is the same",
    )
    args = parser.parse_args(argv)
    preset = PRESETS[args.preset]
    setups = [setup for setup in preset.setups if not args.datasets or setup.name in args.datasets]
    methods = ("none", *(method for method in args.methods if method != "none"))  # the baseline is always run
    seeds = args.seeds or preset.seeds
    jobs = args.jobs or preset.jobs
    output_dir = Path(args.output_dir)
    start = time.time()

    import torch

    if "--use_cpu" in preset.device_arguments or not torch.cuda.is_available():
        device = f"CPU, {available_cores()} cores"
    else:
        device = torch.cuda.get_device_name()
    data_dirs = {setup.name: dataset_dir(setup, preset, output_dir) for setup in setups}
    experiments = {  # results name -> (setup, family, its folder)
        setup.name if family == "gfl" else f"{setup.name} ({family})": (
            setup,
            family,
            output_dir / run_folder(setup, family),
        )
        for setup in setups
        for family in args.families
    }
    teacher_runs, baselines, students = [], [], []
    for setup, family, root in experiments.values():
        teacher_dir = root / "teacher"
        train_teacher = not (teacher_dir / "model.safetensors").is_file()
        if train_teacher:
            arguments = backbone_arguments(setup.teacher_backbone, setup.teacher_width, setup.teacher_weights)
            arguments += run_arguments(
                setup, data_dirs[setup.name], teacher_dir, setup.teacher_steps, setup.teacher_steps, 0, preset
            )
            teacher_runs.append(
                Run(teacher_dir, ["--kd_method", "none", "--student_architecture", family, *arguments])
            )
        for method, seed in itertools.product(methods, seeds):
            run_dir = root / f"{method_name(method, args.teacher_dtype)}_seed{seed}"
            if (run_dir / "all_results.json").is_file():
                continue
            arguments = ["--student_architecture", family]
            arguments += backbone_arguments(setup.student_backbone, setup.student_width, setup.student_weights)
            arguments += run_arguments(
                setup, data_dirs[setup.name], run_dir, setup.student_steps, setup.student_eval_every, seed, preset
            )
            if method == "none":
                baselines.append(Run(run_dir, ["--kd_method", "none", *arguments]))
            else:
                teacher = ["--teacher_model_name_or_path", str(teacher_dir)]
                if args.teacher_dtype is not None:
                    teacher += ["--teacher_dtype", args.teacher_dtype]
                after = teacher_dir if train_teacher else None
                students.append(Run(run_dir, ["--kd_method", method, *teacher, *arguments], after=after))
    launch(teacher_runs + baselines + students, jobs, start)

    results, teachers = {}, {}
    for name, (_, _, root) in experiments.items():
        teachers[name] = read_run(root / "teacher")
        results[name] = {}
        for method in (method_name(method, args.teacher_dtype) for method in methods):
            runs = [read_run(root / f"{method}_seed{seed}") for seed in seeds]
            summary = {"val": summarize(runs, "val"), "test": summarize(runs, "test") if runs[0]["test"] else None}
            results[name][method] = {"runs": runs, "summary": summary}

    table = markdown(results, teachers, args.preset, device)
    trained = len(teacher_runs + baselines + students)
    table += f"\nThis call: {time.time() - start:.0f} s, {trained} runs trained ({jobs} at a time), others reused.\n"
    print("\n" + table)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.md").write_text(table)
    (output_dir / "results.json").write_text(json.dumps({"teachers": teachers, "students": results}, indent=2))
    if plot(results, teachers, output_dir / "accuracy.png"):
        print(f"Plot: {output_dir / 'accuracy.png'}")
    return results


if __name__ == "__main__":
    main()
