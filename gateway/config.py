"""Gateway configuration: one typed, documented field each; loaded from YAML < env < flags.

Environment variables are ``LORAPLEX_<FIELD>`` (e.g. ``LORAPLEX_PORT=50052``).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from gateway.capture import CaptureSettings
from gateway.config_files import SettingsFileError, apply_overrides, read_mapping, validate

ENV_PREFIX = "LORAPLEX_"

Dtype = Literal["auto", "float32", "bfloat16", "float16"]
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the ranks vLLM accepts


class ConfigError(ValueError):
    """The configuration is invalid; the message says which field and why."""


class GatewayConfig(BaseModel):
    """Everything `loraplex serve` needs to start the engine and the gRPC server."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, frozen=True)

    model: str
    """Base model: a local model folder (or a hub id on hosts that may download)."""
    adapters_dir: Path | None = None
    """Directory mode: serve every sub-folder with an adapter_config.json under its name (no
    registry). Unset: registry mode (AdapterService, versions and aliases)."""
    data_dir: Path = Field(default_factory=lambda: Path.home() / ".loraplex")
    """Registry mode: where the SQLite registry and the artifact store live."""
    registry_url: str | None = None
    """Registry mode: SQLAlchemy URL of the registry database; default SQLite in data_dir. A
    `postgresql+psycopg://...` URL lets several replicas share one registry (and data_dir)."""
    registry_poll_interval_s: float = Field(default=0.5, gt=0, le=60)
    """Registry mode: how often to look for changes made by other replicas."""
    max_adapter_bytes: int = Field(default=1 << 30, ge=1024)
    """Largest adapter (its files, or an uploaded archive) accepted at registration."""
    max_concurrent_uploads: int = Field(default=2, ge=1)
    """Registry mode: uploads received at once; each may hold up to twice max_adapter_bytes
    of disk while it runs. Past it, a new upload gets RESOURCE_EXHAUSTED before it sends."""
    base_model_names: list[str] = Field(default_factory=list)
    """Other names of the served base that adapters may declare as base_model_name_or_path
    (e.g. its hub id when the model is served from a local folder)."""
    quantization: str | None = None
    """vLLM quantization method of the base; unset: what the checkpoint declares (a
    compressed-tensors copy from `loraplex quantize`, AWQ, GPTQ, ...). Online `fp8*` is refused
    on CPUs without AMX, where vLLM only emulates it (80x slower than bfloat16)."""
    dtype: Dtype = "auto"
    """Activation and unquantized weight dtype of the served base."""
    max_loras: int = Field(default=4, ge=1)
    """Adapters the engine can hold at once in batch slots (different adapters per batch)."""
    max_cpu_loras: int | None = Field(default=None, ge=1)
    """Adapters cached in CPU memory beyond the batch slots (>= max_loras; default max_loras)."""
    max_lora_rank: int = 16
    """Largest LoRA rank the engine accepts (one of 1, 8, 16, 32, ..., 512); adapters above it
    are refused."""
    max_model_len: int | None = Field(default=None, ge=16)
    """Context length (prompt + generated tokens); default: the model's own."""
    max_num_seqs: int | None = Field(default=None, ge=1)
    """Most sequences in one engine batch; default: vLLM's."""
    max_logprobs: int = Field(default=20, ge=0)
    """Most alternatives a request may ask for per token (logprobs / prompt_logprobs)."""
    kv_cache_space_gib: int = Field(default=1, ge=1)
    """CPU engine only: KV cache size in whole GiB (VLLM_CPU_KVCACHE_SPACE, an integer to vLLM)."""
    cpu_reserved_cores: int | None = Field(default=None, ge=0)
    """CPU engine only: cores kept free of the model's compute threads, for the gRPC server and
    vLLM's scheduler (VLLM_CPU_NUM_OF_RESERVED_CPU); default: vLLM's (1). 0 computes on every
    core: faster prefill-heavy work (evaluations) on small machines, slower request handling."""
    cpu_threads_bind: str | None = None
    """CPU engine only: the cores each worker's compute threads run on, `|` between workers
    (VLLM_CPU_OMP_THREADS_BIND), e.g. `0-15|16-31` for tensor_parallel_size 2; default:
    vLLM's, one NUMA node per worker (so tensor parallelism on one node needs this)."""
    engine_spin_wait: bool | None = None
    """Let vLLM's engine processes spin (a busy loop) while waiting for each other between
    steps, instead of blocking. Default: off on CPU, where the spinning takes the cores the
    gateway and its streams need; vLLM's behaviour (on) on GPU, where cores are to spare."""
    gpu_memory_utilization: float = Field(default=0.9, gt=0, le=1)
    """GPU engine only: fraction of each GPU's memory vLLM may use for weights, activations and
    the KV cache (the KV cache gets what the other two leave)."""
    gpu_kv_cache_gib: float | None = Field(default=None, gt=0)
    """GPU engine only: KV cache size per GPU in GiB (vLLM's kv_cache_memory_bytes), instead of
    what gpu_memory_utilization leaves; default: what it leaves."""
    tensor_parallel_size: int = Field(default=1, ge=1)
    """GPUs each layer is split across (a base too large for one GPU); one worker per GPU."""
    pipeline_parallel_size: int = Field(default=1, ge=1)
    """Stages the layers are split into, one set of GPUs each (across nodes with `ray`)."""
    distributed_executor_backend: Literal["mp", "uni", "ray"] | None = None
    """Where the model runs: `uni` in the engine-core process, `mp` in worker processes on this
    host, `ray` in a Ray cluster (several nodes); default: vLLM's choice (`uni` for one GPU or
    CPU worker, `mp` for several on one host)."""
    enforce_eager: bool = False
    """Skip graph capture/compilation: faster start, slower steps."""
    seed: int = 0
    """Engine seed for sampling requests that do not set their own."""
    host: str = "127.0.0.1"
    """Address the gRPC server listens on."""
    port: int = Field(default=50051, ge=0, le=65535)
    """gRPC port (0 picks a free one and logs it)."""
    grace_period_s: float = Field(default=20.0, ge=0)
    """On SIGTERM: seconds in-flight requests get to finish before they are cancelled."""
    metrics_port: int | None = Field(default=9400, ge=0, le=65535)
    """Port of the Prometheus /metrics endpoint (on `host`; 0 picks a free one and logs it);
    null disables metrics, including vLLM's own statistics."""
    metrics_max_adapters: int = Field(default=100, ge=1)
    """Most adapter names that get their own metric series; the rest are counted as `other`."""
    metrics_poll_interval_s: float = Field(default=5.0, gt=0, le=300)
    """How often adapter cache and residency figures are collected from the engine."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    """Log level of the gateway."""

    # -- access
    require_api_keys: bool = False
    """Every call but health and reflection needs an API key (`loraplex keys create`), sent
    as `authorization: Bearer <key>` metadata. Keys live in the registry database."""
    insecure_admin: bool = False
    """Serve the admin API (AdapterService, KeyService) without API keys on a non-loopback
    address. Without it such a gateway starts with the admin API off (and says so)."""
    tls_cert_file: Path | None = None
    """Server certificate chain (PEM); with tls_key_file, the gateway speaks TLS only."""
    tls_key_file: Path | None = None
    """Private key of tls_cert_file (PEM)."""
    tls_client_ca_file: Path | None = None
    """Mutual TLS: clients must present a certificate signed by this CA (PEM)."""

    # -- traffic capture
    capture_dir: Path | None = None
    """Traffic capture: folder of rotating JSONL files (capture-*.jsonl) with a sample of served
    requests and responses (docs/monitoring.md); unset: off. One folder per replica."""
    capture_sample_rate: float = Field(default=1.0, ge=0, le=1)
    """Traffic capture: fraction of requests captured, for references without their own rate."""
    capture_rates: dict[str, float] = Field(default_factory=dict)
    """Traffic capture: rate per reference as clients send it (`acme@candidate`), else per
    adapter name (`acme`; `base` for no adapter), over capture_sample_rate."""
    capture_redact: list[str] = Field(default_factory=list)
    """Traffic capture: regular expressions whose matches in prompts and responses are written
    as [REDACTED] (e.g. e-mail addresses, card numbers)."""
    capture_hook: str | None = None
    """Traffic capture: `module:function` given each record (a dict) before it is written; it
    returns the record to write (changed or not) or None to drop it."""
    capture_max_file_bytes: int = Field(default=64 << 20, ge=4096)
    """Traffic capture: a file is rotated before it grows past this."""
    capture_max_total_bytes: int = Field(default=1 << 30, ge=8192)
    """Traffic capture: the folder's bound; the oldest files are deleted to stay within it."""

    # -- limits and admission
    max_prompt_tokens: int | None = Field(default=None, ge=1)
    """Longest prompt accepted, in tokens; default: the context length less one."""
    max_new_tokens: int | None = Field(default=None, ge=1)
    """Largest max_tokens a request may ask for (also the default when it asks for none);
    default: what fits in the context."""
    max_stop_strings: int = Field(default=16, ge=0, le=1024)
    """Most stop strings per request."""
    max_stop_string_chars: int = Field(default=256, ge=1, le=65536)
    """Longest stop string, in characters."""
    max_request_bytes: int = Field(default=4 << 20, ge=64 << 10, le=1 << 30)
    """Largest request message (gRPC receive limit); uploads come in chunks below it."""
    max_pending_requests: int = Field(default=512, ge=1)
    """Generation requests running or waiting at once; past it, new ones get
    RESOURCE_EXHAUSTED at once instead of a queue that grows without bound."""
    requests_per_minute: int | None = Field(default=None, ge=1)
    """Default rate limit per API key (a key's own limit wins); null: none."""
    tokens_per_minute: int | None = Field(default=None, ge=1)
    """Default token budget per API key per minute (prompt + max_tokens charged up front,
    unused tokens refunded); null: none."""

    @property
    def registry_database(self) -> str:
        """The registry's SQLAlchemy URL."""
        return self.registry_url or f"sqlite:///{self.data_dir / 'registry.db'}"

    @property
    def is_loopback(self) -> bool:
        """Whether the gateway listens on a loopback address only."""
        return self.host in ("localhost", "::1") or self.host.startswith("127.")

    @property
    def tls(self) -> bool:
        return self.tls_cert_file is not None

    @property
    def capture(self) -> CaptureSettings | None:
        """The traffic capture's settings; None when capture is off."""
        if self.capture_dir is None:
            return None
        return CaptureSettings(
            self.capture_dir,
            self.capture_sample_rate,
            dict(self.capture_rates),
            tuple(self.capture_redact),
            self.capture_hook,
            self.capture_max_file_bytes,
            self.capture_max_total_bytes,
        )

    @model_validator(mode="after")
    def _check_cross_fields(self) -> GatewayConfig:
        if self.max_lora_rank not in MAX_LORA_RANKS:
            raise ValueError(f"max_lora_rank must be one of {MAX_LORA_RANKS}")
        if self.max_cpu_loras is not None and self.max_cpu_loras < self.max_loras:
            raise ValueError(
                f"max_cpu_loras ({self.max_cpu_loras}) must be >= max_loras ({self.max_loras})"
            )
        if (self.tls_cert_file is None) != (self.tls_key_file is None):
            raise ValueError("tls_cert_file and tls_key_file go together")
        if self.tls_client_ca_file is not None and self.tls_cert_file is None:
            raise ValueError("tls_client_ca_file (mutual TLS) needs tls_cert_file/tls_key_file")
        for name in ("tls_cert_file", "tls_key_file", "tls_client_ca_file"):
            path = getattr(self, name)
            if path is not None and not path.is_file():
                raise ValueError(f"{name} {path} is not a file")
        if self.capture_max_total_bytes < 2 * self.capture_max_file_bytes:
            raise ValueError("capture_max_total_bytes must be at least 2 x capture_max_file_bytes")
        bad_rates = {k: v for k, v in self.capture_rates.items() if not 0 <= v <= 1}
        if bad_rates:
            raise ValueError(f"capture_rates must be within [0, 1]: {bad_rates}")
        for pattern in self.capture_redact:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(
                    f"capture_redact {pattern!r}: not a regular expression: {exc}"
                ) from None
        if self.adapters_dir is not None and not self.adapters_dir.is_dir():
            raise ValueError(f"adapters_dir {self.adapters_dir} is not a directory")
        return self


def _env_values() -> dict[str, str]:
    """Fields set through LORAPLEX_<FIELD> environment variables."""
    values = {}
    for name in GatewayConfig.model_fields:
        raw = os.environ.get(ENV_PREFIX + name.upper())
        if raw is not None:
            values[name] = raw
    return values


def load_config(
    config_file: Path | None = None, overrides: list[str] | None = None, **flags: Any
) -> GatewayConfig:
    """Merge the YAML file, the environment, `--set` overrides and flags, later ones winning;
    unset flags (None) are left out."""
    try:
        values = read_mapping(config_file, "config file") if config_file is not None else {}
        values |= _env_values()
        apply_overrides(values, overrides or [])
        values |= {k: v for k, v in flags.items() if v is not None}
        return validate(GatewayConfig, values, "gateway configuration")
    except SettingsFileError as exc:
        raise ConfigError(str(exc)) from None


REFERENCE_BEGIN = (
    "<!-- generated from GatewayConfig: python -m gateway.config docs/configuration.md -->"
)
REFERENCE_END = "<!-- end of the generated reference -->"


def _default_cell(name: str) -> str:
    field = GatewayConfig.model_fields[name]
    if field.is_required():
        return "(required)"
    value = field.get_default(call_default_factory=True)
    if isinstance(value, Path) and value.is_relative_to(Path.home()):
        value = "~/" + str(value.relative_to(Path.home()))
    return "`null`" if value is None else f"`{value}`"


def reference_table() -> str:
    """The configuration reference (docs/configuration.md): one row per field, from its doc."""
    rows = ["| field | default | meaning |", "|---|---|---|"]
    for name, field in GatewayConfig.model_fields.items():
        meaning = " ".join((field.description or "").split()).replace("|", "\\|")
        rows.append(f"| `{name}` | {_default_cell(name)} | {meaning} |")
    return "\n".join([REFERENCE_BEGIN, *rows, REFERENCE_END])


if __name__ == "__main__":  # rewrite the generated reference in the given markdown file
    import re
    import sys

    doc = Path(sys.argv[1])
    block = re.compile(re.escape(REFERENCE_BEGIN) + ".*?" + re.escape(REFERENCE_END), re.DOTALL)
    doc.write_text(block.sub(lambda _: reference_table(), doc.read_text()))
