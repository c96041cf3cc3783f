"""Batching of detection examples for GFL models: transforms, then the image processor's normalization and padding."""

from __future__ import annotations

import atexit
import ctypes
import gc
from collections.abc import Mapping, Sequence
from typing import Any

import pyarrow as pa
import torch

from .transforms import DetectionTransform

_M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
_worker_memory_configured = False


def configure_worker_memory() -> None:
    """Keeps a dataloader worker's private memory to what it uses; does nothing after the first call in a process.

    - `gc.freeze()`: the worker's garbage collector leaves the objects inherited from the training process alone. A
      full collection walks every tracked object, so without it a forked worker copies the parent's whole Python
      heap (~125 MB per worker with transformers imported) the first time it collects.
    - glibc's mmap threshold fixed at its 128 KiB default: glibc raises it after the first large buffer is freed, so
      later decoded images land in a heap that is not trimmed, and every worker keeps ~45 MB it no longer uses
      (a no-op outside glibc).

    Both change the whole worker process: a [`DetectionCollator`] built with `configure_workers=True` calls it in
    each worker, or call it from a `worker_init_fn`.
    """
    global _worker_memory_configured
    if _worker_memory_configured:
        return
    _worker_memory_configured = True
    gc.freeze()
    mallopt = getattr(ctypes.CDLL(None), "mallopt", None)  # glibc (and musl, where it does nothing)
    if mallopt is not None:
        mallopt(_M_MMAP_THRESHOLD, 128 * 1024)


def configure_training_process_memory() -> None:
    """Process-wide settings for a process that forks dataloader workers; call it right before training.

    - `gc.freeze()`: what is alive now (imports, models) stays out of later garbage collections, so this process and
      its workers keep sharing those pages (the first full collection would otherwise copy ~100 MB of them).
    - Arrow's system allocator as the default memory pool, which forked workers inherit: with mimalloc every worker
      keeps ~10 MB of freed parquet buffers.

    Both change the whole process, so hf_kd leaves the call to the script that owns it (`examples/run_distill.py`).
    The workers' own settings are [`configure_worker_memory`].
    """
    gc.freeze()
    atexit.register(gc.unfreeze)  # the final collection at exit still sees them (extensions report leaks otherwise)
    pa.set_memory_pool(pa.system_memory_pool())


class DetectionCollator:
    """Collates examples in the common layout into `pixel_values`, `pixel_mask` and a list of label dicts.

    Args:
        image_processor: a `GFLImageProcessor` (normalizes and pads to a multiple of its `size_divisor`).
        transform: per-example resize/augmentation; defaults to the processor's resize without augmentation
            (evaluation).
        configure_workers: call [`configure_worker_memory`] in each dataloader worker, at its first batch. It changes
            the worker process (garbage collector, allocator), so it is off unless the script that owns the training
            processes asks for it; the main process is never changed.

    Each label dict has `boxes` (float32 `(n, 4)` absolute xyxy in the resized, unpadded frame), `class_labels`,
    `image_id`, `orig_size` and `size` ((h, w) of the original and of the resized image). With a `Trainer`, pass
    `remove_unused_columns=False`, and call `set_epoch` at each epoch for new augmentation draws.
    """

    def __init__(
        self, image_processor: Any, transform: DetectionTransform | None = None, configure_workers: bool = False
    ):
        self.image_processor = image_processor
        self.transform = (
            transform if transform is not None else DetectionTransform.from_image_processor(image_processor)
        )
        self.configure_workers = configure_workers

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(image_processor={type(self.image_processor).__name__}, transform={self.transform}, "
            f"configure_workers={self.configure_workers})"
        )

    def set_epoch(self, epoch: int) -> None:
        self.transform.set_epoch(epoch)

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if self.configure_workers and torch.utils.data.get_worker_info() is not None:
            configure_worker_memory()
        transformed = [self.transform(example) for example in examples]
        encoded = self.image_processor(
            images=[item["image"] for item in transformed], do_resize=False, return_tensors="pt"
        )
        return {
            "pixel_values": encoded["pixel_values"],
            "pixel_mask": encoded["pixel_mask"],
            "labels": [item["labels"] for item in transformed],
        }
