"""A deterministic COCO-sized detection dataset: an annotation json with COCO 2017's counts and shape statistics, and
image files made cheaply (a few synthetic JPEGs, one per image size, hard-linked under every image's name).

    python benchmarks/make_coco_scale.py /tmp/coco_scale                        # train2017 size (~450 MB json)
    python benchmarks/make_coco_scale.py /tmp/coco_scale --split val2017        # val2017 size
    python benchmarks/make_coco_scale.py /tmp/coco_small --scale 0.001          # reduced size, for tests

Writes `OUT/annotations/instances_{split}.json` and `OUT/{split}/{image_id:012d}.jpg` (COCO's layout, so
`read_coco_detection(OUT/annotations/instances_train2017.json)` finds the images). What is matched to COCO 2017:

- counts: images, annotations, empty images (train2017: 118,287 / 860,001 / 1,021; val2017: 5,000 / 36,781 / 48);
  crowd regions ~1% of the annotations (COCO: 1.05% in train2017);
- category ids 1..90 with the 80 COCO ids used (and COCO's names), a long-tailed class frequency (person ~30%);
- sparse, shuffled image ids; annotations per image heavy-tailed (1 to ~90); image sizes from COCO's common ones
  (640x480, 640x427, 480x640, ...);
- boxes with COCO's size mix (about 41% small, 34% medium, 25% large by area), float coordinates with 2 decimals;
  non-crowd objects have polygon segmentations (6-60 vertices, more for larger objects), crowd regions an
  uncompressed RLE (`{"counts": [...], "size": [h, w]}`) like COCO's, which is what makes the json ~450 MB.

Everything is drawn from `numpy.random.default_rng(seed)`: the same arguments give byte-identical files.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import PIL.Image
import PIL.ImageDraw

SPLITS = {
    "train2017": {"images": 118_287, "annotations": 860_001, "empty_images": 1_021},
    "val2017": {"images": 5_000, "annotations": 36_781, "empty_images": 48},
}
CROWD_FRACTION = 0.0105

COCO_CATEGORIES = (
    (1, "person", "person"), (2, "bicycle", "vehicle"), (3, "car", "vehicle"), (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"), (6, "bus", "vehicle"), (7, "train", "vehicle"), (8, "truck", "vehicle"),
    (9, "boat", "vehicle"), (10, "traffic light", "outdoor"), (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"), (14, "parking meter", "outdoor"), (15, "bench", "outdoor"),
    (16, "bird", "animal"), (17, "cat", "animal"), (18, "dog", "animal"), (19, "horse", "animal"),
    (20, "sheep", "animal"), (21, "cow", "animal"), (22, "elephant", "animal"), (23, "bear", "animal"),
    (24, "zebra", "animal"), (25, "giraffe", "animal"), (27, "backpack", "accessory"),
    (28, "umbrella", "accessory"), (31, "handbag", "accessory"), (32, "tie", "accessory"),
    (33, "suitcase", "accessory"), (34, "frisbee", "sports"), (35, "skis", "sports"), (36, "snowboard", "sports"),
    (37, "sports ball", "sports"), (38, "kite", "sports"), (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"), (41, "skateboard", "sports"), (42, "surfboard", "sports"),
    (43, "tennis racket", "sports"), (44, "bottle", "kitchen"), (46, "wine glass", "kitchen"),
    (47, "cup", "kitchen"), (48, "fork", "kitchen"), (49, "knife", "kitchen"), (50, "spoon", "kitchen"),
    (51, "bowl", "kitchen"), (52, "banana", "food"), (53, "apple", "food"), (54, "sandwich", "food"),
    (55, "orange", "food"), (56, "broccoli", "food"), (57, "carrot", "food"), (58, "hot dog", "food"),
    (59, "pizza", "food"), (60, "donut", "food"), (61, "cake", "food"), (62, "chair", "furniture"),
    (63, "couch", "furniture"), (64, "potted plant", "furniture"), (65, "bed", "furniture"),
    (67, "dining table", "furniture"), (70, "toilet", "furniture"), (72, "tv", "electronic"),
    (73, "laptop", "electronic"), (74, "mouse", "electronic"), (75, "remote", "electronic"),
    (76, "keyboard", "electronic"), (77, "cell phone", "electronic"), (78, "microwave", "appliance"),
    (79, "oven", "appliance"), (80, "toaster", "appliance"), (81, "sink", "appliance"),
    (82, "refrigerator", "appliance"), (84, "book", "indoor"), (85, "clock", "indoor"), (86, "vase", "indoor"),
    (87, "scissors", "indoor"), (88, "teddy bear", "indoor"), (89, "hair drier", "indoor"),
    (90, "toothbrush", "indoor"),
)  # fmt: skip
# (width, height) and share of COCO's most common image sizes.
IMAGE_SIZES = (
    ((640, 480), 0.30), ((640, 427), 0.20), ((480, 640), 0.12), ((640, 426), 0.08), ((640, 428), 0.06),
    ((427, 640), 0.06), ((500, 375), 0.05), ((640, 425), 0.05), ((612, 612), 0.04), ((640, 360), 0.04),
)  # fmt: skip
_CHUNK = 20_000


def split_counts(split: str, scale: float = 1.0) -> dict[str, int]:
    """Images, annotations, empty images and crowd regions of a COCO 2017 split, scaled (at least 1 image with
    annotations, 1 empty image and 1 crowd region where scaled down)."""
    counts = SPLITS[split]
    images = max(2, round(counts["images"] * scale))
    empty = min(max(1, round(counts["empty_images"] * scale)), images - 1)
    annotations = max(images - empty, round(counts["annotations"] * scale))
    crowd = max(1, round(annotations * CROWD_FRACTION))
    return {"images": images, "annotations": annotations, "empty_images": empty, "crowd": crowd}


def _category_weights(rng: np.random.Generator) -> np.ndarray:
    weights = 1.0 / np.arange(1, len(COCO_CATEGORIES) + 1) ** 0.9
    weights[1:] = rng.permutation(weights[1:])
    weights[0] = 0.3 / 0.7 * weights[1:].sum()  # person ~30% of the objects, as in COCO
    return weights / weights.sum()


def _polygon(rng: np.random.Generator, x: float, y: float, w: float, h: float) -> list[float]:
    vertices = int(np.clip(6 + math.sqrt(w * h) / 5, 6, 60))
    angles = np.sort(rng.uniform(0, 2 * np.pi, vertices))
    radius = rng.uniform(0.7, 1.0, vertices)
    xs = x + w / 2 + np.cos(angles) * radius * w / 2
    ys = y + h / 2 + np.sin(angles) * radius * h / 2
    return np.round(np.stack([xs, ys], 1).reshape(-1), 2).tolist()


def _rectangle_rle(x: int, y: int, w: int, h: int, width: int, height: int) -> list[int]:
    """Uncompressed column-major RLE counts of a filled rectangle in a `height x width` image."""
    counts = [x * height + y]
    for column in range(w):
        counts.append(h)
        counts.append(height - h if column < w - 1 else height * (width - x - w) + height - y - h)
    return counts


def generate_annotations(split: str = "train2017", scale: float = 1.0, seed: int = 0) -> dict:
    """The COCO annotation dict (see the module docstring); deterministic in `(split, scale, seed)`."""
    counts = split_counts(split, scale)
    rng = np.random.default_rng(seed)
    num_images, num_annotations = counts["images"], counts["annotations"]

    image_ids = np.sort(rng.choice(600_000, size=num_images, replace=False) + 1)
    rng.shuffle(image_ids)  # COCO lists images in no particular id order
    size_index = rng.choice(len(IMAGE_SIZES), size=num_images, p=[share for _, share in IMAGE_SIZES])
    sizes = np.array([size for size, _ in IMAGE_SIZES])[size_index]
    images = [
        {
            "license": int(rng.integers(1, 9)),
            "file_name": f"{image_id:012d}.jpg",
            "coco_url": "",
            "height": int(height),
            "width": int(width),
            "date_captured": "2013-11-14 16:28:13",
            "flickr_url": "",
            "id": int(image_id),
        }
        for image_id, (width, height) in zip(image_ids, sizes)
    ]

    # Annotations per image: empty images, then a heavy tail (most have a few objects, some ~90).
    nonempty = np.sort(rng.choice(num_images, size=num_images - counts["empty_images"], replace=False))
    per_image = np.ones(len(nonempty), dtype=np.int64)
    weights = rng.gamma(0.6, 1.0, len(nonempty))
    per_image += rng.multinomial(num_annotations - len(nonempty), weights / weights.sum())
    owner = np.repeat(nonempty, per_image)
    rng.shuffle(owner)  # COCO's annotation list is not grouped by image
    crowd = np.zeros(num_annotations, dtype=bool)
    crowd[rng.choice(num_annotations, size=counts["crowd"], replace=False)] = True
    category_ids = np.array([c[0] for c in COCO_CATEGORIES])
    categories = rng.choice(category_ids, size=num_annotations, p=_category_weights(rng))

    # Box sizes: sqrt(area) log-normal (COCO's small/medium/large mix), crowd regions larger; aspect log-normal.
    side = np.exp(rng.normal(3.75, 1.35, num_annotations))
    side[crowd] = np.exp(rng.normal(5.0, 0.5, crowd.sum()))
    aspect = np.exp(rng.normal(0.0, 0.5, num_annotations))
    width, height = sizes[owner, 0].astype(np.float64), sizes[owner, 1].astype(np.float64)
    box_w = np.clip(side * np.sqrt(aspect), 1.0, width)
    box_h = np.clip(side / np.sqrt(aspect), 1.0, height)
    box_x = rng.uniform(0, 1, num_annotations) * (width - box_w)
    box_y = rng.uniform(0, 1, num_annotations) * (height - box_h)
    fill = rng.uniform(0.45, 0.9, num_annotations)

    annotations = []
    for k in range(num_annotations):
        image = owner[k]
        entry = {"segmentation": None, "area": 0.0, "iscrowd": int(crowd[k]), "image_id": int(image_ids[image])}
        if crowd[k]:
            x, y = int(box_x[k]), int(box_y[k])
            w, h = max(1, int(box_w[k])), max(1, int(box_h[k]))
            w, h = min(w, int(width[k]) - x), min(h, int(height[k]) - y)
            entry["segmentation"] = {
                "counts": _rectangle_rle(x, y, w, h, int(width[k]), int(height[k])),
                "size": [int(height[k]), int(width[k])],
            }
            entry["area"] = w * h
            entry["bbox"] = [float(x), float(y), float(w), float(h)]
        else:
            x, y, w, h = (round(float(v[k]), 2) for v in (box_x, box_y, box_w, box_h))
            entry["segmentation"] = [_polygon(rng, x, y, w, h)]
            entry["area"] = round(w * h * float(fill[k]), 4)
            entry["bbox"] = [x, y, w, h]
        entry["category_id"] = int(categories[k])
        entry["id"] = k + 1
        annotations.append(entry)

    return {
        "info": {
            "description": f"Synthetic COCO-sized {split} (hf_kd benchmarks/make_coco_scale.py, seed {seed})",
            "version": "1.0",
            "year": 2017,
        },
        "licenses": [{"url": "", "id": i, "name": f"license {i}"} for i in range(1, 9)],
        "images": images,
        "annotations": annotations,
        "categories": [{"supercategory": s, "id": i, "name": n} for i, n, s in COCO_CATEGORIES],
    }


def write_json(data: dict, path: Path) -> None:
    """`json.dump(data)` written in chunks (no 450 MB string in memory)."""
    tmp = path.with_suffix(".json.tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write("{")
        for index, (key, value) in enumerate(data.items()):
            f.write(("," if index else "") + json.dumps(key) + ":")
            if isinstance(value, list):
                f.write("[")
                for start in range(0, len(value), _CHUNK):
                    f.write(("," if start else "") + json.dumps(value[start : start + _CHUNK])[1:-1])
                f.write("]")
            else:
                f.write(json.dumps(value))
        f.write("}")
    os.replace(tmp, path)


def write_images(images: list[dict], image_dir: Path, seed: int = 0) -> None:
    """One synthetic JPEG per image size (shapes on a gradient), hard-linked (or symlinked) under every name."""
    image_dir.mkdir(parents=True, exist_ok=True)
    template_dir = image_dir.parent / f"_templates_{image_dir.name}"
    template_dir.mkdir(exist_ok=True)
    rng = np.random.default_rng(seed)
    templates = {}
    for (width, height), _ in IMAGE_SIZES:
        path = template_dir / f"{width}x{height}.jpg"
        if not path.exists():
            ramp = np.linspace(0, 255, width, dtype=np.float64)[None, :, None]
            pixels = np.broadcast_to(ramp * rng.uniform(0.3, 1.0, 3), (height, width, 3)).astype(np.uint8)
            image = PIL.Image.fromarray(np.ascontiguousarray(pixels))
            draw = PIL.ImageDraw.Draw(image)
            for _ in range(12):
                x0, y0 = int(rng.integers(0, width - 20)), int(rng.integers(0, height - 20))
                x1, y1 = x0 + int(rng.integers(10, width // 3)), y0 + int(rng.integers(10, height // 3))
                draw.ellipse((x0, y0, x1, y1), fill=tuple(int(c) for c in rng.integers(0, 256, 3)))
            image.save(path, quality=90)
        templates[(width, height)] = path
    for image in images:
        target = image_dir / image["file_name"]
        if target.exists():
            continue
        template = templates[(image["width"], image["height"])]
        try:
            os.link(template, target)
        except OSError:
            os.symlink(template.resolve(), target)


def make_coco_scale(
    output_dir: str | os.PathLike, split: str = "train2017", scale: float = 1.0, seed: int = 0, images: bool = True
) -> Path:
    """Writes `output_dir/annotations/instances_{split}.json` (and the image files); returns the json's path. An
    existing json is kept (delete it to regenerate)."""
    output_dir = Path(output_dir)
    path = output_dir / "annotations" / f"instances_{split}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = None
    if not path.exists():
        data = generate_annotations(split, scale, seed)
        write_json(data, path)
    if images:
        if data is None:
            with open(path, encoding="utf-8") as f:
                data = json.load(f)
        write_images(data["images"], output_dir / split, seed)
    return path


def jittered_detections(
    data: dict, per_image: int = 100, seed: int = 0, miss: float = 0.2, wrong_label: float = 0.1
) -> list[dict]:
    """Per-image predictions in `CocoDetectionMAP`'s format (`image_id`, xyxy `boxes`, `scores`, contiguous
    `labels`, as float32-derived numpy arrays) for a ground truth dict: jittered ground truth (some missed, some
    with a wrong class) filled up with random false positives to `per_image` detections per image."""
    rng = np.random.default_rng(seed)
    category_ids = sorted(c["id"] for c in data["categories"])
    label_of = np.zeros(max(category_ids) + 1, dtype=np.int64)
    label_of[category_ids] = np.arange(len(category_ids))
    index_of = {image["id"]: k for k, image in enumerate(data["images"])}
    sizes = np.array([(image["width"], image["height"]) for image in data["images"]], dtype=np.float64)
    annotations = data["annotations"]
    owner = np.array([index_of[a["image_id"]] for a in annotations], dtype=np.int64)
    boxes = np.array([a["bbox"] for a in annotations], dtype=np.float64).reshape(-1, 4)
    labels = label_of[np.array([a["category_id"] for a in annotations], dtype=np.int64)]
    keep = rng.random(len(owner)) >= miss
    owner, boxes, labels = owner[keep], boxes[keep], labels[keep]
    wrong = rng.random(len(labels)) < wrong_label
    labels[wrong] = rng.integers(0, len(category_ids), wrong.sum())
    jitter = rng.normal(0, 0.08, boxes.shape) * boxes[:, [2, 3, 2, 3]]
    xyxy = np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1) + jitter
    order = np.argsort(owner, kind="stable")
    owner, xyxy, labels = owner[order], xyxy[order], labels[order]
    starts = np.searchsorted(owner, np.arange(len(sizes) + 1))
    predictions = []
    for k, image in enumerate(data["images"]):
        true_boxes, true_labels = xyxy[starts[k] : starts[k + 1]][:per_image], labels[starts[k] : starts[k + 1]]
        extra = per_image - len(true_boxes)
        width, height = sizes[k]
        x1, y1 = rng.uniform(0, width - 8, extra), rng.uniform(0, height - 8, extra)
        w, h = rng.uniform(4, width / 2, extra), rng.uniform(4, height / 2, extra)
        false_boxes = np.stack([x1, y1, np.minimum(x1 + w, width), np.minimum(y1 + h, height)], 1)
        image_boxes = np.concatenate([true_boxes, false_boxes]).astype(np.float32)
        scores = np.concatenate([rng.uniform(0.3, 1.0, len(true_boxes)), rng.uniform(0.0, 0.6, extra)])
        image_labels = np.concatenate([true_labels[:per_image], rng.integers(0, len(category_ids), extra)])
        order = np.argsort(-scores, kind="stable")
        predictions.append(
            {
                "image_id": image["id"],
                "boxes": image_boxes[order],
                "scores": scores.astype(np.float32)[order],
                "labels": image_labels[order],
            }
        )
    return predictions


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--split", default="train2017", choices=sorted(SPLITS))
    parser.add_argument("--scale", type=float, default=1.0, help="fraction of the split's counts (tests: 0.001)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-images", action="store_true", help="only the annotation json")
    args = parser.parse_args(argv)
    start = time.perf_counter()
    path = make_coco_scale(args.output_dir, args.split, args.scale, args.seed, images=not args.no_images)
    print(f"{path} ({path.stat().st_size / 2**20:.0f} MiB), {split_counts(args.split, args.scale)}", file=sys.stderr)
    print(f"done in {time.perf_counter() - start:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
