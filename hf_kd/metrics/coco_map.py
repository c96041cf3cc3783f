"""COCO box mAP as an `evaluate.Metric`, computed by pycocotools' `COCOeval`."""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

import datasets
import evaluate
import numpy as np
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

logger = logging.getLogger(__name__)

COCO_STAT_NAMES = (
    "map",
    "map_50",
    "map_75",
    "map_small",
    "map_medium",
    "map_large",
    "mar_1",
    "mar_10",
    "mar_100",
    "mar_small",
    "mar_medium",
    "mar_large",
)

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
        the image ids passed.
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
        **kwargs: `evaluate.Metric` arguments, e.g. `keep_in_memory=True`.

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
        **kwargs: Any,
    ):
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
        predictions = _first_per_image(predictions, "predictions")
        if self.ground_truth is not None:
            coco_gt = self.ground_truth
            category_ids = sorted(coco_gt.getCatIds())
            names = [coco_gt.cats[category_id]["name"] for category_id in category_ids]
            label_to_category_id = dict(enumerate(category_ids))
            image_ids = sorted({p["image_id"] for p in predictions})
            unknown = [image_id for image_id in image_ids if image_id not in coco_gt.imgs]
            if unknown:
                raise ValueError(f"predictions for image ids not in the ground truth: {unknown[:10]}")
        else:
            references = _first_per_image(references, "references")
            labels = {label for r in references for label in r["category"]} | {
                label for p in predictions for label in p["labels"]
            }
            category_ids = sorted(self.id2label) if self.id2label is not None else sorted(labels)
            names = [self.id2label[c] if self.id2label is not None else str(c) for c in category_ids]
            coco_gt = load_coco_ground_truth(_ground_truth_from_references(references, category_ids, names))
            label_to_category_id = {c: c for c in category_ids}
            image_ids = sorted(coco_gt.imgs)
            unknown = sorted({p["image_id"] for p in predictions} - set(image_ids))
            if unknown:
                raise ValueError(f"predictions for image ids without references: {unknown[:10]}")
        detections = to_coco_detections(predictions, label_to_category_id)
        return evaluate_coco_detections(coco_gt, detections, image_ids, names)


def evaluate_coco_detections(
    coco_gt: COCO, detections: list[dict[str, Any]], image_ids: list[int], class_names: list[str]
) -> dict[str, Any]:
    """Runs COCOeval (bbox) on `image_ids` for COCO-format `detections`; returns the named stats and per-class AP/AR.

    `class_names` are the names of `coco_gt`'s categories in order of category id.
    """
    with contextlib.redirect_stdout(io.StringIO()) as log:
        coco_dt = coco_gt.loadRes(detections) if detections else _empty_results(coco_gt)
        coco_eval = COCOeval(coco_gt, coco_dt, iouType="bbox")
        coco_eval.params.imgIds = image_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    logger.info("COCOeval on %d images, %d detections:\n%s", len(image_ids), len(detections), log.getvalue())
    results: dict[str, Any] = {name: float(value) for name, value in zip(COCO_STAT_NAMES, coco_eval.stats)}
    precision = coco_eval.eval["precision"][:, :, :, 0, -1]  # (iou, recall, class) at area "all", 100 detections
    recall = coco_eval.eval["recall"][:, :, 0, -1]  # (iou, class)
    results["map_per_class"] = {name: _mean_valid(precision[:, :, k]) for k, name in enumerate(class_names)}
    results["mar_100_per_class"] = {name: _mean_valid(recall[:, k]) for k, name in enumerate(class_names)}
    return results


def load_coco_ground_truth(ground_truth: str | os.PathLike | Mapping[str, Any] | COCO) -> COCO:
    """A pycocotools `COCO` from a json path or dict (as `COCO(path)` reads it; a missing `area` becomes the box
    area, which pycocotools needs)."""
    if isinstance(ground_truth, COCO):
        return ground_truth
    with contextlib.redirect_stdout(io.StringIO()):
        if isinstance(ground_truth, Mapping):
            coco = COCO()
            coco.dataset = dict(ground_truth)
        else:
            coco = COCO(os.fspath(ground_truth))
        annotations = coco.dataset.get("annotations", [])
        if any("area" not in a for a in annotations):
            coco.dataset["annotations"] = [
                a if "area" in a else {**a, "area": a["bbox"][2] * a["bbox"][3]} for a in annotations
            ]
        coco.createIndex()
    return coco


def coco_reference(example: Mapping[str, Any]) -> dict[str, Any]:
    """The metric reference of one example in the data sources' layout (`image_id` + `objects`)."""
    objects = example["objects"]
    if isinstance(objects, Mapping):
        objects = [dict(zip(objects, values)) for values in zip(*objects.values())]
    return {
        "image_id": int(example["image_id"]),
        "bbox": [list(o["bbox"]) for o in objects],
        "category": [int(o["category"]) for o in objects],
        "area": [float(o["area"]) for o in objects],
        "iscrowd": [int(o["iscrowd"]) for o in objects],
    }


def build_coco_ground_truth(examples: Iterable[Mapping[str, Any]], id2label: Mapping[int, str]) -> dict[str, Any]:
    """A COCO ground-truth dict (category id = label) from examples in the data sources' layout.

    Pass a dataset without its `image` column (e.g. `dataset.remove_columns("image")`) to avoid decoding images.
    """
    references = [coco_reference(example) for example in examples]
    category_ids = sorted(int(k) for k in id2label)
    return _ground_truth_from_references(
        _first_per_image(references, "examples"), category_ids, [id2label[c] for c in category_ids]
    )


def _ground_truth_from_references(
    references: list[dict[str, Any]], category_ids: list[int], names: list[str]
) -> dict[str, Any]:
    annotations = []
    known = set(category_ids)
    for reference in references:
        for bbox, category, area, iscrowd in zip(
            reference["bbox"], reference["category"], reference["area"], reference["iscrowd"]
        ):
            if category not in known:
                raise ValueError(
                    f"image id {reference['image_id']}: reference category {category} is not a known class"
                )
            annotations.append(
                {
                    "id": len(annotations) + 1,  # COCOeval needs non-zero annotation ids
                    "image_id": reference["image_id"],
                    "category_id": int(category),
                    "bbox": [float(v) for v in bbox],
                    "area": float(area),
                    "iscrowd": int(iscrowd),
                }
            )
    return {
        "images": [{"id": reference["image_id"]} for reference in references],
        "annotations": annotations,
        "categories": [{"id": c, "name": name} for c, name in zip(category_ids, names)],
    }


def _first_per_image(entries: list[dict[str, Any]], what: str) -> list[dict[str, Any]]:
    seen: dict[int, dict[str, Any]] = {}
    for entry in entries:
        seen.setdefault(int(entry["image_id"]), entry)
    if len(seen) < len(entries):
        logger.warning(
            "%s: %d entries repeat an image id (e.g. padded distributed evaluation); kept the first of each, "
            "%d images",
            what,
            len(entries) - len(seen),
            len(seen),
        )
    return list(seen.values())


def to_coco_detections(
    predictions: Iterable[Mapping[str, Any]], label_to_category_id: Mapping[int, int]
) -> list[dict[str, Any]]:
    """COCO results (`image_id`, `category_id`, `bbox` xywh, `score`) from per-image predictions in this metric's
    format, with labels mapped to the dataset's category ids (e.g. `DetectionCategories.label_to_category_id`)."""
    detections = []
    for prediction in predictions:
        image_id = int(prediction["image_id"])
        if not len(prediction["boxes"]) == len(prediction["scores"]) == len(prediction["labels"]):
            raise ValueError(f"image id {image_id}: boxes, scores and labels must have the same length")
        for (x1, y1, x2, y2), score, label in zip(prediction["boxes"], prediction["scores"], prediction["labels"]):
            label = int(label)
            if label not in label_to_category_id:
                raise ValueError(f"image id {image_id}: predicted label {label} is not a known class")
            detections.append(
                {
                    "image_id": image_id,
                    "category_id": label_to_category_id[label],
                    "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                    "score": float(score),
                }
            )
    return detections


def _empty_results(coco_gt: COCO) -> COCO:
    # COCO.loadRes fails on an empty list; an empty result set evaluates to zero recall wherever ground truth exists.
    results = COCO()
    results.dataset = {
        "images": list(coco_gt.dataset["images"]),
        "categories": copy.deepcopy(coco_gt.dataset.get("categories", [])),
        "annotations": [],
    }
    results.createIndex()
    return results


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0
