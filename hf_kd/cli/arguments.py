"""Command-line arguments of the hf_kd scripts: the student and teacher, the data, and the distillation and training
settings (`DistillationArguments`), parsed from the command line or a JSON file (plus overrides), with hf_kd's own
options shown before the ~600 lines of `TrainingArguments` in `--help`."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

from transformers import HfArgumentParser, TrainingArguments

from ..distill import DistillationArguments
from ..models.detection import FAMILIES


@dataclass
class ModelArguments:
    """The student and the teacher."""

    _argument_group_name = "student and teacher (hf_kd)"

    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher detector (folder or Hub id); needed unless --kd_method none."}
    )
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start the student from this saved detector instead of building a new one."}
    )
    student_architecture: str | None = field(
        default=None,
        metadata={
            "help": "Detector family of a new student, with MMDetection's defaults for it. Default: the teacher's "
            "(a student of another family is an error), else gfl.",
            "choices": tuple(FAMILIES),
        },
    )
    student_backbone: str = field(default="resnet18", metadata={"help": "timm backbone of a new student."})
    student_backbone_kwargs: str | None = field(
        default=None,
        metadata={"help": 'JSON keyword arguments of timm.create_model, e.g. {"strict_img_size": false} for Swin.'},
    )
    student_fpn_channels: int | None = field(default=None, metadata={"help": "Default: the teacher's (or 256)."})
    student_head_channels: int | None = field(default=None, metadata={"help": "Default: the teacher's (or 256)."})
    student_stacked_convs: int | None = field(default=None, metadata={"help": "Default: the teacher's (or 4)."})
    student_norm_groups: int | None = field(
        default=None,
        metadata={"help": "GroupNorm groups of the head. Default: gcd(head width, the teacher's groups or 32)."},
    )
    backbone_checkpoint: str | None = field(
        default=None, metadata={"help": "Local timm weights (.pth/.safetensors) for the new student's backbone."}
    )
    pretrained_backbone: bool = field(
        default=False, metadata={"help": "Download timm's ImageNet weights for the new student's backbone (Hub)."}
    )
    backbone_frozen_stages: int = field(default=1, metadata={"help": "Frozen stem + first N stages (-1: none)."})
    revision: str = field(
        default="main", metadata={"help": "Version of --model_name_or_path on the Hub (branch, tag or commit)."}
    )
    teacher_revision: str = field(
        default="main",
        metadata={"help": "Version of --teacher_model_name_or_path on the Hub (branch, tag or commit)."},
    )
    token: str | None = field(
        default=None,
        metadata={
            "help": "Hub token to download private models and datasets (default: the logged-in one); written "
            "nowhere. Pushing uses --hub_token."
        },
    )
    cache_dir: str | None = field(
        default=None, metadata={"help": "Where downloaded models and datasets are cached (default: the HF cache)."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote code for Hub models."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "--model_name_or_path with other classes than the dataset's: take the dataset's classes and "
            "start the classifier afresh (transformers' ignore_mismatched_sizes)."
        },
    )

    def hub_kwargs(self) -> dict:
        """The Hub access arguments of every download (`token`, `cache_dir`)."""
        return {"token": self.token, "cache_dir": self.cache_dir}


@dataclass
class DataArguments:
    """The dataset, its splits and their checks, and the augmentation."""

    _argument_group_name = "data (hf_kd)"

    data_dir: str | None = field(
        default=None, metadata={"help": "Local COCO folder (instances_<split>.json or annotations*.json + images)."}
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset (or a local folder in its layout) in the `objects` layout."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    dataset_revision: str | None = field(
        default=None, metadata={"help": "Version of the Hub dataset (branch, tag or commit)."}
    )
    train_split: str = field(default="train")
    eval_split: str | None = field(
        default=None,
        metadata={
            "help": "Evaluation split. Default: the dataset's 'validation' or 'val' split (else --train_val_split); "
            "empty to skip evaluation."
        },
    )
    train_val_split: float | None = field(
        default=None,
        metadata={
            "help": "A dataset without an evaluation split: evaluate on this fraction of the training split's images "
            "(drawn with --seed) and train on the rest."
        },
    )
    test_split: str | None = field(
        default=None, metadata={"help": "Also evaluate the final model on this split (metrics prefixed test_)."}
    )
    streaming: bool = field(default=True, metadata={"help": "Stream the training set (IterableDataset)."})
    prepared_dir: str | None = field(
        default=None,
        metadata={
            "help": "COCO-size local datasets: prepare the training json once into parquet shards in this folder "
            "(resumable, counts verified) and stream from them, with memory that does not grow with the dataset."
        },
    )
    num_shards: int | None = field(
        default=None,
        metadata={
            "help": "Local COCO folder: shards of the streamed training set (a multiple of processes x dataloader "
            "workers; default: one per image, at most 512)."
        },
    )
    column_mapping: str | None = field(
        default=None, metadata={"help": 'JSON mapping of our column names to the dataset\'s, e.g. {"bbox": "box"}.'}
    )
    box_format: str = field(default="xywh", metadata={"help": "Hub datasets: xywh, xyxy or cxcywh."})
    normalized_boxes: bool = field(default=False, metadata={"help": "Hub datasets: boxes relative to image size."})
    shortest_edge: int = field(default=800, metadata={"help": "Resize: shortest edge (MMDetection: 800)."})
    longest_edge: int = field(default=1333, metadata={"help": "Resize: longest edge cap (MMDetection: 1333)."})
    multi_scale_min: int | None = field(
        default=None, metadata={"help": "Train with the shortest edge drawn from [multi_scale_min, shortest_edge]."}
    )
    flip_prob: float = field(default=0.5, metadata={"help": "Random horizontal flip probability in training."})
    color_jitter: float = field(default=0.0, metadata={"help": "Brightness/contrast/saturation jitter (0: off)."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Train on the first N images only."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Evaluate on the first N images only."})
    on_invalid: str = field(
        default="error",
        metadata={
            "help": "Unusable images or annotations in any split (unreadable, truncated or 16-bit images, malformed "
            "boxes, unknown categories, ...), found before training: stop with an error naming them (error), or "
            "leave them out, logged and counted (skip).",
            "choices": ("error", "skip"),
        },
    )
    verify_images: bool = field(
        default=True,
        metadata={
            "help": "Check every image file of every split before training (header and end marker, in threads), "
            "so that an unreadable image is found up front; --no_verify_images leaves it to the first decode."
        },
    )


def build_parser() -> HfArgumentParser:
    """The parser of `ModelArguments`, `DataArguments` and `DistillationArguments`; `--help` lists hf_kd's options
    (student and teacher, data, distillation) before the Trainer's."""
    parser = HfArgumentParser((ModelArguments, DataArguments, DistillationArguments))
    inherited = {item.name for item in fields(TrainingArguments)}
    own = {item.name for item in fields(DistillationArguments)} - inherited
    training = parser._action_groups[1]  # argparse's optional arguments: the Trainer's and ours
    distillation = parser.add_argument_group("distillation (hf_kd)")
    for action in [action for action in training._group_actions if action.dest in own]:
        training._group_actions.remove(action)
        distillation._group_actions.append(action)
    training.title = "training (transformers TrainingArguments)"
    hf_kd_groups = [group for group in parser._action_groups if group.title.endswith("(hf_kd)")]
    for group in hf_kd_groups:
        parser._action_groups.remove(group)
    position = parser._action_groups.index(training)
    parser._action_groups[position:position] = hf_kd_groups
    return parser


def parse_arguments(argv: list[str]) -> tuple[ModelArguments, DataArguments, DistillationArguments]:
    """The three argument sets from `argv`: command-line options, or a JSON file (`config.json`) followed by options
    that override it (`config.json --max_steps 2`)."""
    if argv and argv[0].endswith(".json"):
        with open(argv[0]) as file:
            config = json.load(file)
        options = []
        for key, value in config.items():
            if isinstance(value, bool):
                options += [f"--{key}", str(value).lower()]
            elif isinstance(value, list):
                options += [f"--{key}", *map(str, value)]
            elif value is not None:
                options += [f"--{key}", json.dumps(value) if isinstance(value, dict) else str(value)]
        argv = options + argv[1:]
    return build_parser().parse_args_into_dataclasses(argv)


__all__ = ["DataArguments", "ModelArguments", "build_parser", "parse_arguments"]
