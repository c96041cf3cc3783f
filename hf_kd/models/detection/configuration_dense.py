"""Configuration settings shared by every dense detector family: the timm backbone, the FPN, the head towers."""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip


@strict
class DenseDetectorConfig(PreTrainedConfig):
    r"""
    Settings every dense detector family shares (the 80 COCO classes unless `id2label` or `num_labels` is given).

    Args:
        backbone (`str`, defaults to `"resnet50"`):
            timm model name; any model that `timm.create_model(..., features_only=True)` supports and that has
            features at strides 8, 16 and 32 (channels-last features, as Swin's, included).
        backbone_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model` (e.g. `{"stem_width": 16}`, or for Swin
            `{"img_size": [800, 1344], "strict_img_size": False}`).
        backbone_out_indices (`list[int]`, *optional*):
            timm feature indices of the stride 8/16/32 features; found from `feature_info` when not given.
        freeze_backbone_norm (`bool`, defaults to `True`):
            Keep the backbone's BatchNorm layers in eval mode (frozen statistics), MMDetection's `norm_eval=True`.
        backbone_frozen_stages (`int`, defaults to 1):
            Freeze the stem and the first `n` stages (stage 1 has stride 4); `0` freezes the stem only, `-1` nothing.
        fpn_channels (`int`, defaults to 256): width of the FPN outputs.
        fpn_extra_convs_on (`str`, defaults to `"output"`): the first extra level (P6) is a stride-2 conv on the last
            FPN output (`"output"`) or on the last backbone feature (`"input"`, RetinaNet's).
        fpn_relu_before_extra_convs (`bool`, defaults to `False`): ReLU before the later extra convs (FCOS).
        head_channels (`int`, defaults to 256): width of the head towers.
        stacked_convs (`int`, defaults to 4): convs in each head tower.
        norm_groups (`int`, *optional*, defaults to 32): GroupNorm groups in the head towers; `None` for no norm
            (the tower convs then have a bias, RetinaNet's).
        strides (`list[int]`, defaults to `[8, 16, 32, 64, 128]`): strides of the five FPN levels.
        size_divisor (`int`, defaults to 32): images are padded to a multiple of it; anchors outside an image's own
            padded size are not assigned (MMDetection's valid flags).
        initializer_range (`float`, defaults to 0.01): std of the normal init of the head convs.
        prior_prob (`float`, defaults to 0.01): initial foreground probability of the classification logits.
    """

    backbone: str = "resnet50"
    backbone_kwargs: dict | None = None
    backbone_out_indices: list[int] | tuple[int, ...] | None = None
    freeze_backbone_norm: bool = True
    backbone_frozen_stages: int = 1
    fpn_channels: int = 256
    fpn_extra_convs_on: str = "output"
    fpn_relu_before_extra_convs: bool = False
    head_channels: int = 256
    stacked_convs: int = 4
    norm_groups: int | None = 32
    strides: list[int] | tuple[int, ...] = (8, 16, 32, 64, 128)
    size_divisor: int = 32
    initializer_range: float = 0.01
    prior_prob: float = 0.01

    # Settings that give the predictions their meaning: a teacher and a student must agree on them to be distilled.
    prediction_settings = ("num_labels", "strides")

    def __post_init__(self, **kwargs):
        self.strides = list(self.strides)  # the same type whether built here or read back from config.json
        if self.backbone_out_indices is not None:
            self.backbone_out_indices = list(self.backbone_out_indices)
        if self.id2label is None and kwargs.get("num_labels") is None:
            self.id2label = dict(enumerate(COCO_CLASSES))
            self.label2id = {name: index for index, name in self.id2label.items()}
        super().__post_init__(**kwargs)
        if self.id2label is not None and not self.label2id:
            self.label2id = {name: index for index, name in self.id2label.items()}

    def to_diff_dict(self) -> dict:
        """Always keeps the labels: transformers drops them when they equal its own default (2 classes, `LABEL_0` and
        `LABEL_1`), and `__post_init__` would then read the config back with the 80 COCO classes."""
        diff = super().to_diff_dict()
        diff.setdefault("id2label", {str(index): name for index, name in self.id2label.items()})
        if self.label2id is not None:
            diff.setdefault("label2id", dict(self.label2id))
        return diff

    def validate_architecture(self):
        """Checks that the sizes fit together (GroupNorm groups, strides, FPN variant)."""
        super().validate_architecture()
        if self.norm_groups is not None and self.head_channels % self.norm_groups:
            raise ValueError(
                f"head_channels ({self.head_channels}) must be divisible by norm_groups ({self.norm_groups})."
            )
        if list(self.strides[:3]) != [8, 16, 32] or len(self.strides) != 5:
            raise ValueError(
                f"strides must be [8, 16, 32, 64, 128] (C3-C5 plus two extra levels), got {self.strides}."
            )
        if self.stacked_convs < 1:
            raise ValueError(f"stacked_convs ({self.stacked_convs}) must be >= 1.")
        if self.fpn_extra_convs_on not in ("input", "output"):
            raise ValueError(f"fpn_extra_convs_on must be 'input' or 'output', got {self.fpn_extra_convs_on!r}.")


__all__ = ["COCO_CLASSES", "DenseDetectorConfig"]
