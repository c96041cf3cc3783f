"""Run a saved object detector on images; write each image with its labelled boxes (PNG) and its detections (JSON).

    hf-kd-predict --model DIR PATH [PATH ...] [--out out/] [--threshold 0.3] [--batch_size 8]

`DIR` is a `save_pretrained` folder (model + image processor), e.g. from `python -m hf_kd.convert.mmdet` or training.
A `PATH` is an image file or a folder, whose image files (extensions of torchvision's `ImageFolder`: .jpg, .jpeg,
.png, .ppm, .bmp, .pgm, .tif, .tiff, .webp, any case; not its subfolders) are taken in name order. Images are read
upright (EXIF orientation applied, as in training and the transformers pipeline), converted to RGB and run in batches
of `--batch_size` (padded to a common size by the image processor: scores and boxes may differ slightly with the
other images of the batch, as in batched evaluation).

Outputs: an input keeps its path relative to the folder that holds all the inputs, file name and extension included,
under `--out`, with `.png` and `.json` appended: `photos/x.jpg` alone gives `out/x.jpg.png` and `out/x.jpg.json`;
`a/x.jpg b/x.jpg x.png` give `out/a/x.jpg.*`, `out/b/x.jpg.*` and `out/x.png.*`. The PNG is the upright image with
a box and a "label score" tag per detection (sizes proportional to the image; a tag is moved down past the tags of
better detections that it would cover). The JSON holds the image path as given, its upright size and, per detection
(best first), `label`, `label_id`, `score` and `box` (x1, y1, x2, y2 in pixels of the upright image).

A path that cannot be read as an image (not an image, corrupt, missing) or a folder without image files is reported
on stderr and skipped; the others are still processed. Exit status: 0 when every input was processed, 1 when some
were skipped, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps
from torchvision.datasets.folder import IMG_EXTENSIONS
from transformers import AutoImageProcessor, AutoModelForObjectDetection

from ..models import detection  # noqa: F401  (registers the detectors with the transformers Auto classes)

PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40), (128, 0, 0),
)  # fmt: skip
FONT_SCALE = 0.025  # label font size in pixels per pixel of sqrt(width * height): 14 px on a 640x480 image
MIN_FONT_SIZE = 10
# Errors of an unreadable image: not an image (PIL.UnidentifiedImageError), truncated or missing file (OSError),
# corrupt chunks (SyntaxError from some decoders), too many pixels (DecompressionBombError).
READ_ERRORS = (OSError, SyntaxError, Image.DecompressionBombError)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, help="image files and folders of images")
    parser.add_argument("--model", required=True, help="save_pretrained folder (or Hub id) of the detector")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default: predictions)")
    parser.add_argument("--threshold", type=float, default=0.3, help="minimum score of a detection (default: 0.3)")
    parser.add_argument("--batch_size", type=int, default=8, help="images per forward pass (default: 8)")
    parser.add_argument(
        "--device", default="cuda" if torch.cuda.is_available() else "cpu", help="default: cuda if available, else cpu"
    )
    parser.add_argument("--trust_remote_code", action="store_true", help="allow the model folder's own code")
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch_size must be at least 1, got {args.batch_size}")
    return args


def folder_images(folder: Path) -> list[Path]:
    """The image files directly in `folder` (by extension, any case), sorted by name."""
    return sorted(path for path in folder.iterdir() if path.is_file() and path.suffix.lower() in IMG_EXTENSIONS)


def output_paths(paths: list[Path], out: Path) -> list[Path]:
    """Per absolute input path, `out` / its path relative to the deepest folder holding all `paths` (no extension
    removed): two different paths never share one."""
    root = os.path.commonpath([path.parent for path in paths])
    return [out / path.relative_to(root) for path in paths]


def read_image(path: Path) -> Image.Image:
    """The RGB image stored at `path`, upright (EXIF orientation applied)."""
    with Image.open(path) as image:
        return ImageOps.exif_transpose(image).convert("RGB")


def detections_to_records(result: dict[str, torch.Tensor], id2label: dict[int, str]) -> list[dict]:
    """One JSON-ready dict per detection, best first."""
    order = result["scores"].argsort(descending=True)
    return [
        {
            "label": id2label.get(label, str(label)),
            "label_id": label,
            "score": round(score, 5),
            "box": [round(value, 2) for value in box],
        }
        for score, label, box in zip(
            result["scores"][order].tolist(), result["labels"][order].tolist(), result["boxes"][order].tolist()
        )
    ]


def place_tags(
    corners: list[tuple[int, int]], sizes: list[tuple[int, int]], image_size: tuple[int, int]
) -> list[tuple[int, int, int, int]]:
    """Rectangles (x1, y1, x2, y2) of label tags of the given (width, height), in order of priority: each just above
    its box's top-left corner (x1, y1), shifted into the image, then moved down past the tags already placed that it
    would cover; where that runs out of the image, it stays at its first place."""
    image_width, image_height = image_size
    placed: list[tuple[int, int, int, int]] = []
    for (x, y), (width, height) in zip(corners, sizes):
        left = min(max(x, 0), max(image_width - width, 0))
        first_top = top = min(max(y - height, 0), max(image_height - height, 0))
        while covered := [
            tag[3]
            for tag in placed
            if tag[0] < left + width and left < tag[2] and tag[1] < top + height and top < tag[3]
        ]:
            top = max(covered)
            if top + height > image_height:
                top = first_top
                break
        placed.append((left, top, left + width, top + height))
    return placed


def draw_detections(image: Image.Image, records: list[dict]) -> Image.Image:
    """A copy of `image` with a box and a "label score" tag per detection (as given by `detections_to_records`, best
    first; a record with score None, e.g. the ground truth, gets its label alone). Font, line width and padding scale
    with sqrt(width * height); boxes are drawn best last (on top) and the tags after all boxes, placed by
    `place_tags` so that a better detection's tag is never covered."""
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    font_size = max(MIN_FONT_SIZE, round(FONT_SCALE * math.sqrt(image.width * image.height)))
    font = ImageFont.load_default(size=font_size)  # scalable with FreeType (Pillow's wheels); else a fixed bitmap
    line_width, padding = max(1, round(font_size / 8)), max(1, round(font_size / 5))
    colors = [PALETTE[record["label_id"] % len(PALETTE)] for record in records]
    for record, color in zip(reversed(records), reversed(colors)):
        draw.rectangle(record["box"], outline=color, width=line_width)

    if not records:
        return canvas
    texts = [record["label"] + ("" if record["score"] is None else f" {record['score']:.2f}") for record in records]
    text_boxes = [draw.textbbox((0, 0), text, font=font) for text in texts]
    text_top, text_bottom = min(box[1] for box in text_boxes), max(box[3] for box in text_boxes)  # one tag height
    corners = [(math.floor(record["box"][0]), math.floor(record["box"][1])) for record in records]
    sizes = [(right - left + 2 * padding, text_bottom - text_top + 2 * padding) for left, _, right, _ in text_boxes]
    tags = place_tags(corners, sizes, image.size)
    for tag, text, (left, *_), color in reversed(list(zip(tags, texts, text_boxes, colors))):
        draw.rectangle((tag[0], tag[1], tag[2] - 1, tag[3] - 1), fill=color)  # PIL includes the corner (x2, y2)
        text_color = (0, 0, 0) if 0.299 * color[0] + 0.587 * color[1] + 0.114 * color[2] > 128 else (255, 255, 255)
        draw.text((tag[0] + padding - left, tag[1] + padding - text_top), text, fill=text_color, font=font)
    return canvas


@torch.no_grad()
def predict(
    model, processor, images: list[Image.Image], threshold: float, device: str | torch.device
) -> list[dict[str, torch.Tensor]]:
    """Detections above `threshold` per image of one batch, boxes in each image's own pixels."""
    inputs = processor(images=images, return_tensors="pt").to(device=device, dtype=model.dtype)
    outputs = model(**inputs)
    target_sizes = torch.tensor([[image.height, image.width] for image in images], device=device)
    results = processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=target_sizes)
    return [{key: value.cpu() for key, value in result.items()} for result in results]


def main(argv: list[str] | None = None) -> int:
    """Runs the detector on the inputs; returns the exit status (0: all processed, 1: some skipped)."""
    args = parse_args(argv)
    inputs: dict[Path, Path] = {}  # absolute path (normalized, symbolic links kept) -> path as given, each file once
    skipped = 0
    for path in args.images:
        found = folder_images(path) if path.is_dir() else [path]
        if not found:
            print(f"skipped {path}: no image files ({', '.join(IMG_EXTENSIONS)})", file=sys.stderr)
            skipped += 1
        for file in found:
            inputs.setdefault(Path(os.path.abspath(file)), file)
    if not inputs:
        return 1
    paths, outputs = list(inputs.values()), output_paths(list(inputs), args.out)

    processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    model = AutoModelForObjectDetection.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    model.to(args.device).eval()
    id2label = {int(index): name for index, name in model.config.id2label.items()}
    for start in range(0, len(paths), args.batch_size):
        batch = []
        for path, output in zip(paths[start : start + args.batch_size], outputs[start : start + args.batch_size]):
            try:
                batch.append((path, output, read_image(path)))
            except READ_ERRORS as error:
                print(f"skipped {path}: not a readable image ({error})", file=sys.stderr)
                skipped += 1
        if not batch:
            continue
        results = predict(model, processor, [image for _, _, image in batch], args.threshold, args.device)
        for (path, output, image), result in zip(batch, results):
            records = detections_to_records(result, id2label)
            output.parent.mkdir(parents=True, exist_ok=True)
            png, json_path = output.with_name(f"{output.name}.png"), output.with_name(f"{output.name}.json")
            draw_detections(image, records).save(png)
            summary = {"image": str(path), "width": image.width, "height": image.height, "detections": records}
            json_path.write_text(json.dumps(summary, indent=2))
            print(f"{path}: {len(records)} detections -> {png}, {json_path}")
    if skipped:
        print(f"{skipped} input(s) skipped", file=sys.stderr)
    return 1 if skipped else 0


if __name__ == "__main__":
    sys.exit(main())
