"""`DistillationTrainer`: a `transformers.Trainer` that trains a GFL student with CrossKD, BCKD or PKD against a frozen
teacher (or plain GFL training with `kd_method="none"`), and evaluates with COCO mAP."""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import torch
from accelerate import PartialState
from accelerate.utils import broadcast_object_list
from transformers import EvalPrediction, Trainer, TrainerCallback
from transformers.modelcard import TrainingSummary
from transformers.trainer_utils import has_length

from ..metrics import COCO_STAT_NAMES, CocoDetectionMAP
from ..metrics.coco_map import DetectionArrays
from ..models.gfl.modeling_gfl import GFLForObjectDetection
from .arguments import DistillationArguments
from .losses import GFLDistillationLoss

logger = logging.getLogger(__name__)

PAPER_WARMUP_STEPS = 500
PAPER_WARMUP_RATIO = 0.001


def pack_detections(
    detections: list[dict[str, torch.Tensor]], labels: list[dict], image_sizes: torch.Tensor, max_detections: int
) -> torch.Tensor:
    """Per-image detections as one `(B, max_detections, 6)` tensor of `x1, y1, x2, y2, score, label` in original-image
    pixels (scaled by `orig_size / size` of each label dict); empty rows have score -1."""
    packed = torch.full((len(detections), max_detections, 6), -1.0, device=image_sizes.device)
    for index, (image_detections, target) in enumerate(zip(detections, labels)):
        count = min(len(image_detections["scores"]), max_detections)
        scale = target["orig_size"].to(image_sizes) / image_sizes[index]
        boxes = image_detections["boxes"][:count] * scale.flip(0).repeat(2).float()
        packed[index, :count, :4] = boxes
        packed[index, :count, 4] = image_detections["scores"][:count]
        packed[index, :count, 5] = image_detections["labels"][:count].float()
    return packed


def coco_compute_metrics(
    ground_truth: str | os.PathLike | Mapping[str, Any],
    id2label: Mapping[int, str] | None = None,
    backend: str = "auto",
) -> Callable[[EvalPrediction], dict[str, float]]:
    """A `compute_metrics` for [`DistillationTrainer`]: the 12 COCO numbers (and per-class AP) of the gathered
    detections against `ground_truth` (a COCO json path or dict).

    The ground truth is loaded once per run, by the main process only, at the first evaluation (a path is checked
    here); the main process computes the metrics (`CocoDetectionMAP.evaluate_predictions` with `backend`) and
    broadcasts them to the other processes, which the Trainer also calls after gathering, so every process returns
    the same numbers while only one holds the ground truth and runs COCOeval. The first entry of a repeated image id
    (padding of the last distributed batch) is used.
    """
    if isinstance(ground_truth, (str, os.PathLike)) and not os.path.isfile(ground_truth):
        raise FileNotFoundError(f"COCO ground truth not found: {ground_truth}")
    cache: dict[str, CocoDetectionMAP] = {}

    def evaluate_on_main_process(prediction: EvalPrediction) -> dict[str, float]:
        if "metric" not in cache:
            cache["metric"] = CocoDetectionMAP(
                ground_truth=ground_truth, id2label=id2label, backend=backend, keep_in_memory=True
            )
        metric = cache["metric"]
        image_ids, packed = _unpack_detections(prediction.predictions, prediction.label_ids)
        keep = packed[:, :, 4] >= 0
        rows = packed[keep]
        category_ids = sorted(metric.ground_truth.getCatIds())
        detections = DetectionArrays.from_xyxy(
            np.repeat(image_ids, keep.sum(axis=1)),
            rows[:, :4],
            rows[:, 4],
            rows[:, 5].astype(np.int64),
            dict(enumerate(category_ids)),
        )
        results = metric.evaluate_predictions(detections, image_ids=image_ids.tolist())
        metrics = {name: results[name] for name in COCO_STAT_NAMES}
        metrics.update({f"map_class_{name}": value for name, value in results["map_per_class"].items()})
        return metrics

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        state = PartialState()
        metrics, error = None, None
        if state.is_main_process:
            try:
                metrics = evaluate_on_main_process(prediction)
            except Exception as exception:  # re-raised below, after the other processes have been told
                error = exception
        if state.num_processes > 1:
            message = None if error is None else f"{type(error).__name__}: {error}"
            metrics, message = broadcast_object_list([metrics, message], from_process=0)
            if message is not None and error is None:
                raise RuntimeError(f"COCO evaluation failed on the main process: {message}")
        if error is not None:
            raise error
        return metrics

    return compute_metrics


def _unpack_detections(predictions: Any, label_ids: Any) -> tuple[np.ndarray, np.ndarray]:
    """Image ids `(n,)` and packed detections `(n, max_detections, 6)` from the gathered evaluation outputs (a list
    of batches, or concatenated), the first entry of each repeated image id kept."""
    if isinstance(predictions, np.ndarray) and isinstance(label_ids, np.ndarray):
        predictions, label_ids = [predictions], [label_ids]
    packed = [np.asarray(batch, dtype=np.float64) for batch in predictions]
    packed = [batch.reshape(-1, batch.shape[-2], 6) for batch in packed]
    image_ids = [np.asarray(batch).reshape(-1).astype(np.int64) for batch in label_ids]
    width = max((batch.shape[1] for batch in packed), default=0)
    packed = [np.pad(b, ((0, 0), (0, width - b.shape[1]), (0, 0)), constant_values=-1.0) for b in packed]
    packed = np.concatenate(packed) if packed else np.zeros((0, 0, 6))
    image_ids = np.concatenate(image_ids) if image_ids else np.zeros(0, np.int64)
    _, first = np.unique(image_ids, return_index=True)
    if len(first) < len(image_ids):
        logger.warning(
            "%d evaluation entries repeat an image id (e.g. padded distributed evaluation); kept the first of each, "
            "%d images",
            len(image_ids) - len(first),
            len(first),
        )
    first = np.sort(first)
    return image_ids[first], packed[first]


class _SetCollatorEpoch(TrainerCallback):
    """Gives the training collator the epoch, so that augmentations differ between epochs (and stay seeded).

    The epochs are counted like the Trainer's loop: from the one `train` starts (or resumes) in, one per pass over the
    data. `state.epoch` at an epoch's start is not that number for a dataset without a length (a streaming pass that
    ends before `max_steps` leaves it at `k + steps / (max_steps * gradient_accumulation_steps)`).
    """

    def __init__(self, collator: Any):
        self.collator = collator
        self.epoch = 0

    def on_train_begin(self, args, state, control, **kwargs):
        self.epoch = int(state.epoch or 0)

    def on_epoch_begin(self, args, state, control, **kwargs):
        self.collator.set_epoch(self.epoch)
        self.epoch += 1


class DistillationTrainer(Trainer):
    """Trains `model` (a [`GFLForObjectDetection`] student) with the distillation losses of `args.kd_method` against
    `teacher`, which stays frozen, in eval mode, on the student's device and outside `accelerator.prepare`, and runs
    under no-grad and the same autocast as the student.

    Each loss component is logged (mean over the logging window and over processes). Evaluation post-processes on
    the device and gathers compact per-image detections (see [`pack_detections`]) with the image ids; pass a
    `compute_metrics` such as [`coco_compute_metrics`] to get the COCO numbers. `eval_data_collator` (e.g. without
    augmentation) replaces `data_collator` for evaluation and prediction; a `data_collator` with `set_epoch` gets
    the epoch at the start of each one.
    """

    # The losses are per-batch means (normalized by the number of positives), not sums over items.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: GFLForObjectDetection,
        args: DistillationArguments,
        teacher: GFLForObjectDetection | None = None,
        eval_data_collator: Callable | None = None,
        **kwargs,
    ):
        self.distillation_config = args.distillation_config()
        self.distillation_loss = None
        if self.distillation_config is not None:
            if teacher is None:
                raise ValueError(f"kd_method={args.kd_method!r} needs a teacher; use kd_method='none' to train alone.")
            with torch.random.fork_rng(devices=[]):  # adapters drawn from the run's seed, like the Trainer's init
                torch.manual_seed(args.seed)
                self.distillation_loss = GFLDistillationLoss(self.distillation_config, model.config, teacher.config)
            if any(True for _ in self.distillation_loss.parameters()):
                # Learned adapters train with the student (same optimizer, DDP and checkpoints).
                model.distillation_adapters = self.distillation_loss
        elif teacher is not None:
            logger.warning("kd_method='none': the teacher is not used.")
            teacher = None
        super().__init__(model=model, args=args, **kwargs)
        self.eval_data_collator = eval_data_collator
        if hasattr(self.data_collator, "set_epoch"):
            self.add_callback(_SetCollatorEpoch(self.data_collator))
        self.teacher = None
        if teacher is not None:
            self.teacher = teacher.eval().requires_grad_(False).to(self.accelerator.device)
        self._loss_sums: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}
        self._loss_counts = defaultdict(int)
        self._step_losses: dict[str, torch.Tensor] = {}  # the last training forward's loss components, detached

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ) -> tuple[int, int]:
        """Where a resumed run continues: the Trainer's own answer, except for a training set without a length.

        The Trainer counts such a set (a streaming dataset) as one epoch of `max_steps` steps when resuming, but starts
        a new epoch (new shuffle and augmentation draws) each time a pass over the data ends; it would replay the
        first epoch's batches after a checkpoint taken in a later one. Resume in the epoch and at the batch recorded
        in the checkpoint's `state.epoch` (`epoch + batches / (max_steps * gradient_accumulation_steps)`) instead.
        """
        epochs_trained, steps_trained_in_current_epoch = super()._init_training_state(
            max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
        )
        if (
            resume_from_checkpoint is not None
            and self.state.global_step > 0
            and not has_length(self.train_dataset)
            and not self.args.ignore_data_skip
        ):
            epochs_trained = int(self.state.epoch)
            batches_per_epoch = max_steps * self.args.gradient_accumulation_steps
            steps_trained_in_current_epoch = round((self.state.epoch - epochs_trained) * batches_per_epoch)
        return epochs_trained, steps_trained_in_current_epoch

    def _accumulate_losses(self, split: str, losses: dict[str, torch.Tensor]) -> None:
        sums = self._loss_sums[split]
        for name, value in losses.items():
            sums[name] = sums.get(name, 0) + value.detach().float()
        self._loss_counts[split] += 1

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        student = self.accelerator.unwrap_model(model)
        config = self.distillation_config
        if config is None:
            outputs = model(pixel_values=inputs["pixel_values"], pixel_mask=inputs.get("pixel_mask"), labels=labels)
            losses = outputs.loss_dict
        else:
            tower_state_index = config.cross_head_index if config.mimic == "cross_head" else None
            model_inputs = {
                "pixel_values": inputs["pixel_values"],
                "pixel_mask": inputs.get("pixel_mask"),
                "tower_state_index": tower_state_index,
                "output_detections": False,
            }
            outputs = model(**model_inputs)
            with torch.no_grad(), self.accelerator.autocast():
                teacher_outputs = self.teacher(**model_inputs)
            terms, targets = student.loss_terms(outputs, labels, config.quality_weight_offset, config.quality_norm_eps)
            with torch.autocast(outputs.logits.device.type, enabled=False):
                terms.update(self.distillation_loss(outputs, teacher_outputs, targets, self.teacher.head))
            losses = {name: value.sum() for name, value in terms.items()}
        loss = sum(losses.values())
        if model.training:
            self._step_losses = {name: value.detach() for name, value in losses.items()}
        self._accumulate_losses("train" if model.training else "eval", losses)
        return (loss, outputs) if return_outputs else loss

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._check_finite(self._step_losses)
        return loss

    def _check_finite(self, losses: dict[str, torch.Tensor]) -> None:
        """Stops training, on every process at once, when a loss component is NaN or infinite on any process (the
        Trainer would otherwise step on it and only leave it out of the logged loss).

        Checked after the backward pass and before the optimizer step, where the Trainer waits for the step's loss
        anyway (its own NaN filter), so that the check adds no wait for the device between forward and backward.
        """
        not_finite = torch.stack([~value.isfinite() for value in losses.values()]).float()
        if self.accelerator.num_processes > 1:
            not_finite = self.accelerator.reduce(not_finite, reduction="sum")
        if not_finite.any():
            components = ", ".join(
                f"{name} (here {value.item()})" for (name, value), bad in zip(losses.items(), not_finite) if bad
            )
            raise FloatingPointError(
                f"Non-finite loss at step {self.state.global_step + 1} (epoch {self.state.epoch or 0:.2f}): "
                f"{components}. Lower the learning rate or the KD weights, or check the data."
            )

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = model(
                pixel_values=inputs["pixel_values"],
                pixel_mask=inputs.get("pixel_mask"),
                labels=labels,
                output_detections=not prediction_loss_only,
            )
        loss = None
        if labels is not None:
            loss = outputs.loss.detach()
            self._accumulate_losses("eval", outputs.loss_dict)
        if prediction_loss_only:
            return loss, None, None
        if labels is None:
            raise ValueError("Evaluation batches need `labels` (with `image_id`, `orig_size`) for COCO metrics.")
        detections = pack_detections(outputs.detections, labels, outputs.image_sizes, self.args.eval_max_detections)
        image_ids = torch.stack([target["image_id"] for target in labels]).to(detections.device)
        return loss, detections, image_ids

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for split, prefix, marker in (("train", "", "loss"), ("eval", "eval_", "eval_loss")):
            if marker in logs and self._loss_counts[split]:
                for name, total in sorted(self._loss_sums[split].items()):
                    mean = self.accelerator.reduce(total / self._loss_counts[split], reduction="mean")
                    logs[f"{prefix}{name}"] = round(mean.item(), 6)
                self._loss_sums[split] = {}
                self._loss_counts[split] = 0
        super().log(logs, start_time)

    def _get_dataloader(self, dataset, description, batch_size, sampler_fn=None, is_training=False, **kwargs):
        if is_training or self.eval_data_collator is None:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, **kwargs)
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return super()._get_dataloader(dataset, description, batch_size, sampler_fn, is_training, **kwargs)
        finally:
            self.data_collator = train_collator

    def create_model_card(self, finetuned_from: str | None = None, **kwargs: Any) -> None:
        """The Trainer's model card plus a section on the distillation: the student's starting point, the teacher, the
        method and its settings, and the latest COCO numbers. Takes the arguments of `Trainer.create_model_card`.

        `finetuned_from` (default: the student's `name_or_path`) is linked as the base model only when it names a Hub
        repository; a student built from a config or loaded from a local folder is "trained from scratch" there."""
        if not self.is_world_process_zero():
            return
        origin = finetuned_from if finetuned_from is not None else self.model.config.name_or_path
        hub_origin = origin if origin and not os.path.isdir(origin) else None
        summary = TrainingSummary.from_trainer(self, finetuned_from=hub_origin, **kwargs)
        summary.finetuned_from = hub_origin  # from_trainer falls back to the empty name_or_path of a new model
        lines = [summary.to_model_card(), "", "## Distillation (hf_kd)", ""]
        lines.append(f"- Student: initialized from `{origin}`" if origin else "- Student: new (built from a config)")
        if self.teacher is None:
            lines.append("- Trained without a teacher (`kd_method=none`).")
        else:
            lines += [
                f"- Method: `{self.args.kd_method}`",
                f"- Teacher: `{self.teacher.config.name_or_path or 'local model'}` "
                f"({self.teacher.config.backbone} backbone)",
                f"- Settings: `{json.dumps(self.distillation_config.__dict__)}`",
            ]
        evaluations = [entry for entry in self.state.log_history if "eval_map" in entry]
        if evaluations:
            latest = evaluations[-1]
            lines += ["", f"COCO box metrics at step {latest['step']}:", "", "| metric | value |", "| --- | --- |"]
            lines += [f"| {name} | {latest[f'eval_{name}']:.4f} |" for name in COCO_STAT_NAMES]
        with open(os.path.join(self.args.output_dir, "README.md"), "w") as card:
            card.write("\n".join(lines) + "\n")

    def create_optimizer(self, model=None):
        if not self.args.paper_recipe or self.optimizer is not None:
            return super().create_optimizer(model)
        total_batch = (
            self.args.per_device_train_batch_size * self.args.gradient_accumulation_steps * self.args.world_size
        )
        learning_rate = 0.01 * total_batch / 16
        parameters = [p for p in (model or self.model).parameters() if p.requires_grad]
        self.optimizer = torch.optim.SGD(parameters, lr=learning_rate, momentum=0.9, weight_decay=1e-4)
        logger.info("Paper recipe: SGD lr %.5f for a total batch of %d.", learning_rate, total_batch)
        return self.optimizer

    def create_scheduler(self, num_training_steps: int, optimizer=None):
        if not self.args.paper_recipe or self.lr_scheduler is not None:
            return super().create_scheduler(num_training_steps, optimizer)
        warmup = self.args.warmup_steps or PAPER_WARMUP_STEPS
        milestones = (num_training_steps * 8 // 12, num_training_steps * 11 // 12)

        def factor(step: int) -> float:
            warm = PAPER_WARMUP_RATIO + (1 - PAPER_WARMUP_RATIO) * step / warmup if step < warmup else 1.0
            return warm * 0.1 ** sum(step >= milestone for milestone in milestones)

        self.lr_scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer or self.optimizer, factor)
        return self.lr_scheduler


__all__ = ["DistillationTrainer", "coco_compute_metrics", "pack_detections"]
