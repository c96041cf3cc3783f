"""Evaluation metrics."""

from .coco_map import (
    COCO_STAT_NAMES,
    CocoDetectionMAP,
    DetectionArrays,
    GroundTruthArrays,
    build_coco_ground_truth,
    coco_reference,
    evaluate_coco_detections,
    evaluate_detection_arrays,
    load_coco_ground_truth,
    to_coco_detections,
)

__all__ = [
    "COCO_STAT_NAMES",
    "CocoDetectionMAP",
    "DetectionArrays",
    "GroundTruthArrays",
    "build_coco_ground_truth",
    "coco_reference",
    "evaluate_coco_detections",
    "evaluate_detection_arrays",
    "load_coco_ground_truth",
    "to_coco_detections",
]
