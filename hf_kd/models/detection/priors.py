"""Priors of dense detectors: anchor boxes and points on every FPN level, and which of them lie on each image.

Priors are laid out level after level, row-major within a level (y outer, x inner) and, for several anchors per
location, anchor-minor: the order of MMDetection's prior generators and of a head's flattened outputs.
"""

from __future__ import annotations

import torch


def base_anchors(
    stride: int, scales: tuple[float, ...], ratios: tuple[float, ...], device: torch.device | None = None
) -> torch.Tensor:
    """The `(len(ratios) * len(scales), 4)` anchors of one location at the origin (ratio-major), MMDetection's
    `AnchorGenerator` with the stride as base size: width `stride * scale / sqrt(ratio)`, height `stride * scale *
    sqrt(ratio)` (ratio = height / width)."""
    ratios_t = torch.tensor(ratios, dtype=torch.float32, device=device)
    scales_t = torch.tensor(scales, dtype=torch.float32, device=device)
    h_ratios = torch.sqrt(ratios_t)
    widths = (stride * (1 / h_ratios)[:, None] * scales_t[None, :]).reshape(-1)
    heights = (stride * h_ratios[:, None] * scales_t[None, :]).reshape(-1)
    return torch.stack([-0.5 * widths, -0.5 * heights, 0.5 * widths, 0.5 * heights], dim=-1)


def grid_anchors(
    spatial_shapes: list[tuple[int, int]],
    strides: list[int],
    scales: tuple[float, ...],
    ratios: tuple[float, ...],
    device: torch.device,
) -> torch.Tensor:
    """`(Q, 4)` anchors of all levels: the base anchors shifted to `(x * stride, y * stride)` of every location."""
    anchors = []
    for (height, width), stride in zip(spatial_shapes, strides):
        shift_x = torch.arange(width, device=device, dtype=torch.float32) * stride
        shift_y = torch.arange(height, device=device, dtype=torch.float32) * stride
        shift_y, shift_x = torch.meshgrid(shift_y, shift_x, indexing="ij")
        shifts = torch.stack([shift_x, shift_y, shift_x, shift_y], dim=-1).reshape(-1, 1, 4)
        anchors.append((base_anchors(stride, scales, ratios, device)[None] + shifts).reshape(-1, 4))
    return torch.cat(anchors)


def grid_points(
    spatial_shapes: list[tuple[int, int]], strides: list[int], device: torch.device, offset: float = 0.5
) -> torch.Tensor:
    """`(Q, 2)` points `((x + offset) * stride, (y + offset) * stride)` of all levels (MMDetection's
    `MlvlPointGenerator`)."""
    points = []
    for (height, width), stride in zip(spatial_shapes, strides):
        shift_x = (torch.arange(width, device=device) + offset) * stride
        shift_y = (torch.arange(height, device=device) + offset) * stride
        shift_y, shift_x = torch.meshgrid(shift_y.float(), shift_x.float(), indexing="ij")
        points.append(torch.stack([shift_x.reshape(-1), shift_y.reshape(-1)], dim=-1))
    return torch.cat(points)


def valid_flags(
    image_sizes: torch.Tensor,
    spatial_shapes: list[tuple[int, int]],
    strides: list[int],
    size_divisor: int,
    priors_per_location: int = 1,
) -> torch.Tensor:
    """`(B, Q)` mask of the priors whose location lies inside each image's own size rounded up to `size_divisor`
    (MMDetection's valid flags; all anchors of a location share the flag)."""
    padded = torch.div(image_sizes + size_divisor - 1, size_divisor, rounding_mode="floor") * size_divisor
    masks = []
    for (height, width), stride in zip(spatial_shapes, strides):
        valid_h = torch.div(padded[:, 0] + stride - 1, stride, rounding_mode="floor")
        valid_w = torch.div(padded[:, 1] + stride - 1, stride, rounding_mode="floor")
        rows = torch.arange(height, device=image_sizes.device)[None, :, None] < valid_h[:, None, None]
        cols = torch.arange(width, device=image_sizes.device)[None, None, :] < valid_w[:, None, None]
        location_valid = (rows & cols).reshape(image_sizes.shape[0], -1, 1)
        masks.append(location_valid.expand(-1, -1, priors_per_location).reshape(image_sizes.shape[0], -1))
    return torch.cat(masks, dim=1)


def level_sizes(feature_maps: tuple[torch.Tensor, ...] | list[torch.Tensor], num_priors: int) -> list[int]:
    """The number of priors on each pyramid level, from the levels' `(B, C, H, W)` maps and the total number of
    priors (their shapes only: no wait for the device)."""
    locations = [feature.shape[-2] * feature.shape[-1] for feature in feature_maps]
    priors_per_location = num_priors // sum(locations)
    return [count * priors_per_location for count in locations]


def per_level(values: list[float] | tuple[float, ...], level_sizes: list[int], device: torch.device) -> torch.Tensor:
    """`(Q,)` tensor holding `values[level]` for every prior of that level."""
    return torch.cat([torch.full((size,), float(value), device=device) for value, size in zip(values, level_sizes)])


__all__ = ["base_anchors", "grid_anchors", "grid_points", "level_sizes", "per_level", "valid_flags"]
