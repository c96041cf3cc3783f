"""Speed of distillation: what a distillation step costs next to training the student alone plus running the
teacher, per detector family and precision setting, and how fast the detectors infer.

For each family (`--families`) and precision setting (`--settings`), measures after warm-up the median and min over
`--repeats` calls of: the student's train step (forward, detection loss, backward, SGD step, as
`DistillationTrainer` trains without a teacher), the teacher's forward (eval, no grad, in the teacher's precision),
the distillation train step of each KD preset (`DetectionDistiller`'s forward: student, teacher, cross-head, detection
and KD losses; backward; the step's one check of labels and losses; SGD step), and inference with post-processing
(forward and the image processor's `post_process_object_detection`) of the student and the teacher, plus the
post-processing alone; also the FLOPs and peak memory of one call, and the ratio `distill step / (student step +
teacher forward)` in time and in FLOPs. The timed calls go round robin over all measurements of a setting, so that a
shared machine's changing load biases no ratio. Prints a Markdown table per setting and a summary of the ratios, and
optionally writes JSON.

Settings: `fp32`; `bf16+channels_last` (the Trainer's --bf16 autocast for student and teacher, models and inputs
channels-last); `fp32+teacher_bf16` (the student in fp32, the teacher in bf16 and channels-last: `--teacher_dtype
bf16`).

    python benchmarks/speed.py                          # GFL, three settings; 2 x 3x320x320 train, 1 x 640 inference
    python benchmarks/speed.py --families gfl retinanet fcos atss --settings fp32 --json outputs/speed_families.json
    python benchmarks/speed.py --device cuda --settings bf16+channels_last --compile --json outputs/speed_gpu.json

Peak memory is what one call adds: on GPU the CUDA max allocated during the call minus the memory allocated before
it (the JSON also has the absolute max, which counts every model the benchmark holds); on CPU the growth of the peak
resident set size over the RSS before the call (Linux `VmHWM`, reset through `/proc/self/clear_refs`, after
`malloc_trim`).
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import logging
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import NamedTuple

import timm
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

import hf_kd
from hf_kd.distill import DistillationArguments, DistillationTrainer
from hf_kd.models.detection import FAMILIES

KD_PRESETS = ("crosskd", "crosskd+pkd", "bckd")


class Setting(NamedTuple):
    """A precision setting: the student's autocast dtype (None: fp32), channels-last student, the teacher's dtype
    (None: the student's) and channels-last teacher."""

    name: str
    dtype: torch.dtype | None
    channels_last: bool
    teacher_dtype: torch.dtype | None
    teacher_channels_last: bool


SETTINGS = {
    "fp32": Setting("fp32", None, False, None, False),
    "bf16+channels_last": Setting("bf16+channels_last", torch.bfloat16, True, None, True),
    "fp32+teacher_bf16": Setting("fp32+teacher_bf16", None, False, torch.bfloat16, True),
    "fp16+channels_last": Setting("fp16+channels_last", torch.float16, True, None, True),
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options (see `--help`)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--families", nargs="+", default=["gfl"], choices=sorted(FAMILIES), help="detector families")
    parser.add_argument("--settings", nargs="+", default=["fp32", "bf16+channels_last", "fp32+teacher_bf16"],
                        choices=tuple(SETTINGS), help="precision settings")  # fmt: skip
    parser.add_argument("--student", default="resnet18", help="timm backbone of the student")
    parser.add_argument("--teacher", default="resnet50", help="timm backbone of the teacher")
    parser.add_argument("--width", type=int, default=256, help="FPN and head width of both detectors")
    parser.add_argument(
        "--student_width", type=int, help="student FPN/head width (default --width; narrower adds adapters)"
    )
    parser.add_argument("--stacked_convs", type=int, default=4)
    parser.add_argument("--num_labels", type=int, default=80)
    parser.add_argument("--batch_size", type=int, default=2)
    parser.add_argument("--image_size", type=int, default=320, help="side of the square training images")
    parser.add_argument("--boxes_per_image", type=int, default=3)
    parser.add_argument("--inference_size", type=int, default=640, help="side of the one square inference image")
    parser.add_argument(
        "--postprocess_load",
        choices=("full", "init"),
        default="full",
        help="full: the inference models' class biases are 0, so every level keeps pre_nms_topk candidates for NMS "
        "(a busy image through a trained model); init: the initial biases, which keep almost nothing",
    )
    parser.add_argument("--methods", nargs="+", default=list(KD_PRESETS), choices=KD_PRESETS)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=("cpu", "cuda"))
    parser.add_argument("--compile", action="store_true", help="torch.compile the student and the teacher")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument(
        "--warmup", type=int, help="untimed calls of each function before timing (default 2; 5 with --compile)"
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed calls")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 5 if args.compile else 2  # compiled functions recompile during their first calls
    return args


def detector_config(family: str, backbone: str, width: int, args: argparse.Namespace):
    """The family's config with `backbone` and an FPN and head `width` wide (GroupNorm groups: 32, fewer if narrow)."""
    config_class = FAMILIES[family][0]
    kwargs = {"backbone": backbone, "fpn_channels": width, "head_channels": width, "num_labels": args.num_labels}
    if config_class().norm_groups is not None:
        kwargs["norm_groups"] = min(32, width // 2)
    return config_class(stacked_convs=args.stacked_convs, **kwargs)


def make_batch(
    batch_size: int, image_size: int, boxes_per_image: int, num_labels: int, device: torch.device, seed: int
) -> dict:
    """Random normalized images (no padding) with `boxes_per_image` random boxes each, as the collator gives them."""
    generator = torch.Generator().manual_seed(seed)
    labels = []
    for _ in range(batch_size):
        corner = torch.rand(boxes_per_image, 2, generator=generator) * 0.6 * image_size
        size = (0.1 + 0.3 * torch.rand(boxes_per_image, 2, generator=generator)) * image_size
        labels.append(
            {
                "boxes": torch.cat([corner, corner + size], dim=1).to(device),
                "class_labels": torch.randint(num_labels, (boxes_per_image,), generator=generator).to(device),
            }
        )
    return {
        "pixel_values": torch.randn(batch_size, 3, image_size, image_size, generator=generator).to(device),
        "pixel_mask": torch.ones(batch_size, image_size, image_size, dtype=torch.bool, device=device),
        "labels": labels,
    }


class PeakMemory:
    """Peak memory that a block adds, in MiB: on GPU the CUDA max allocated during the block minus the allocated memory
    at entry (`max_allocated_mib` keeps the absolute max); on CPU (Linux) the peak RSS growth over the RSS at entry,
    after handing the allocator's free memory back to the system (`malloc_trim`); None where `/proc/self/clear_refs`
    cannot reset the peak RSS."""

    def __init__(self, device: torch.device):
        self.device = device
        self.kind = "cuda_max_allocated_delta" if device.type == "cuda" else "cpu_peak_rss_delta"
        self.mib: float | None = None
        self.max_allocated_mib: float | None = None
        self._start_kib: int | None = None

    @staticmethod
    def _status_kib(field: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(f"{field}:"):
                return int(line.split()[1])
        raise KeyError(field)

    def __enter__(self) -> PeakMemory:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start_kib = torch.cuda.memory_allocated(self.device) // 2**10
            return self
        gc.collect()
        try:
            ctypes.CDLL(None).malloc_trim(0)
            Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
            self._start_kib = self._status_kib("VmRSS")
        except (OSError, AttributeError, KeyError):
            self._start_kib = None
        return self

    def __exit__(self, *exc_info) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.max_allocated_mib = torch.cuda.max_memory_allocated(self.device) / 2**20
            self.mib = self.max_allocated_mib - self._start_kib / 2**10
        elif self._start_kib is not None:
            self.mib = (self._status_kib("VmHWM") - self._start_kib) / 2**10


def benchmark(
    calls: dict[str, tuple[Callable[[], object], int]], device: torch.device, args: argparse.Namespace
) -> list[dict]:
    """Times each of `calls` (name: function, images per call): `args.warmup` untimed calls each, then `args.repeats`
    rounds that time every function once in turn (synchronized on GPU), so that a change of load on a shared machine
    affects all measurements alike. Then one more call each for the peak memory and one for the FLOPs (convolutions
    and matrix products, forward and backward; not under `--compile`)."""
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    for function, _ in calls.values():
        for _ in range(args.warmup):
            function()
    times = {name: [] for name in calls}
    for _ in range(args.repeats):
        for name, (function, _) in calls.items():
            synchronize()
            start = time.perf_counter()
            function()
            synchronize()
            times[name].append((time.perf_counter() - start) * 1000)

    results = []
    for name, (function, images) in calls.items():
        with PeakMemory(device) as memory:
            function()
        gflop = None
        if not args.compile:
            with FlopCounterMode(display=False) as counter:
                function()
            gflop = counter.get_total_flops() / 1e9
        median = statistics.median(times[name])
        print(f"  {name}: median {median:.1f} ms, min {min(times[name]):.1f} ms", file=sys.stderr, flush=True)
        results.append(
            {
                "name": name,
                "median_ms": median,
                "min_ms": min(times[name]),
                "times_ms": times[name],
                "images_per_second": images * 1000 / median,
                "gflop": gflop,
                "peak_memory_mib": memory.mib,
                "memory_kind": memory.kind,
                "cuda_max_allocated_mib": memory.max_allocated_mib,
            }
        )
    return results


def prepare(model, device: torch.device, channels_last: bool, compile_model: bool):
    """Moves `model` to the device (channels_last if asked) and compiles it in place if asked."""
    model.to(device, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    if compile_model:
        model.compile()
    return model


def autocast(device: torch.device, dtype: torch.dtype | None) -> AbstractContextManager:
    """Autocast to `dtype` on `device`, or nothing for fp32 (None)."""
    return torch.autocast(device.type, dtype=dtype) if dtype is not None else nullcontext()


def train_step(student, teacher, method: str, batch: dict, workdir: str, setting: Setting, args) -> Callable[[], None]:
    """One optimizer step as `DistillationTrainer` trains (method `none`: the student alone): the distiller and an SGD
    optimizer (momentum 0.9, weight decay 1e-4; lr 1e-4, small, so that steps repeated on one batch from random
    weights, without the papers' warm-up, stay finite: FCOS's exp box output overflows at lr 0.01 within a few steps;
    the lr does not change the cost) prepared by the trainer's accelerator (autocast
    to the setting's dtype with float32 outputs, fp16 gradient scaling), `compute_loss`, `accelerator.backward`, the
    trainer's one check of the step's labels and losses, the step. Left out: the Trainer's own NaN filter of the
    logged loss, which waits for the device after the step as the check does."""
    training_args = DistillationArguments(
        output_dir=workdir,
        kd_method=method,
        teacher_dtype={None: None, torch.bfloat16: "bf16", torch.float16: "fp16"}[setting.teacher_dtype],
        use_cpu=args.device == "cpu",
        bf16=setting.dtype == torch.bfloat16,
        fp16=setting.dtype == torch.float16,
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
    )
    trainer = DistillationTrainer(model=student, args=training_args, teacher=teacher)
    accelerator = trainer.accelerator
    distiller = accelerator.prepare_model(trainer.model)
    parameters = [parameter for parameter in distiller.parameters() if parameter.requires_grad]  # incl. adapters
    optimizer = accelerator.prepare_optimizer(torch.optim.SGD(parameters, lr=1e-4, momentum=0.9, weight_decay=1e-4))
    distiller.train()

    def step() -> None:
        loss = trainer.compute_loss(distiller, batch)
        accelerator.backward(loss)
        trainer._check_step()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def build_calls(family: str, setting: Setting, args, device: torch.device, workdir: str) -> dict:
    """The measured functions (name: function, images per call), on fresh copies of one student and one teacher."""
    torch.manual_seed(args.seed)
    _, model_class, processor_class = FAMILIES[family]
    student = model_class(detector_config(family, args.student, args.student_width or args.width, args))
    teacher = model_class(detector_config(family, args.teacher, args.width, args)).eval().requires_grad_(False)
    student_format = torch.channels_last if setting.channels_last else torch.contiguous_format
    batch = make_batch(args.batch_size, args.image_size, args.boxes_per_image, args.num_labels, device, args.seed)
    batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=student_format)
    image = torch.randn(1, 3, args.inference_size, args.inference_size, generator=torch.Generator().manual_seed(1))
    image = image.to(device).contiguous(memory_format=student_format)
    inference_models = {"student": copy.deepcopy(student).eval(), "teacher": copy.deepcopy(teacher)}
    if args.postprocess_load == "full":
        for model in inference_models.values():
            torch.nn.init.zeros_(model.head.classifier.bias)
    prepare(teacher, device, setting.teacher_channels_last, args.compile)
    teacher_dtype = setting.teacher_dtype or setting.dtype

    def new_student():
        return prepare(copy.deepcopy(student), device, setting.channels_last, args.compile)

    images = args.batch_size
    calls = {"student train step": (train_step(new_student(), None, "none", batch, workdir, setting, args), images)}

    def teacher_forward() -> None:
        with torch.no_grad(), autocast(device, teacher_dtype):
            teacher(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"])

    calls["teacher forward (no grad)"] = (teacher_forward, images)
    for method in args.methods:
        step = train_step(new_student(), teacher, method, batch, workdir, setting, args)
        calls[f"distill step {method}"] = (step, images)

    processor = processor_class()
    for role, model in inference_models.items():
        prepare(model, device, setting.channels_last, args.compile)
        dtype = setting.dtype if role == "student" else teacher_dtype

        def infer(model=model, dtype=dtype) -> None:
            with torch.no_grad(), autocast(device, dtype):
                processor.post_process_object_detection(model(pixel_values=image), threshold=0.05)

        calls[f"{role} inference + post-processing"] = (infer, 1)

    with torch.no_grad(), autocast(device, setting.dtype):
        outputs = inference_models["student"](pixel_values=image)
    calls["post-processing alone (student outputs)"] = (
        lambda: processor.post_process_object_detection(outputs, threshold=0.05),
        1,
    )
    return calls


def environment(device: torch.device) -> dict:
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        cpuinfo = Path("/proc/cpuinfo")
        models = (
            [
                line.split(":", 1)[1].strip()
                for line in cpuinfo.read_text().splitlines()
                if line.startswith("model name")
            ]
            if cpuinfo.exists()
            else []
        )
        device_name = models[0] if models else platform.processor() or platform.machine()
    return {
        "device": str(device),
        "device_name": device_name,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "timm": timm.__version__,
        "hf_kd": hf_kd.__version__,
        "platform": platform.platform(),
    }


def markdown_table(run: dict, config: dict, env: dict) -> str:
    """The measurements of one family and setting."""
    student_width = config["student_width"] or config["width"]
    lines = [
        f"{run['family']} student {config['student']} ({student_width} wide), teacher {config['teacher']} "
        f"({config['width']} wide), {config['stacked_convs']} stacked convs, {config['num_labels']} classes; train "
        f"batch {config['batch_size']} x 3x{config['image_size']}x{config['image_size']}, {config['boxes_per_image']} "
        f"boxes per image; inference 1 x 3x{config['inference_size']}x{config['inference_size']}. Setting "
        f"{run['setting']}{', torch.compile' if config['compile'] else ''}; {env['device_name']} ({env['device']}, "
        f"{env['threads']} threads); torch {env['torch']}, transformers {env['transformers']}, timm {env['timm']}. "
        f"Median and min of {config['repeats']} calls (round robin) after {config['warmup']} warm-up calls.",
        "",
        "| measurement | median ms | min ms | images/s | peak memory MiB | GFLOP | ratio (median) | ratio (min) | "
        "ratio (FLOP) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in run["results"]:
        method = result["name"].removeprefix("distill step ")
        ratio = run["ratios"].get(method, {})
        ratio = " | ".join(
            "" if ratio.get(key) is None else f"{ratio[key]:.3f}" for key in ("median_ms", "min_ms", "gflop")
        )
        memory = "n/a" if result["peak_memory_mib"] is None else f"{result['peak_memory_mib']:.0f}"
        gflop = "n/a" if result["gflop"] is None else f"{result['gflop']:.1f}"
        lines.append(
            f"| {result['name']} | {result['median_ms']:.1f} | {result['min_ms']:.1f} | "
            f"{result['images_per_second']:.2f} | {memory} | {gflop} | {ratio} |"
        )
    return "\n".join(lines)


def summary_table(report: dict) -> str:
    """The distill-step ratios of every family, setting and method, in one table."""
    lines = [
        "| family | setting | method | distill step median ms | student step + teacher forward ms | ratio (paired) "
        "| ratio (median) | ratio (min) | ratio (FLOP) |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    for run in report["runs"]:
        by_name = {result["name"]: result for result in run["results"]}
        alone = by_name["student train step"]["median_ms"] + by_name["teacher forward (no grad)"]["median_ms"]
        for method, ratio in run["ratios"].items():
            flop = "n/a" if ratio["gflop"] is None else f"{ratio['gflop']:.3f}"
            lines.append(
                f"| {run['family']} | {run['setting']} | {method} | {by_name[f'distill step {method}']['median_ms']:.1f}"
                f" | {alone:.1f} | {ratio['paired_median']:.3f} | {ratio['median_ms']:.3f} | {ratio['min_ms']:.3f} | {flop} |"
            )
    kind = report["runs"][0]["results"][0]["memory_kind"]
    lines += [
        "",
        "Ratio: distill step / (student train step + teacher forward): the median over rounds of each round's ratio "
        "(paired: the three calls of a round share the machine's load), of the medians, of the mins, of the FLOPs. "
        "Peak memory: what one call adds, "
        + (
            "CUDA max allocated during the call minus the allocated memory before it."
            if kind == "cuda_max_allocated_delta"
            else "growth of the peak RSS during the call over the RSS before it (after malloc_trim)."
        )
        + " GFLOP: convolutions and matrix products of one call (forward and backward), by torch's FlopCounterMode.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark; prints the Markdown tables, writes `--json` and returns the report."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    logging.getLogger("timm").setLevel(logging.ERROR)
    device = torch.device(args.device)
    report = {
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "environment": environment(device),
        "runs": [],
    }
    for family in args.families:
        for name in args.settings:
            print(f"{family}, {name}:", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory() as workdir:
                results = benchmark(build_calls(family, SETTINGS[name], args, device, workdir), device, args)
            by_name = {result["name"]: result for result in results}
            alone = [by_name["student train step"], by_name["teacher forward (no grad)"]]
            ratios = {}
            for method in args.methods:
                distill = by_name[f"distill step {method}"]
                ratios[method] = {
                    key: None if distill[key] is None else distill[key] / sum(result[key] for result in alone)
                    for key in ("median_ms", "min_ms", "gflop")
                }
                # per round, against the same round's student step and teacher forward: robust to a changing load
                per_round = [d / sum(times) for d, *times in zip(distill["times_ms"], *(r["times_ms"] for r in alone))]
                ratios[method]["paired_median"] = statistics.median(per_round)
            run = {"family": family, "setting": name, "results": results, "ratios": ratios}
            report["runs"].append(run)
            print(markdown_table(run, report["config"], report["environment"]) + "\n")
    print(summary_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
