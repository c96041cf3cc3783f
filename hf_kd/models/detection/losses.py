"""Element-wise detection losses (unreduced) and their MMDetection normalisation, shared by every family's loss and
by the distillation losses."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .box_ops import box_iou

# MMDetection adds float32's eps to every `avg_factor` it divides a summed loss by.
EPS32 = torch.finfo(torch.float32).eps


def one_hot(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Float one-hot targets `(..., num_classes)`; the background label `num_classes` gives all zeros."""
    return (labels[..., None] == torch.arange(num_classes, device=labels.device)).float()


def sigmoid_focal_loss(
    logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0
) -> torch.Tensor:
    """Focal loss of sigmoid logits against `{0, 1}` targets of the same shape (MMDetection's PyTorch version)."""
    probs = logits.sigmoid()
    pt = (1 - probs) * targets + probs * (1 - targets)
    focal_weight = (alpha * targets + (1 - alpha) * (1 - targets)) * pt.pow(gamma)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * focal_weight


def quality_focal_loss(logits: torch.Tensor, targets: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Quality focal loss: BCE with soft targets in `[0, 1]`, modulated by `|target - sigmoid(logit)| ** beta`."""
    modulator = (targets - logits.sigmoid()).abs().pow(beta)
    return F.binary_cross_entropy_with_logits(logits, targets, reduction="none") * modulator


def distribution_focal_loss(box_logits: torch.Tensor, target_distances: torch.Tensor) -> torch.Tensor:
    """Distribution focal loss of `(..., reg_max + 1)` logits against real-valued bin targets `(...)`."""
    log_probs = box_logits.log_softmax(dim=-1)
    left = target_distances.long()
    weight_left = (left + 1).to(target_distances.dtype) - target_distances
    weight_right = target_distances - left.to(target_distances.dtype)
    nll_left = -log_probs.gather(-1, left.unsqueeze(-1)).squeeze(-1)
    nll_right = -log_probs.gather(-1, (left + 1).unsqueeze(-1)).squeeze(-1)
    return nll_left * weight_left + nll_right * weight_right


def giou_loss(boxes: torch.Tensor, target_boxes: torch.Tensor) -> torch.Tensor:
    """`1 - GIoU` of aligned `(..., 4)` boxes."""
    return 1 - box_iou(boxes, target_boxes, generalized=True)


def log_iou_loss(boxes: torch.Tensor, target_boxes: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """`-log(IoU)` of aligned `(..., 4)` boxes, the IoU clamped to `eps` (MMDetection's `IoULoss`, mode `log`)."""
    return -box_iou(boxes, target_boxes).clamp(min=eps).log()


def reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over processes when torch.distributed is initialized (MMDetection's `reduce_mean`), else the tensor."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor.div_(torch.distributed.get_world_size()))
    return tensor


__all__ = [
    "EPS32",
    "distribution_focal_loss",
    "giou_loss",
    "log_iou_loss",
    "one_hot",
    "quality_focal_loss",
    "reduce_mean",
    "sigmoid_focal_loss",
]
