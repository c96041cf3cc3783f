"""Assignment of priors to ground-truth boxes, batched over images (no loop over priors or boxes): ATSS (GFL,
ATSS), MaxIoU (RetinaNet) and FCOS's scale-range rule, each as MMDetection 3.3 decides."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .box_ops import box_area, box_centers, box_iou, box_to_distance
from .ground_truth import GroundTruth
from .priors import per_level

INF = 1e8


@dataclass
class DenseTargets:
    """Training targets of every prior of a batch, by the family's rules."""

    labels: torch.Tensor  # (B, Q) class index, `num_classes` for background
    label_weights: torch.Tensor  # (B, Q) weight in the classification loss: 0 for invalid (and ignored) priors
    positive: torch.Tensor  # (B, Q) bool
    box_targets: torch.Tensor  # (B, Q, 4) the family's regression target of the positives (finite elsewhere)
    avg_factor: torch.Tensor  # () normaliser of the classification loss (mean over processes where MMDetection does)
    kd_avg_factor: torch.Tensor  # () normaliser of the distillation losses, as the official CrossKD code divides
    centerness: torch.Tensor | None = None  # (B, Q) centre-ness targets (FCOS, ATSS), 0 off the positives


def assigned_classes_and_boxes(
    ground_truth: GroundTruth, assigned: torch.Tensor, positive: torch.Tensor, num_classes: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The class `(B, Q)` of every prior (`num_classes` for background) and the box `(B, Q, 4)` of its assigned
    ground truth (of box 0 or of a padding slot where it is not positive)."""
    classes = torch.where(positive, ground_truth.classes.gather(1, assigned), num_classes)
    return classes, ground_truth.boxes.gather(1, assigned[..., None].expand(-1, -1, 4))


def atss_assign(
    anchors: torch.Tensor, level_sizes: list[int], valid: torch.Tensor, ground_truth: GroundTruth, topk: int = 9
) -> tuple[torch.Tensor, torch.Tensor]:
    """ATSS: the assigned box index `(B, Q)` and the positive mask `(B, Q)` of every anchor.

    Per level and box, the `topk` valid anchors whose centres are nearest to the box centre are candidates; a
    candidate is positive when its IoU reaches the mean plus the (unbiased) standard deviation of the candidates'
    IoUs and its centre lies inside the box (by more than 0.01); an anchor positive for several boxes takes the one
    it overlaps most (the first on ties).
    """
    gt_boxes = ground_truth.boxes
    overlaps = box_iou(anchors[None, :, None, :], gt_boxes[:, None, :, :])  # (B, Q, G)
    centers = box_centers(anchors)
    distances = (centers[None, :, None, :] - box_centers(gt_boxes)[:, None, :, :]).pow(2).sum(-1).sqrt()
    distances = distances.masked_fill(~valid[..., None], math.inf)

    candidates, start = [], 0
    for size in level_sizes:
        level_distances = distances[:, start : start + size]
        candidates.append(level_distances.topk(min(topk, size), dim=1, largest=False).indices + start)
        start += size
    candidates = torch.cat(candidates, dim=1)  # (B, K, G)
    is_candidate = valid.gather(1, candidates.flatten(1)).view_as(candidates)
    candidate_overlaps = overlaps.gather(1, candidates)
    num_candidates = is_candidate.sum(1)
    mean = (candidate_overlaps * is_candidate).sum(1) / num_candidates
    variance = ((candidate_overlaps - mean[:, None]).pow(2) * is_candidate).sum(1) / (num_candidates - 1)
    threshold = mean + variance.sqrt()

    candidate_centers = centers[candidates]  # (B, K, G, 2)
    inside = box_to_distance(candidate_centers, gt_boxes[:, None, :, :]).amin(-1) > 0.01
    positive = is_candidate & inside & (candidate_overlaps >= threshold[:, None]) & ground_truth.mask[:, None, :]

    positive_overlaps = torch.full_like(overlaps, -INF)
    positive_overlaps.scatter_(1, candidates, torch.where(positive, candidate_overlaps, -INF))
    max_overlaps, assigned = positive_overlaps.max(dim=2)
    return assigned, max_overlaps != -INF


def max_iou_assign(
    anchors: torch.Tensor,
    valid: torch.Tensor,
    ground_truth: GroundTruth,
    pos_iou_threshold: float = 0.5,
    neg_iou_threshold: float = 0.4,
    min_pos_iou: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """MaxIoU (MMDetection's `MaxIoUAssigner` with low-quality matches for every best anchor of a box): the assigned
    box index `(B, Q)`, the positive mask and the negative mask; valid anchors in neither are ignored.

    An anchor whose best IoU is at least `pos_iou_threshold` is positive for that box (the first on ties), one whose
    best IoU is below `neg_iou_threshold` negative; then, box by box in index order, every valid anchor whose IoU with
    a box equals that box's best IoU (when it is at least `min_pos_iou`) becomes positive for it (later boxes win).
    An image without boxes has only negatives.
    """
    real = ground_truth.mask[:, None, :]
    overlaps = box_iou(anchors[None, :, None, :], ground_truth.boxes[:, None, :, :])  # (B, Q, G)
    overlaps = overlaps.masked_fill(~real | ~valid[..., None], 0)  # padding slots and invalid anchors never match
    max_overlaps, assigned = overlaps.max(dim=2)
    best_per_box = overlaps.max(dim=1, keepdim=True).values  # (B, 1, G)
    best_match = (overlaps == best_per_box) & (best_per_box >= min_pos_iou) & real & valid[..., None]
    box_numbers = torch.arange(1, overlaps.shape[-1] + 1, device=overlaps.device)
    last_best = (best_match * box_numbers).amax(-1)  # 1 + index of the last box this anchor is a best match of
    positive = valid & ((max_overlaps >= pos_iou_threshold) | (last_best > 0))
    assigned = torch.where(last_best > 0, last_best - 1, assigned)
    negative = valid & ~positive & (max_overlaps < neg_iou_threshold)
    return assigned, positive, negative


def fcos_assign(
    points: torch.Tensor, level_sizes: list[int], regress_ranges: list[tuple[float, float]], ground_truth: GroundTruth
) -> tuple[torch.Tensor, torch.Tensor]:
    """FCOS: the assigned box index `(B, Q)` and the positive mask `(B, Q)` of every point.

    A point is a candidate for a box that contains it (all four distances > 0) when its largest distance to the
    box's sides lies in its level's regression range; it takes the candidate box of smallest area (the first on
    ties). Points in the padding are samples too.
    """
    distances = box_to_distance(points[None, :, None, :], ground_truth.boxes[:, None, :, :])  # (B, Q, G, 4)
    low = per_level([low for low, _ in regress_ranges], level_sizes, points.device)
    high = per_level([high for _, high in regress_ranges], level_sizes, points.device)
    largest = distances.amax(-1)
    candidate = (
        (distances.amin(-1) > 0)
        & (largest >= low[None, :, None])
        & (largest <= high[None, :, None])
        & ground_truth.mask[:, None, :]
    )
    areas = torch.where(candidate, box_area(ground_truth.boxes)[:, None, :], INF)
    min_areas, assigned = areas.min(dim=2)
    return assigned, min_areas != INF


__all__ = ["DenseTargets", "assigned_classes_and_boxes", "atss_assign", "fcos_assign", "max_iou_assign"]
