"""Distillation losses for GFL detectors: CrossKD (cross-head), BCKD and PKD, as one configurable design space.

Which predictions mimic the teacher (the student's own head, or the student's towers continued through the teacher's
head: CrossKD's cross-head), the classification KD loss (quality-focal BCE on sigmoid targets), the localization KD
loss (KL on the box distributions, "LD", or GIoU on the decoded boxes, "IoU") and optional feature KD (PKD) are set
by [`DistillationConfig`]; the papers' settings are its presets.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..models.gfl.configuration_gfl import GFLConfig
from ..models.gfl.modeling_gfl import (
    GFLHead,
    GFLObjectDetectionOutput,
    GFLTargets,
    box_iou,
    distance_to_box,
    distribution_to_distance,
    flatten_levels,
    quality_focal_loss,
    reduce_mean,
)

KD_METHODS = ("crosskd", "crosskd+pkd", "bckd", "none")


@dataclass
class DistillationConfig:
    """Where the distillation losses apply and how they are weighted.

    Args:
        mimic: `"cross_head"` (CrossKD: the student's tower states after `cross_head_index` convs, re-standardised to
            the teacher's statistics, ReLU, then the teacher's remaining convs and predictors) or `"student"` (the
            student's own predictions, as BCKD).
        cross_head_index: number of the student's tower convs before the cross-head (CrossKD's
            `reused_teacher_head_idx`).
        cls_kd_weight, cls_kd_beta: weight and focusing exponent of the classification KD loss
            `BCE(s, sigmoid(t)) * |sigmoid(s) - sigmoid(t)| ** beta`.
        loc_kd: `"kl"` (KL divergence of the box distributions weighted by the teacher's max score), `"iou"` (GIoU
            between decoded student and teacher boxes on all priors, weighted by the largest score gap) or `"none"`.
        loc_kd_weight, loc_kd_temperature: weight of the localization KD loss; temperature of `"kl"`.
        feature_kd_weight: weight of PKD feature distillation on the FPN outputs (0 disables it).
        positive_levels_only: apply the KD losses only on FPN levels with at least one positive prior in the batch
            (BCKD's original code does this).
        quality_weight_offset, quality_norm_eps: the student's GFL box-loss weighting; BCKD uses `w + 2e-4` and
            `sum(w) + 1e-6` (see [`gfl_loss`]).
    """

    mimic: str = "cross_head"
    cross_head_index: int = 3
    cls_kd_weight: float = 1.0
    cls_kd_beta: float = 1.0
    loc_kd: str = "kl"
    loc_kd_weight: float = 4.0
    loc_kd_temperature: float = 1.0
    feature_kd_weight: float = 0.0
    positive_levels_only: bool = False
    quality_weight_offset: float = 0.0
    quality_norm_eps: float | None = None

    def __post_init__(self):
        if self.mimic not in ("cross_head", "student"):
            raise ValueError(f"mimic must be 'cross_head' or 'student', got {self.mimic!r}.")
        if self.loc_kd not in ("kl", "iou", "none"):
            raise ValueError(f"loc_kd must be 'kl', 'iou' or 'none', got {self.loc_kd!r}.")

    @classmethod
    def from_method(cls, method: str, **overrides) -> DistillationConfig | None:
        """The paper settings of `method` (`crosskd`, `crosskd+pkd`, `bckd`), with `overrides` (None values are
        ignored) applied; `none` (plain GFL training) gives None."""
        presets = {
            "crosskd": cls(),
            "crosskd+pkd": cls(feature_kd_weight=6.0),
            "bckd": cls(
                mimic="student",
                loc_kd="iou",
                positive_levels_only=True,
                quality_weight_offset=2e-4,
                quality_norm_eps=1e-6,
            ),
        }
        if method not in KD_METHODS:
            raise ValueError(f"Unknown kd_method {method!r}; choose one of {KD_METHODS}.")
        if method == "none":
            return None
        names = {f.name for f in fields(cls)}
        unknown = set(overrides) - names
        if unknown:
            raise ValueError(f"Unknown distillation settings {sorted(unknown)}.")
        return replace(presets[method], **{key: value for key, value in overrides.items() if value is not None})


def channel_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and unbiased std over batch and positions, `(1, C, 1, 1)` each; std 0 (not NaN) where a
    channel has one value (batch 1 on a 1x1 level). `Tensor.std`, whose backward is 0 (not NaN) on constant channels.
    """
    mean = features.mean(dim=(0, 2, 3), keepdim=True)
    if features.numel() == features.shape[1]:
        return mean, torch.zeros_like(mean)
    return mean, features.transpose(0, 1).flatten(1).std(dim=1)[None, :, None, None]


def standardize(features: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Per-channel standardisation over batch and positions (unbiased std, `eps` added to it)."""
    mean, std = channel_statistics(features)
    return (features - mean) / (std + eps)


def align_to(features: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """`features` re-standardised per channel to the mean and (unbiased) std of `reference` (CrossKD)."""
    mean, std = channel_statistics(reference)
    return standardize(features) * std + mean


def level_mask(positive: torch.Tensor, num_per_level: tuple[int, ...]) -> torch.Tensor:
    """`(Q,)` mask of the priors on levels that hold at least one positive of the batch."""
    has_positive = torch.stack([chunk.any() for chunk in positive.split(num_per_level, dim=1)])
    return has_positive.repeat_interleave(torch.tensor(num_per_level, device=positive.device))


def kd_classification_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weight: torch.Tensor,
    avg_factor: torch.Tensor,
    beta: float = 1.0,
) -> torch.Tensor:
    """Per-prior `sum_c BCE(s, sigmoid(t)) * |sigmoid(s) - sigmoid(t)| ** beta * weight / avg_factor`, `(B, Q)`."""
    return quality_focal_loss(student_logits, teacher_logits.sigmoid(), beta).sum(-1) * weight / avg_factor


def kd_distribution_loss(
    student_box_logits: torch.Tensor,
    teacher_box_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weight: torch.Tensor,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Per-prior KL(teacher || student) of the box distributions (summed over bins, averaged over sides), weighted by
    the teacher's max score, normalized by the sum of those weights: `(B, Q)`."""
    teacher_probs = (teacher_box_logits / temperature).softmax(-1)
    student_log_probs = (student_box_logits / temperature).log_softmax(-1)
    kl = F.kl_div(student_log_probs, teacher_probs, reduction="none").sum(-1) * temperature**2
    score_weight = teacher_logits.sigmoid().amax(-1) * weight
    return score_weight * kl.mean(-1) / reduce_mean(score_weight.sum())


def kd_box_iou_loss(
    student_boxes: torch.Tensor,
    teacher_boxes: torch.Tensor,
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    weight: torch.Tensor,
    avg_factor: torch.Tensor,
) -> torch.Tensor:
    """Per-prior GIoU loss between student and teacher boxes, weighted by the largest per-class score gap: `(B, Q)`."""
    score_gap = (teacher_logits.sigmoid() - student_logits.detach().sigmoid()).abs().amax(-1) * weight
    return score_gap * (1 - box_iou(student_boxes, teacher_boxes, generalized=True)) / avg_factor


def feature_kd_loss(student_features: list[torch.Tensor], teacher_features: list[torch.Tensor]) -> torch.Tensor:
    """PKD: half the mean squared difference of per-channel standardised features, summed over levels."""
    return sum(
        F.mse_loss(standardize(student.float()), standardize(teacher.float())) / 2
        for student, teacher in zip(student_features, teacher_features)
    )


class GFLDistillationLoss(nn.Module):
    """The KD losses between a GFL student and a frozen GFL teacher, plus the 1x1 adapters a narrower student needs.

    When the student's head (CrossKD) or FPN (PKD) is narrower than the teacher's, a learned 1x1 conv maps the
    student's features to the teacher's width (an hf_kd extension; the papers use equal widths).
    """

    def __init__(self, config: DistillationConfig, student_config: GFLConfig, teacher_config: GFLConfig):
        super().__init__()
        self.config = config
        check_compatible(config, student_config, teacher_config)
        self.cls_adapter = self.reg_adapter = self.feature_adapter = None
        if config.mimic == "cross_head" and student_config.head_channels != teacher_config.head_channels:
            self.cls_adapter = nn.Conv2d(student_config.head_channels, teacher_config.head_channels, 1)
            self.reg_adapter = nn.Conv2d(student_config.head_channels, teacher_config.head_channels, 1)
        if config.feature_kd_weight and student_config.fpn_channels != teacher_config.fpn_channels:
            self.feature_adapter = nn.Conv2d(student_config.fpn_channels, teacher_config.fpn_channels, 1)

    def cross_head_predictions(
        self, student: GFLObjectDetectionOutput, teacher: GFLObjectDetectionOutput, teacher_head: GFLHead
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The student's tower states, aligned to the teacher's statistics, through the rest of the teacher's head:
        logits `(B, Q, C)` and box-distribution logits `(B, Q, 4, reg_max + 1)`.

        The statistics are those of the activated states (after the ReLU of conv `cross_head_index`), as in the
        official CrossKD code, whose in-place ReLU overwrites the "pre-activation" tensor it keeps; the aligned
        states get a ReLU again before the teacher's next conv.
        """
        index = self.config.cross_head_index
        cls_maps, box_maps = [], []
        for level, states in enumerate(
            zip(student.cls_tower_states, student.reg_tower_states, teacher.cls_tower_states, teacher.reg_tower_states)
        ):
            student_cls, student_reg, teacher_cls, teacher_reg = states
            if self.cls_adapter is not None:
                student_cls, student_reg = self.cls_adapter(student_cls), self.reg_adapter(student_reg)
            cls_map, box_map = teacher_head.predict_from_tower_states(
                F.relu(align_to(student_cls, teacher_cls)), F.relu(align_to(student_reg, teacher_reg)), level, index
            )
            cls_maps.append(cls_map)
            box_maps.append(box_map)
        return flatten_levels(cls_maps), flatten_levels(box_maps).unflatten(-1, teacher.box_logits.shape[-2:])

    def forward(
        self,
        student: GFLObjectDetectionOutput,
        teacher: GFLObjectDetectionOutput,
        targets: GFLTargets,
        teacher_head: GFLHead,
    ) -> dict[str, torch.Tensor]:
        """KD losses: `loss_cls_kd` and `loss_loc_kd` as `(B, Q)` per-prior contributions, `loss_feature_kd` a
        scalar; each already weighted, their sums add to the training loss."""
        config = self.config
        weight = targets.valid.float()
        if config.positive_levels_only:
            weight = weight * level_mask(targets.positive, student.priors.num_per_level)
        if config.mimic == "cross_head":
            student_logits, student_box_logits = self.cross_head_predictions(student, teacher, teacher_head)
        else:
            student_logits, student_box_logits = student.logits, student.box_logits
        student_logits, student_box_logits = student_logits.float(), student_box_logits.float()
        teacher_logits, teacher_box_logits = teacher.logits.float(), teacher.box_logits.float()

        losses = {
            "loss_cls_kd": config.cls_kd_weight
            * kd_classification_loss(student_logits, teacher_logits, weight, targets.avg_factor, config.cls_kd_beta)
        }
        if config.loc_kd == "kl":
            losses["loss_loc_kd"] = config.loc_kd_weight * kd_distribution_loss(
                student_box_logits, teacher_box_logits, teacher_logits, weight, config.loc_kd_temperature
            )
        elif config.loc_kd == "iou":
            centers = student.priors.centers / student.priors.strides[:, None]
            losses["loss_loc_kd"] = config.loc_kd_weight * kd_box_iou_loss(
                distance_to_box(centers, distribution_to_distance(student_box_logits)),
                distance_to_box(centers, distribution_to_distance(teacher_box_logits)),
                student_logits,
                teacher_logits,
                weight,
                targets.avg_factor,
            )
        if config.feature_kd_weight:
            student_features = student.feature_maps
            if self.feature_adapter is not None:
                student_features = [self.feature_adapter(feature) for feature in student_features]
            losses["loss_feature_kd"] = config.feature_kd_weight * feature_kd_loss(
                student_features, teacher.feature_maps
            )
        return losses


def check_compatible(config: DistillationConfig, student: GFLConfig, teacher: GFLConfig) -> None:
    """Raises a ValueError when the student and the teacher cannot be distilled with `config`."""
    problems = []
    for name in ("num_labels", "reg_max", "strides", "prior_scale"):
        if getattr(student, name) != getattr(teacher, name):
            problems.append(f"{name}: student {getattr(student, name)} vs teacher {getattr(teacher, name)}")
    if config.mimic == "cross_head":
        if student.stacked_convs != teacher.stacked_convs:
            problems.append(
                f"stacked_convs: student {student.stacked_convs} vs teacher {teacher.stacked_convs} (CrossKD runs the "
                "student's towers into the teacher's)"
            )
        if not 1 <= config.cross_head_index <= teacher.stacked_convs:
            problems.append(f"cross_head_index {config.cross_head_index} not in [1, {teacher.stacked_convs}]")
    if problems:
        raise ValueError("The student and the teacher do not fit together: " + "; ".join(problems) + ".")


__all__ = ["DistillationConfig", "GFLDistillationLoss", "KD_METHODS", "check_compatible"]
