"""Knowledge distillation of dense detectors: the design space and presets, the losses, the distiller module, the
arguments and the Trainer."""

from ..metrics import coco_compute_metrics
from .arguments import DistillationArguments
from .checkpoints import find_resumable_checkpoint
from .config import KD_METHODS, DistillationConfig
from .distiller import DetectionDistiller, DistillationOutput
from .trainer import DistillationTrainer

__all__ = [
    "KD_METHODS",
    "DetectionDistiller",
    "DistillationArguments",
    "DistillationConfig",
    "DistillationOutput",
    "DistillationTrainer",
    "coco_compute_metrics",
    "find_resumable_checkpoint",
]
