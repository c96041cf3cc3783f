"""Datasets in the Hub `objects` layout (an image column and a list of objects with boxes and categories) in the
common example layout (see `hf_kd.data.schema`): column names mapped, boxes converted to COCO pixel [x, y, w, h],
categories to contiguous labels, missing fields filled in, invalid objects raised or skipped.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping, Sequence
from io import BytesIO
from typing import Any, Literal

import datasets
import numpy as np
import PIL.Image

from .schema import DetectionDataError, detection_features
from .validation import (
    DataValidationReport,
    OnInvalid,
    box_warning,
    image_size,
    is_integer,
    is_positive_size,
    is_valid_box,
)

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
        on_invalid: `"raise"` a [`DetectionDataError`] on an object with a malformed box or an unknown category,
            or `"skip"` the object with a logged, counted warning.

    Missing `width`/`height` are read from the image header, missing `area` is the box area, missing `iscrowd` is
    0 and missing annotation ids are -1. Nothing is decoded before iteration.
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
    convert = functools.partial(
        _to_detection_example,
        columns=columns,
        box_format=box_format,
        normalized_boxes=normalized_boxes,
        value_to_label=value_to_label,
        on_invalid=on_invalid,
        report=DataValidationReport(source=f"{type(dataset).__name__} {dataset.info.dataset_name or ''}".strip()),
    )
    output_features = detection_features(names)
    if isinstance(dataset, datasets.IterableDataset):
        # Untyped map output, then cast: images are decoded at the end of the pipeline (after any shuffle buffer).
        return dataset.map(convert, remove_columns=list(features)).cast(output_features)
    undecoded = datasets.Features({**output_features, "image": datasets.Image(decode=False)})
    dataset = dataset.map(convert, remove_columns=list(features), features=undecoded)
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
    report: DataValidationReport,
) -> dict[str, Any]:
    image = _image_reference(example[columns["image"]])
    image_id = example[columns["image_id"]]
    if not is_integer(image_id) and not isinstance(image_id, np.integer):
        raise DetectionDataError(f"column {columns['image_id']!r}: image id {image_id!r} is not an integer")
    image_id = int(image_id)
    width, height = example.get(columns["width"]), example.get(columns["height"])
    if width is None or height is None:
        width, height = image_size(BytesIO(image["bytes"]) if image["bytes"] is not None else image["path"])
    if not (is_positive_size(width) and is_positive_size(height)):
        raise DetectionDataError(f"image id {image_id}: width={width!r}, height={height!r} must be positive integers")
    width, height = int(width), int(height)

    objects = example[columns["objects"]] or []
    if isinstance(objects, dict):
        objects = [dict(zip(objects, values)) for values in zip(*objects.values())]
    converted = []
    for index, obj in enumerate(objects):
        where = f"image id {image_id}, object {index}"
        box, value = obj.get(columns["bbox"]), obj.get(columns["category"])
        problem = None
        if not is_valid_box(box):
            problem = ("annotation_bad_bbox", f"{where}: {columns['bbox']!r} must be 4 finite numbers, got {box!r}")
        elif value not in value_to_label:
            problem = ("annotation_unknown_category", f"{where}: category {value!r} is not a known class")
        if problem is not None:
            if on_invalid == "raise":
                raise DetectionDataError(f"{report.source}: {problem[1]}")
            report.add(problem[0], f"skipped: {problem[1]}", log=True)
            continue
        x, y, w, h = _box_to_xywh([float(v) for v in box], box_format, normalized_boxes, width, height)
        warning = box_warning((x, y, w, h), width, height)
        if warning is not None:
            report.add(warning[0], f"{where}: {warning[1]} (kept)", log=True)
        area = obj.get(columns["area"])
        converted.append(
            {
                "id": int(obj.get(columns["id"], -1)),
                "bbox": [x, y, w, h],
                "category": value_to_label[value],
                "area": float(w * h if area is None else area),
                "iscrowd": int(bool(obj.get(columns["iscrowd"], 0))),
            }
        )
    return {"image": image, "image_id": image_id, "width": width, "height": height, "objects": converted}


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
