"""Gateway config: file < env < flags, unknown keys rejected with a suggestion."""

from __future__ import annotations

from pathlib import Path

import pytest

from gateway.config import ConfigError, GatewayConfig, load_config, reference_table


def test_precedence_file_env_flags(tmp_path, monkeypatch):
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text("model: /models/base\nport: 1000\nmax_loras: 2\n")
    monkeypatch.setenv("LORAPLEX_PORT", "2000")
    monkeypatch.setenv("LORAPLEX_MAX_LORAS", "3")
    config = load_config(config_file, max_loras=5)
    assert (config.model, config.port, config.max_loras) == ("/models/base", 2000, 5)


def test_every_type_can_come_from_the_environment(monkeypatch):
    monkeypatch.setenv("LORAPLEX_MAX_LORA_RANK", "32")
    monkeypatch.setenv("LORAPLEX_ENFORCE_EAGER", "true")
    monkeypatch.setenv("LORAPLEX_KV_CACHE_SPACE_GIB", "3")
    monkeypatch.setenv("LORAPLEX_DTYPE", "bfloat16")
    config = load_config(model="m")
    assert (config.max_lora_rank, config.enforce_eager) == (32, True)
    assert (config.kv_cache_space_gib, config.dtype) == (3, "bfloat16")


def test_kv_cache_space_is_whole_gib_as_vllm_reads_it():
    """vLLM parses VLLM_CPU_KVCACHE_SPACE with int(): 1.5 would stop the engine at start-up."""
    with pytest.raises(ConfigError, match="kv_cache_space_gib"):
        load_config(model="m", kv_cache_space_gib=1.5)
    assert load_config(model="m", kv_cache_space_gib=2.0).kv_cache_space_gib == 2


def test_parallel_settings_reach_vllms_engine_arguments():
    from gateway.engine import _engine_args

    config = load_config(
        model="m",
        tensor_parallel_size=4,
        pipeline_parallel_size=2,
        distributed_executor_backend="mp",
        gpu_memory_utilization=0.8,
        gpu_kv_cache_gib=1.5,
    )
    args = _engine_args(config, enable_lora=True)
    assert args.kv_cache_memory_bytes == 3 << 29
    assert (args.tensor_parallel_size, args.pipeline_parallel_size) == (4, 2)
    assert args.distributed_executor_backend == "mp" and args.gpu_memory_utilization == 0.8
    with pytest.raises(ConfigError, match="tensor_parallel_size"):
        load_config(model="m", tensor_parallel_size=0)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"tensor_parallel_size": 2, "distributed_executor_backend": "uni"}, "uni runs one"),
        ({"pipeline_parallel_size": 2, "distributed_executor_backend": "uni"}, "uni runs one"),
        ({"distributed_executor_backend": "ray"}, "needs Ray"),  # not in the lock
    ],
)
def test_parallel_settings_vllm_cannot_start_are_refused_up_front(settings, message):
    from gateway.engine import check_parallelism

    with pytest.raises(ConfigError, match=message):
        check_parallelism(load_config(model="m", **settings))
    check_parallelism(load_config(model="m", tensor_parallel_size=2))  # mp, vLLM's default


def test_the_gpu_kv_cache_setting_is_refused_on_cpu():
    from gateway.engine import engine_environment

    with pytest.raises(ConfigError, match="kv_cache_space_gib"):
        engine_environment(load_config(model="m", gpu_kv_cache_gib=2))
    assert engine_environment(load_config(model="m"))["VLLM_CPU_KVCACHE_SPACE"] == "1"


def test_unknown_key_suggests_the_right_one(tmp_path):
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text("model: m\nmax_lora: 4\n")
    with pytest.raises(ConfigError, match="did you mean 'max_loras'"):
        load_config(config_file)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"max_loras": 4, "max_cpu_loras": 2}, "max_cpu_loras"),
        ({"max_lora_rank": 12}, "max_lora_rank"),
        ({"port": 70000}, "port"),
        ({"dtype": "float64"}, "dtype"),
        ({"adapters_dir": "/no/such/dir"}, "adapters_dir"),
    ],
)
def test_invalid_values_name_the_field(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(model="m", **overrides)


def test_missing_model_is_an_error():
    with pytest.raises(ConfigError, match="model"):
        load_config()


def test_every_field_is_documented():
    undocumented = [n for n, f in GatewayConfig.model_fields.items() if not f.description]
    assert undocumented == []


def test_the_configuration_reference_is_generated_from_the_fields():
    doc = (Path(__file__).parents[2] / "docs" / "configuration.md").read_text()
    assert reference_table() in doc, "run `make docs` to regenerate docs/configuration.md"
    assert all(f"| `{name}` |" in doc for name in GatewayConfig.model_fields)


def test_every_field_has_a_serve_flag_with_its_doc():
    import typer

    from gateway.cli import app

    serve = typer.main.get_command(app).get_command(None, "serve")
    options = {p.name: p for p in serve.params}
    for name, field in GatewayConfig.model_fields.items():
        assert options[name].help == " ".join((field.description or "").split())
    assert options[name].opts == ["--" + name.replace("_", "-")]


def test_set_overrides_beat_the_file_and_the_environment_but_not_flags(tmp_path, monkeypatch):
    config_file = tmp_path / "gateway.yaml"
    config_file.write_text("model: m\nport: 1000\nmax_loras: 2\n")
    monkeypatch.setenv("LORAPLEX_PORT", "2000")
    config = load_config(config_file, ["port=3000", "max_loras=6"], max_loras=7)
    assert (config.port, config.max_loras) == (3000, 7)
    with pytest.raises(ConfigError, match="expected key=value"):
        load_config(config_file, ["port"])
