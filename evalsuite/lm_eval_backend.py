"""lm-eval model backend `loraplex`: every score is measured through the gateway, for one adapter.

    lm_eval.simple_evaluate(model="loraplex",
                            model_args="target=HOST:PORT,adapter=NAME@candidate", tasks=[...])

`loglikelihood` scores the one-token continuations of a context (multiple choice) in one
request that reads their logprobs at the next position (greedy: the one picked), and any other
context + continuation in one request with prompt logprobs (the continuation's summed logprob;
greedy when every continuation token ranked first),
`loglikelihood_rolling` sums disjoint windows the same way, and `generate_until` generates with
the task's stop strings. Requests go out concurrently (the engine batches them, adapters
included). Tokenization is the gateway's (`Tokenize`), with lm-eval's HF rules for BOS, so the
token boundaries are the served tokenizer's.
"""

from __future__ import annotations

import asyncio
import logging
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from lm_eval.api.instance import Instance
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, maybe_truncate, normalize_gen_kwargs
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm

from evalsuite.errors import EvalError, EvalInputError
from evalsuite.fanout import DEFAULT_TIMEOUT_S, check_finished, served_version
from gateway.client import SAMPLING_FIELDS, AsyncClient, Client
from gateway.contract import MAX_SCORED_TOKEN_IDS as MAX_SCORED_TOKENS
from loraplex.v1 import generation_pb2 as pb

log = logging.getLogger(__name__)
T = TypeVar("T")
Scored = tuple[float, bool]
LoglikelihoodRequest = tuple[tuple[str, str], list[int], list[int]]
# lm-eval generation kwargs that are not sampling parameters, or that mean greedy here.
_HANDLED_GEN_KWARGS = {"until", "max_gen_toks", "do_sample"}


@register_model("loraplex")
class LoraplexLM(TemplateLM):
    """lm-eval's LM over the loraplex gateway (gRPC), for one adapter reference."""

    def __init__(
        self,
        target: str = "localhost:50051",
        adapter: str = "",
        concurrency: int = 32,
        max_gen_toks: int = 256,
        max_length: int | None = None,
        timeout: float = DEFAULT_TIMEOUT_S,
        add_bos_token: bool | None = None,
        group_choices: bool = True,
        **unused: Any,
    ) -> None:
        """target: gateway host:port; adapter: "" (base), NAME, NAME@alias or NAME@vN;
        concurrency: requests in flight; max_length: context limit (default: the gateway's);
        add_bos_token: as lm-eval's hf backend (None: the tokenizer's default);
        group_choices: score a context's one-token continuations in one request (False: one
        prompt-logprob request per continuation, as for longer continuations)."""
        super().__init__()
        if unused:
            log.warning("loraplex backend ignores model_args %s", sorted(unused))
        self.target, self.adapter = target, str(adapter)
        self.concurrency, self.timeout = int(concurrency), float(timeout)
        self.max_gen_toks, self.add_bos_token = int(max_gen_toks), add_bos_token
        if group_choices not in (True, False):  # lm-eval's model_args parser makes bools
            raise EvalInputError(f"group_choices must be true or false, got {group_choices!r}")
        self.group_choices = bool(group_choices)
        with Client(target) as client:
            info = client.stub.GetModelInfo(
                pb.GetModelInfoRequest(), timeout=timeout, metadata=client.metadata
            )
        if not info.HasField("eos_token"):
            raise EvalInputError(f"the base model at {target} has no EOS token")
        self.eos = (info.eos_token.id, info.eos_token.text)
        self.bos = (info.bos_token.id, info.bos_token.text) if info.HasField("bos_token") else None
        self._max_length = int(max_length or info.max_context_length)
        self._prompt_logprobs_refusal = info.prompt_logprobs_unsupported  # "": served exactly
        self.served_versions: set[str] = set()  # the adapter versions that answered
        self._token_cache: dict[tuple[str, bool], list[int]] = {}

    # -- tokenization: the gateway's tokenizer, lm-eval's (HF backend's) BOS rules ------------

    @property
    def eot_token_id(self) -> int:
        return self.eos[0]

    @property
    def prefix_token_id(self) -> int:
        """What an empty context is conditioned on: BOS, else EOS (as lm-eval's hf backend)."""
        return self.bos[0] if self.bos is not None else self.eos[0]

    @property
    def max_length(self) -> int:
        return self._max_length

    def _special(self, string: str, add_special_tokens: bool | None) -> bool:
        if add_special_tokens is not None:
            return add_special_tokens
        if self.bos is not None and string.startswith(self.bos[1]):
            return False  # the string already starts with BOS
        return True if self.add_bos_token is None else self.add_bos_token

    def tok_encode(
        self, string: str, add_special_tokens: bool | None = None, **kwargs: Any
    ) -> list[int]:
        key = (string, self._special(string, add_special_tokens))
        if key not in self._token_cache:
            self._prefetch([key])
        return self._token_cache[key]

    def _prefetch(self, keys: Iterable[tuple[str, bool]]) -> None:
        """Tokenize many strings concurrently into the cache (lm-eval asks one at a time)."""
        todo = sorted({k for k in keys if k not in self._token_cache})
        if not todo:
            return

        async def one(client: AsyncClient, key: tuple[str, bool]) -> list[int]:
            response = await client.stub.Tokenize(
                pb.TokenizeRequest(text=key[0], add_special_tokens=key[1]),
                timeout=self.timeout,
                metadata=client.metadata,
            )
            return list(response.token_ids)

        ids = self._run_all(one, todo, desc=None)
        self._token_cache.update(zip(todo, ids, strict=True))

    def _pair_keys(self, context: str, continuation: str) -> list[tuple[str, bool]]:
        """The strings TemplateLM.loglikelihood will tokenize for this pair."""
        if not context:
            return [(continuation, False)]
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        return [
            (s, self._special(s, None)) for s in (context + continuation, context)
        ]  # fmt: skip

    # -- requests -------------------------------------------------------------------------------

    def _run_all(
        self,
        call: Callable[[AsyncClient, T], Awaitable[Any]],
        items: Sequence[T],
        desc: str | None,
        disable_tqdm: bool = False,
    ) -> list[Any]:
        """Run `call` on every item, `concurrency` at a time, results in order."""

        async def main() -> list[Any]:
            limit = asyncio.Semaphore(self.concurrency)
            bar = tqdm(total=len(items), desc=desc, disable=disable_tqdm or desc is None)
            async with AsyncClient(self.target) as client:

                async def bounded(item: T) -> Any:
                    async with limit:
                        result = await call(client, item)
                    bar.update(1)
                    return result

                try:
                    return await asyncio.gather(*(bounded(item) for item in items))
                finally:
                    bar.close()

        return asyncio.run(main())

    def _note_version(self, response: pb.GenerateResponse) -> None:
        self.served_versions.add(served_version(response.adapter))

    def _check_prompt_logprobs(self, needed_by: str) -> None:
        """Stop before the first request where the gateway says it refuses prompt logprobs."""
        if self._prompt_logprobs_refusal:
            raise EvalInputError(
                f"{needed_by} are scored with prompt logprobs, which the gateway at "
                f"{self.target} refuses: {self._prompt_logprobs_refusal}"
            )

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[Scored]:
        self._prefetch(k for r in requests for k in self._pair_keys(*r.args))
        return super().loglikelihood(requests, disable_tqdm=disable_tqdm)

    def _loglikelihood_tokens(
        self, requests: list[LoglikelihoodRequest], disable_tqdm: bool = False, **kwargs: Any
    ) -> list[Scored]:
        # One-token continuations of the same context (multiple choice) share one request that
        # scores them all at the next position; the rest are scored by prompt logprobs.
        groups: dict[tuple[int, ...], list[int]] = defaultdict(list)
        work: list[tuple[tuple[int, ...], tuple[int, ...]] | int] = []
        for index, (_, context, continuation) in enumerate(requests):
            if len(continuation) > self.max_length - 2:
                raise EvalInputError(
                    f"a continuation of {len(continuation)} tokens does not fit the context "
                    f"({self.max_length} tokens, one for the context, one generated)"
                )
            if self.group_choices and len(continuation) == 1:
                groups[tuple(context[-(self.max_length - 1) :])].append(index)
            else:
                work.append(index)
        if any(isinstance(item, int) for item in work):
            self._check_prompt_logprobs("continuations longer than one token")
        for context, members in groups.items():
            choices = sorted({requests[i][2][0] for i in members})
            for start in range(0, len(choices), MAX_SCORED_TOKENS):
                work.append((context, tuple(choices[start : start + MAX_SCORED_TOKENS])))

        async def run(client: AsyncClient, item: Any) -> Any:
            if isinstance(item, int):
                return await self._score_continuation(client, *requests[item][1:])
            return await self._score_next_token(client, *item)

        results: list[Scored | None] = [None] * len(requests)
        for item, result in zip(
            work, self._run_all(run, work, "loglikelihood (gateway)", disable_tqdm), strict=True
        ):
            if isinstance(item, int):
                results[item] = result
                continue
            for index in groups[item[0]]:
                choice = requests[index][2][0]
                if choice in result:
                    results[index] = result[choice]
        for (pair, _, _), result in zip(requests, results, strict=True):
            if pair[1]:  # a (context, continuation) request, not a rolling window
                self.cache_hook.add_partial("loglikelihood", pair, result)
        return results  # type: ignore[return-value]  # every slot filled above

    async def _score_continuation(
        self, client: AsyncClient, context: list[int], continuation: list[int]
    ) -> Scored:
        """Context + continuation in one request; the continuation's prompt logprobs."""
        # Room for the one generated token the engine insists on.
        tokens = (context + continuation)[-(self.max_length - 1) :]
        context_len = len(tokens) - len(continuation)
        response = await client.generate(
            tokens,
            self.adapter,
            timeout=self.timeout,
            max_tokens=1,
            temperature=0.0,
            prompt_logprobs=0,
        )
        check_finished(response, self.adapter)
        self._note_version(response)
        if len(response.prompt_logprobs) != len(tokens):
            raise EvalError(
                f"the gateway returned {len(response.prompt_logprobs)} prompt logprobs for "
                f"{len(tokens)} prompt tokens"
            )
        scored = response.prompt_logprobs[context_len:]
        if not all(t.HasField("logprob") for t in scored):
            raise EvalError("the gateway returned a prompt token without its logprob")
        return sum(t.logprob for t in scored), all(t.rank == 1 for t in scored)

    async def _score_next_token(
        self, client: AsyncClient, context: tuple[int, ...], choices: tuple[int, ...]
    ) -> dict[int, Scored]:
        """Each one-token choice's logprob after `context`, from one greedy step.

        Greedy decoding picks the most likely token, so a choice is greedy iff it was picked.
        """
        response = await client.generate(
            list(context),
            self.adapter,
            timeout=self.timeout,
            max_tokens=1,
            temperature=0.0,
            logprob_token_ids=list(choices),
        )
        check_finished(response, self.adapter)
        self._note_version(response)
        if len(response.logprobs) != 1:
            raise EvalError(f"the gateway returned {len(response.logprobs)} positions, not 1")
        step = response.logprobs[0]
        scored = {t.token_id: t.logprob for t in step.top_logprobs}
        if set(scored) != set(choices):
            raise EvalError("the gateway did not score every requested token")
        return {c: (scored[c], c == step.token_id) for c in choices}

    def loglikelihood_rolling(
        self, requests: list[Instance], disable_tqdm: bool = False
    ) -> list[float]:
        """Perplexity-style scoring of whole texts: disjoint windows, as lm-eval's backends."""
        self._check_prompt_logprobs("rolling loglikelihood (perplexity)")
        self._prefetch((r.args[0], self._special(r.args[0], None)) for r in requests)
        windows: list[LoglikelihoodRequest] = []
        owners: list[int] = []
        for index, (text,) in enumerate(r.args for r in requests):
            for context, continuation in map(
                make_disjoint_window,
                get_rolling_token_windows(
                    token_list=self.tok_encode(text),
                    prefix_token=self.prefix_token_id,
                    # one context token + up to max_length - 2 scored tokens, + 1 generated
                    max_seq_len=self.max_length - 2,
                    context_len=1,
                ),
            ):
                windows.append(((text, ""), list(context), list(continuation)))
                owners.append(index)
        totals = [0.0] * len(requests)
        for owner, (logprob, _) in zip(
            owners, self._loglikelihood_tokens(windows, disable_tqdm), strict=True
        ):
            totals[owner] += logprob
        for request, total in zip(requests, totals, strict=True):
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
        return totals

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        self._prefetch((r.args[0], self._special(r.args[0], None)) for r in requests)
        contexts = {r.args[0]: self.tok_encode(r.args[0]) for r in requests}  # before the loop

        async def generate(client: AsyncClient, request: Instance) -> str:
            context, gen_kwargs = request.args
            options = normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=self.max_gen_toks)
            until = handle_stop_sequences(options.get("until"), eos=self.eos[1])
            tokens, max_tokens = maybe_truncate(
                contexts[context],
                max_gen_toks=int(options["max_gen_toks"]),
                max_model_len=self.max_length,
            )
            sampling = {k: v for k, v in options.items() if k in SAMPLING_FIELDS}
            ignored = set(options) - SAMPLING_FIELDS - _HANDLED_GEN_KWARGS
            if ignored:
                log.warning("loraplex backend ignores generation kwargs %s", sorted(ignored))
            if not options.get("do_sample", False):
                sampling["temperature"] = 0.0
            response = await client.generate(
                tokens,
                self.adapter,
                timeout=self.timeout,
                max_tokens=max_tokens,
                stop=until,
                **sampling,
            )
            check_finished(response, self.adapter)
            self._note_version(response)
            return response.text

        results = self._run_all(generate, requests, "generate_until (gateway)", disable_tqdm)
        for request, text in zip(requests, results, strict=True):
            self.cache_hook.add_partial("generate_until", request.args, text)
        return results
