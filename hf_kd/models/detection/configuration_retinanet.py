"""RetinaNet detector configuration."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict

from .configuration_dense import DenseDetectorConfig


@strict
class RetinaNetConfig(DenseDetectorConfig):
    r"""
    Configuration of a [`RetinaNetForObjectDetection`]: a timm backbone, an FPN whose first extra level is computed
    from the last backbone feature (strides 8 to 128), and the RetinaNet head (anchors of several scales and aspect
    ratios per location, MaxIoU assignment, focal loss and L1 loss on the anchor deltas), as MMDetection's
    `retinanet_r50_fpn_1x_coco.py`. The shared settings (backbone, FPN, head towers) are [`DenseDetectorConfig`]'s;
    RetinaNet's differ in `fpn_extra_convs_on="input"` and `norm_groups=None` (head convs with a bias, no norm).

    Args:
        octave_base_scale (`float`, defaults to 4.0): side of the smallest square anchor, in units of its level's
            stride.
        scales_per_octave (`int`, defaults to 3): anchor scales per location, `octave_base_scale * 2 ** (i /
            scales_per_octave)` for `i` in `range(scales_per_octave)`.
        anchor_ratios (`list[float]`, defaults to `[0.5, 1.0, 2.0]`): anchor aspect ratios (height / width).
        box_coder_stds (`list[float]`, defaults to `[1.0, 1.0, 1.0, 1.0]`): the box deltas (dx, dy, dw, dh) are
            divided by these.
        pos_iou_threshold (`float`, defaults to 0.5): an anchor whose best IoU with a ground-truth box reaches it is
            positive.
        neg_iou_threshold (`float`, defaults to 0.4): an anchor whose best IoU is below it is negative (in between:
            ignored), unless it is a best match of a box.
        min_pos_iou (`float`, defaults to 0.0): a box's best anchors are positive for it when their IoU reaches it.
        focal_alpha (`float`, defaults to 0.25), focal_gamma (`float`, defaults to 2.0): the focal loss's settings.
        loss_cls_weight, loss_bbox_weight (`float`, defaults to 1.0): loss weights.
    """

    model_type = "retinanet"

    fpn_extra_convs_on: str = "input"
    norm_groups: int | None = None
    octave_base_scale: float = 4.0
    scales_per_octave: int = 3
    anchor_ratios: list[float] | tuple[float, ...] = (0.5, 1.0, 2.0)
    box_coder_stds: list[float] | tuple[float, ...] = (1.0, 1.0, 1.0, 1.0)
    pos_iou_threshold: float = 0.5
    neg_iou_threshold: float = 0.4
    min_pos_iou: float = 0.0
    focal_alpha: float = 0.25
    focal_gamma: float = 2.0
    loss_cls_weight: float = 1.0
    loss_bbox_weight: float = 1.0

    prediction_settings = (
        "num_labels",
        "strides",
        "octave_base_scale",
        "scales_per_octave",
        "anchor_ratios",
        "box_coder_stds",
    )

    def __post_init__(self, **kwargs):
        self.anchor_ratios = [float(ratio) for ratio in self.anchor_ratios]
        self.box_coder_stds = [float(std) for std in self.box_coder_stds]
        super().__post_init__(**kwargs)

    @property
    def anchor_scales(self) -> tuple[float, ...]:
        """The anchor scales of a location, in units of the stride (computed in float64, as MMDetection)."""
        return tuple(self.octave_base_scale * 2 ** (i / self.scales_per_octave) for i in range(self.scales_per_octave))

    @property
    def anchors_per_location(self) -> int:
        """Anchors at every location of every level: one per aspect ratio and scale."""
        return len(self.anchor_ratios) * self.scales_per_octave

    def validate_architecture(self):
        """Checks that the sizes fit together (GroupNorm groups, strides, anchors, box coder, IoU thresholds)."""
        super().validate_architecture()
        if self.scales_per_octave < 1 or not self.anchor_ratios:
            raise ValueError(
                f"RetinaNet needs anchors: scales_per_octave ({self.scales_per_octave}) >= 1 and at least one "
                f"anchor ratio (got {self.anchor_ratios})."
            )
        if self.octave_base_scale <= 0 or any(ratio <= 0 for ratio in self.anchor_ratios):
            raise ValueError(
                f"octave_base_scale ({self.octave_base_scale}) and anchor_ratios ({self.anchor_ratios}) must be > 0."
            )
        if len(self.box_coder_stds) != 4 or any(std <= 0 for std in self.box_coder_stds):
            raise ValueError(f"box_coder_stds must be 4 values > 0, got {self.box_coder_stds}.")
        if self.neg_iou_threshold > self.pos_iou_threshold:
            raise ValueError(
                f"neg_iou_threshold ({self.neg_iou_threshold}) must not exceed pos_iou_threshold "
                f"({self.pos_iou_threshold})."
            )


__all__ = ["RetinaNetConfig"]
