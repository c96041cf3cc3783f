"""`DetectionDistiller`: the module a distillation run trains. It owns the student, the frozen teacher and the
adapters, knows the method, the precision policy and the order of work, and returns the loss and its components."""

from __future__ import annotations

from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from ..models.detection.modeling_dense import DenseDetectionOutput, DenseDetectorPreTrainedModel
from ..models.detection.priors import level_sizes
from .config import DistillationConfig
from .losses import align_to, box_kd, centerness_kd, classification_kd, distribution_kd, feature_kd


@dataclass
class DistillationOutput(ModelOutput):
    """
    Outputs of [`DetectionDistiller`].

    Args:
        loss (`torch.FloatTensor`): the training loss, the sum of `loss_dict`.
        loss_dict (`dict[str, torch.FloatTensor]`): every component: the student's detection losses (e.g.
            `loss_cls`, `loss_bbox`, `loss_dfl`) and the distillation losses (`loss_cls_kd`, `loss_loc_kd`,
            `loss_center_kd`, `loss_feature_kd`, those the method uses), each already weighted.
        label_problems (`torch.BoolTensor` of shape `(B, 4)`): which check of the labels each image fails (see
            `check_ground_truth`); checked by the caller, so that a training step waits for the device only once.
        image_sizes (`torch.LongTensor` of shape `(B, 2)`): (height, width) of each image inside the padded input.
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict[str, torch.FloatTensor] | None = None
    label_problems: torch.BoolTensor | None = None
    image_sizes: torch.LongTensor | None = None


class DistillationAdapters(nn.Module):
    """1x1 convs from a narrower student's head towers (CrossKD) and FPN (PKD) to the teacher's widths; empty when
    the widths agree (the papers' setting). An hf_kd extension, trained with the student."""

    def __init__(self, config: DistillationConfig, student_config, teacher_config):
        super().__init__()
        self.cls_adapter = self.reg_adapter = self.feature_adapter = None
        if config.mimic == "cross_head" and student_config.head_channels != teacher_config.head_channels:
            self.cls_adapter = nn.Conv2d(student_config.head_channels, teacher_config.head_channels, 1)
            self.reg_adapter = nn.Conv2d(student_config.head_channels, teacher_config.head_channels, 1)
        if config.feature_kd_weight and student_config.fpn_channels != teacher_config.fpn_channels:
            self.feature_adapter = nn.Conv2d(student_config.fpn_channels, teacher_config.fpn_channels, 1)

    def towers(self, cls_hidden: torch.Tensor, reg_hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.cls_adapter is None:
            return cls_hidden, reg_hidden
        return self.cls_adapter(cls_hidden), self.reg_adapter(reg_hidden)

    def features(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        return features if self.feature_adapter is None else [self.feature_adapter(feature) for feature in features]


def check_compatible(config: DistillationConfig, student_config, teacher_config) -> None:
    """Raises a ValueError, before any training, when `student` and `teacher` cannot be distilled with `config`."""
    if student_config.model_type != teacher_config.model_type:
        raise ValueError(
            f"The student is a {student_config.model_type!r} detector and the teacher a {teacher_config.model_type!r} "
            "one: distillation needs both of the same family (the same priors and box coding)."
        )
    problems = [
        f"{name}: student {getattr(student_config, name)} vs teacher {getattr(teacher_config, name)}"
        for name in student_config.prediction_settings
        if getattr(student_config, name) != getattr(teacher_config, name)
    ]
    if config.mimic == "cross_head":
        if student_config.stacked_convs != teacher_config.stacked_convs:
            problems.append(
                f"stacked_convs: student {student_config.stacked_convs} vs teacher {teacher_config.stacked_convs} "
                "(CrossKD runs the student's towers into the teacher's)"
            )
        if not 1 <= config.cross_head_index <= teacher_config.stacked_convs:
            problems.append(f"cross_head_index {config.cross_head_index} not in [1, {teacher_config.stacked_convs}]")
    if config.loc_kd == "kl" and student_config.model_type != "gfl":
        problems.append(f"loc_kd 'kl' needs GFL's box distributions; use 'iou' for {student_config.model_type!r}")
    if config.detection_loss_kwargs and student_config.model_type != "gfl":
        problems.append("quality_weight_offset and quality_norm_eps change GFL's loss only")
    if problems:
        raise ValueError("The student and the teacher do not fit together: " + "; ".join(problems) + ".")


class DetectionDistiller(nn.Module):
    """Trains a dense detector `student` against a frozen `teacher` of the same family with the losses of `config`
    (CrossKD, BCKD, PKD and the space between them); without a teacher (`config=None`) it trains the student alone.

    The teacher is kept out of the module tree: it is not in `state_dict()` (checkpoints hold the student and the
    adapters), not in `parameters()` (so not in the optimizer or DDP), stays in eval mode and runs without gradients,
    and moves with the distiller (`.to(...)`). Precision: the student runs in the surrounding autocast; the teacher
    in `teacher_dtype` (default: the same autocast), also when the student trains in float32; the cross-head (the
    teacher's last layers on the student's tower states, which the gradient flows through) in the student's
    precision; statistics, soft targets and losses in float32.
    """

    accepts_loss_kwargs = False

    def __init__(
        self,
        student: DenseDetectorPreTrainedModel,
        teacher: DenseDetectorPreTrainedModel | None = None,
        config: DistillationConfig | None = None,
        teacher_dtype: torch.dtype | None = None,
    ):
        super().__init__()
        if (teacher is None) != (config is None):
            raise ValueError("Give both a teacher and a distillation config, or neither (the student alone).")
        self.student = student
        self.config = config
        self.teacher_dtype = teacher_dtype
        self.adapters = None
        if teacher is not None:
            check_compatible(config, student.config, teacher.config)
            self.adapters = DistillationAdapters(config, student.config, teacher.config)
            teacher = teacher.eval().requires_grad_(False)
        object.__setattr__(self, "teacher", teacher)  # a plain attribute, not a submodule (see the class docstring)

    def activation_checkpointing_enable(self, activation_checkpointing_kwargs: dict | None = None, **kwargs) -> None:
        """Activation checkpointing of the student (what `--gradient_checkpointing` asks the Trainer for); the teacher
        keeps no activations for a backward pass anyway."""
        self.student.activation_checkpointing_enable(activation_checkpointing_kwargs, **kwargs)

    def _apply(self, fn, recurse: bool = True):
        if self.teacher is not None:
            self.teacher._apply(fn, recurse)
        return super()._apply(fn, recurse)

    def forward(
        self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None = None, labels: list[dict] | None = None
    ) -> DistillationOutput:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`), pixel_mask (`torch.BoolTensor` of shape
        `(B, H, W)`, *optional*), labels (`list[dict]`): as the student's `forward`.
        """
        if labels is None:
            raise ValueError("DetectionDistiller computes training losses: it needs `labels`.")
        student, config = self.student, self.config
        image_sizes = student.image_sizes_from_mask(pixel_values, pixel_mask)
        ground_truth = student.prepare_ground_truth(labels, image_sizes)
        depth = config.cross_head_index if config is not None and config.mimic == "cross_head" else 0

        features = student.extract_features(pixel_values)
        states = [student.head.forward_towers(feature, depth) for feature in features]
        maps = [student.head.forward_from(*state, level, depth) for level, state in enumerate(states)]
        outputs = student.detection_outputs(maps, features, image_sizes)
        device_type = pixel_values.device.type
        with torch.autocast(device_type, enabled=False):
            loss_dict, targets = student.loss_function(
                outputs, ground_truth, **(config.detection_loss_kwargs if config else {})
            )
        if self.teacher is not None:
            teacher_outputs, teacher_states = self._teacher_outputs(pixel_values, outputs, depth)
            mimic = outputs
            if config.mimic == "cross_head":
                mimic = self.cross_head_outputs(states, teacher_states, outputs)
            with torch.autocast(device_type, enabled=False):
                loss_maps = self.kd_loss_maps(mimic, teacher_outputs, targets)
                loss_dict.update({name: value.sum() for name, value in loss_maps.items()})
                if config.feature_kd_weight:
                    loss_dict["loss_feature_kd"] = config.feature_kd_weight * feature_kd(
                        self.adapters.features(list(features)), list(teacher_outputs.feature_maps)
                    )
        return DistillationOutput(
            loss=sum(loss_dict.values()),
            loss_dict=loss_dict,
            label_problems=ground_truth.problems,
            image_sizes=image_sizes,
        )

    def _teacher_autocast(self, device_type: str):
        if self.teacher_dtype is None:
            return nullcontext()
        return torch.autocast(device_type, dtype=self.teacher_dtype, enabled=self.teacher_dtype != torch.float32)

    @torch.no_grad()
    def _teacher_outputs(
        self, pixel_values: torch.Tensor, student_outputs: DenseDetectionOutput, depth: int
    ) -> tuple[DenseDetectionOutput, list[tuple[torch.Tensor, torch.Tensor]]]:
        """The teacher's outputs (priors and valid flags are the student's) and its tower states after `depth` convs."""
        teacher = self.teacher
        with self._teacher_autocast(pixel_values.device.type):
            features = teacher.extract_features(pixel_values)
            states = [teacher.head.forward_towers(feature, depth) for feature in features]
            maps = [teacher.head.forward_from(*state, level, depth) for level, state in enumerate(states)]
        return self._outputs_like(teacher, maps, features, student_outputs), states

    def cross_head_outputs(
        self,
        student_states: list[tuple[torch.Tensor, torch.Tensor]],
        teacher_states: list[tuple[torch.Tensor, torch.Tensor]],
        student_outputs: DenseDetectionOutput,
    ) -> DenseDetectionOutput:
        """CrossKD's cross-head: the student's tower states (through the adapters), re-standardised per channel to the
        teacher's statistics at the same depth, ReLU, then the rest of the teacher's head.

        The statistics are those of the activated states, as in the official code, whose in-place ReLU overwrites
        the "pre-activation" tensor it keeps; the aligned states get a ReLU again before the teacher's next conv.
        """
        depth, maps = self.config.cross_head_index, []
        for level, (student_state, teacher_state) in enumerate(zip(student_states, teacher_states)):
            cls_hidden, reg_hidden = self.adapters.towers(*student_state)
            cls_hidden = F.relu(align_to(cls_hidden, teacher_state[0]))
            reg_hidden = F.relu(align_to(reg_hidden, teacher_state[1]))
            maps.append(self.teacher.head.forward_from(cls_hidden, reg_hidden, level, depth))
        return self._outputs_like(self.teacher, maps, student_outputs.feature_maps, student_outputs)

    @staticmethod
    def _outputs_like(
        model: DenseDetectorPreTrainedModel,
        maps: list[tuple[torch.Tensor, ...]],
        features: list[torch.Tensor] | tuple[torch.Tensor, ...],
        reference: DenseDetectionOutput,
    ) -> DenseDetectionOutput:
        """`model`'s per-prior outputs from its head maps, on the priors of `reference` (same family and sizes)."""
        return model.detection_outputs(
            maps, list(features), reference.image_sizes, reference.priors, reference.valid_mask
        )

    def kd_loss_maps(
        self, student: DenseDetectionOutput, teacher: DenseDetectionOutput, targets
    ) -> dict[str, torch.Tensor]:
        """The prediction distillation losses as `(B, Q)` per-prior maps (each weighted; their sums are the losses):
        `loss_cls_kd`, and `loss_loc_kd` and `loss_center_kd` when the config uses them. `student` holds the
        predictions that mimic the teacher (the cross-head's or the student's own), `targets` the student's."""
        config = self.config
        weight = targets.label_weights
        if config.positive_levels_only:
            sizes = level_sizes(student.feature_maps, student.logits.shape[1])
            has_positive = [chunk.any() for chunk in targets.positive.split(sizes, dim=1)]
            weight = weight * torch.cat([flag.expand(size) for flag, size in zip(has_positive, sizes)])
        student_logits, teacher_logits = student.logits.float(), teacher.logits.float()
        losses = {
            "loss_cls_kd": config.cls_kd_weight
            * classification_kd(student_logits, teacher_logits, weight, targets.kd_avg_factor, config.cls_kd_beta)
        }
        if config.loc_kd == "kl":
            score = teacher_logits.sigmoid().amax(-1) * weight
            losses["loss_loc_kd"] = config.loc_kd_weight * distribution_kd(
                student.bbox_regression.float(), teacher.bbox_regression.float(), score, config.loc_kd_temperature
            )
        elif config.loc_kd != "none":
            if config.loc_kd_weighting == "teacher_score":
                box_weight = teacher_logits.sigmoid().amax(-1) * (weight > 0)
            else:
                box_weight = (teacher_logits.sigmoid() - student_logits.detach().sigmoid()).abs().amax(-1) * weight
            losses["loss_loc_kd"] = config.loc_kd_weight * box_kd(
                student.pred_boxes.float(),
                teacher.pred_boxes.float(),
                box_weight,
                targets.kd_avg_factor,
                config.loc_kd,
            )
        if config.center_kd_weight:
            losses["loss_center_kd"] = config.center_kd_weight * centerness_kd(
                student.centerness_logits.float(),
                teacher.centerness_logits.float(),
                targets.positive.float(),
                targets.kd_avg_factor,
            )
        return losses


__all__ = ["DetectionDistiller", "DistillationAdapters", "DistillationOutput", "check_compatible"]
