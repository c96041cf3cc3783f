"""Test-time post-processing of every dense detector family, batched over images: MMDetection's score threshold and
per-level top-k on (prior, class) pairs, clipping, centre-ness weighting, class-aware NMS and the detection cap."""

from __future__ import annotations

import torch
from torchvision.ops import nms


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Class-aware NMS with MMCV's coordinate offsets (so that decisions match MMDetection's); kept indices, best
    first."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    offsets = labels.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def detect(
    logits: torch.Tensor,
    pred_boxes: torch.Tensor,
    image_sizes: torch.Tensor,
    level_sizes: list[int],
    centerness_logits: torch.Tensor | None = None,
    score_threshold: float = 0.05,
    pre_nms_topk: int = 1000,
    nms_iou_threshold: float | None = 0.6,
    max_detections: int | None = 100,
) -> list[dict[str, torch.Tensor]]:
    """Detections per image in the input's pixel frame, as MMDetection's `predict_by_feat(rescale=False)`.

    Per level, the (prior, class) pairs whose class score exceeds `score_threshold`, at most `pre_nms_topk` of them;
    boxes clipped to the image; scores multiplied by the sigmoid of the centre-ness when given; empty boxes dropped;
    class-aware NMS and then the best `max_detections` (both skipped when `nms_iou_threshold` is None, as
    MMDetection's `with_nms=False`). Returns dicts with `boxes` (x1, y1, x2, y2), `scores` and `labels`, best first
    after NMS (level by level, each by class score, without).
    """
    scores = logits.detach().float().sigmoid()
    num_classes = scores.shape[-1]
    top_scores, top_indices, start = [], [], 0
    for size in level_sizes:
        level_scores = scores[:, start : start + size].flatten(1)
        level_scores = level_scores.masked_fill(level_scores <= score_threshold, -1)
        level_top, level_indices = level_scores.topk(min(pre_nms_topk, level_scores.shape[1]), dim=1)
        top_scores.append(level_top)
        top_indices.append(level_indices + start * num_classes)
        start += size
    top_scores, top_indices = torch.cat(top_scores, dim=1), torch.cat(top_indices, dim=1)
    prior_indices = torch.div(top_indices, num_classes, rounding_mode="floor")
    boxes = pred_boxes.detach().float().gather(1, prior_indices[..., None].expand(-1, -1, 4))
    limits = image_sizes.flip(-1).repeat(1, 2)[:, None].float()  # (B, 1, 4): w, h, w, h
    boxes = boxes.clamp(min=0).minimum(limits)
    keep = (top_scores > score_threshold) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])
    if centerness_logits is not None:
        top_scores = top_scores * centerness_logits.detach().float().sigmoid().gather(1, prior_indices)

    results = []
    for image in range(len(scores)):
        image_keep = keep[image].nonzero().squeeze(1)
        image_boxes, image_scores = boxes[image, image_keep], top_scores[image, image_keep]
        image_labels = top_indices[image, image_keep] % num_classes
        if nms_iou_threshold is not None:
            order = batched_nms(image_boxes, image_scores, image_labels, nms_iou_threshold)[:max_detections]
            image_boxes, image_scores, image_labels = image_boxes[order], image_scores[order], image_labels[order]
        results.append({"boxes": image_boxes, "scores": image_scores, "labels": image_labels})
    return results


__all__ = ["batched_nms", "detect"]
