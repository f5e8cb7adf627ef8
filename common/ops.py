"""`axion status`, `axion queues [--watch N]`, `axion dead-letters list|retry|drop`: the fleet as Redis holds it.

They read REDIS_URL like every command and need no API. Plain aligned text, or `--json`. The README section
"Operating the fleet" gives the `redis-cli` commands each one stands for.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import msgspec
import redis
from redis.exceptions import ResponseError

from common import keys, runfile
from common.protocol import WorkerInfo, decode_worker
from common.redis_cluster import mget_sync, sync_client, text

KINDS = ("chat", "embed", "rerank")
CACHE_NAMESPACES = ("chat", "embed")  # api/cache.py CHAT_NAMESPACE, EMBED_NAMESPACE


def connect(url: str | None, cluster_mode: str = "auto") -> redis.Redis:
    """The fleet's Redis: REDIS_URL, else that of the `axion serve` running on this machine (`common/runfile.py`)."""
    url = runfile.redis_url_or_running(url)
    if not url:
        print("axion: REDIS_URL is not set and no `axion serve` runs here (these commands read the fleet's Redis)",
              file=sys.stderr)
        raise SystemExit(2)
    return sync_client(url, cluster_mode, socket_timeout=5, socket_connect_timeout=5)  # type: ignore[return-value]


def workers(r: redis.Redis) -> list[WorkerInfo]:
    """Live workers: the index (ZRANGE), then their heartbeat keys (MGET); a key that expired is a dead worker."""
    ids = [text(i) for i in r.zrange(keys.WORKER_INDEX, 0, -1)]
    if not ids:
        return []
    found = []
    for raw in mget_sync(r, [keys.worker_heartbeat(i) for i in ids]):
        if raw:
            try:
                found.append(decode_worker(raw))
            except msgspec.DecodeError:
                continue
    return sorted(found, key=lambda w: (w.kind, w.model, w.worker_id))


def targets(r: redis.Redis, live: list[WorkerInfo]) -> list[tuple[str, str]]:
    """(kind, model) pairs worth a row: served now, or with a job or dead-letter stream in Redis."""
    models = sorted({text(m) for m in r.smembers(keys.KNOWN_MODELS)} | {w.model for w in live if w.model})
    pairs = [(k, m) for m in models for k in KINDS]
    pipe = r.pipeline(transaction=False)
    for kind, model in pairs:
        pipe.exists(keys.job_stream(kind, model), keys.dead_letter_stream(kind, model), keys.batch_stream(kind, model))
    exists = pipe.execute()
    served = {(w.kind, w.model) for w in live if w.model}  # an idle worker (workers/host.py) serves no model
    return sorted({p for p, n in zip(pairs, exists, strict=True) if n} | served)


def queues(r: redis.Redis, live: list[WorkerInfo] | None = None) -> list[dict[str, Any]]:
    """Per (kind, model): stream length, pending, lag (entries not yet delivered), dead letters, Batch API lines
    in the model's low-priority stream, workers."""
    live = workers(r) if live is None else live
    pairs = targets(r, live)
    pipe = r.pipeline(transaction=False)
    for kind, model in pairs:
        pipe.xlen(keys.job_stream(kind, model))
        pipe.xinfo_groups(keys.job_stream(kind, model))
        pipe.xlen(keys.dead_letter_stream(kind, model))
        pipe.xlen(keys.batch_stream(kind, model))
    replies = pipe.execute(raise_on_error=False)
    rows = []
    for i, (kind, model) in enumerate(pairs):
        length, groups, dead, batch = replies[4 * i: 4 * i + 4]
        group = next((g for g in groups if _s(g.get("name")) == keys.WORKER_GROUP), None) \
            if isinstance(groups, list) else None
        pending = int(group["pending"]) if group else 0
        lag = group.get("lag") if group else None
        mine = [w for w in live if w.kind == kind and w.model == model]
        rows.append({"kind": kind, "model": model, "stream": keys.job_stream(kind, model),
                     "length": length if isinstance(length, int) else 0, "pending": pending,
                     "lag": int(lag) if lag is not None else (length if isinstance(length, int) else 0) - pending,
                     "dead_letters": dead if isinstance(dead, int) else 0,
                     "batch_lines": batch if isinstance(batch, int) else 0, "workers": len(mine),
                     "active_sequences": sum(w.active_sequences for w in mine),
                     "batch_capacity": sum(w.max_batch_size for w in mine)})
    return rows


def _s(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def caches(r: redis.Redis) -> list[dict[str, Any]]:
    pipe = r.pipeline(transaction=False)
    for ns in CACHE_NAMESPACES:
        pipe.hgetall(keys.cache_stats(ns))
        pipe.zcard(keys.cache_ranking(ns))
    replies = pipe.execute()
    rows = []
    for i, ns in enumerate(CACHE_NAMESPACES):
        stats, entries = replies[2 * i: 2 * i + 2]
        hits, misses = int(stats.get(b"hits", 0)), int(stats.get(b"misses", 0))
        rows.append({"cache": ns, "entries": entries, "hits": hits, "misses": misses,
                     "hit_rate": round(hits / (hits + misses), 3) if hits + misses else None})
    return rows


def worker_rows(live: list[WorkerInfo], now: float) -> list[dict[str, Any]]:
    return [{"worker_id": w.worker_id, "kind": w.kind, "model": w.model, "device": w.device,
             "hostname": w.hostname, "pid": w.pid,
             "heartbeat_age_s": round(max(0.0, now - w.beat_at), 1) if w.beat_at else None,
             "active_sequences": w.active_sequences, "max_batch_size": w.max_batch_size,
             "batch_occupancy": round(w.active_sequences / w.max_batch_size, 3) if w.max_batch_size else None,
             "kv_cache_bytes": w.kv_cache_bytes, "tokens_per_s": w.tokens_per_s, "jobs_done": w.jobs_done}
            for w in live]


def status(r: redis.Redis) -> dict[str, Any]:
    live = workers(r)
    served = {w.model for w in live if w.model}
    known = {text(m) for m in r.smembers(keys.KNOWN_MODELS)}
    return {"models": sorted(served), "models_without_workers": sorted(known - served),
            "workers": worker_rows(live, time.time()), "queues": queues(r, live), "caches": caches(r)}


def table(rows: list[dict[str, Any]], columns: list[str]) -> str:
    """Rows as left-aligned columns under a header; None shows as `-`."""
    cells = [[("-" if row.get(c) is None else str(row.get(c))) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True)).rstrip()]
    lines += ["  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in cells]
    return "\n".join(lines)


QUEUE_COLUMNS = ["kind", "model", "length", "pending", "lag", "dead_letters", "batch_lines", "workers",
                 "active_sequences", "batch_capacity"]


def print_status(data: dict[str, Any]) -> None:
    print(f"models: {', '.join(data['models']) or '(none)'}")
    if data["models_without_workers"]:
        print(f"served before, no live worker now: {', '.join(data['models_without_workers'])}")
    print(f"\nworkers ({len(data['workers'])}):")
    print(table(data["workers"], ["worker_id", "kind", "model", "device", "heartbeat_age_s", "active_sequences",
                                  "max_batch_size", "batch_occupancy", "kv_cache_bytes", "tokens_per_s"]))
    print("\nqueues:")
    print(table(data["queues"], QUEUE_COLUMNS))
    print("\ncaches:")
    print(table(data["caches"], ["cache", "entries", "hits", "misses", "hit_rate"]))


def dead_letters(r: redis.Redis, kind: str | None, model: str | None, count: int) -> list[dict[str, Any]]:
    """Entries of every dead-letter stream (or those of `kind` / `model`), oldest first, with what they were."""
    rows = []
    for k, m in targets(r, workers(r)):
        if (kind and k != kind) or (model and m != model):
            continue
        for raw_id, raw_fields in r.xrange(keys.dead_letter_stream(k, m), count=count) or []:
            fields: dict[Any, Any] = raw_fields or {}
            job: dict[str, Any] = {}
            try:
                job = json.loads(fields.get(b"job", b"{}"))
            except ValueError:
                pass
            entry_id = text(raw_id)
            ms = int(entry_id.split("-")[0])
            rows.append({"id": entry_id, "kind": k, "model": m, "request_id": job.get("request_id"),
                         "deliveries": int(fields.get(b"deliveries", b"0")),
                         "dead_since": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ms / 1000)),
                         "created": job.get("created")})
    return rows


def _select(r: redis.Redis, args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = dead_letters(r, args.kind, args.model, 100_000)
    if args.all:
        return rows
    wanted = set(args.ids)
    chosen = [row for row in rows if row["id"] in wanted]
    missing = wanted - {row["id"] for row in chosen}
    if missing:
        print(f"axion: no dead letter with id {', '.join(sorted(missing))}"
              f"{' (give --kind/--model when ids repeat across streams)' if args.kind is None else ''}",
              file=sys.stderr)
        raise SystemExit(1)
    return chosen


def retry(r: redis.Redis, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """XADD each job back to its model's stream (its fields less `deliveries`) and XDEL it from the dead stream,
    in one transaction per entry, so a job is never in both or in neither."""
    done = []
    for row in rows:
        dead = keys.dead_letter_stream(row["kind"], row["model"])
        found = r.xrange(dead, row["id"], row["id"])
        if not found:
            continue
        fields: dict[Any, Any] = {k: v for k, v in (found[0][1] or {}).items() if k != b"deliveries"}
        with r.pipeline(transaction=True) as tx:
            tx.xadd(keys.job_stream(row["kind"], row["model"]), fields)
            tx.xdel(dead, row["id"])
            new_id, _ = tx.execute()
        done.append({**row, "requeued_as": new_id.decode()})
    return done


def drop(r: redis.Redis, rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [row for row in rows if r.xdel(keys.dead_letter_stream(row["kind"], row["model"]), row["id"])]


def _emit(data: Any, as_json: bool, text: Any) -> None:
    if as_json:
        print(json.dumps(data, indent=2))
    else:
        text()


#: The settings the commands that read the fleet's Redis take (their `--help` says so).
REDIS_SETTINGS = ("settings it reads: REDIS_URL (unset: the Redis of the `axion serve` running on this machine), "
                  "REDIS_CLUSTER")
DESCRIPTIONS = {"status": "The fleet as Redis holds it: live workers and their models, queues, caches.",
                "queues": "Job streams per model: length, pending, lag, dead letters, Batch API lines, workers.",
                "dead-letters": "Jobs given up on (delivered too often): list them, retry or drop them."}


def main(command: str, argv: list[str], redis_url: str | None, cluster_mode: str = "auto") -> int:
    parser = argparse.ArgumentParser(prog=f"axion {command}", description=DESCRIPTIONS[command],
                                     epilog=REDIS_SETTINGS)
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    if command == "queues":
        parser.add_argument("--watch", type=float, nargs="?", const=2.0, default=None, metavar="SECONDS",
                            help="refresh every SECONDS (default 2) until Ctrl-C")
    if command == "dead-letters":
        parser.add_argument("action", choices=["list", "retry", "drop"])
        parser.add_argument("ids", nargs="*", help="entry ids (retry, drop)")
        parser.add_argument("--all", action="store_true", help="retry or drop every entry shown by list")
        parser.add_argument("--kind", choices=KINDS)
        parser.add_argument("--model")
        parser.add_argument("--count", type=int, default=100, help="list at most this many per stream")
    args = parser.parse_args(argv)
    r = connect(redis_url, cluster_mode)
    try:
        if command == "status":
            data = status(r)
            _emit(data, args.json, lambda: print_status(data))
        elif command == "queues":
            while True:
                rows = queues(r)
                if args.watch and not args.json:
                    print("\033[H\033[J", end="")  # clear the terminal between refreshes
                    print(time.strftime("%H:%M:%S"), f"every {args.watch:g}s, Ctrl-C to stop")
                _emit(rows, args.json, lambda rows=rows: print(table(rows, QUEUE_COLUMNS)))
                if not args.watch:
                    break
                sys.stdout.flush()
                time.sleep(args.watch)
        else:
            if args.action == "list":
                rows = dead_letters(r, args.kind, args.model, args.count)
                _emit(rows, args.json, lambda: print(table(rows, ["id", "kind", "model", "request_id",
                                                                  "deliveries", "dead_since"])))
                return 0
            if not args.ids and not args.all:
                parser.error(f"{args.action}: give entry ids, or --all")
            chosen = _select(r, args)
            done = retry(r, chosen) if args.action == "retry" else drop(r, chosen)
            verb = "requeued" if args.action == "retry" else "dropped"
            _emit(done, args.json, lambda: print(f"{verb} {len(done)} dead letter(s)"
                                                 + "".join(f"\n  {d['id']} ({d['kind']} {d['model']})"
                                                           for d in done)))
    except KeyboardInterrupt:
        return 0
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        print(f"axion: cannot reach Redis: {exc}", file=sys.stderr)
        return 1
    except ResponseError as exc:
        print(f"axion: Redis refused: {exc}", file=sys.stderr)
        return 1
    return 0
