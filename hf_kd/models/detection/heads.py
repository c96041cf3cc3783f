"""What every dense head is made of: two towers of 3x3 convs shared over the pyramid levels, then the family's
predictors; and the one contract CrossKD needs from any head (run the towers to a depth, continue from there)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class HeadGroupNorm(nn.GroupNorm):
    """`nn.GroupNorm` that also trains on one image whose groups hold a single value (one channel per group on a 1x1
    level): the statistics are per image, so torch's batch-size check for that case does not apply."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return torch.group_norm(hidden_states, self.num_groups, self.weight, self.bias, self.eps)


class ConvNormAct(nn.Module):
    """3x3 conv, GroupNorm (the conv then has no bias) or nothing (the conv has one), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, norm_groups: int | None):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, 3, padding=1, bias=norm_groups is None)
        self.norm = HeadGroupNorm(norm_groups, out_channels) if norm_groups else nn.Identity()

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return F.relu(self.norm(self.conv(hidden_states)))


class Scale(nn.Module):
    """A learnable scalar multiplier (one per pyramid level for the box branch)."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(1.0))

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        return hidden_states * self.scale


class DenseHead(nn.Module):
    """A head shared over the pyramid levels: a classification and a regression tower of `stacked_convs`
    [`ConvNormAct`] each, then the family's predictors ([`predict`]).

    The contract every family keeps, and all that CrossKD needs from a head: [`forward_towers`] runs both towers
    through their first `depth` convs, [`forward_from`] continues from such tower states (anyone's) to the
    predictions. Subclasses create their predictor layers, name their classifier in `classifier` (its bias starts at
    the prior probability) and implement [`predict`].
    """

    classifier: nn.Conv2d

    def __init__(self, in_channels: int, channels: int, stacked_convs: int, norm_groups: int | None):
        super().__init__()
        widths = [in_channels] + [channels] * (stacked_convs - 1)
        self.cls_convs = nn.ModuleList(ConvNormAct(width, channels, norm_groups) for width in widths)
        self.reg_convs = nn.ModuleList(ConvNormAct(width, channels, norm_groups) for width in widths)
        self.gradient_checkpointing = False  # set by the model's `activation_checkpointing_enable`

    def _tower_step(self, conv: ConvNormAct, hidden: torch.Tensor) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return self._gradient_checkpointing_func(conv.__call__, hidden)
        return conv(hidden)

    def forward_towers(self, feature: torch.Tensor, depth: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Outputs of the first `depth` convs (each conv, norm, ReLU) of the classification and regression towers."""
        cls_hidden = reg_hidden = feature
        for cls_conv, reg_conv in zip(self.cls_convs[:depth], self.reg_convs[:depth]):
            cls_hidden, reg_hidden = self._tower_step(cls_conv, cls_hidden), self._tower_step(reg_conv, reg_hidden)
        return cls_hidden, reg_hidden

    def forward_from(
        self, cls_hidden: torch.Tensor, reg_hidden: torch.Tensor, level: int, depth: int
    ) -> tuple[torch.Tensor, ...]:
        """The predictions of pyramid level `level` from tower states after `depth` convs: the remaining tower convs,
        then [`predict`]."""
        for cls_conv, reg_conv in zip(self.cls_convs[depth:], self.reg_convs[depth:]):
            cls_hidden, reg_hidden = self._tower_step(cls_conv, cls_hidden), self._tower_step(reg_conv, reg_hidden)
        return self.predict(cls_hidden, reg_hidden, level)

    def predict(self, cls_hidden: torch.Tensor, reg_hidden: torch.Tensor, level: int) -> tuple[torch.Tensor, ...]:
        """The family's predictions `(cls_logits, bbox_regression[, centerness_logits])` as `(B, channels, H, W)`
        maps from the outputs of both towers."""
        raise NotImplementedError

    def forward(self, feature: torch.Tensor, level: int) -> tuple[torch.Tensor, ...]:
        return self.forward_from(feature, feature, level, 0)


def flatten_levels(level_maps: list[torch.Tensor], channels_per_prior: int) -> torch.Tensor:
    """Per-level `(B, A * C, H, W)` maps to one `(B, sum H * W * A, C)` tensor: levels concatenated, locations
    row-major, the `A` priors of a location together (channel `a * C + c`)."""
    return torch.cat(
        [
            level_map.permute(0, 2, 3, 1).reshape(level_map.shape[0], -1, channels_per_prior)
            for level_map in level_maps
        ],
        dim=1,
    )


__all__ = ["ConvNormAct", "DenseHead", "HeadGroupNorm", "Scale", "flatten_levels"]
