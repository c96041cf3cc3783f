"""Convert an MMDetection dense-detector checkpoint (GFL, RetinaNet, FCOS, ATSS) into a `save_pretrained` folder
(model + image processor). The family, the widths, the number of classes and a standard ResNet backbone are read
from the checkpoint.

hf-kd-convert gfl_r50_fpn_1x_coco.pth out_dir [--push_to_hub --hub_model_id user/gfl_r50_fpn_1x_coco]
"""

from __future__ import annotations

import argparse
import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import HfApi
from safetensors.torch import load_file

from ..model_card import build_conversion_card
from ..models.detection import FAMILIES, DenseDetectorConfig, DenseDetectorPreTrainedModel

# (MMDetection key pattern, hf_kd replacement); keys matching nothing are an error.
KEY_RULES = (
    (r"^backbone\.(.+)$", r"backbone.\1"),
    (r"^neck\.(lateral|fpn)_convs\.(\d+)\.conv\.(weight|bias)$", r"neck.\1_convs.\2.\3"),
    (r"^bbox_head\.(cls|reg)_convs\.(\d+)\.conv\.(weight|bias)$", r"head.\1_convs.\2.conv.\3"),
    (r"^bbox_head\.(cls|reg)_convs\.(\d+)\.gn\.(weight|bias)$", r"head.\1_convs.\2.norm.\3"),
    (
        r"^bbox_head\.(gfl_cls|gfl_reg|retina_cls|retina_reg|conv_cls|conv_reg|conv_centerness|atss_cls|atss_reg|"
        r"atss_centerness)\.(weight|bias)$",
        r"head.\1.\2",
    ),
    (r"^bbox_head\.scales\.(\d+)\.scale$", r"head.scales.\1.scale"),
)
# Buffers MMDetection saves that hf_kd recomputes.
IGNORED_KEYS = (r"^bbox_head\.integral\.project$",)
# The classification predictor of each family, which tells the family of a checkpoint.
CLASSIFIERS = {"gfl": "gfl_cls", "retinanet": "retina_cls", "fcos": "conv_cls", "atss": "atss_cls"}
# Library versions an MMDetection checkpoint's `meta` records, named in the model card.
VERSION_KEYS = {"MMDetection": "mmdet_version", "MMEngine": "mmengine_version"}
# Blocks per ResNet stage -> timm name, for BasicBlock (False) and Bottleneck (True) ResNets.
RESNETS = {
    (False, (2, 2, 2, 2)): "resnet18",
    (False, (3, 4, 6, 3)): "resnet34",
    (True, (3, 4, 6, 3)): "resnet50",
    (True, (3, 4, 23, 3)): "resnet101",
    (True, (3, 8, 36, 3)): "resnet152",
}


def convert_state_dict(mmdet_state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Renames an MMDetection dense-detector state dict to hf_kd's keys; raises on keys it does not know."""
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
        raise ValueError(f"Unknown MMDetection keys ({len(unknown)}): {unknown}")
    return converted


def load_mmdet_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The state dict and the `meta` (empty for a `.safetensors` file or a bare state dict) of a checkpoint."""
    path = Path(path)
    if path.suffix == ".safetensors":
        return load_file(path), {}
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    if "state_dict" not in checkpoint:
        return checkpoint, {}
    return checkpoint["state_dict"], checkpoint.get("meta") or {}


def load_converted_weights(model: DenseDetectorPreTrainedModel, mmdet_state_dict: dict[str, torch.Tensor]) -> None:
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


def detect_family(state_dict: dict[str, torch.Tensor]) -> str:
    """The detector family of an MMDetection state dict, from its classification predictor."""
    families = [family for family, name in CLASSIFIERS.items() if f"bbox_head.{name}.weight" in state_dict]
    if len(families) != 1:
        raise ValueError(
            "Not an MMDetection GFL, RetinaNet, FCOS or ATSS checkpoint: no "
            + ", ".join(f"bbox_head.{name}.weight" for name in CLASSIFIERS.values())
            + " in it."
        )
    return families[0]


def detect_resnet(state_dict: dict[str, torch.Tensor]) -> str | None:
    """The timm name of a standard (64-wide stem) ResNet backbone, or None when it is not one."""
    blocks = [
        len({key.split(".")[2] for key in state_dict if key.startswith(f"backbone.layer{i}.")}) for i in (1, 2, 3, 4)
    ]
    stem = state_dict.get("backbone.conv1.weight")
    if stem is None or stem.shape[0] != 64:
        return None
    return RESNETS.get(("backbone.layer1.0.conv3.weight" in state_dict, tuple(blocks)))


def config_from_state_dict(
    state_dict: dict[str, torch.Tensor], meta: dict[str, Any], **config_kwargs
) -> DenseDetectorConfig:
    """The hf_kd config of a checkpoint: family, widths, tower depth, the FPN's extra-level input, classes (names from
    `meta` when it has them) and, for a standard ResNet, the timm backbone; `config_kwargs` override what is read."""
    family = detect_family(state_dict)
    config_class = FAMILIES[family][0]
    classifier = state_dict[f"bbox_head.{CLASSIFIERS[family]}.weight"]
    inferred: dict[str, Any] = {
        "fpn_channels": state_dict["neck.lateral_convs.0.conv.weight"].shape[0],
        "head_channels": state_dict["bbox_head.cls_convs.0.conv.weight"].shape[0],
        "stacked_convs": len(
            {key for key in state_dict if re.match(r"bbox_head\.cls_convs\.\d+\.conv\.weight$", key)}
        ),
    }
    # the first extra level's conv reads the last backbone feature ("input") or the last FPN output ("output")
    num_inputs = len({key for key in state_dict if re.match(r"neck\.lateral_convs\.\d+\.conv\.weight$", key)})
    extra_conv = state_dict.get(f"neck.fpn_convs.{num_inputs}.conv.weight")
    last_input = state_dict[f"neck.lateral_convs.{num_inputs - 1}.conv.weight"].shape[1]
    if extra_conv is not None and last_input != inferred["fpn_channels"]:
        inferred["fpn_extra_convs_on"] = "input" if extra_conv.shape[1] == last_input else "output"
    num_classes = classifier.shape[0]
    if family == "retinanet":
        num_classes //= state_dict["bbox_head.retina_reg.weight"].shape[0] // 4
    if family == "gfl":
        inferred["reg_max"] = state_dict["bbox_head.gfl_reg.weight"].shape[0] // 4 - 1
    classes = meta.get("dataset_meta", {}).get("classes") or meta.get("CLASSES")
    if classes is not None and len(classes) == num_classes:
        inferred["id2label"] = dict(enumerate(classes))
    else:
        inferred["num_labels"] = num_classes
    backbone = detect_resnet(state_dict)
    if backbone is not None:
        inferred["backbone"] = backbone
    elif "backbone" not in config_kwargs:
        raise ValueError(
            "The checkpoint's backbone is not a standard ResNet-18/34/50/101/152 (stem 64 wide): name the timm "
            "model whose weights its `backbone.*` keys are (`backbone=...`, `--backbone`)."
        )
    if "id2label" in config_kwargs or "num_labels" in config_kwargs:
        inferred.pop("id2label", None)
        inferred.pop("num_labels", None)
    return config_class(**(inferred | config_kwargs))


def check_backbone_style(
    config: DenseDetectorConfig, state_dict: dict[str, torch.Tensor], meta: dict, style: str | None
):
    """Refuses a caffe-style ResNet (MMDetection FCOS's default): it has timm's keys and shapes, but the stride on the
    first 1x1 conv of each Bottleneck, the BGR input and caffe's normalization, so timm would run it wrongly."""
    if "backbone.layer1.0.conv3.weight" not in state_dict:
        return  # BasicBlock ResNets are the same network in both styles
    if style is None:
        text = str(meta.get("cfg", meta.get("config", "")))
        if "caffe" in text:
            style = "caffe"
        elif config.model_type == "fcos":
            raise ValueError(
                "MMDetection's FCOS configs use caffe-style ResNets (stride on the first 1x1 conv, BGR input), which "
                "are not timm networks and would run wrongly; this checkpoint does not say its style. If it was "
                "trained with style='pytorch', convert it with backbone_style='pytorch' (--backbone_style pytorch)."
            )
    if style == "caffe":
        raise ValueError(
            "The checkpoint's backbone is a caffe-style ResNet (stride on the first 1x1 conv of each Bottleneck, BGR "
            "input, caffe normalization): not a timm network, so hf_kd cannot convert it. Convert a detector trained "
            "with a pytorch-style (torchvision/timm) ResNet."
        )


def check_output_dir(output_dir: str | Path) -> None:
    """Refuses an `output_dir` with files that hf_kd did not write: it must be new, empty, or hold an hf_kd
    detector (a previous conversion), whose files a conversion replaces."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir() or not any(output_dir.iterdir()):
        return
    try:
        model_type = json.loads((output_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError):
        model_type = None
    if model_type not in FAMILIES:
        raise FileExistsError(
            f"{output_dir} is not empty and holds no hf_kd detector: the conversion would overwrite files hf_kd did "
            "not write. Give a new or empty folder."
        )


def convert_mmdet_checkpoint(
    checkpoint_path: str | Path,
    output_dir: str | Path | None = None,
    config: DenseDetectorConfig | None = None,
    backbone_style: str | None = None,
    repo_id: str | None = None,
    **config_kwargs,
) -> DenseDetectorPreTrainedModel:
    """Builds a detector of the checkpoint's family from an MMDetection checkpoint and, with `output_dir`, saves it
    there with the family's image processor and a model card (naming the model `repo_id`, default the folder's name).
    Without `config`, the config is read from the checkpoint (see [`config_from_state_dict`]) with `config_kwargs`
    overriding; `id2label` defaults to the checkpoint's class names. `backbone_style` (`"pytorch"` or `"caffe"`)
    states a Bottleneck ResNet's style where the checkpoint does not."""
    if output_dir is not None:
        check_output_dir(output_dir)
    state_dict, meta = load_mmdet_checkpoint(checkpoint_path)
    config = config or config_from_state_dict(state_dict, meta, **config_kwargs)
    check_backbone_style(config, state_dict, meta, backbone_style)
    _, model_class, processor_class = FAMILIES[config.model_type]
    model = model_class(config)
    load_converted_weights(model, state_dict)
    model.eval()
    if output_dir is not None:
        model.save_pretrained(output_dir)
        processor_class().save_pretrained(output_dir)
        versions = {name: str(meta[key]) for name, key in VERSION_KEYS.items() if meta.get(key)}
        repo = repo_id or os.path.basename(os.path.normpath(output_dir))
        card = build_conversion_card(config, repo, Path(checkpoint_path).name, versions)
        card.save(os.path.join(output_dir, "README.md"))
    return model


def push_converted(output_dir: str | Path, repo_id: str, token: str | None = None, private: bool = False) -> str:
    """Uploads a converted folder to the Hub repository `repo_id` (created if needed); returns the commit's URL. The
    token (default: the logged-in one) is used for the upload only."""
    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    commit = api.upload_folder(
        repo_id=repo_id, folder_path=output_dir, commit_message="Convert an MMDetection checkpoint with hf_kd"
    )
    return commit.commit_url


def main(argv: list[str] | None = None) -> None:
    """`hf-kd-convert`: converts a checkpoint into a folder (and pushes it to the Hub)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="MMDetection checkpoint (.pth with state_dict/meta, or .safetensors)")
    parser.add_argument("output_dir", help="where to write the save_pretrained folder (new, empty or a conversion)")
    parser.add_argument("--backbone", help="timm backbone name (default: the standard ResNet the checkpoint holds)")
    parser.add_argument(
        "--backbone_kwargs", help='JSON keyword arguments of timm.create_model, e.g. {"stem_width": 32}'
    )
    parser.add_argument("--backbone_style", choices=("pytorch", "caffe"), help="a Bottleneck ResNet's style")
    parser.add_argument("--num_labels", type=int, help="default: from the checkpoint")
    parser.add_argument("--push_to_hub", action="store_true", help="upload the folder to the Hub")
    parser.add_argument("--hub_model_id", help="Hub repository (default: the output folder's name)")
    parser.add_argument("--hub_token", help="Hub token (default: the logged-in one); written nowhere")
    parser.add_argument("--hub_private_repo", action="store_true", help="create the repository private")
    args = parser.parse_args(argv)
    config_kwargs = {key: getattr(args, key) for key in ("backbone", "num_labels") if getattr(args, key) is not None}
    if args.backbone_kwargs:
        config_kwargs["backbone_kwargs"] = json.loads(args.backbone_kwargs)
    repo_id = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    model = convert_mmdet_checkpoint(
        args.checkpoint, args.output_dir, backbone_style=args.backbone_style, repo_id=repo_id, **config_kwargs
    )
    print(
        f"Converted {args.checkpoint} ({model.config.model_type}, {model.config.backbone}, "
        f"{model.num_parameters():,} parameters) to {args.output_dir}"
    )
    if args.push_to_hub:
        url = push_converted(args.output_dir, repo_id, token=args.hub_token, private=args.hub_private_repo)
        print(f"Pushed to {url}")


if __name__ == "__main__":
    main()
