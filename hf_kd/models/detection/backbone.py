"""The timm backbone of every dense detector: a `features_only` model returning the stride 8, 16 and 32 feature maps
(NCHW, also for transformer backbones whose features come channels-last), with MMDetection's frozen stages and
frozen BatchNorm statistics."""

from __future__ import annotations

import timm
import torch
from torch import nn

STRIDES = (8, 16, 32)


def create_backbone(config, pretrained: bool = False, checkpoint_path: str | None = None) -> nn.Module:
    """The timm feature extractor of `config.backbone` (with `config.backbone_kwargs`) for the stride 8/16/32 features;
    fills in `config.backbone_out_indices` from timm's `feature_info` when it is not set."""
    kwargs = dict(config.backbone_kwargs or {})
    if checkpoint_path is not None:
        kwargs["pretrained_cfg_overlay"] = {"file": str(checkpoint_path)}
    if config.backbone_out_indices is not None:
        kwargs["out_indices"] = tuple(config.backbone_out_indices)
    if not timm.is_model(config.backbone):
        raise ValueError(
            f"Unknown timm backbone {config.backbone!r}; see `timm.list_models()` for the available names."
        )
    try:
        backbone = timm.create_model(config.backbone, pretrained=pretrained, features_only=True, **kwargs)
    except (RuntimeError, TypeError) as error:
        raise ValueError(f"timm cannot build {config.backbone!r} as a feature extractor: {error}") from error
    reductions = backbone.feature_info.reduction()
    if config.backbone_out_indices is None:
        if not set(STRIDES) <= set(reductions):
            raise ValueError(
                f"Backbone {config.backbone!r} has features at strides {reductions}; dense detectors need strides "
                "8, 16 and 32."
            )
        config.backbone_out_indices = [reductions.index(stride) for stride in STRIDES]
        return create_backbone(config, pretrained, checkpoint_path)
    if reductions != list(STRIDES):
        raise ValueError(
            f"backbone_out_indices {list(config.backbone_out_indices)} of {config.backbone!r} give strides "
            f"{reductions}; dense detectors need strides 8, 16 and 32."
        )
    return backbone


def backbone_features(backbone: nn.Module, pixel_values: torch.Tensor) -> list[torch.Tensor]:
    """The backbone's feature maps as NCHW tensors (channels-last features, e.g. Swin's, are permuted: a view whose
    memory is channels_last, which convolutions take as is)."""
    features = backbone(pixel_values)
    if str(getattr(backbone, "output_fmt", "NCHW")).endswith("NHWC"):
        features = [feature.permute(0, 3, 1, 2) for feature in features]
    return features


def freeze_stages(backbone: nn.Module, num_stages: int, name: str = "backbone") -> None:
    """Stops gradients to the stem and the first `num_stages` stages (stage 1 has stride 4); `0` freezes the stem
    only, `-1` nothing."""
    if num_stages < 0:
        return
    stages = [entry["module"] for entry in backbone.feature_info.info if entry["reduction"] >= 4]
    if num_stages > len(stages):
        raise ValueError(f"backbone_frozen_stages={num_stages}, but {name!r} has {len(stages)}.")

    def in_stage(parameter_name: str, stage: str) -> bool:  # timm flattens "stages.0" to "stages_0" in some models
        return parameter_name.startswith(f"{stage}.") or parameter_name.startswith(f"{stage.replace('.', '_')}.")

    parameters = list(backbone.named_parameters())
    if num_stages == 0:
        stop = next(i for i, (parameter_name, _) in enumerate(parameters) if in_stage(parameter_name, stages[0]))
    else:
        stop = 1 + max(
            i for i, (parameter_name, _) in enumerate(parameters) if in_stage(parameter_name, stages[num_stages - 1])
        )
    for _, parameter in parameters[:stop]:
        parameter.requires_grad_(False)


def keep_frozen_norms_in_eval(backbone: nn.Module, freeze_norm: bool) -> None:
    """Puts the backbone's BatchNorm layers back in eval mode (frozen statistics): all of them with `freeze_norm`
    (MMDetection's `norm_eval=True`), else those whose parameters are frozen."""
    for module in backbone.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            freeze_norm or not any(parameter.requires_grad for parameter in module.parameters())
        ):
            module.eval()


def non_persistent_buffers(module: nn.Module) -> dict[str, torch.Tensor]:
    """The buffers of `module` that its state dict leaves out (e.g. Swin's relative-position indices), by name."""
    return {
        f"{prefix}.{name}" if prefix else name: buffer
        for prefix, submodule in module.named_modules()
        for name, buffer in submodule.named_buffers(recurse=False)
        if name in submodule._non_persistent_buffers_set
    }


__all__ = ["backbone_features", "create_backbone", "freeze_stages", "keep_frozen_norms_in_eval"]
