"""GFL (Generalized Focal Loss v1) detector configuration."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from .configuration_dense import DenseDetectorConfig


@strict
class GFLConfig(DenseDetectorConfig):
    r"""
    Configuration of a [`GFLForObjectDetection`]: a timm backbone, an FPN with two extra levels (strides 8 to 128) and
    the GFL head (quality focal loss, distribution focal loss, GIoU loss, ATSS assignment), as MMDetection's
    `gfl_r50_fpn_1x_coco.py`. The shared settings (backbone, FPN, head towers) are [`DenseDetectorConfig`]'s.

    Args:
        reg_max (`int`, defaults to 16): the box distribution has `reg_max + 1` bins per side.
        prior_scale (`float`, defaults to 8.0): side of an anchor, in units of its level's stride.
        atss_topk (`int`, defaults to 9): candidates per level and ground-truth box in ATSS.
        qfl_beta (`float`, defaults to 2.0): focusing parameter of the quality focal loss.
        loss_cls_weight, loss_bbox_weight, loss_dfl_weight (`float`, defaults to 1.0, 2.0, 0.25): loss weights.
    """

    model_type = "gfl"

    reg_max: int = 16
    prior_scale: float = 8.0
    atss_topk: int = 9
    qfl_beta: float = 2.0
    loss_cls_weight: float = 1.0
    loss_bbox_weight: float = 2.0
    loss_dfl_weight: float = 0.25

    prediction_settings = ("num_labels", "strides", "reg_max", "prior_scale")

    def validate_architecture(self):
        """Checks that the sizes fit together (GroupNorm groups, strides, bins)."""
        super().validate_architecture()
        if self.reg_max < 1:
            raise ValueError(f"reg_max ({self.reg_max}) must be >= 1.")


__all__ = ["GFLConfig"]
