"""ATSS (Adaptive Training Sample Selection) detector configuration."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from .configuration_dense import DenseDetectorConfig


@strict
class ATSSConfig(DenseDetectorConfig):
    r"""
    Configuration of an [`ATSSForObjectDetection`]: a timm backbone, an FPN with two extra levels (strides 8 to 128) and
    the ATSS head (one square anchor per location, ATSS assignment, focal loss, GIoU loss on the decoded boxes weighted
    by the centre-ness targets, centre-ness BCE), as MMDetection's `atss_r50_fpn_1x_coco.py`. The shared settings
    (backbone, FPN, head towers) are [`DenseDetectorConfig`]'s.

    Args:
        prior_scale (`float`, defaults to 8.0): side of an anchor, in units of its level's stride.
        box_coder_stds (`list[float]`, defaults to `[0.1, 0.1, 0.2, 0.2]`): the box output is the anchor deltas
            `(dx, dy, dw, dh)` divided by these (MMDetection's `DeltaXYWHBBoxCoder` `target_stds`).
        atss_topk (`int`, defaults to 9): candidates per level and ground-truth box in ATSS.
        focal_alpha, focal_gamma (`float`, defaults to 0.25, 2.0): the classification focal loss's parameters.
        loss_cls_weight, loss_bbox_weight, loss_centerness_weight (`float`, defaults to 1.0, 2.0, 1.0): loss weights.
    """

    model_type = "atss"

    prior_scale: float = 8.0
    box_coder_stds: list[float] | tuple[float, ...] = (0.1, 0.1, 0.2, 0.2)
    atss_topk: int = 9
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    loss_cls_weight: float = 1.0
    loss_bbox_weight: float = 2.0
    loss_centerness_weight: float = 1.0

    prediction_settings = ("num_labels", "strides", "prior_scale", "box_coder_stds")

    def __post_init__(self, **kwargs):
        self.box_coder_stds = [float(std) for std in self.box_coder_stds]  # as read back from config.json
        super().__post_init__(**kwargs)

    def validate_architecture(self):
        """Checks that the sizes fit together (GroupNorm groups, strides, box coder)."""
        super().validate_architecture()
        if len(self.box_coder_stds) != 4 or min(self.box_coder_stds) <= 0:
            raise ValueError(f"box_coder_stds must be 4 positive numbers, got {self.box_coder_stds}.")
        if self.atss_topk < 1:
            raise ValueError(f"atss_topk ({self.atss_topk}) must be >= 1.")


__all__ = ["ATSSConfig"]
