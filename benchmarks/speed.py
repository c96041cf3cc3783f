"""Speed of distillation on one student/teacher configuration: what a distillation step costs next to training the
student alone plus running the teacher, and how fast the detectors infer.

Measures, after warm-up, the median and min over `--repeats` calls of: the student's train step (forward, GFL loss,
backward, SGD step), the teacher's forward (eval, no grad), the distillation train step of each KD preset (student
forward with tower states, teacher forward without grad, GFL and KD losses, backward, SGD step; computed by
`DistillationTrainer.compute_loss`), and inference with post-processing (eval forward including `detect`) of the
student and the teacher, plus the post-processing alone; also the FLOPs and peak memory of one call and the
efficiency ratio `distill step / (student step + teacher forward)` in time and in FLOPs. The timed calls go round
robin over all measurements, so that a shared machine's changing load biases no ratio. Prints a Markdown table and
optionally writes JSON.

    python benchmarks/speed.py                                   # 2 x 3x320x320 train, 1 x 3x640x640 inference
    python benchmarks/speed.py --channels_last --json outputs/speed_cpu.json
    python benchmarks/speed.py --device cuda --dtype bf16 --compile --json outputs/speed_h100.json

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

import timm
import torch
import transformers
from torch.utils.flop_counter import FlopCounterMode

import hf_kd
from hf_kd import GFLConfig, GFLForObjectDetection
from hf_kd.distill.arguments import DistillationArguments
from hf_kd.distill.trainer import DistillationTrainer
from hf_kd.models.gfl.modeling_gfl import detect

KD_PRESETS = ("crosskd", "crosskd+pkd", "bckd")
DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command-line options (see `--help`)."""
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter
    )
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
    parser.add_argument(
        "--dtype",
        default="fp32",
        choices=tuple(DTYPES),
        help="mixed precision: autocast to this dtype (train steps: the Trainer's --bf16/--fp16); fp32: none",
    )
    parser.add_argument("--channels_last", action="store_true", help="models and inputs in channels_last")
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


def detector_config(backbone: str, width: int, args: argparse.Namespace) -> GFLConfig:
    """GFL config with `backbone` and an FPN and head `width` channels wide (GroupNorm groups: 32, fewer if narrow)."""
    return GFLConfig(
        backbone=backbone,
        fpn_channels=width,
        head_channels=width,
        stacked_convs=args.stacked_convs,
        num_labels=args.num_labels,
        norm_groups=min(32, width // 2),
    )


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
        "pixel_mask": torch.ones(batch_size, image_size, image_size, dtype=torch.long, device=device),
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


def prepare(model: GFLForObjectDetection, device: torch.device, args: argparse.Namespace) -> GFLForObjectDetection:
    """Moves `model` to the device (channels_last if asked) and compiles it in place if asked."""
    model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    if args.compile:
        model.compile()
    return model


def autocast(args: argparse.Namespace) -> AbstractContextManager:
    """Autocast to `--dtype` on `--device`, or nothing for fp32."""
    return torch.autocast(args.device, dtype=DTYPES[args.dtype]) if DTYPES[args.dtype] else nullcontext()


def train_step(
    model: GFLForObjectDetection,
    teacher: GFLForObjectDetection | None,
    method: str,
    batch: dict,
    workdir: str,
    args: argparse.Namespace,
) -> Callable[[], None]:
    """One optimizer step as `DistillationTrainer` trains (method `none`: the student alone): the model and an SGD
    optimizer (the papers' lr 0.01, momentum 0.9, weight decay 1e-4) prepared by the trainer's accelerator (autocast
    to `--dtype` with float32 outputs, fp16 gradient scaling), `compute_loss`, `accelerator.backward`, the step.
    Left out: what the Trainer's loop does after the backward pass, where it waits for the device anyway (its NaN
    filter of the logged loss, and `DistillationTrainer`'s check for non-finite loss components)."""
    training_args = DistillationArguments(
        output_dir=workdir,
        kd_method=method,
        use_cpu=args.device == "cpu",
        bf16=args.dtype == "bf16",
        fp16=args.dtype == "fp16",
        report_to=[],
        save_strategy="no",
        disable_tqdm=True,
        seed=args.seed,
    )
    trainer = DistillationTrainer(model=model, args=training_args, teacher=teacher)
    accelerator = trainer.accelerator
    model = accelerator.prepare_model(model)
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]  # incl. KD adapters
    optimizer = accelerator.prepare_optimizer(torch.optim.SGD(parameters, lr=0.01, momentum=0.9, weight_decay=1e-4))
    model.train()

    def step() -> None:
        loss = trainer.compute_loss(model, batch)
        accelerator.backward(loss)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


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


def markdown_table(report: dict) -> str:
    args, env = report["config"], report["environment"]
    student_width = args["student_width"] or args["width"]
    lines = [
        f"Student GFL {args['student']} ({student_width} wide), teacher GFL {args['teacher']} ({args['width']} wide), "
        f"{args['stacked_convs']} stacked convs, {args['num_labels']} classes; train batch {args['batch_size']} x 3x"
        f"{args['image_size']}x{args['image_size']}, {args['boxes_per_image']} boxes per image; inference 1 x 3x"
        f"{args['inference_size']}x{args['inference_size']}. {args['dtype']}"
        f"{', channels_last' if args['channels_last'] else ''}{', torch.compile' if args['compile'] else ''}; "
        f"{env['device_name']} ({env['device']}, {env['threads']} threads); torch {env['torch']}, transformers "
        f"{env['transformers']}, timm {env['timm']}. Median and min of {args['repeats']} calls (round robin) after "
        f"{args['warmup']} warm-up calls.",
        "",
        "| measurement | median ms | min ms | images/s | peak memory MiB | GFLOP | ratio (median) | ratio (min) | "
        "ratio (FLOP) |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for result in report["results"]:
        method = result["name"].removeprefix("distill step ")
        ratio = report["ratios"].get(method, {})
        ratio = " | ".join(
            "" if ratio.get(key) is None else f"{ratio[key]:.3f}" for key in ("median_ms", "min_ms", "gflop")
        )
        memory = "n/a" if result["peak_memory_mib"] is None else f"{result['peak_memory_mib']:.0f}"
        gflop = "n/a" if result["gflop"] is None else f"{result['gflop']:.1f}"
        lines.append(
            f"| {result['name']} | {result['median_ms']:.1f} | {result['min_ms']:.1f} | "
            f"{result['images_per_second']:.2f} | {memory} | {gflop} | {ratio} |"
        )
    kind = report["results"][0]["memory_kind"]
    lines += [
        "",
        "Peak memory: what one call adds, "
        + (
            "CUDA max allocated during the call minus the allocated memory before it."
            if kind == "cuda_max_allocated_delta"
            else "growth of the peak RSS during the call over the RSS before it (after malloc_trim)."
        )
        + " GFLOP: convolutions and matrix products of one call (forward and backward), by torch's FlopCounterMode."
        " Ratio: distill step / (student train step + teacher forward), of the medians, of the mins and of the FLOPs.",
    ]
    return "\n".join(lines)


def build_calls(
    args: argparse.Namespace, device: torch.device, workdir: str
) -> dict[str, tuple[Callable[[], object], int]]:
    """The measured functions (name: function, images per call), on fresh copies of one student and one teacher."""
    torch.manual_seed(args.seed)
    student = GFLForObjectDetection(detector_config(args.student, args.student_width or args.width, args))
    teacher = GFLForObjectDetection(detector_config(args.teacher, args.width, args)).eval().requires_grad_(False)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    batch = make_batch(args.batch_size, args.image_size, args.boxes_per_image, args.num_labels, device, args.seed)
    batch["pixel_values"] = batch["pixel_values"].contiguous(memory_format=memory_format)
    image = torch.randn(1, 3, args.inference_size, args.inference_size, generator=torch.Generator().manual_seed(1))
    image = image.to(device).contiguous(memory_format=memory_format)
    inference_models = {"student": copy.deepcopy(student).eval(), "teacher": copy.deepcopy(teacher)}
    if args.postprocess_load == "full":
        for model in inference_models.values():
            torch.nn.init.zeros_(model.head.gfl_cls.bias)
    prepare(teacher, device, args)

    step = train_step(prepare(copy.deepcopy(student), device, args), None, "none", batch, workdir, args)
    calls = {"student train step": (step, args.batch_size)}

    def teacher_forward() -> None:
        with torch.no_grad(), autocast(args):
            teacher(pixel_values=batch["pixel_values"], pixel_mask=batch["pixel_mask"], output_detections=False)

    calls["teacher forward (no grad)"] = (teacher_forward, args.batch_size)
    for method in args.methods:
        step = train_step(prepare(copy.deepcopy(student), device, args), teacher, method, batch, workdir, args)
        calls[f"distill step {method}"] = (step, args.batch_size)

    for role, model in inference_models.items():
        prepare(model, device, args)

        def infer(model: GFLForObjectDetection = model) -> None:
            with torch.no_grad(), autocast(args):
                model(pixel_values=image)

        calls[f"{role} inference + post-processing"] = (infer, 1)

    with torch.no_grad(), autocast(args):
        outputs = inference_models["student"](pixel_values=image, output_detections=False)
    config = inference_models["student"].config
    calls["post-processing alone (student outputs)"] = (
        lambda: detect(
            outputs, config.score_threshold, config.pre_nms_topk, config.nms_iou_threshold, config.max_detections
        ),
        1,
    )
    return calls


def main(argv: list[str] | None = None) -> dict:
    """Runs the benchmark; prints the Markdown table, writes `--json` and returns the report."""
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()
    logging.getLogger("timm").setLevel(logging.ERROR)
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory() as workdir:
        results = benchmark(build_calls(args, device, workdir), device, args)

    by_name = {result["name"]: result for result in results}
    alone = [by_name["student train step"], by_name["teacher forward (no grad)"]]
    ratios = {}
    for method in args.methods:
        distill = by_name[f"distill step {method}"]
        ratios[method] = {
            key: None if distill[key] is None else distill[key] / sum(result[key] for result in alone)
            for key in ("median_ms", "min_ms", "gflop")
        }

    report = {
        "config": {key: str(value) if isinstance(value, Path) else value for key, value in vars(args).items()},
        "environment": environment(device),
        "results": results,
        "ratios": ratios,
    }
    print(markdown_table(report))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    main()
