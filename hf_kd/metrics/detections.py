"""Detections in COCO results form (the dataset's category ids, [x, y, w, h] boxes), from per-image predictions in
the metric's format (absolute xyxy boxes, contiguous labels)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class DetectionArrays:
    """COCO results as arrays: `image_ids`, `category_ids` (the dataset's ids), `boxes` ((n, 4) float64 COCO
    [x, y, w, h]) and `scores` (float64), in the order a results list would have them.

    Scores and boxes must be finite (a `ValueError` names the image otherwise): pycocotools and the numpy backend
    would rank and match NaN differently, and neither result would mean anything.
    """

    image_ids: np.ndarray
    category_ids: np.ndarray
    boxes: np.ndarray
    scores: np.ndarray

    def __post_init__(self):
        finite = np.isfinite(self.scores) & np.isfinite(self.boxes).all(axis=1)
        if not finite.all():
            k = int(np.argmin(finite))
            raise ValueError(
                f"image id {int(self.image_ids[k])}: a detection has a non-finite score or box (score "
                f"{self.scores[k]}, COCO box {self.boxes[k].tolist()}); {int((~finite).sum())} non-finite detections "
                "in all: predictions must be finite"
            )

    @classmethod
    def from_predictions(
        cls, predictions: Iterable[Mapping[str, Any]], label_to_category_id: Mapping[int, int]
    ) -> DetectionArrays:
        """From per-image predictions in the metric's format (`image_id`, `boxes`, `scores`, `labels`), in order."""
        image_ids, labels, boxes, scores = [], [], [], []
        for prediction in predictions:
            image_id = int(prediction["image_id"])
            box = np.asarray(prediction["boxes"], dtype=np.float64).reshape(-1, 4)
            score = np.asarray(prediction["scores"], dtype=np.float64).reshape(-1)
            label = np.asarray(prediction["labels"]).reshape(-1).astype(np.int64)
            if not len(box) == len(score) == len(label):
                raise ValueError(f"image id {image_id}: boxes, scores and labels must have the same length")
            image_ids.append(np.full(len(box), image_id, dtype=np.int64))
            labels.append(label)
            boxes.append(box)
            scores.append(score)
        return cls.from_xyxy(
            np.concatenate(image_ids) if image_ids else np.zeros(0, np.int64),
            np.concatenate(boxes) if boxes else np.zeros((0, 4)),
            np.concatenate(scores) if scores else np.zeros(0),
            np.concatenate(labels) if labels else np.zeros(0, np.int64),
            label_to_category_id,
        )

    @classmethod
    def from_xyxy(
        cls,
        image_ids: np.ndarray,
        boxes: np.ndarray,
        scores: np.ndarray,
        labels: np.ndarray,
        label_to_category_id: Mapping[int, int],
    ) -> DetectionArrays:
        """From absolute xyxy boxes and contiguous labels (the metric's prediction format), flattened."""
        boxes = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
        labels = np.asarray(labels).astype(np.int64).reshape(-1)
        known = np.array(sorted(label_to_category_id), dtype=np.int64)
        position = np.searchsorted(known, labels)
        unknown = (position >= len(known)) | (known[np.minimum(position, len(known) - 1)] != labels)
        if unknown.any():
            k = int(np.argmax(unknown))
            raise ValueError(f"image id {int(image_ids[k])}: predicted label {int(labels[k])} is not a known class")
        category_ids = np.array([label_to_category_id[int(label)] for label in known], dtype=np.int64)[position]
        xywh = np.stack([boxes[:, 0], boxes[:, 1], boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], 1)
        return cls(
            image_ids=np.asarray(image_ids, dtype=np.int64).reshape(-1),
            category_ids=category_ids,
            boxes=xywh,
            scores=np.asarray(scores, dtype=np.float64).reshape(-1),
        )

    def __len__(self) -> int:
        return len(self.scores)


def to_coco_detections(
    predictions: Iterable[Mapping[str, Any]], label_to_category_id: Mapping[int, int]
) -> list[dict[str, Any]]:
    """COCO results (`image_id`, `category_id`, `bbox` xywh, `score`) from per-image predictions in the metric's
    format, with labels mapped to the dataset's category ids (e.g. `DetectionCategories.label_to_category_id`)."""
    arrays = DetectionArrays.from_predictions(predictions, label_to_category_id)
    return [
        {"image_id": image_id, "category_id": category_id, "bbox": box, "score": score}
        for image_id, category_id, box, score in zip(
            arrays.image_ids.tolist(), arrays.category_ids.tolist(), arrays.boxes.tolist(), arrays.scores.tolist()
        )
    ]
