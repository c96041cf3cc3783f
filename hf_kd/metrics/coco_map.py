"""COCO box mAP as an `evaluate.Metric` ([`CocoDetectionMAP`])."""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from typing import Any

import datasets
import evaluate
import numpy as np
from pycocotools.coco import COCO

from .detections import DetectionArrays
from .evaluation import BACKENDS, evaluate_detection_arrays
from .ground_truth import GroundTruthArrays, first_per_image, ground_truth_from_references, load_coco_ground_truth

PREDICTION_FEATURES = {
    "image_id": datasets.Value("int64"),
    "boxes": datasets.List(datasets.List(datasets.Value("float64"), length=4)),
    "scores": datasets.List(datasets.Value("float64")),
    "labels": datasets.List(datasets.Value("int64")),
}
REFERENCE_FEATURES = {
    "image_id": datasets.Value("int64"),
    "bbox": datasets.List(datasets.List(datasets.Value("float64"), length=4)),
    "category": datasets.List(datasets.Value("int64")),
    "area": datasets.List(datasets.Value("float64")),
    "iscrowd": datasets.List(datasets.Value("int64")),
}

_DESCRIPTION = """COCO object detection metrics (bbox): the 12 numbers of pycocotools' COCOeval.summarize() (AP at
IoU 0.50:0.95, 0.50, 0.75, AP small/medium/large, AR with 1/10/100 detections, AR small/medium/large; area ranges
and max detections as in COCO) plus per-class AP and AR@100. -1 means "no ground truth" as in pycocotools."""

_CITATION = """@inproceedings{lin2014microsoft,
  title={Microsoft COCO: Common Objects in Context},
  author={Lin, Tsung-Yi and Maire, Michael and Belongie, Serge and others},
  booktitle={ECCV},
  year={2014}
}"""

_INPUTS_DESCRIPTION = """
Args:
    predictions: one dict per image: `image_id` (int), `boxes` ((n, 4) absolute xyxy in original image pixels, as
        returned by `post_process_object_detection` with the original sizes), `scores` (n,), `labels` (n,)
        contiguous labels 0..C-1. An image without detections is passed with empty lists; the images evaluated are
        the image ids passed. Scores and boxes must be finite: a `ValueError` names the image of a NaN or infinite
        one (the two backends would otherwise score it differently).
    references: only without `ground_truth`: one dict per image with the ground-truth objects as the data sources
        yield them: `image_id`, `bbox` ((m, 4) COCO [x, y, w, h] pixels), `category` (m,), `area` (m,) and
        `iscrowd` (m,) (see `coco_reference`).
Returns:
    dict with `map`, `map_50`, `map_75`, `map_small`, `map_medium`, `map_large`, `mar_1`, `mar_10`, `mar_100`,
    `mar_small`, `mar_medium`, `mar_large` (floats) and `map_per_class`, `mar_100_per_class` (class name -> float).
"""


class CocoDetectionMAP(evaluate.Metric):
    """COCO box mAP, exactly as pycocotools' `COCOeval` computes it.

    Args:
        ground_truth: a COCO annotation json path, COCO dict or `pycocotools.coco.COCO`. The ground truth is then
            exactly what pycocotools reads from it (crowd regions and areas included), prediction labels map to its
            categories in order of category id, and only `predictions` are passed. Without it, pass `references`.
        id2label: class names for the per-class results when `references` are used (defaults to the label numbers).
        backend: how COCOeval's `evaluate` and `accumulate` run: `"pycocotools"` (the reference: pycocotools'
            `COCOeval` itself, on result dicts built directly rather than through `loadRes`), or `"numpy"`
            ([`numpy_cocoeval`]: a vectorized port, operation for operation; ~30x faster at val2017 size, 5,000
            images and 500,000 detections in ~4 s on 2 CPU cores; tests check that every number, down to the full
            precision/recall/scores arrays, is pycocotools'). `"auto"` (the default) is `"numpy"`. `summarize` is
            pycocotools' in both.
        **kwargs: `evaluate.Metric` arguments, e.g. `keep_in_memory=True`.

    The ground truth is read once, at construction; [`evaluate_predictions`] evaluates predictions directly (no
    Arrow round trip through `evaluate`), which is what `coco_compute_metrics` uses during training.

    Example:
        ```python
        metric = CocoDetectionMAP(ground_truth="instances_val2017.json", keep_in_memory=True)
        metric.add_batch(predictions=[{"image_id": 139, "boxes": [[x1, y1, x2, y2]], "scores": [0.9], "labels": [0]}])
        metric.compute()["map"]
        ```
    """

    def __init__(
        self,
        ground_truth: str | os.PathLike | Mapping[str, Any] | COCO | None = None,
        id2label: Mapping[int, str] | None = None,
        backend: str = "auto",
        **kwargs: Any,
    ):
        if backend not in ("auto", *BACKENDS):
            raise ValueError(f"backend must be 'auto' or one of {BACKENDS}, got {backend!r}")
        self.backend = "numpy" if backend == "auto" else backend
        self.ground_truth = None if ground_truth is None else load_coco_ground_truth(ground_truth)
        self.id2label = None if id2label is None else {int(k): v for k, v in id2label.items()}
        super().__init__(**kwargs)

    def _info(self) -> evaluate.MetricInfo:
        features = {"predictions": PREDICTION_FEATURES}
        if self.ground_truth is None:
            features["references"] = REFERENCE_FEATURES
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_INPUTS_DESCRIPTION,
            features=datasets.Features(features),
            reference_urls=["https://github.com/cocodataset/cocoapi"],
        )

    def _compute(self, predictions: list[dict], references: list[dict] | None = None) -> dict[str, Any]:
        predictions = first_per_image(predictions, "predictions")
        if self.ground_truth is not None:
            return self.evaluate_predictions(predictions)
        references = first_per_image(references, "references")
        labels = {label for r in references for label in r["category"]} | {
            label for p in predictions for label in p["labels"]
        }
        category_ids = sorted(self.id2label) if self.id2label is not None else sorted(labels)
        names = [self.id2label[c] if self.id2label is not None else str(c) for c in category_ids]
        coco_gt = load_coco_ground_truth(ground_truth_from_references(references, category_ids, names))
        image_ids = sorted(coco_gt.imgs)
        unknown = sorted({p["image_id"] for p in predictions} - set(image_ids))
        if unknown:
            raise ValueError(f"predictions for image ids without references: {unknown[:10]}")
        detections = DetectionArrays.from_predictions(predictions, {c: c for c in category_ids})
        return evaluate_detection_arrays(GroundTruthArrays(coco_gt), detections, image_ids, names, self.backend)

    def evaluate_predictions(
        self, predictions: Iterable[Mapping[str, Any]] | DetectionArrays, image_ids: Iterable[int] | None = None
    ) -> dict[str, Any]:
        """The results of [`compute`] against `ground_truth` without the `evaluate` machinery (no Arrow round trip of
        the predictions): `predictions` in the metric's format (one per image, the first of repeated image ids is
        used by `compute`, here all are), or `DetectionArrays` with `image_ids` (the images evaluated)."""
        if self.ground_truth is None:
            raise ValueError("evaluate_predictions needs the metric's ground_truth")
        coco_gt = self.ground_truth
        category_ids = sorted(coco_gt.getCatIds())
        names = [coco_gt.cats[category_id]["name"] for category_id in category_ids]
        if isinstance(predictions, DetectionArrays):
            if image_ids is None:
                raise ValueError("pass the evaluated image_ids with DetectionArrays")
        else:
            predictions = list(predictions)
            if image_ids is None:
                image_ids = [int(p["image_id"]) for p in predictions]
            predictions = DetectionArrays.from_predictions(predictions, dict(enumerate(category_ids)))
        image_ids = sorted({int(i) for i in image_ids})
        unknown = [image_id for image_id in image_ids if image_id not in coco_gt.imgs]
        if unknown:
            raise ValueError(f"predictions for image ids not in the ground truth: {unknown[:10]}")
        missing = np.setdiff1d(predictions.image_ids, np.asarray(image_ids, dtype=np.int64))
        if len(missing):
            raise ValueError(f"detections for image ids not among image_ids: {missing[:10].tolist()}")
        ground_truth = GroundTruthArrays.from_coco(coco_gt)
        return evaluate_detection_arrays(ground_truth, predictions, image_ids, names, self.backend)
