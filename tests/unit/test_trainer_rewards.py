"""RL reward sources: functions by import string, reward-model runs, and what the manifest keeps."""

from __future__ import annotations

import hashlib
import inspect

import pytest

from trainer.config import ConfigError, RewardSource
from trainer.rewards import import_function, load_rewards, reward_model_folder


def length_reward(prompts, completions, **_):
    """A rule reward for the tests: longer is better."""
    return [float(len(c)) for c in completions]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_colon", "must be `package.module:function`"),
        ("no.such.module:f", "cannot import 'no.such.module:f'"),
        ("tests.unit.test_trainer_rewards:absent", "cannot import"),
        ("tests.unit.test_trainer_rewards:pytest", "is not callable"),
    ],
)
def test_a_bad_function_reference_is_a_config_error(spec, message):
    with pytest.raises(ConfigError, match=message):
        import_function(spec)


def test_a_folder_that_is_not_a_reward_run_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="is not a `loraplex train reward` run"):
        reward_model_folder(tmp_path)
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / "adapter_config.json").write_text("{}")
    assert reward_model_folder(tmp_path) == tmp_path / "adapter"


def test_a_function_reward_is_called_as_trl_calls_it_and_recorded_by_its_source():
    spec = "tests.unit.test_trainer_rewards:length_reward"
    rewards = load_rewards([RewardSource(function=spec, weight=0.5)], "float32")
    (function,) = rewards.functions
    assert function(["p", "q"], [" a", " bcd"], reference=["x", "y"]) == [2.0, 4.0]
    assert rewards.weights == [0.5] and rewards.processing_classes == [None]
    source = inspect.getsourcefile(length_reward)
    with open(source, "rb") as handle:
        digest = hashlib.file_digest(handle, "sha256").hexdigest()
    assert rewards.records == [{"function": spec, "module_sha256": digest, "weight": 0.5}]
