"""MkDocs hooks (mkdocs.yml `hooks`): the pages that come from the code. The API reference's endpoint table is
rendered from the OpenAPI document the server serves; the settings table must list every field of `Settings`
once and nothing else (the build fails otherwise)."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from mkdocs.exceptions import PluginError

ENDPOINTS_MARK = "<!-- endpoints: generated from the OpenAPI document -->"
SETTING_ROW = re.compile(r"^\| `([A-Z0-9_]+)` \|", re.MULTILINE)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if page.file.src_uri == "configuration.md":
        check_settings_table(markdown)
    if ENDPOINTS_MARK in markdown:
        markdown = markdown.replace(ENDPOINTS_MARK, endpoint_table())
    return markdown


def check_settings_table(markdown: str) -> None:
    from common.settings import Settings

    documented = SETTING_ROW.findall(markdown)
    fields = {f.name.upper() for f in msgspec.structs.fields(Settings)}
    twice = sorted({name for name in documented if documented.count(name) > 1})
    missing, unknown = sorted(fields - set(documented)), sorted(set(documented) - fields)
    if twice or missing or unknown:
        raise PluginError(f"configuration.md's settings table: missing {missing}, not settings {unknown}, "
                          f"listed twice {twice}")


def endpoint_table() -> str:
    """Every operation of the served OpenAPI document: method, path, request body and the first line of its
    description."""
    from api.app import create_app
    from api.openapi import add_request_bodies
    from batches.routes import EXTENSION
    from common.settings import load_settings

    app = create_app(load_settings({}), extensions=[EXTENSION])
    doc = add_request_bodies(app.openapi_schema.to_schema(), [EXTENSION])
    rows = ["| method | path | request body | what it does |", "|---|---|---|---|"]
    for path, item in sorted(doc["paths"].items()):
        for method, operation in item.items():
            if not isinstance(operation, dict) or "responses" not in operation:
                continue
            content = operation.get("requestBody", {}).get("content", {})
            schema = next(iter(content.values()), {}).get("schema", {}) if content else {}
            body = schema.get("$ref", "").rsplit("/", 1)[-1] or ("multipart" if "multipart/form-data" in content
                                                                  else "")
            what = (operation.get("description") or operation.get("summary") or "").strip().split("\n")[0]
            rows.append(f"| {method.upper()} | `{path}` | {f'`{body}`' if body else ''} | {what} |")
    return "\n".join(rows)
