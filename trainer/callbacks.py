"""Trainer callbacks: a progress bar that shows the loss, and Ctrl-C that saves a checkpoint."""

from __future__ import annotations

import signal
import threading
from types import FrameType
from typing import TYPE_CHECKING, Any

from tqdm.auto import tqdm
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

if TYPE_CHECKING:
    from accelerate import Accelerator

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
    continues exactly from it. Under several processes (torchrun and accelerate launch start
    each in its own session and pass one SIGINT to each) the flags may be seen in different
    steps, and a process that stops alone leaves the others waiting for its gradients: so at
    every step end the processes agree (accelerate's trigger, one all-reduce of a flag) and all
    stop at the first step end where any of them had the signal.
    """

    def __init__(self, accelerator: Accelerator | None = None) -> None:
        self.accelerator = accelerator
        self.requested = False  # this process got SIGINT
        self.stopped = False  # training was stopped for it (in every process at the same step)
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
        if self._agreed():
            self.stopped = True
            control.should_save = True
            control.should_training_stop = True

    def _agreed(self) -> bool:
        """Whether to stop now: this process's flag, or any process's when there are several."""
        accelerator = self.accelerator
        if accelerator is None or accelerator.num_processes == 1:
            return self.requested
        if self.requested:
            accelerator.set_trigger()
        return accelerator.check_trigger()  # collective: every process calls it every step

    def on_train_end(
        self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **_: Any
    ) -> None:
        if self._previous is not None and signal.getsignal(signal.SIGINT) == self._handle:
            signal.signal(signal.SIGINT, self._previous)
        self._previous = None
