"""`loraplex train` under torchrun: 2 CPU processes, DDP over gloo, against one process.

The same short SFT run (examples/colors/sft.yaml, 8 steps) twice: `torchrun --nproc_per_node 2`
with 4 examples per process, and one process with 8; same seed, same data, so the same global
batches. Then an interrupted 2-process run resumes from the checkpoint the 2 processes wrote.
This module is also the script torchrun runs for the interrupted run (see `main`).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import TrainerCallback

from tests.support.training import EXAMPLES, TrainableSnapshot, config_for
from trainer.run import run_training

ROOT = Path(__file__).parents[2]
PROCESSES = 2
PER_DEVICE = 4  # x 2 processes = the single run's batch of 8
# 8 global batches of 8 = 64 of the 94 mixed examples: all in the first epoch, so both runs see
# the same examples in the same batches (accelerate gives process i every i-th batch of the
# same seeded order; an epoch's last, partial batch would be filled differently).
RUN = ("training.max_steps=8", "training.save_steps=4", "data.eval_file=null")
# Why the 2 adapters are close but not bit-identical: each process averages the loss over its
# 4 examples' tokens (scaled by the global token count) and DDP's gloo all-reduce adds the 2
# halves of the gradient, where the single process sums all 8 in one matmul; each half is also
# padded to its own longest example, so the matmul shapes (and blocking) differ. Float32 sums in
# another order differ in the last bits, and Adam (which divides by the gradient's running
# scale) carries that through 8 steps, more for weights whose gradient is near zero. Measured
# over seeds 0-4, the largest |2 processes - 1 process| over all LoRA tensors was 2.0e-5, 2.3e-7,
# 1.5e-6, 5.9e-6, 7.9e-6 (relative to the tensor's largest entry at most 4.7e-4), while
# training moved every tensor by 8.7e-3 or more (lora_B from zero). The bound is 10x the largest
# measured difference and still 40x below the smallest change training made.
MAX_ABS_DIFF = 2e-4
MIN_TRAINED_CHANGE = 10 * MAX_ABS_DIFF


def torchrun(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`torchrun --standalone --nproc_per_node 2 ARGS` (a free port; 1 thread per process)."""
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone",
         f"--nproc_per_node={PROCESSES}", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"},
    )  # fmt: skip


def train_sft(out: Path, base: Path, *options: str) -> subprocess.CompletedProcess:
    """`loraplex train sft` on 2 processes."""
    overrides = [f"output_dir={out}", f"model.path={base}", *RUN]
    overrides += [f"training.per_device_train_batch_size={PER_DEVICE}"]
    sets = [arg for o in overrides for arg in ("--set", o)]
    return torchrun(
        "-m", "gateway.cli", "train", "sft", "--config", str(EXAMPLES / "sft.yaml"), *sets,
        *options,
    )  # fmt: skip


def lora_weights(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "adapter_model.safetensors")


def max_abs_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def assert_one_finished_adapter(out: Path, result: subprocess.CompletedProcess) -> dict:
    """The run wrote one adapter (no leftover .partial), and only the main process echoed."""
    assert result.returncode == 0, result.stderr[-4000:]
    assert sorted(p.name for p in out.iterdir()) == ["adapter", "checkpoints"]
    assert sorted(p.name for p in (out / "adapter").iterdir()) == [
        "adapter_config.json",
        "adapter_model.safetensors",
        "manifest.json",
    ]
    assert result.stdout.count(f"adapter: {out / 'adapter'}\n") == 1, result.stdout
    assert result.stdout.count("train mix: ") == 1, result.stdout
    return json.loads((out / "adapter" / "manifest.json").read_text())


@pytest.fixture(scope="module")
def two_process_run(tiny_model, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    out = tmp_path_factory.mktemp("ddp") / "run"
    return out, train_sft(out, tiny_model.base)


def test_two_processes_train_the_adapter_one_process_trains_with_the_same_global_batch(
    two_process_run, tiny_model, tmp_path
):
    out, result = two_process_run
    manifest = assert_one_finished_adapter(out, result)
    assert manifest["processes"] == PROCESSES and manifest["steps"] == 8
    assert manifest["config"]["training"]["per_device_train_batch_size"] == PER_DEVICE
    checkpoint = out / "checkpoints" / "checkpoint-8"
    assert (checkpoint / "rng_state_0.pth").is_file() and (checkpoint / "rng_state_1.pth").is_file()

    snapshot = TrainableSnapshot()
    single = run_training(
        config_for("sft", "sft", tiny_model.base, tmp_path, *RUN,
                   f"training.per_device_train_batch_size={PER_DEVICE * PROCESSES}"),
        callbacks=[snapshot],
        echo=lambda _: None,
    )  # fmt: skip
    assert single.manifest["processes"] == 1
    init = {n.replace(".default", ""): p for n, p in snapshot.before.items()}
    reference = lora_weights(single.adapter_dir)
    distributed = lora_weights(out / "adapter")
    assert max_abs_diff(distributed, reference) <= MAX_ABS_DIFF
    # Not trivially close: training moved every LoRA tensor, by far more than the tolerance.
    moved = {k: (distributed[k] - init[k]).abs().max().item() for k in distributed}
    assert min(moved.values()) > MIN_TRAINED_CHANGE, moved


class InterruptRank(TrainerCallback):
    """A real SIGINT to one process only, at the end of a step: the others never get one."""

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_step_end(self, args, state, control, **kwargs):
        if args.process_index == self.rank and state.global_step == self.step:
            signal.raise_signal(signal.SIGINT)


def test_an_interrupt_in_one_process_stops_both_and_resume_reaches_the_uninterrupted_result(
    two_process_run, tiny_model, tmp_path
):
    out = tmp_path / "run"
    stopped = torchrun(
        "-m", "tests.integration.test_trainer_distributed", "--base", str(tiny_model.base),
        "--out", str(out), "--interrupt-rank", "1", "--interrupt-step", "2",
    )  # fmt: skip
    assert stopped.returncode == 0, stopped.stderr[-4000:]
    # Process 1 got SIGINT at step 2's end, after the processes had compared flags for that
    # step; at step 3's end they compare again and both stop, and write checkpoint-3 (model and
    # optimizer by process 0, RNG state by each), which no save_steps schedule would write.
    assert sorted(line for line in stopped.stdout.splitlines() if line.startswith("rank ")) == [
        "rank 0: interrupted at step 3",
        "rank 1: interrupted at step 3",
    ], stopped.stdout
    assert sorted(p.name for p in out.iterdir()) == ["checkpoints"]
    checkpoint = out / "checkpoints" / "checkpoint-3"
    assert {"adapter_model.safetensors", "rng_state_0.pth", "rng_state_1.pth"} <= {
        p.name for p in checkpoint.iterdir()
    }

    # (Without --resume the folder is refused, by every process before any writes: the
    # single-process test in test_trainer.py covers that message, and a launch costs ~25 s.)
    resumed = train_sft(out, tiny_model.base, "--resume")
    manifest = assert_one_finished_adapter(out, resumed)
    assert manifest["steps"] == 8
    # Optimizer, scheduler, each process's RNG and its place in the data come back from the
    # checkpoint, and the 2 processes add their gradients in the same order as before.
    uninterrupted, _ = two_process_run
    assert max_abs_diff(lora_weights(out / "adapter"), lora_weights(uninterrupted / "adapter")) == 0


def main() -> None:
    """What torchrun runs for the interrupted run: `run_training` with `InterruptRank`."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--base", type=Path, required=True)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--interrupt-rank", type=int, required=True)
    parser.add_argument("--interrupt-step", type=int, required=True)
    options = parser.parse_args()
    config = config_for(
        "sft", "sft", options.base, options.out, *RUN,
        f"training.per_device_train_batch_size={PER_DEVICE}",
    )  # fmt: skip
    callback = InterruptRank(options.interrupt_rank, options.interrupt_step)
    result = run_training(config, callbacks=[callback], echo=lambda _: None)
    assert result.interrupted and result.adapter_dir is None
    print(f"rank {os.environ['RANK']}: interrupted at step {result.global_step}", flush=True)


if __name__ == "__main__":
    main()
