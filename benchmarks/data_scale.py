"""The data path and evaluation at COCO size: preparation, time to first batch, memory per training process and
dataloader worker, loader throughput, and COCO evaluation time per backend, each beside the pycocotools-json
baseline measured in the same run.

    python benchmarks/data_scale.py                               # train2017 + val2017 size under /tmp/coco_scale
    python benchmarks/data_scale.py --scale 0.01 --root /tmp/cs   # a quick run at 1% size
    python benchmarks/data_scale.py --json outputs/data_scale.json

Sections (each skippable):

1. generation: `benchmarks/make_coco_scale.py` train2017- and val2017-sized files (kept between runs).
2. baseline: one fresh process loading the train json with pycocotools (`json.load` + `COCO()`), and one with
   `read_coco_detection` (the json source of `hf_kd.data.coco`): seconds and RSS.
3. preparation: `prepare_coco_detection` from scratch (parse, validate, write the shards, verify the counts), then
   again (resumed: nothing to do).
4. loader: `--processes` spawned training processes, each building its source, `split_dataset_by_node`, a seeded
   shuffle and a `DataLoader` with `--workers` workers and the training `DetectionCollator` (decode, multi-scale
   resize, flip, normalize, pad), reading `--batches` batches. Per process: time to first batch (from building the
   source, imports excluded), images/s after the first batch and the batches prefetched with it, RSS/PSS/USS of the
   process (before building the source = the floor of imports, and while its workers run) and of each worker
   (`psutil.memory_full_info`, PSS divides shared pages among the processes that map them, so PSS sums to what the
   job really uses; the total minus the processes' floors is what the data path adds to the imports), then again
   after one full garbage collection in the process and in every worker (what a long run eventually does: a
   collection walks every tracked object, so a forked worker that collects copies the parent's Python heap). Run for
   the prepared shards, for the same at 1% of the size (what does not depend on the dataset: imports, image pipeline)
   and, as the baseline, for the json source (`read_coco_detection` in every process).
5. evaluation at val2017 size (5,000 images, 100 detections each): the baseline (`COCO(json)`, `loadRes`,
   `COCOeval`), `CocoDetectionMAP` per backend (ground truth loaded once: construction timed apart from
   evaluation; `evaluate_predictions` as `coco_compute_metrics` uses it, and `compute()` through `evaluate`), and
   faster-coco-eval where installed (for reference; not used by hf_kd, its precision differs from pycocotools' in the
   last bit); whether all 12 numbers equal the baseline's.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import multiprocessing
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from make_coco_scale import jittered_detections, make_coco_scale  # noqa: E402

MiB = 2**20


def memory(process: psutil.Process) -> dict[str, float]:
    info = process.memory_full_info()
    return {"rss": info.rss / MiB, "pss": info.pss / MiB, "uss": info.uss / MiB}


def _run_python(code: str) -> dict:
    """Runs `code` in a fresh interpreter; it prints one json line last."""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(result.stdout.strip().splitlines()[-1])


_BASELINE_PYCOCOTOOLS = """
import contextlib, io, json, time, psutil
start = time.perf_counter()
from pycocotools.coco import COCO
with contextlib.redirect_stdout(io.StringIO()):
    coco = COCO({path!r})
seconds = time.perf_counter() - start
info = psutil.Process().memory_full_info()
print(json.dumps({{"seconds": seconds, "rss": info.rss / 2**20, "pss": info.pss / 2**20, "anns": len(coco.anns)}}))
"""

_BASELINE_READ_COCO = """
import json, time, psutil, resource
from hf_kd.data import read_coco_detection
start = time.perf_counter()
source = read_coco_detection({path!r})
seconds = time.perf_counter() - start
info = psutil.Process().memory_full_info()
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps({{"seconds": seconds, "rss": info.rss / 2**20, "pss": info.pss / 2**20, "peak_rss": peak,
                  "anns": len(source.annotation_ids)}}))
"""


def loader_process(rank: int, args: dict, queue) -> None:
    """One training process: build the source, a DataLoader with workers, read batches, measure."""
    try:
        _loader_process(rank, args, queue)
    except BaseException as error:
        queue.put({"rank": rank, "error": repr(error)})
        raise


class CollectingCollator:
    """The training collator, plus one full garbage collection in each worker once `collect` is set."""

    def __init__(self, collator, collect):
        self.collator, self.collect, self.collected = collator, collect, False

    def __call__(self, examples):
        if self.collect.is_set() and not self.collected:
            self.collected = True
            gc.collect()
        return self.collator(examples)


def _loader_process(rank: int, args: dict, queue) -> None:
    import torch
    from datasets.distributed import split_dataset_by_node

    from hf_kd import GFLImageProcessor
    from hf_kd.data import (
        DetectionCollator,
        DetectionTransform,
        configure_training_process_memory,
        read_coco_detection,
    )
    from hf_kd.data.prepared import load_prepared_coco_detection

    torch.set_num_threads(1)
    shortest, longest = args["shortest_edge"], args["longest_edge"]
    processor = GFLImageProcessor(size={"shortest_edge": shortest, "longest_edge": longest})
    transform = DetectionTransform(
        shortest_edge=(round(0.8 * shortest), shortest), longest_edge=longest, flip_prob=0.5
    )
    collect = multiprocessing.get_context(args["worker_start_method"]).Event()
    collator = CollectingCollator(DetectionCollator(processor, transform, configure_workers=True), collect)
    gc.collect()
    me = psutil.Process()
    floor = memory(me)
    start = time.perf_counter()
    if args["source"] == "prepared":
        dataset = load_prepared_coco_detection(args["prepared_dir"])
    else:
        dataset = read_coco_detection(args["annotation_file"]).to_iterable_dataset(num_shards=args["num_shards"])
    dataset = split_dataset_by_node(dataset, rank=rank, world_size=args["processes"])
    dataset = dataset.shuffle(seed=0, buffer_size=64)
    if args["configure_process"]:
        configure_training_process_memory()
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_size=args["batch_size"],
        num_workers=args["workers"],
        collate_fn=collator,
        multiprocessing_context=args["worker_start_method"],
    )
    batches = iter(loader)
    first = next(batches)
    first_batch = time.perf_counter() - start
    for _ in range(2 * args["workers"]):  # what the workers prefetched while the first batch was made
        next(batches)
    images, timed_start = 0, time.perf_counter()
    for _ in range(args["batches"]):
        images += len(next(batches)["labels"])
    seconds = time.perf_counter() - timed_start
    workers = [memory(child) for child in me.children(recursive=True)]
    process = memory(me)
    collect.set()
    gc.collect()
    for _ in range(3 * args["workers"]):  # every worker makes a batch after the event: prefetched ones, then new
        next(batches)
    result = {
        "rank": rank,
        "first_batch_s": first_batch,
        "images_per_s": images / seconds if seconds else float("nan"),
        "floor": floor,
        "process": process,
        "workers": workers,
        "process_after_gc": memory(me),
        "workers_after_gc": [memory(child) for child in me.children(recursive=True)],
        "first_batch_images": len(first["labels"]),
    }
    queue.put(result)
    del batches, loader


def measure_loader(source: str, args: argparse.Namespace, annotation_file: Path, prepared_dir: Path) -> list[dict]:
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    options = {
        "source": source,
        "prepared_dir": str(prepared_dir),
        "annotation_file": str(annotation_file),
        "num_shards": args.num_shards,
        "processes": args.processes,
        "workers": args.workers,
        "batch_size": args.batch_size,
        "batches": args.batches,
        "shortest_edge": args.shortest_edge,
        "longest_edge": args.longest_edge,
        "configure_process": args.configure_process,
        "worker_start_method": args.worker_start_method,
    }
    processes = [context.Process(target=loader_process, args=(rank, options, queue)) for rank in range(args.processes)]
    for process in processes:
        process.start()
    results = [queue.get(timeout=3600) for _ in processes]
    errors = [r["error"] for r in results if "error" in r]
    if errors:
        raise RuntimeError(f"loader process failed: {errors}")
    for process in processes:
        process.join()
    return sorted(results, key=lambda r: r["rank"])


def summarize_loader(name: str, results: list[dict]) -> list[str]:
    def pss(process: dict, workers: list[dict]) -> float:
        return process["pss"] + sum(w["pss"] for w in workers)

    def listed(workers: list[dict], key: str) -> str:
        return ", ".join(f"{w[key]:.0f}" for w in workers)

    rows = [
        f"| {name} | {r['rank']} | {r['first_batch_s']:.1f} | {r['images_per_s']:.1f} | {r['floor']['rss']:.0f} / "
        f"{r['floor']['pss']:.0f} | {r['process']['rss']:.0f} / {r['process']['pss']:.0f} | "
        f"{listed(r['workers'], 'rss')} | {listed(r['workers'], 'pss')} | {r['process_after_gc']['pss']:.0f} | "
        f"{listed(r['workers_after_gc'], 'pss')} |"
        for r in results
    ]
    floor = sum(r["floor"]["pss"] for r in results)
    total = sum(pss(r["process"], r["workers"]) for r in results)
    total_after_gc = sum(pss(r["process_after_gc"], r["workers_after_gc"]) for r in results)
    rows.append(
        f"| {name} | all | | {sum(r['images_per_s'] for r in results):.1f} | {floor:.0f} | | | total PSS {total:.0f} "
        f"MiB ({total - floor:.0f} over the floor) | | total PSS {total_after_gc:.0f} MiB ({total_after_gc - floor:.0f}) |"
    )
    return rows


def evaluation_rows(val_json: Path, args: argparse.Namespace) -> tuple[list[str], dict]:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    from hf_kd.metrics import COCO_STAT_NAMES, CocoDetectionMAP, to_coco_detections

    with open(val_json) as f:
        data = json.load(f)
    predictions = jittered_detections(data, per_image=args.detections_per_image, seed=0)
    num_detections = sum(len(p["scores"]) for p in predictions)
    category_ids = sorted(c["id"] for c in data["categories"])
    label_to_category_id = dict(enumerate(category_ids))
    del data
    gc.collect()
    results, rows = {}, []

    def timed(function):
        start = time.perf_counter()
        value = function()
        return value, time.perf_counter() - start

    def baseline():
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt = COCO(str(val_json))  # json.load + index
            detections = to_coco_detections(predictions, label_to_category_id)
            coco_eval = COCOeval(coco_gt, coco_gt.loadRes(detections), "bbox")
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
        return np.asarray(coco_eval.stats)

    reference, seconds = timed(baseline)
    results["baseline"] = {"seconds": seconds}
    rows.append(f"| pycocotools json baseline (COCO(json) + loadRes + COCOeval) | {seconds:.1f} | | reference |")
    for backend in ("pycocotools", "numpy"):
        metric, load_seconds = timed(lambda b=backend: CocoDetectionMAP(ground_truth=val_json, backend=b))
        output, eval_seconds = timed(lambda m=metric: m.evaluate_predictions(predictions))
        stats = np.array([output[name] for name in COCO_STAT_NAMES])
        same = bool(np.array_equal(stats, reference))
        results[backend] = {"load_seconds": load_seconds, "evaluate_seconds": eval_seconds, "identical": same}
        rows.append(
            f"| CocoDetectionMAP(backend={backend!r}).evaluate_predictions | {eval_seconds:.1f} | "
            f"{load_seconds:.1f} (once) | {'identical' if same else 'DIFFERENT'} |"
        )
        if args.with_compute:
            metric = CocoDetectionMAP(ground_truth=val_json, backend=backend, keep_in_memory=True)
            output, compute_seconds = timed(lambda m=metric: m.compute(predictions=predictions))
            same = bool(np.array_equal(np.array([output[name] for name in COCO_STAT_NAMES]), reference))
            results[backend]["compute_seconds"] = compute_seconds
            rows.append(
                f"| CocoDetectionMAP(backend={backend!r}).compute (through `evaluate`) | {compute_seconds:.1f} | "
                f"(once) | {'identical' if same else 'DIFFERENT'} |"
            )
        del metric
        gc.collect()
    try:
        from faster_coco_eval import COCO as FasterCOCO
        from faster_coco_eval import COCOeval_faster
    except ImportError:
        rows.append("| faster-coco-eval | not installed | | |")
    else:

        def faster():
            coco_gt = FasterCOCO(str(val_json))
            detections = to_coco_detections(predictions, label_to_category_id)
            coco_eval = COCOeval_faster(coco_gt, coco_gt.loadRes(detections), "bbox", print_function=lambda *a: None)
            coco_eval.evaluate()
            coco_eval.accumulate()
            coco_eval.summarize()
            return np.asarray(coco_eval.stats)[:12]

        stats, seconds = timed(faster)
        difference = float(np.abs(stats - reference).max())
        results["faster_coco_eval"] = {"seconds": seconds, "max_abs_difference": difference}
        verdict = "identical" if difference == 0 else f"max |diff| {difference:.1e}"
        rows.append(f"| faster-coco-eval json (COCO(json) + loadRes + COCOeval_faster), reference only | "
                    f"{seconds:.1f} | | {verdict} |")  # fmt: skip
    results["detections"] = num_detections
    return rows, results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", type=Path, default=Path("/tmp/coco_scale"))
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--num-shards", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--batches", type=int, default=25)
    parser.add_argument("--shortest-edge", type=int, default=320)
    parser.add_argument("--longest-edge", type=int, default=512)
    parser.add_argument(
        "--worker-start-method",
        default="fork",
        choices=["fork", "spawn", "forkserver"],
        help="DataLoader workers' start method (fork: Linux's default in a torchrun process; the spawned benchmark "
        "processes would otherwise spawn them)",
    )
    parser.add_argument(
        "--configure-process",
        action="store_true",
        help="configure_training_process_memory() before the workers start, as examples/run_distill.py does",
    )
    parser.add_argument("--detections-per-image", type=int, default=100)
    parser.add_argument("--with-compute", action="store_true", help="also time CocoDetectionMAP.compute()")
    parser.add_argument(
        "--skip", nargs="*", default=[], choices=["baseline", "prepare", "loader", "json-loader", "eval"]
    )
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)

    from hf_kd.data.prepared import prepare_coco_detection

    report: dict = {"machine": {"cpus": os.cpu_count(), "platform": platform.platform()}}
    report["machine"]["load_average_start"] = os.getloadavg()
    lines = [f"machine: {os.cpu_count()} CPUs, load average at start {os.getloadavg()[0]:.1f}"]
    start = time.perf_counter()
    train_json = make_coco_scale(args.root, "train2017", args.scale)
    val_json = make_coco_scale(args.root, "val2017", args.scale, images=False)
    lines.append(f"generation (or reuse): {time.perf_counter() - start:.1f} s; {train_json} "
                 f"{train_json.stat().st_size / MiB:.0f} MiB")  # fmt: skip
    prepared_dir = args.root / "prepared_train2017"

    if "baseline" not in args.skip:
        pycoco = _run_python(_BASELINE_PYCOCOTOOLS.format(path=str(train_json)))
        ours = _run_python(_BASELINE_READ_COCO.format(path=str(train_json)))
        report["baseline"] = {"pycocotools": pycoco, "read_coco_detection": ours}
        lines += [
            "",
            "## Annotation loading, one process, train json",
            "",
            "| what | seconds | RSS after (MiB) | PSS after (MiB) | peak RSS (MiB) |",
            "| --- | --- | --- | --- | --- |",
            f"| pycocotools COCO(json) (baseline) | {pycoco['seconds']:.1f} | {pycoco['rss']:.0f} | {pycoco['pss']:.0f} | |",
            f"| read_coco_detection(json) | {ours['seconds']:.1f} | {ours['rss']:.0f} | {ours['pss']:.0f} | "
            f"{ours['peak_rss']:.0f} |",
        ]  # fmt: skip

    if "prepare" not in args.skip:
        shutil.rmtree(prepared_dir, ignore_errors=True)
        t = time.perf_counter()
        prepared = prepare_coco_detection(train_json, prepared_dir, num_shards=args.num_shards, progress=False)
        prepare_seconds = time.perf_counter() - t
        t = time.perf_counter()
        prepare_coco_detection(train_json, prepared_dir, num_shards=args.num_shards, progress=False)
        again_seconds = time.perf_counter() - t
        size = sum(path.stat().st_size for path in prepared.shards) / MiB
        report["prepare"] = {"seconds": prepare_seconds, "again_seconds": again_seconds, "counts": prepared.counts}
        report["prepare"].update({"json_counts": prepared.json_counts, "shards_mib": size})
        lines += [
            "",
            "## Preparation (train json -> parquet shards, verified counts)",
            "",
            f"- from scratch: {prepare_seconds:.1f} s; again (already prepared): {again_seconds:.2f} s; "
            f"{len(prepared.shards)} shards, {size:.1f} MiB",
            f"- counts in the shards {prepared.counts}; in the json {prepared.json_counts}",
        ]
    elif not (prepared_dir / "hf_kd_prepared.json").exists():
        prepare_coco_detection(train_json, prepared_dir, num_shards=args.num_shards, progress=False)

    loader_rows = []
    if "loader" not in args.skip:
        results = measure_loader("prepared", args, train_json, prepared_dir)
        report["loader_prepared"] = results
        loader_rows += summarize_loader("prepared shards", results)
        # the same at 1% of the size: what does not depend on the dataset (imports, image pipeline); enough images for
        # the batches _loader_process reads
        needed = args.processes * (args.batches + 5 * args.workers + 1) * args.batch_size * 1.2
        small_scale = max(args.scale / 100, needed / 118_287)
        small_json = make_coco_scale(args.root / f"small_{small_scale:g}", "train2017", small_scale)
        small_dir = small_json.parents[1] / "prepared_train2017"
        prepare_coco_detection(small_json, small_dir, num_shards=args.num_shards, progress=False)
        results = measure_loader("prepared", args, small_json, small_dir)
        report["loader_prepared_1_percent"] = results
        loader_rows += summarize_loader("prepared shards, 1% size", results)
    if "json-loader" not in args.skip:
        results = measure_loader("json", args, train_json, prepared_dir)
        report["loader_json"] = results
        loader_rows += summarize_loader("json (baseline)", results)
    if loader_rows:
        lines += [
            "",
            f"## Training loader: {args.processes} processes x {args.workers} workers, batch {args.batch_size}, "
            f"{args.batches} timed batches (after the prefetched ones), resize {args.shortest_edge}/"
            f"{args.longest_edge}, workers started by "
            f"{args.worker_start_method}{', configure_training_process_memory()' if args.configure_process else ''}",
            "",
            "| source | rank | first batch (s) | images/s | floor RSS / PSS (MiB) | process RSS / PSS (MiB) | "
            "worker RSS (MiB) | worker PSS (MiB) | after a full GC everywhere: process PSS | worker PSS |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
            *loader_rows,
        ]

    if "eval" not in args.skip:
        rows, results = evaluation_rows(val_json, args)
        report["evaluation"] = results
        lines += [
            "",
            f"## Evaluation at val2017 size ({results['detections']} detections)",
            "",
            "| what | evaluation (s) | ground truth load (s) | 12 numbers vs baseline |",
            "| --- | --- | --- | --- |",
            *rows,
        ]
    report["machine"]["load_average_end"] = os.getloadavg()
    lines.append("")
    lines.append(f"load average at end {os.getloadavg()[0]:.1f}")
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
