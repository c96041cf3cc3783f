"""ATSS (Adaptive Training Sample Selection) dense object detector with a timm backbone, numerically matching
MMDetection 3.3."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .assigners import DenseTargets, assigned_classes_and_boxes, atss_assign
from .box_ops import DeltaBoxCoder, box_centers, box_to_distance, centerness
from .configuration_atss import ATSSConfig
from .ground_truth import GroundTruth
from .heads import DenseHead, Scale
from .losses import EPS32, giou_loss, one_hot, reduce_mean, sigmoid_focal_loss
from .modeling_dense import DenseDetectionOutput, DenseDetectorPreTrainedModel, DenseLoss
from .priors import grid_anchors, level_sizes


class ATSSHead(DenseHead):
    """The ATSS head: after the towers, `atss_cls` gives the class logits, `atss_reg`, times a learnable scale per
    level, the anchor deltas, and `atss_centerness`, on the regression tower, the centre-ness logits."""

    def __init__(self, config: ATSSConfig):
        super().__init__(config.fpn_channels, config.head_channels, config.stacked_convs, config.norm_groups)
        self.atss_cls = nn.Conv2d(config.head_channels, config.num_labels, 3, padding=1)
        self.atss_reg = nn.Conv2d(config.head_channels, 4, 3, padding=1)
        self.atss_centerness = nn.Conv2d(config.head_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale() for _ in config.strides)

    @property
    def classifier(self) -> nn.Conv2d:
        return self.atss_cls

    def predict(self, cls_hidden: torch.Tensor, reg_hidden: torch.Tensor, level: int) -> tuple[torch.Tensor, ...]:
        box_deltas = self.scales[level](self.atss_reg(reg_hidden)).float()
        return self.atss_cls(cls_hidden), box_deltas, self.atss_centerness(reg_hidden)


class ATSSLoss(DenseLoss):
    """ATSS's training targets and losses: focal loss over all valid anchors; on the positives, the GIoU loss of the
    decoded boxes weighted by their centre-ness targets, and the centre-ness BCE."""

    def targets(self, outputs: DenseDetectionOutput, ground_truth: GroundTruth) -> DenseTargets:
        """ATSS targets; the box target of a positive is its ground-truth box in pixels (the anchor elsewhere), its
        centre-ness target that of the anchor centre in that box (0 elsewhere)."""
        sizes = level_sizes(outputs.feature_maps, outputs.priors.shape[0])
        assigned, positive = atss_assign(
            outputs.priors, sizes, outputs.valid_mask, ground_truth, self.config.atss_topk
        )
        labels, boxes = assigned_classes_and_boxes(ground_truth, assigned, positive, self.config.num_labels)
        box_targets = torch.where(positive[..., None], boxes, outputs.priors)
        centerness_targets = centerness(box_to_distance(box_centers(outputs.priors), box_targets))
        avg_factor = reduce_mean(positive.sum(1).clamp(min=1).sum().float())
        return DenseTargets(
            labels=labels,
            label_weights=outputs.valid_mask.float(),
            positive=positive,
            box_targets=box_targets,
            avg_factor=avg_factor,
            kd_avg_factor=avg_factor,
            centerness=torch.where(positive, centerness_targets, 0),
        )

    def loss_maps(self, outputs: DenseDetectionOutput, targets: DenseTargets) -> dict[str, torch.Tensor]:
        """`loss_cls`, `loss_bbox`, `loss_centerness` as `(B, Q)` per-anchor contributions (their sums are the
        losses).

        The classification and centre-ness losses are divided by the number of positives (at least 1 per image), the
        box loss by `max(sum of the centre-ness targets, 1)`.
        """
        config = self.config
        positive, centerness_targets = targets.positive, targets.centerness
        class_targets = one_hot(targets.labels, config.num_labels)
        focal = sigmoid_focal_loss(outputs.logits.float(), class_targets, config.focal_alpha, config.focal_gamma)
        loss_cls = config.loss_cls_weight * focal.sum(-1) * targets.label_weights / (targets.avg_factor + EPS32)

        box_avg_factor = reduce_mean(centerness_targets.sum()).clamp(min=1)
        giou = torch.where(positive, giou_loss(outputs.pred_boxes.float(), targets.box_targets), 0)
        loss_bbox = config.loss_bbox_weight * centerness_targets * giou / (1 + EPS32) / box_avg_factor

        bce = F.binary_cross_entropy_with_logits(
            outputs.centerness_logits.float(), centerness_targets, reduction="none"
        )
        loss_centerness = config.loss_centerness_weight * torch.where(positive, bce, 0) / (targets.avg_factor + EPS32)
        return {"loss_cls": loss_cls, "loss_bbox": loss_bbox, "loss_centerness": loss_centerness}


class ATSSPreTrainedModel(DenseDetectorPreTrainedModel):
    config: ATSSConfig
    config_class = ATSSConfig
    base_model_prefix = "atss"
    _no_split_modules = ["ATSSHead"]


class ATSSForObjectDetection(ATSSPreTrainedModel):
    """ATSS detector: timm backbone (C3-C5), FPN (P3-P7), shared ATSS head; ATSS assignment + focal/GIoU/centre-ness
    losses when `labels` are given. The image processor's `post_process_object_detection` turns the outputs into
    detections (class scores times the sigmoid of the centre-ness)."""

    def __init__(self, config: ATSSConfig):
        super().__init__(config)
        self.build_detector(ATSSHead(config))
        self.box_coder = DeltaBoxCoder(stds=config.box_coder_stds)
        self.loss_function = ATSSLoss(config)
        self.post_init()

    def make_priors(self, spatial_shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """One square anchor of side `prior_scale * stride` per location, centred at `(x * stride, y * stride)`."""
        return grid_anchors(spatial_shapes, self.config.strides, (self.config.prior_scale,), (1.0,), device)

    def decode_boxes(
        self, priors: torch.Tensor, bbox_regression: torch.Tensor, level_sizes: list[int]
    ) -> torch.Tensor:
        """The anchors moved and scaled by the deltas (the box coder's stds applied), not clipped to the image."""
        return self.box_coder.decode(priors, bbox_regression.float())


__all__ = ["ATSSForObjectDetection", "ATSSHead", "ATSSLoss", "ATSSPreTrainedModel"]
