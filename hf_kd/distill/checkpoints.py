"""Checkpoints and interruptions: which checkpoint a run resumes from, a checkpoint and a clean stop on SIGTERM, and
the training arguments as written to disk (without the Hub token)."""

from __future__ import annotations

import copy
import json
import logging
import os
import signal
import threading

from transformers import TrainerCallback, TrainingArguments
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

logger = logging.getLogger(__name__)


def find_resumable_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete `checkpoint-N` folder of `output_dir`, or None. A checkpoint is complete when its trainer
    state (written last) reads back and its model weights are there; newer incomplete ones (a run killed while saving)
    are skipped with a warning."""
    if not os.path.isdir(output_dir):
        return None
    folders = [name for name in os.listdir(output_dir) if name.startswith(f"{PREFIX_CHECKPOINT_DIR}-")]
    folders = sorted((f for f in folders if f.split("-")[-1].isdigit()), key=lambda f: int(f.split("-")[-1]))
    for folder in reversed(folders):
        path = os.path.join(output_dir, folder)
        problem = checkpoint_problem(path)
        if problem is None:
            return path
        logger.warning("%s is incomplete (%s; a run stopped while saving it?): not resuming from it", path, problem)
    return None


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why the checkpoint folder `path` cannot be resumed from, or None when it is complete."""
    try:
        with open(os.path.join(path, TRAINER_STATE_NAME)) as state:
            json.load(state)
    except (OSError, ValueError):
        return f"no readable {TRAINER_STATE_NAME}"
    if not os.path.isfile(os.path.join(path, "model.safetensors")):
        return "no model.safetensors"
    return None


def arguments_without_token(args: TrainingArguments) -> TrainingArguments:
    """A copy of `args` whose Hub token is left out, for files that are written or pushed (`training_args.bin`)."""
    args = copy.copy(args)
    args.hub_token = None
    return args


class StopOnSignal(TrainerCallback):
    """Turns SIGTERM (what a cluster scheduler sends before preemption) during training into a checkpoint at the end
    of the current optimizer step and a clean stop; the processes agree on the step in the trainer's step check."""

    def __init__(self):
        self.received = False  # set by the signal handler in this process
        self.agreed = False  # set by the step check once any process received it
        self._previous = None

    def on_train_begin(self, args, state, control, **kwargs):
        self.received = self.agreed = False
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame):
        self.received = True

    def on_step_end(self, args, state, control, **kwargs):
        if self.agreed:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


__all__ = ["StopOnSignal", "arguments_without_token", "checkpoint_problem", "find_resumable_checkpoint"]
