"""Trainer run configs: one YAML per run, unknown keys and bad values rejected with the field."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from gateway.config_files import SettingsFileError, apply_overrides
from trainer.config import (
    ConfigError,
    DpoRunConfig,
    RewardRunConfig,
    RlRunConfig,
    SftRunConfig,
    load_config,
    parse_config,
)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "colors"
SFT_YAML = EXAMPLES / "sft.yaml"


def _raw(name: str = "sft.yaml") -> dict:
    return yaml.safe_load((EXAMPLES / name).read_text())


def _error(method: str, data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        parse_config(method, data)
    return str(info.value)


@pytest.mark.parametrize(
    ("name", "method", "cls"),
    [
        ("sft.yaml", "sft", SftRunConfig),
        ("qlora.yaml", "sft", SftRunConfig),
        ("dpo.yaml", "dpo", DpoRunConfig),
        ("reward.yaml", "reward", RewardRunConfig),
    ],
)
def test_every_example_loads_with_paths_relative_to_its_folder(name, method, cls):
    config = load_config(method, EXAMPLES / name)
    assert type(config) is cls
    assert config.method == method
    root = EXAMPLES.parents[1]
    assert config.model.path == root / ".cache" / "tiny" / "base"
    assert config.output_dir.parent == root / ".cache" / "runs"
    for item in config.data.train:
        assert item.path.is_absolute()
        assert item.path.parent == EXAMPLES
        assert item.path.is_file()
    assert config.data.eval_file is not None
    assert config.data.eval_file.parent == EXAMPLES
    assert config.data.eval_file.is_file()


def test_example_details():
    sft = load_config("sft", SFT_YAML)
    assert [(f.path.name, f.weight) for f in sft.data.train] == [
        ("colors_train.jsonl", 2.0),
        ("sounds_train.jsonl", 1.0),
    ]
    assert sft.quantization is None
    assert sft.lora.target_modules == "all-linear"
    assert sft.training.learning_rate == pytest.approx(3e-3)
    qlora = load_config("sft", EXAMPLES / "qlora.yaml")
    assert qlora.quantization is not None
    assert qlora.quantization.load_in_4bit is True
    assert qlora.quantization.bnb_4bit_quant_type == "nf4"
    assert qlora.quantization.bnb_4bit_compute_dtype == "float32"
    dpo = load_config("dpo", EXAMPLES / "dpo.yaml")
    assert isinstance(dpo, DpoRunConfig)
    assert dpo.dpo.beta == pytest.approx(0.1)
    assert dpo.lora.init_from is None


def test_absolute_paths_stay_as_they_are(tmp_path):
    data = _raw()
    data["model"]["path"] = str(tmp_path / "base")
    data["lora"]["init_from"] = "adapters/first"
    config_file = tmp_path / "sub" / "run.yaml"
    config_file.parent.mkdir()
    config_file.write_text(yaml.safe_dump(data))
    config = load_config("sft", config_file)
    assert config.model.path == tmp_path / "base"
    assert config.lora.init_from == tmp_path / "sub" / "adapters" / "first"
    assert config.data.train[0].path == tmp_path / "sub" / "colors_train.jsonl"


def test_parse_without_base_dir_keeps_relative_paths():
    config = parse_config("sft", _raw())
    assert config.data.train[0].path == Path("colors_train.jsonl")
    assert config.model.path == Path("../../.cache/tiny/base")


def test_unknown_top_level_key_suggests_the_right_one():
    data = _raw()
    data["trainig"] = {"seed": 1}
    message = _error("sft", data)
    assert message.startswith("invalid sft config:\n")
    assert "trainig: unknown key; did you mean 'training'?" in message
    assert "(known here: output_dir, model, lora, quantization, data, training, sft)" in message


def test_unknown_nested_key_suggests_the_right_one():
    data = _raw()
    data["training"]["learning_rat"] = 1e-4
    message = _error("sft", data)
    assert "training.learning_rat: unknown key; did you mean 'learning_rate'?" in message


def test_unknown_key_inside_a_list_item_and_an_optional_section():
    data = _raw()
    data["data"]["train"][1]["wieght"] = 2.0
    data["quantization"] = {"bnb_4bit_quant_typ": "fp4"}
    message = _error("sft", data)
    assert (
        "data.train.1.wieght: unknown key; did you mean 'weight'? (known here: path, weight)"
        in message
    )
    assert (
        "quantization.bnb_4bit_quant_typ: unknown key; did you mean 'bnb_4bit_quant_type'?"
        in message
    )


def test_unknown_key_without_a_close_match_lists_the_known_ones():
    data = _raw()
    data["lora"]["zzz"] = 1
    message = _error("sft", data)
    assert "lora.zzz: unknown key (known here: r, lora_alpha, lora_dropout," in message
    assert "did you mean" not in message


@pytest.mark.parametrize(
    ("method", "section"),
    [("sft", "dpo"), ("sft", "reward"), ("dpo", "sft"), ("reward", "dpo")],
)
def test_another_methods_section_is_an_unknown_key(method, section):
    data = _raw()
    data[section] = {}
    message = _error(method, data)
    assert f"invalid {method} config:" in message
    assert f"\n{section}: unknown key" in message
    assert f"{method})" in message  # the method's own section is listed as known


def test_dpo_keys_in_an_sft_config_are_not_ignored():
    data = _raw()
    data["dpo"] = {"beta": 0.5}
    assert "dpo: unknown key" in _error("sft", data)
    dpo = parse_config("dpo", data)
    assert isinstance(dpo, DpoRunConfig)
    assert dpo.dpo.beta == 0.5


def test_set_overrides_are_parsed_as_yaml():
    data = apply_overrides(
        _raw(),
        [
            "training.learning_rate=1e-4",
            "training.max_steps=7",
            "lora.target_modules=[q_proj,v_proj]",
            "training.gradient_checkpointing=true",
            "data.eval_file=null",
        ],
    )
    assert data["lora"]["target_modules"] == ["q_proj", "v_proj"]
    assert data["training"]["max_steps"] == 7
    assert data["training"]["gradient_checkpointing"] is True
    assert data["data"]["eval_file"] is None
    config = parse_config("sft", data)
    assert isinstance(config.training.learning_rate, float)
    assert config.training.learning_rate == 1e-4
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    assert config.data.eval_file is None


def test_set_overrides_through_load_config():
    config = load_config(
        "sft", SFT_YAML, ["training.learning_rate=1e-4", "lora.target_modules=[q_proj,v_proj]"]
    )
    assert config.training.learning_rate == 1e-4
    assert type(config.training.learning_rate) is float
    assert config.lora.target_modules == ["q_proj", "v_proj"]
    # The other values of the file are kept.
    assert config.training.max_steps == 120


def test_set_creates_missing_sections():
    data = apply_overrides({}, ["quantization.bnb_4bit_quant_type=fp4", "a.b.c=1"])
    assert data == {"quantization": {"bnb_4bit_quant_type": "fp4"}, "a": {"b": {"c": 1}}}
    config = load_config("sft", SFT_YAML, ["quantization.bnb_4bit_quant_type=fp4"])
    assert config.quantization is not None
    assert config.quantization.bnb_4bit_quant_type == "fp4"
    assert config.quantization.load_in_4bit is True


def test_set_with_an_empty_value_is_null():
    assert apply_overrides({"a": 1}, ["a="]) == {"a": None}


def test_set_value_may_contain_equals_signs():
    assert apply_overrides({}, ["model.chat_template=a=b"]) == {"model": {"chat_template": "a=b"}}


@pytest.mark.parametrize("item", ["foo", "=1", " =1", ""])
def test_malformed_set_is_a_config_error(item):
    with pytest.raises(SettingsFileError) as info:
        apply_overrides({}, [item])
    assert str(info.value) == (
        f"--set {item!r}: expected key=value, e.g. training.learning_rate=1e-4"
    )


def test_set_through_a_value_is_a_config_error():
    with pytest.raises(SettingsFileError) as info:
        apply_overrides({"training": 5}, ["training.seed=1"])
    assert str(info.value) == "--set 'training.seed=1': 'training' is not a section"


def test_set_with_an_unknown_key_is_reported_like_a_file_typo():
    with pytest.raises(ConfigError) as info:
        load_config("sft", SFT_YAML, ["training.learning_rat=1e-4"])
    assert "training.learning_rat: unknown key; did you mean 'learning_rate'?" in str(info.value)


def test_out_of_range_values_name_the_field():
    data = _raw()
    data["lora"]["r"] = 0
    data["lora"]["lora_dropout"] = 1.5
    message = _error("sft", data)
    assert message.splitlines() == [
        "invalid sft config:",
        "lora.r: Input should be greater than 0",
        "lora.lora_dropout: Input should be less than 1",
    ]


@pytest.mark.parametrize(
    ("section", "key", "value", "expected"),
    [
        ("training", "learning_rate", "fast", "training.learning_rate: Input should be a valid"),
        ("training", "per_device_train_batch_size", 0, "training.per_device_train_batch_size: "),
        ("lora", "r", 1.5, "lora.r: Input should be a valid integer"),
        ("lora", "bias", "some", "lora.bias: Input should be 'none', 'all' or 'lora_only'"),
        ("model", "dtype", "int8", "model.dtype: Input should be 'float32', 'bfloat16' or"),
        ("data", "over_length", "cut", "data.over_length: Input should be 'truncate' or 'drop'"),
        ("data", "eval_fraction", 1.0, "data.eval_fraction: Input should be less than 1"),
        ("data", "max_length", -1, "data.max_length: Input should be greater than 0"),
    ],
)
def test_wrong_types_name_the_field(section, key, value, expected):
    data = _raw()
    data[section][key] = value
    assert expected in _error("sft", data)


def test_empty_target_modules_is_an_error():
    data = _raw()
    data["lora"]["target_modules"] = []
    assert "lora.target_modules: Value error, target_modules must name at least one module" in (
        _error("sft", data)
    )


def test_weight_must_be_positive_and_train_non_empty():
    data = _raw()
    data["data"]["train"][0]["weight"] = 0
    assert "data.train.0.weight: Input should be greater than 0" in _error("sft", data)
    data = _raw()
    data["data"]["train"] = []
    assert "data.train: List should have at least 1 item" in _error("sft", data)


def test_missing_sections_are_named():
    message = _error("sft", {"output_dir": "out"})
    assert "model: Field required" in message
    assert "data: Field required" in message


def test_eval_file_and_eval_fraction_together_is_an_error():
    data = _raw()
    data["data"]["eval_fraction"] = 0.1
    message = _error("sft", data)
    assert "data: Value error, set eval_file or eval_fraction, not both" in message
    data["data"]["eval_file"] = None
    assert parse_config("sft", data).data.eval_fraction == 0.1


def test_reward_with_init_from_is_an_error():
    data = _raw("reward.yaml")
    data["lora"]["init_from"] = "some/adapter"
    message = _error("reward", data)
    assert "lora.init_from: a reward model starts from a fresh adapter" in message
    # DPO continues an adapter (it is then the reference).
    dpo = _raw("dpo.yaml")
    dpo["lora"]["init_from"] = "some/adapter"
    assert parse_config("dpo", dpo).lora.init_from == Path("some/adapter")


def test_configs_are_frozen():
    config = parse_config("sft", _raw())
    with pytest.raises(ValueError, match="frozen"):
        config.training.seed = 3  # type: ignore[misc]


def test_invalid_yaml_is_a_config_error(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError) as info:
        load_config("sft", path)
    assert str(info.value).startswith(f"{path} is not valid YAML: ")


@pytest.mark.parametrize("text", ["- a\n- b\n", "just text\n", "3\n"])
def test_non_mapping_yaml_is_a_config_error(tmp_path, text):
    path = tmp_path / "list.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config("sft", path)
    assert str(info.value) == f"{path}: the config must be a mapping of settings"


def test_empty_yaml_reports_the_missing_sections(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing\n")
    with pytest.raises(ConfigError) as info:
        load_config("sft", path)
    assert "output_dir: Field required" in str(info.value)


def test_parse_config_refuses_a_non_mapping():
    with pytest.raises(ConfigError) as info:
        parse_config("sft", ["model"])  # type: ignore[arg-type]
    assert str(info.value) == "the config must be a mapping of sections (model:, data:, ...)"


def test_missing_file_is_a_config_error(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError) as info:
        load_config("sft", path)
    assert str(info.value) == f"cannot read config {path}: No such file or directory"


def test_the_rl_example_loads_with_its_reward_model_and_reference_resolved():
    config = load_config("rl", EXAMPLES / "rl.yaml")
    assert type(config) is RlRunConfig and config.method == "rl"
    runs = EXAMPLES.parents[1] / ".cache" / "runs"
    assert config.lora.init_from == runs / "colors-sft" / "adapter"  # the KL reference too
    assert [s.reward_model for s in config.rl.rewards] == [runs / "colors-reward"]
    assert config.rl.algorithm == "grpo" and config.rl.beta > 0


def _rl(**rl) -> dict:
    data = _raw()
    data.pop("sft", None)
    return data | {"rl": {"rewards": [{"function": "m:f"}], **rl}}


@pytest.mark.parametrize(
    ("rl", "message"),
    [
        ({"beta": 0}, "rl.beta: Input should be greater than 0"),
        ({"algorithm": "ppo"}, "rl.algorithm: Input should be 'grpo' or 'rloo'"),
        ({"num_generations": 1}, "rl.num_generations: Input should be greater than or equal to 2"),
        ({"rewards": []}, "rl.rewards: List should have at least 1 item"),
        (
            {"rewards": [{"function": "m:f", "classifier": "c"}]},
            "set exactly one of reward_model, classifier, function",
        ),
        ({"rewards": [{"weight": 1.0}]}, "set exactly one of reward_model, classifier, function"),
        ({"num_generations": 3}, "must be a multiple of rl.num_generations (3)"),
    ],
)
def test_rl_settings_are_checked(rl, message):
    assert message in _error("rl", _rl(**rl))


def test_rl_needs_its_section():
    data = _raw()
    data.pop("sft", None)
    assert "rl: Field required" in _error("rl", data)


# ---------------------------------------------------------------- early stopping / best checkpoint

BEST = {"eval_steps": 10, "save_steps": 10, "early_stopping_patience": 2}


def _with_training(**training) -> dict:
    data = _raw()
    data["training"] = {**data["training"], **training}
    return data


def test_early_stopping_defaults_to_eval_loss():
    config = parse_config("sft", _with_training(**BEST))
    assert config.training.tracks_best and config.training.best_metric_name == "eval_loss"
    named = parse_config("sft", _with_training(**BEST, best_metric="accuracy"))
    assert named.training.best_metric_name == "eval_accuracy"
    assert (
        parse_config(
            "sft", _with_training(**BEST, best_metric="eval_acc")
        ).training.best_metric_name
        == "eval_acc"
    )
    assert not parse_config("sft", _raw()).training.tracks_best


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"early_stopping_patience": 2, "save_steps": 10}, "need eval_steps"),
        ({"load_best_at_end": True, "save_steps": 10}, "need eval_steps"),
        ({**BEST, "save_steps": 20}, "save_steps (20) equal to eval_steps (10)"),
        ({"best_metric": "eval_loss"}, "best_metric: only used with early_stopping_patience"),
        ({"greater_is_better": True}, "greater_is_better: only used with"),
        ({"early_stopping_threshold": 0.1}, "early_stopping_threshold: only used with"),
        ({**BEST, "early_stopping_patience": 0}, "early_stopping_patience"),
    ],
)
def test_best_checkpoint_settings_are_checked(training, message):
    assert message in _error("sft", _with_training(**training))


def test_best_checkpoint_needs_evaluation_data():
    data = _with_training(load_best_at_end=True, eval_steps=10, save_steps=10)
    del data["data"]["eval_file"]
    assert "need evaluation data: set data.eval_file or data.eval_fraction" in _error("sft", data)
    data["data"]["eval_fraction"] = 0.1
    assert parse_config("sft", data).training.load_best_at_end


# ---------------------------------------------------------------- contamination


def test_contamination_paths_are_relative_to_the_config():
    config = load_config(
        "sft", SFT_YAML, ['data.contamination={"against": ["prompts.jsonl", "tasks"]}']
    )
    check = config.data.contamination
    assert check is not None and check.against == [EXAMPLES / "prompts.jsonl", EXAMPLES / "tasks"]
    assert (check.ngram, check.threshold, check.fatal) == (8, 0.5, False)
    assert load_config("sft", SFT_YAML).data.contamination is None


@pytest.mark.parametrize(
    ("check", "message"),
    [
        ({"against": []}, "against"),
        ({"against": ["p.jsonl"], "threshold": 0}, "threshold"),
        ({"against": ["p.jsonl"], "threshold": 1.5}, "threshold"),
        ({"against": ["p.jsonl"], "ngram": 0}, "ngram"),
        ({"against": ["p.jsonl"], "fatl": True}, "fatl"),
    ],
)
def test_bad_contamination_settings(check, message):
    data = _raw()
    data["data"]["contamination"] = check
    assert message in _error("sft", data)
