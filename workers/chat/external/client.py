"""The HTTP side of the external engine: OpenAI requests built from our jobs, its SSE stream read back as plain
pieces, and its mistakes normalised (error shapes, per-chunk usage, missing `finish_reason`s).

One `httpx.AsyncClient` with a bounded pool (EXTERNAL_ENGINE_CONNECTIONS) serves every job of the worker.
Closing a response before its end aborts the upstream request: that is how a cancelled job stops the engine.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

import httpx

from common.protocol import ChatJob, ChatMessage, Failed, GuidedDecoding, TokenLogprob, TopLogprob

# Request features an engine may lack, as EXTERNAL_ENGINE_LACKS names them.
FEATURES = ("n", "response_format", "logprobs", "echo", "tools", "penalties", "extra_sampling")
MAX_LACKS = frozenset({"n", "response_format", "echo", "penalties"})


class EngineError(Exception):
    """The engine refused or failed the request; `failed` is the OpenAI-shaped answer for our client."""

    def __init__(self, failed: Failed, *, refused: bool = False) -> None:
        super().__init__(failed.message)
        self.failed = failed
        self.refused = refused  # no connection could be made: the engine is down, not just this request


def unavailable(detail: str, *, refused: bool = False) -> EngineError:
    """The engine cannot be reached or broke the stream: 502, which clients (and the OpenAI SDK) retry."""
    return EngineError(Failed(status=502, type="server_error", code="engine_unavailable",
                              message=f"The model's engine failed while answering ({detail}); retry the request."),
                       refused=refused)


@dataclass
class Piece:
    """What one chunk of the engine's stream adds to one choice."""

    index: int
    text: str = ""
    finish_reason: str | None = None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    logprobs: list[TokenLogprob] | None = None
    reasoning: str = ""  # what an engine with a reasoning parser sends apart (vLLM: `reasoning_content`)


@dataclass
class Usage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0


def lacked_features(job: ChatJob, lacks: frozenset[str]) -> list[str]:
    """The features this job uses that the engine lacks (see FEATURES)."""
    p = job.params
    used = {
        "n": job.n > 1,
        "response_format": p.guided is not None,
        "logprobs": p.logprobs,
        "echo": job.echo,
        "tools": bool(job.tools),
        "penalties": bool(p.presence_penalty or p.frequency_penalty or p.repetition_penalty != 1.0),
        "extra_sampling": bool(p.top_k or p.min_p or p.min_tokens or p.ignore_eos or p.stop_token_ids),
    }
    return [name for name, on in used.items() if on and name in lacks]


def _message(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.name:
        out["name"] = m.name
    if m.tool_call_id:
        out["tool_call_id"] = m.tool_call_id
    if m.tool_calls:
        out["tool_calls"] = [{"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                             for c in m.tool_calls]
    return out


def _constraint(guided: GuidedDecoding) -> dict[str, Any]:
    """The output constraint in the engine's request: OpenAI's response_format for JSON, vLLM's guided_* else."""
    if guided.kind in ("regex", "grammar"):
        return {f"guided_{guided.kind}": guided.text}
    if guided.kind == "choice":
        return {"guided_choice": guided.choices}
    schema = {"name": "schema", "strict": guided.strict, "schema": guided.schema or {}}
    fmt: dict[str, Any] = {"type": "json_object"} if guided.kind == "json_object" else {
        "type": "json_schema", "json_schema": schema}
    return {"response_format": fmt} | ({"guided_whitespace_pattern": guided.whitespace}
                                       if guided.whitespace is not None else {})


def build_request(job: ChatJob, model: str) -> tuple[str, dict[str, Any]]:
    """The engine path and JSON body for a job: chat messages go to /v1/chat/completions, raw prompts to
    /v1/completions. Only fields with non-default values are sent, as strict engines refuse unknown ones."""
    p = job.params
    body: dict[str, Any] = {"model": model, "stream": True, "stream_options": {"include_usage": True},
                            "temperature": p.temperature, "top_p": p.top_p}
    optional: dict[str, Any] = {
        "max_tokens": p.max_tokens, "stop": p.stop or None, "seed": p.seed, "n": job.n if job.n > 1 else None,
        "presence_penalty": p.presence_penalty or None, "frequency_penalty": p.frequency_penalty or None,
        "logit_bias": {str(k): v for k, v in p.logit_bias.items()} or None,
        "top_k": p.top_k or None, "min_p": p.min_p or None, "min_tokens": p.min_tokens or None,
        "repetition_penalty": p.repetition_penalty if p.repetition_penalty != 1.0 else None,
        "ignore_eos": p.ignore_eos or None, "stop_token_ids": p.stop_token_ids or None,
    }
    body |= {k: v for k, v in optional.items() if v is not None}
    if p.guided is not None:
        body |= _constraint(p.guided)
    if job.prompt is not None or job.prompt_ids is not None:
        body["prompt"] = job.prompt if job.prompt is not None else job.prompt_ids
        if not job.add_special_tokens:
            body["add_special_tokens"] = False
        if job.echo:
            body["echo"] = True
        if p.logprobs:
            body["logprobs"] = max(1, p.top_logprobs)
        return "/v1/completions", body
    body["messages"] = [_message(m) for m in job.messages]
    template = {"add_generation_prompt": False if not job.add_generation_prompt else None,
                "continue_final_message": job.continue_final_message or None,
                "chat_template_kwargs": job.chat_template_kwargs or None}
    body |= {k: v for k, v in template.items() if v is not None}  # vLLM's names; an engine without them refuses
    if p.logprobs:
        body |= {"logprobs": True, "top_logprobs": p.top_logprobs}
    if job.tools:
        body |= {"tools": job.tools, "parallel_tool_calls": job.parallel_tool_calls}
        if job.tool_choice is not None:
            body["tool_choice"] = job.tool_choice
    return "/v1/chat/completions", body


def error_from_body(status: int, raw: bytes) -> Failed:
    """An engine's error answer in our shape: OpenAI's envelope, FastAPI's `{"detail": ...}`, or plain text.
    The engine's 5xx become 502 (the engine, not this server, failed); its 4xx stay the client's mistake."""
    message, kind, code, param = raw.decode(errors="replace").strip() or f"HTTP {status}", None, None, None
    try:
        data = json.loads(raw)
    except ValueError:
        data = None
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        err = data["error"]
        message = str(err.get("message") or message)
        kind, code, param = err.get("type"), err.get("code"), err.get("param")
    elif isinstance(data, dict) and "detail" in data:
        detail = data["detail"]
        message = detail if isinstance(detail, str) else json.dumps(detail)
    if status >= 500 or status < 400:
        return Failed(status=502, type="server_error", code="engine_error",
                      message=f"The model's engine failed: {message}")
    return Failed(status=status, message=message, type=str(kind or "invalid_request_error"),
                  code=None if code is None else str(code), param=param)


def _logprobs(raw: Any) -> list[TokenLogprob] | None:
    content = raw.get("content") if isinstance(raw, dict) else None
    if not content:
        return None
    return [TokenLogprob(token=t.get("token", ""), logprob=float(t.get("logprob", 0.0)), bytes=t.get("bytes") or [],
                         top_logprobs=[TopLogprob(token=a.get("token", ""), logprob=float(a.get("logprob", 0.0)),
                                                  bytes=a.get("bytes") or []) for a in t.get("top_logprobs") or []])
            for t in content]


def parse_chunk(chunk: dict[str, Any]) -> tuple[list[Piece], Usage | None]:
    """One SSE payload's pieces (chat `delta.content` or completions `text`) and its usage, if any."""
    if isinstance(chunk.get("error"), dict) or "detail" in chunk:
        raise EngineError(error_from_body(502, json.dumps(chunk).encode()))
    pieces = []
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        text = delta.get("content") if "delta" in choice else choice.get("text")
        pieces.append(Piece(index=int(choice.get("index", 0)), text=text or "",
                            finish_reason=choice.get("finish_reason"), tool_calls=delta.get("tool_calls") or [],
                            logprobs=_logprobs(choice.get("logprobs")),
                            reasoning=delta.get("reasoning_content") or delta.get("reasoning") or ""))
    usage = chunk.get("usage")
    if isinstance(usage, dict) and "completion_tokens" in usage:
        cached = (usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0
        return pieces, Usage(int(usage.get("prompt_tokens") or 0), int(usage["completion_tokens"]), int(cached))
    return pieces, None


class EngineClient:
    def __init__(self, base_url: str, *, connections: int, model: str = "", timeout_s: float = 600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
        self._http = httpx.AsyncClient(base_url=self.base_url, limits=limits,
                                       timeout=httpx.Timeout(timeout_s, connect=5.0))

    async def resolve_model(self, wanted: list[str]) -> str:
        """The id to send as `model`: the first of `wanted` the engine lists, else the only one it serves."""
        if self.model:
            return self.model
        response = await self._http.get("/v1/models")
        response.raise_for_status()
        ids = [m["id"] for m in response.json().get("data", [])]
        self.model = next((w for w in wanted if w in ids), ids[0] if ids else wanted[0])
        return self.model

    async def stream(self, job: ChatJob) -> AsyncGenerator[tuple[list[Piece], Usage | None], None]:
        """The engine's answer to `job`, chunk by chunk; EngineError on a refusal or a broken stream."""
        path, body = build_request(job, self.model)
        timeout = self._http.timeout  # what httpx uses when a request names none
        if job.deadline is not None:
            timeout = httpx.Timeout(max(1.0, job.deadline - time.time()), connect=5.0)
        try:
            # Our request id leads the engine's own (Axion and vLLM take X-Request-Id): one id across both logs.
            async with self._http.stream("POST", path, json=body, headers={"X-Request-Id": job.request_id},
                                         timeout=timeout) as response:
                if response.status_code != 200:
                    raise EngineError(error_from_body(response.status_code, await response.aread()))
                async for line in response.aiter_lines():
                    if not line.startswith("data:"):
                        continue
                    data = line[5:].strip()
                    if data == "[DONE]":
                        return
                    try:
                        chunk = json.loads(data)
                    except ValueError:
                        raise unavailable(f"unreadable stream chunk {data[:80]!r}") from None
                    yield parse_chunk(chunk)
        except httpx.HTTPError as exc:
            raise unavailable(type(exc).__name__, refused=isinstance(exc, httpx.ConnectError)) from None

    async def aclose(self) -> None:
        await self._http.aclose()
