"""Ground truth of a batch as padded tensors, with the checks that find malformed labels without waiting for the
device."""

from __future__ import annotations

from dataclasses import dataclass

import torch

LABEL_PROBLEMS = (
    "boxes contain NaN or infinite values",
    "boxes have negative width or height (boxes must be x1, y1, x2, y2 with x2 >= x1 and y2 >= y1)",
    "boxes lie entirely outside the {height}x{width} image (boxes must be absolute pixels of pixel_values)",
    "class_labels must be in [0, {last_class}]",
)


@dataclass
class GroundTruth:
    """The boxes and classes of a batch, padded to the largest number of boxes `G` (at least 1)."""

    boxes: torch.Tensor  # (B, G, 4) x1, y1, x2, y2 in pixels of the input; zeros in padding slots
    classes: torch.Tensor  # (B, G) class indices, clamped to the valid range (see `problems`)
    mask: torch.Tensor  # (B, G) bool, True on real boxes
    problems: torch.Tensor  # (B, len(LABEL_PROBLEMS)) bool: which check each image fails


def prepare_ground_truth(labels: list[dict], image_sizes: torch.Tensor, num_classes: int) -> GroundTruth:
    """Pads per-image `boxes` and `class_labels` and checks them on the device (see [`check_ground_truth`]).

    Raises a ValueError at once for what the tensors' shapes tell (missing fields, wrong shapes); the value checks
    are left in `problems`, so that the caller decides when to wait for the device.
    """
    if len(labels) != len(image_sizes):
        raise ValueError(f"Got {len(labels)} label dicts for a batch of {len(image_sizes)} images.")
    for index, target in enumerate(labels):
        missing = {"boxes", "class_labels"} - set(target)
        if missing:
            raise ValueError(f"labels[{index}] lacks {sorted(missing)}.")
        boxes, classes = target["boxes"], target["class_labels"]
        if boxes.ndim != 2 or boxes.shape[-1] != 4 or classes.ndim != 1 or len(boxes) != len(classes):
            raise ValueError(
                f"labels[{index}]: boxes must be (n, 4) with one class label each, got boxes {tuple(boxes.shape)} "
                f"and class_labels {tuple(classes.shape)}."
            )
    device = image_sizes.device
    num_boxes = max([1] + [len(target["class_labels"]) for target in labels])  # one masked slot when all are empty
    boxes = torch.zeros(len(labels), num_boxes, 4, device=device)
    classes = torch.zeros(len(labels), num_boxes, dtype=torch.long, device=device)
    mask = torch.zeros(len(labels), num_boxes, dtype=torch.bool, device=device)
    for index, target in enumerate(labels):
        count = len(target["class_labels"])
        boxes[index, :count] = target["boxes"].to(device=device, dtype=torch.float32)
        classes[index, :count] = target["class_labels"].to(device)
        mask[index, :count] = True

    height, width = image_sizes[:, None, 0].to(boxes), image_sizes[:, None, 1].to(boxes)
    outside = (boxes[..., 2] <= 0) | (boxes[..., 3] <= 0) | (boxes[..., 0] >= width) | (boxes[..., 1] >= height)
    problems = torch.stack(
        [
            ~boxes.isfinite().all(-1),
            (boxes[..., 2] < boxes[..., 0]) | (boxes[..., 3] < boxes[..., 1]),
            outside,
            (classes < 0) | (classes >= num_classes),
        ],
        dim=-1,
    )
    problems = (problems & mask[..., None]).any(1)
    return GroundTruth(boxes, classes.clamp(0, num_classes - 1), mask, problems)


def check_ground_truth(
    problems: torch.Tensor, labels: list[dict], image_sizes: torch.Tensor, num_classes: int
) -> None:
    """Raises a ValueError naming the image and the field of the first malformed ground truth in `problems` (from
    [`prepare_ground_truth`]). Waits for the device once."""
    if not problems.any():
        return
    image, problem = problems.nonzero()[0].tolist()
    target = labels[image]
    image_id = target.get("image_id", image)
    image_id = image_id.item() if isinstance(image_id, torch.Tensor) else image_id
    height, width = image_sizes[image].tolist()
    message = LABEL_PROBLEMS[problem].format(height=height, width=width, last_class=num_classes - 1)
    raise ValueError(
        f"labels of image {image_id} (batch index {image}): {message}; got boxes "
        f"{target['boxes'].tolist()} and class_labels {target['class_labels'].tolist()}."
    )


__all__ = ["GroundTruth", "LABEL_PROBLEMS", "check_ground_truth", "prepare_ground_truth"]
