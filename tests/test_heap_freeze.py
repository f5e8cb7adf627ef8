"""The worker freezes its heap once a model is loaded (`workers/loading.freeze_heap`): a full collection then
walks only what was made since (205-213 ms of ~420k objects before, ~5 ms after: bench/RESULTS.md, session 13).
An unload must unfreeze first, or a model held in reference cycles would never be collected."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterator
from pathlib import Path

import fakeredis
import pytest

from common.settings import load_settings
from workers import loading


@pytest.fixture
def unfrozen() -> Iterator[None]:
    gc.unfreeze()
    yield
    gc.unfreeze()


def test_a_loaded_worker_is_frozen_and_its_unload_frees_the_model(tiny_model_dir: Path, unfrozen: None) -> None:
    settings = load_settings({"MODEL_NAME": str(tiny_model_dir), "ALLOW_MODEL_PATHS": "true", "DEVICE": "cpu"})
    worker = loading.open_worker(settings, fakeredis.FakeAsyncRedis(), "chat", str(tiny_model_dir))
    assert gc.get_freeze_count() > 0
    model = weakref.ref(worker.backend.engine.model)
    del worker
    loading.free_memory()
    assert model() is None
    assert gc.get_freeze_count() == 0
