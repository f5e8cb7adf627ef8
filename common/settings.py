"""Typed settings read from the environment, validated once at start.

A bad value stops the process with one readable line and exit status 2 (see `load_or_exit`), so a typo in a
deployment manifest fails the pod at once instead of at the first request.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping
from typing import Annotated, Literal

import msgspec

PositiveInt = Annotated[int, msgspec.Meta(ge=1)]
NonNegativeInt = Annotated[int, msgspec.Meta(ge=0)]
PositiveFloat = Annotated[float, msgspec.Meta(gt=0)]
NonNegativeFloat = Annotated[float, msgspec.Meta(ge=0)]
Port = Annotated[int, msgspec.Meta(ge=1, le=65535)]
LogLevel = Literal["debug", "info", "warning", "error", "critical"]

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
# `max` on PATH (else the repo's .venv-max); --max-batch-size because on CPU MAX otherwise serves one at a time.
DEFAULT_ENGINE_CMD = ("max serve --model-path {model} --host {host} --port {port} --max-batch-size 8"
                      " --devices {devices}")


class Settings(msgspec.Struct, frozen=True, kw_only=True, rename="upper"):
    """Every knob, named exactly as its environment variable (upper case)."""

    model_name: str = DEFAULT_MODEL
    served_model_name: str | None = None
    max_seq_len: PositiveInt = 4096
    server_host: str = "0.0.0.0"
    server_port: Port = 3000
    max_connections: PositiveInt = 100
    concurrent_requests: PositiveInt = 10
    max_queued_jobs: PositiveInt = 256
    worker_grace_s: NonNegativeFloat = 2.0
    redis_timeout_s: PositiveFloat = 2.0
    cache_capacity: NonNegativeInt = 1000
    cache_ttl_s: NonNegativeFloat = 0.0
    cache_policy: Literal["deterministic", "all"] = "deterministic"
    embed_cache_capacity: NonNegativeInt = 100_000
    batch_timeout_ms: NonNegativeInt = 50
    max_batch_size: PositiveInt = 8
    redis_url: str | None = None
    redis_cluster: Literal["auto", "true", "false"] = "auto"  # auto: `INFO cluster` of REDIS_URL's node decides
    log_level: LogLevel = "info"
    log_format: Literal["text", "json"] = "text"
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"  # auto: workers/chat/loader.py pick_device
    request_timeout_s: PositiveFloat = 600.0
    heartbeat_ttl_s: PositiveFloat = 10.0
    visibility_timeout_s: PositiveFloat = 15.0
    max_deliveries: PositiveInt = 3
    max_body_bytes: PositiveInt = 10 * 1024 * 1024
    # Slow clients (README "Security"): seconds to send the request line and headers, then the whole body (408);
    # bytes of undelivered stream output the API holds per request before it drops a client that stopped reading.
    header_timeout_s: PositiveFloat = 10.0
    body_timeout_s: PositiveFloat = 30.0
    stream_buffer_bytes: PositiveInt = 4 * 1024 * 1024
    sse_keepalive_s: PositiveFloat = 15.0
    worker_kind: Literal["chat", "embed", "rerank"] = "chat"
    embedding_model: str = "BAAI/bge-small-en-v1.5"
    rerank_model: str = "BAAI/bge-reranker-base"
    embed_device: Literal["cpu", "cuda"] = "cpu"
    fastembed_cache_path: str | None = None
    embed_cross_request_batching: bool = True
    serve_embeddings: bool = True
    prefill_chunk_tokens: PositiveInt = 512
    prefill_idle_tokens: PositiveInt = 2048
    prefix_cache_tokens: NonNegativeInt = 16384
    # Decoding steps as CUDA graphs over static KV buffers (workers/chat/graphs.py): auto = on CUDA only.
    decode_graphs: Literal["auto", "on", "off"] = "auto"
    graph_max_len: PositiveInt = 1024
    # Fresh prompts prefill through CUDA graphs too, in buckets of up to this many prompt positions; 0 = eagerly.
    graph_prefill_tokens: NonNegativeInt = 2048
    # With decode graphs, launch each step before reading the last one back, while every row is plain greedy.
    decode_ahead: bool = False
    stream_interval: PositiveInt = 1  # publish a sequence's tokens every N steps (workers/chat/step_publish.py)
    # Security (README "Security"): keys, rate limits, CORS, request limits, which models may be loaded.
    api_keys: str = ""
    require_api_key: bool = False
    open_paths: str = "/health"
    rate_limit_rpm: NonNegativeInt = 0
    rate_limit_tpm: NonNegativeInt = 0
    cors_allow_origins: str = ""
    max_messages: PositiveInt = 1024
    max_inputs: PositiveInt = 2048
    max_string_chars: PositiveInt = 1_000_000
    model_allowlist: str = ""
    allow_model_paths: bool = False
    vllm_metric_names: bool = True
    reasoning_parser: Literal["auto", "none"] = "auto"
    response_store_ttl_s: PositiveFloat = 30 * 86400.0  # stored Responses API answers (OpenAI keeps them 30 days)
    # Fleets (README "Several models"): request names mapped onto served models; who may order hot swaps.
    model_aliases: str = ""
    admin_api_keys: str = ""
    # How the chat worker loads MODEL_NAME (workers/chat/loader.py): a .gguf file inside it (MODEL_NAME may also
    # be a .gguf path), and weight-only quantization after loading (int4 needs CUDA).
    model_gguf_file: str | None = None
    quantization: Literal["none", "int8", "int4"] = "none"
    # fp32 linear layers on the CPU multiply weight-first for small batches (workers/chat/cpu_linear.py).
    cpu_linear: Literal["auto", "torch"] = "auto"
    # External engine (README "Backends"; workers/chat/external): which backend a chat worker
    # uses, the command that starts it ({model} {host} {port} {devices} filled in) or the URL of a running one.
    backend: Literal["auto", "vllm", "max", "external", "native"] = "auto"
    # BACKEND=vllm: vLLM's engine arguments beyond those Axion sets, as a JSON object ('{"enforce_eager": true}').
    vllm_engine_args: str = ""
    external_engine_cmd: str = DEFAULT_ENGINE_CMD
    external_engine_url: str = ""
    external_engine_model: str = ""  # the id the engine serves the model under ("" = ask its /v1/models)
    external_engine_start_timeout_s: PositiveFloat = 900.0
    external_engine_lacks: str = "auto"  # request features the engine cannot serve ("auto": known per engine)
    external_engine_unsupported: Literal["reject", "native"] = "reject"
    external_engine_connections: PositiveInt = 16
    # Batch API (README "Batch API"): upload size, lines per batch, lines in flight, worker slots kept for online.
    files_max_bytes: PositiveInt = 10 * 1024 * 1024
    batch_max_lines: PositiveInt = 50_000
    batch_window: PositiveInt = 16
    batch_reserved_slots: NonNegativeInt = 1
    batch_slots_beside_online: NonNegativeInt = 1

    @property
    def model_id(self) -> str:
        """The id clients put in `model`: SERVED_MODEL_NAME, else MODEL_NAME as given."""
        return self.served_model_name or self.model_name

    def model_of(self, kind: str) -> str:
        """The model a worker of `kind` (chat, embed, rerank) loads at start."""
        return {"chat": self.model_name, "embed": self.embedding_model, "rerank": self.rerank_model}[kind]

    @property
    def configured_models(self) -> frozenset[str]:
        """The models the operator named in settings: loaded even as absolute folders, and always nameable in
        requests (ALLOW_MODEL_PATHS governs only what else requests may name)."""
        return frozenset({self.model_name, self.model_id, self.embedding_model, self.rerank_model})

    @property
    def auth_required(self) -> bool:
        """Keys are checked when any are configured in API_KEYS, or when REQUIRE_API_KEY asks for Redis keys."""
        return self.require_api_key or bool(split_list(self.api_keys))


def parse_aliases(value: str) -> dict[str, str]:
    """MODEL_ALIASES as {alias: served model id}: a JSON object, or `alias=model` pairs separated by commas
    (`gpt-4o-mini=models/tiny, gpt-4o=models/big`). ValueError names the first bad entry."""
    value = value.strip()
    if not value:
        return {}
    if value.startswith("{"):
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise ValueError(f"not a JSON object ({exc})") from None
        if not isinstance(parsed, dict) or not all(isinstance(v, str) for v in parsed.values()):
            raise ValueError("the JSON form maps alias names to model id strings")
        pairs = [(str(k).strip(), v.strip()) for k, v in parsed.items()]
    else:
        pairs = []
        for part in split_list(value):
            alias, sep, target = part.partition("=")
            if not sep:
                raise ValueError(f"{part!r} is not alias=model")
            pairs.append((alias.strip(), target.strip()))
    aliases: dict[str, str] = {}
    for alias, target in pairs:
        if not alias or not target or alias == target:
            raise ValueError(f"{alias!r}={target!r}: both names are needed and must differ")
        aliases[alias] = target
    for alias, target in aliases.items():
        if target in aliases:
            raise ValueError(f"{alias!r} points at another alias, {target!r} (aliases resolve once)")
    return aliases


def split_list(value: str) -> list[str]:
    """A comma-separated setting as a list, blanks dropped (`"a, b,"` is `["a", "b"]`)."""
    return [part.strip() for part in value.split(",") if part.strip()]


class SettingsError(ValueError):
    """A setting that cannot be used; the message is one line naming the variable."""


def _log_level_from_rust_style(value: str) -> str:
    """Accept `axion=info` and `warn,axion=debug` as RUST_LOG writes them: the `axion` target wins."""
    level = value
    for part in value.split(","):
        target, _, lvl = part.rpartition("=")
        if not target:
            level = lvl
        elif target == "axion":
            level = lvl
            break
    level = level.strip().lower()
    return {"warn": "warning", "trace": "debug"}.get(level, level)


def load_settings(environ: Mapping[str, str] | None = None) -> Settings:
    """Build Settings from `environ` (default `os.environ`); raise SettingsError on the first bad value."""
    env = os.environ if environ is None else environ
    raw: dict[str, str] = {}
    for field in msgspec.structs.fields(Settings):
        value = env.get(field.encode_name)
        if value is not None and value.strip() != "":
            raw[field.encode_name] = value.strip()
    if "LOG_LEVEL" not in raw and env.get("RUST_LOG"):
        raw["LOG_LEVEL"] = env["RUST_LOG"]
    if "LOG_LEVEL" in raw:
        raw["LOG_LEVEL"] = _log_level_from_rust_style(raw["LOG_LEVEL"])
    try:
        settings = msgspec.convert(raw, Settings, strict=False)
    except msgspec.ValidationError as exc:
        message = str(exc)
        name = message.rsplit("$.", 1)[-1] if "$." in message else "settings"
        detail = message.split(" - at ")[0]
        raise SettingsError(f"invalid setting {name}={raw.get(name, '')!r}: {detail}") from None
    try:
        engine_args = json.loads(settings.vllm_engine_args or "{}")
    except ValueError as exc:
        raise SettingsError(f"invalid setting VLLM_ENGINE_ARGS: not JSON ({exc})") from None
    if not isinstance(engine_args, dict):
        raise SettingsError("invalid setting VLLM_ENGINE_ARGS: a JSON object of vLLM engine arguments is needed")
    try:
        parse_aliases(settings.model_aliases)
    except ValueError as exc:
        raise SettingsError(f"invalid setting MODEL_ALIASES={settings.model_aliases!r}: {exc}") from None
    return settings


def load_or_exit() -> Settings:
    """Settings for a process entry point: on a bad value print one line and exit with status 2."""
    try:
        return load_settings()
    except SettingsError as exc:
        print(f"axion: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
