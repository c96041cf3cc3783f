"""Knowledge distillation of GFL detectors: losses, arguments and the Trainer."""

from .arguments import DistillationArguments
from .losses import KD_METHODS, DistillationConfig, GFLDistillationLoss
from .trainer import DistillationTrainer, coco_compute_metrics, pack_detections

__all__ = [
    "KD_METHODS",
    "DistillationArguments",
    "DistillationConfig",
    "DistillationTrainer",
    "GFLDistillationLoss",
    "coco_compute_metrics",
    "pack_detections",
]
