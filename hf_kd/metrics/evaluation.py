"""COCOeval (bbox) of detections held as arrays: the 12 named COCO numbers and per-class AP and AR@100, computed by
pycocotools' `COCOeval` on result dicts built directly, or by its numpy port ([`numpy_cocoeval`])."""

from __future__ import annotations

import contextlib
import io
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping
from typing import Any

import numpy as np
from pycocotools.cocoeval import COCOeval, Params

from .detections import DetectionArrays
from .ground_truth import GroundTruthArrays
from .numpy_cocoeval import numpy_cocoeval

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

BACKENDS = ("pycocotools", "numpy")


def evaluate_detection_arrays(
    ground_truth: GroundTruthArrays,
    detections: DetectionArrays,
    image_ids: Iterable[int],
    class_names: list[str],
    backend: str = "numpy",
) -> dict[str, Any]:
    """COCOeval (bbox) of `detections` on `image_ids`: the 12 named stats and per-class AP/AR@100.

    `backend="pycocotools"` runs pycocotools' `COCOeval.evaluate/accumulate/summarize` on result dicts built directly
    (no `loadRes`, no `getAnnIds` scans); `"numpy"` runs [`numpy_cocoeval`], a vectorized port of the same two
    steps, then pycocotools' `summarize`. Both give pycocotools' numbers exactly (see the tests).
    """
    image_ids = np.unique(np.asarray(list(image_ids), dtype=np.int64))
    if backend == "pycocotools":
        coco_eval = _pycocotools_cocoeval(ground_truth, detections, image_ids)
        return _named_results(coco_eval.stats, coco_eval.eval, class_names)
    if backend != "numpy":
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    params = Params(iouType="bbox")
    params.imgIds = image_ids.tolist()
    params.catIds = ground_truth.cat_ids.tolist()
    evaluation = numpy_cocoeval(ground_truth, detections, image_ids, params)
    coco_eval = COCOeval(iouType="bbox")
    coco_eval.params = params
    coco_eval.eval = evaluation
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.summarize()
    return _named_results(coco_eval.stats, evaluation, class_names)


def _named_results(stats: np.ndarray, evaluation: Mapping[str, Any], class_names: list[str]) -> dict[str, Any]:
    results: dict[str, Any] = {name: float(value) for name, value in zip(COCO_STAT_NAMES, stats)}
    precision = evaluation["precision"][:, :, :, 0, -1]  # (iou, recall, class) at area "all", 100 detections
    recall = evaluation["recall"][:, :, 0, -1]  # (iou, class)
    results["map_per_class"] = {name: _mean_valid(precision[:, :, k]) for k, name in enumerate(class_names)}
    results["mar_100_per_class"] = {name: _mean_valid(recall[:, k]) for k, name in enumerate(class_names)}
    return results


class _PreparedCOCOeval(COCOeval):
    """`COCOeval` whose `_prepare` takes the per-(image, category) ground truth and results as given."""

    def __init__(self, gts: dict, dts: dict, image_ids: list[int], cat_ids: list[int]):
        super().__init__(iouType="bbox")
        self.params.imgIds = image_ids
        self.params.catIds = cat_ids
        self._given = (gts, dts)

    def _prepare(self):
        gts, dts = self._given
        for pair_gts in gts.values():
            for gt in pair_gts:  # as COCOeval._prepare sets it
                gt["ignore"] = "iscrowd" in gt and gt["iscrowd"]
        self._gts = defaultdict(list, gts)
        self._dts = defaultdict(list, dts)
        self.evalImgs = defaultdict(list)
        self.eval = {}


def _pycocotools_cocoeval(
    ground_truth: GroundTruthArrays, detections: DetectionArrays, image_ids: np.ndarray
) -> COCOeval:
    """pycocotools' COCOeval, run on result dicts built directly, grouped as `COCOeval._prepare` groups them."""
    coco = ground_truth.coco
    cat_ids = ground_truth.cat_ids.tolist()
    known_cats = set(cat_ids)
    gts = defaultdict(list)
    for image_id in image_ids.tolist():
        for annotation in coco.imgToAnns.get(image_id, []):
            if annotation["category_id"] in known_cats:
                gts[image_id, annotation["category_id"]].append(annotation)
    dts = defaultdict(list)
    keep = np.isin(detections.image_ids, image_ids) & np.isin(detections.category_ids, ground_truth.cat_ids)
    boxes = detections.boxes.tolist()
    for index, image_id, category_id, score in zip(
        np.flatnonzero(keep).tolist(),
        detections.image_ids[keep].tolist(),
        detections.category_ids[keep].tolist(),
        detections.scores[keep].tolist(),
    ):
        box = boxes[index]
        dts[image_id, category_id].append(
            {
                "image_id": image_id,
                "category_id": category_id,
                "bbox": box,
                "score": score,
                "area": box[2] * box[3],
                "id": index + 1,
                "iscrowd": 0,
            }
        )
    coco_eval = _PreparedCOCOeval(dict(gts), dict(dts), image_ids.tolist(), cat_ids)
    with contextlib.redirect_stdout(io.StringIO()) as log:
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    logger.info("COCOeval on %d images:\n%s", len(image_ids), log.getvalue())
    return coco_eval


def _mean_valid(values: np.ndarray) -> float:
    valid = values[values > -1]
    return float(np.mean(valid)) if valid.size else -1.0
