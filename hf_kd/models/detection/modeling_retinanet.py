"""RetinaNet dense object detector with a timm backbone, numerically matching MMDetection 3.3."""

from __future__ import annotations

import torch
from torch import nn

from .assigners import DenseTargets, assigned_classes_and_boxes, max_iou_assign
from .box_ops import DeltaBoxCoder
from .configuration_retinanet import RetinaNetConfig
from .ground_truth import GroundTruth
from .heads import DenseHead
from .losses import EPS32, one_hot, sigmoid_focal_loss
from .modeling_dense import DenseDetectionOutput, DenseDetectorPreTrainedModel, DenseLoss
from .priors import grid_anchors


class RetinaNetHead(DenseHead):
    """The RetinaNet head: after the towers, `retina_cls` gives the class logits and `retina_reg` the box deltas of
    every anchor of a location (no scale per level)."""

    def __init__(self, config: RetinaNetConfig):
        super().__init__(config.fpn_channels, config.head_channels, config.stacked_convs, config.norm_groups)
        anchors = config.anchors_per_location
        self.retina_cls = nn.Conv2d(config.head_channels, anchors * config.num_labels, 3, padding=1)
        self.retina_reg = nn.Conv2d(config.head_channels, anchors * 4, 3, padding=1)

    @property
    def classifier(self) -> nn.Conv2d:
        return self.retina_cls

    def predict(self, cls_hidden: torch.Tensor, reg_hidden: torch.Tensor, level: int) -> tuple[torch.Tensor, ...]:
        return self.retina_cls(cls_hidden), self.retina_reg(reg_hidden)


class RetinaNetLoss(DenseLoss):
    """RetinaNet's training targets (MaxIoU) and losses: focal loss over the positive and negative anchors, L1 loss
    on the box deltas of the positives, both divided by the number of positives (at least 1 per image)."""

    def __init__(self, config: RetinaNetConfig):
        super().__init__(config)
        self.box_coder = DeltaBoxCoder(config.box_coder_stds)

    def targets(self, outputs: DenseDetectionOutput, ground_truth: GroundTruth) -> DenseTargets:
        """MaxIoU targets; ignored and invalid anchors have label weight 0; the box target of a positive is the delta
        from its anchor to its ground-truth box (0 elsewhere)."""
        config = self.config
        assigned, positive, negative = max_iou_assign(
            outputs.priors,
            outputs.valid_mask,
            ground_truth,
            config.pos_iou_threshold,
            config.neg_iou_threshold,
            config.min_pos_iou,
        )
        labels, boxes = assigned_classes_and_boxes(ground_truth, assigned, positive, config.num_labels)
        deltas = self.box_coder.encode(outputs.priors, boxes)
        avg_factor = positive.sum(1).clamp(min=1).sum().float()
        return DenseTargets(
            labels=labels,
            label_weights=(positive | negative).float(),
            positive=positive,
            box_targets=torch.where(positive[..., None], deltas, 0),
            avg_factor=avg_factor,
            kd_avg_factor=avg_factor,
        )

    def loss_maps(self, outputs: DenseDetectionOutput, targets: DenseTargets) -> dict[str, torch.Tensor]:
        """`loss_cls` and `loss_bbox` as `(B, Q)` per-anchor contributions (their sums are the losses)."""
        config = self.config
        class_targets = one_hot(targets.labels, config.num_labels)
        focal = sigmoid_focal_loss(outputs.logits.float(), class_targets, config.focal_alpha, config.focal_gamma)
        loss_cls = focal.sum(-1) * targets.label_weights / (targets.avg_factor + EPS32)
        l1 = (outputs.bbox_regression.float() - targets.box_targets).abs().sum(-1)
        loss_bbox = torch.where(targets.positive, l1, 0) / (targets.avg_factor + EPS32)
        return {"loss_cls": config.loss_cls_weight * loss_cls, "loss_bbox": config.loss_bbox_weight * loss_bbox}


class RetinaNetPreTrainedModel(DenseDetectorPreTrainedModel):
    config: RetinaNetConfig
    config_class = RetinaNetConfig
    base_model_prefix = "retinanet"
    _no_split_modules = ["RetinaNetHead"]


class RetinaNetForObjectDetection(RetinaNetPreTrainedModel):
    """RetinaNet detector: timm backbone (C3-C5), FPN (P3-P7, P6 from C5), shared RetinaNet head; MaxIoU + focal/L1
    losses when `labels` are given. The image processor's `post_process_object_detection` turns the outputs into
    detections."""

    def __init__(self, config: RetinaNetConfig):
        super().__init__(config)
        self.priors_per_location = config.anchors_per_location
        self.box_coder = DeltaBoxCoder(config.box_coder_stds)
        self.build_detector(RetinaNetHead(config))
        self.loss_function = RetinaNetLoss(config)
        self.post_init()

    def make_priors(self, spatial_shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """`anchors_per_location` anchors per location (ratio-major, then scale), centred at `(x * stride,
        y * stride)`."""
        config = self.config
        return grid_anchors(spatial_shapes, config.strides, config.anchor_scales, tuple(config.anchor_ratios), device)

    def decode_boxes(
        self, priors: torch.Tensor, bbox_regression: torch.Tensor, level_sizes: list[int]
    ) -> torch.Tensor:
        """The anchors moved and scaled by their deltas (log-scales clamped), in pixels."""
        return self.box_coder.decode(priors, bbox_regression.float())


__all__ = ["RetinaNetForObjectDetection", "RetinaNetHead", "RetinaNetLoss", "RetinaNetPreTrainedModel"]
