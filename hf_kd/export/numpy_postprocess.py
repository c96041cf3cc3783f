"""Test-time post-processing of an exported dense detector's raw outputs in numpy: the detections of the image
processor's `post_process_object_detection` (MMDetection's score threshold and per-level top-k on (prior, class)
pairs, clipping, centre-ness weighting, class-aware NMS with MMCV's coordinate offsets, the detection cap, the final
threshold and the rescaling to the original images), computed in the same float32 order of operations.

This file needs numpy only (it imports neither torch nor the rest of `hf_kd`): for a deployment without torch, copy
it next to the ONNX file. Exactly tied scores are taken in index order (the order of PyTorch's top-k among equal
scores is unspecified); there the two may keep different ones of equal pairs.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence

import numpy as np

# Keys of the ONNX file's metadata (`custom_metadata_map` in onnxruntime) that `export_onnx` writes.
POST_PROCESSING_KEY = "hf_kd.post_processing"
ID2LABEL_KEY = "hf_kd.id2label"
MODEL_TYPE_KEY = "hf_kd.model_type"


def sigmoid(values: np.ndarray) -> np.ndarray:
    """The logistic function in float32."""
    values = np.asarray(values, dtype=np.float32)
    with np.errstate(over="ignore"):  # exp(-x) overflows to inf for very negative x; 1 / inf is the right 0
        return np.float32(1) / (np.float32(1) + np.exp(-values))


def nms(boxes: np.ndarray, scores: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Indices of the `(N, 4)` boxes that greedy NMS keeps, best first: torchvision's `nms` (stable descending score
    order; a kept box suppresses the later boxes whose IoU with it is above `iou_threshold`)."""
    order = np.argsort(-scores, kind="stable")
    x1, y1, x2, y2 = boxes.T
    areas = (x2 - x1) * (y2 - y1)
    suppressed = np.zeros(len(boxes), dtype=bool)
    keep = []
    for position, index in enumerate(order):
        if suppressed[index]:
            continue
        keep.append(index)
        later = order[position + 1 :]
        width = np.maximum(np.minimum(x2[index], x2[later]) - np.maximum(x1[index], x1[later]), 0)
        height = np.maximum(np.minimum(y2[index], y2[later]) - np.maximum(y1[index], y1[later]), 0)
        overlap = width * height
        iou = overlap / (areas[index] + areas[later] - overlap)
        suppressed[later[iou.astype(np.float64) > iou_threshold]] = True  # torchvision compares in double
    return np.asarray(keep, dtype=np.int64)


def batched_nms(boxes: np.ndarray, scores: np.ndarray, labels: np.ndarray, iou_threshold: float) -> np.ndarray:
    """Class-aware NMS (boxes of different labels shifted apart, as MMCV's `batched_nms`); kept indices, best first."""
    if len(boxes) == 0:
        return np.empty(0, dtype=np.int64)
    offsets = labels.astype(np.float32) * (boxes.max() + np.float32(1))
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the `k` largest values of each row of `scores` `(B, N)`, best first (equal values by index)."""
    if k < scores.shape[1]:
        candidates = np.sort(np.argpartition(-scores, k - 1, axis=1)[:, :k], axis=1)
    else:
        candidates = np.broadcast_to(np.arange(scores.shape[1]), scores.shape)
    order = np.argsort(-np.take_along_axis(scores, candidates, axis=1), axis=1, kind="stable")
    return np.take_along_axis(candidates, order, axis=1)


def detect(
    logits: np.ndarray,
    pred_boxes: np.ndarray,
    image_sizes: np.ndarray,
    level_sizes: Sequence[int],
    centerness_logits: np.ndarray | None = None,
    score_threshold: float = 0.05,
    pre_nms_topk: int = 1000,
    nms_iou_threshold: float | None = 0.6,
    max_detections: int | None = 100,
) -> list[dict[str, np.ndarray]]:
    """Detections per image in the input's pixel frame: `hf_kd.models.detection.postprocess.detect` in numpy.

    Per level, the (prior, class) pairs whose class score exceeds `score_threshold`, at most `pre_nms_topk` of them;
    boxes clipped to the image; scores multiplied by the sigmoid of the centre-ness when given; empty boxes dropped;
    class-aware NMS and then the best `max_detections` (both skipped when `nms_iou_threshold` is None). Returns dicts
    with `boxes` (x1, y1, x2, y2) float32, `scores` float32 and `labels` int64.
    """
    scores = sigmoid(logits)
    batch_size, _, num_classes = scores.shape
    top_scores, top_indices, start = [], [], 0
    for size in level_sizes:
        level_scores = scores[:, start : start + size].reshape(batch_size, -1)
        level_scores = np.where(level_scores <= score_threshold, np.float32(-1), level_scores)
        indices = top_k(level_scores, min(pre_nms_topk, level_scores.shape[1]))
        top_scores.append(np.take_along_axis(level_scores, indices, axis=1))
        top_indices.append(indices + start * num_classes)
        start += size
    top_scores, top_indices = np.concatenate(top_scores, axis=1), np.concatenate(top_indices, axis=1)
    prior_indices = top_indices // num_classes
    boxes = np.take_along_axis(np.asarray(pred_boxes, dtype=np.float32), prior_indices[..., None], axis=1)
    limits = np.tile(np.asarray(image_sizes)[:, ::-1], 2)[:, None].astype(np.float32)  # (B, 1, 4): w, h, w, h
    boxes = np.minimum(np.maximum(boxes, 0), limits)
    keep = (top_scores > score_threshold) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    if centerness_logits is not None:
        top_scores = top_scores * np.take_along_axis(sigmoid(centerness_logits), prior_indices, axis=1)

    results = []
    for image in range(batch_size):
        (kept,) = np.nonzero(keep[image])
        image_boxes, image_scores = boxes[image, kept], top_scores[image, kept]
        image_labels = top_indices[image, kept] % num_classes
        if nms_iou_threshold is not None:
            order = batched_nms(image_boxes, image_scores, image_labels, nms_iou_threshold)[:max_detections]
            image_boxes, image_scores, image_labels = image_boxes[order], image_scores[order], image_labels[order]
        results.append({"boxes": image_boxes, "scores": image_scores, "labels": image_labels})
    return results


class DetectionPostProcessor:
    """The image processor's `post_process_object_detection` for the outputs of an exported detector, in numpy, with
    the processor's settings (read them from the ONNX file with [`from_metadata`]).

    Args:
        candidate_threshold: the class score a (prior, class) pair must exceed to be a candidate for NMS, unless the
            caller's `threshold` is lower.
        pre_nms_topk: (prior, class) pairs kept per pyramid level before NMS.
        nms_iou_threshold: IoU above which class-aware NMS suppresses a box.
        max_detections: detections kept per image.
        id2label: class names by label index.
    """

    def __init__(
        self,
        candidate_threshold: float = 0.05,
        pre_nms_topk: int = 1000,
        nms_iou_threshold: float = 0.6,
        max_detections: int = 100,
        id2label: Mapping[int, str] | None = None,
    ):
        self.candidate_threshold = candidate_threshold
        self.pre_nms_topk = pre_nms_topk
        self.nms_iou_threshold = nms_iou_threshold
        self.max_detections = max_detections
        self.id2label = dict(id2label or {})

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, str]) -> DetectionPostProcessor:
        """The post-processor of an exported detector from its ONNX metadata, e.g. onnxruntime's
        `session.get_modelmeta().custom_metadata_map`."""
        id2label = {int(index): name for index, name in json.loads(metadata.get(ID2LABEL_KEY, "{}")).items()}
        return cls(**json.loads(metadata[POST_PROCESSING_KEY]), id2label=id2label)

    def post_process_object_detection(
        self,
        outputs: Mapping[str, np.ndarray],
        threshold: float = 0.5,
        target_sizes: np.ndarray | Sequence[tuple[int, int]] | None = None,
        candidate_threshold: float | None = None,
        pre_nms_topk: int | None = None,
        nms_iou_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> list[dict[str, np.ndarray]]:
        """Detections per image whose score exceeds `threshold`: `scores`, `labels` and `boxes` (absolute x1, y1, x2,
        y2), best first, in the frame of `target_sizes` ((height, width) of the original images) or else of the model
        input. `outputs` maps the ONNX graph's output names to their values (`logits`, `pred_boxes`, `image_sizes`,
        `level_sizes` and, for FCOS and ATSS, `centerness_logits`); the other arguments are those of the image
        processor's `post_process_object_detection` (defaults: this post-processor's settings)."""
        logits, image_sizes = outputs["logits"], np.asarray(outputs["image_sizes"])
        if target_sizes is not None and len(target_sizes) != len(logits):
            raise ValueError(f"Got {len(target_sizes)} target sizes for {len(logits)} images.")
        if candidate_threshold is None:
            candidate_threshold = min(threshold, self.candidate_threshold)
        results = detect(
            logits,
            outputs["pred_boxes"],
            image_sizes,
            [int(size) for size in outputs["level_sizes"]],
            outputs.get("centerness_logits"),
            score_threshold=candidate_threshold,
            pre_nms_topk=pre_nms_topk if pre_nms_topk is not None else self.pre_nms_topk,
            nms_iou_threshold=nms_iou_threshold if nms_iou_threshold is not None else self.nms_iou_threshold,
            max_detections=max_detections if max_detections is not None else self.max_detections,
        )
        scales = [None] * len(results)
        if target_sizes is not None:
            scales = np.asarray(target_sizes, dtype=np.float32) / image_sizes.astype(np.float32)
            scales = np.tile(scales[:, ::-1], 2)  # (B, 4): x, y, x, y
        for result, scale in zip(results, scales):
            keep = result["scores"] > threshold
            result.update({key: value[keep] for key, value in result.items()})
            if scale is not None:
                result["boxes"] = result["boxes"] * scale
        return results


__all__ = ["DetectionPostProcessor", "batched_nms", "detect", "nms", "sigmoid", "top_k"]
