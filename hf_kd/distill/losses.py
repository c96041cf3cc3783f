"""Distillation losses as per-prior maps (their sums are the losses): classification KD, localization KD (KL on GFL's
box distributions, or an IoU loss on decoded boxes), centre-ness KD, and PKD's feature loss; plus the per-channel
statistics CrossKD aligns the student's tower states with. All in float32."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..models.detection.losses import EPS32, giou_loss, log_iou_loss, quality_focal_loss, reduce_mean

IOU_LOSSES = {"iou": giou_loss, "log_iou": log_iou_loss}


def channel_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased std over batch and positions, `(1, C, 1, 1)` each, in float32 (two passes: the
    mean, then the centred squares; on CPU several times faster than `torch.std_mean` over these dimensions). The std
    is 0, and its gradient 0 (not NaN), where a channel is constant or has a single value (batch 1 on a 1x1 level)."""
    features = features.float()
    count = features.numel() // features.shape[1]
    mean = features.mean(dim=(0, 2, 3), keepdim=True)
    if count == 1:
        return mean, torch.zeros_like(mean)
    variance = (features - mean).pow(2).sum(dim=(0, 2, 3), keepdim=True) / (count - 1)
    return mean, variance.clamp(min=torch.finfo(torch.float32).tiny).sqrt() * (variance > 0)


def standardize(features: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-channel standardisation over batch and positions (unbiased std, `eps` added to it), in float32."""
    mean, std = channel_statistics(features)
    return (features.float() - mean) / (std + eps)


def align_to(features: torch.Tensor, reference: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`features` re-standardised per channel to the mean and (unbiased) std of `reference` (CrossKD), in float32:
    `(features - mean) / (std + eps) * reference_std + reference_mean`, as one affine map per channel."""
    mean, std = channel_statistics(features)
    reference_mean, reference_std = channel_statistics(reference)
    scale = reference_std / (std + eps)
    return torch.addcmul(reference_mean - mean * scale, features.float(), scale)


def classification_kd(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weight: torch.Tensor,
    avg_factor: torch.Tensor,
    beta: float = 1.0,
) -> torch.Tensor:
    """`sum_c BCE(s, sigmoid(t)) * |sigmoid(s) - sigmoid(t)| ** beta * weight / avg_factor` per prior, `(B, Q)`."""
    loss = quality_focal_loss(student_logits, teacher_logits.sigmoid(), beta).sum(-1)
    return loss * weight / (avg_factor + EPS32)


def distribution_kd(
    student_box_logits: torch.Tensor,
    teacher_box_logits: torch.Tensor,
    score_weight: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """KL(teacher || student) of GFL's box distributions per prior (summed over bins, averaged over the 4 sides),
    times `score_weight`, divided by the sum of `score_weight` over the batch: `(B, Q)`."""
    teacher_probs = (teacher_box_logits / temperature).softmax(-1)
    student_log_probs = (student_box_logits / temperature).log_softmax(-1)
    kl = F.kl_div(student_log_probs, teacher_probs, reduction="none").sum(-1) * temperature**2
    return score_weight * kl.sum(-1) / (4 + EPS32) / reduce_mean(score_weight.sum())


def box_kd(
    student_boxes: torch.Tensor,
    teacher_boxes: torch.Tensor,
    weight: torch.Tensor,
    avg_factor: torch.Tensor,
    loss: str = "iou",
) -> torch.Tensor:
    """An IoU loss (`"iou"`: GIoU, `"log_iou"`: `-log IoU`) between the decoded student and teacher boxes per prior,
    times `weight`, divided by `avg_factor`: `(B, Q)`."""
    return weight * IOU_LOSSES[loss](student_boxes, teacher_boxes) / (avg_factor + EPS32)


def centerness_kd(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, weight: torch.Tensor, avg_factor: torch.Tensor
) -> torch.Tensor:
    """`BCE(s, sigmoid(t)) * weight / avg_factor` of centre-ness logits per prior, `(B, Q)`."""
    loss = F.binary_cross_entropy_with_logits(student_logits, teacher_logits.sigmoid(), reduction="none")
    return loss * weight / (avg_factor + EPS32)


def feature_kd(student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]) -> torch.Tensor:
    """PKD: half the mean squared difference of per-channel standardised features, summed over levels."""
    return sum(
        F.mse_loss(standardize(student), standardize(teacher)) / 2
        for student, teacher in zip(student_features, teacher_features)
    )


__all__ = [
    "align_to",
    "box_kd",
    "centerness_kd",
    "channel_statistics",
    "classification_kd",
    "distribution_kd",
    "feature_kd",
    "standardize",
]
