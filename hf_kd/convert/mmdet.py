"""Convert an MMDetection GFL checkpoint into a `save_pretrained` folder (model + image processor).

python -m hf_kd.convert.mmdet gfl_r50_fpn_1x_coco.pth out_dir --backbone resnet50
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..models.detection import GFLConfig, GFLForObjectDetection, GFLImageProcessor

# (MMDetection key pattern, hf_kd replacement); keys matching nothing are an error.
KEY_RULES = (
    (r"^backbone\.(.+)$", r"backbone.\1"),
    (r"^neck\.(lateral|fpn)_convs\.(\d+)\.conv\.(weight|bias)$", r"neck.\1_convs.\2.\3"),
    (r"^bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.(weight|bias)$", r"head.\1_convs.\2.conv.\3"),
    (r"^bbox_head\.(cls|reg)_convs\.(\d+)\.gn\.(weight|bias)$", r"head.\1_convs.\2.norm.\3"),
    (
        r"^bbox_head\.(gfl_cls|gfl_reg|retina_cls|retina_reg|conv_cls|conv_reg|conv_centerness|atss_cls|atss_reg|atss_centerness)"
        r"\.(weight|bias)$",
        r"head.\1.\2",
    ),
    (r"^bbox_head\.scales\.(\d+)\.scale$", r"head.scales.\1.scale"),
)
# Buffers MMDetection saves that hf_kd recomputes.
IGNORED_KEYS = (r"^bbox_head\.integral\.project$",)


def convert_state_dict(mmdet_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames an MMDetection GFL state dict to hf_kd's keys; raises on keys it does not know."""
    converted, unknown = {}, []
    for key, value in mmdet_state_dict.items():
        if any(re.match(pattern, key) for pattern in IGNORED_KEYS):
            continue
        for pattern, replacement in KEY_RULES:
            if re.match(pattern, key):
                converted[re.sub(pattern, replacement, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"Unknown MMDetection GFL keys ({len(unknown)}): {unknown}")
    return converted


def load_mmdet_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], list[str] | None]:
    """The state dict and class names (when `meta` has them) of a `.pth` or `.safetensors` checkpoint."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path), None
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in checkpoint:
        return checkpoint, None
    meta = checkpoint.get("meta") or {}
    classes = meta.get("dataset_meta", {}).get("classes") or meta.get("CLASSES")
    return checkpoint["state_dict"], list(classes) if classes else None


def load_converted_weights(model: GFLForObjectDetection, mmdet_state_dict: dict[str, torch.Tensor]) -> None:
    """Loads a converted state dict, failing with the lists of missing and unexpected keys and mismatched shapes."""
    state_dict = convert_state_dict(mmdet_state_dict)
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(expected[key].shape)}"
        for key, value in state_dict.items()
        if key in expected and value.shape != expected[key].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            "The checkpoint does not match the config:\n"
            f"  missing keys ({len(missing)}): {missing}\n"
            f"  unexpected keys ({len(unexpected)}): {unexpected}\n"
            f"  shape mismatches ({len(mismatched)}): {mismatched}"
        )
    model.load_state_dict({key: value.to(expected[key].dtype) for key, value in state_dict.items()})


def convert_mmdet_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path | None = None,
    config: GFLConfig | None = None,
    **config_kwargs,
) -> GFLForObjectDetection:
    """Builds a [`GFLForObjectDetection`] from an MMDetection GFL checkpoint and, with `output_dir`, saves it there
    with a [`GFLImageProcessor`]. `config_kwargs` (e.g. `backbone="resnet50"`) build the config when none is given;
    `id2label` defaults to the checkpoint's class names, else to the number of classes of `gfl_cls`."""
    state_dict, classes = load_mmdet_checkpoint(checkpoint_path)
    if config is None:
        if "id2label" not in config_kwargs and "num_labels" not in config_kwargs:
            num_classes = state_dict["bbox_head.gfl_cls.weight"].shape[0]
            if classes is not None and len(classes) == num_classes:
                config_kwargs["id2label"] = dict(enumerate(classes))
            elif num_classes != 80:
                config_kwargs["num_labels"] = num_classes
        config = GFLConfig(**config_kwargs)
    model = GFLForObjectDetection(config)
    load_converted_weights(model, state_dict)
    model.eval()
    if output_dir is not None:
        model.save_pretrained(output_dir)
        GFLImageProcessor().save_pretrained(output_dir)
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="MMDetection GFL checkpoint (.pth with state_dict/meta, or .safetensors)")
    parser.add_argument("output_dir", help="where to write the save_pretrained folder")
    parser.add_argument("--backbone", default="resnet50", help="timm backbone name (default: resnet50)")
    parser.add_argument("--fpn_channels", type=int, default=256)
    parser.add_argument("--head_channels", type=int, default=256)
    parser.add_argument("--stacked_convs", type=int, default=4)
    parser.add_argument("--num_labels", type=int, default=None, help="default: from the checkpoint")
    args = parser.parse_args()
    config_kwargs = {
        "backbone": args.backbone,
        "fpn_channels": args.fpn_channels,
        "head_channels": args.head_channels,
        "stacked_convs": args.stacked_convs,
    }
    if args.num_labels is not None:
        config_kwargs["num_labels"] = args.num_labels
    model = convert_mmdet_checkpoint(args.checkpoint, args.output_dir, **config_kwargs)
    print(f"Converted {args.checkpoint} ({model.num_parameters():,} parameters) to {args.output_dir}")


if __name__ == "__main__":
    main()
