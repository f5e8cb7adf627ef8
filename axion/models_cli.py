"""`axion models list|load|unload`: which worker serves what, and hot swap from a shell (REDIS_URL, no API).

`load MODEL [--worker ID] [--kind chat|embed|rerank] [--as NAME]` and `unload MODEL [--worker ID]` send a command
to the workers' control streams (`common/control.py`) and, unless `--no-wait`, wait until the fleet's
heartbeats show it done: the model served by the worker (load), or by none of them (unload). A failed load
shows as the worker's `last_error`. The README section "Several models" gives the `redis-cli` equivalents.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import redis

from common import control, ops
from common.model_ids import load_problem
from common.settings import Settings, split_list

POLL_S = 0.25


def rows(r: redis.Redis) -> list[dict[str, Any]]:
    return [{"worker_id": w.worker_id, "kind": w.kind, "model": w.model or "(idle)", "backend": w.backend,
             "loading": w.loading or None, "params_bytes": w.params_bytes,
             "load_rss_delta_bytes": w.load_rss_delta_bytes, "load_s": w.load_s, "last_error": w.last_error or None}
            for w in ops.workers(r)]


def wait(r: redis.Redis, command: control.Command, targets: list[str], timeout: float) -> tuple[bool, str]:
    """Poll the heartbeats until every target has done `command`; (done, why not) at the deadline or on an error."""
    served = command.served_name or command.model
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        live = {w.worker_id: w for w in ops.workers(r)}
        mine = [live.get(t) for t in targets]
        errors = [w.last_error for w in mine if w is not None and w.last_error and command.model in w.last_error]
        if errors:
            return False, errors[0]
        if command.action == "load" and all(w is not None and w.model == served and not w.loading for w in mine):
            return True, ""
        # A withdrawn worker has no heartbeat while it drains: done once it beats again, serving something else.
        if command.action == "unload" and all(w is not None and w.model != command.model for w in mine):
            return True, ""
        time.sleep(POLL_S)
    return False, f"not done within {timeout:g}s (the command stays queued; see `axion models list`)"


def main(argv: list[str], settings: Settings) -> int:
    parser = argparse.ArgumentParser(prog="axion models", epilog=ops.REDIS_SETTINGS,
                                     description="Hot swap: list the models of running workers, load or unload one.")
    parser.add_argument("action", choices=["list", "load", "unload"])
    parser.add_argument("model", nargs="?")
    parser.add_argument("--worker", help="the worker id (`axion models list`); default: see the README")
    parser.add_argument("--kind", choices=["chat", "embed", "rerank"], help="load: the kind of model")
    parser.add_argument("--as", dest="served_name", help="load (chat): the id clients use for it")
    parser.add_argument("--no-wait", action="store_true", help="send the command and return")
    parser.add_argument("--timeout", type=float, default=600.0, help="longest wait in seconds (default 600)")
    parser.add_argument("--json", action="store_true", help="machine-readable output")
    args = parser.parse_args(argv)
    r = ops.connect(settings.redis_url)
    try:
        if args.action == "list":
            found = rows(r)
            print(json.dumps(found, indent=2) if args.json else ops.table(found, list(found[0]) if found else
                                                                            ["worker_id", "kind", "model"]))
            return 0
        if not args.model:
            parser.error(f"{args.action}: give the model")
        if args.action == "load":
            problem = load_problem(args.model, allow_paths=settings.allow_model_paths,
                                   patterns=split_list(settings.model_allowlist))
            if problem:
                print(f"axion: cannot load {args.model!r}: {problem}", file=sys.stderr)
                return 2
        command = control.new_command(args.action, args.model, args.kind, args.served_name)
        try:
            targets = control.plan(command, ops.workers(r), args.worker)
        except control.PlanError as exc:
            print(f"axion: {exc.message}", file=sys.stderr)
            return 1
        if not targets:
            print(f"{command.served_name or command.model} is served already")
            return 0
        control.queue(r.pipeline(transaction=False), command, targets).execute()
        print(f"sent {args.action} {args.model} to {', '.join(targets)} (command {command.id})")
        if args.no_wait:
            return 0
        done, why = wait(r, command, targets, args.timeout)
        print("done" if done else f"axion: {why}", file=sys.stdout if done else sys.stderr)
        return 0 if done else 1
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        print(f"axion: cannot reach Redis: {exc}", file=sys.stderr)
        return 1
