"""GFL (Generalized Focal Loss v1) dense object detector with a timm backbone, numerically matching MMDetection 3.3."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import nms
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .configuration_gfl import GFLConfig

INF = 1e8

# --------------------------------------------------------------------------------------------------------------------
# Box maths (boxes are x1, y1, x2, y2; distances are left, top, right, bottom from a point)
# --------------------------------------------------------------------------------------------------------------------


def distance_to_box(points: torch.Tensor, distances: torch.Tensor) -> torch.Tensor:
    """Boxes from points `(..., 2)` and their distances `(..., 4)` to the four sides."""
    return torch.cat([points - distances[..., :2], points + distances[..., 2:]], dim=-1)


def box_to_distance(points: torch.Tensor, boxes: torch.Tensor, max_distance: float | None = None) -> torch.Tensor:
    """Distances from points to the sides of boxes, clamped to `[0, max_distance - 0.1]` when given."""
    distances = torch.cat([points - boxes[..., :2], boxes[..., 2:] - points], dim=-1)
    if max_distance is not None:
        distances = distances.clamp(min=0, max=max_distance - 0.1)
    return distances


def box_iou(boxes1: torch.Tensor, boxes2: torch.Tensor, generalized: bool = False, eps: float = 1e-6) -> torch.Tensor:
    """IoU (or GIoU) of broadcastable box tensors; union and enclosing area are clamped to `eps`."""
    area1 = (boxes1[..., 2] - boxes1[..., 0]) * (boxes1[..., 3] - boxes1[..., 1])
    area2 = (boxes2[..., 2] - boxes2[..., 0]) * (boxes2[..., 3] - boxes2[..., 1])
    wh = (torch.minimum(boxes1[..., 2:], boxes2[..., 2:]) - torch.maximum(boxes1[..., :2], boxes2[..., :2])).clamp(
        min=0
    )
    overlap = wh[..., 0] * wh[..., 1]
    union = (area1 + area2 - overlap).clamp(min=eps)
    iou = overlap / union
    if not generalized:
        return iou
    enclose_wh = torch.maximum(boxes1[..., 2:], boxes2[..., 2:]) - torch.minimum(boxes1[..., :2], boxes2[..., :2])
    enclose_area = (enclose_wh[..., 0] * enclose_wh[..., 1]).clamp(min=eps)
    return iou - (enclose_area - union) / enclose_area


def distribution_to_distance(box_logits: torch.Tensor) -> torch.Tensor:
    """Expected distance (in bins) of each side from its `(..., reg_max + 1)` distribution logits."""
    bins = torch.arange(box_logits.shape[-1], dtype=torch.float32, device=box_logits.device)
    return (box_logits.float().softmax(dim=-1) * bins).sum(-1)  # elementwise: stays float32 under autocast


# --------------------------------------------------------------------------------------------------------------------
# Losses (per element, unreduced)
# --------------------------------------------------------------------------------------------------------------------


def quality_focal_loss(logits: torch.Tensor, targets: torch.Tensor, beta: float = 2.0) -> torch.Tensor:
    """Quality focal loss: BCE with soft targets, modulated by `|target - sigmoid(logit)| ** beta`."""
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


# --------------------------------------------------------------------------------------------------------------------
# Priors, targets and the GFL loss
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class GFLPriors:
    """One prior per feature-map location of every level, levels concatenated (row-major within a level)."""

    centers: torch.Tensor  # (Q, 2) x, y in pixels
    strides: torch.Tensor  # (Q,)
    boxes: torch.Tensor  # (Q, 4) square prior boxes in pixels
    num_per_level: tuple[int, ...]


def make_priors(
    spatial_shapes: tuple[tuple[int, int], ...], strides: tuple[int, ...], scale: float, device: torch.device
) -> GFLPriors:
    """Priors centred at `(x * stride, y * stride)` with side `scale * stride`, as MMDetection's anchor generator."""
    centers, prior_strides = [], []
    for (height, width), stride in zip(spatial_shapes, strides):
        ys, xs = torch.meshgrid(
            torch.arange(height, device=device, dtype=torch.float32) * stride,
            torch.arange(width, device=device, dtype=torch.float32) * stride,
            indexing="ij",
        )
        centers.append(torch.stack([xs.reshape(-1), ys.reshape(-1)], dim=-1))
        prior_strides.append(torch.full((height * width,), float(stride), device=device))
    centers = torch.cat(centers)
    prior_strides = torch.cat(prior_strides)
    half_side = (0.5 * scale * prior_strides)[:, None]
    boxes = torch.cat([centers - half_side, centers + half_side], dim=-1)
    return GFLPriors(centers, prior_strides, boxes, tuple(h * w for h, w in spatial_shapes))


def valid_prior_mask(
    image_sizes: torch.Tensor,
    spatial_shapes: tuple[tuple[int, int], ...],
    strides: tuple[int, ...],
    size_divisor: int,
) -> torch.Tensor:
    """`(B, Q)` mask of priors inside each image's own size rounded up to `size_divisor` (MMDetection valid flags)."""
    padded = torch.div(image_sizes + size_divisor - 1, size_divisor, rounding_mode="floor") * size_divisor
    masks = []
    for (height, width), stride in zip(spatial_shapes, strides):
        valid_h = torch.div(padded[:, 0] + stride - 1, stride, rounding_mode="floor")
        valid_w = torch.div(padded[:, 1] + stride - 1, stride, rounding_mode="floor")
        rows = torch.arange(height, device=image_sizes.device)[None, :, None] < valid_h[:, None, None]
        cols = torch.arange(width, device=image_sizes.device)[None, None, :] < valid_w[:, None, None]
        masks.append((rows & cols).reshape(len(image_sizes), -1))
    return torch.cat(masks, dim=1)


@dataclass
class GFLTargets:
    """Training targets of every prior of a batch."""

    labels: torch.Tensor  # (B, Q) class index, `num_classes` for background
    boxes: torch.Tensor  # (B, Q, 4) assigned ground-truth box in pixels (the prior box for negatives)
    positive: torch.Tensor  # (B, Q) bool
    valid: torch.Tensor  # (B, Q) bool, the priors that are assigned and weighted
    avg_factor: torch.Tensor  # () sum over images of max(num_positives, 1), averaged over processes


def pad_ground_truth(labels: list[dict], device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pads per-image `boxes`/`class_labels` to `(B, G, 4)`, `(B, G)` and a `(B, G)` mask, `G >= 1`."""
    num_gt = max([1] + [len(target["class_labels"]) for target in labels])  # one masked slot when all are empty
    boxes = torch.zeros(len(labels), num_gt, 4, device=device)
    classes = torch.zeros(len(labels), num_gt, dtype=torch.long, device=device)
    mask = torch.zeros(len(labels), num_gt, dtype=torch.bool, device=device)
    for index, target in enumerate(labels):
        count = len(target["class_labels"])
        boxes[index, :count] = target["boxes"].to(device=device, dtype=torch.float32)
        classes[index, :count] = target["class_labels"].to(device)
        mask[index, :count] = True
    return boxes, classes, mask


def atss_assign(
    priors: GFLPriors, valid: torch.Tensor, gt_boxes: torch.Tensor, gt_mask: torch.Tensor, topk: int = 9
) -> tuple[torch.Tensor, torch.Tensor]:
    """ATSS assignment, batched over images: returns the assigned ground-truth index `(B, Q)` and a positive mask.

    Per level and ground-truth box, the `topk` valid priors nearest to its centre are candidates; candidates whose IoU
    with the box reaches mean + std of the candidates' IoUs and whose centre lies inside the box are positive; a prior
    positive for several boxes takes the one it overlaps most.
    """
    overlaps = box_iou(priors.boxes[None, :, None, :], gt_boxes[:, None, :, :])  # (B, Q, G)
    gt_centers = (gt_boxes[..., :2] + gt_boxes[..., 2:]) / 2.0
    distances = (priors.centers[None, :, None, :] - gt_centers[:, None, :, :]).pow(2).sum(-1).sqrt()
    distances = distances.masked_fill(~valid[..., None], math.inf)

    candidates, start = [], 0
    for count in priors.num_per_level:
        level_distances = distances[:, start : start + count]
        candidates.append(level_distances.topk(min(topk, count), dim=1, largest=False).indices + start)
        start += count
    candidates = torch.cat(candidates, dim=1)  # (B, K, G)
    is_candidate = valid.gather(1, candidates.flatten(1)).view_as(candidates)
    candidate_overlaps = overlaps.gather(1, candidates)
    num_candidates = is_candidate.sum(1)
    mean = (candidate_overlaps * is_candidate).sum(1) / num_candidates
    variance = ((candidate_overlaps - mean[:, None]).pow(2) * is_candidate).sum(1) / (num_candidates - 1)
    threshold = mean + variance.sqrt()

    candidate_centers = priors.centers[candidates]  # (B, K, G, 2)
    inside = (
        torch.cat(
            [candidate_centers - gt_boxes[:, None, :, :2], gt_boxes[:, None, :, 2:] - candidate_centers], dim=-1
        ).amin(-1)
        > 0.01
    )
    positive = is_candidate & inside & (candidate_overlaps >= threshold[:, None]) & gt_mask[:, None, :]

    positive_overlaps = torch.full_like(overlaps, -INF)
    positive_overlaps.scatter_(1, candidates, torch.where(positive, candidate_overlaps, -INF))
    max_overlaps, assigned = positive_overlaps.max(dim=2)
    return assigned, max_overlaps != -INF


def reduce_mean(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over processes when torch.distributed is initialized (MMDetection's `reduce_mean`), else the tensor."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor.div_(torch.distributed.get_world_size()))
    return tensor


def assign_targets(outputs: GFLObjectDetectionOutput, labels: list[dict], topk: int = 9) -> GFLTargets:
    """ATSS targets for a batch of ground truth (`boxes` in pixels of the input, `class_labels`)."""
    priors, valid = outputs.priors, outputs.valid_mask
    gt_boxes, gt_classes, gt_mask = pad_ground_truth(labels, valid.device)
    assigned, positive = atss_assign(priors, valid, gt_boxes, gt_mask, topk)
    num_classes = outputs.logits.shape[-1]
    target_labels = torch.where(positive, gt_classes.gather(1, assigned), num_classes)
    target_boxes = gt_boxes.gather(1, assigned[..., None].expand(-1, -1, 4))
    target_boxes = torch.where(positive[..., None], target_boxes, priors.boxes)
    avg_factor = reduce_mean(positive.sum(1).clamp(min=1).sum().float())
    return GFLTargets(target_labels, target_boxes, positive, valid, avg_factor)


def gfl_loss(
    outputs: GFLObjectDetectionOutput,
    targets: GFLTargets,
    beta: float = 2.0,
    cls_weight: float = 1.0,
    bbox_weight: float = 2.0,
    dfl_weight: float = 0.25,
    quality_weight_offset: float = 0.0,
    quality_norm_eps: float | None = None,
) -> dict[str, torch.Tensor]:
    """GFL losses as `(B, Q)` per-prior contributions (their sum is the loss): `loss_cls`, `loss_bbox`, `loss_dfl`.

    Boxes are in stride units. The box losses of positives are weighted by their detached max class score `w`
    (plus `quality_weight_offset`) and divided by `max(sum w, 1)`, or by `sum w + quality_norm_eps` when given
    (BCKD's variant).
    """
    logits = outputs.logits.float()
    box_logits = outputs.box_logits.float()
    priors, positive = outputs.priors, targets.positive
    num_classes = logits.shape[-1]
    reg_max = box_logits.shape[-1] - 1

    centers = priors.centers / priors.strides[:, None]
    pred_boxes = distance_to_box(centers, distribution_to_distance(box_logits))
    target_boxes = targets.boxes / priors.strides[:, None]

    iou = box_iou(pred_boxes.detach(), target_boxes)
    quality = F.one_hot(targets.labels, num_classes + 1)[..., :num_classes] * torch.where(positive, iou, 0)[..., None]
    loss_cls = quality_focal_loss(logits, quality, beta).sum(-1) * targets.valid / targets.avg_factor

    weight = torch.where(positive, logits.detach().sigmoid().amax(-1) + quality_weight_offset, 0)
    if quality_norm_eps is None:
        weight_sum = reduce_mean(weight.sum()).clamp(min=1)
    else:
        weight_sum = reduce_mean(weight.sum()) + quality_norm_eps
    giou = box_iou(pred_boxes, target_boxes, generalized=True)
    loss_bbox = weight * (1 - giou) / weight_sum
    dfl = distribution_focal_loss(box_logits, box_to_distance(centers, target_boxes, reg_max)).mean(-1)
    loss_dfl = weight * dfl / weight_sum
    return {"loss_cls": cls_weight * loss_cls, "loss_bbox": bbox_weight * loss_bbox, "loss_dfl": dfl_weight * loss_dfl}


# --------------------------------------------------------------------------------------------------------------------
# Post-processing
# --------------------------------------------------------------------------------------------------------------------


def batched_nms(boxes: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, iou_threshold: float) -> torch.Tensor:
    """Class-aware NMS (MMCV's coordinate-offset trick, so decisions match MMDetection's); kept indices by score."""
    if boxes.numel() == 0:
        return torch.empty(0, dtype=torch.long, device=boxes.device)
    offsets = labels.to(boxes) * (boxes.max() + 1)
    return nms(boxes + offsets[:, None], scores, iou_threshold)


def detect(
    outputs: GFLObjectDetectionOutput,
    score_threshold: float = 0.05,
    pre_nms_topk: int = 1000,
    nms_iou_threshold: float | None = 0.6,
    max_detections: int | None = 100,
) -> list[dict[str, torch.Tensor]]:
    """Detections per image in the input's pixel frame, as MMDetection's `predict_by_feat(rescale=False)`.

    Per level, the (prior, class) pairs scoring above `score_threshold`, at most `pre_nms_topk` of them; boxes clipped
    to the image; empty boxes dropped; class-aware NMS and then the best `max_detections` (both skipped when
    `nms_iou_threshold` is None, as MMDetection's `with_nms=False`). Returns dicts with `boxes` (x1, y1, x2, y2),
    `scores` and `labels`, best first after NMS (level by level, by score, without).
    """
    scores = outputs.logits.detach().float().sigmoid()
    batch_size, _, num_classes = scores.shape
    candidates = []  # per level: (scores, flat indices) of shape (B, k)
    start = 0
    for count in outputs.priors.num_per_level:
        level_scores = scores[:, start : start + count].flatten(1)
        level_scores = level_scores.masked_fill(level_scores <= score_threshold, -1)
        top_scores, top_indices = level_scores.topk(min(pre_nms_topk, level_scores.shape[1]), dim=1)
        candidates.append((top_scores, top_indices + start * num_classes))
        start += count
    top_scores = torch.cat([level[0] for level in candidates], dim=1)
    top_indices = torch.cat([level[1] for level in candidates], dim=1)
    prior_indices = torch.div(top_indices, num_classes, rounding_mode="floor")
    boxes = outputs.pred_boxes.detach().float().gather(1, prior_indices[..., None].expand(-1, -1, 4))
    limits = outputs.image_sizes.flip(-1).repeat(1, 2)[:, None].float()  # (B, 1, 4): w, h, w, h
    boxes = boxes.clamp(min=0).minimum(limits)
    keep = (top_scores > score_threshold) & (boxes[..., 2] > boxes[..., 0]) & (boxes[..., 3] > boxes[..., 1])

    results = []
    for image in range(batch_size):
        image_keep = keep[image].nonzero().squeeze(1)
        image_boxes, image_scores = boxes[image, image_keep], top_scores[image, image_keep]
        image_labels = top_indices[image, image_keep] % num_classes
        if nms_iou_threshold is not None:
            order = batched_nms(image_boxes, image_scores, image_labels, nms_iou_threshold)[:max_detections]
            image_boxes, image_scores, image_labels = image_boxes[order], image_scores[order], image_labels[order]
        results.append({"boxes": image_boxes, "scores": image_scores, "labels": image_labels})
    return results


# --------------------------------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------------------------------


class GFLFPN(nn.Module):
    """FPN on the stride 8/16/32 features, plus two stride-2 convs on the top output (P6, P7)."""

    def __init__(self, in_channels: list[int], out_channels: int, num_extra_levels: int = 2):
        super().__init__()
        self.lateral_convs = nn.ModuleList(nn.Conv2d(channels, out_channels, 1) for channels in in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        self.fpn_convs.extend(
            nn.Conv2d(out_channels, out_channels, 3, stride=2, padding=1) for _ in range(num_extra_levels)
        )

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(feature) for conv, feature in zip(self.lateral_convs, features)]
        for index in range(len(laterals) - 1, 0, -1):
            upsampled = F.interpolate(laterals[index], size=laterals[index - 1].shape[-2:], mode="nearest")
            laterals[index - 1] = laterals[index - 1] + upsampled
        outputs = [self.fpn_convs[index](lateral) for index, lateral in enumerate(laterals)]
        for conv in self.fpn_convs[len(laterals) :]:
            outputs.append(conv(outputs[-1]))
        return outputs


class GFLGroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` that also trains on one image whose groups hold a single value (one channel per group on a 1x1
    P7 map): the statistics are per image, so torch's batch-size check for that case does not apply, and the output
    is the same as for that image within a larger batch."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.group_norm(hidden_states, self.num_groups, self.weight, self.bias, self.eps)


class GFLConvNormAct(nn.Module):
    """3x3 conv (no bias), GroupNorm, ReLU."""

    def __init__(self, in_channels: int, out_channels: int, num_groups: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=False)
        self.norm = GFLGroupNorm(num_groups, out_channels)

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(hidden_states)))


class GFLScale(nn.Module):
    """A learnable scalar multiplier (one per FPN level for the box branch)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.scale


class GFLHead(nn.Module):
    """The GFL head, shared over levels: a classification and a regression tower, then the two predictors.

    `tower_states(x, k)` runs both towers through their first `k` convs and `predict_from_tower_states(cls, reg,
    level, k)` continues from there; CrossKD feeds the student's states to the teacher's remaining layers this way.
    """

    def __init__(self, config: GFLConfig):
        super().__init__()
        channels, groups = config.head_channels, config.norm_groups
        in_channels = [config.fpn_channels] + [channels] * (config.stacked_convs - 1)
        self.cls_convs = nn.ModuleList(GFLConvNormAct(c, channels, groups) for c in in_channels)
        self.reg_convs = nn.ModuleList(GFLConvNormAct(c, channels, groups) for c in in_channels)
        self.gfl_cls = nn.Conv2d(channels, config.num_labels, 3, padding=1)
        self.gfl_reg = nn.Conv2d(channels, 4 * (config.reg_max + 1), 3, padding=1)
        self.scales = nn.ModuleList(GFLScale() for _ in config.strides)

    def tower_states(self, feature: torch.Tensor, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs of the first `index` convs (each conv, GroupNorm, ReLU) of the classification and regression towers."""
        cls_hidden = reg_hidden = feature
        for cls_conv, reg_conv in zip(self.cls_convs[:index], self.reg_convs[:index]):
            cls_hidden, reg_hidden = cls_conv(cls_hidden), reg_conv(reg_hidden)
        return cls_hidden, reg_hidden

    def predict_from_tower_states(
        self, cls_hidden: torch.Tensor, reg_hidden: torch.Tensor, level: int, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Classification logits `(B, C, H, W)` and box-distribution logits `(B, 4 * (reg_max + 1), H, W)` from the
        tower states after `index` convs."""
        for cls_conv, reg_conv in zip(self.cls_convs[index:], self.reg_convs[index:]):
            cls_hidden, reg_hidden = cls_conv(cls_hidden), reg_conv(reg_hidden)
        return self.gfl_cls(cls_hidden), self.scales[level](self.gfl_reg(reg_hidden)).float()


def flatten_levels(level_maps: list[torch.Tensor]) -> torch.Tensor:
    """Per-level `(B, C, H, W)` maps to one `(B, sum H*W, C)` tensor, levels concatenated, row-major."""
    return torch.cat([level_map.flatten(2).transpose(1, 2) for level_map in level_maps], dim=1)


# --------------------------------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class GFLObjectDetectionOutput(ModelOutput):
    """
    Outputs of [`GFLForObjectDetection`]. `Q` is the number of priors of the batch's feature maps, all levels.

    Args:
        loss (`torch.FloatTensor`, *optional*): total GFL loss, when `labels` are given.
        loss_dict (`dict[str, torch.FloatTensor]`, *optional*): `loss_cls`, `loss_bbox`, `loss_dfl`.
        logits (`torch.FloatTensor` of shape `(B, Q, num_labels)`): classification-quality logits (sigmoid = score).
        box_logits (`torch.FloatTensor` of shape `(B, Q, 4, reg_max + 1)`): distribution logits of the distances
            to the left, top, right and bottom sides, in units of the prior's stride.
        pred_boxes (`torch.FloatTensor` of shape `(B, Q, 4)`): decoded boxes, absolute (x1, y1, x2, y2) pixels of the
            input `pixel_values` (not normalized, not clipped).
        image_sizes (`torch.LongTensor` of shape `(B, 2)`): (height, width) of each image inside the padded input.
        valid_mask (`torch.BoolTensor` of shape `(B, Q)`): priors that lie on each image's own (padded) area.
        priors ([`GFLPriors`]): prior centres, strides and boxes.
        spatial_shapes (`tuple[tuple[int, int]]`): (height, width) of each level's feature map.
        feature_maps (`tuple[torch.FloatTensor]`): FPN outputs, one per level.
        cls_tower_states, reg_tower_states (`tuple[torch.FloatTensor]`, *optional*): per level, the output of the
            head towers' first `tower_state_index` convs, when requested.
        detections (`list[dict]`, *optional*): per image `boxes`, `scores`, `labels` after NMS, in the input frame.
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict[str, torch.FloatTensor] | None = None
    logits: torch.FloatTensor | None = None
    box_logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    image_sizes: torch.LongTensor | None = None
    valid_mask: torch.BoolTensor | None = None
    priors: GFLPriors | None = None
    spatial_shapes: tuple[tuple[int, int], ...] | None = None
    feature_maps: tuple[torch.FloatTensor, ...] | None = None
    cls_tower_states: tuple[torch.FloatTensor, ...] | None = None
    reg_tower_states: tuple[torch.FloatTensor, ...] | None = None
    detections: list[dict[str, torch.Tensor]] | None = None


def create_backbone(config: GFLConfig, pretrained: bool = False, checkpoint_path: str | None = None) -> nn.Module:
    """The timm feature extractor for `config.backbone`, returning the stride 8/16/32 features."""
    kwargs = dict(config.backbone_kwargs or {})
    if checkpoint_path is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(checkpoint_path)}
    if config.backbone_out_indices is not None:
        kwargs["out_indices"] = tuple(config.backbone_out_indices)
    if not timm.is_model(config.backbone):
        raise ValueError(
            f"Unknown timm backbone {config.backbone!r}; see `timm.list_models()` for the available names."
        )
    try:
        backbone = timm.create_model(config.backbone, pretrained=pretrained, features_only=True, **kwargs)
    except RuntimeError as error:
        raise ValueError(f"timm cannot build {config.backbone!r} as a feature extractor: {error}") from error
    if getattr(backbone, "output_fmt", "NCHW") != "NCHW":
        raise ValueError(
            f"Backbone {config.backbone!r} returns {backbone.output_fmt} features; GFL needs NCHW feature maps."
        )
    reductions = backbone.feature_info.reduction()
    if config.backbone_out_indices is None:
        if not {8, 16, 32} <= set(reductions):
            raise ValueError(
                f"Backbone {config.backbone!r} has features at strides {reductions}; GFL needs strides 8, 16 and 32."
            )
        config.backbone_out_indices = [reductions.index(stride) for stride in (8, 16, 32)]
        return create_backbone(config, pretrained, checkpoint_path)
    if reductions != [8, 16, 32]:
        raise ValueError(
            f"backbone_out_indices {list(config.backbone_out_indices)} of {config.backbone!r} give strides "
            f"{reductions}; GFL needs strides 8, 16 and 32."
        )
    return backbone


class GFLPreTrainedModel(PreTrainedModel):
    config: GFLConfig
    config_class = GFLConfig
    base_model_prefix = "gfl"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    accepts_loss_kwargs = False
    _no_split_modules = ["GFLHead"]
    # 1x1 adapters a narrower student learns during distillation (DistillationTrainer); not part of the detector.
    _keys_to_ignore_on_load_unexpected = [r"^distillation_adapters\."]

    def _init_weights(self, module: nn.Module) -> None:
        """MMDetection's init: Xavier-uniform FPN convs; normal(0, initializer_range) head convs, the classifier's bias
        at the prior probability; GroupNorm (1, 0); scales 1. The timm backbone keeps timm's own init (its modules are
        marked initialised when it is built)."""
        if isinstance(module, GFLScale):
            init.ones_(module.scale)
        elif isinstance(module, nn.GroupNorm):
            init.ones_(module.weight)
            init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            if any(module is conv for conv in self.neck.modules()):
                init.xavier_uniform_(module.weight)
            else:
                init.normal_(module.weight, std=self.config.initializer_range)
            if module.bias is not None:
                init.zeros_(module.bias)
            if module is self.head.gfl_cls:
                prior_prob = self.config.prior_prob
                init.constant_(module.bias, -math.log((1 - prior_prob) / prior_prob))


class GFLForObjectDetection(GFLPreTrainedModel):
    """GFL detector: timm backbone (C3-C5), FPN (P3-P7), shared GFL head; ATSS + QFL/DFL/GIoU losses when `labels` are
    given; MMDetection's test-time post-processing in `detections` in eval mode."""

    def __init__(self, config: GFLConfig):
        super().__init__(config)
        self.backbone = create_backbone(config)
        for module in self.backbone.modules():  # keep timm's initialisation
            module._is_hf_initialized = True
        self.neck = GFLFPN(self.backbone.feature_info.channels(), config.fpn_channels, len(config.strides) - 3)
        self.head = GFLHead(config)
        self._freeze_backbone_stages()
        self.post_init()

    @classmethod
    def from_pretrained_backbone(
        cls, config: GFLConfig, checkpoint_path: str | None = None, **backbone_kwargs
    ) -> GFLForObjectDetection:
        """A new detector whose backbone has timm's pretrained weights: from `checkpoint_path` (a local timm-format
        state dict, `.pth`/`.bin`/`.safetensors`) or, without it, timm's own download (needs the Hub)."""
        model = cls(config)
        model.load_pretrained_backbone(checkpoint_path)
        return model

    def load_pretrained_backbone(self, checkpoint_path: str | None = None) -> None:
        """Loads timm pretrained weights (incl. BatchNorm statistics) into the backbone."""
        pretrained = create_backbone(self.config, pretrained=True, checkpoint_path=checkpoint_path)
        self.backbone.load_state_dict(pretrained.state_dict())

    def _freeze_backbone_stages(self) -> None:
        """Stops gradients to the stem and the first `backbone_frozen_stages` stages (stage 1 has stride 4)."""
        num_stages = self.config.backbone_frozen_stages
        if num_stages < 0:
            return
        stages = [entry["module"] for entry in self.backbone.feature_info.info if entry["reduction"] >= 4]
        if num_stages > len(stages):
            raise ValueError(f"backbone_frozen_stages={num_stages}, but {self.config.backbone!r} has {len(stages)}.")

        def in_stage(name: str, stage: str) -> bool:  # timm flattens "stages.0" to "stages_0" in some models
            return name.startswith(f"{stage}.") or name.startswith(f"{stage.replace('.', '_')}.")

        parameters = list(self.backbone.named_parameters())
        if num_stages == 0:
            stop = next(i for i, (name, _) in enumerate(parameters) if in_stage(name, stages[0]))
        else:
            stop = 1 + max(i for i, (name, _) in enumerate(parameters) if in_stage(name, stages[num_stages - 1]))
        for _, parameter in parameters[:stop]:
            parameter.requires_grad_(False)

    def train(self, mode: bool = True) -> GFLForObjectDetection:
        super().train(mode)
        if mode:
            for module in self.backbone.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
                    self.config.freeze_backbone_norm or not any(p.requires_grad for p in module.parameters())
                ):
                    module.eval()
        return self

    def image_sizes_from_mask(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
        """(height, width) of each image inside the padded batch (the whole input without a mask)."""
        if pixel_mask is None:
            height, width = pixel_values.shape[-2:]
            return torch.tensor([[height, width]], device=pixel_values.device).expand(len(pixel_values), 2)
        return torch.stack([pixel_mask[:, :, 0].sum(1), pixel_mask[:, 0, :].sum(1)], dim=1).long()

    def head_outputs(
        self,
        feature_maps: list[torch.Tensor],
        image_sizes: torch.Tensor,
        tower_state_index: int | None = None,
    ) -> GFLObjectDetectionOutput:
        """Runs the head on FPN outputs: per-prior logits, box distributions, decoded boxes, priors and valid mask."""
        index = tower_state_index or self.config.stacked_convs
        cls_maps, box_maps, cls_states, reg_states = [], [], [], []
        for level, feature in enumerate(feature_maps):
            cls_state, reg_state = self.head.tower_states(feature, index)
            cls_map, box_map = self.head.predict_from_tower_states(cls_state, reg_state, level, index)
            cls_maps.append(cls_map)
            box_maps.append(box_map)
            cls_states.append(cls_state)
            reg_states.append(reg_state)

        spatial_shapes = tuple(tuple(feature.shape[-2:]) for feature in feature_maps)
        priors = make_priors(spatial_shapes, self.config.strides, self.config.prior_scale, feature_maps[0].device)
        box_logits = flatten_levels(box_maps).unflatten(-1, (4, self.config.reg_max + 1))
        distances = distribution_to_distance(box_logits.float()) * priors.strides[:, None]
        return GFLObjectDetectionOutput(
            logits=flatten_levels(cls_maps),
            box_logits=box_logits,
            pred_boxes=distance_to_box(priors.centers, distances),
            image_sizes=image_sizes,
            valid_mask=valid_prior_mask(image_sizes, spatial_shapes, self.config.strides, self.config.size_divisor),
            priors=priors,
            spatial_shapes=spatial_shapes,
            feature_maps=tuple(feature_maps),
            cls_tower_states=tuple(cls_states) if tower_state_index else None,
            reg_tower_states=tuple(reg_states) if tower_state_index else None,
        )

    def loss_terms(
        self,
        outputs: GFLObjectDetectionOutput,
        labels: list[dict],
        quality_weight_offset: float = 0.0,
        quality_norm_eps: float | None = None,
    ) -> tuple[dict[str, torch.Tensor], GFLTargets]:
        """Checks `labels`, assigns ATSS targets and returns the per-prior GFL losses (see [`gfl_loss`]) and targets."""
        validate_labels(labels, outputs.image_sizes, self.config.num_labels)
        targets = assign_targets(outputs, labels, self.config.atss_topk)
        with torch.autocast(outputs.logits.device.type, enabled=False):
            terms = gfl_loss(
                outputs,
                targets,
                beta=self.config.qfl_beta,
                cls_weight=self.config.loss_cls_weight,
                bbox_weight=self.config.loss_bbox_weight,
                dfl_weight=self.config.loss_dfl_weight,
                quality_weight_offset=quality_weight_offset,
                quality_norm_eps=quality_norm_eps,
            )
        return terms, targets

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict] | None = None,
        tower_state_index: int | None = None,
        output_detections: bool | None = None,
        return_dict: bool | None = None,
    ) -> GFLObjectDetectionOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): normalized images, zero-padded bottom/right.
        pixel_mask (`torch.BoolTensor` of shape `(B, H, W)`, *optional*): True (or 1) on real pixels, False on padding.
        labels (`list[dict]`, *optional*): per image `boxes` `(n, 4)` absolute (x1, y1, x2, y2) pixels of
            `pixel_values` and `class_labels` `(n,)`; crowd boxes left out.
        tower_state_index (`int`, *optional*): also return the head towers' states after this many convs.
        output_detections (`bool`, *optional*): run post-processing; defaults to True in eval mode without labels.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        expected_channels = (self.config.backbone_kwargs or {}).get("in_chans", 3)
        if pixel_values.ndim != 4 or pixel_values.shape[1] != expected_channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {expected_channels}, height, width), got "
                f"{tuple(pixel_values.shape)}."
            )
        image_sizes = self.image_sizes_from_mask(pixel_values, pixel_mask)
        outputs = self.head_outputs(self.neck(self.backbone(pixel_values)), image_sizes, tower_state_index)
        if labels is not None:
            loss_terms, _ = self.loss_terms(outputs, labels)
            outputs.loss_dict = {name: value.sum() for name, value in loss_terms.items()}
            outputs.loss = sum(outputs.loss_dict.values())
        if output_detections if output_detections is not None else (not self.training and labels is None):
            outputs.detections = detect(
                outputs,
                self.config.score_threshold,
                self.config.pre_nms_topk,
                self.config.nms_iou_threshold,
                self.config.max_detections,
            )
        return outputs if return_dict else outputs.to_tuple()


class _PipelineSupportFilter(logging.Filter):
    """Drops the error "The model 'GFLForObjectDetection' is not supported for object-detection": the pipeline checks
    only transformers' own model names, not the Auto classes a model is registered with, and runs GFL as it should."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(f"The model '{GFLForObjectDetection.__name__}' is not supported")


logging.getLogger("transformers.pipelines.base").addFilter(_PipelineSupportFilter())


def validate_labels(labels: list[dict], image_sizes: torch.Tensor, num_classes: int) -> None:
    """Raises a ValueError naming the image and field of the first malformed ground truth."""
    if len(labels) != len(image_sizes):
        raise ValueError(f"Got {len(labels)} label dicts for a batch of {len(image_sizes)} images.")
    for index, target in enumerate(labels):
        missing = {"boxes", "class_labels"} - set(target)
        if missing:
            raise ValueError(f"labels[{index}] lacks {sorted(missing)}.")
        boxes, classes = target["boxes"], target["class_labels"]
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or len(boxes) != len(classes):
            raise ValueError(
                f"labels[{index}]: boxes must be (n, 4) with one class label each, got boxes {tuple(boxes.shape)} "
                f"and class_labels {tuple(classes.shape)}."
            )
    checks = []
    for target, (height, width) in zip(labels, image_sizes):
        boxes, classes = target["boxes"].float(), target["class_labels"]
        checks.append(
            torch.stack(
                [
                    (~boxes.isfinite().all(-1)).any(),
                    ((boxes[:, 2] < boxes[:, 0]) | (boxes[:, 3] < boxes[:, 1])).any(),
                    (
                        (boxes[:, 2] <= 0)
                        | (boxes[:, 3] <= 0)
                        | (boxes[:, 0] >= width.to(boxes))
                        | (boxes[:, 1] >= height.to(boxes))
                    ).any(),
                    ((classes < 0) | (classes >= num_classes)).any(),
                ]
            ).to(image_sizes.device)
        )
    if not checks:
        return
    problems = torch.stack(checks).cpu()  # the one host synchronisation of the labels check
    if not problems.any():
        return
    image, problem = problems.nonzero()[0].tolist()
    target = labels[image]
    image_id = target.get("image_id", image)
    image_id = image_id.item() if isinstance(image_id, torch.Tensor) else image_id
    height, width = image_sizes[image].tolist()
    message = [
        "boxes contain NaN or infinite values",
        "boxes have negative width or height (boxes must be x1, y1, x2, y2 with x2 >= x1 and y2 >= y1)",
        f"boxes lie entirely outside the {height}x{width} image (boxes must be absolute pixels of pixel_values)",
        f"class_labels must be in [0, {num_classes - 1}]",
    ][problem]
    raise ValueError(
        f"labels of image {image_id} (batch index {image}): {message}; got boxes "
        f"{target['boxes'].tolist()} and class_labels {target['class_labels'].tolist()}."
    )


__all__ = [
    "GFLForObjectDetection",
    "GFLObjectDetectionOutput",
    "GFLPreTrainedModel",
    "GFLPriors",
    "GFLTargets",
    "assign_targets",
    "detect",
    "gfl_loss",
]
