"""GFL (Generalized Focal Loss v1) dense object detector with a timm backbone, numerically matching MMDetection 3.3."""

from __future__ import annotations

import torch
from torch import nn

from .assigners import DenseTargets, assigned_classes_and_boxes, atss_assign
from .box_ops import box_centers, box_iou, box_to_distance, distance_to_box, distribution_to_distance
from .configuration_gfl import GFLConfig
from .ground_truth import GroundTruth
from .heads import DenseHead, Scale
from .losses import EPS32, distribution_focal_loss, giou_loss, one_hot, quality_focal_loss, reduce_mean
from .modeling_dense import DenseDetectionOutput, DenseDetectorPreTrainedModel, DenseLoss
from .priors import grid_anchors, level_sizes, per_level


class GFLHead(DenseHead):
    """The GFL head: after the towers, `gfl_cls` gives class-quality logits and `gfl_reg`, times a learnable scale per
    level, the distribution logits (`reg_max + 1` bins) of the distances to the four sides."""

    def __init__(self, config: GFLConfig):
        super().__init__(config.fpn_channels, config.head_channels, config.stacked_convs, config.norm_groups)
        self.gfl_cls = nn.Conv2d(config.head_channels, config.num_labels, 3, padding=1)
        self.gfl_reg = nn.Conv2d(config.head_channels, 4 * (config.reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList(Scale() for _ in config.strides)

    @property
    def classifier(self) -> nn.Conv2d:
        return self.gfl_cls

    def predict(self, cls_hidden: torch.Tensor, reg_hidden: torch.Tensor, level: int) -> tuple[torch.Tensor, ...]:
        return self.gfl_cls(cls_hidden), self.scales[level](self.gfl_reg(reg_hidden)).float()


class GFLLoss(DenseLoss):
    """GFL's training targets (ATSS) and losses: quality focal loss over all valid anchors; GIoU and distribution
    focal loss on the positives, weighted by their detached best class score. Boxes in units of the stride."""

    def targets(self, outputs: DenseDetectionOutput, ground_truth: GroundTruth) -> DenseTargets:
        """ATSS targets; the box target of a positive is its ground-truth box in pixels (the anchor elsewhere)."""
        sizes = level_sizes(outputs.feature_maps, outputs.priors.shape[0])
        assigned, positive = atss_assign(
            outputs.priors, sizes, outputs.valid_mask, ground_truth, self.config.atss_topk
        )
        labels, boxes = assigned_classes_and_boxes(ground_truth, assigned, positive, self.config.num_labels)
        avg_factor = reduce_mean(positive.sum(1).clamp(min=1).sum().float())
        return DenseTargets(
            labels=labels,
            label_weights=outputs.valid_mask.float(),
            positive=positive,
            box_targets=torch.where(positive[..., None], boxes, outputs.priors),
            avg_factor=avg_factor,
            kd_avg_factor=avg_factor,
        )

    def loss_maps(
        self,
        outputs: DenseDetectionOutput,
        targets: DenseTargets,
        quality_weight_offset: float = 0.0,
        quality_norm_eps: float | None = None,
    ) -> dict[str, torch.Tensor]:
        """`loss_cls`, `loss_bbox`, `loss_dfl` as `(B, Q)` per-anchor contributions (their sums are the losses).

        The box losses of the positives are weighted by their detached best class score `w` (plus
        `quality_weight_offset`) and divided by `max(sum w, 1)`, or by `sum w + quality_norm_eps` when it is given
        (BCKD's variant).
        """
        config = self.config
        logits, box_logits = outputs.logits.float(), outputs.bbox_regression.float()
        positive = targets.positive
        strides = per_level(config.strides, level_sizes(outputs.feature_maps, len(outputs.priors)), logits.device)
        centers = box_centers(outputs.priors) / strides[:, None]
        pred_boxes = distance_to_box(centers, distribution_to_distance(box_logits))
        target_boxes = targets.box_targets / strides[:, None]

        iou = box_iou(pred_boxes.detach(), target_boxes)
        quality = one_hot(targets.labels, config.num_labels) * torch.where(positive, iou, 0)[..., None]
        loss_cls = quality_focal_loss(logits, quality, config.qfl_beta).sum(-1) * targets.label_weights
        loss_cls = loss_cls / (targets.avg_factor + EPS32)

        weight = torch.where(positive, logits.detach().sigmoid().amax(-1) + quality_weight_offset, 0)
        if quality_norm_eps is None:
            weight_sum = reduce_mean(weight.sum()).clamp(min=1)
        else:
            weight_sum = reduce_mean(weight.sum()) + quality_norm_eps
        loss_bbox = weight * giou_loss(pred_boxes, target_boxes) / (1 + EPS32) / weight_sum
        target_distances = box_to_distance(centers, target_boxes).clamp(min=0, max=config.reg_max - 0.1)
        dfl = distribution_focal_loss(box_logits, target_distances).sum(-1) / (4 + EPS32)
        loss_dfl = weight * dfl / weight_sum
        return {
            "loss_cls": config.loss_cls_weight * loss_cls,
            "loss_bbox": config.loss_bbox_weight * loss_bbox,
            "loss_dfl": config.loss_dfl_weight * loss_dfl,
        }


class GFLPreTrainedModel(DenseDetectorPreTrainedModel):
    config: GFLConfig
    config_class = GFLConfig
    base_model_prefix = "gfl"
    _no_split_modules = ["GFLHead"]


class GFLForObjectDetection(GFLPreTrainedModel):
    """GFL detector: timm backbone (C3-C5), FPN (P3-P7), shared GFL head; ATSS + QFL/DFL/GIoU losses when `labels` are
    given. The image processor's `post_process_object_detection` turns the outputs into detections."""

    def __init__(self, config: GFLConfig):
        super().__init__(config)
        self.build_detector(GFLHead(config))
        self.loss_function = GFLLoss(config)
        self.post_init()

    def make_priors(self, spatial_shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """One square anchor of side `prior_scale * stride` per location, centred at `(x * stride, y * stride)`."""
        return grid_anchors(spatial_shapes, self.config.strides, (self.config.prior_scale,), (1.0,), device)

    def decode_boxes(
        self, priors: torch.Tensor, bbox_regression: torch.Tensor, level_sizes: list[int]
    ) -> torch.Tensor:
        """Expected distances (in strides) around the anchor centres, in pixels."""
        strides = per_level(self.config.strides, level_sizes, priors.device)
        return distance_to_box(box_centers(priors), distribution_to_distance(bbox_regression) * strides[:, None])


__all__ = ["GFLForObjectDetection", "GFLHead", "GFLLoss", "GFLPreTrainedModel"]
