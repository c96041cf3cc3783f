"""Per-example detection transforms: keep-ratio resize (single or multi-scale), horizontal flip, photometric jitter,
box clipping. Normalization and padding are left to the image processor (see `DetectionCollator`)."""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Mapping
from typing import Any

import numpy as np
import PIL.Image
import torch
from torchvision.transforms.v2 import functional as tvF

from ..models.detection.image_processing_dense import get_resize_output_size
from .image_files import HIGH_BIT_DEPTH_MODES
from .schema import DetectionDataError

logger = logging.getLogger(__name__)


class DetectionTransform:
    """Turns an example in the common layout into a resized image tensor and its training targets.

    Args:
        shortest_edge: target shortest edge, or an inclusive `(min, max)` range sampled per image (multi-scale).
        longest_edge: cap on the longest edge (MMDetection's keep-ratio rule, `get_resize_output_size`).
        flip_prob: probability of a horizontal flip.
        brightness, contrast, saturation: jitter factors drawn from `[max(0, 1 - x), 1 + x]`; `hue` shift drawn from
            `[-hue, hue]` (as `torchvision.transforms.ColorJitter`), applied in a random order. 0 disables each.
        seed: with the epoch (`set_epoch`) and the image id, seeds every random choice, so an example is transformed
            the same way whichever process or dataloader worker sees it.

    Calling it on an example returns `image` (uint8 `(3, h, w)` tensor, resized) and the label dict `labels`:
    `boxes` (float32 `(n, 4)` absolute xyxy in the resized frame), `class_labels` (int64), `image_id`, `orig_size`
    and `size` ((h, w), int64). Crowd regions are left out. Boxes are clipped to the image; boxes left without area
    are removed, counted in `stats` (of this process) and logged.
    """

    def __init__(
        self,
        shortest_edge: int | tuple[int, int] = 800,
        longest_edge: int = 1333,
        flip_prob: float = 0.0,
        brightness: float = 0.0,
        contrast: float = 0.0,
        saturation: float = 0.0,
        hue: float = 0.0,
        seed: int = 0,
    ):
        if isinstance(shortest_edge, (tuple, list)):
            low, high = shortest_edge
            if not 0 < low <= high:
                raise ValueError(f"shortest_edge range must satisfy 0 < min <= max, got {shortest_edge}")
        elif shortest_edge <= 0:
            raise ValueError(f"shortest_edge must be positive, got {shortest_edge}")
        if not 0 <= flip_prob <= 1:
            raise ValueError(f"flip_prob must be in [0, 1], got {flip_prob}")
        if not 0 <= hue <= 0.5:
            raise ValueError(f"hue must be in [0, 0.5], got {hue}")
        self.shortest_edge = tuple(shortest_edge) if isinstance(shortest_edge, (tuple, list)) else shortest_edge
        self.longest_edge = longest_edge
        self.flip_prob = flip_prob
        self.brightness = brightness
        self.contrast = contrast
        self.saturation = saturation
        self.hue = hue
        self.seed = seed
        self.epoch = 0
        self.stats: Counter = Counter()

    @classmethod
    def from_image_processor(cls, image_processor: Any, **kwargs: Any) -> DetectionTransform:
        """A transform resizing like `image_processor` (its `size` shortest/longest edge); `kwargs` add augmentation."""
        size = image_processor.size
        shortest_edge = size["shortest_edge"] if isinstance(size, Mapping) else size.shortest_edge
        longest_edge = size["longest_edge"] if isinstance(size, Mapping) else size.longest_edge
        return cls(**{"shortest_edge": shortest_edge, "longest_edge": longest_edge, **kwargs})

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(shortest_edge={self.shortest_edge}, longest_edge={self.longest_edge}, "
            f"flip_prob={self.flip_prob}, brightness={self.brightness}, contrast={self.contrast}, "
            f"saturation={self.saturation}, hue={self.hue}, seed={self.seed})"
        )

    def set_epoch(self, epoch: int) -> None:
        """Changes the random draws of every example (call at each epoch, before the dataloader iterator starts)."""
        self.epoch = int(epoch)

    def __call__(self, example: Mapping[str, Any]) -> dict[str, Any]:
        image_id = int(example["image_id"])
        image = _to_uint8_tensor(example["image"], image_id)
        height, width = image.shape[-2:]
        if (example.get("width", width), example.get("height", height)) != (width, height):
            raise DetectionDataError(
                f"image id {image_id}: decoded image is {width}x{height} but the annotations say "
                f"{example['width']}x{example['height']} (width x height)"
            )
        rng = np.random.default_rng([self.seed, self.epoch, image_id % 2**64])

        boxes, class_labels = self._boxes(example, image_id, width, height)
        image = self._jitter(image, rng)
        if isinstance(self.shortest_edge, tuple):
            shortest_edge = int(rng.integers(self.shortest_edge[0], self.shortest_edge[1] + 1))
        else:
            shortest_edge = self.shortest_edge
        new_height, new_width = get_resize_output_size(height, width, shortest_edge, self.longest_edge)
        if (new_height, new_width) != (height, width):
            image = tvF.resize(
                image, [new_height, new_width], interpolation=tvF.InterpolationMode.BILINEAR, antialias=False
            )
        boxes = boxes * np.array([new_width / width, new_height / height] * 2)
        if rng.random() < self.flip_prob:
            image = tvF.horizontal_flip(image)
            boxes = np.stack([new_width - boxes[:, 2], boxes[:, 1], new_width - boxes[:, 0], boxes[:, 3]], axis=1)
        return {
            "image": image,
            "labels": {
                "boxes": torch.from_numpy(boxes.astype(np.float32)).reshape(-1, 4),
                "class_labels": torch.from_numpy(class_labels),
                "image_id": torch.tensor(image_id, dtype=torch.int64),
                "orig_size": torch.tensor([height, width], dtype=torch.int64),
                "size": torch.tensor([new_height, new_width], dtype=torch.int64),
            },
        }

    def _boxes(
        self, example: Mapping[str, Any], image_id: int, width: int, height: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """Non-crowd boxes as xyxy in the original frame, clipped to the image, without the ones left empty."""
        objects = example["objects"]
        if isinstance(objects, Mapping):
            objects = [dict(zip(objects, values)) for values in zip(*objects.values())]
        crowd = [bool(o.get("iscrowd", 0)) for o in objects]
        kept = [o for o, is_crowd in zip(objects, crowd) if not is_crowd]
        xywh = np.array([o["bbox"] for o in kept], dtype=np.float64).reshape(-1, 4)
        class_labels = np.array([o["category"] for o in kept], dtype=np.int64)
        boxes = np.concatenate([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], axis=1)
        clipped = np.clip(boxes, 0, [width, height, width, height])
        non_empty = (clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])
        self.stats["images"] += 1
        self.stats["crowd_regions"] += sum(crowd)
        self.stats["clipped_boxes"] += int(np.any(clipped != boxes, axis=1)[non_empty].sum())
        removed = int((~non_empty).sum())
        if removed:
            self.stats["removed_boxes"] += removed
            self.stats["images_with_removed_boxes"] += 1
            if math.log10(self.stats["images_with_removed_boxes"]).is_integer():
                logger.warning(
                    "image id %d: removed %d box(es) %s left empty by clipping to the %dx%d image "
                    "(%d removed so far in this process)",
                    image_id,
                    removed,
                    xywh[~non_empty].tolist(),
                    width,
                    height,
                    self.stats["removed_boxes"],
                )
        self.stats["boxes"] += int(non_empty.sum())
        return clipped[non_empty], class_labels[non_empty]

    def _jitter(self, image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
        adjustments = []
        for function, strength in (
            (tvF.adjust_brightness, self.brightness),
            (tvF.adjust_contrast, self.contrast),
            (tvF.adjust_saturation, self.saturation),
        ):
            if strength > 0:
                adjustments.append((function, float(rng.uniform(max(0.0, 1 - strength), 1 + strength))))
        if self.hue > 0:
            adjustments.append((tvF.adjust_hue, float(rng.uniform(-self.hue, self.hue))))
        for index in rng.permutation(len(adjustments)):
            function, factor = adjustments[index]
            image = function(image, factor)
        return image


def _to_uint8_tensor(image: Any, image_id: int) -> torch.Tensor:
    if isinstance(image, torch.Tensor):
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 (3, H, W) image tensor, got {image.dtype} {tuple(image.shape)}")
        return image
    if not isinstance(image, PIL.Image.Image):
        raise TypeError(f"expected a PIL image or a uint8 tensor, got {type(image).__name__}")
    if image.mode in HIGH_BIT_DEPTH_MODES:
        raise DetectionDataError(
            f"image id {image_id}: mode {image.mode!r} has more than 8 bits per pixel, which conversion to RGB clips; "
            "convert it to 8-bit RGB with the scaling that suits the data"
        )
    if image.mode != "RGB":
        image = image.convert("RGB")
    return tvF.pil_to_tensor(image)
