"""A vLLM general plugin (entry point `vllm.general_plugins`, loaded by vLLM in each of its processes): vLLM's child
processes (its engine core, its model runner) end when the process that started them dies. vLLM leaves them
running when its frontend, here the chat worker, is killed with SIGKILL, still holding the model and the device's
memory; a worker restarted beside them would find the GPU full."""

from __future__ import annotations

import multiprocessing
import os
import signal
import threading
import time

POLL_S = 0.5


def exit_with_parent() -> None:
    parent = multiprocessing.parent_process()
    if parent is None:  # vLLM's frontend itself (the worker): its life is its supervisor's business
        return
    started_by = parent.pid

    def watch() -> None:
        while os.getppid() == started_by:
            time.sleep(POLL_S)
        os.kill(os.getpid(), signal.SIGKILL)  # reparented: the parent is gone, and nobody will ask for output

    threading.Thread(target=watch, name="axion-parent-watch", daemon=True).start()
