"""Trainer callbacks: a progress bar that shows the loss, and Ctrl-C that saves a checkpoint."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import Any

from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

SHOWN_METRICS = ("loss", "eval_loss", "rewards/accuracies", "accuracy", "reward", "kl")


class LossProgressBar(TrainerCallback):
    """A tqdm bar over optimizer steps (tqdm shows rate and ETA) with the latest loss."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None
        self.shown: dict[str, str] = {}

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if state.is_world_process_zero:
            self.bar = tqdm(
                total=state.max_steps, initial=state.global_step, desc="training", unit="step"
            )

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if self.bar is not None:
            self.bar.update(state.global_step - self.bar.n)

    def on_log(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        logs: dict[str, float] | None = None,
        **_: Any,
    ) -> None:
        if self.bar is None or not logs:
            return
        for key in SHOWN_METRICS:
            for name in (key, f"eval_{key}"):
                if isinstance(logs.get(name), int | float):
                    self.shown[name] = f"{logs[name]:.4g}"
        self.bar.set_postfix(self.shown, refresh=True)

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class SaveOnInterrupt(TrainerCallback):
    """First Ctrl-C: finish the current step, write a checkpoint, stop. Second: abort at once.

    The handler only sets a flag, so the checkpoint is taken at a step boundary and `--resume`
    continues exactly from it.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C interrupts for real

    def on_train_begin(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def on_step_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if self.requested:
            control.should_save = True
            control.should_training_stop = True

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._previous)
        self._previous = None
