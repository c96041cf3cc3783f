"""hf_kd: knowledge distillation (CrossKD, BCKD, PKD) for dense object detectors with timm backbones.

`import hf_kd` registers the detectors with the transformers Auto classes and imports torch, transformers and timm
only; the data, metrics, distillation, conversion and export tools (datasets, evaluate, pandas, the Trainer) are
imported on first use of one of their names.
"""

import importlib

from .models.detection import (
    ATSSConfig,
    ATSSForObjectDetection,
    ATSSImageProcessor,
    ATSSPreTrainedModel,
    DenseDetectionImageProcessor,
    DenseDetectionOutput,
    DenseDetectorConfig,
    DenseDetectorPreTrainedModel,
    FCOSConfig,
    FCOSForObjectDetection,
    FCOSImageProcessor,
    FCOSPreTrainedModel,
    GFLConfig,
    GFLForObjectDetection,
    GFLImageProcessor,
    GFLPreTrainedModel,
    RetinaNetConfig,
    RetinaNetForObjectDetection,
    RetinaNetImageProcessor,
    RetinaNetPreTrainedModel,
)

__version__ = "0.2.0"

# Public name -> the submodule that defines it, imported on first access.
_LAZY_NAMES = {
    "convert_mmdet_checkpoint": ".convert.mmdet",
    **dict.fromkeys(
        (
            "CocoDetectionSource",
            "DetectionCategories",
            "DetectionCollator",
            "DetectionDataError",
            "DetectionTransform",
            "export_coco_to_parquet",
            "format_detection_dataset",
            "get_id2label",
            "load_coco_detection",
            "load_detection_dataset",
            "read_coco_detection",
        ),
        ".data",
    ),
    **dict.fromkeys(
        (
            "DetectionDistiller",
            "DistillationArguments",
            "DistillationConfig",
            "DistillationOutput",
            "DistillationTrainer",
            "coco_compute_metrics",
        ),
        ".distill",
    ),
    **dict.fromkeys(("CocoDetectionMAP", "build_coco_ground_truth", "coco_reference"), ".metrics"),
    **dict.fromkeys(("DetectionPostProcessor", "export_onnx"), ".export"),
}


def __getattr__(name: str):
    if name not in _LAZY_NAMES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY_NAMES[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY_NAMES))


__all__ = [
    "ATSSConfig",
    "ATSSForObjectDetection",
    "ATSSImageProcessor",
    "ATSSPreTrainedModel",
    "DenseDetectionImageProcessor",
    "DenseDetectionOutput",
    "DenseDetectorConfig",
    "DenseDetectorPreTrainedModel",
    "FCOSConfig",
    "FCOSForObjectDetection",
    "FCOSImageProcessor",
    "FCOSPreTrainedModel",
    "GFLConfig",
    "GFLForObjectDetection",
    "GFLImageProcessor",
    "GFLPreTrainedModel",
    "RetinaNetConfig",
    "RetinaNetForObjectDetection",
    "RetinaNetImageProcessor",
    "RetinaNetPreTrainedModel",
    *_LAZY_NAMES,
]
