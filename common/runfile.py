"""Where a running `axion serve` says which Redis it uses, so the ops commands on the same machine (`axion status`,
`queues`, `dead-letters`, `models`, `keys`) find its embedded Redis without REDIS_URL.

One JSON file per serving process in AXION_RUN_DIR (default `~/.cache/axion/run`), written at start and removed
at exit; a file whose process is gone (a kill -9) is ignored and removed by the next reader.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path


def run_dir() -> Path:
    return Path(os.environ.get("AXION_RUN_DIR") or Path.home() / ".cache" / "axion" / "run")


def record(redis_url: str, api_url: str) -> Path:
    """Write this process's run file; the caller removes it (`forget`) when it stops."""
    folder = run_dir()
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"serve-{os.getpid()}.json"
    path.write_text(json.dumps({"pid": os.getpid(), "redis_url": redis_url, "api_url": api_url,
                                "started": time.time()}))
    return path


def forget(path: Path) -> None:
    path.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def running() -> list[dict[str, object]]:
    """The live `axion serve` processes of this machine, newest first (stale files removed)."""
    found = []
    for path in sorted(run_dir().glob("serve-*.json")):
        try:
            entry = json.loads(path.read_text())
            live = _alive(int(entry["pid"]))
        except (OSError, ValueError, KeyError, TypeError):
            continue
        if live:
            found.append(entry)
        else:
            path.unlink(missing_ok=True)
    return sorted(found, key=lambda e: -float(e.get("started", 0)))


def redis_url_or_running(configured: str | None) -> str | None:
    """REDIS_URL when set; else the Redis of the `axion serve` running here (said on stderr), else None."""
    if configured:
        return configured
    served = running()
    if not served:
        return None
    newest = served[0]
    also = f"; {len(served) - 1} more running, set REDIS_URL to choose" if len(served) > 1 else ""
    print(f"axion: REDIS_URL is unset; using the Redis of `axion serve` (pid {newest['pid']}, "
          f"{newest['api_url']}): {newest['redis_url']}{also}", file=sys.stderr)
    return str(newest["redis_url"])
