"""Tensor parallelism on vLLM's CPU backend: two workers serve what one does, counted once."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from gateway.engine_fixes import FIX_NAMES
from tests.support.gateway import RunningGateway, launch_gateway

pytestmark = pytest.mark.integration

PROMPTS = ["The weather today is", "Once upon a time the river"]
# float32 both ways; the ranks' partial sums are added in another order than one worker's
# matmul. Measured max difference 1e-6 (2 prompts, base + 5 adapters); the adapters themselves
# move these logprobs by 0.45 to 1.8 from the base's, so a wrong adapter on a rank cannot pass.
TOLERANCE = 1e-3


@pytest.fixture(scope="module")
def parallel(tiny_model, tmp_path_factory) -> Iterator[RunningGateway]:
    """A directory-mode gateway with tensor_parallel_size 2 (one core per worker)."""
    log = tmp_path_factory.mktemp("parallel") / "gateway.log"
    running = launch_gateway(
        tiny_model, log, "--dtype", "float32", "--tensor-parallel-size", "2",
        "--distributed-executor-backend", "mp", "--cpu-threads-bind", "0|1",
    )  # fmt: skip
    yield running
    assert running.stop() == 0, log.read_text()[-4000:]


def _prompt_logprobs(gateway: RunningGateway, adapter: str) -> list[list[float]]:
    with gateway.client() as client:
        replies = [
            client.generate(p, adapter, max_tokens=1, temperature=0.0, prompt_logprobs=0)
            for p in PROMPTS
        ]
    return [[t.logprob for t in r.prompt_logprobs[1:]] for r in replies]


def _max_difference(a: list[list[float]], b: list[list[float]]) -> float:
    rows = zip(a, b, strict=True)
    return max(abs(x - y) for row_a, row_b in rows for x, y in zip(row_a, row_b, strict=True))


def test_two_workers_serve_every_adapter_as_one_does(parallel, gateway, tiny_model):
    """Base and every adapter (one with an lm_head LoRA), prompt logprobs vs the 1-worker engine."""
    base = _prompt_logprobs(gateway, "")
    assert _max_difference(_prompt_logprobs(parallel, ""), base) < TOLERANCE
    for name in sorted(tiny_model.adapters):
        single = _prompt_logprobs(gateway, name)
        assert _max_difference(single, base) > 50 * TOLERANCE, name  # the check can fail
        assert _max_difference(_prompt_logprobs(parallel, name), single) < TOLERANCE, name


def test_both_workers_apply_the_cpu_fixes(parallel):
    with parallel.client() as client:
        info = client.model_info()
    assert list(info.engine_fixes) == list(FIX_NAMES)  # every fix, on both ranks
    assert info.prompt_logprobs_unsupported == "" and info.vocab_lora_unsupported == ""


def _loads(gateway: RunningGateway) -> dict[str, float]:
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"
    text = urllib.request.urlopen(url, timeout=10).read().decode()
    family = next(
        f for f in text_string_to_metric_families(text) if f.name == "loraplex_adapter_loads"
    )
    return {
        s.labels["adapter"]: s.value
        for s in family.samples
        if s.name.endswith("_total") and s.labels["result"] == "ok"
    }


def test_adapter_loads_are_counted_once_not_per_rank(parallel, tiny_model):
    _prompt_logprobs(parallel, "alpha")  # loaded by the test above, or now
    deadline = time.monotonic() + 30  # the metrics poll the engine every 5 s
    while (loads := _loads(parallel)).get("alpha", 0) == 0 and time.monotonic() < deadline:
        time.sleep(1)
    assert loads["alpha"] == 1, loads
    assert set(loads) <= set(tiny_model.adapters) and all(n == 1 for n in loads.values()), loads
