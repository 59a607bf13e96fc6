"""What the trainer's tests share: the example task's run configs and a snapshot of the
trainable weights at the start of training."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import TrainerCallback

from trainer.config import load_config

EXAMPLES = Path(__file__).parents[2] / "examples" / "colors"


def config_for(method: str, yaml_name: str, base: Path, out: Path, *overrides: str):
    """examples/colors/<yaml_name>.yaml on `base`, writing to `out`, with `--set` overrides."""
    return load_config(
        method,
        EXAMPLES / f"{yaml_name}.yaml",
        [f"output_dir={out}", f"model.path={base}", *overrides],
    )


class TrainableSnapshot(TrainerCallback):
    """Copies the trainable parameters when training starts (to check that they moved)."""

    def __init__(self) -> None:
        self.before: dict[str, torch.Tensor] = {}

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.before = {
            n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad
        }
