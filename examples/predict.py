"""Run a saved object detector on image files; write each image with its labelled boxes (PNG) and its detections (JSON).

    python examples/predict.py --model DIR image.jpg [more.jpg ...] --out out/ [--threshold 0.3] [--device cpu]

`DIR` is a `save_pretrained` folder (model + image processor), e.g. from `python -m hf_kd.convert.mmdet` or training.
Each input `NAME.jpg` gives `out/NAME.png` and `out/NAME.json`; the JSON holds the image path and size and, per
detection (best first), `label`, `label_id`, `score` and `box` (x1, y1, x2, y2 in pixels of the original image).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import AutoImageProcessor, AutoModelForObjectDetection

import hf_kd  # noqa: F401  (registers GFL with the transformers Auto classes)

PALETTE = (
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48), (145, 30, 180), (70, 240, 240),
    (240, 50, 230), (210, 245, 60), (250, 190, 212), (0, 128, 128), (220, 190, 255), (170, 110, 40), (128, 0, 0),
)  # fmt: skip


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="+", type=Path, help="image files")
    parser.add_argument("--model", required=True, help="save_pretrained folder (or Hub id) of the detector")
    parser.add_argument("--out", type=Path, default=Path("predictions"), help="output folder (default: predictions)")
    parser.add_argument("--threshold", type=float, default=0.3, help="minimum score of a drawn detection")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--trust_remote_code", action="store_true", help="allow the model folder's own code")
    return parser.parse_args(argv)


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


def draw_detections(image: Image.Image, records: list[dict]) -> Image.Image:
    """A copy of `image` with a box and a "label score" tag per detection (lowest score drawn first)."""
    canvas = image.copy()
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default()
    line_width = max(2, round(max(image.size) / 400))
    for record in reversed(records):
        color = PALETTE[record["label_id"] % len(PALETTE)]
        x1, y1, x2, y2 = record["box"]
        draw.rectangle((x1, y1, x2, y2), outline=color, width=line_width)
        text = f"{record['label']} {record['score']:.2f}"
        left, top, right, bottom = draw.textbbox((x1, y1), text, font=font)
        tag_top = max(0, y1 - (bottom - top) - 2)
        draw.rectangle((x1, tag_top, x1 + right - left + 4, tag_top + bottom - top + 2), fill=color)
        draw.text((x1 + 2, tag_top), text, fill=(0, 0, 0), font=font)
    return canvas


@torch.no_grad()
def predict(
    model, processor, image: Image.Image, threshold: float, device: str | torch.device
) -> dict[str, torch.Tensor]:
    """Detections above `threshold` on one image, boxes in its own pixels."""
    inputs = processor(images=[image], return_tensors="pt").to(device=device, dtype=model.dtype)
    outputs = model(**inputs)
    target_sizes = torch.tensor([[image.height, image.width]], device=device)
    result = processor.post_process_object_detection(outputs, threshold=threshold, target_sizes=target_sizes)[0]
    return {key: value.cpu() for key, value in result.items()}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    processor = AutoImageProcessor.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    model = AutoModelForObjectDetection.from_pretrained(args.model, trust_remote_code=args.trust_remote_code)
    model.to(args.device).eval()
    id2label = {int(index): name for index, name in model.config.id2label.items()}
    args.out.mkdir(parents=True, exist_ok=True)
    for path in args.images:
        image = Image.open(path).convert("RGB")
        records = detections_to_records(predict(model, processor, image, args.threshold, args.device), id2label)
        draw_detections(image, records).save(args.out / f"{path.stem}.png")
        summary = {"image": str(path), "width": image.width, "height": image.height, "detections": records}
        (args.out / f"{path.stem}.json").write_text(json.dumps(summary, indent=2))
        print(f"{path}: {len(records)} detections -> {args.out / path.stem}.png/.json")


if __name__ == "__main__":
    main()
