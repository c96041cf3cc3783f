"""hf_kd: knowledge distillation (CrossKD, BCKD) for GFL dense object detectors with timm backbones."""

from .convert.mmdet import convert_mmdet_checkpoint
from .data import (
    CocoDetectionSource,
    DetectionCategories,
    DetectionCollator,
    DetectionDataError,
    DetectionTransform,
    export_coco_to_parquet,
    format_detection_dataset,
    get_id2label,
    load_coco_detection,
    load_detection_dataset,
    read_coco_detection,
)
from .distill import (
    DistillationArguments,
    DistillationConfig,
    DistillationTrainer,
    GFLDistillationLoss,
    coco_compute_metrics,
)
from .metrics import CocoDetectionMAP, build_coco_ground_truth, coco_reference
from .models.gfl import (
    GFLConfig,
    GFLForObjectDetection,
    GFLImageProcessor,
    GFLObjectDetectionOutput,
    GFLPreTrainedModel,
)

__version__ = "0.1.0"

__all__ = [
    "CocoDetectionMAP",
    "CocoDetectionSource",
    "DetectionCategories",
    "DetectionCollator",
    "DetectionDataError",
    "DetectionTransform",
    "DistillationArguments",
    "DistillationConfig",
    "DistillationTrainer",
    "GFLConfig",
    "GFLDistillationLoss",
    "GFLForObjectDetection",
    "GFLImageProcessor",
    "GFLObjectDetectionOutput",
    "GFLPreTrainedModel",
    "build_coco_ground_truth",
    "coco_compute_metrics",
    "coco_reference",
    "convert_mmdet_checkpoint",
    "export_coco_to_parquet",
    "format_detection_dataset",
    "get_id2label",
    "load_coco_detection",
    "load_detection_dataset",
    "read_coco_detection",
]
