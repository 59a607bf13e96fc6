"""A small client for the loraplex gateway: sync (`Client`) and asyncio (`AsyncClient`) for
generation, and a blocking `AdapterClient` for the adapter registry.

    with Client("localhost:50051") as c:
        print(c.generate("Once upon a time", adapter="alpha", max_tokens=32).text)

    with AdapterClient("localhost:50051") as reg:
        reg.register("acme", "/srv/adapters/acme-run-7", alias="candidate")

Keyword arguments are the fields of SamplingParams and StoppingCriteria (temperature, top_p,
max_tokens, stop, ...) plus logprobs / prompt_logprobs / logprob_token_ids / request_id.

Every client takes an API key (`api_key`, default `$LORAPLEX_API_KEY`) and TLS credentials
(`credentials`, default from `$LORAPLEX_TLS_CA_FILE`, plus `$LORAPLEX_TLS_CERT_FILE` /
`$LORAPLEX_TLS_KEY_FILE` for mutual TLS), so every `loraplex` command and the lm-eval backend
reach a gateway with keys and TLS without extra flags.
"""

from gateway.client.channel import (
    API_KEY_ENV,
    TLS_CA_ENV,
    TLS_CERT_ENV,
    TLS_KEY_ENV,
    AioConnection,
    Connection,
    auth_metadata,
    open_aio_channel,
    open_channel,
    tls_credentials,
    wait_until_serving,
)
from gateway.client.generation import SAMPLING_FIELDS, AsyncClient, Client, build_request
from gateway.client.keys import KeyClient
from gateway.client.registry import (
    ACTOR_METADATA,
    MAX_CHUNK,
    AdapterClient,
    default_actor,
    tar_folder,
)

__all__ = [
    "ACTOR_METADATA",
    "API_KEY_ENV",
    "MAX_CHUNK",
    "SAMPLING_FIELDS",
    "TLS_CA_ENV",
    "TLS_CERT_ENV",
    "TLS_KEY_ENV",
    "AdapterClient",
    "AioConnection",
    "AsyncClient",
    "Client",
    "Connection",
    "KeyClient",
    "auth_metadata",
    "build_request",
    "default_actor",
    "open_aio_channel",
    "open_channel",
    "tar_folder",
    "tls_credentials",
    "wait_until_serving",
]
