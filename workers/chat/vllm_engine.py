"""The vLLM backend: vLLM's engine (`AsyncLLM`) in the chat worker's own process, behind the backend contract.

The worker templates and checks a job exactly as for the native engine (`sequence.prepare`), hands vLLM the
prompt's token ids with the request's sampling parameters (structured output through vLLM's guided decoding, on
llguidance as ours), and turns the token ids vLLM returns into events with the native engine's code
(`sequence.advance`: text, stop strings, tool calls, logprobs). So both backends answer alike, and a job taken over
after a crash resumes the same way: the dead worker's tokens are replayed as events and go to vLLM as prompt.
vLLM does not detokenize (we do); each choice of `n` is its own vLLM request, seeded `seed + index`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import multiprocessing
import os
from dataclasses import dataclass, field
from typing import Any

import psutil
import torch
from vllm import SamplingParams as EngineParams
from vllm.config import StructuredOutputsConfig
from vllm.engine.arg_utils import AsyncEngineArgs
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM
from vllm.v1.engine.exceptions import EngineDeadError
from vllm.v1.metrics.loggers import StatLoggerBase

from common.protocol import Accepted, ChatJob, Event, Failed, Tokenized, TokenLogprob, TopLogprob, WorkerInfo
from common.settings import Settings
from workers.chat import tools
from workers.chat.backend import Publish
from workers.chat.grammar import GrammarCompiler, json_constraint
from workers.chat.logprobs import TokenBytes
from workers.chat.sequence import Sequence, advance, eos_token_ids, finish, prepare, replay, tokenize

log = logging.getLogger("axion.worker.vllm")

WAKE_S = 0.1  # a step waits this long at most for vLLM's output, then reads new jobs and cancel flags anyway
CPU = torch.device("cpu")  # where `prepare` builds each choice's (unused) torch generator


@dataclass
class EngineFigures:
    """What vLLM's scheduler last reported, and totals since start: the heartbeat's engine figures."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of which found
    prompt_tokens: int = 0
    iterations: int = 0


def recorder(figures: EngineFigures) -> type[StatLoggerBase]:
    """A vLLM stat logger class (its per-engine factory) that writes into `figures`."""

    class Recorder(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.figures = figures

        def record(self, scheduler_stats: Any, iteration_stats: Any, mm_cache_stats: Any = None,
                   engine_idx: int = 0) -> None:
            if scheduler_stats is not None:
                figures.running, figures.waiting = scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs
                figures.kv_usage = scheduler_stats.kv_cache_usage
                figures.prefix_queries += scheduler_stats.prefix_cache_stats.queries
                figures.prefix_hits += scheduler_stats.prefix_cache_stats.hits
            if iteration_stats is not None:
                figures.prompt_tokens += iteration_stats.num_prompt_tokens
                figures.iterations += 1

        def log_engine_initialized(self) -> None:
            """Nothing to log: the worker logs its own load steps."""

    return Recorder


@dataclass
class Choice:
    """One choice's vLLM request: its output constraint, then its output queue and the task draining it."""

    structured: StructuredOutputsParams | None
    queue: Any = None
    task: asyncio.Task[None] | None = None
    outputs: list[Any] = field(default_factory=list)


def structured_params(job: ChatJob, seq: Sequence) -> StructuredOutputsParams | None:
    """The job's output constraint in vLLM's terms, the same grammar the native engine enforces: a forced tool
    call (Lark), else response_format's JSON schema with our whitespace and strictness options."""
    if seq.tool_format is not None:
        forced = tools.forcing_grammar(job.tools or [], job.tool_choice or "auto", job.parallel_tool_calls,
                                       seq.tool_format)
        if forced is not None:
            return StructuredOutputsParams(grammar=forced)
    guided = job.params.guided
    if guided is None:
        return None
    return StructuredOutputsParams(json=json_constraint(guided.kind, guided.schema, guided.strict))


def engine_params(seq: Sequence, structured: StructuredOutputsParams | None) -> EngineParams:
    """vLLM's sampling parameters for one choice, counting the tokens it already has (a resumed job's)."""
    p, done = seq.params, len(seq.output_ids)
    return EngineParams(
        n=1, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p, seed=seq.seed,
        max_tokens=seq.max_new_tokens - done, min_tokens=max(0, p.min_tokens - done),
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty, logit_bias=dict(p.logit_bias) or None,
        stop_token_ids=list(p.stop_token_ids) or None, ignore_eos=p.ignore_eos,
        logprobs=p.top_logprobs if p.logprobs else None, detokenize=False, skip_special_tokens=False,
        output_kind=RequestOutputKind.DELTA, structured_outputs=structured)


class VllmBackend:
    name = "vllm"

    def __init__(self, llm: AsyncLLM, tokenizer: Any, *, max_seq_len: int, vocab_size: int, eos_ids: list[int],
                 device: str, dtype: str, revision: str, figures: EngineFigures) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.device, self.dtype, self.revision = device, dtype, revision
        self.figures = figures
        self.token_bytes = TokenBytes(tokenizer)
        self.rows: list[Sequence] = []
        self._unstarted: list[Sequence] = []  # added; their vLLM requests start at the next step
        self._released: list[Sequence] = []
        self._aborts: list[str] = []  # vLLM request ids to abort at the next step
        self._outputs: list[tuple[Sequence, Any]] = []  # (choice, vLLM output or the exception its queue raised)
        self._ready = asyncio.Event()
        self._grammars: GrammarCompiler | None = None
        self.generated = 0

    @property
    def active(self) -> int:
        return len(self.rows)

    @property
    def pending(self) -> list[Sequence]:
        return []  # vLLM's scheduler orders what waits

    def running(self) -> list[Sequence]:
        return list(self.rows)

    def prepare(self, job: ChatJob) -> Sequence | Failed:
        seq = prepare(job, self.tokenizer, self.max_seq_len, self.vocab_size, CPU, self._grammar_compiler)
        if isinstance(seq, Failed):
            return seq
        structured = structured_params(job, seq)
        for choice in [seq, *seq.siblings]:
            choice.matcher = None  # validated above; vLLM enforces the grammar
            choice.handle = Choice(structured)
        return seq

    def _grammar_compiler(self) -> GrammarCompiler:
        """Validates a request's grammar at admission, so a bad schema is a 400 before anything streams."""
        if self._grammars is None:
            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, eos_token_ids=self.eos_ids)
        return self._grammars

    def tokenize(self, job: ChatJob) -> Tokenized | Failed:
        return tokenize(job, self.tokenizer, self.max_seq_len, self.vocab_size)

    def add(self, seq: Sequence) -> Accepted:
        choices = [seq, *seq.siblings]
        self.rows += choices
        self._unstarted += choices
        return Accepted(prompt_tokens=len(seq.prompt_ids), prompt_text=seq.echo_text)

    def cancel(self, request_id: str) -> None:
        for seq in self.rows:
            if seq.request_id == request_id:
                seq.cancelled = True
                self._ready.set()

    async def step(self, publish: Publish) -> bool:
        events: list[tuple[Sequence, Event]] = []
        await self._start_new(events)
        if not (events or self._outputs or self._released or any(s.cancelled for s in self.rows)):
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._ready.wait(), WAKE_S)
        self._ready.clear()
        outputs, self._outputs = self._outputs, []
        for seq, out in outputs:
            self._apply(seq, out, events)
        for seq in [s for s in self.rows if s.cancelled]:
            self._release(seq)
        if self._aborts:
            aborts, self._aborts = self._aborts, []
            await self.llm.abort(aborts, internal=True)
        released, self._released = self._released, []
        await publish(events, released, True)
        return True

    async def _start_new(self, events: list[tuple[Sequence, Event]]) -> None:
        """Start the vLLM request of every choice added since the last step. A resumed choice first replays the
        dead worker's tokens as events (the API drops those it relayed already); they go to vLLM as prompt."""
        new, self._unstarted = self._unstarted, []
        for seq in new:
            if seq.cancelled:
                continue
            if seq.resume:
                events += replay(seq, self._advance)
                if seq.finish_reason is not None:
                    self._release(seq)
                    continue
            choice: Choice = seq.handle
            try:
                choice.queue = await self.llm.add_request(
                    f"{seq.request_id}-{seq.index}", {"prompt_token_ids": seq.prompt_ids + seq.output_ids},
                    engine_params(seq, choice.structured))
            except VLLMClientError as exc:  # what our own checks let through and vLLM refuses
                seq.finish_reason = "error"
                events.append((seq, Failed(status=400, message=f"The engine refused the request: {exc}",
                                           code="invalid_request")))
                self._release(seq)
                continue
            choice.task = asyncio.create_task(self._collect(seq, choice.queue), name="axion-vllm-output")

    async def _collect(self, seq: Sequence, queue: Any) -> None:
        """Move one vLLM request's outputs into the step's list as they come, until it finishes."""
        try:
            while True:
                out = queue.get_nowait() or await queue.get()
                self._outputs.append((seq, out))
                self._ready.set()
                if out.finished:
                    return
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # the engine failed this request (or died: `_apply` tells which)
            self._outputs.append((seq, exc))
            self._ready.set()

    def _apply(self, seq: Sequence, out: Any, events: list[tuple[Sequence, Event]]) -> None:
        """One output of one choice: its new tokens become events; a finished or failed choice is released."""
        if seq.finish_reason is not None or seq.cancelled:
            return  # ended on our side already (a stop string, a cancel): vLLM's last outputs are moot
        if isinstance(out, BaseException):
            if isinstance(out, EngineDeadError) or self.llm.errored:
                raise EngineDeadError("vLLM's engine died") from out  # the worker stops; its jobs are taken over
            log.error("vLLM failed request %s: %r", seq.request_id, out)
            seq.finish_reason = "error"
            events.append((seq, Failed(status=500, type="server_error", code="engine_error",
                                       message="The model's engine failed while generating.")))
            self._release(seq)
            return
        completion = out.outputs[0]
        if not seq.cached_tokens and out.num_cached_tokens:
            seq.cached_tokens = min(out.num_cached_tokens, len(seq.prompt_ids))
        logprobs = completion.logprobs
        for k, token in enumerate(completion.token_ids):
            if logprobs is not None:
                seq.pending_logprobs = self._logprob(logprobs[k], token, seq.params.top_logprobs)
            events.append((seq, self._advance(seq, token)))
            self.generated += 1
            if seq.finish_reason is not None:
                break
        if seq.finish_reason is None and out.finished:
            reason = completion.finish_reason
            if reason in ("stop", "length"):
                events.append((seq, finish(seq, reason)))
            else:
                seq.finish_reason = "error"
                events.append((seq, Failed(status=500, type="server_error", code="engine_error",
                                           message=f"The engine ended the output early ({reason}).")))
        if seq.finish_reason is not None:
            self._release(seq, running=not out.finished)

    def _advance(self, seq: Sequence, token: int) -> Event:
        return advance(seq, token, self.eos_ids, self.max_seq_len, self.token_bytes)

    def _logprob(self, entries: dict[int, Any], token: int, top: int) -> TokenLogprob:
        """vLLM's logprobs of one position (the sampled token and the `top` most likely) in OpenAI's shape."""
        text, raw = self.token_bytes(token)
        alternatives = []
        for alt, entry in sorted(entries.items(), key=lambda item: item[1].rank):
            if entry.rank is not None and entry.rank <= top:
                alt_text, alt_raw = self.token_bytes(alt)
                alternatives.append(TopLogprob(token=alt_text, logprob=float(entry.logprob), bytes=alt_raw))
        return TokenLogprob(token=text, logprob=float(entries[token].logprob), bytes=raw,
                            top_logprobs=alternatives[:top])

    def _release(self, seq: Sequence, running: bool = True) -> None:
        """Out of the batch (the worker acknowledges the job once every choice is out); a vLLM request still
        running is aborted at this step's end."""
        if seq not in self.rows:
            return
        self.rows.remove(seq)
        self._released.append(seq)
        choice: Choice = seq.handle
        if choice.task is not None and not choice.task.done():
            choice.task.cancel()
        if running and choice.queue is not None:
            self._aborts.append(choice.queue.request_id)

    def stats(self, info: WorkerInfo) -> None:
        f = self.figures
        info.active_sequences = len(self.rows)
        info.running_sequences, info.waiting_sequences = f.running, f.waiting
        info.kv_cache_usage = round(f.kv_usage, 4)
        info.prefix_cache_hit_tokens, info.prefix_cache_query_tokens = f.prefix_hits, f.prefix_queries
        info.decoded_tokens, info.decode_steps = self.generated, f.iterations
        info.prefilled_tokens = max(0, f.prompt_tokens - f.prefix_hits)
        if self.device == "cuda":
            free, total = torch.cuda.mem_get_info()
            info.device_memory_used_bytes, info.device_memory_total_bytes = total - free, total

    def summary(self) -> str:
        f = self.figures
        return (f"vLLM: {f.iterations} engine steps, {self.generated} tokens generated, {f.prompt_tokens} prompt "
                f"tokens ({f.prefix_hits} from the prefix cache)")

    async def close(self) -> None:
        for seq in self.rows:
            task = seq.handle.task if seq.handle is not None else None
            if task is not None:
                task.cancel()
        self.llm.shutdown()
        multiprocessing.active_children()  # reaps the engine's processes (no zombies left behind by a swap)


def prepare_environment(device: torch.device) -> None:
    """vLLM's own settings that its defaults get wrong on a small machine, unless the operator set them: the KV
    cache on the CPU (vLLM's 4 GiB is refused beside other processes) and the address its processes meet on."""
    os.environ.setdefault("VLLM_HOST_IP", "127.0.0.1")
    if device.type == "cpu" and "VLLM_CPU_KVCACHE_SPACE" not in os.environ:
        gib = max(1, min(4, int(psutil.virtual_memory().available / 2**30 / 8)))
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(gib)
        log.info("VLLM_CPU_KVCACHE_SPACE unset: %d GiB of KV cache (an eighth of the free memory, 1 to 4)", gib)


def engine_args(settings: Settings, model: str, dtype: torch.dtype, max_len: int) -> AsyncEngineArgs:
    """Our settings as vLLM's engine arguments, overridden by VLLM_ENGINE_ARGS (a JSON object of any of them)."""
    values: dict[str, Any] = {
        "model": model, "tokenizer": model, "served_model_name": [settings.model_id], "max_model_len": max_len,
        "dtype": str(dtype).removeprefix("torch."), "max_num_seqs": settings.max_batch_size,
        "enable_prefix_caching": True, "seed": 0, "disable_log_stats": True,
        "structured_outputs_config": {"backend": "guidance"},
    }
    values.update(json.loads(settings.vllm_engine_args or "{}"))
    if isinstance(values.get("structured_outputs_config"), dict):
        values["structured_outputs_config"] = StructuredOutputsConfig(**values["structured_outputs_config"])
    return AsyncEngineArgs(**values)


def open_vllm(settings: Settings, model: str, revision: str) -> VllmBackend:
    """Start vLLM's engine on `model` (blocking, minutes for a first compile: run it on the model thread)."""
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig

    from workers.chat.loader import pick_device

    device, dtype = pick_device(settings.device, settings.dtype)
    prepare_environment(device)
    tokenizer = AutoTokenizer.from_pretrained(model)
    if tokenizer.chat_template is None:
        raise RuntimeError(f"the tokenizer of {model} has no chat template; chat completions need one")
    config = AutoConfig.from_pretrained(model)
    text_config = config.get_text_config()
    generation = None
    with contextlib.suppress(OSError, ValueError):
        generation = GenerationConfig.from_pretrained(model)
    limit = getattr(text_config, "max_position_embeddings", None) or settings.max_seq_len
    max_len = min(settings.max_seq_len, int(limit))
    figures = EngineFigures()
    llm = AsyncLLM.from_engine_args(engine_args(settings, model, dtype, max_len), stat_loggers=[recorder(figures)])
    eos = eos_token_ids(tokenizer, generation, text_config)
    vocab = int(getattr(text_config, "vocab_size", None) or len(tokenizer))
    return VllmBackend(llm, tokenizer, max_seq_len=max_len, vocab_size=vocab, eos_ids=eos, device=device.type,
                       dtype=str(dtype).removeprefix("torch."), revision=revision, figures=figures)
