"""Who may call the admin endpoints: ADMIN_API_KEYS, else API_KEYS; never a tenant's stored key; nobody when
no key is configured."""

from __future__ import annotations

import pytest

from api import auth
from api.admin import check_admin
from api.errors import APIError
from common.settings import load_settings


def refused(settings_env: dict[str, str], header: str | None, principal: auth.Principal | None = None) -> int | None:
    token = auth.current.set(principal)
    try:
        check_admin(load_settings(settings_env), header)
        return None
    except APIError as exc:
        return exc.status
    finally:
        auth.current.reset(token)


@pytest.mark.parametrize(("env", "header", "principal", "status"), [
    ({}, "Bearer anything", None, 403),  # no keys configured: off for everyone
    ({"ADMIN_API_KEYS": "adm"}, "Bearer adm", None, None),
    ({"ADMIN_API_KEYS": "adm"}, None, None, 401),
    ({"ADMIN_API_KEYS": "adm", "API_KEYS": "ops"}, "Bearer ops", auth.Principal("k-ops"), 403),  # not an admin key
    ({"API_KEYS": "ops, ops2"}, "Bearer ops2", auth.Principal("k-ops2"), None),  # no admin list: API_KEYS are
    ({"API_KEYS": "ops"}, "Bearer tenant-key", auth.Principal("k-tenant", "stored"), 403),  # a stored key
    ({"API_KEYS": "ops"}, "Bearer wrong", auth.Principal("anonymous"), 401),
])
def test_admin_keys(env: dict[str, str], header: str | None, principal: auth.Principal | None,
                    status: int | None) -> None:
    assert refused(env, header, principal) == status


def test_an_admin_key_passes_the_guard_when_api_keys_are_required() -> None:
    import asyncio

    authenticator = auth.Authenticator(load_settings({"API_KEYS": "ops", "ADMIN_API_KEYS": "adm"}), None)  # type: ignore[arg-type]
    principal = asyncio.run(authenticator.authenticate("Bearer adm"))
    assert principal.models is None
    with pytest.raises(APIError):
        asyncio.run(authenticator.authenticate("Bearer neither"))  # refused (a 503 here: no Redis to look it up)
