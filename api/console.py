"""`/console`: a web page for people, served by the API. A playground (pick a model, stream a chat answer, set
the sampling parameters) and a live fleet view (workers, their models, batch occupancy, tokens/s, queue depths,
dead letters), refreshed every two seconds.

The page itself holds no data and is open to all (a browser cannot send a key to load it); what it reads is not:
the playground calls the API with the key typed into the page, and the fleet view (`/console/fleet`) needs an
admin key whenever keys are set (`api/admin.py`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from litestar import Request, Response, get
from litestar.datastructures import State

from api import health
from api.admin import check_admin
from api.auth import CONSOLE_PAGE

PAGE = Path(__file__).with_name("static") / "console.html"


@get(CONSOLE_PAGE, include_in_schema=False)
async def console_page() -> Response[bytes]:
    return Response(PAGE.read_bytes(), media_type="text/html; charset=utf-8")


@get(f"{CONSOLE_PAGE}/fleet", include_in_schema=False)
async def console_fleet(request: Request[Any, Any, State], state: State) -> dict[str, Any]:
    """The fleet as /health/ready sees it; behind the admin key when keys are set."""
    ctx = state.chat
    if ctx.settings.auth_required:
        check_admin(ctx.settings, request.headers.get("authorization"))
    _, body = await health.readiness(ctx.settings, ctx.redis, ctx.registry, ctx.hub, ctx.open_requests)
    return body
