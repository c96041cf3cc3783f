"""FCOS (Fully Convolutional One-Stage) detector configuration."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from .configuration_dense import DenseDetectorConfig

# MMDetection's FCOS regression ranges: the largest distance from a point to the sides of its box, per level.
FCOS_REGRESS_RANGES = ((-1.0, 64.0), (64.0, 128.0), (128.0, 256.0), (256.0, 512.0), (512.0, 1e8))


@strict
class FCOSConfig(DenseDetectorConfig):
    r"""
    Configuration of an [`FCOSForObjectDetection`]: a timm backbone, an FPN with two extra levels (strides 8 to 128;
    P6 from the P5 output, a ReLU before P7) and the FCOS head (one point per location, distances to the four sides,
    centre-ness on the classification tower), as MMDetection's plain FCOS `fcos_r50-caffe_fpn_gn-head_1x_coco.py`:
    no centre sampling, distances in pixels (`exp` of the scaled regression, no normalisation by the stride). The
    shared settings (backbone, FPN, head towers) are [`DenseDetectorConfig`]'s.

    Args:
        regress_ranges (`list[list[float]]`, defaults to `[[-1, 64], [64, 128], [128, 256], [256, 512], [512, 1e8]]`):
            per level, the range of the largest distance from a point to the sides of a box that the level's points
            are trained to regress.
        focal_alpha (`float`, defaults to 0.25), focal_gamma (`float`, defaults to 2.0): the focal loss's parameters.
        loss_cls_weight, loss_bbox_weight, loss_centerness_weight (`float`, defaults to 1.0): loss weights of the
            focal loss, the `-log IoU` box loss and the centre-ness binary cross-entropy.
    """

    model_type = "fcos"

    fpn_relu_before_extra_convs: bool = True
    regress_ranges: list[list[float]] | tuple[tuple[float, float], ...] = FCOS_REGRESS_RANGES
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    loss_cls_weight: float = 1.0
    loss_bbox_weight: float = 1.0
    loss_centerness_weight: float = 1.0

    prediction_settings = ("num_labels", "strides", "regress_ranges")

    def __post_init__(self, **kwargs):
        # the same type whether built here or read back from config.json
        self.regress_ranges = [[float(low), float(high)] for low, high in self.regress_ranges]
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Checks that the sizes fit together (GroupNorm groups, strides, one regression range per level)."""
        super().validate_architecture()
        if len(self.regress_ranges) != len(self.strides):
            raise ValueError(
                f"regress_ranges needs one (low, high) pair per level ({len(self.strides)}), got {self.regress_ranges}."
            )
        if any(low >= high for low, high in self.regress_ranges):
            raise ValueError(f"every regression range must have low < high, got {self.regress_ranges}.")


__all__ = ["FCOSConfig"]
