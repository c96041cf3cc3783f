"""Shared helpers of the model tests."""

from __future__ import annotations

import torch

TINY_LABELS = {0: "cat", 1: "dog", 2: "bird"}


def random_batch(seed: int = 0) -> dict[str, torch.Tensor]:
    """Two normalized images of different sizes (128x160 and 96x128) padded to 128x160, with their pixel mask."""
    generator = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 3, 128, 160, generator=generator)
    pixel_mask = torch.ones(2, 128, 160, dtype=torch.bool)
    pixel_mask[1, 96:] = False
    pixel_mask[1, :, 128:] = False
    return {"pixel_values": pixel_values * pixel_mask[:, None], "pixel_mask": pixel_mask}
