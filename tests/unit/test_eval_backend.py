"""The lm-eval backend against a real grpc.aio gateway servicer with a scoring fake engine.

The fake gives every prompt token a logprob that depends only on the token (-id/1000), so the
exact expected score of any text is known: this checks which tokens the backend scores (context
split, rolling windows over a 64-token context, truncation), not the model.
"""

from __future__ import annotations

import asyncio
import dataclasses
import threading
from collections.abc import Iterator

import grpc
import pytest
from lm_eval.api.instance import Instance

from evalsuite.errors import EvalError, EvalInputError
from evalsuite.lm_eval_backend import LoraplexLM
from gateway.domain import GenerationChunk, TokenLogprob, TopLogprob
from gateway.generation import GenerationServicer
from gateway.pipeline import GenerationPipeline
from gateway.resolver import DirectoryResolver
from loraplex.v1 import generation_pb2_grpc as pb_grpc
from tests.support.fakes import FAKE_BASE, INFO, FakeEngine


def score(token: int) -> float:
    return -token / 1000


class ScoringEngine(FakeEngine):
    """Adds prompt logprobs: -id/1000 per token, rank 1 for even ids and 2 for odd ones; and
    scored next tokens (logprob_token_ids): -id/1000 each, after the generated token."""

    def __init__(self) -> None:
        super().__init__()
        self.drop_last_logprob = False

    async def generate(self, request, stream):
        async for chunk in super().generate(request, stream):
            if request.prompt_logprobs is not None and chunk.finish_reason is not None:
                ids = request.prompt_token_ids
                chunk = GenerationChunk(
                    **{**chunk.__dict__, "prompt_logprobs": self._logprobs(ids)}
                )
            if request.logprob_token_ids:
                top = tuple(TopLogprob(t, "", score(t), 0) for t in request.logprob_token_ids)
                steps = [TokenLogprob(t, "", score(t), 1, top) for t in chunk.token_ids]
                chunk = GenerationChunk(**{**chunk.__dict__, "logprobs": steps})
            yield chunk

    def _logprobs(self, ids: list[int]) -> list[TokenLogprob]:
        out = [TokenLogprob(ids[0], "", None, 0)]
        out += [TokenLogprob(t, "", score(t), 1 if t % 2 == 0 else 2) for t in ids[1:]]
        return out[:-1] if self.drop_last_logprob else out


@pytest.fixture
def gateway(tmp_path) -> Iterator[tuple[str, ScoringEngine]]:
    """A gateway servicer over the scoring engine, on its own event loop in a thread (the
    backend runs its own asyncio loops, as lm-eval calls it synchronously)."""
    engine = ScoringEngine()
    pipeline = GenerationPipeline(engine, DirectoryResolver(tmp_path, 16, FAKE_BASE))
    loop = asyncio.new_event_loop()
    started = threading.Event()
    holder: dict = {}

    async def serve() -> None:
        server = grpc.aio.server()
        pb_grpc.add_GenerationServiceServicer_to_server(
            GenerationServicer(lambda: pipeline), server
        )
        holder["port"] = server.add_insecure_port("127.0.0.1:0")
        holder["done"] = asyncio.Event()
        await server.start()
        started.set()
        await holder["done"].wait()
        await server.stop(0)

    thread = threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True)
    thread.start()
    assert started.wait(10)
    yield f"127.0.0.1:{holder['port']}", engine
    loop.call_soon_threadsafe(holder["done"].set)
    thread.join(10)
    loop.close()


def _requests(kind: str, args: list[tuple]) -> list[Instance]:
    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_loglikelihood_scores_exactly_the_continuation_tokens(gateway):
    target, engine = gateway
    lm = LoraplexLM(target=target)
    assert (lm.prefix_token_id, lm.eot_token_id, lm.max_length) == (1, 2, INFO.max_context_length)
    [(logprob, greedy), (empty_logprob, _)] = lm.loglikelihood(
        _requests("loglikelihood", [("Q: x?", " ab"), ("", "cd")]), disable_tqdm=True
    )
    continuation = [ord(c) % INFO.vocab_size for c in " ab"]  # moved space stays with it
    assert logprob == pytest.approx(sum(map(score, continuation)))
    assert greedy is all(t % 2 == 0 for t in continuation)
    # An empty context is conditioned on BOS: both tokens of "cd" are scored.
    assert empty_logprob == pytest.approx(score(ord("c") % 100) + score(ord("d") % 100))
    assert engine.seen[-1].prompt_token_ids[0] == 1 and engine.seen[-1].max_tokens == 1


@pytest.mark.parametrize("group_choices", [True, False])
def test_one_token_choices_of_a_context_share_one_request(gateway, group_choices):
    target, engine = gateway
    lm = LoraplexLM(target=target, group_choices=group_choices)
    choices = ["a", "b", "c", "d"]  # one token each; "d" is token 0, the one generated
    pairs = [("Q: x?", c) for c in choices] + [("Q: x?", " ab"), ("Q: y?", "a")]
    before = len(engine.seen)
    results = lm.loglikelihood(_requests("loglikelihood", pairs), disable_tqdm=True)
    sent = engine.seen[before:]
    for (_, continuation), (logprob, _) in zip(pairs, results, strict=True):
        tokens = [ord(c) % INFO.vocab_size for c in continuation]
        assert logprob == pytest.approx(sum(map(score, tokens)))
    if not group_choices:  # one prompt-logprob request per pair
        assert len(sent) == len(pairs) and all(r.prompt_logprobs == 0 for r in sent)
        return
    # one request per context for the one-token choices (+1 for the two-token continuation)
    assert len(sent) == 3
    grouped = {r.prompt_token_ids: r for r in sent if r.logprob_token_ids}
    x_context = tuple(lm.tok_encode("Q: x?"))
    assert grouped[x_context].logprob_token_ids == (0, 97, 98, 99)
    assert grouped[x_context].prompt_logprobs is None and grouped[x_context].max_tokens == 1
    assert [greedy for _, greedy in results[:4]] == [False, False, False, True]


def test_rolling_windows_score_every_token_once_over_a_short_context(gateway):
    target, _ = gateway
    lm = LoraplexLM(target=target)
    text = "the quick brown fox jumps over the lazy dog " * 5  # 226 tokens, 64-token context
    tokens = [1, *(ord(c) % INFO.vocab_size for c in text)]
    [total] = lm.loglikelihood_rolling(_requests("loglikelihood_rolling", [(text,)]), True)
    assert total == pytest.approx(sum(map(score, tokens)))


def test_a_gateway_refusing_prompt_logprobs_stops_only_what_needs_them(gateway):
    """Multi-token continuations and perplexity need prompt logprobs; one-token choices do not."""
    target, engine = gateway
    engine.info = dataclasses.replace(engine.info, prompt_logprobs_refusal="not on this engine")
    lm = LoraplexLM(target=target)
    before = len(engine.seen)
    for kind, args in (("loglikelihood", ("Q: x?", " ab")), ("loglikelihood_rolling", ("ab",))):
        with pytest.raises(EvalInputError, match="refuses: not on this engine"):
            getattr(lm, kind)(_requests(kind, [args]), disable_tqdm=True)
    assert len(engine.seen) == before  # stopped before sending anything
    [(logprob, _)] = lm.loglikelihood(_requests("loglikelihood", [("Q: x?", "a")]), True)
    assert logprob == pytest.approx(score(ord("a") % INFO.vocab_size))


def test_short_or_failed_answers_are_errors_not_scores(gateway):
    target, engine = gateway
    lm = LoraplexLM(target=target)
    request = _requests("loglikelihood", [("Q: x?", " ab")])
    engine.drop_last_logprob = True
    with pytest.raises(EvalError, match="prompt logprobs for"):
        lm.loglikelihood(request, disable_tqdm=True)
    engine.drop_last_logprob = False
    too_long = _requests("loglikelihood", [("Q", "x" * INFO.max_context_length)])
    with pytest.raises(EvalInputError, match="does not fit the context"):
        lm.loglikelihood(too_long, disable_tqdm=True)


def test_generate_until_sends_greedy_requests_with_the_tasks_stops(gateway):
    target, engine = gateway
    lm = LoraplexLM(target=target, adapter="")
    [text] = lm.generate_until(
        _requests("generate_until", [("Q: x?", {"until": ["\n"], "max_gen_toks": 3})]), True
    )
    sent = engine.seen[-1]
    assert text == "<0><1><2>" and sent.max_tokens == 3
    assert sent.sampling.temperature == 0.0 and "\n" in sent.stopping.stop
    assert lm.served_versions == {"base"}
