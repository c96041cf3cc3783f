"""What the Trainer's evaluation gathers: per-image detections packed into fixed-size tensors on the device,
unpacked into arrays after gathering, and scored with COCO mAP by [`coco_compute_metrics`]."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import EvalPrediction

from .coco_map import CocoDetectionMAP
from .detections import DetectionArrays
from .evaluation import COCO_STAT_NAMES

logger = logging.getLogger(__name__)


def pack_detections(detections: list[dict[str, torch.Tensor]], max_detections: int) -> torch.Tensor:
    """Per-image detections (`boxes`, `scores`, `labels`, best first) as one `(B, max_detections, 6)` tensor of
    `x1, y1, x2, y2, score, label`; empty rows are -1 throughout (a detection's label is never negative), and
    non-finite scores and boxes are kept as they are, for [`coco_compute_metrics`] to count."""
    device = detections[0]["scores"].device if detections else None
    packed = torch.full((len(detections), max_detections, 6), -1.0, device=device)
    for index, image in enumerate(detections):
        count = min(len(image["scores"]), max_detections)
        packed[index, :count, :4] = image["boxes"][:count]
        packed[index, :count, 4] = image["scores"][:count]
        packed[index, :count, 5] = image["labels"][:count].float()
    return packed


def unpack_detections(predictions: Any, label_ids: Any) -> tuple[np.ndarray, np.ndarray]:
    """Image ids `(n,)` and packed detections `(n, max_detections, 6)` from the gathered evaluation outputs (a list
    of batches, or concatenated), the first entry of each repeated image id kept."""
    if isinstance(predictions, np.ndarray) and isinstance(label_ids, np.ndarray):
        predictions, label_ids = [predictions], [label_ids]
    packed = [np.asarray(batch, dtype=np.float64) for batch in predictions]
    packed = [batch.reshape(-1, batch.shape[-2], 6) for batch in packed]
    image_ids = [np.asarray(batch).reshape(-1).astype(np.int64) for batch in label_ids]
    width = max((batch.shape[1] for batch in packed), default=0)
    packed = [np.pad(b, ((0, 0), (0, width - b.shape[1]), (0, 0)), constant_values=-1.0) for b in packed]
    packed = np.concatenate(packed) if packed else np.zeros((0, 0, 6))
    image_ids = np.concatenate(image_ids) if image_ids else np.zeros(0, np.int64)
    _, first = np.unique(image_ids, return_index=True)
    if len(first) < len(image_ids):
        logger.warning(
            "%d evaluation entries repeat an image id (e.g. padded distributed evaluation); kept the first of each, "
            "%d images",
            len(image_ids) - len(first),
            len(first),
        )
    first = np.sort(first)
    return image_ids[first], packed[first]


def coco_compute_metrics(
    ground_truth: str | os.PathLike | Mapping[str, Any],
    id2label: Mapping[int, str] | None = None,
    backend: str = "auto",
) -> Callable[[EvalPrediction], dict[str, float]]:
    """A `compute_metrics` for `DistillationTrainer`: the 12 COCO numbers (and per-class AP) of the gathered
    detections against `ground_truth` (a COCO json path or dict).

    The ground truth is loaded once per run, by the main process only, at the first evaluation (a path is checked
    here); the main process computes the metrics (`CocoDetectionMAP.evaluate_predictions` with `backend`) and
    broadcasts them to the other processes, which the Trainer also calls after gathering, so every process returns
    the same numbers while only one holds the ground truth and runs COCOeval. The first entry of a repeated image id
    (padding of the last distributed batch) is used. Detections with a non-finite score or box are left out, logged
    and counted in `num_nonfinite_detections` (`eval_num_nonfinite_detections` in the Trainer's metrics).
    """
    if isinstance(ground_truth, (str, os.PathLike)) and not os.path.isfile(ground_truth):
        raise FileNotFoundError(f"COCO ground truth not found: {ground_truth}")
    cache: dict[str, CocoDetectionMAP] = {}

    def evaluate_on_main_process(prediction: EvalPrediction) -> dict[str, float]:
        if "metric" not in cache:
            cache["metric"] = CocoDetectionMAP(
                ground_truth=ground_truth, id2label=id2label, backend=backend, keep_in_memory=True
            )
        metric = cache["metric"]
        image_ids, packed = unpack_detections(prediction.predictions, prediction.label_ids)
        keep = packed[:, :, 5] >= 0
        nonfinite = keep & ~np.isfinite(packed[:, :, :5]).all(axis=2)
        if nonfinite.any():
            logger.warning(
                "%d detections with a non-finite score or box (image ids %s) are left out of the COCO metrics "
                "(num_nonfinite_detections)",
                int(nonfinite.sum()),
                image_ids[nonfinite.any(axis=1)][:10].tolist(),
            )
        keep &= ~nonfinite
        rows = packed[keep]
        category_ids = sorted(metric.ground_truth.getCatIds())
        detections = DetectionArrays.from_xyxy(
            np.repeat(image_ids, keep.sum(axis=1)),
            rows[:, :4],
            rows[:, 4],
            rows[:, 5].astype(np.int64),
            dict(enumerate(category_ids)),
        )
        results = metric.evaluate_predictions(detections, image_ids=image_ids.tolist())
        metrics = {name: results[name] for name in COCO_STAT_NAMES}
        metrics.update({f"map_class_{name}": value for name, value in results["map_per_class"].items()})
        metrics["num_nonfinite_detections"] = int(nonfinite.sum())
        return metrics

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        state = PartialState()
        metrics, error = None, None
        if state.is_main_process:
            try:
                metrics = evaluate_on_main_process(prediction)
            except Exception as exception:  # re-raised below, after the other processes have been told
                error = exception
        if state.num_processes > 1:
            message = None if error is None else f"{type(error).__name__}: {error}"
            metrics, message = broadcast_object_list([metrics, message], from_process=0)
            if message is not None and error is None:
                raise RuntimeError(f"COCO evaluation failed on the main process: {message}")
        if error is not None:
            raise error
        return metrics

    return compute_metrics


__all__ = ["coco_compute_metrics", "pack_detections", "unpack_detections"]
