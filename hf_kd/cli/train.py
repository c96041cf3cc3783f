"""Distill (or train) a dense detector (GFL, RetinaNet, FCOS, ATSS) with hf_kd.

Distill a ResNet-18 student from a teacher on a local COCO folder, on every GPU, in bf16:

    accelerate launch examples/run_distill.py \
        --teacher_model_name_or_path path/to/teacher --kd_method crosskd \
        --student_backbone resnet18 --data_dir path/to/coco --train_split train2017 --eval_split val2017 \
        --output_dir outputs/crosskd_r18 --max_steps 90000 --per_device_train_batch_size 2 --paper_recipe \
        --bf16 --eval_strategy steps --eval_steps 10000 --save_steps 10000

The student is of the teacher's family (`--student_architecture` chooses it for a new student without a teacher). Train a
teacher or a baseline: `--kd_method none` (no teacher). A dataset on the Hub in the `objects` layout:
`--dataset_name NAME` (streamed). All arguments can also come from a JSON file: `run_distill.py config.json`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import signal
import sys
from dataclasses import dataclass, field

import datasets
import transformers
from accelerate import PartialState
from transformers import AutoModelForObjectDetection, HfArgumentParser
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from hf_kd import DenseDetectorPreTrainedModel
from hf_kd.data import (
    DetectionCategories,
    DetectionCollator,
    DetectionDataError,
    DetectionTransform,
    check_same_categories,
    configure_training_process_memory,
    find_coco_annotation_file,
    get_id2label,
    load_detection_dataset,
    load_prepared_coco_detection,
    prepare_coco_detection,
    read_coco_detection,
)
from hf_kd.distill import DistillationArguments, DistillationTrainer, find_resumable_checkpoint
from hf_kd.metrics import build_coco_ground_truth, coco_compute_metrics
from hf_kd.models.detection import FAMILIES

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    teacher_model_name_or_path: str | None = field(
        default=None, metadata={"help": "Teacher GFL detector (folder or Hub id); needed unless --kd_method none."}
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
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow remote code for Hub models."})
    ignore_mismatched_sizes: bool = field(
        default=False,
        metadata={
            "help": "--model_name_or_path with other classes than the dataset's: take the dataset's classes and "
            "start the classifier afresh (transformers' ignore_mismatched_sizes)."
        },
    )


@dataclass
class DataArguments:
    data_dir: str | None = field(
        default=None, metadata={"help": "Local COCO folder (instances_<split>.json or annotations*.json + images)."}
    )
    dataset_name: str | None = field(default=None, metadata={"help": "Hub dataset in the `objects` layout."})
    train_split: str = field(default="train")
    eval_split: str | None = field(default="val", metadata={"help": "Evaluation split; empty to skip evaluation."})
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


def hub_load_kwargs(data_args: DataArguments) -> dict:
    return {
        "column_mapping": json.loads(data_args.column_mapping) if data_args.column_mapping else None,
        "box_format": data_args.box_format,
        "normalized_boxes": data_args.normalized_boxes,
    }


def validation_kwargs(data_args: DataArguments) -> dict:
    """How every split is validated: invalid entries raised or skipped, image files checked, a progress bar."""
    return {
        "on_invalid": "skip" if data_args.on_invalid == "skip" else "raise",
        "verify_images": data_args.verify_images,
        "progress": PartialState().is_local_main_process,
    }


def check_not_empty(
    dataset: datasets.Dataset | datasets.IterableDataset, where: str, data_args: DataArguments
) -> None:
    """Raises unless the dataset has an image (a streamed one is read up to its first example)."""
    if isinstance(dataset, datasets.Dataset):
        empty = len(dataset) == 0
    else:
        empty = next(iter(dataset.remove_columns("image").take(1)), None) is None
    if empty:
        skipped = " (after skipping the invalid ones, --on_invalid skip)" if data_args.on_invalid == "skip" else ""
        raise DetectionDataError(f"{where} has no images{skipped}: nothing to train on or evaluate.")


def load_evaluation_split(
    data_args: DataArguments, split: str, train_categories: dict[str, DetectionCategories] | None = None
):
    """A map-style evaluation dataset and its COCO ground truth (the annotation file itself for a COCO folder without
    skipped entries), validated; with `train_categories` (the training split's, by its name), an error unless the
    split's categories are the same."""
    if data_args.data_dir is not None:
        source = read_coco_detection(
            find_coco_annotation_file(data_args.data_dir, split), **validation_kwargs(data_args)
        )
        dataset, categories, where = source.to_dataset(), source.categories, str(source.annotation_file)
        ground_truth = None if source.report.num_invalid else where
    else:
        dataset = load_detection_dataset(
            data_args.dataset_name,
            split,
            streaming=False,
            **hub_load_kwargs(data_args),
            **validation_kwargs(data_args),
        )
        categories = DetectionCategories.from_id2label(get_id2label(dataset))
        where, ground_truth = f"{data_args.dataset_name} split {split!r}", None
    if train_categories is not None:
        check_same_categories({**train_categories, where: categories})
    check_not_empty(dataset, where, data_args)
    if data_args.max_eval_samples is not None:
        dataset = dataset.select(range(min(data_args.max_eval_samples, len(dataset))))
        ground_truth = None
    if ground_truth is None:
        ground_truth = build_coco_ground_truth(dataset.remove_columns("image"), get_id2label(dataset))
    return dataset, ground_truth


def load_data(data_args: DataArguments, training_args: DistillationArguments):
    """Training and evaluation datasets, `id2label`, the evaluation ground truth (COCO json path or dict) and the
    test split's `(dataset, ground truth)` (or None).

    Every split is validated before training (images checked with `--verify_images`, invalid entries raised or
    skipped as `--on_invalid` says); an empty split, or splits with other categories, are errors.
    """
    if (data_args.data_dir is None) == (data_args.dataset_name is None):
        raise ValueError("Give exactly one of --data_dir (local COCO folder) and --dataset_name (Hub dataset).")
    validation = validation_kwargs(data_args)
    if data_args.prepared_dir is not None:
        if data_args.data_dir is None:
            raise ValueError("--prepared_dir prepares a local COCO folder: give --data_dir.")
        annotation_file = find_coco_annotation_file(data_args.data_dir, data_args.train_split)
        with training_args.main_process_first(desc="preparing the training set"):  # the others reuse its shards
            prepared = prepare_coco_detection(
                annotation_file,
                data_args.prepared_dir,
                num_shards=data_args.num_shards,
                split=data_args.train_split,
                **validation,
            )
        train_dataset, categories = load_prepared_coco_detection(prepared), prepared.categories
        where = str(annotation_file)
    elif data_args.data_dir is not None:
        annotation_file = find_coco_annotation_file(data_args.data_dir, data_args.train_split)
        source = read_coco_detection(annotation_file, **validation)
        if data_args.streaming:
            train_dataset = source.to_iterable_dataset(data_args.num_shards)
        else:
            train_dataset = source.to_dataset()
        categories, where = source.categories, str(source.annotation_file)
    else:
        train_dataset = load_detection_dataset(
            data_args.dataset_name,
            data_args.train_split,
            streaming=data_args.streaming,
            **hub_load_kwargs(data_args),
            **validation,
        )
        categories = DetectionCategories.from_id2label(get_id2label(train_dataset))
        where = f"{data_args.dataset_name} split {data_args.train_split!r}"
    check_not_empty(train_dataset, where, data_args)
    eval_dataset = ground_truth = test_split = None
    if data_args.eval_split:
        eval_dataset, ground_truth = load_evaluation_split(data_args, data_args.eval_split, {where: categories})
    if data_args.test_split:
        test_split = load_evaluation_split(data_args, data_args.test_split, {where: categories})
    if isinstance(train_dataset, datasets.IterableDataset):
        train_dataset = train_dataset.shuffle(seed=training_args.seed, buffer_size=1000)
    return train_dataset, eval_dataset, get_id2label(train_dataset), ground_truth, test_split


def build_student(
    model_args: ModelArguments, teacher: DenseDetectorPreTrainedModel | None, id2label: dict
) -> DenseDetectorPreTrainedModel:
    """The student: loaded from `model_name_or_path`, or a new detector of the teacher's family (or
    `student_architecture`) with the teacher's widths by default, and always the teacher's prediction settings (classes,
    strides, anchors, box coding), which distillation needs to be equal."""
    if model_args.model_name_or_path is not None:
        if not model_args.ignore_mismatched_sizes:
            student = AutoModelForObjectDetection.from_pretrained(
                model_args.model_name_or_path, trust_remote_code=model_args.trust_remote_code
            )
            if student.config.id2label != id2label:
                raise ValueError(
                    f"The student's classes {student.config.id2label} (--model_name_or_path) differ from the "
                    f"dataset's {id2label}: pass --ignore_mismatched_sizes to take the dataset's and start the "
                    "classifier afresh."
                )
            return student
        return AutoModelForObjectDetection.from_pretrained(
            model_args.model_name_or_path,
            trust_remote_code=model_args.trust_remote_code,
            id2label=id2label,
            label2id={name: index for index, name in id2label.items()},
            ignore_mismatched_sizes=True,
        )
    family = model_args.student_architecture or (teacher.config.model_type if teacher is not None else "gfl")
    if teacher is not None and family != teacher.config.model_type:
        raise ValueError(
            f"--student_architecture {family} differs from the teacher's family ({teacher.config.model_type}): "
            "distillation needs a student of the teacher's family."
        )
    config_class, model_class, _ = FAMILIES[family]
    defaults = teacher.config if teacher is not None else config_class()
    head_channels = model_args.student_head_channels or defaults.head_channels
    norm_groups = None
    if defaults.norm_groups is not None:
        norm_groups = model_args.student_norm_groups or math.gcd(head_channels, defaults.norm_groups)
    config = config_class(
        backbone=model_args.student_backbone,
        backbone_kwargs=json.loads(model_args.student_backbone_kwargs) if model_args.student_backbone_kwargs else None,
        backbone_frozen_stages=model_args.backbone_frozen_stages,
        fpn_channels=model_args.student_fpn_channels or defaults.fpn_channels,
        head_channels=head_channels,
        norm_groups=norm_groups,
        stacked_convs=model_args.student_stacked_convs or defaults.stacked_convs,
        **{name: getattr(defaults, name) for name in defaults.prediction_settings if name != "num_labels"},
        id2label=id2label,
    )
    if model_args.backbone_checkpoint or model_args.pretrained_backbone:
        return model_class.from_pretrained_backbone(config, model_args.backbone_checkpoint)
    return model_class(config)


def remove_checkpoints(output_dir: str) -> None:
    """Removes the `checkpoint-N` folders a Trainer wrote to `output_dir` (they hold its trainer state), and nothing
    else, so that a run starts afresh."""
    if not os.path.isdir(output_dir):
        return
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-") and os.path.isfile(os.path.join(path, TRAINER_STATE_NAME)):
            logger.warning("--overwrite_output_dir: removing %s", path)
            shutil.rmtree(path)


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ModelArguments, DataArguments, DistillationArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(argv[0])
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()

    train_dataset, eval_dataset, id2label, ground_truth, test_split = load_data(data_args, training_args)
    teacher = None
    if training_args.kd_method != "none":
        if model_args.teacher_model_name_or_path is None:
            raise ValueError(f"--kd_method {training_args.kd_method} needs --teacher_model_name_or_path.")
        try:
            teacher = AutoModelForObjectDetection.from_pretrained(
                model_args.teacher_model_name_or_path, trust_remote_code=model_args.trust_remote_code
            )
        except OSError as error:
            raise OSError(
                f"Cannot load the teacher {model_args.teacher_model_name_or_path!r} (--teacher_model_name_or_path): "
                f"not a folder saved with save_pretrained, nor a model on the Hub. {error}"
            ) from error
        if teacher.config.id2label != id2label:
            raise ValueError(f"The teacher's classes {teacher.config.id2label} differ from the dataset's {id2label}.")
    student = build_student(model_args, teacher, id2label)

    image_processor = FAMILIES[student.config.model_type][2](
        size={"shortest_edge": data_args.shortest_edge, "longest_edge": data_args.longest_edge}
    )
    shortest_edge = data_args.shortest_edge
    if data_args.multi_scale_min is not None:
        shortest_edge = (data_args.multi_scale_min, data_args.shortest_edge)
    jitter = data_args.color_jitter
    train_transform = DetectionTransform(
        shortest_edge=shortest_edge,
        longest_edge=data_args.longest_edge,
        flip_prob=data_args.flip_prob,
        brightness=jitter,
        contrast=jitter,
        saturation=jitter,
        seed=training_args.seed,
    )
    trainer = DistillationTrainer(
        model=student,
        args=training_args,
        teacher=teacher,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=DetectionCollator(image_processor, train_transform, configure_workers=True),
        eval_data_collator=DetectionCollator(image_processor),
        processing_class=image_processor,
        compute_metrics=coco_compute_metrics(ground_truth, id2label) if ground_truth is not None else None,
    )

    checkpoint = training_args.resume_from_checkpoint
    if training_args.overwrite_output_dir:
        remove_checkpoints(training_args.output_dir)
    elif checkpoint is None:
        checkpoint = find_resumable_checkpoint(training_args.output_dir)  # resume an interrupted run
    configure_training_process_memory()  # gc.freeze() and Arrow's system allocator, for the forked workers
    train_result = trainer.train(resume_from_checkpoint=checkpoint)
    if trainer.stopped_by_signal:
        logger.warning(
            "Stopped by SIGTERM at step %d; the checkpoint is in %s: run the same command again to resume.",
            trainer.state.global_step,
            training_args.output_dir,
        )
        sys.exit(128 + signal.SIGTERM)
    trainer.save_model()
    trainer.log_metrics("train", train_result.metrics)
    trainer.save_metrics("train", train_result.metrics)
    trainer.save_state()

    metrics = {}
    if eval_dataset is not None:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    if data_args.test_split:
        test_dataset, test_ground_truth = test_split
        trainer.compute_metrics = coco_compute_metrics(test_ground_truth, id2label)
        test_metrics = trainer.evaluate(test_dataset, metric_key_prefix="test")
        trainer.log_metrics("test", test_metrics)
        trainer.save_metrics("test", test_metrics)
        metrics.update(test_metrics)
    card = {
        "finetuned_from": model_args.model_name_or_path,
        "tasks": "object-detection",
        "dataset": data_args.dataset_name or data_args.data_dir,
        "tags": [
            "object-detection",
            student.config.model_type,
            "knowledge-distillation",
            "hf_kd",
            training_args.kd_method,
        ],
    }
    if training_args.push_to_hub:
        trainer.push_to_hub(**card)
    else:
        trainer.create_model_card(**card)
    return metrics


if __name__ == "__main__":
    main()
