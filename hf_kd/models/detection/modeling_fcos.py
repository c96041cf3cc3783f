"""FCOS (Fully Convolutional One-Stage) dense object detector with a timm backbone, numerically matching MMDetection
3.3."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .assigners import DenseTargets, assigned_classes_and_boxes, fcos_assign
from .box_ops import box_to_distance, centerness, distance_to_box
from .configuration_fcos import FCOSConfig
from .ground_truth import GroundTruth
from .heads import DenseHead, Scale
from .losses import EPS32, log_iou_loss, one_hot, reduce_mean, sigmoid_focal_loss
from .modeling_dense import DenseDetectionOutput, DenseDetectorPreTrainedModel, DenseLoss
from .priors import grid_points, level_sizes


class FCOSHead(DenseHead):
    """The FCOS head: after the towers, `conv_cls` gives class logits, `conv_centerness` (on the classification
    tower) the centre-ness logit, and `conv_reg`, times a learnable scale per level and exponentiated, the distances
    in pixels from each point to the four sides of its box."""

    def __init__(self, config: FCOSConfig):
        super().__init__(config.fpn_channels, config.head_channels, config.stacked_convs, config.norm_groups)
        self.conv_cls = nn.Conv2d(config.head_channels, config.num_labels, 3, padding=1)
        self.conv_reg = nn.Conv2d(config.head_channels, 4, 3, padding=1)
        self.conv_centerness = nn.Conv2d(config.head_channels, 1, 3, padding=1)
        self.scales = nn.ModuleList(Scale() for _ in config.strides)

    @property
    def classifier(self) -> nn.Conv2d:
        return self.conv_cls

    def predict(self, cls_hidden: torch.Tensor, reg_hidden: torch.Tensor, level: int) -> tuple[torch.Tensor, ...]:
        distances = self.scales[level](self.conv_reg(reg_hidden)).float().exp()
        return self.conv_cls(cls_hidden), distances, self.conv_centerness(cls_hidden)


class FCOSLoss(DenseLoss):
    """FCOS's training targets (scale ranges) and losses, each one scalar over all levels: focal loss over all points;
    `-log IoU` of the decoded boxes on the positives, weighted by their centre-ness targets; centre-ness binary
    cross-entropy on the positives."""

    def targets(self, outputs: DenseDetectionOutput, ground_truth: GroundTruth) -> DenseTargets:
        """FCOS targets over every point of the padded batch (no valid flags); the box target is the distances
        (l, t, r, b) from the point to its box's sides (to the first box for background points, unused)."""
        points = outputs.priors
        sizes = level_sizes(outputs.feature_maps, len(points))
        assigned, positive = fcos_assign(points, sizes, self.config.regress_ranges, ground_truth)
        labels, boxes = assigned_classes_and_boxes(ground_truth, assigned, positive, self.config.num_labels)
        distances = box_to_distance(points, boxes)
        centerness_targets = torch.where(positive, centerness(distances), 0)
        num_positive = reduce_mean(positive.sum().float()).clamp(min=1)
        centerness_denorm = reduce_mean(centerness_targets.sum()).clamp(min=1e-6)
        return DenseTargets(
            labels=labels,
            label_weights=torch.ones_like(centerness_targets),
            positive=positive,
            box_targets=distances,
            avg_factor=num_positive,
            kd_avg_factor=centerness_denorm,
            centerness=centerness_targets,
        )

    def loss_maps(self, outputs: DenseDetectionOutput, targets: DenseTargets) -> dict[str, torch.Tensor]:
        """`loss_cls`, `loss_bbox`, `loss_centerness` as `(B, Q)` per-point contributions (their sums are the
        losses). The box loss is divided by the sum of the centre-ness targets (at least 1e-6), the others by the
        number of positives (at least 1)."""
        config = self.config
        logits = outputs.logits.float()
        positive, centerness_targets = targets.positive, targets.centerness
        focal = sigmoid_focal_loss(
            logits, one_hot(targets.labels, config.num_labels), config.focal_alpha, config.focal_gamma
        )
        loss_cls = focal.sum(-1) / (targets.avg_factor + EPS32)

        target_boxes = distance_to_box(outputs.priors, targets.box_targets)
        iou_loss = torch.where(positive, log_iou_loss(outputs.pred_boxes.float(), target_boxes), 0)
        # kd_avg_factor is the sum of the centre-ness targets, the box loss's divisor (and CrossKD's)
        loss_bbox = centerness_targets * iou_loss / (targets.kd_avg_factor + EPS32)
        bce = F.binary_cross_entropy_with_logits(
            outputs.centerness_logits.float(), centerness_targets, reduction="none"
        )
        loss_centerness = torch.where(positive, bce, 0) / (targets.avg_factor + EPS32)
        return {
            "loss_cls": config.loss_cls_weight * loss_cls,
            "loss_bbox": config.loss_bbox_weight * loss_bbox,
            "loss_centerness": config.loss_centerness_weight * loss_centerness,
        }


class FCOSPreTrainedModel(DenseDetectorPreTrainedModel):
    config: FCOSConfig
    config_class = FCOSConfig
    base_model_prefix = "fcos"
    _no_split_modules = ["FCOSHead"]


class FCOSForObjectDetection(FCOSPreTrainedModel):
    """FCOS detector: timm backbone (C3-C5), FPN (P3-P7), shared FCOS head; scale-range targets + focal, `-log IoU`
    and centre-ness losses when `labels` are given. The image processor's `post_process_object_detection` turns the
    outputs into detections (class scores times the sigmoid of the centre-ness)."""

    def __init__(self, config: FCOSConfig):
        super().__init__(config)
        self.build_detector(FCOSHead(config))
        self.loss_function = FCOSLoss(config)
        self.post_init()

    def make_priors(self, spatial_shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """One point per location, at `((x + 0.5) * stride, (y + 0.5) * stride)`."""
        return grid_points(spatial_shapes, self.config.strides, device)

    def decode_boxes(
        self, priors: torch.Tensor, bbox_regression: torch.Tensor, level_sizes: list[int]
    ) -> torch.Tensor:
        """Boxes from the points and the predicted distances (in pixels) to the four sides."""
        return distance_to_box(priors, bbox_regression)


__all__ = ["FCOSForObjectDetection", "FCOSHead", "FCOSLoss", "FCOSPreTrainedModel"]
