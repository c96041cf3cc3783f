"""Accuracy benchmark: is distillation worth it, at a small budget and at convergence?

On BCCD (blood cells, 3 classes; train / val / test) and the synthetic dataset (`hf_kd.data.synthetic`), a teacher
(ImageNet EfficientNet-Lite2 backbone, wider FPN/head, fewer frozen stages) is trained once per detector family
(`--families`: GFL by default; RetinaNet, FCOS, ATSS), evaluated along the way to show its plateau. The student of that
family (EfficientNet-Lite0, narrower) is then trained with each method (`none`, `crosskd`, `crosskd+pkd`, `bckd`) and
seed under two budgets, each a full cosine schedule of its own length: `short` (how much a teacher speeds learning up)
and `converged` (meant to be long enough that the student alone's val AP is flat over its last quarter; the results
say whether it was). Every run is an `examples/run_distill.py` process, as a user's would be; `--jobs` of them run at
a time.

Prints and writes (`--output_dir`): `results.md` (per dataset: the teacher's and the converged baseline's AP and
whether each plateaued, a table per budget with val and test AP, the gain over `none` and, for the short budget, the
step at which each method's converged schedule first reaches the converged baseline's AP; then all 12 COCO numbers),
`results.json`, and `accuracy.png` (val AP over steps per method, mean ± std over seeds, and the teacher's curve) when
matplotlib is installed; logs to TensorBoard when it is installed.

    pip install -e ".[bench]"
    python benchmarks/accuracy.py --preset cpu-mini    # 2-core CPU, about 100 minutes
    python benchmarks/accuracy.py --preset gpu-full    # one GPU, not run yet
    python benchmarks/accuracy.py --families retinanet atss --datasets bccd --methods crosskd  # other families
    python benchmarks/accuracy.py --methods crosskd --teacher_dtype bf16  # the teacher's forward in bf16

A finished run (teacher or student) in `--output_dir` is reused when it was started with the same arguments; one
started with other arguments is an error (nothing is deleted or overwritten).
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
import json
import math
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
RECORD = "benchmark_run.json"  # written into a run's folder once it finished: the arguments it was started with
FLAT = 0.01  # a val AP curve has plateaued when its last quarter gains less than 1 AP point


@dataclass(frozen=True)
class Detector:
    """A teacher's or student's backbone, FPN/head width, ImageNet weights and frozen backbone stages."""

    backbone: str
    width: int
    weights: str | None  # "lite0" / "lite2": offline EfficientNet-Lite ImageNet weights
    frozen_stages: int


@dataclass(frozen=True)
class Budget:
    """A student schedule: its name, length (a full cosine schedule) and evaluation interval."""

    name: str
    steps: int
    eval_every: int


@dataclass(frozen=True)
class Setup:
    """One dataset's teacher, student and schedules."""

    name: str
    teacher: Detector
    student: Detector
    teacher_steps: int
    teacher_eval_every: int
    budgets: tuple[Budget, ...]  # "short" and "converged"
    image_size: int
    batch_size: int
    learning_rate: float

    def budget(self, name: str) -> Budget:
        return next(budget for budget in self.budgets if budget.name == name)


@dataclass(frozen=True)
class Preset:
    setups: tuple[Setup, ...]
    seeds: tuple[int, ...]
    device_arguments: tuple[str, ...]
    synthetic_images: int
    jobs: int  # runs at a time, each in its own process with an equal share of the CPU cores


TEACHER = Detector("tf_efficientnet_lite2", width=128, weights="lite2", frozen_stages=1)
STUDENT = Detector("tf_efficientnet_lite0", width=48, weights="lite0", frozen_stages=3)
BCCD = Setup(
    name="bccd",
    teacher=TEACHER,
    student=STUDENT,
    teacher_steps=800,
    teacher_eval_every=100,
    budgets=(Budget("short", 100, 50), Budget("converged", 800, 100)),
    image_size=128,
    batch_size=8,
    learning_rate=2e-3,
)
SYNTHETIC = replace(BCCD, name="synthetic")
PRESETS = {
    "cpu-mini": Preset(
        (BCCD, SYNTHETIC), seeds=(0, 1, 2), device_arguments=("--use_cpu",), synthetic_images=500, jobs=2
    ),
    # The same protocol at 4x the input size, 3x the synthetic images and 2.5x the steps. Not run yet (no GPU so far).
    "gpu-full": Preset(
        tuple(
            replace(
                setup,
                teacher_steps=2500,
                teacher_eval_every=250,
                budgets=(Budget("short", 250, 125), Budget("converged", 2000, 250)),
                image_size=4 * setup.image_size,
                batch_size=16,
            )
            for setup in (BCCD, SYNTHETIC)
        ),
        seeds=(0, 1, 2),
        device_arguments=("--bf16", "--dataloader_num_workers", "3"),
        synthetic_images=1500,
        jobs=4,  # small detectors leave a large GPU mostly idle: four runs share it
    ),
    # A few steps of everything, for the smoke test.
    "smoke": Preset(
        (
            replace(
                SYNTHETIC,
                teacher=replace(TEACHER, width=16, weights=None),
                student=replace(STUDENT, width=8, weights=None),
                teacher_steps=2,
                teacher_eval_every=1,
                budgets=(Budget("short", 2, 1), Budget("converged", 4, 2)),
                image_size=96,
                batch_size=2,
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
        "--logging_steps", str(max(steps // 20, 1)),
        "--eval_strategy", "steps",
        "--eval_steps", str(eval_steps),
        "--save_strategy", "no",
        "--seed", str(seed),
        "--disable_tqdm", "true",
        *preset.device_arguments,
    ]  # fmt: skip


def detector_arguments(detector: Detector) -> list[str]:
    arguments = ["--student_backbone", detector.backbone, "--student_fpn_channels", str(detector.width)]
    arguments += ["--student_head_channels", str(detector.width)]
    arguments += ["--backbone_frozen_stages", str(detector.frozen_stages)]
    if detector.weights is not None:
        from hf_kd.models.efficientnet_lite import efficientnet_lite_checkpoint

        checkpoint = efficientnet_lite_checkpoint(detector.weights, features_only=True)
        arguments += ["--backbone_checkpoint", str(checkpoint)]
    return arguments


def method_name(method: str, teacher_dtype: str | None) -> str:
    """A method's name in the tables and its runs' folders: with a teacher precision, e.g. `crosskd+teacher_bf16`."""
    return method if method == "none" or teacher_dtype is None else f"{method}+teacher_{teacher_dtype}"


def run_folder(setup: Setup, family: str) -> str:
    """The folder of a dataset's and family's runs in the output folder (GFL's: the dataset's name)."""
    return setup.name if family == "gfl" else f"{setup.name}_{family}"


def teacher_folder(setup: Setup) -> str:
    return f"teacher_{setup.teacher_steps}steps"


def student_folder(method: str, budget: Budget, seed: int) -> str:
    return f"{method}_{budget.steps}steps_seed{seed}"


def dataset_dir(setup: Setup, preset: Preset, output_dir: Path) -> Path:
    if setup.name == "bccd":
        if not (SHARED_DATA / "bccd" / "annotations_train.json").is_file():
            raise FileNotFoundError(f"BCCD not found at {SHARED_DATA / 'bccd'}.")
        return SHARED_DATA / "bccd"
    data_dir = output_dir / f"synthetic_data_{preset.synthetic_images}x{setup.image_size}px"
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


def mean_curve(runs: list[dict]) -> list[tuple[int, float, float]]:
    """(step, mean, std) of val AP over the seeds at each evaluation."""
    steps = [step for step, _ in runs[0]["curve"]]
    points = [[dict(run["curve"])[step] for run in runs] for step in steps]
    return [(s, statistics.fmean(p), statistics.stdev(p) if len(p) > 1 else 0.0) for s, p in zip(steps, points)]


def last_quarter_gain(curve: list[tuple[int, float]]) -> float:
    """Val AP at the last evaluation minus val AP at the last evaluation at or before three quarters of the steps."""
    earlier = [ap for step, ap in curve if step <= 0.75 * curve[-1][0]]
    return curve[-1][1] - earlier[-1] if earlier else math.nan


def first_step_reaching(curve: list[tuple[int, float, float]], target: float) -> int | None:
    """The first evaluated step whose mean val AP reaches `target`; None if none does."""
    return next((step for step, mean, _ in curve if mean >= target), None)


def analyze(teacher: dict, budgets: dict) -> dict:
    """The plateau checks and, per method, the step of the converged schedule that reaches the baseline's AP."""
    converged = {method: mean_curve(entry["runs"]) for method, entry in budgets["converged"].items()}
    baseline_ap = budgets["converged"]["none"]["summary"]["val"]["map"][0]
    return {
        "teacher_last_quarter_gain": last_quarter_gain(teacher["curve"]),
        "baseline_last_quarter_gain": last_quarter_gain([(step, mean) for step, mean, _ in converged["none"]]),
        "converged_curves": converged,
        "steps_to_baseline": {method: first_step_reaching(curve, baseline_ap) for method, curve in converged.items()},
    }


def ap_cell(mean: float, std: float) -> str:
    return f"{100 * mean:.1f} ± {100 * std:.1f}" if mean >= 0 else "n/a"


def gain_cell(summary: dict, baseline: dict, num_seeds: int) -> str:
    """AP gain over the baseline, relative gain, and "> 2 std" where it exceeds twice the larger std."""
    (mean, std), (baseline_mean, baseline_std) = summary["map"], baseline["map"]
    cell = f"{100 * (mean - baseline_mean):+.1f}" + (f" ({mean / baseline_mean - 1:+.0%})" if baseline_mean else "")
    return cell + (", > 2 std" if num_seeds > 1 and abs(mean - baseline_mean) > 2 * max(std, baseline_std) else "")


def plateaued(gain: float) -> bool:
    return abs(gain) < FLAT


def plateau_words(gain: float) -> str:
    return f"{100 * gain:+.1f} AP over its last quarter: " + ("plateaued" if plateaued(gain) else "NOT plateaued")


def markdown(setups: dict, results: dict, teachers: dict, analyses: dict, preset_name: str, device: str) -> str:
    lines = [f"# Accuracy ({preset_name}, {device})", ""]
    for name, budgets in results.items():
        setup, teacher, analysis = setups[name], teachers[name], analyses[name]
        num_seeds = len(budgets["converged"]["none"]["runs"])
        splits = [split for split in ("val", "test") if teacher[split] is not None]
        teacher_aps = " / ".join(f"{100 * teacher[split]['map']:.1f}" for split in splits)
        baseline = budgets["converged"]["none"]["summary"]
        lines += [
            f"## {name} ({setup.image_size} px, batch {setup.batch_size}, mean ± std over {num_seeds} seeds)",
            "",
            f"- Teacher ({setup.teacher.backbone}, {setup.teacher.width} wide, {setup.teacher.frozen_stages} frozen "
            f"stages, {setup.teacher_steps} steps): AP {'/'.join(splits)} {teacher_aps}; val "
            + plateau_words(analysis["teacher_last_quarter_gain"]),
            f"- Student alone ({setup.student.backbone}, {setup.student.width} wide, {setup.student.frozen_stages} "
            f"frozen stages), {setup.budget('converged').steps} steps: AP {'/'.join(splits)} "
            + " / ".join(ap_cell(*baseline[split]["map"]) for split in splits)
            + "; mean val "
            + plateau_words(analysis["baseline_last_quarter_gain"]),
            f"- Teacher minus converged student alone: {100 * (teacher['val']['map'] - baseline['val']['map'][0]):+.1f}"
            " val AP",
            "",
        ]
        converged_title = (
            "At convergence"
            if plateaued(analysis["baseline_last_quarter_gain"])
            else "At the long budget (the student alone has NOT plateaued)"
        )
        for budget_name, title in (("converged", converged_title), ("short", "At a fixed small budget")):
            budget = setup.budget(budget_name)
            reach = budget_name == "short"
            header = "| method | " + " | ".join(f"{split} AP | {split} ΔAP vs none" for split in splits)
            lines += [f"### {title}: {budget.steps} student steps", ""]
            if reach:
                header += f" | first step of the {setup.budget('converged').steps}-step schedule at the converged baseline's val AP"
            lines += [header + " |", "| --- |" + " ---: |" * (2 * len(splits) + reach)]
            for method, entry in budgets[budget_name].items():
                summary, baseline_summary = entry["summary"], budgets[budget_name]["none"]["summary"]
                cells = [ap_cell(*summary[split]["map"]) for split in splits]
                gains = [
                    "" if method == "none" else gain_cell(summary[s], baseline_summary[s], num_seeds) for s in splits
                ]
                row = [cell for pair in zip(cells, gains) for cell in pair]
                if reach:
                    step = analysis["steps_to_baseline"][method]
                    row.append("not reached" if step is None else str(step))
                lines.append(f"| {method} | " + " | ".join(row) + " |")
            lines.append("")
        for budget_name, methods in budgets.items():
            for split in splits:
                lines += [
                    f"#### All COCO numbers: {budget_name} ({setup.budget(budget_name).steps} steps), {split}",
                    "",
                ]
                lines += [
                    "| method | " + " | ".join(COCO_STAT_NAMES) + " |",
                    "| --- |" + " ---: |" * len(COCO_STAT_NAMES),
                ]
                for method, entry in methods.items():
                    cells = [ap_cell(mean, std) for mean, std in entry["summary"][split].values()]
                    lines.append(f"| {method} | " + " | ".join(cells) + " |")
                lines.append("")
    return "\n".join(lines)


def plot(setups: dict, results: dict, teachers: dict, analyses: dict, path: Path) -> bool:
    """Per dataset: the students' val AP over the converged schedule (mean ± std over seeds; the short budget's AP as
    points, the teacher's and the converged baseline's AP as lines) and the teacher's val AP over its training. False
    without matplotlib."""
    if importlib.util.find_spec("matplotlib") is None:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(len(results), 2, figsize=(13, 4.5 * len(results)), squeeze=False)
    for row, (name, budgets) in enumerate(results.items()):
        students, teacher_axis = axes[row]
        short = setups[name].budget("short")
        for index, (method, curve) in enumerate(analyses[name]["converged_curves"].items()):
            color = f"C{index}"
            steps, means, stds = (list(values) for values in zip(*curve))
            students.plot(steps, [100 * m for m in means], marker="o", color=color, label=method)
            low, high = ([100 * (m + sign * s) for m, s in zip(means, stds)] for sign in (-1, 1))
            students.fill_between(steps, low, high, color=color, alpha=0.15)
            mean, std = budgets["short"][method]["summary"]["val"]["map"]
            students.errorbar(short.steps, 100 * mean, yerr=100 * std, fmt="s", color=color, capsize=4)
        students.axhline(100 * teachers[name]["val"]["map"], color="gray", linestyle="--", label="teacher")
        baseline = budgets["converged"]["none"]["summary"]["val"]["map"][0]
        students.axhline(100 * baseline, color="C0", linestyle=":", label="student alone, converged")
        students.set_xlabel(f"student step (lines: the converged schedule; squares: the {short.steps}-step schedule)")
        students.set_ylabel("val AP")
        students.set_title(f"{name}: students' val AP (mean ± std over seeds)")
        students.legend(fontsize=8)
        steps, aps = zip(*teachers[name]["curve"])
        teacher_axis.plot(steps, [100 * ap for ap in aps], marker="o", color="gray")
        teacher_axis.set_xlabel("teacher step")
        teacher_axis.set_ylabel("val AP")
        teacher_axis.set_title(f"{name}: teacher's val AP over its training")
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
    steps: int
    after: Path | None = None

    def finished(self) -> bool:
        """Whether this run already finished in its folder; an error if the folder holds a run of other arguments."""
        record = self.output_dir / RECORD
        if not record.is_file():
            return False
        if json.loads(record.read_text())["arguments"] != self.arguments:
            raise FileExistsError(
                f"{self.output_dir} holds a finished run started with other arguments than this benchmark's (see "
                f"{record}); choose another --output_dir or move that folder away."
            )
        return True


def launch(runs: list[Run], jobs: int, start: float) -> None:
    """Runs `examples/run_distill.py` for each run, as a user would, `jobs` at a time in the given order (as soon as
    its teacher is trained), each process with an equal share of the CPU cores and its log in `<output_dir>.log`."""
    environment = {**os.environ, "OMP_NUM_THREADS": str(max(1, available_cores() // jobs))}
    report_to = "tensorboard" if importlib.util.find_spec("tensorboard") else "none"
    pending, running, finished = list(runs), {}, set()
    while pending or running:
        for run in [run for run in pending if run.after is None or run.after in finished][: jobs - len(running)]:
            pending.remove(run)
            run.output_dir.parent.mkdir(parents=True, exist_ok=True)
            log = run.output_dir.parent / f"{run.output_dir.name}.log"
            command = [sys.executable, str(RUN_DISTILL), *run.arguments, "--report_to", report_to]
            with log.open("w") as output:
                process = subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT, env=environment)
            running[run.output_dir] = (run, process, log)
            print(f"[{time.time() - start:.0f}s] started {run.output_dir}", flush=True)
        time.sleep(0.5)
        for output_dir, (run, process, log) in list(running.items()):
            if process.poll() is None:
                continue
            del running[output_dir]
            if process.returncode != 0:
                for _, other, _ in running.values():
                    other.kill()
                raise RuntimeError(f"{output_dir} failed with exit code {process.returncode}; its log: {log}")
            (output_dir / RECORD).write_text(json.dumps({"arguments": run.arguments}, indent=1))
            finished.add(output_dir)
            print(f"[{time.time() - start:.0f}s] finished {output_dir}", flush=True)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu-mini")
    parser.add_argument("--output_dir", default=None, help="default: outputs/accuracy/<preset>")
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
    output_dir = Path(args.output_dir or f"outputs/accuracy/{args.preset}")
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
        teacher_dir = root / teacher_folder(setup)
        arguments = ["--kd_method", "none", "--student_architecture", family, *detector_arguments(setup.teacher)]
        arguments += run_arguments(
            setup, data_dirs[setup.name], teacher_dir, setup.teacher_steps, setup.teacher_eval_every, 0, preset
        )
        teacher = Run(teacher_dir, arguments, setup.teacher_steps)
        train_teacher = not teacher.finished()
        if train_teacher:
            teacher_runs.append(teacher)
        for budget, method, seed in itertools.product(setup.budgets, methods, seeds):
            run_dir = root / student_folder(method_name(method, args.teacher_dtype), budget, seed)
            arguments = ["--kd_method", method, "--student_architecture", family, *detector_arguments(setup.student)]
            arguments += run_arguments(
                setup, data_dirs[setup.name], run_dir, budget.steps, budget.eval_every, seed, preset
            )
            if method == "none":
                run = Run(run_dir, arguments, budget.steps)
            else:
                arguments += ["--teacher_model_name_or_path", str(teacher_dir)]
                if args.teacher_dtype is not None:
                    arguments += ["--teacher_dtype", args.teacher_dtype]
                run = Run(run_dir, arguments, budget.steps, after=teacher_dir if train_teacher else None)
            if not run.finished():
                (baselines if method == "none" else students).append(run)
    longest_first = sorted(baselines, key=lambda run: -run.steps) + sorted(students, key=lambda run: -run.steps)
    launch(teacher_runs + longest_first, jobs, start)

    results, teachers, analyses = {}, {}, {}
    for name, (setup, _, root) in experiments.items():
        teachers[name] = read_run(root / teacher_folder(setup))
        results[name] = {}
        for budget in setup.budgets:
            results[name][budget.name] = {}
            for method in (method_name(method, args.teacher_dtype) for method in methods):
                runs = [read_run(root / student_folder(method, budget, seed)) for seed in seeds]
                summary = {split: summarize(runs, split) if runs[0][split] else None for split in ("val", "test")}
                results[name][budget.name][method] = {"runs": runs, "summary": summary}
        analyses[name] = analyze(teachers[name], results[name])

    by_name = {name: setup for name, (setup, _, _) in experiments.items()}
    table = markdown(by_name, results, teachers, analyses, args.preset, device)
    trained = len(teacher_runs + baselines + students)
    table += f"\nThis call: {time.time() - start:.0f} s, {trained} runs trained ({jobs} at a time), others reused.\n"
    print("\n" + table)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "results.md").write_text(table)
    summary = {"teachers": teachers, "students": results, "analyses": analyses}
    (output_dir / "results.json").write_text(json.dumps(summary, indent=2))
    if plot(by_name, results, teachers, analyses, output_dir / "accuracy.png"):
        print(f"Plot: {output_dir / 'accuracy.png'}")
    return results


if __name__ == "__main__":
    main()
