"""Datasets in the Hub `objects` layout (an image column and a list of objects with boxes and categories) in the
common example layout (see `hf_kd.data.schema`): column names mapped, boxes converted to COCO pixel [x, y, w, h],
categories to contiguous labels, missing fields filled in, invalid objects raised or skipped.
"""

from __future__ import annotations

import functools
import logging
import numbers
import os
from collections.abc import Mapping, Sequence
from io import BytesIO
from typing import Any, Literal

import datasets
import numpy as np
import PIL.Image

from .image_files import ImageCheck, image_problem, image_problems, image_size
from .schema import DetectionDataError, detection_features
from .validation import (
    DataValidationReport,
    OnInvalid,
    box_warning,
    is_integer,
    is_positive_size,
    is_valid_box,
)

logger = logging.getLogger(__name__)

BoxFormat = Literal["xywh", "xyxy", "cxcywh"]

DEFAULT_COLUMNS = {
    "image": "image",
    "image_id": "image_id",
    "width": "width",
    "height": "height",
    "objects": "objects",
    "bbox": "bbox",
    "category": "category",
    "area": "area",
    "iscrowd": "iscrowd",
    "id": "id",
}


def format_detection_dataset(
    dataset: datasets.IterableDataset | datasets.Dataset,
    *,
    column_mapping: Mapping[str, str] | None = None,
    box_format: BoxFormat = "xywh",
    normalized_boxes: bool = False,
    id2label: Mapping[int, str] | Sequence[str] | None = None,
    on_invalid: OnInvalid = "raise",
    verify_images: bool = False,
    progress: bool = False,
) -> datasets.IterableDataset | datasets.Dataset:
    """Converts a dataset in the Hub `objects` layout to the common example layout.

    Args:
        dataset: e.g. from `load_dataset(name, streaming=True)`: an image column, an integer image id column and an
            `objects` column (list of dicts or dict of lists) with boxes and categories.
        column_mapping: our name -> the dataset's name, for any of `image`, `image_id`, `width`, `height`,
            `objects` (top level) and `bbox`, `category`, `area`, `iscrowd`, `id` (inside `objects`).
        box_format: `"xywh"` (COCO), `"xyxy"` or `"cxcywh"`.
        normalized_boxes: boxes are relative to the image size rather than in pixels.
        id2label: class names by category value; required when the category column is not a `ClassLabel`.
            Values that are not 0..C-1 map to contiguous labels in sorted order.
        on_invalid: `"raise"` a [`DetectionDataError`] on an object with a malformed box (e.g. strings), an unknown
            category or a non-integer id or `iscrowd`, or on an unusable image, or `"skip"` the object (the image)
            with a logged, counted warning.
        verify_images: also check every image (its file or bytes, see `hf_kd.data.image_files`): complete, of a mode
            that converts to RGB faithfully, and of the `width`/`height` given. A map-style dataset is checked here,
            in threads; a streaming one as it streams (in the dataloader workers).
        progress: show a progress bar while checking the images of a map-style dataset.

    Missing `width`/`height` are read from the image header, missing (or non-numeric) `area` is the box area,
    missing `iscrowd` is 0 and missing annotation ids are -1. Nothing is decoded before iteration.
    """
    columns = dict(DEFAULT_COLUMNS)
    unknown = sorted(set(column_mapping or {}) - set(columns))
    if unknown:
        raise ValueError(f"column_mapping keys must be among {sorted(columns)}, got {unknown}")
    columns.update(column_mapping or {})
    if box_format not in ("xywh", "xyxy", "cxcywh"):
        raise ValueError(f"box_format must be 'xywh', 'xyxy' or 'cxcywh', got {box_format!r}")
    features = dataset.features
    if features is None:
        raise DetectionDataError("the dataset's features are unknown; load it with its features (or cast them)")
    for key in ("image", "image_id", "objects"):
        if columns[key] not in features:
            raise DetectionDataError(
                f"column {columns[key]!r} ({key}) not found in {list(features)}; pass column_mapping={{{key!r}: ...}}"
            )
    objects_feature = features[columns["objects"]]
    if isinstance(objects_feature, datasets.List) and isinstance(objects_feature.feature, dict):
        object_features = objects_feature.feature
    elif isinstance(objects_feature, dict):
        object_features = {k: v.feature if isinstance(v, datasets.List) else v for k, v in objects_feature.items()}
    else:
        raise DetectionDataError(f"column {columns['objects']!r} must be a list of objects, got {objects_feature}")
    for key in ("bbox", "category"):
        if columns[key] not in object_features:
            raise DetectionDataError(
                f"field {columns[key]!r} ({key}) not found in {columns['objects']!r} fields {list(object_features)}; "
                f"pass column_mapping={{{key!r}: ...}}"
            )

    category_feature = object_features[columns["category"]]
    if id2label is not None:
        id2label = dict(enumerate(id2label)) if isinstance(id2label, (list, tuple)) else dict(id2label)
        values = sorted(id2label)
        names = [id2label[value] for value in values]
        value_to_label = {value: label for label, value in enumerate(values)}
    elif isinstance(category_feature, datasets.ClassLabel):
        names = category_feature.names
        value_to_label = {label: label for label in range(len(names))}
    else:
        raise DetectionDataError(
            f"field {columns['category']!r} is {category_feature}, not a ClassLabel: pass id2label to name the classes"
        )

    if isinstance(features[columns["image"]], datasets.Image):
        dataset = dataset.cast_column(columns["image"], datasets.Image(decode=False))
    streaming = isinstance(dataset, datasets.IterableDataset)
    report = DataValidationReport(source=f"{type(dataset).__name__} {dataset.info.dataset_name or ''}".strip())
    convert = functools.partial(
        _to_detection_example,
        columns=columns,
        box_format=box_format,
        normalized_boxes=normalized_boxes,
        value_to_label=value_to_label,
        on_invalid=on_invalid,
        verify_image=verify_images and streaming,
        report=report,
    )
    output_features = detection_features(names)
    if streaming:
        # Untyped map output, then cast: images are decoded at the end of the pipeline (after any shuffle buffer).
        dataset = dataset.map(convert, remove_columns=list(features))
        if on_invalid == "skip":
            dataset = dataset.filter(_has_image, input_columns=["width"])
        return dataset.cast(output_features)
    undecoded = datasets.Features({**output_features, "image": datasets.Image(decode=False)})
    dataset = dataset.map(convert, remove_columns=list(features), features=undecoded)
    if on_invalid == "skip":
        dataset = dataset.filter(_has_image, input_columns=["width"])
    if verify_images:
        dataset = _verified(dataset, report, on_invalid, progress)
    return dataset.cast_column("image", output_features["image"])


def load_detection_dataset(
    path: str,
    split: str = "train",
    *,
    streaming: bool = True,
    column_mapping: Mapping[str, str] | None = None,
    box_format: BoxFormat = "xywh",
    normalized_boxes: bool = False,
    id2label: Mapping[int, str] | Sequence[str] | None = None,
    on_invalid: OnInvalid = "raise",
    verify_images: bool = False,
    progress: bool = False,
    **load_dataset_kwargs: Any,
) -> datasets.IterableDataset | datasets.Dataset:
    """`datasets.load_dataset(path, split=split, streaming=streaming, ...)` in the common example layout.

    See [`format_detection_dataset`] for the other arguments.
    """
    dataset = datasets.load_dataset(path, split=split, streaming=streaming, **load_dataset_kwargs)
    return format_detection_dataset(
        dataset,
        column_mapping=column_mapping,
        box_format=box_format,
        normalized_boxes=normalized_boxes,
        id2label=id2label,
        on_invalid=on_invalid,
        verify_images=verify_images,
        progress=progress,
    )


def _image_reference(image: Any) -> dict[str, Any]:
    if isinstance(image, (str, os.PathLike)):
        return {"path": str(image), "bytes": None}
    if isinstance(image, PIL.Image.Image):
        return datasets.Image().encode_example(image)
    return {"path": image.get("path"), "bytes": image.get("bytes")}


def _to_detection_example(
    example: dict[str, Any],
    *,
    columns: dict[str, str],
    box_format: str,
    normalized_boxes: bool,
    value_to_label: dict[Any, int],
    on_invalid: OnInvalid,
    verify_image: bool,
    report: DataValidationReport,
) -> dict[str, Any]:
    """The example in the common layout; an unusable image (with `on_invalid="skip"`) gets width 0, which the
    dataset's filter drops."""
    image = _image_reference(example[columns["image"]])
    image_id = example[columns["image_id"]]
    if not is_integer(image_id) and not isinstance(image_id, np.integer):
        raise DetectionDataError(f"column {columns['image_id']!r}: image id {image_id!r} is not an integer")
    image_id = int(image_id)
    width, height = example.get(columns["width"]), example.get(columns["height"])
    if (width is not None and not is_positive_size(width)) or (height is not None and not is_positive_size(height)):
        raise DetectionDataError(f"image id {image_id}: width={width!r}, height={height!r} must be positive integers")
    size = (int(width), int(height)) if width is not None and height is not None else None
    file = image["bytes"] if image["bytes"] is not None else image["path"]
    problem = image_problem(file, image_id, image["path"], size) if verify_image else None
    if problem is None and size is None:
        try:
            size = image_size(BytesIO(file) if isinstance(file, bytes) else file)
        except Exception as error:  # any failure to open the image makes it unreadable
            problem = (
                "unreadable_image",
                f"image id {image_id}: cannot decode {image['path'] or 'its bytes'}: {error}",
            )
    if problem is not None:
        _invalid(problem, on_invalid, report)
        return {"image": image, "image_id": image_id, "width": 0, "height": 0, "objects": []}
    width, height = size

    objects = example[columns["objects"]] or []
    if isinstance(objects, dict):
        objects = [dict(zip(objects, values)) for values in zip(*objects.values())]
    converted = []
    for index, obj in enumerate(objects):
        where = f"image id {image_id}, object {index}"
        box, value = obj.get(columns["bbox"]), obj.get(columns["category"])
        annotation_id, iscrowd = obj.get(columns["id"]), obj.get(columns["iscrowd"])
        annotation_id, iscrowd = -1 if annotation_id is None else annotation_id, iscrowd or 0
        problem = None
        if not is_valid_box(box):
            problem = ("annotation_bad_bbox", f"{where}: {columns['bbox']!r} must be 4 finite numbers, got {box!r}")
        elif not _is_known(value, value_to_label):
            problem = ("annotation_unknown_category", f"{where}: category {value!r} is not a known class")
        elif not _is_whole_number(annotation_id):
            problem = (
                "annotation_missing_field",
                f"{where}: {columns['id']!r} must be an integer, got {annotation_id!r}",
            )
        elif iscrowd not in (0, 1):
            problem = ("annotation_missing_field", f"{where}: {columns['iscrowd']!r} must be 0 or 1, got {iscrowd!r}")
        if problem is not None:
            _invalid(problem, on_invalid, report)
            continue
        x, y, w, h = _box_to_xywh([float(v) for v in box], box_format, normalized_boxes, width, height)
        warning = box_warning((x, y, w, h), width, height)
        if warning is not None:
            report.add(warning[0], f"{where}: {warning[1]} (kept)", log=True)
        area = obj.get(columns["area"])
        if area is not None and not (isinstance(area, numbers.Real) and not isinstance(area, bool)):
            report.add("area_missing", f"{where}: {columns['area']!r} {area!r} is not a number, using the box area")
            area = None
        converted.append(
            {
                "id": int(annotation_id),
                "bbox": [x, y, w, h],
                "category": value_to_label[value],
                "area": float(w * h if area is None else area),
                "iscrowd": int(iscrowd),
            }
        )
    return {"image": image, "image_id": image_id, "width": width, "height": height, "objects": converted}


def _invalid(problem: tuple[str, str], on_invalid: OnInvalid, report: DataValidationReport) -> None:
    if on_invalid == "raise":
        raise DetectionDataError(f"{report.source}: {problem[1]}")
    report.add(problem[0], f"skipped: {problem[1]}", log=True)


def _is_known(value: Any, value_to_label: dict[Any, int]) -> bool:
    try:
        return value in value_to_label
    except TypeError:  # unhashable, e.g. a list
        return False


def _is_whole_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and float(value).is_integer()


def _has_image(width: int) -> bool:
    return width > 0


def _verified(
    dataset: datasets.Dataset, report: DataValidationReport, on_invalid: OnInvalid, progress: bool
) -> datasets.Dataset:
    """The map-style dataset (images undecoded) without the examples whose image is unusable, checked in threads;
    raises on any with `on_invalid="raise"`."""
    rows = dataset.select_columns(["image", "image_id", "width", "height"])
    checks = (
        ImageCheck(
            row["image"]["bytes"] if row["image"]["bytes"] is not None else row["image"]["path"],
            row["image_id"],
            row["image"]["path"],
            (row["width"], row["height"]),
        )
        for row in rows
    )
    problems = image_problems(checks, total=len(dataset), progress=progress, description="Checking the images")
    found = [problem for problem in problems if problem is not None]
    if not found:
        return dataset
    for problem in found:
        report.add(*problem)
    kinds = sorted({kind for kind, _ in found})
    if on_invalid == "raise":
        raise DetectionDataError(
            f"{report.source}: {len(found)} unusable images; fix the data or pass on_invalid='skip' to skip them:\n"
            f"{report.summary(kinds)}"
        )
    logger.warning("%s: skipped %d unusable images:\n%s", report.source, len(found), report.summary(kinds))
    return dataset.select([index for index, problem in enumerate(problems) if problem is None])


def _box_to_xywh(
    box: list[float], box_format: str, normalized: bool, width: int, height: int
) -> tuple[float, float, float, float]:
    a, b, c, d = box
    if normalized:
        a, b, c, d = a * width, b * height, c * width, d * height
    if box_format == "xyxy":
        return a, b, c - a, d - b
    if box_format == "cxcywh":
        return a - c / 2, b - d / 2, c, d
    return a, b, c, d
