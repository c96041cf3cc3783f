"""Distill, train or evaluate a dense detector (GFL, RetinaNet, FCOS, ATSS) with hf_kd: `hf-kd-train` (or
`examples/run_distill.py`), and `hf-kd-eval` for evaluation alone.

Distill a ResNet-18 student from a teacher on a local COCO folder, on every GPU, in bf16:

    accelerate launch -m hf_kd.cli.train \
        --teacher_model_name_or_path path/to/teacher --kd_method crosskd \
        --student_backbone resnet18 --data_dir path/to/coco --train_split train2017 --eval_split val2017 \
        --output_dir outputs/crosskd_r18 --max_steps 90000 --per_device_train_batch_size 2 --paper_recipe \
        --bf16 --eval_strategy steps --eval_steps 10000 --save_steps 10000

The student is of the teacher's family (`--student_architecture` chooses it for a new student without a teacher).
Train a teacher or a baseline: `--kd_method none` (no teacher). A dataset on the Hub in the `objects` layout:
`--dataset_name NAME` (streamed). All arguments can also come from a JSON file, followed by options that override it:
`hf-kd-train configs/crosskd_gfl_r101_r50_coco.json --data_dir /data/coco`. Evaluate a saved detector alone:
`hf-kd-train --do_eval --model_name_or_path CKPT --data_dir ... --eval_split val` (or `hf-kd-eval ...`).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import shutil
import signal
import sys

import transformers
from transformers import AutoModelForObjectDetection, set_seed
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, IntervalStrategy

from ..data import DetectionCollator, DetectionTransform, configure_training_process_memory, get_id2label
from ..distill import DetectionDistiller, DistillationArguments, DistillationTrainer, find_resumable_checkpoint
from ..metrics import coco_compute_metrics
from ..models.detection import FAMILIES, DenseDetectorPreTrainedModel
from .arguments import DataArguments, ModelArguments, parse_arguments
from .data import load_data, load_evaluation_split

logger = logging.getLogger(__name__)


def build_student(
    model_args: ModelArguments, teacher: DenseDetectorPreTrainedModel | None, id2label: dict
) -> DenseDetectorPreTrainedModel:
    """The student: loaded from `model_name_or_path`, or a new detector of the teacher's family (or
    `student_architecture`) with the teacher's widths by default, and always the teacher's prediction settings (classes,
    strides, anchors, box coding), which distillation needs to be equal."""
    if model_args.model_name_or_path is not None:
        if not model_args.ignore_mismatched_sizes:
            student = AutoModelForObjectDetection.from_pretrained(
                model_args.model_name_or_path,
                revision=model_args.revision,
                trust_remote_code=model_args.trust_remote_code,
                **model_args.hub_kwargs(),
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
            revision=model_args.revision,
            trust_remote_code=model_args.trust_remote_code,
            **model_args.hub_kwargs(),
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


def log_arguments(model_args: ModelArguments, data_args: DataArguments, training_args: DistillationArguments) -> None:
    """Logs the process (rank, device, precision) and every argument that differs from its default, tokens hidden."""
    logger.warning(
        "Process %d of %d, device %s, precision %s%s",
        training_args.process_index,
        training_args.world_size,
        training_args.device,
        "bf16" if training_args.bf16 else "fp16" if training_args.fp16 else "fp32",
        f", teacher {training_args.teacher_dtype}" if training_args.teacher_dtype else "",
    )
    changed = []
    for arguments in (model_args, data_args, training_args):
        defaults = type(arguments)(**({"output_dir": arguments.output_dir} if arguments is training_args else {}))
        for item in dataclasses.fields(arguments):
            value = getattr(arguments, item.name)
            if item.init and value != getattr(defaults, item.name):
                value = "<hidden>" if item.name.endswith("token") else getattr(value, "value", value)  # enums
                changed.append(f"{item.name}={value}")
    logger.info("Arguments (those not at their default): %s", ", ".join(changed))


def evaluation_only(training_args: DistillationArguments) -> bool:
    """Whether the run only evaluates: `--do_eval` and/or `--do_predict` without `--do_train` (and without an
    evaluation strategy, which sets `do_eval` for a training run)."""
    asked = training_args.do_eval or training_args.do_predict
    return asked and not training_args.do_train and training_args.eval_strategy == "no"


def load_teacher(model_args: ModelArguments, training_args: DistillationArguments, id2label: dict):
    """The teacher of `--kd_method` (None for `none`), checked against the dataset's classes."""
    if training_args.kd_method == "none":
        return None
    if model_args.teacher_model_name_or_path is None:
        raise ValueError(f"--kd_method {training_args.kd_method} needs --teacher_model_name_or_path.")
    try:
        teacher = AutoModelForObjectDetection.from_pretrained(
            model_args.teacher_model_name_or_path,
            revision=model_args.teacher_revision,
            trust_remote_code=model_args.trust_remote_code,
            **model_args.hub_kwargs(),
        )
    except OSError as error:
        raise OSError(
            f"Cannot load the teacher {model_args.teacher_model_name_or_path!r} (--teacher_model_name_or_path): "
            f"not a folder saved with save_pretrained, nor a model on the Hub. {error}"
        ) from error
    if teacher.config.id2label != id2label:
        raise ValueError(f"The teacher's classes {teacher.config.id2label} differ from the dataset's {id2label}.")
    return teacher


def run(argv: list[str], only_evaluate: bool = False) -> dict[str, float]:
    """Distils (or trains) a detector, evaluates it on `--eval_split` (and `--test_split`), saves it with its model
    card (and pushes it); with `--do_eval` / `--do_predict` alone, or `only_evaluate`, evaluates the
    `--model_name_or_path` detector. Returns the evaluation metrics."""
    model_args, data_args, training_args = parse_arguments(argv)
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    log_arguments(model_args, data_args, training_args)
    if only_evaluate or evaluation_only(training_args):
        return evaluate(model_args, data_args, training_args)

    train_dataset, eval_dataset, id2label, ground_truth, test_split = load_data(
        data_args, training_args, model_args.hub_kwargs()
    )
    teacher = load_teacher(model_args, training_args, id2label)
    set_seed(training_args.seed)  # a new student's initial weights follow --seed, whatever ran before in the process
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


def evaluate(model_args: ModelArguments, data_args: DataArguments, training_args: DistillationArguments) -> dict:
    """Evaluates the saved detector `--model_name_or_path` on `--eval_split` (`--do_eval`) and `--test_split`
    (`--do_predict`): the COCO numbers, logged and saved (`eval_results.json`, `test_results.json`); no training set,
    no teacher, no `--max_steps`."""
    if model_args.model_name_or_path is None:
        raise ValueError(
            "--do_eval / --do_predict without --do_train evaluate a saved detector: give --model_name_or_path."
        )
    splits = {"eval": data_args.eval_split if training_args.do_eval else None}
    splits["test"] = data_args.test_split if training_args.do_predict else None
    if not any(splits.values()):
        raise ValueError("Nothing to evaluate: --do_eval needs --eval_split, --do_predict --test_split.")
    model = AutoModelForObjectDetection.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.revision,
        trust_remote_code=model_args.trust_remote_code,
        **model_args.hub_kwargs(),
    )
    image_processor = FAMILIES[model.config.model_type][2](
        size={"shortest_edge": data_args.shortest_edge, "longest_edge": data_args.longest_edge}
    )
    training_args.eval_strategy = IntervalStrategy.NO  # the splits are evaluated below, nothing is trained
    trainer = DistillationTrainer(
        model=DetectionDistiller(model),
        args=training_args,
        data_collator=DetectionCollator(image_processor),
        processing_class=image_processor,
    )
    metrics = {}
    for prefix, split in splits.items():
        if not split:
            continue
        dataset, ground_truth = load_evaluation_split(data_args, split, hub=model_args.hub_kwargs())
        if get_id2label(dataset) != model.config.id2label:
            raise ValueError(
                f"The detector's classes {model.config.id2label} differ from split {split!r}'s {get_id2label(dataset)}."
            )
        trainer.compute_metrics = coco_compute_metrics(ground_truth, model.config.id2label)
        split_metrics = trainer.evaluate(dataset, metric_key_prefix=prefix)
        trainer.log_metrics(prefix, split_metrics)
        trainer.save_metrics(prefix, split_metrics)
        metrics.update(split_metrics)
    return metrics


def main(argv: list[str] | None = None) -> None:
    """`hf-kd-train` and `examples/run_distill.py`: `run` on the command line's arguments."""
    run(sys.argv[1:] if argv is None else argv)


def evaluate_main(argv: list[str] | None = None) -> None:
    """`hf-kd-eval`: the COCO numbers of a saved detector on `--eval_split` (and with `--do_predict`, on
    `--test_split`), whatever training options the arguments (e.g. a config file) hold."""
    run([*(sys.argv[1:] if argv is None else argv), "--do_eval"], only_evaluate=True)


if __name__ == "__main__":
    main()
