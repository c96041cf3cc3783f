"""Evaluation metrics: COCO box mAP.

Modules: `coco_map` (the `evaluate.Metric`), `evaluation` (COCOeval of detection arrays, by pycocotools or numpy),
`numpy_cocoeval` (the numpy port of COCOeval), `ground_truth` (COCO ground truth and its arrays), `detections`
(predictions as COCO results), `compute_metrics` (the Trainer's detections and its COCO `compute_metrics`).
"""

from .coco_map import CocoDetectionMAP
from .compute_metrics import coco_compute_metrics, pack_detections, unpack_detections
from .detections import DetectionArrays, to_coco_detections
from .evaluation import COCO_STAT_NAMES, evaluate_detection_arrays
from .ground_truth import GroundTruthArrays, build_coco_ground_truth, coco_reference, load_coco_ground_truth

__all__ = [
    "COCO_STAT_NAMES",
    "CocoDetectionMAP",
    "DetectionArrays",
    "GroundTruthArrays",
    "build_coco_ground_truth",
    "coco_compute_metrics",
    "coco_reference",
    "evaluate_detection_arrays",
    "load_coco_ground_truth",
    "pack_detections",
    "to_coco_detections",
    "unpack_detections",
]
