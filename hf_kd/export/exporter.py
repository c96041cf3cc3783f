"""ONNX export of a dense detector with torch's exporter (`torch.export` and onnxscript), and its command line:

    python -m hf_kd.export MODEL_DIR OUT.onnx [--height H --width W] [--batch_size N] [--opset N]

See [`hf_kd.export`] for what the file holds and how its outputs become detections.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import warnings
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig

from ..models.detection import FAMILIES, DenseDetectionImageProcessor, DenseDetectorPreTrainedModel
from ..models.detection.priors import level_sizes
from .numpy_postprocess import ID2LABEL_KEY, MODEL_TYPE_KEY, POST_PROCESSING_KEY

INPUT_NAMES = ("pixel_values", "pixel_mask")
# Blocks of `size_divisor` pixels of the example input that dynamic sizes are traced with: two different sizes, so
# that the exporter keeps height and width apart, added to the fewest blocks the model accepts.
EXAMPLE_EXTRA_BLOCKS = (8, 12)


class RawDetectionOutputs(nn.Module):
    """The detector's forward pass from the image processor's `pixel_values` and `pixel_mask` to the tensors that
    post-processing needs: `logits`, `pred_boxes`, `centerness_logits` (FCOS, ATSS), `image_sizes` and `level_sizes`
    (the number of priors of each pyramid level)."""

    def __init__(self, model: DenseDetectorPreTrainedModel):
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor, pixel_mask: torch.Tensor) -> tuple[torch.Tensor, ...]:
        outputs = self.model(pixel_values, pixel_mask=pixel_mask, return_dict=True)
        sizes = torch.tensor(
            level_sizes(outputs.feature_maps, outputs.logits.shape[1]), dtype=torch.int64, device=pixel_values.device
        )
        centerness = () if outputs.centerness_logits is None else (outputs.centerness_logits,)
        return outputs.logits, outputs.pred_boxes, *centerness, outputs.image_sizes, sizes


def post_processing_settings(image_processor: DenseDetectionImageProcessor) -> dict[str, float | int]:
    """The image processor's post-processing settings, as [`DetectionPostProcessor`] takes them."""
    names = ("candidate_threshold", "pre_nms_topk", "nms_iou_threshold", "max_detections")
    return {name: getattr(image_processor, name) for name in names}


def export_onnx(
    model: DenseDetectorPreTrainedModel,
    path: str | os.PathLike,
    image_size: tuple[int, int] | None = None,
    batch_size: int | None = None,
    opset: int = 18,
    image_processor: DenseDetectionImageProcessor | None = None,
) -> Path:
    """Writes `model` (any dense detector family) to the ONNX file `path` and returns its path.

    The graph maps `pixel_values` `(B, 3, H, W)` float32 and `pixel_mask` `(B, H, W)` bool (the image processor's
    outputs) to the raw outputs `logits`, `pred_boxes`, `centerness_logits` (FCOS, ATSS), `image_sizes` and
    `level_sizes`; [`DetectionPostProcessor`] turns them into detections. The file's metadata holds the post-processing
    settings of `image_processor` (default: the family's image processor), the class names and the family.

    Args:
        model: the detector, float32; its weights and train/eval modes are left as they were.
        path: the `.onnx` file to write (weights in a separate file only for models over 2 GB).
        image_size: `(height, width)` of the one input size the file accepts, or None for any height and width that
            are multiples of the image processor's `size_divisor` larger than the largest stride (160 and up for 32).
        batch_size: the one batch size the file accepts, or None for any.
        opset: ONNX opset version.
        image_processor: the model's image processor (its `size_divisor` and post-processing settings).
    """
    if importlib.util.find_spec("onnxscript") is None:
        raise ImportError('ONNX export needs onnx and onnxscript: pip install "hf_kd[export]"')
    if image_processor is None:
        image_processor = FAMILIES[model.config.model_type][2]()
    divisor = image_processor.size_divisor
    min_blocks = max(model.config.strides) // divisor + 1  # the coarsest level has 2 or more rows and columns
    example_size = image_size or tuple(divisor * (min_blocks + extra) for extra in EXAMPLE_EXTRA_BLOCKS)
    example_batch = batch_size or 2  # a dynamic size traced as 1 would be fixed at 1
    parameter = next(model.parameters())
    pixel_values = torch.zeros(example_batch, 3, *example_size, dtype=parameter.dtype, device=parameter.device)
    pixel_mask = torch.ones(example_batch, *example_size, dtype=torch.bool, device=parameter.device)

    values_dims = {} if batch_size is not None else {0: torch.export.Dim("batch", min=1)}
    mask_dims = dict(values_dims)
    if image_size is None:
        height, width = (divisor * torch.export.Dim(f"{name}_blocks", min=min_blocks) for name in ("height", "width"))
        values_dims |= {2: height, 3: width}
        mask_dims |= {1: height, 2: width}
    modes = {module: module.training for module in model.modules()}
    wrapper = RawDetectionOutputs(model).eval()
    try:
        with torch.no_grad():
            has_centerness = model(pixel_values[:1], pixel_mask=pixel_mask[:1]).centerness_logits is not None
            output_names = ["logits", "pred_boxes", *(["centerness_logits"] if has_centerness else [])]
            with warnings.catch_warnings():
                # the exporter's note that pixel_mask's axes are named after pixel_values' (they are the same axes)
                warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
                program = torch.onnx.export(
                    wrapper,
                    (pixel_values, pixel_mask),
                    dynamo=True,
                    dynamic_shapes={"pixel_values": values_dims, "pixel_mask": mask_dims},
                    opset_version=opset,
                    input_names=list(INPUT_NAMES),
                    output_names=[*output_names, "image_sizes", "level_sizes"],
                    verbose=False,
                )
    finally:
        for module, training in modes.items():
            module.training = training
    program.model.metadata_props.update(
        {
            POST_PROCESSING_KEY: json.dumps(post_processing_settings(image_processor)),
            ID2LABEL_KEY: json.dumps({str(index): name for index, name in model.config.id2label.items()}),
            MODEL_TYPE_KEY: model.config.model_type,
        }
    )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    program.save(path)
    return path


def describe(path: Path) -> str:
    """One line on the ONNX file at `path`: its size, inputs (with their shapes) and outputs."""
    import onnx

    graph = onnx.load(path, load_external_data=False).graph

    def shape(value: onnx.ValueInfoProto) -> str:
        return ", ".join(str(dim.dim_param or dim.dim_value) for dim in value.type.tensor_type.shape.dim)

    inputs = "; ".join(f"{value.name} ({shape(value)})" for value in graph.input)
    outputs = ", ".join(value.name for value in graph.output)
    return f"{path} ({path.stat().st_size / 2**20:.1f} MiB): inputs {inputs}; outputs {outputs}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m hf_kd.export",
        description="Export a dense detector (a save_pretrained folder with its image processor) to ONNX, with raw "
        "outputs for hf_kd.export.DetectionPostProcessor.",
    )
    parser.add_argument("model_dir", type=Path, help="save_pretrained folder of the detector and its image processor")
    parser.add_argument("output", type=Path, help="ONNX file to write")
    parser.add_argument("--height", type=int, help="fixed input height (with --width); default: any multiple of 32")
    parser.add_argument("--width", type=int, help="fixed input width (with --height); default: any multiple of 32")
    parser.add_argument("--batch_size", type=int, help="fixed batch size (default: any)")
    parser.add_argument("--opset", type=int, default=18, help="ONNX opset version (default: 18)")
    args = parser.parse_args(argv)
    if (args.height is None) != (args.width is None):
        parser.error("--height and --width go together")
    for name in ("height", "width", "batch_size"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Exports `MODEL_DIR` to `OUT.onnx` and prints what it wrote."""
    args = parse_args(argv)
    config = AutoConfig.from_pretrained(args.model_dir)
    if config.model_type not in FAMILIES:
        raise SystemExit(f"{args.model_dir} holds a {config.model_type!r} model, not one of {sorted(FAMILIES)}.")
    _, model_class, processor_class = FAMILIES[config.model_type]
    model = model_class.from_pretrained(args.model_dir, config=config)
    image_processor = processor_class.from_pretrained(args.model_dir)
    image_size = None if args.height is None else (args.height, args.width)
    path = export_onnx(model, args.output, image_size, args.batch_size, args.opset, image_processor)
    print(f"Wrote {describe(path)}")
    return 0


__all__ = ["RawDetectionOutputs", "export_onnx", "main"]
