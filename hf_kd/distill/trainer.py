"""`DistillationTrainer`: a `transformers.Trainer` that trains a [`DetectionDistiller`] (a dense detector student with
CrossKD, BCKD or PKD against a frozen teacher, or the student alone) and evaluates the student with COCO mAP."""

from __future__ import annotations

import json
import logging
import os
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer, TrainerCallback
from transformers.trainer import TRAINER_STATE_NAME, TRAINING_ARGS_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, has_length

from ..metrics import pack_detections
from ..model_card import build_model_card, card_arguments
from ..models.detection import FAMILIES
from ..models.detection.ground_truth import check_ground_truth
from ..models.detection.modeling_dense import DenseDetectorPreTrainedModel
from .arguments import DistillationArguments
from .checkpoints import StopOnSignal, arguments_without_token, checkpoint_problem, find_resumable_checkpoint
from .distiller import DetectionDistiller

logger = logging.getLogger(__name__)

PAPER_WARMUP_STEPS = 500
PAPER_WARMUP_RATIO = 0.001
# Checkpoints keep the distillation adapters beside the student (which is a `from_pretrained` folder).
ADAPTERS_NAME = "distillation_adapters.safetensors"


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
    """Trains a [`DetectionDistiller`] built from `model` (the student), `teacher` and `args` (the method of
    `args.kd_method` for the student's family, the teacher's precision `args.teacher_dtype`), or a distiller given as
    `model`. The Trainer's part: optimisation, logging (each loss component: the mean over the logging window and over
    processes), evaluation of the student, checkpoints (the student as a `from_pretrained` folder plus the adapters)
    and the final folder and Hub push (the student alone), resuming from the newest complete checkpoint, and a
    checkpoint and a clean stop on SIGTERM (`stopped_by_signal`).

    Evaluation runs the student, post-processes with the image processor on the device (`args.eval_score_threshold`)
    and gathers compact per-image detections with the image ids; pass a `compute_metrics` such as
    [`coco_compute_metrics`] for the COCO numbers. `eval_data_collator` (e.g. without augmentation) replaces
    `data_collator` for evaluation and prediction; a `data_collator` with `set_epoch` gets the epoch at the start of
    each one.
    """

    # The losses are per-batch means (normalized by the number of positives), not sums over items.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: DenseDetectorPreTrainedModel | DetectionDistiller,
        args: DistillationArguments,
        teacher: DenseDetectorPreTrainedModel | None = None,
        eval_data_collator: Callable | None = None,
        **kwargs,
    ):
        if not isinstance(model, DetectionDistiller):
            config = args.distillation_config(model.config.model_type)
            if config is None and teacher is not None:
                logger.warning("kd_method='none': the teacher is not used.")
                teacher = None
            if config is not None and teacher is None:
                raise ValueError(f"kd_method={args.kd_method!r} needs a teacher; use kd_method='none' to train alone.")
            with torch.random.fork_rng(devices=[]):  # adapters drawn from the run's seed, like the Trainer's init
                torch.manual_seed(args.seed)
                model = DetectionDistiller(model, teacher, config, teacher_dtype=args.teacher_torch_dtype)
        super().__init__(model=model, args=args, **kwargs)
        self.eval_data_collator = eval_data_collator
        if hasattr(self.data_collator, "set_epoch"):
            self.add_callback(_SetCollatorEpoch(self.data_collator))
        self._stop_on_signal = StopOnSignal()
        self.add_callback(self._stop_on_signal)
        self._loss_sums: dict[str, dict[str, torch.Tensor]] = {"train": {}, "eval": {}}
        self._loss_counts = defaultdict(int)
        self._nonfinite_predictions = 0  # evaluation priors whose outputs are NaN or infinite, on the device
        self._last_step = None  # the last training forward's outputs and labels, checked after its backward pass

    # ---- Training -----------------------------------------------------------------------------------------------

    @property
    def stopped_by_signal(self) -> bool:
        """Whether the last `train` stopped early on SIGTERM (after saving a checkpoint of its last step)."""
        return self._stop_on_signal.agreed

    def train(self, resume_from_checkpoint: str | bool | None = None, **kwargs):
        """`Trainer.train`, where `resume_from_checkpoint=True` takes the newest complete checkpoint of `output_dir`
        (see [`find_resumable_checkpoint`]), an incomplete one given by path is an error, and resuming is logged."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = find_resumable_checkpoint(self.args.output_dir)
            if resume_from_checkpoint is None:
                raise ValueError(f"No complete checkpoint to resume from in {self.args.output_dir}.")
        if resume_from_checkpoint:
            problem = checkpoint_problem(resume_from_checkpoint)
            if problem is not None:
                raise ValueError(f"Cannot resume from {resume_from_checkpoint}: {problem}.")
            with open(os.path.join(resume_from_checkpoint, TRAINER_STATE_NAME)) as state:
                step = json.load(state)["global_step"]
            logger.warning("Resuming from %s (step %d).", resume_from_checkpoint, step)
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        outputs = model(
            pixel_values=inputs["pixel_values"], pixel_mask=inputs.get("pixel_mask"), labels=inputs["labels"]
        )
        self._last_step = (
            {name: value.detach() for name, value in outputs.loss_dict.items()},
            outputs.label_problems,
            outputs.image_sizes,
            inputs["labels"],
        )
        self._accumulate_losses("train", outputs.loss_dict)
        return (outputs.loss, outputs) if return_outputs else outputs.loss

    def training_step(self, model, inputs, num_items_in_batch=None) -> torch.Tensor:
        loss = super().training_step(model, inputs, num_items_in_batch)
        self._check_step()
        return loss

    def _check_step(self) -> None:
        """Stops training, on every process at once, when the step's labels are malformed or a loss component is NaN
        or infinite on any process (the Trainer would otherwise step on it and only leave it out of the logged loss);
        and lets every process agree to stop at the end of this step when any of them received SIGTERM.

        The step's one wait for the device: after the backward pass, where the Trainer waits for the loss anyway.
        """
        losses, label_problems, image_sizes, labels = self._last_step
        not_finite = ~torch.stack(list(losses.values())).isfinite()
        stop = torch.full((), self._stop_on_signal.received, device=not_finite.device)  # a fill, not a copy
        flags = torch.stack([label_problems.any(), not_finite.any(), stop]).float()
        if self.accelerator.num_processes > 1:
            flags = self.accelerator.reduce(flags, reduction="sum")
        if not flags.any():
            return
        if not flags[:2].any():
            if not self._stop_on_signal.agreed:
                logger.warning(
                    "SIGTERM: saving a checkpoint at the end of step %d and stopping.", self.state.global_step + 1
                )
            self._stop_on_signal.agreed = True
            return
        check_ground_truth(label_problems, labels, image_sizes, self.model.student.config.num_labels)
        if not_finite.any():
            components = ", ".join(
                f"{name} (here {value.item()})" for (name, value), bad in zip(losses.items(), not_finite) if bad
            )
            raise FloatingPointError(
                f"Non-finite loss at step {self.state.global_step + 1} (epoch {self.state.epoch or 0:.2f}): "
                f"{components}. Lower the learning rate or the KD weights, or check the data."
            )
        raise RuntimeError(
            f"Another process stopped at step {self.state.global_step + 1}: malformed labels or a non-finite loss "
            "(its error names which)."
        )

    def _init_training_state(
        self, max_steps, num_update_steps_per_epoch, num_train_epochs, resume_from_checkpoint, trial
    ) -> tuple[int, int]:
        """Where a resumed run continues: the Trainer's own answer, except for a training set without a length (no
        public hook decides this).

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

    # ---- Logging ------------------------------------------------------------------------------------------------

    def _accumulate_losses(self, split: str, losses: dict[str, torch.Tensor]) -> None:
        sums = self._loss_sums[split]
        for name, value in losses.items():
            sums[name] = sums.get(name, 0) + value.detach().float()
        self._loss_counts[split] += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        for split, prefix, marker in (("train", "", "loss"), ("eval", "eval_", "eval_loss")):
            if marker in logs and self._loss_counts[split]:
                for name, total in sorted(self._loss_sums[split].items()):
                    mean = self.accelerator.reduce(total / self._loss_counts[split], reduction="mean")
                    logs[f"{prefix}{name}"] = round(mean.item(), 6)
                self._loss_sums[split] = {}
                self._loss_counts[split] = 0
        if "eval_loss" in logs and torch.is_tensor(self._nonfinite_predictions):
            count = int(self.accelerator.reduce(self._nonfinite_predictions, reduction="sum").item())
            logs["eval_num_nonfinite_predictions"] = count
            if count:
                logger.warning(
                    "Evaluation: %d predictions (priors) were NaN or infinite and found no detection.", count
                )
            self._nonfinite_predictions = 0
        super().log(logs, start_time)

    # ---- Evaluation ---------------------------------------------------------------------------------------------

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        labels = inputs.get("labels")
        student = self.accelerator.unwrap_model(model).student
        with torch.no_grad(), self.compute_loss_context_manager():
            outputs = student(pixel_values=inputs["pixel_values"], pixel_mask=inputs.get("pixel_mask"), labels=labels)
        loss = None
        if labels is not None:
            loss = outputs.loss.detach()
            self._accumulate_losses("eval", outputs.loss_dict)
        if prediction_loss_only:
            return loss, None, None
        if labels is None:
            raise ValueError("Evaluation batches need `labels` (with `image_id`, `orig_size`) for COCO metrics.")
        finite = outputs.logits.isfinite().all(-1) & outputs.pred_boxes.isfinite().all(-1)
        self._nonfinite_predictions = self._nonfinite_predictions + (~finite).sum()
        detections = self._image_processor().post_process_object_detection(
            outputs,
            threshold=0.0,
            candidate_threshold=self.args.eval_score_threshold,
            target_sizes=torch.stack([target["orig_size"] for target in labels]),
            max_detections=self.args.eval_max_detections,
        )
        image_ids = torch.stack([target["image_id"] for target in labels]).to(outputs.logits.device)
        return loss, pack_detections(detections, self.args.eval_max_detections), image_ids

    def _image_processor(self):
        """The processor whose post-processing evaluation uses: `processing_class`, else the family's default."""
        if hasattr(self.processing_class, "post_process_object_detection"):
            return self.processing_class
        return FAMILIES[self.model.student.config.model_type][2]()

    def get_eval_dataloader(self, eval_dataset=None):
        return self._with_eval_collator(super().get_eval_dataloader, eval_dataset)

    def get_test_dataloader(self, test_dataset):
        return self._with_eval_collator(super().get_test_dataloader, test_dataset)

    def _with_eval_collator(self, get_dataloader: Callable, dataset):
        if self.eval_data_collator is None:
            return get_dataloader(dataset)
        train_collator, self.data_collator = self.data_collator, self.eval_data_collator
        try:
            return get_dataloader(dataset)
        finally:
            self.data_collator = train_collator

    # ---- Saving and loading -------------------------------------------------------------------------------------

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """Saves the student alone as a `from_pretrained` folder, with the image processor and the training
        arguments; a checkpoint also keeps the distillation adapters beside it (`distillation_adapters.safetensors`),
        so that a resumed run continues exactly."""
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        distiller = self.accelerator.unwrap_model(self.model)
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            distiller.student.save_pretrained(output_dir)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(output_dir)
            torch.save(arguments_without_token(self.args), os.path.join(output_dir, TRAINING_ARGS_NAME))
            adapters = distiller.adapters.state_dict() if distiller.adapters is not None else {}
            if adapters and os.path.basename(os.path.normpath(output_dir)).startswith(PREFIX_CHECKPOINT_DIR):
                save_file(
                    {name: value.contiguous() for name, value in adapters.items()},
                    os.path.join(output_dir, ADAPTERS_NAME),
                )
        if self.args.push_to_hub and not _internal_call:
            self.push_to_hub(commit_message="Model save", revision=self.args.hub_revision)

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Loads a checkpoint's student (the Trainer's own loading) and its distillation adapters."""
        distiller = model if model is not None else self.model
        super()._load_from_checkpoint(resume_from_checkpoint, model=distiller.student)
        if distiller.adapters is not None and any(True for _ in distiller.adapters.parameters()):
            path = os.path.join(resume_from_checkpoint, ADAPTERS_NAME)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{resume_from_checkpoint} has no {ADAPTERS_NAME}: it cannot resume this run.")
            distiller.adapters.load_state_dict(load_file(path))

    def _load_best_model(self) -> None:
        """Loads the best checkpoint's student and adapters (`load_best_model_at_end`)."""
        logger.info(f"Loading best model from {self.state.best_model_checkpoint} (score: {self.state.best_metric}).")
        self._load_from_checkpoint(self.state.best_model_checkpoint)

    def create_model_card(self, **kwargs: Any) -> None:
        """Writes the student's model card (`README.md` in `output_dir`, see [`build_model_card`]): the detector and
        its use, the teacher and the method, the optimizer and schedule actually used, and the latest COCO numbers
        (also in the model index). Takes the arguments of `Trainer.create_model_card`; `finetuned_from` (default: the
        student's `name_or_path`) and `dataset` are named only when they are Hub ids, else by their folder name."""
        if self.is_world_process_zero():
            build_model_card(self, **card_arguments(kwargs)).save(os.path.join(self.args.output_dir, "README.md"))

    # ---- The papers' schedule -----------------------------------------------------------------------------------

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


__all__ = ["DistillationTrainer"]
