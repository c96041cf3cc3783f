"""Image processors of the dense detectors: MMDetection's keep-ratio resize, ImageNet normalization, padding to 32,
and the test-time post-processing (score threshold, top-k, NMS, rescaling) of the models' raw outputs."""

from __future__ import annotations

import logging

import torch
from torchvision.transforms.v2 import functional as tvF
from transformers.image_processing_backends import TorchvisionBackend
from transformers.image_processing_base import BatchFeature
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, PILImageResampling, SizeDict
from transformers.processing_utils import ImagesKwargs, Unpack

from .postprocess import detect
from .priors import level_sizes

logger = logging.getLogger(__name__)


class DenseDetectionImageProcessorKwargs(ImagesKwargs, total=False):
    r"""
    size_divisor (`int`, *optional*, defaults to 32):
        Images are padded (bottom and right, with zeros after normalization) to the batch's largest height and width
        rounded up to a multiple of this.
    candidate_threshold (`float`, *optional*, defaults to 0.05):
        Post-processing: the class score a (prior, class) pair must exceed to be a candidate for NMS (MMDetection's
        `score_thr`), unless the caller's `threshold` is lower.
    pre_nms_topk (`int`, *optional*, defaults to 1000):
        Post-processing: (prior, class) pairs kept per pyramid level before NMS.
    nms_iou_threshold (`float`, *optional*):
        Post-processing: IoU above which class-aware NMS suppresses a box (the family's MMDetection setting).
    max_detections (`int`, *optional*, defaults to 100):
        Post-processing: detections kept per image.
    """

    size_divisor: int
    candidate_threshold: float
    pre_nms_topk: int
    nms_iou_threshold: float
    max_detections: int


def get_resize_output_size(height: int, width: int, shortest_edge: int, longest_edge: int) -> tuple[int, int]:
    """(height, width) after MMDetection's keep-ratio resize to fit `longest_edge` x `shortest_edge`."""
    scale = min(longest_edge / max(height, width), shortest_edge / min(height, width))
    return int(height * scale + 0.5), int(width * scale + 0.5)


def coco_annotations_to_targets(
    annotations: list[dict], image_id: int, original_size: tuple[int, int], size: tuple[int, int]
) -> dict[str, torch.Tensor]:
    """COCO-format annotations (xywh pixels of the original image, `category_id` = class index) to a label dict with
    absolute xyxy `boxes` in the resized frame; crowd regions are left out and boxes clipped to the image."""
    scale_y, scale_x = size[0] / original_size[0], size[1] / original_size[1]
    kept = [annotation for annotation in annotations if not annotation.get("iscrowd", 0)]
    boxes = torch.tensor([annotation["bbox"] for annotation in kept], dtype=torch.float32).reshape(-1, 4)
    boxes[:, 2:] += boxes[:, :2]
    boxes *= torch.tensor([scale_x, scale_y, scale_x, scale_y])
    boxes[:, 0::2] = boxes[:, 0::2].clamp(0, size[1])
    boxes[:, 1::2] = boxes[:, 1::2].clamp(0, size[0])
    classes = torch.tensor([annotation["category_id"] for annotation in kept], dtype=torch.int64)
    non_empty = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    if not non_empty.all():
        logger.warning(
            "image %s: dropped %d of %d boxes that are empty after clipping to the image",
            image_id,
            int((~non_empty).sum()),
            len(boxes),
        )
    return {
        "boxes": boxes[non_empty],
        "class_labels": classes[non_empty],
        "image_id": torch.tensor(image_id, dtype=torch.int64),
        "orig_size": torch.tensor(original_size, dtype=torch.int64),
        "size": torch.tensor(size, dtype=torch.int64),
    }


class DenseDetectionImageProcessor(TorchvisionBackend):
    r"""
    Prepares images (and optionally COCO-format annotations) for a dense detector and turns its raw outputs into
    detections on the original images.

    Images are resized keeping their aspect ratio to fit `size["longest_edge"]` x `size["shortest_edge"]` (bilinear,
    no antialiasing, as MMDetection), scaled to [0, 1], normalized with the ImageNet mean and std, and zero-padded
    bottom/right to a multiple of `size_divisor`; `pixel_mask` (bool) marks the real pixels. Post-processing follows
    MMDetection's test settings: `candidate_threshold`, `pre_nms_topk`, `nms_iou_threshold` and `max_detections`.
    """

    valid_kwargs = DenseDetectionImageProcessorKwargs
    resample = PILImageResampling.BILINEAR
    image_mean = IMAGENET_DEFAULT_MEAN
    image_std = IMAGENET_DEFAULT_STD
    size = {"shortest_edge": 800, "longest_edge": 1333}
    size_divisor = 32
    candidate_threshold = 0.05
    pre_nms_topk = 1000
    nms_iou_threshold = 0.6
    max_detections = 100
    default_to_square = False
    do_resize = True
    do_rescale = True
    do_normalize = True
    do_pad = True
    do_convert_rgb = True
    model_input_names = ["pixel_values", "pixel_mask"]

    def __init__(self, **kwargs: Unpack[DenseDetectionImageProcessorKwargs]) -> None:
        super().__init__(**kwargs)

    def resize(self, image: torch.Tensor, size: SizeDict, **kwargs) -> torch.Tensor:
        """Keep-ratio resize of `(..., C, H, W)` images to fit `size.longest_edge` x `size.shortest_edge`."""
        new_size = get_resize_output_size(*image.shape[-2:], size.shortest_edge, size.longest_edge)
        return tvF.resize(image, list(new_size), interpolation=tvF.InterpolationMode.BILINEAR, antialias=False)

    def preprocess(self, images, annotations: list[dict] | dict | None = None, **kwargs) -> BatchFeature:
        r"""
        annotations (`list[dict]`, *optional*):
            Per image `{"image_id": int, "annotations": [{"bbox": [x, y, w, h], "category_id": class index,
            "iscrowd": 0 or 1}, ...]}` in pixels of the original image. Adds `labels` to the output (see the model's
            `forward`).
        """
        return super().preprocess(images, annotations, **kwargs)

    def _preprocess(
        self,
        images: list[torch.Tensor],
        annotations: list[dict] | dict | None,
        do_resize: bool,
        size: SizeDict,
        do_rescale: bool,
        rescale_factor: float,
        do_normalize: bool,
        image_mean: float | list[float],
        image_std: float | list[float],
        do_pad: bool,
        size_divisor: int,
        return_tensors: str | None,
        **kwargs,
    ) -> BatchFeature:
        if isinstance(annotations, dict):
            annotations = [annotations]
        if annotations is not None and len(annotations) != len(images):
            raise ValueError(f"Got {len(images)} images but {len(annotations)} annotations.")
        processed, labels = [], []
        for index, image in enumerate(images):
            if image.shape[0] != 3:
                raise ValueError(f"image {index}: expected 3 (RGB) channels, got shape {tuple(image.shape)}.")
            original_size = tuple(image.shape[-2:])
            if do_resize:
                image = self.resize(image, size)
            image = self.rescale_and_normalize(image, do_rescale, rescale_factor, do_normalize, image_mean, image_std)
            processed.append(image)
            if annotations is not None:
                annotation = annotations[index]
                labels.append(
                    coco_annotations_to_targets(
                        annotation.get("annotations", []),
                        annotation.get("image_id", index),
                        original_size,
                        tuple(image.shape[-2:]),
                    )
                )
        if do_pad:
            height = max(image.shape[-2] for image in processed)
            width = max(image.shape[-1] for image in processed)
            height, width = (-(-height // size_divisor) * size_divisor, -(-width // size_divisor) * size_divisor)
        else:
            height, width = processed[0].shape[-2:]
            if any(image.shape[-2:] != (height, width) for image in processed):
                raise ValueError("Images of different sizes need do_pad=True to form a batch.")
        pixel_values = processed[0].new_zeros(len(processed), 3, height, width)
        pixel_mask = torch.zeros(len(processed), height, width, dtype=torch.bool)
        for index, image in enumerate(processed):
            pixel_values[index, :, : image.shape[-2], : image.shape[-1]] = image
            pixel_mask[index, : image.shape[-2], : image.shape[-1]] = True
        encoded = BatchFeature({"pixel_values": pixel_values, "pixel_mask": pixel_mask}, tensor_type=return_tensors)
        if annotations is not None:
            encoded["labels"] = labels
        return encoded

    def post_process_object_detection(
        self,
        outputs,
        threshold: float = 0.5,
        target_sizes: torch.Tensor | list[tuple[int, int]] | None = None,
        candidate_threshold: float | None = None,
        pre_nms_topk: int | None = None,
        nms_iou_threshold: float | None = None,
        max_detections: int | None = None,
    ) -> list[dict[str, torch.Tensor]]:
        """Detections per image whose score exceeds `threshold`: `scores`, `labels` and `boxes` (absolute x1, y1, x2,
        y2), best first, in the frame of `target_sizes` ((height, width) of the original images) or else of the model
        input.

        MMDetection's test-time steps: the candidates are the (prior, class) pairs whose class score exceeds
        `candidate_threshold` (default: the lower of `threshold` and this processor's `candidate_threshold`), at most
        `pre_nms_topk` per pyramid level; boxes are clipped to the image; the score of FCOS and ATSS is the class score
        times the sigmoid of the centre-ness; class-aware NMS at `nms_iou_threshold`; the best `max_detections`
        (defaults: this processor's settings). MMDetection's evaluation is `threshold=0.0, candidate_threshold=0.05`.
        """
        if target_sizes is not None and len(target_sizes) != len(outputs.logits):
            raise ValueError(f"Got {len(target_sizes)} target sizes for {len(outputs.logits)} images.")
        if candidate_threshold is None:
            candidate_threshold = min(threshold, self.candidate_threshold)
        results = detect(
            outputs.logits,
            outputs.pred_boxes,
            outputs.image_sizes,
            level_sizes(outputs.feature_maps, outputs.logits.shape[1]),
            outputs.get("centerness_logits"),
            score_threshold=candidate_threshold,
            pre_nms_topk=pre_nms_topk if pre_nms_topk is not None else self.pre_nms_topk,
            nms_iou_threshold=nms_iou_threshold if nms_iou_threshold is not None else self.nms_iou_threshold,
            max_detections=max_detections if max_detections is not None else self.max_detections,
        )
        scales = [None] * len(results)
        if target_sizes is not None:
            target_sizes = torch.as_tensor(target_sizes, dtype=torch.float32, device=outputs.logits.device)
            scales = (target_sizes / outputs.image_sizes).flip(-1).repeat(1, 2)  # (B, 4): x, y, x, y
        for result, scale in zip(results, scales):
            keep = result["scores"] > threshold
            result.update({key: value[keep] for key, value in result.items()})
            if scale is not None:
                result["boxes"] = result["boxes"] * scale
        return results


class GFLImageProcessor(DenseDetectionImageProcessor):
    """[`DenseDetectionImageProcessor`] with GFL's test settings (NMS IoU 0.6)."""


class RetinaNetImageProcessor(DenseDetectionImageProcessor):
    """[`DenseDetectionImageProcessor`] with RetinaNet's test settings (NMS IoU 0.5)."""

    nms_iou_threshold = 0.5


class FCOSImageProcessor(DenseDetectionImageProcessor):
    """[`DenseDetectionImageProcessor`] with FCOS's test settings (NMS IoU 0.5)."""

    nms_iou_threshold = 0.5


class ATSSImageProcessor(DenseDetectionImageProcessor):
    """[`DenseDetectionImageProcessor`] with ATSS's test settings (NMS IoU 0.6)."""


__all__ = [
    "ATSSImageProcessor",
    "DenseDetectionImageProcessor",
    "FCOSImageProcessor",
    "GFLImageProcessor",
    "RetinaNetImageProcessor",
    "get_resize_output_size",
]
