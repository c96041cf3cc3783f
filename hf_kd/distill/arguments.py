"""Training arguments of [`DistillationTrainer`]: `TrainingArguments` plus the distillation settings."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from transformers import TrainingArguments
from transformers.trainer_utils import SchedulerType

from .config import KD_METHODS, DistillationConfig

TEACHER_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class DistillationArguments(TrainingArguments):
    """`TrainingArguments` for detector distillation.

    The defaults differ from `TrainingArguments` where detection needs it: `remove_unused_columns=False` (the collator
    needs every column), `eval_do_concat_batches=False` and `eval_use_gather_object=True` (detections and image ids
    are gathered per batch), `accelerator_config={"dispatch_batches": False}` (every process reads its own shard of a
    streaming dataset; dispatching garbles list-of-dict labels) and `ddp_find_unused_parameters=False`.

    The default recipe trains a dense detector from an ImageNet backbone without tuning: AdamW at lr 1e-4 (for any
    batch size) with weight decay 0.05, a 500-step linear warm-up, cosine decay to 0, and 12 epochs (MMDetection's
    "1x" length; set `max_steps` for a streamed dataset). `paper_recipe` switches to the papers' SGD schedule.
    """

    kd_method: str = field(
        default="crosskd",
        metadata={
            "help": "Distillation preset (the paper's settings for the student's detector family); 'none' trains "
            "without a teacher.",
            "choices": KD_METHODS,
        },
    )
    teacher_dtype: str | None = field(
        default=None,
        metadata={
            "help": "Precision of the teacher's forward pass (its outputs are used in float32): bf16, fp16 or fp32. "
            "Default: the student's (the --bf16/--fp16 autocast, else fp32). A reduced-precision teacher is cheaper "
            "even when the student trains in fp32.",
            "choices": tuple(TEACHER_DTYPES),
        },
    )
    kd_mimic: str | None = field(
        default=None, metadata={"help": "Override: 'cross_head' (CrossKD) or 'student' (BCKD) predictions mimic."}
    )
    kd_cross_head_index: int | None = field(
        default=None, metadata={"help": "Override: tower convs of the student before the cross-head (CrossKD: 3)."}
    )
    kd_cls_weight: float | None = field(default=None, metadata={"help": "Override: classification KD weight."})
    kd_cls_beta: float | None = field(default=None, metadata={"help": "Override: classification KD focusing beta."})
    kd_loc: str | None = field(
        default=None, metadata={"help": "Override: localization KD 'kl' (GFL), 'iou' (GIoU), 'log_iou' or 'none'."}
    )
    kd_loc_weight: float | None = field(default=None, metadata={"help": "Override: localization KD weight."})
    kd_loc_temperature: float | None = field(default=None, metadata={"help": "Override: temperature of 'kl'."})
    kd_loc_weighting: str | None = field(
        default=None, metadata={"help": "Override: 'teacher_score' (CrossKD) or 'score_gap' (BCKD)."}
    )
    kd_center_weight: float | None = field(default=None, metadata={"help": "Override: centre-ness KD weight."})
    kd_feature_weight: float | None = field(default=None, metadata={"help": "Override: PKD feature KD weight."})
    kd_positive_levels_only: bool | None = field(
        default=None, metadata={"help": "Override: KD only on FPN levels with positives (BCKD's original code)."}
    )
    paper_recipe: bool = field(
        default=False,
        metadata={
            "help": "The papers' schedule: SGD lr 0.01 per 16 images (scaled linearly with the total batch), momentum "
            "0.9, weight decay 1e-4, 500-step linear warm-up from 0.001x, lr x0.1 at 8/12 and 11/12 of max_steps."
        },
    )
    learning_rate: float = field(default=1e-4, metadata={"help": "AdamW's learning rate (not --paper_recipe)."})
    weight_decay: float = field(default=0.05, metadata={"help": "AdamW's weight decay (not --paper_recipe)."})
    lr_scheduler_type: SchedulerType | str = field(default="cosine", metadata={"help": "Schedule after the warm-up."})
    warmup_steps: float = field(default=500, metadata={"help": "Linear warm-up steps (a value < 1: a ratio)."})
    num_train_epochs: float = field(default=12, metadata={"help": "Epochs when max_steps is not set (1x: 12)."})
    logging_steps: float = field(default=50, metadata={"help": "Log the losses every N steps."})
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Start afresh: remove the checkpoint-N folders of a previous run from output_dir instead of "
            "resuming from the newest complete one."
        },
    )
    eval_score_threshold: float = field(
        default=0.05, metadata={"help": "Evaluation: class-score threshold of the detections (MMDetection's 0.05)."}
    )
    eval_max_detections: int = field(
        default=100, metadata={"help": "Detections per image kept for COCO evaluation (COCO's maxDets is 100)."}
    )
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep all columns for the collator."})
    eval_do_concat_batches: bool = field(default=False, metadata={"help": "Keep evaluation batches separate."})
    eval_use_gather_object: bool = field(default=True, metadata={"help": "Gather detections as Python objects."})
    accelerator_config: dict | str | None = field(
        default_factory=lambda: {"dispatch_batches": False},
        metadata={"help": "Accelerator settings; dispatch_batches=False lets each process read its own shard."},
    )
    ddp_find_unused_parameters: bool | None = field(
        default=False,
        metadata={"help": "DDP's find_unused_parameters: every trained parameter is used in the distiller's forward."},
    )

    @property
    def teacher_torch_dtype(self) -> torch.dtype | None:
        """The teacher's precision as a torch dtype, or None for the student's."""
        return None if self.teacher_dtype is None else TEACHER_DTYPES[self.teacher_dtype]

    def distillation_config(self, model_type: str = "gfl") -> DistillationConfig | None:
        """The [`DistillationConfig`] of `kd_method` for `model_type` detectors with the `kd_*` overrides, or None for
        `kd_method="none"`."""
        return DistillationConfig.from_method(
            self.kd_method,
            model_type,
            mimic=self.kd_mimic,
            cross_head_index=self.kd_cross_head_index,
            cls_kd_weight=self.kd_cls_weight,
            cls_kd_beta=self.kd_cls_beta,
            loc_kd=self.kd_loc,
            loc_kd_weight=self.kd_loc_weight,
            loc_kd_temperature=self.kd_loc_temperature,
            loc_kd_weighting=self.kd_loc_weighting,
            center_kd_weight=self.kd_center_weight,
            feature_kd_weight=self.kd_feature_weight,
            positive_levels_only=self.kd_positive_levels_only,
        )


__all__ = ["DistillationArguments"]
