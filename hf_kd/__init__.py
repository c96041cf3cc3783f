"""hf_kd: knowledge distillation (CrossKD, BCKD) for GFL dense object detectors with timm backbones."""

from .convert.mmdet import convert_mmdet_checkpoint
from .models.gfl import (
    GFLConfig,
    GFLForObjectDetection,
    GFLImageProcessor,
    GFLObjectDetectionOutput,
    GFLPreTrainedModel,
)

__version__ = "0.1.0"

__all__ = [
    "GFLConfig",
    "GFLForObjectDetection",
    "GFLImageProcessor",
    "GFLObjectDetectionOutput",
    "GFLPreTrainedModel",
    "convert_mmdet_checkpoint",
]
