"""Data-loading throughput: images per second of decode, + augment, + collate (normalize and pad), per dataloader
worker, on BCCD and on the synthetic set, so we know whether the loader keeps up with training.

    python benchmarks/data_throughput.py [--bccd-dir DIR] [--num-images 96] [--batch-size 8] [--workers 2]

Each row streams `--num-images` images through a stage of the pipeline in one process (`workers` = 1) or through a
`torch.utils.data.DataLoader` with `--workers` worker processes; the first batch (start-up) is not timed.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path

import torch

from hf_kd import GFLImageProcessor
from hf_kd.data import DetectionCollator, DetectionTransform, load_coco_detection
from hf_kd.data.synthetic import generate_synthetic_coco

DEFAULT_BCCD_DIR = (
    Path(os.environ.get("HF_KD_SHARED_DIR", Path(__file__).resolve().parents[2] / "shared")) / "data/bccd"
)


def images_per_second(batches: Iterable[int]) -> float:
    """Throughput of an iterable of batch sizes, timed from the end of the first batch."""
    iterator = iter(batches)
    next(iterator)
    start, count = time.perf_counter(), 0
    for size in iterator:
        count += size
    return count / (time.perf_counter() - start)


def measure(dataset, num_images: int, batch_size: int, workers: int, stage: Callable | None, collator=None) -> float:
    """Images/s of the first `num_images` of `dataset` through `collator` in batches, or else through `stage` (or
    just decoding) one example at a time."""
    dataset = dataset.take(num_images)
    if collator is not None:
        loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, num_workers=workers, collate_fn=collator)
        return images_per_second(len(batch["labels"]) for batch in loader)

    def one_at_a_time():
        for example in dataset:
            if stage is not None:
                stage(example)
            yield 1

    return images_per_second(one_at_a_time())


def benchmark(name: str, dataset, args: argparse.Namespace) -> list[tuple[str, str, int, float]]:
    """Table rows `(dataset, stage, workers, images/s)` of every stage on `dataset`."""
    processor = GFLImageProcessor(size={"shortest_edge": args.shortest_edge, "longest_edge": args.longest_edge})
    train = DetectionTransform(
        shortest_edge=(round(0.6 * args.shortest_edge), args.shortest_edge),
        longest_edge=args.longest_edge,
        flip_prob=0.5,
    )
    jitter = DetectionTransform(
        shortest_edge=(round(0.6 * args.shortest_edge), args.shortest_edge),
        longest_edge=args.longest_edge,
        flip_prob=0.5,
        brightness=0.2,
        contrast=0.2,
        saturation=0.2,
        hue=0.05,
    )
    evaluation = DetectionCollator(processor)
    n, b = args.num_images, args.batch_size
    rows = [
        ("decode", 1, measure(dataset, n, b, 0, None)),
        ("decode + augment (multi-scale, flip)", 1, measure(dataset, n, b, 0, train)),
        ("decode + augment + collate", 1, measure(dataset, n, b, 0, None, DetectionCollator(processor, train))),
        (
            "decode + augment (+ colour jitter) + collate",
            1,
            measure(dataset, n, b, 0, None, DetectionCollator(processor, jitter)),
        ),
        ("decode + resize + collate (evaluation)", 1, measure(dataset, n, b, 0, None, evaluation)),
    ]
    if args.workers > 0:
        total = measure(dataset, n, b, args.workers, None, DetectionCollator(processor, train))
        rows.append(("decode + augment + collate", args.workers, total))
    return [(name, stage, workers, rate) for stage, workers, rate in rows]


def format_table(rows: list[tuple[str, str, int, float]]) -> str:
    lines = [
        "| dataset | stage | workers | images/s | images/s per worker | ms/image per worker |",
        "| --- | --- | ---: | ---: | ---: | ---: |",
    ]
    for dataset, stage, workers, rate in rows:
        per_worker = rate / workers
        lines.append(f"| {dataset} | {stage} | {workers} | {rate:.1f} | {per_worker:.1f} | {1000 / per_worker:.1f} |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> list[tuple[str, str, int, float]]:
    """Benchmarks the requested datasets (the synthetic one is generated in a temporary folder)."""
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.datasets:
            if name == "bccd":
                if not (args.bccd_dir / "annotations_train.json").is_file():
                    print(f"skipping BCCD: not found at {args.bccd_dir} (pass --bccd-dir)")
                    continue
                dataset = load_coco_detection(args.bccd_dir, split="train", num_shards=8)
                label = "BCCD train (640x480)"
            else:
                generate_synthetic_coco(
                    tmp, num_images=args.num_images, image_size=args.synthetic_size, val_fraction=0
                )
                dataset = load_coco_detection(tmp, split="train", num_shards=8)
                label = f"synthetic (~{args.synthetic_size}px)"
            rows += benchmark(label, dataset, args)
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bccd-dir", type=Path, default=DEFAULT_BCCD_DIR)
    parser.add_argument("--datasets", nargs="+", default=["bccd", "synthetic"], choices=["bccd", "synthetic"])
    parser.add_argument("--num-images", type=int, default=96)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--workers", type=int, default=2, help="dataloader workers of the multi-worker row (0: none)")
    parser.add_argument("--shortest-edge", type=int, default=800)
    parser.add_argument("--longest-edge", type=int, default=1333)
    parser.add_argument("--synthetic-size", type=int, default=320, help="image size of the synthetic set")
    args = parser.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core per worker, as in a dataloader worker
    try:
        rows = run(args)
    finally:
        torch.set_num_threads(threads)
    print(
        f"resize: shortest edge {args.shortest_edge} (multi-scale {round(0.6 * args.shortest_edge)}-{args.shortest_edge}), "
        f"longest edge {args.longest_edge}; batch size {args.batch_size}; {args.num_images} images per row"
    )
    print(format_table(rows))


if __name__ == "__main__":
    main()
