"""Box maths and box coders shared by every dense detector family.

Boxes are `(x1, y1, x2, y2)`; distances are `(left, top, right, bottom)` from a point to the sides of a box. The
IoU follows MMDetection's float32 order of operations, so that assignments decided by float ties (RetinaNet's
MaxIoU) come out the same.
"""

from __future__ import annotations

import math

import torch

# MMDetection's largest log-scale change of an anchor's width or height, |log(16 / 1000)|.
MAX_LOG_SCALE = abs(math.log(16 / 1000))


def box_area(boxes: torch.Tensor) -> torch.Tensor:
    """Areas of `(..., 4)` boxes."""
    return (boxes[..., 2] - boxes[..., 0]) * (boxes[..., 3] - boxes[..., 1])


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, generalized: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """IoU (or GIoU) of broadcastable `(..., 4)` box tensors; union and enclosing area are clamped to `eps`."""
    wh = (torch.minimum(boxes1[..., 2:], boxes2[..., 2:]) - torch.maximum(boxes1[..., :2], boxes2[..., :2])).clamp(
        min=0
    )
    overlap = wh[..., 0] * wh[..., 1]
    union = (box_area(boxes1) + box_area(boxes2) - overlap).clamp(min=eps)
    iou = overlap / union
    if not generalized:
        return iou
    enclose_wh = torch.maximum(boxes1[..., 2:], boxes2[..., 2:]) - torch.minimum(boxes1[..., :2], boxes2[..., :2])
    enclose_area = (enclose_wh[..., 0] * enclose_wh[..., 1]).clamp(min=eps)
    return iou - (enclose_area - union) / enclose_area


def box_centers(boxes: torch.Tensor) -> torch.Tensor:
    """Centres `(..., 2)` of `(..., 4)` boxes."""
    return (boxes[..., :2] + boxes[..., 2:]) / 2


def distance_to_box(points: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """Boxes from points `(..., 2)` and their distances `(..., 4)` to the four sides."""
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def box_to_distance(points: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Distances `(..., 4)` from points `(..., 2)` to the four sides of boxes `(..., 4)`."""
    return torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)


def centerness(distances: torch.Tensor) -> torch.Tensor:
    """FCOS/ATSS centre-ness `sqrt(min(l, r) / max(l, r) * min(t, b) / max(t, b))` of `(..., 4)` distances."""
    left_right, top_bottom = distances[..., 0::2], distances[..., 1::2]
    return ((left_right.amin(-1) / left_right.amax(-1)) * (top_bottom.amin(-1) / top_bottom.amax(-1))).sqrt()


def distribution_to_distance(box_logits: torch.Tensor) -> torch.Tensor:
    """Expected distance (in bins) of each side from its `(..., reg_max + 1)` distribution logits (GFL's integral)."""
    bins = torch.arange(box_logits.shape[-1], dtype=torch.float32, device=box_logits.device)
    return (box_logits.float().softmax(dim=-1) * bins).sum(-1)


class DeltaBoxCoder:
    """MMDetection's `DeltaXYWHBBoxCoder`: boxes as normalised centre offsets and log size ratios of an anchor.

    `deltas = ((dx, dy, dw, dh) - means) / stds` with `dx = (gx - px) / pw`, `dw = log(gw / pw)`; decoding clamps
    `dw, dh` to `max_log_scale` and does not clip to an image.
    """

    def __init__(
        self,
        stds: tuple[float, ...] = (1.0, 1.0, 1.0, 1.0),
        means: tuple[float, ...] = (0.0, 0.0, 0.0, 0.0),
        max_log_scale: float = MAX_LOG_SCALE,
    ):
        self.stds, self.means, self.max_log_scale = tuple(stds), tuple(means), max_log_scale

    def encode(self, anchors: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Deltas `(..., 4)` that take `anchors` to `boxes`."""
        anchor_centers, anchor_sizes = box_centers(anchors), anchors[..., 2:] - anchors[..., :2]
        centers, sizes = box_centers(boxes), boxes[..., 2:] - boxes[..., :2]
        deltas = torch.cat([(centers - anchor_centers) / anchor_sizes, torch.log(sizes / anchor_sizes)], dim=-1)
        return (deltas - deltas.new_tensor(self.means)) / deltas.new_tensor(self.stds)

    def decode(self, anchors: torch.Tensor, deltas: torch.Tensor) -> torch.Tensor:
        """Boxes `(..., 4)` from `anchors` and `deltas` (broadcastable)."""
        deltas = deltas * deltas.new_tensor(self.stds) + deltas.new_tensor(self.means)
        anchor_centers, anchor_sizes = box_centers(anchors), anchors[..., 2:] - anchors[..., :2]
        centers = anchor_centers + anchor_sizes * deltas[..., :2]
        sizes = anchor_sizes * deltas[..., 2:].clamp(min=-self.max_log_scale, max=self.max_log_scale).exp()
        return torch.cat([centers - sizes * 0.5, centers + sizes * 0.5], dim=-1)


__all__ = [
    "DeltaBoxCoder",
    "box_area",
    "box_centers",
    "box_iou",
    "box_to_distance",
    "centerness",
    "distance_to_box",
    "distribution_to_distance",
]
