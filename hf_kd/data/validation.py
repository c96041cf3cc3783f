"""Validation of detection data: the report of what was found, and the checks of images, COCO entries and boxes that
every source shares (COCO folders, their parquet preparation and Hub `objects` datasets).

Problems that make an image or an annotation unusable (`INVALID_KINDS`) are raised, or skipped with
`on_invalid="skip"`; the others (`WARNING_KINDS`) are kept in the data, so that the ground truth stays what
pycocotools reads, and reported.
"""

from __future__ import annotations

import logging
import math
import numbers
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

from .image_files import ImageCheck, image_problems

logger = logging.getLogger(__name__)

OnInvalid = Literal["raise", "skip"]

IMAGE_INVALID_KINDS = (
    "image_missing_field",
    "image_bad_size",
    "duplicate_image_id",
    "missing_image_file",
    "unreadable_image",
    "unsupported_image_mode",
    "image_size_mismatch",
)
ANNOTATION_INVALID_KINDS = (
    "annotation_missing_field",
    "annotation_bad_bbox",
    "annotation_unknown_image",
    "annotation_unknown_category",
    "duplicate_annotation_id",
    "annotation_of_skipped_image",
)
INVALID_KINDS = IMAGE_INVALID_KINDS + ANNOTATION_INVALID_KINDS
WARNING_KINDS = ("duplicate_file_name", "box_outside_image", "degenerate_box", "area_missing")

_MAX_MESSAGES_PER_KIND = 5


@dataclass
class DataValidationReport:
    """What validation of a detection source found: counts per problem kind and the first messages of each kind."""

    source: str
    counts: Counter = field(default_factory=Counter)
    messages: dict[str, list[str]] = field(default_factory=lambda: defaultdict(list))

    def add(self, kind: str, message: str, log: bool = False) -> None:
        """Counts a problem; with `log`, also logs it when it is the 1st, 10th, 100th, ... of its kind (for reports
        filled while streaming, which are never summarized)."""
        self.counts[kind] += 1
        if len(self.messages[kind]) < _MAX_MESSAGES_PER_KIND:
            self.messages[kind].append(message)
        count = self.counts[kind]
        if log and math.log10(count).is_integer():
            logger.warning("%s: %s (%d %s so far in this process)", self.source, message, count, kind)

    @property
    def num_invalid(self) -> int:
        return sum(self.counts[kind] for kind in INVALID_KINDS)

    def summary(self, kinds: Sequence[str] | None = None) -> str:
        kinds = [kind for kind in (kinds or self.counts) if self.counts[kind]]
        lines = []
        for kind in kinds:
            lines.append(f"  {kind}: {self.counts[kind]}")
            lines.extend(f"    - {message}" for message in self.messages[kind])
            if self.counts[kind] > len(self.messages[kind]):
                lines.append(f"    - ... ({self.counts[kind] - len(self.messages[kind])} more)")
        return "\n".join(lines)


def is_integer(value: Any) -> bool:
    """Whether `value` is an `int` (and not a `bool`)."""
    return isinstance(value, int) and not isinstance(value, bool)


def is_positive_size(value: Any) -> bool:
    """Whether `value` is a positive whole number (an image width or height)."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 and float(value).is_integer()


def is_valid_box(box: Any) -> bool:
    """Whether `box` is 4 finite real numbers (in any box format)."""
    return (
        isinstance(box, (list, tuple, np.ndarray))
        and len(box) == 4
        and all(isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in box)
    )


def box_warning(box: Sequence[float], width: int, height: int) -> tuple[str, str] | None:
    """The `(kind, message)` of a valid COCO `[x, y, w, h]` pixel box without area or leaving the `width x height`
    image, else None. Such boxes are kept and reported."""
    x, y, w, h = (float(v) for v in box)
    if w <= 0 or h <= 0:
        return "degenerate_box", f"bbox {list(box)} has no area"
    if x < 0 or y < 0 or x + w > width or y + h > height:
        return "box_outside_image", f"bbox {list(box)} leaves the {width}x{height} image"
    return None


def validate_coco_images(entries: list[Any], report: DataValidationReport) -> list[dict[str, Any]]:
    """The usable entries of a COCO `images` list (`id`, `file_name`, `width`, `height`); the others are reported."""
    valid = []
    for index, image in enumerate(entries):
        if not isinstance(image, dict):
            report.add("image_missing_field", f"images[{index}] is not an object: {image!r}")
            continue
        image_id = image.get("id")
        where = f"image id {image_id}" if is_integer(image_id) else f"images[{index}]"
        missing = [key for key in ("id", "file_name", "width", "height") if key not in image]
        if missing or not is_integer(image_id) or not isinstance(image.get("file_name"), str):
            report.add("image_missing_field", f"{where}: needs integer 'id', string 'file_name', 'width', 'height'")
            continue
        bad = [key for key in ("width", "height") if not is_positive_size(image[key])]
        if bad:
            sizes = ", ".join(f"{key}={image[key]!r}" for key in bad)
            report.add("image_bad_size", f"{where} ({image['file_name']}): {sizes} must be a positive integer")
            continue
        valid.append(
            {
                "id": image_id,
                "file_name": image["file_name"],
                "width": int(image["width"]),
                "height": int(image["height"]),
            }
        )
    by_id = defaultdict(list)
    for image in valid:
        by_id[image["id"]].append(image["file_name"])
    for image_id, file_names in by_id.items():
        if len(file_names) > 1:
            for _ in file_names:
                report.add(
                    "duplicate_image_id", f"image id {image_id} is used by {len(file_names)} images: {file_names}"
                )
    unique = [image for image in valid if len(by_id[image["id"]]) == 1]
    by_file_name = defaultdict(list)
    for image in unique:
        by_file_name[image["file_name"]].append(image["id"])
    for file_name, image_ids in by_file_name.items():
        if len(image_ids) > 1:
            report.add(
                "duplicate_file_name",
                f"file {file_name} is listed under {len(image_ids)} image ids {image_ids}: each is trained on and "
                "evaluated with its own annotations only",
            )
    return unique


def check_image_files(
    images: list[dict[str, Any]],
    image_dir: Path,
    report: DataValidationReport,
    verify_images: bool,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The images whose file exists in `image_dir` and, with `verify_images`, is a complete image of a supported mode
    and of the size the entry says (see `hf_kd.data.image_files`, checked in threads); the others are reported."""
    present = []
    for image in images:
        path = image_dir / image["file_name"]
        if path.is_file():
            present.append(image)
        else:
            report.add("missing_image_file", f"image id {image['id']}: file {path} does not exist")
    if not verify_images:
        return present
    problems = image_problems(
        (
            ImageCheck(image_dir / image["file_name"], image["id"], expected_size=(image["width"], image["height"]))
            for image in present
        ),
        total=len(present),
        progress=progress,
        description=f"Checking the images of {report.source}",
    )
    kept = []
    for image, problem in zip(present, problems):
        if problem is None:
            kept.append(image)
        else:
            report.add(*problem)
    return kept


def validate_coco_annotations(
    annotations: list[Any],
    images: list[dict[str, Any]],
    listed_image_ids: set[Any],
    category_ids: Sequence[int],
    report: DataValidationReport,
) -> list[dict[str, Any]]:
    """The usable entries of a COCO `annotations` list for the valid `images`, normalized (`bbox` floats, `area`
    defaulting to the box area, `iscrowd` 0/1); the others are reported, as are kept boxes with problems.

    `listed_image_ids` are all the ids of the file's `images` list, to tell an annotation of a skipped image from one
    of an unknown image.
    """
    sizes = {image["id"]: (image["width"], image["height"]) for image in images}
    known_category_ids = set(category_ids)
    annotation_id_count = Counter(a.get("id") for a in annotations if isinstance(a, dict))
    kept = []
    for index, annotation in enumerate(annotations):
        if not isinstance(annotation, dict):
            report.add("annotation_missing_field", f"annotations[{index}] is not an object: {annotation!r}")
            continue
        annotation_id = annotation.get("id")
        where = f"annotation id {annotation_id}" if is_integer(annotation_id) else f"annotations[{index}]"
        missing = [key for key in ("id", "image_id", "category_id") if not is_integer(annotation.get(key))]
        missing += [] if "bbox" in annotation else ["bbox"]
        if missing:
            report.add("annotation_missing_field", f"{where}: missing or non-integer field(s) {missing}")
            continue
        image_id, category_id, bbox = annotation["image_id"], annotation["category_id"], annotation["bbox"]
        where = f"{where} (image id {image_id})"
        if annotation_id_count[annotation_id] > 1:
            report.add(
                "duplicate_annotation_id", f"{where}: annotation id used {annotation_id_count[annotation_id]} times"
            )
            continue
        if not is_valid_box(bbox):
            report.add("annotation_bad_bbox", f"{where}: 'bbox' must be 4 finite numbers [x, y, w, h], got {bbox!r}")
            continue
        if category_id not in known_category_ids:
            report.add("annotation_unknown_category", f"{where}: category_id {category_id} is not in 'categories'")
            continue
        if image_id not in sizes:
            if image_id in listed_image_ids:
                report.add("annotation_of_skipped_image", f"{where}: its image was skipped")
            else:
                report.add("annotation_unknown_image", f"{where}: image_id {image_id} is not in 'images'")
            continue
        warning = box_warning(bbox, *sizes[image_id])
        if warning is not None:
            report.add(warning[0], f"{where}: {warning[1]}")
        x, y, w, h = (float(v) for v in bbox)
        area = annotation.get("area")
        if not isinstance(area, (int, float)) or isinstance(area, bool):
            report.add("area_missing", f"{where}: no numeric 'area', using the box area")
            area = w * h
        kept.append(
            {
                "id": annotation_id,
                "image_id": image_id,
                "category_id": category_id,
                "bbox": [x, y, w, h],
                "area": float(area),
                "iscrowd": int(bool(annotation.get("iscrowd", 0))),
            }
        )
    return kept
