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
from vllm.inputs.engine import tokens_input
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine import FinishReason
from vllm.v1.engine.async_llm import AsyncLLM

from common.protocol import Accepted, ChatJob, Event, Failed, Tokenized, TokenLogprob, TopLogprob, WorkerInfo
from common.settings import Settings
from workers.chat import tools
from workers.chat.backend import Publish
from workers.chat.grammar import GrammarCompiler, constraint_source
from workers.chat.logprobs import TokenBytes
from workers.chat.prompt_scores import from_engine
from workers.chat.sequence import Sequence, advance, eos_token_ids, finish, prepare, replay, tokenize

log = logging.getLogger("axion.worker.vllm")

WAKE_S = 0.02  # a step waits this long at most for vLLM's output, then reads new jobs and cancel flags anyway
ENGINE_CORE_NICE = 10  # the engine core's priority on a CPU (`lower_engine_core_priority`)
CPU = torch.device("cpu")  # where `prepare` builds each choice's (unused) torch generator


@dataclass
class EngineFigures:
    """What vLLM's scheduler last reported, and totals since start: the heartbeat's engine figures."""

    running: int = 0
    waiting: int = 0
    kv_usage: float = 0.0
    prefix_queries: int = 0  # prompt tokens looked up in the prefix cache
    prefix_hits: int = 0  # of which found
    prompt_tokens: int = 0  # prompt tokens prefilled, cached ones included
    computed_tokens: int = 0  # of which computed
    steps: int = 0  # engine outputs received (one per engine step that produced any)

    def note(self, stats: Any) -> None:
        """One engine step's scheduler figures (None when the engine sends none)."""
        self.steps += 1
        if stats is None:
            return
        self.running, self.waiting, self.kv_usage = stats.num_running_reqs, stats.num_waiting_reqs, \
            stats.kv_cache_usage
        self.prefix_queries += stats.prefix_cache_stats.queries
        self.prefix_hits += stats.prefix_cache_stats.hits


@dataclass
class Choice:
    """One choice's vLLM request: its output constraint, then the engine's id for it once started."""

    structured: StructuredOutputsParams | None
    engine_id: str | None = None
    prompt_scores: list[Any] = field(default_factory=list)  # vLLM's prompt logprobs, one part per prefill chunk


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
    kind, source = constraint_source(guided)
    return StructuredOutputsParams(**{kind: source})


def engine_params(seq: Sequence, structured: StructuredOutputsParams | None) -> EngineParams:
    """vLLM's sampling parameters for one choice, counting the tokens it already has (a resumed job's)."""
    p, done = seq.params, len(seq.output_ids)
    return EngineParams(
        n=1, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k, min_p=p.min_p, seed=seq.seed,
        max_tokens=seq.max_new_tokens - done, min_tokens=min(max(0, p.min_tokens - done), seq.max_new_tokens - done),
        presence_penalty=p.presence_penalty, frequency_penalty=p.frequency_penalty,
        repetition_penalty=p.repetition_penalty, logit_bias=dict(p.logit_bias) or None,
        stop_token_ids=list(p.stop_token_ids) or None, ignore_eos=p.ignore_eos,
        logprobs=p.top_logprobs if p.logprobs else None, detokenize=False, skip_special_tokens=False,
        prompt_logprobs=p.prompt_logprobs if seq.scores_prompt else None, output_kind=RequestOutputKind.DELTA,
        structured_outputs=structured)


class VllmBackend:
    """Requests go to vLLM's engine core through AsyncLLM's input processor and core client. One task (`_pump`)
    takes each engine step's outputs (`EngineCoreOutputs`: new token ids and logprobs of every running request)
    off the client as they come; a step of ours applies whatever arrived since the last, so one engine step is
    published in one pipeline. AsyncLLM's own output loop, which would wake a task per request per token, is not
    started."""

    name = "vllm"

    def __init__(self, llm: AsyncLLM, tokenizer: Any, *, max_seq_len: int, vocab_size: int, eos_ids: list[int],
                 device: str, dtype: str, revision: str) -> None:
        self.llm = llm
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.vocab_size = vocab_size
        self.eos_ids = eos_ids
        self.device, self.dtype, self.revision = device, dtype, revision
        self.figures = EngineFigures()
        self.token_bytes = TokenBytes(tokenizer)
        self.rows: list[Sequence] = []
        self._unstarted: list[Sequence] = []  # added; their vLLM requests start at the next step
        self._by_engine_id: dict[str, Sequence] = {}  # started and not released
        self._released: list[Sequence] = []
        self._aborts: list[str] = []  # engine ids to abort at the next step
        self._tasks: tuple[Any, ...] | None = None  # what the engine serves (asked once)
        self._grammars: GrammarCompiler | None = None
        self._outputs: list[Any] = []  # engine outputs not yet applied, in order
        self._ready = asyncio.Event()  # set when _outputs gains some
        self._pump_task: asyncio.Task[None] | None = None
        self._dead: BaseException | None = None
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
        return Accepted(prompt_tokens=len(seq.prompt_ids), prompt_text=seq.echo_text, reasoning=seq.reasoning)

    def cancel(self, request_id: str) -> None:
        for seq in self.rows:
            if seq.request_id == request_id:
                seq.cancelled = True

    async def step(self, publish: Publish) -> bool:
        events: list[tuple[Sequence, Event]] = []
        await self._start_new(events)
        for cancelled in [s for s in self.rows if s.cancelled]:
            self._release(cancelled)
        if not (events or self._released or self._outputs) and self._by_engine_id:
            with contextlib.suppress(TimeoutError):  # so new jobs and cancel flags are read during a long prefill
                await asyncio.wait_for(self._ready.wait(), WAKE_S)
        if self._dead is not None:
            raise self._dead  # the engine died: the worker stops unacknowledged, its jobs are taken over
        self._ready.clear()
        outputs, self._outputs = self._outputs, []
        for batch in outputs:
            for out in batch.outputs:
                seq = self._by_engine_id.get(out.request_id)
                if seq is not None:  # else released already (a stop string, a cancel): moot
                    self._apply(seq, out, events)
        if self._aborts:
            aborts, self._aborts = self._aborts, []
            await self.llm.engine_core.abort_requests_async(aborts)
        released, self._released = self._released, []
        await publish(events, released, True)
        return True

    async def _pump(self) -> None:
        """Take the engine's outputs as they come (its figures too, so the heartbeat stays current while idle)."""
        try:
            while True:
                outputs = await self.llm.engine_core.get_output_async()
                self.figures.note(outputs.scheduler_stats)
                if outputs.outputs:
                    self._outputs.append(outputs)
                    self._ready.set()
        except Exception as exc:  # EngineDeadError: the next step raises it
            self._dead = exc
            self._ready.set()

    async def _start_new(self, events: list[tuple[Sequence, Event]]) -> None:
        """Start the vLLM request of every choice added since the last step, all built before any is sent, so a
        burst reaches the engine together and prefills in one step. A resumed choice first replays the dead
        worker's tokens as events (the API drops those it relayed already); they go to vLLM as prompt."""
        new, self._unstarted = self._unstarted, []
        if new and self._tasks is None:
            self._tasks = await self.llm.get_supported_tasks()
            self._pump_task = asyncio.create_task(self._pump(), name="axion-vllm-outputs")
        requests = [request for seq in new if (request := self._request(seq, events)) is not None]
        for request in requests:
            await self.llm.engine_core.add_request_async(request)

    def _request(self, seq: Sequence, events: list[tuple[Sequence, Event]]) -> Any:
        """The engine request of one choice (None: nothing to start, its events are in `events`)."""
        if seq.cancelled:
            return None
        if seq.resume:
            events += replay(seq, self._advance)
            if seq.finish_reason is not None:
                self._release(seq)
                return None
        choice: Choice = seq.handle
        try:
            request = self.llm.input_processor.process_inputs(
                f"{seq.request_id}-{seq.index}", tokens_input(seq.prompt_ids + seq.output_ids),
                engine_params(seq, choice.structured), supported_tasks=self._tasks or ())
            self.llm.input_processor.assign_request_id(request)
        except (VLLMClientError, ValueError) as exc:  # what our own checks let through and vLLM refuses
            seq.finish_reason = "error"
            events.append((seq, Failed(status=400, message=f"The engine refused the request: {exc}",
                                       code="invalid_request")))
            self._release(seq)
            return None
        choice.engine_id = request.request_id
        self._by_engine_id[request.request_id] = seq
        return request

    def _apply(self, seq: Sequence, out: Any, events: list[tuple[Sequence, Event]]) -> None:
        """One engine step's output for one choice: its new tokens become events; a finished choice is
        released (and aborted in the engine when it ended on our side: a stop string, max tokens)."""
        if out.prefill_stats is not None:
            self.figures.prompt_tokens += out.prefill_stats.num_prompt_tokens
            self.figures.computed_tokens += out.prefill_stats.num_computed_tokens
            seq.cached_tokens = min(out.prefill_stats.num_cached_tokens, len(seq.prompt_ids))
        self._score_prompt(seq, out, events)
        logprobs = out.new_logprobs
        for k, token in enumerate(out.new_token_ids):
            if logprobs is not None:
                seq.pending_logprobs = self._logprob(logprobs.logprob_token_ids[k], logprobs.logprobs[k],
                                                     seq.params.top_logprobs)
            events.append((seq, self._advance(seq, token)))
            self.generated += 1
            if seq.finish_reason is not None:
                break
        ended = out.finish_reason
        if seq.finish_reason is None and ended is not None:
            if ended in (FinishReason.STOP, FinishReason.LENGTH):
                events.append((seq, finish(seq, str(ended))))
            else:
                seq.finish_reason = "error"
                events.append((seq, Failed(status=500, type="server_error", code="engine_error",
                                           message=f"The engine ended the output early ({ended}).")))
        if seq.finish_reason is not None:
            self._release(seq, running=ended is None)

    def _score_prompt(self, seq: Sequence, out: Any, events: list[tuple[Sequence, Event]]) -> None:
        """Gather the prompt's logprobs over vLLM's prefill chunks; sent whole before the first token, ahead of
        the step's other events (a sibling's first token included)."""
        choice: Choice = seq.handle
        if out.new_prompt_logprobs_tensors is not None:
            choice.prompt_scores.append(out.new_prompt_logprobs_tensors)
        if seq.scores_prompt and (out.new_token_ids or out.finish_reason is not None):
            seq.scores_prompt = False
            scores = from_engine(seq.prompt_ids, choice.prompt_scores, seq.params.prompt_logprobs or 0,
                                 self.token_bytes)
            events.insert(0, (seq, scores))

    def _advance(self, seq: Sequence, token: int) -> Event:
        return advance(seq, token, self.eos_ids, self.max_seq_len, self.token_bytes)

    def _logprob(self, ids: Any, values: Any, top: int) -> TokenLogprob:
        """One position of vLLM's logprobs (the sampled token first, then the `top` most likely in rank order)
        in OpenAI's shape."""
        ids, values = ids.tolist(), values.tolist()
        text, raw = self.token_bytes(ids[0])
        alternatives = []
        for alt, value in zip(ids[1:top + 1], values[1:top + 1], strict=True):
            alt_text, alt_raw = self.token_bytes(alt)
            alternatives.append(TopLogprob(token=alt_text, logprob=float(value), bytes=alt_raw))
        return TokenLogprob(token=text, logprob=float(values[0]), bytes=raw, top_logprobs=alternatives)

    def _release(self, seq: Sequence, running: bool = True) -> None:
        """Out of the batch (the worker acknowledges the job once every choice is out); a vLLM request still
        running is aborted at this step's end."""
        if seq not in self.rows:
            return
        self.rows.remove(seq)
        self._released.append(seq)
        engine_id = seq.handle.engine_id
        if engine_id is not None:
            del self._by_engine_id[engine_id]
            if running:
                self._aborts.append(engine_id)

    def stats(self, info: WorkerInfo) -> None:
        f = self.figures
        info.active_sequences = len(self.rows)
        info.running_sequences, info.waiting_sequences = f.running, f.waiting
        info.kv_cache_usage = round(f.kv_usage, 4)
        info.prefix_cache_hit_tokens, info.prefix_cache_query_tokens = f.prefix_hits, f.prefix_queries
        info.decoded_tokens, info.decode_steps, info.prefilled_tokens = self.generated, f.steps, f.computed_tokens
        if self.device == "cuda":
            free, total = torch.cuda.mem_get_info()
            info.device_memory_used_bytes, info.device_memory_total_bytes = total - free, total

    def summary(self) -> str:
        f = self.figures
        return (f"vLLM: {f.steps} engine steps, {self.generated} tokens generated, {f.prompt_tokens} prompt "
                f"tokens ({f.prompt_tokens - f.computed_tokens} from the prefix cache)")

    async def close(self) -> None:
        if self._pump_task is not None:
            self._pump_task.cancel()
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


def lower_engine_core_priority() -> None:
    """On a CPU, vLLM's engine core busy-polls its model runner and so takes most of a core; at the default
    priority it competes for the cores with the model runner and with the fleet's own processes (this worker,
    Redis, the API). Lowered to nice 10, it polls when nothing else needs the core (docs/design/vllm-backend.md);
    the model runner keeps its priority."""
    for child in psutil.Process().children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if "EngineCore" in " ".join(child.cmdline()):
                child.nice(max(child.nice(), ENGINE_CORE_NICE))


def engine_args(settings: Settings, model: str, dtype: torch.dtype, max_len: int) -> AsyncEngineArgs:
    """Our settings as vLLM's engine arguments, overridden by VLLM_ENGINE_ARGS (a JSON object of any of them)."""
    values: dict[str, Any] = {
        "model": model, "tokenizer": model, "served_model_name": [settings.model_id], "max_model_len": max_len,
        "dtype": str(dtype).removeprefix("torch."), "max_num_seqs": settings.max_batch_size,
        "enable_prefix_caching": True, "seed": 0, "disable_log_stats": False,  # the scheduler's figures
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
    llm = AsyncLLM.from_engine_args(engine_args(settings, model, dtype, max_len))
    if device.type == "cpu":
        lower_engine_core_priority()
    eos = eos_token_ids(tokenizer, generation, text_config)
    vocab = int(getattr(text_config, "vocab_size", None) or len(tokenizer))
    return VllmBackend(llm, tokenizer, max_seq_len=max_len, vocab_size=vocab, eos_ids=eos, device=device.type,
                       dtype=str(dtype).removeprefix("torch."), revision=revision)
