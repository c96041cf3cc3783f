"""What every dense detector family shares as a transformers model: the outputs, the initialisation, the frozen
backbone parts, and the forward pass (backbone, FPN, head, priors, decoding, loss)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.utils import ModelOutput

from .assigners import DenseTargets
from .backbone import (
    backbone_features,
    create_backbone,
    freeze_stages,
    keep_frozen_norms_in_eval,
    non_persistent_buffers,
)
from .fpn import FeaturePyramid
from .ground_truth import GroundTruth, check_ground_truth, prepare_ground_truth
from .heads import DenseHead, Scale, flatten_levels
from .priors import valid_flags


@dataclass
class DenseDetectionOutput(ModelOutput):
    """
    Outputs of a dense detector (`...ForObjectDetection`). `Q` is the number of priors of the batch's pyramid levels
    (anchors or points; levels in order, locations row-major, the priors of a location together).

    Args:
        loss (`torch.FloatTensor`, *optional*): total detection loss, when `labels` are given.
        loss_dict (`dict[str, torch.FloatTensor]`, *optional*): its components (the family's loss names).
        logits (`torch.FloatTensor` of shape `(B, Q, num_labels)`): classification logits (sigmoid = score).
        pred_boxes (`torch.FloatTensor` of shape `(B, Q, 4)`): decoded boxes, absolute (x1, y1, x2, y2) pixels of the
            input `pixel_values` (not normalized, not clipped to the image).
        bbox_regression (`torch.FloatTensor`): the head's raw box output, `(B, Q, 4)` (RetinaNet and ATSS: anchor
            deltas; FCOS: distances in pixels) or `(B, Q, 4, reg_max + 1)` (GFL: distribution logits of the
            distances in units of the level's stride).
        centerness_logits (`torch.FloatTensor` of shape `(B, Q)`, *optional*): centre-ness logits (FCOS, ATSS); the
            detection score is `sigmoid(logits) * sigmoid(centerness_logits)`.
        priors (`torch.FloatTensor` of shape `(Q, 4)` or `(Q, 2)`): anchor boxes, or points (FCOS), in input pixels.
        valid_mask (`torch.BoolTensor` of shape `(B, Q)`): priors that lie on each image's own (padded) area.
        image_sizes (`torch.LongTensor` of shape `(B, 2)`): (height, width) of each image inside the padded input.
        feature_maps (`tuple[torch.FloatTensor]`): FPN outputs, one `(B, C, H, W)` map per level.
    """

    loss: torch.FloatTensor | None = None
    loss_dict: dict[str, torch.FloatTensor] | None = None
    logits: torch.FloatTensor | None = None
    pred_boxes: torch.FloatTensor | None = None
    bbox_regression: torch.FloatTensor | None = None
    centerness_logits: torch.FloatTensor | None = None
    priors: torch.FloatTensor | None = None
    valid_mask: torch.BoolTensor | None = None
    image_sizes: torch.LongTensor | None = None
    feature_maps: tuple[torch.FloatTensor, ...] | None = None


class DenseLoss:
    """A family's training targets and losses: `targets` (its assignment rules) and `loss_maps` (per-prior `(B, Q)`
    maps whose sums are the losses, each already weighted), which subclasses implement; calling it gives both."""

    def __init__(self, config):
        self.config = config

    def targets(self, outputs: DenseDetectionOutput, ground_truth: GroundTruth) -> DenseTargets:
        raise NotImplementedError

    def loss_maps(self, outputs: DenseDetectionOutput, targets: DenseTargets, **kwargs) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(
        self, outputs: DenseDetectionOutput, ground_truth: GroundTruth, **loss_kwargs
    ) -> tuple[dict[str, torch.Tensor], DenseTargets]:
        """The losses (scalars) and the targets they were computed from."""
        targets = self.targets(outputs, ground_truth)
        maps = self.loss_maps(outputs, targets, **loss_kwargs)
        return {name: value.sum() for name, value in maps.items()}, targets


class DenseDetectorPreTrainedModel(PreTrainedModel):
    """A dense detector: timm backbone (C3-C5), [`FeaturePyramid`] (P3-P7), a [`DenseHead`] shared over the levels.

    A family's `...ForObjectDetection` builds `backbone`, `neck` and `head` in `__init__`, sets `loss_function` (its
    targets and losses) and implements [`make_priors`] and [`decode_boxes`]; everything else is here.
    """

    base_model_prefix = "model"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    accepts_loss_kwargs = False
    supports_gradient_checkpointing = True
    # 1x1 adapters that students distilled by hf_kd 0.1 carried in their weights; not part of the detector.
    _keys_to_ignore_on_load_unexpected = [r"^distillation_adapters\."]

    backbone: nn.Module
    neck: FeaturePyramid
    head: DenseHead
    priors_per_location: int = 1

    def build_detector(self, head: DenseHead) -> None:
        """Creates the backbone and the FPN from the config, takes the family's `head`, and freezes what the config
        freezes. Called by a family's `__init__` before `post_init()`."""
        config = self.config
        self.backbone = create_backbone(config)
        for module in self.backbone.modules():  # keep timm's init, except for buffers that state dicts leave out
            module._is_hf_initialized = not module._non_persistent_buffers_set
        self.neck = FeaturePyramid(
            self.backbone.feature_info.channels(),
            config.fpn_channels,
            len(config.strides),
            extra_convs_on=config.fpn_extra_convs_on,
            relu_before_extra_convs=config.fpn_relu_before_extra_convs,
        )
        self.head = head
        freeze_stages(self.backbone, config.backbone_frozen_stages, config.backbone)

    def _init_weights(self, module: nn.Module) -> None:
        """MMDetection's init: Xavier-uniform FPN convs; normal(0, initializer_range) head convs, the classifier's bias
        at the prior probability; GroupNorm (1, 0); scales 1. The timm backbone keeps timm's own init; the buffers its
        state dict leaves out (e.g. Swin's relative-position indices), which `from_pretrained` does not load, get the
        values of a freshly built backbone."""
        if module._non_persistent_buffers_set:
            prefix = next(name for name, candidate in self.backbone.named_modules() if candidate is module)
            for name in module._non_persistent_buffers_set:
                init.copy_(getattr(module, name), self._reference_backbone_buffers()[f"{prefix}.{name}".lstrip(".")])
        elif isinstance(module, Scale):
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
            if module is self.head.classifier:
                prior_prob = self.config.prior_prob
                init.constant_(module.bias, -math.log((1 - prior_prob) / prior_prob))

    def _reference_backbone_buffers(self) -> dict[str, torch.Tensor]:
        """The non-persistent buffers of a backbone built afresh from the config (once per model), by name."""
        if not hasattr(self, "_backbone_buffers"):
            with torch.device("cpu"):
                self._backbone_buffers = non_persistent_buffers(create_backbone(self.config))
        return self._backbone_buffers

    @classmethod
    def from_pretrained_backbone(cls, config, checkpoint_path: str | None = None) -> DenseDetectorPreTrainedModel:
        """A new detector whose backbone has timm's pretrained weights: from `checkpoint_path` (a local timm-format
        state dict, `.pth`/`.bin`/`.safetensors`) or, without it, timm's own download (needs the Hub)."""
        model = cls(config)
        model.load_pretrained_backbone(checkpoint_path)
        return model

    def load_pretrained_backbone(self, checkpoint_path: str | None = None) -> None:
        """Loads timm pretrained weights (incl. BatchNorm statistics) into the backbone."""
        pretrained = create_backbone(self.config, pretrained=True, checkpoint_path=checkpoint_path)
        self.backbone.load_state_dict(pretrained.state_dict())

    def _set_gradient_checkpointing(
        self, enable: bool = True, gradient_checkpointing_func: Callable = checkpoint, every_n_layers: int = 1
    ) -> None:
        """Activation checkpointing of the head towers (transformers' mechanism) and of the timm backbone (timm's)."""
        super()._set_gradient_checkpointing(enable, gradient_checkpointing_func, every_n_layers)
        self.backbone.set_grad_checkpointing(enable)

    def train(self, mode: bool = True) -> DenseDetectorPreTrainedModel:
        super().train(mode)
        if mode:
            keep_frozen_norms_in_eval(self.backbone, self.config.freeze_backbone_norm)
        return self

    def image_sizes_from_mask(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor | None) -> torch.Tensor:
        """(height, width) of each image inside the padded batch (the whole input without a mask)."""
        if pixel_mask is None:
            shape = (len(pixel_values),)
            height, width = (torch.full(shape, size, device=pixel_values.device) for size in pixel_values.shape[-2:])
            return torch.stack([height, width], dim=1)
        return torch.stack([pixel_mask[:, :, 0].sum(1), pixel_mask[:, 0, :].sum(1)], dim=1).long()

    def extract_features(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        """The FPN outputs `(B, fpn_channels, H, W)`, one per level."""
        return self.neck(backbone_features(self.backbone, pixel_values))

    def make_priors(self, spatial_shapes: list[tuple[int, int]], device: torch.device) -> torch.Tensor:
        """The family's priors of all levels: `(Q, 4)` anchors or `(Q, 2)` points, in input pixels."""
        raise NotImplementedError

    def decode_boxes(
        self, priors: torch.Tensor, bbox_regression: torch.Tensor, level_sizes: list[int]
    ) -> torch.Tensor:
        """Boxes `(B, Q, 4)` in input pixels from the head's box output (`bbox_regression` of
        [`DenseDetectionOutput`]); not clipped to the image."""
        raise NotImplementedError

    def detection_outputs(
        self,
        head_maps: list[tuple[torch.Tensor, ...]],
        feature_maps: list[torch.Tensor],
        image_sizes: torch.Tensor,
        priors: torch.Tensor | None = None,
        valid_mask: torch.Tensor | None = None,
    ) -> DenseDetectionOutput:
        """Per-prior outputs from the head's per-level maps `(cls_logits, bbox_regression[, centerness_logits])`;
        `priors` and `valid_mask` are made unless given (e.g. those of another detector of the family on the same
        batch)."""
        spatial_shapes = [tuple(feature.shape[-2:]) for feature in feature_maps]
        num_classes = self.config.num_labels
        logits = flatten_levels([maps[0] for maps in head_maps], num_classes)
        box_channels = head_maps[0][1].shape[1] // self.priors_per_location
        bbox_regression = flatten_levels([maps[1] for maps in head_maps], box_channels)
        if box_channels > 4:  # per-side distributions (GFL)
            bbox_regression = bbox_regression.unflatten(-1, (4, box_channels // 4))
        centerness_logits = None
        if len(head_maps[0]) > 2:
            centerness_logits = flatten_levels([maps[2] for maps in head_maps], 1).squeeze(-1)
        if priors is None:
            priors = self.make_priors(spatial_shapes, logits.device)
        if valid_mask is None:
            valid_mask = valid_flags(
                image_sizes, spatial_shapes, self.config.strides, self.config.size_divisor, self.priors_per_location
            )
        sizes = [height * width * self.priors_per_location for height, width in spatial_shapes]
        return DenseDetectionOutput(
            logits=logits,
            pred_boxes=self.decode_boxes(priors, bbox_regression, sizes),
            bbox_regression=bbox_regression,
            centerness_logits=centerness_logits,
            priors=priors,
            valid_mask=valid_mask,
            image_sizes=image_sizes,
            feature_maps=tuple(feature_maps),
        )

    def prepare_ground_truth(self, labels: list[dict], image_sizes: torch.Tensor) -> GroundTruth:
        """The batch's `labels` as padded tensors with their value checks pending (see [`check_ground_truth`])."""
        return prepare_ground_truth(labels, image_sizes, self.config.num_labels)

    def forward(
        self,
        pixel_values: torch.FloatTensor,
        pixel_mask: torch.Tensor | None = None,
        labels: list[dict] | None = None,
        return_dict: bool | None = None,
    ) -> DenseDetectionOutput | tuple:
        r"""
        pixel_values (`torch.FloatTensor` of shape `(B, 3, H, W)`): normalized images, zero-padded bottom/right.
        pixel_mask (`torch.BoolTensor` of shape `(B, H, W)`, *optional*): True (or 1) on real pixels, False on padding.
        labels (`list[dict]`, *optional*): per image `boxes` `(n, 4)` absolute (x1, y1, x2, y2) pixels of
            `pixel_values` and `class_labels` `(n,)`; crowd boxes left out. Malformed labels raise a ValueError that
            names the image. Post-processing (score threshold, NMS, rescaling) is the image processor's
            `post_process_object_detection`.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        expected_channels = (self.config.backbone_kwargs or {}).get("in_chans", 3)
        if pixel_values.ndim != 4 or pixel_values.shape[1] != expected_channels:
            raise ValueError(
                f"pixel_values must have shape (batch, {expected_channels}, height, width), got "
                f"{tuple(pixel_values.shape)}."
            )
        image_sizes = self.image_sizes_from_mask(pixel_values, pixel_mask)
        feature_maps = self.extract_features(pixel_values)
        head_maps = [self.head(feature, level) for level, feature in enumerate(feature_maps)]
        outputs = self.detection_outputs(head_maps, feature_maps, image_sizes)
        if labels is not None:
            ground_truth = self.prepare_ground_truth(labels, image_sizes)
            check_ground_truth(ground_truth.problems, labels, image_sizes, self.config.num_labels)
            outputs.loss_dict, _ = self.loss_function(outputs, ground_truth)
            outputs.loss = sum(outputs.loss_dict.values())
        return outputs if return_dict else outputs.to_tuple()


__all__ = ["DenseDetectionOutput", "DenseDetectorPreTrainedModel", "DenseLoss"]
