"""A synthetic COCO-format detection dataset: deterministic scenes of textured shapes on textured backgrounds.

Six shape classes in sizes from a few pixels to most of the image, with random textures and colours (sometimes close
to the background), rotations, truncation at the borders, occlusion by other objects and by clutter (irregular blobs,
lines and arcs that belong to no class). Boxes and areas are those of the visible pixels; objects less than a quarter
visible are marked `iscrowd` (ignored by training and by COCO evaluation), invisible ones are left out.

    python -m hf_kd.data.synthetic --out DIR --num-images 300 --seed 0

writes `DIR/instances_train.json`, `DIR/instances_val.json` and `DIR/images/*.jpg`; the same arguments give
byte-identical files.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import PIL.ImageFilter

CLASS_NAMES = ("ellipse", "rectangle", "triangle", "star", "cross", "ring")
MIN_VISIBLE_FRACTION = 0.25
MIN_VISIBLE_PIXELS = 4
JPEG_QUALITY = 90


def generate_synthetic_coco(
    output_dir: str | os.PathLike,
    num_images: int = 300,
    seed: int = 0,
    image_size: int = 320,
    max_objects: int = 12,
    val_fraction: float = 0.2,
) -> dict[str, Path]:
    """Writes the dataset; returns the annotation file of each split (`{"train": ..., "val": ...}`).

    Args:
        output_dir: folder to write `instances_{split}.json` and `images/` into.
        num_images: images in total; the last `round(num_images * val_fraction)` form the validation split.
        seed: every image is drawn from `(seed, image index)`, independently of the others.
        image_size: geometric mean of image width and height (aspect ratios vary from 3:4 to 4:3).
        max_objects: most objects in one image (their number is uniform in 0..max_objects, empty images included).
        val_fraction: share of the validation split.
    """
    if num_images < 1 or image_size < 32 or max_objects < 0 or not 0 <= val_fraction < 1:
        raise ValueError("need num_images >= 1, image_size >= 32, max_objects >= 0 and 0 <= val_fraction < 1")
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    num_val = round(num_images * val_fraction)
    splits = {"train": range(num_images - num_val), "val": range(num_images - num_val, num_images)}
    categories = [{"id": i + 1, "name": name, "supercategory": "shape"} for i, name in enumerate(CLASS_NAMES)]
    paths = {}
    for split, indices in splits.items():
        images, annotations = [], []
        for index in indices:
            image, objects = render_scene(np.random.default_rng([seed, index]), image_size, max_objects)
            file_name = f"{index:06d}.jpg"
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
            (output_dir / "images" / file_name).write_bytes(buffer.getvalue())
            images.append({"id": index + 1, "file_name": file_name, "width": image.width, "height": image.height})
            for obj in objects:
                annotations.append({"id": len(annotations) + 1, "image_id": index + 1, **obj})
        data = {
            "info": {"description": "hf_kd synthetic shapes", "version": "1.0", "seed": seed},
            "images": images,
            "annotations": annotations,
            "categories": categories,
        }
        paths[split] = output_dir / f"instances_{split}.json"
        paths[split].write_text(json.dumps(data))
    return paths


def render_scene(
    rng: np.random.Generator, image_size: int = 320, max_objects: int = 12
) -> tuple[PIL.Image.Image, list[dict[str, Any]]]:
    """One RGB scene and its COCO annotations (`category_id` 1..6, `bbox`, `area`, `iscrowd`) drawn from `rng`."""
    aspect = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
    width, height = round(image_size * math.sqrt(aspect)), round(image_size / math.sqrt(aspect))
    canvas = _background(rng, height, width)
    owner = np.full((height, width), -1, dtype=np.int16)  # index of the object that shows at each pixel
    for _ in range(int(rng.integers(2, 9))):
        _draw_clutter(rng, canvas, owner, height, width)

    objects = []
    max_size = 0.6 * min(width, height)
    for k in range(int(rng.integers(0, max_objects + 1))):
        category = int(rng.integers(len(CLASS_NAMES)))
        size = math.exp(rng.uniform(math.log(6), math.log(max_size)))
        center = (rng.uniform(-0.05, 1.05) * width, rng.uniform(-0.05, 1.05) * height)
        mask, (x0, y0) = _shape_mask(rng, CLASS_NAMES[category], size, center)
        _paste(canvas, owner, mask, x0, y0, _texture(rng, *mask.shape), k)
        window = (slice(max(y0, 0), max(y0 + mask.shape[0], 0)), slice(max(x0, 0), max(x0 + mask.shape[1], 0)))
        objects.append({"category": category, "total": int(mask.sum()), "window": window})
    for _ in range(int(rng.integers(0, 4))):
        _draw_clutter(rng, canvas, owner, height, width)

    if rng.random() < 0.3:
        canvas = np.asarray(
            PIL.Image.fromarray(canvas).filter(PIL.ImageFilter.GaussianBlur(rng.uniform(0.3, 1.2))), dtype=np.uint8
        ).copy()
    noise = rng.standard_normal(canvas.shape, dtype=np.float32) * rng.uniform(2, 8)
    image = PIL.Image.fromarray(np.clip(canvas + noise, 0, 255).astype(np.uint8))

    annotations = []
    for k, obj in enumerate(objects):
        rows, columns = obj["window"]
        ys, xs = np.nonzero(owner[rows, columns] == k)
        if len(xs) < MIN_VISIBLE_PIXELS:
            continue
        x_min, y_min = int(xs.min()) + columns.start, int(ys.min()) + rows.start
        x_max, y_max = int(xs.max()) + 1 + columns.start, int(ys.max()) + 1 + rows.start
        annotations.append(
            {
                "category_id": obj["category"] + 1,
                "bbox": [x_min, y_min, x_max - x_min, y_max - y_min],
                "area": len(xs),
                "iscrowd": int(len(xs) < MIN_VISIBLE_FRACTION * obj["total"]),
            }
        )
    return image, annotations


def _random_color(rng: np.random.Generator) -> np.ndarray:
    return rng.integers(0, 256, 3).astype(np.float32)


def _background(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    cells = int(rng.integers(2, 9))
    coarse = rng.integers(0, 256, (cells, cells, 3), dtype=np.uint8)
    smooth = np.asarray(PIL.Image.fromarray(coarse).resize((width, height), PIL.Image.BILINEAR), dtype=np.float32)
    if rng.random() < 0.5:
        smooth = 0.6 * smooth + 0.4 * _texture(rng, height, width)
    return smooth.astype(np.uint8)


def _texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """A (height, width, 3) float32 texture: flat, stripes, checks, dots or a gradient, in two random colours."""
    color_a, color_b = _random_color(rng), _random_color(rng)
    kind = int(rng.integers(5))
    ys = np.arange(height, dtype=np.float32)[:, None]
    xs = np.arange(width, dtype=np.float32)[None, :]
    if kind == 0:
        return np.broadcast_to(color_a, (height, width, 3))
    if kind == 1:
        angle, period = rng.uniform(0, math.pi), rng.uniform(3, 16)
        phase = (xs * math.cos(angle) + ys * math.sin(angle)) * (2 / period)
        weight = (np.floor(phase) % 2).astype(np.float32)
    elif kind == 2:
        period = int(rng.integers(3, 12))
        weight = ((xs // period + ys // period) % 2).astype(np.float32)
    elif kind == 3:
        period = rng.uniform(4, 12)
        weight = (((xs % period) - period / 2) ** 2 + ((ys % period) - period / 2) ** 2 < (period / 3) ** 2).astype(
            np.float32
        )
    else:
        angle = rng.uniform(0, 2 * math.pi)
        ramp = xs * math.cos(angle) + ys * math.sin(angle)
        weight = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1.0)
    return color_a + weight[..., None] * (color_b - color_a)


def _polygon(rng: np.random.Generator, name: str) -> list[np.ndarray]:
    """Polygons (first filled, the others cut out) of a class shape of radius 1 centred on 0."""
    if name in ("ellipse", "ring"):
        t = np.linspace(0, 2 * math.pi, 40, endpoint=False)
        ratio = rng.uniform(0.55, 1.0)
        outer = np.stack([np.cos(t), ratio * np.sin(t)], axis=1)
        if name == "ellipse":
            return [outer]
        return [outer, outer * rng.uniform(0.45, 0.7)]
    if name == "rectangle":
        ratio = rng.uniform(0.4, 1.0)
        return [np.array([[-1, -ratio], [1, -ratio], [1, ratio], [-1, ratio]]) * 0.85]
    if name == "triangle":
        angles = np.array([0, 2 * math.pi / 3, 4 * math.pi / 3]) + rng.uniform(-0.3, 0.3, 3)
        return [np.stack([np.cos(angles), np.sin(angles)], axis=1)]
    if name == "star":
        t = np.linspace(0, 2 * math.pi, 10, endpoint=False)
        radii = np.where(np.arange(10) % 2 == 0, 1.0, rng.uniform(0.38, 0.55))
        return [np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)]
    arm = rng.uniform(0.3, 0.5)  # cross
    return [
        np.array(
            [[-arm, -1], [arm, -1], [arm, -arm], [1, -arm], [1, arm], [arm, arm], [arm, 1], [-arm, 1], [-arm, arm]]
            + [[-1, arm], [-1, -arm], [-arm, -arm]]
        )
    ]


def _shape_mask(
    rng: np.random.Generator, name: str, size: float, center: tuple[float, float]
) -> tuple[np.ndarray, tuple[int, int]]:
    """Boolean mask of a rotated class shape of diameter `size`, and the canvas position of its top-left corner."""
    angle = rng.uniform(0, 2 * math.pi)
    rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])
    polygons = [points @ rotation.T * (size / 2) for points in _polygon(rng, name)]
    return _rasterize(polygons, center)


def _rasterize(polygons: list[np.ndarray], center: tuple[float, float]) -> tuple[np.ndarray, tuple[int, int]]:
    extent = max(float(np.abs(p).max()) for p in polygons) + 1
    x0, y0 = int(math.floor(center[0] - extent)), int(math.floor(center[1] - extent))
    side = int(math.ceil(2 * extent)) + 1
    mask = PIL.Image.new("L", (side, side), 0)
    draw = PIL.ImageDraw.Draw(mask)
    for index, points in enumerate(polygons):
        shifted = points + np.array([center[0] - x0, center[1] - y0])
        draw.polygon([tuple(p) for p in shifted], fill=255 if index == 0 else 0)
    return np.asarray(mask) > 0, (x0, y0)


def _paste(
    canvas: np.ndarray, owner: np.ndarray, mask: np.ndarray, x0: int, y0: int, texture: np.ndarray, index: int
) -> None:
    """Draws `texture` through `mask` at (x0, y0), clipped to the canvas; marks the pixels as owned by `index`."""
    height, width = owner.shape
    left, top = max(x0, 0), max(y0, 0)
    right, bottom = min(x0 + mask.shape[1], width), min(y0 + mask.shape[0], height)
    if right <= left or bottom <= top:
        return
    window = mask[top - y0 : bottom - y0, left - x0 : right - x0]
    canvas[top:bottom, left:right][window] = texture[top - y0 : bottom - y0, left - x0 : right - x0][window]
    owner[top:bottom, left:right][window] = index


def _draw_clutter(rng: np.random.Generator, canvas: np.ndarray, owner: np.ndarray, height: int, width: int) -> None:
    """An irregular blob, a thick line or an arc that belongs to no class (hides what it covers)."""
    size = math.exp(rng.uniform(math.log(6), math.log(0.5 * min(width, height))))
    center = (rng.uniform(0, width), rng.uniform(0, height))
    kind = int(rng.integers(3))
    if kind == 0:
        count = int(rng.integers(5, 10))
        t = np.sort(rng.uniform(0, 2 * math.pi, count))
        radii = rng.uniform(0.3, 1.0, count) * size / 2
        mask, (x0, y0) = _rasterize([np.stack([radii * np.cos(t), radii * np.sin(t)], axis=1)], center)
    else:
        side = int(size) + 4
        image = PIL.Image.new("L", (side, side), 0)
        draw = PIL.ImageDraw.Draw(image)
        line_width = int(rng.integers(1, max(2, side // 8)))
        if kind == 1:
            points = [tuple(rng.uniform(0, side, 2)) for _ in range(2)]
            draw.line(points, fill=255, width=line_width)
        else:
            start = float(rng.uniform(0, 360))
            draw.arc(
                [2, 2, side - 2, side - 2], start, start + float(rng.uniform(60, 270)), fill=255, width=line_width
            )
        mask, (x0, y0) = np.asarray(image) > 0, (int(center[0] - side / 2), int(center[1] - side / 2))
    _paste(canvas, owner, mask, x0, y0, _texture(rng, *mask.shape), -1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--num-images", type=int, default=300)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--image-size", type=int, default=320, help="geometric mean of width and height")
    parser.add_argument("--max-objects", type=int, default=12)
    parser.add_argument("--val-fraction", type=float, default=0.2)
    args = parser.parse_args(argv)
    paths = generate_synthetic_coco(
        args.out, args.num_images, args.seed, args.image_size, args.max_objects, args.val_fraction
    )
    for split, path in paths.items():
        data = json.loads(path.read_text())
        print(f"{split}: {len(data['images'])} images, {len(data['annotations'])} annotations -> {path}")


if __name__ == "__main__":
    main()
