"""Model cards of hf_kd detectors: for one trained by [`DistillationTrainer`], what it is and how to use it, the
teacher and the method, the optimizer and schedule actually used, and the COCO numbers in the model index; for one
converted from MMDetection, its source. They name no local path."""

from __future__ import annotations

import json
import os
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .metrics import COCO_STAT_NAMES

FAMILY_NAMES = {"gfl": "GFL", "retinanet": "RetinaNet", "fcos": "FCOS", "atss": "ATSS"}
PAPERS = {
    "crosskd": "CrossKD ([Wang et al., CVPR 2024](https://arxiv.org/abs/2306.11369))",
    "crosskd+pkd": "CrossKD with PKD feature distillation ([Wang et al., CVPR 2024](https://arxiv.org/abs/2306.11369))",
    "bckd": "BCKD ([Yang et al., ICCV 2023](https://arxiv.org/abs/2308.14286))",
}


def hub_id(name_or_path: str | None) -> str | None:
    """`name_or_path` when it names a Hub repository (`name` or `owner/name`), None for a local folder or nothing."""
    if not name_or_path or os.path.isabs(name_or_path) or os.path.exists(name_or_path) or name_or_path.count("/") > 1:
        return None
    return name_or_path


def describe_detector(config) -> str:
    """A detector's architecture in words: family, backbone, widths and classes."""
    family = FAMILY_NAMES.get(config.model_type, config.model_type)
    return (
        f"{family} with a timm `{config.backbone}` backbone, a {config.fpn_channels}-wide FPN and a "
        f"{config.head_channels}-wide head ({config.stacked_convs} convs per tower), {config.num_labels} classes"
    )


def describe_training(trainer) -> list[str]:
    """The optimizer, schedule and hyperparameters the run used (read from its optimizer and arguments)."""
    args = trainer.args
    optimizer = getattr(trainer.optimizer, "optimizer", trainer.optimizer)
    settings = {
        key: value
        for key, value in (optimizer.defaults if optimizer is not None else {}).items()
        if key in ("lr", "momentum", "weight_decay", "betas", "eps") and value is not None
    }
    total_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
    if args.paper_recipe:
        steps = trainer.state.max_steps
        schedule = (
            f"the papers' schedule: linear warm-up over {args.warmup_steps or 500} steps from 0.001x, then x0.1 at "
            f"steps {steps * 8 // 12} and {steps * 11 // 12}"
        )
    else:
        schedule = f"`{args.lr_scheduler_type}`, warm-up {args.warmup_steps}"
    precision = "bf16 autocast" if args.bf16 else "fp16 autocast" if args.fp16 else "fp32"
    teacher_precision = f", teacher in {args.teacher_dtype}" if args.teacher_dtype else ""
    return [
        f"- Optimizer: {type(optimizer).__name__ if optimizer is not None else args.optim} "
        + ", ".join(f"{key} {value}" for key, value in settings.items()),
        f"- Schedule: {schedule}; {trainer.state.global_step} steps of {total_batch} images "
        f"({args.world_size} process{'es' if args.world_size > 1 else ''})",
        f"- Precision: {precision}{teacher_precision}; seed {args.seed}",
    ]


def usage_lines(repo: str) -> list[str]:
    """The card's usage section: the detector in a pipeline, with hf_kd and with the model's own code."""
    return [
        "## Usage",
        "",
        "```python",
        "import hf_kd  # registers GFL, RetinaNet, FCOS and ATSS with transformers' Auto classes",
        "from transformers import pipeline",
        "",
        f'detector = pipeline("object-detection", model="{repo}")',
        'detections = detector("image.jpg", threshold=0.3)',
        "```",
        "",
        "Without hf_kd installed, the model's own code runs with "
        f'`pipeline("object-detection", model="{repo}", trust_remote_code=True)`.',
    ]


def detector_card(config, repo: str, lines: list[str], tags: list[str] | None = None, **metadata: Any) -> ModelCard:
    """A card titled `repo` with the text `lines`, whose metadata say what the detector of `config` is (an
    object-detection model of transformers, its family and hf_kd in the tags) plus `metadata`."""
    data = ModelCardData(
        library_name="transformers",
        pipeline_tag="object-detection",
        tags=sorted(set(tags or []) | {"hf_kd", "object-detection", config.model_type}),
        model_name=repo,
        **metadata,
    )
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n# {repo}\n\n" + "\n".join(lines) + "\n")


def build_conversion_card(config, repo: str, checkpoint_name: str, versions: dict[str, str]) -> ModelCard:
    """The card of a detector converted from the MMDetection checkpoint file `checkpoint_name`, with the library
    `versions` its metadata records."""
    source = ", ".join(f"{name} {version}" for name, version in sorted(versions.items()))
    lines = [
        f"An object detector: {describe_detector(config)}. Converted with [hf_kd](https://github.com/hf-kd/hf_kd) "
        f"from the MMDetection checkpoint `{checkpoint_name}`{f' ({source})' if source else ''}: the same weights, "
        "and the same outputs as MMDetection 3.3 (hf_kd's parity tests). The weights' licence is the source "
        "checkpoint's.",
        "",
        *usage_lines(repo),
    ]
    return detector_card(config, repo, lines, tags=["mmdetection"])


def build_model_card(
    trainer, dataset: str | None = None, tags: list[str] | None = None, finetuned_from: str | None = None
) -> ModelCard:
    """The card of the student `trainer` trains, with the latest COCO evaluation in its model index."""
    distiller = trainer.accelerator.unwrap_model(trainer.model)
    student, teacher, args = distiller.student, distiller.teacher, trainer.args
    origin = hub_id(finetuned_from if finetuned_from is not None else student.config.name_or_path)
    dataset_id = hub_id(dataset)
    dataset_name = os.path.basename(os.path.normpath(dataset)) if dataset else "the training dataset"
    repo = args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))
    evaluations = [entry for entry in trainer.state.log_history if "eval_map" in entry]
    eval_results = [
        EvalResult(
            task_type="object-detection",
            dataset_type=dataset_id or dataset_name,
            dataset_name=dataset_name,
            metric_type=name,
            metric_name=f"COCO {name}",
            metric_value=round(evaluations[-1][f"eval_{name}"], 4),
        )
        for name in COCO_STAT_NAMES
        if evaluations
    ]
    if teacher is None:
        method = "Trained without a teacher (`kd_method=none`)."
    else:
        teacher_name = hub_id(teacher.config.name_or_path)
        teacher_text = f"[`{teacher_name}`](https://huggingface.co/{teacher_name}), " if teacher_name else ""
        method = (
            f"Distilled with {PAPERS[args.kd_method]} (`kd_method={args.kd_method}`) from a teacher {teacher_text}"
            f"{describe_detector(teacher.config)}.\n\nDistillation settings: `{json.dumps(distiller.config.__dict__)}`"
        )
    start = f"fine-tuned from [`{origin}`](https://huggingface.co/{origin})" if origin else "trained from scratch"
    lines = [
        f"An object detector: {describe_detector(student.config)}; {start} on {dataset_name} with "
        "[hf_kd](https://github.com/hf-kd/hf_kd).",
        "",
        *usage_lines(repo),
        "",
        "## Training",
        "",
        method,
        "",
        *describe_training(trainer),
    ]
    if evaluations:
        latest = evaluations[-1]
        lines += ["", f"## Evaluation (COCO box metrics at step {latest['step']})", "", "| metric | value |"]
        lines += ["| --- | --- |", *(f"| {name} | {latest[f'eval_{name}']:.4f} |" for name in COCO_STAT_NAMES)]
    return detector_card(
        student.config,
        repo,
        lines,
        tags=tags,
        datasets=[dataset_id] if dataset_id else None,
        base_model=origin,
        eval_results=eval_results or None,
    )


def card_arguments(kwargs: dict[str, Any]) -> dict[str, Any]:
    """The arguments of `Trainer.create_model_card` that the card uses (`dataset`, `tags`, `finetuned_from`)."""
    dataset = kwargs.get("dataset")
    return {
        "dataset": dataset[0] if isinstance(dataset, (list, tuple)) else dataset,
        "tags": [kwargs["tags"]] if isinstance(kwargs.get("tags"), str) else kwargs.get("tags"),
        "finetuned_from": kwargs.get("finetuned_from"),
    }


__all__ = ["build_conversion_card", "build_model_card", "describe_detector", "usage_lines"]
