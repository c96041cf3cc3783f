"""The feature pyramid of every dense detector (MMDetection's `FPN`): laterals on C3-C5, top-down sums, 3x3 outputs,
and stride-2 convs for the extra levels P6, P7 on the last input or the last output."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class FeaturePyramid(nn.Module):
    """FPN from backbone features at strides 8, 16, 32 to `num_outputs` levels (strides 8 to 128 for 5).

    Args:
        in_channels: channels of the backbone features.
        out_channels: width of every pyramid level.
        num_outputs: levels in all; those beyond the inputs come from stride-2 3x3 convs.
        extra_convs_on: `"output"` (the first extra conv reads the last pyramid output, GFL/ATSS/FCOS) or `"input"`
            (it reads the last backbone feature, RetinaNet).
        relu_before_extra_convs: apply a ReLU before every extra conv but the first (FCOS).
    """

    def __init__(
        self,
        in_channels: list[int],
        out_channels: int,
        num_outputs: int = 5,
        extra_convs_on: str = "output",
        relu_before_extra_convs: bool = False,
    ):
        super().__init__()
        if extra_convs_on not in ("input", "output"):
            raise ValueError(f"extra_convs_on must be 'input' or 'output', got {extra_convs_on!r}.")
        self.extra_convs_on = extra_convs_on
        self.relu_before_extra_convs = relu_before_extra_convs
        self.lateral_convs = nn.ModuleList(nn.Conv2d(channels, out_channels, 1) for channels in in_channels)
        self.fpn_convs = nn.ModuleList(nn.Conv2d(out_channels, out_channels, 3, padding=1) for _ in in_channels)
        for index in range(num_outputs - len(in_channels)):
            channels = in_channels[-1] if index == 0 and extra_convs_on == "input" else out_channels
            self.fpn_convs.append(nn.Conv2d(channels, out_channels, 3, stride=2, padding=1))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        laterals = [conv(feature) for conv, feature in zip(self.lateral_convs, features)]
        for index in range(len(laterals) - 1, 0, -1):
            upsampled = F.interpolate(laterals[index], size=laterals[index - 1].shape[-2:], mode="nearest")
            laterals[index - 1] = laterals[index - 1] + upsampled
        outputs = [self.fpn_convs[index](lateral) for index, lateral in enumerate(laterals)]
        extra_convs = self.fpn_convs[len(laterals) :]
        if len(extra_convs):
            outputs.append(extra_convs[0](features[-1] if self.extra_convs_on == "input" else outputs[-1]))
        for conv in extra_convs[1:]:
            outputs.append(conv(F.relu(outputs[-1]) if self.relu_before_extra_convs else outputs[-1]))
        return outputs


__all__ = ["FeaturePyramid"]
