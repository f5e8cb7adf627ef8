"""What /v1/models lists: one card per model a live worker serves, and one per alias of such a model.

Only heartbeats count, so a model shows up once a worker has loaded and warmed it and disappears as soon as its
last worker withdraws it (before draining, in a hot swap): a listed model can always serve.
"""

from __future__ import annotations

from api import aliases, auth
from api.protocol import Model
from common.protocol import WorkerInfo

#: A worker kind as /v1/models names it (OpenAI's own word for embedding models).
KIND_NAMES = {"chat": "chat", "embed": "embedding", "rerank": "rerank"}
OWNER = "axion"


def model_cards(workers: list[WorkerInfo], alias_setting: str) -> list[Model]:
    by_model: dict[str, list[WorkerInfo]] = {}
    for w in workers:
        by_model.setdefault(w.model, []).append(w)
    cards = []
    for model, serving in sorted(by_model.items()):
        kind = ",".join(sorted({KIND_NAMES.get(w.kind, w.kind) for w in serving}))
        backend = ",".join(sorted({w.backend for w in serving if w.backend})) or None
        reason = "; ".join(sorted({w.backend_reason for w in serving if w.backend_reason})) or None
        created = int(min(w.started for w in serving))
        if auth.may_use(model):
            cards.append(Model(model, "model", created, OWNER, kind, backend, None, reason))
        cards += [Model(alias, "model", created, OWNER, kind, backend, model, reason)
                  for alias in aliases.aliases_of(alias_setting, model) if auth.may_use(model)]
    # Chat models first: clients that take the first model listed (guidellm) must not pick an embedding model.
    return sorted(cards, key=lambda card: (card.kind != "chat", card.id))
