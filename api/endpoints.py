"""Every endpoint of the API in one table: its paths and what the shared layers need to know of it.

Routing (`api/app.py`), the body checks before decoding (`api/limits.py`), rate-limit accounting
(`api/ratelimit.py`), the OpenAPI document (`api/openapi.py`) and the Batch API's accepted URLs
(`batches/files.py`) all read it. Adding an endpoint is one serving module (its handler) and one row here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from api import protocol_legacy as legacy
from api.protocol import ChatCompletionRequest
from api.protocol_admin import LoadRequest, UnloadRequest
from api.protocol_responses import ResponsesRequest
from api.serving_embed import EmbeddingRequest
from api.serving_rerank import RerankRequest, ScoreRequest


@dataclass(frozen=True)
class Endpoint:
    paths: tuple[str, ...]  # the first is the canonical one; the others are aliases clients call
    body: type | None = None  # the struct its JSON body decodes into (None: no JSON body, a GET)
    kind: Literal["chat", "embed", "rerank"] | None = None  # the worker kind serving its `model`
    streams: bool = False  # `stream: true` answers server-sent events
    generates: bool = False  # charged for the tokens it may generate, not only for its input
    default_output: int | None = None  # tokens charged when the body sets no limit (None: the context's rest)
    several_prompts: bool = False  # a list in `prompt` may hold several prompts, one answer each
    prompt_fields: tuple[str, ...] = ()  # fields holding a chat model's prompt (checked against MAX_SEQ_LEN)
    id_field: str | None = None  # the field that may hold token ids (checked against the vocabulary)
    sampling: bool = False  # takes `stop_token_ids` and `logit_bias` (token ids too)
    batchable: bool = False  # a Batch API line may name it as its `url`

    @property
    def path(self) -> str:
        return self.paths[0]

    @property
    def routes(self) -> list[str]:
        """The paths as Litestar's route decorators take them."""
        return list(self.paths)


CHAT = Endpoint(("/v1/chat/completions",), ChatCompletionRequest, "chat", streams=True, generates=True,
                prompt_fields=("messages",), sampling=True, batchable=True)
COMPLETIONS = Endpoint(("/v1/completions",), legacy.CompletionRequest, "chat", streams=True, generates=True,
                       default_output=16, several_prompts=True, prompt_fields=("prompt",), id_field="prompt",
                       sampling=True, batchable=True)
RESPONSES = Endpoint(("/v1/responses",), ResponsesRequest, "chat", streams=True, generates=True)
TOKENIZE = Endpoint(("/tokenize",), legacy.TokenizeRequest, "chat", prompt_fields=("messages", "prompt"))
DETOKENIZE = Endpoint(("/detokenize",), legacy.DetokenizeRequest, "chat", id_field="tokens")
EMBEDDINGS = Endpoint(("/v1/embeddings",), EmbeddingRequest, "embed", id_field="input", batchable=True)
RERANK = Endpoint(("/v1/rerank", "/rerank", "/v2/rerank"), RerankRequest, "rerank")
SCORE = Endpoint(("/v1/score", "/score"), ScoreRequest, "rerank")
LOAD_MODEL = Endpoint(("/admin/models/load",), LoadRequest)
UNLOAD_MODEL = Endpoint(("/admin/models/unload",), UnloadRequest)
VERSION = Endpoint(("/version",))

ENDPOINTS = (CHAT, COMPLETIONS, RESPONSES, TOKENIZE, DETOKENIZE, EMBEDDINGS, RERANK, SCORE, LOAD_MODEL, UNLOAD_MODEL,
             VERSION)
BY_PATH = {path: endpoint for endpoint in ENDPOINTS for path in endpoint.paths}
#: POST path -> the struct its body decodes into (the OpenAPI document's request bodies).
REQUEST_BODIES = {path: e.body for e in ENDPOINTS if e.body is not None for path in e.paths}
#: The endpoints a Batch API line may call, by path.
BATCH_URLS = tuple(e.path for e in ENDPOINTS if e.batchable)


def endpoint(path: str) -> Endpoint | None:
    return BY_PATH.get(path)
