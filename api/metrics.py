"""`/metrics`: Prometheus text, metric names after vLLM's (`vllm:` becomes `axion:`).

Two kinds of series:

* this replica's own: counters and histograms observed in the request path (`api/jobs.py`), and the requests it
  holds now. Each API replica counts only what it served, so a dashboard sums over replicas in PromQL
  (`sum(rate(axion:generation_tokens_total[1m]))`, `histogram_quantile(0.99, sum by (le)
  (rate(axion:time_to_first_token_seconds_bucket[5m])))`).
* the fleet's, read from Redis at scrape time in one pipelined round trip bounded by FLEET_READ_S: per-model
  queues and per-worker batch and memory. Every replica reports the same values, so take `max`, not `sum`,
  across replicas. With Redis unreachable the scrape still answers 200, with `axion:redis_up 0` and no fleet
  series.

With VLLM_METRIC_NAMES (on by default) the request series with a vLLM counterpart are also exported under
their `vllm:` names, labels and all, so dashboards and autoscaler rules written for vLLM read them unchanged.

Each app has its own `CollectorRegistry`, so several apps in one process (tests) do not collide.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest
from prometheus_client.registry import Collector

from api.health import queue_stats

if TYPE_CHECKING:
    import redis.asyncio as aioredis

    from api.registry import WorkerRegistry
    from common.settings import Settings

log = logging.getLogger("axion.api.metrics")

FLEET_READ_S = 1.0  # the longest a scrape waits on Redis for the fleet gauges
# Litestar appends "; charset=utf-8" to every text/ media type, so it is left off here (else it came twice).
CONTENT_TYPE = CONTENT_TYPE_LATEST.replace("; charset=utf-8", "")

# Buckets as vLLM uses them (seconds).
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
               80.0)
REQUEST_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                   480.0, 960.0, 1920.0, 7680.0)


class VllmNames(Collector):
    """Series already collected under `axion:` names, again as `vllm:` (the part after the prefix is vLLM's)."""

    def __init__(self, sources: list[Collector]) -> None:
        self.sources = sources

    def collect(self) -> Any:
        for source in self.sources:
            for family in source.collect():
                family.name = "vllm:" + family.name.removeprefix("axion:")
                family.samples = [s._replace(name="vllm:" + s.name.removeprefix("axion:")) for s in family.samples]
                yield family


class Metrics:
    """The series of one API replica; `render()` adds the fleet's, read from Redis, and returns the text."""

    def __init__(self, vllm_names: bool = True) -> None:
        r = self.registry = CollectorRegistry(auto_describe=True)
        model = ["model_name"]
        self.running = Gauge("axion:num_requests_running", "Requests on this replica a worker has accepted and "
                             "is generating for.", model, registry=r)
        self.waiting = Gauge("axion:num_requests_waiting", "Requests on this replica not yet accepted by a "
                             "worker (waiting for a slot or in the model's queue).", model, registry=r)
        self.ttft = Histogram("axion:time_to_first_token_seconds", "Request start to first token event.", model,
                              buckets=TTFT_BUCKETS, registry=r)
        self.itl = Histogram("axion:inter_token_latency_seconds", "Time between token events of one choice.",
                             model, buckets=ITL_BUCKETS, registry=r)
        self.e2e = Histogram("axion:e2e_request_latency_seconds", "Request start to its last event, for requests "
                             "that finished.", model, buckets=REQUEST_BUCKETS, registry=r)
        self.queue_time = Histogram("axion:request_queue_time_seconds", "Job enqueued to accepted by a worker.",
                                    model, buckets=REQUEST_BUCKETS, registry=r)
        self.prompt_tokens = Counter("axion:prompt_tokens_total", "Prompt tokens of finished requests.", model,
                                     registry=r)
        self.generation_tokens = Counter("axion:generation_tokens_total", "Generated tokens of finished requests "
                                         "(all choices).", model, registry=r)
        self.success = Counter("axion:request_success_total", "Finished requests, by the finish reason of their "
                               "first choice.", [*model, "finished_reason"], registry=r)
        self.vllm: CollectorRegistry | None = None  # the request series with a vLLM counterpart, as vLLM names them
        if vllm_names:
            self.vllm = CollectorRegistry(auto_describe=False)
            self.vllm.register(VllmNames([self.running, self.waiting, self.ttft, self.itl, self.e2e, self.queue_time,
                                          self.prompt_tokens, self.generation_tokens, self.success]))
        self.cache_hits = Counter("axion:cache_hits_total", "Response cache hits on this replica (chat: "
                                  "requests; embed: requests answered wholly from the cache).", ["cache"],
                                  registry=r)
        self.cache_misses = Counter("axion:cache_misses_total", "Response cache misses on this replica (the "
                                    "cache was read and the answer computed).", ["cache"], registry=r)
        self.rate_limited = Counter("axion:rate_limit_rejections_total", "Requests refused with 429 by a key's "
                                    "rate limit.", ["limit"], registry=r)
        # Fleet gauges, filled at scrape time.
        self.redis_up = Gauge("axion:redis_up", "1 when this scrape could read the fleet from Redis.", registry=r)
        qlabels = ["kind", "model_name"]
        self.queue_depth = Gauge("axion:queue_depth", "Entries in the model's job stream (waiting + pending).",
                                 qlabels, registry=r)
        self.queue_pending = Gauge("axion:queue_pending", "Jobs delivered to a worker, not yet answered.", qlabels,
                                   registry=r)
        self.queue_waiting = Gauge("axion:queue_waiting", "Jobs no worker has read yet.", qlabels, registry=r)
        self.dead_letters = Gauge("axion:dead_letters", "Entries in the model's dead-letter stream.", qlabels,
                                  registry=r)
        self.batch_depth = Gauge("axion:batch_queue_depth", "Entries in the model's Batch API stream (low priority: "
                                 "waiting + running batch lines).", qlabels, registry=r)
        self.workers = Gauge("axion:workers", "Live workers.", qlabels, registry=r)
        wlabels = ["worker_id", "kind", "model_name"]
        self.w_active = Gauge("axion:worker_active_sequences", "Sequences in the worker's batch.", wlabels,
                              registry=r)
        self.w_batch = Gauge("axion:worker_max_batch_size", "The worker's batch capacity.", wlabels, registry=r)
        self.w_occupancy = Gauge("axion:worker_batch_occupancy", "active_sequences / max_batch_size (0..1).",
                                 wlabels, registry=r)
        self.w_kv = Gauge("axion:worker_kv_cache_bytes", "Bytes held by the worker's KV cache.", wlabels,
                          registry=r)
        self.w_device_mem = Gauge("axion:worker_device_memory_usage_perc", "Device memory used / total (0..1), "
                                  "where the worker reports it.", wlabels, registry=r)
        self.w_tps = Gauge("axion:worker_tokens_per_s", "Decoded tokens (embed/rerank: inputs) per second over "
                           "the worker's last heartbeat interval.", wlabels, registry=r)
        self.w_running = Gauge("axion:worker_running_sequences", "Sequences the worker's engine computes now.",
                               wlabels, registry=r)
        self.w_waiting = Gauge("axion:worker_waiting_sequences", "Sequences admitted by the worker that its engine "
                               "has not started (no room yet, or prompts not yet prefilled).", wlabels, registry=r)
        self.w_kv_usage = Gauge("axion:worker_kv_cache_usage_perc", "Share of the engine's KV-cache pool in use "
                                "(0..1), where the engine has a fixed pool (vLLM).", wlabels, registry=r)
        self.w_prefix_queries = Gauge("axion:worker_prefix_cache_queries", "Prompt tokens looked up in the worker's "
                                      "prefix cache since it started.", wlabels, registry=r)
        self.w_prefix_hits = Gauge("axion:worker_prefix_cache_hits", "Of those, tokens found in the prefix cache.",
                                   wlabels, registry=r)
        self._fleet = (self.queue_depth, self.queue_pending, self.queue_waiting, self.dead_letters, self.batch_depth,
                       self.workers,
                       self.w_active, self.w_batch, self.w_occupancy, self.w_kv, self.w_device_mem, self.w_tps,
                       self.w_running, self.w_waiting, self.w_kv_usage, self.w_prefix_queries, self.w_prefix_hits)

    async def render(self, redis: aioredis.Redis, registry: WorkerRegistry, settings: Settings) -> bytes:
        async def read() -> tuple[list[Any], list[dict[str, Any]]]:
            workers = await registry.workers()
            return workers, await queue_stats(redis, settings, workers)

        for gauge in self._fleet:
            gauge.clear()
        try:
            workers, queues = await asyncio.wait_for(read(), FLEET_READ_S)
        except Exception as exc:  # Redis down or slow: answer with what this replica knows
            log.debug("metrics: fleet read failed: %s", type(exc).__name__)
            self.redis_up.set(0)
        else:
            self.redis_up.set(1)
            for q in queues:
                labels = (q["kind"], q["model"])
                self.queue_depth.labels(*labels).set(q["depth"])
                self.queue_pending.labels(*labels).set(q["pending"])
                self.queue_waiting.labels(*labels).set(q["waiting"])
                self.dead_letters.labels(*labels).set(q["dead_letters"])
                self.batch_depth.labels(*labels).set(q["batch_depth"])
                self.workers.labels(*labels).set(q["workers"])
            for w in workers:
                worker_labels = (w.worker_id, w.kind, w.model)
                self.w_active.labels(*worker_labels).set(w.active_sequences)
                self.w_batch.labels(*worker_labels).set(w.max_batch_size)
                self.w_occupancy.labels(*worker_labels).set(w.active_sequences / w.max_batch_size
                                                     if w.max_batch_size else 0)
                self.w_kv.labels(*worker_labels).set(w.kv_cache_bytes)
                if w.device_memory_total_bytes:
                    self.w_device_mem.labels(*worker_labels).set((w.device_memory_used_bytes or 0)
                                                          / w.device_memory_total_bytes)
                self.w_tps.labels(*worker_labels).set(w.tokens_per_s)
                if w.kind == "chat":
                    self.w_running.labels(*worker_labels).set(w.running_sequences)
                    self.w_waiting.labels(*worker_labels).set(w.waiting_sequences)
                    self.w_prefix_queries.labels(*worker_labels).set(w.prefix_cache_query_tokens)
                    self.w_prefix_hits.labels(*worker_labels).set(w.prefix_cache_hit_tokens)
                if w.kv_cache_usage is not None:
                    self.w_kv_usage.labels(*worker_labels).set(w.kv_cache_usage)
        return generate_latest(self.registry) + (generate_latest(self.vllm) if self.vllm is not None else b"")


class RunTimer:
    """The timings of one job, fed by `JobRun.next_event`; inert when the app has no metrics."""

    def __init__(self, metrics: Metrics | None, model: str) -> None:
        self.metrics = metrics
        self.model = model
        self.started = time.monotonic()
        self.enqueued: float | None = None
        self.first_token: float | None = None
        self._last_token: dict[int, float] = {}
        self._itl: Any = None  # the model's inter-token histogram, looked up once (labels() costs ~1 us a token)
        self.state: str | None = None  # "waiting" / "running" while counted in those gauges

    def set_state(self, state: str | None) -> None:
        m = self.metrics
        if m is None or state == self.state:
            return
        gauges = {"waiting": m.waiting, "running": m.running}
        if self.state is not None:
            gauges[self.state].labels(self.model).dec()
        if state is not None:
            gauges[state].labels(self.model).inc()
        self.state = state

    def accepted(self) -> None:
        now = time.monotonic()
        if self.metrics is not None and self.enqueued is not None:
            self.metrics.queue_time.labels(self.model).observe(now - self.enqueued)
        self.set_state("running")

    def token(self, index: int) -> None:
        now = time.monotonic()
        m = self.metrics
        if m is None:
            return
        if self.first_token is None:
            self.first_token = now
            m.ttft.labels(self.model).observe(now - self.started)
        last = self._last_token.get(index)
        if last is not None:
            if self._itl is None:
                self._itl = m.itl.labels(self.model)
            self._itl.observe(now - last)
        self._last_token[index] = now

    def finished(self, reason: str, prompt_tokens: int, completion_tokens: int) -> None:
        m = self.metrics
        if m is None:
            return
        m.e2e.labels(self.model).observe(time.monotonic() - self.started)
        m.success.labels(self.model, reason).inc()
        m.prompt_tokens.labels(self.model).inc(prompt_tokens)
        m.generation_tokens.labels(self.model).inc(completion_tokens)

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000
