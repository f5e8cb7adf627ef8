"""MkDocs hooks (mkdocs.yml `hooks`): the pages that come from the code. The API reference's endpoint table is
rendered from the OpenAPI document the server serves; the settings table must list every field of `Settings`
once and nothing else (the build fails otherwise)."""

from __future__ import annotations

import re
from typing import Any

import msgspec
from mkdocs.exceptions import PluginError

ENDPOINTS_MARK = "<!-- endpoints: generated from the OpenAPI document -->"
SETTING_ROW = re.compile(r"^\| `([A-Z0-9_]+)` \| ([^|]*) \|", re.MULTILINE)


def on_page_markdown(markdown: str, page: Any, **_: Any) -> str:
    if page.file.src_uri == "configuration.md":
        check_settings_table(markdown)
    if ENDPOINTS_MARK in markdown:
        markdown = markdown.replace(ENDPOINTS_MARK, endpoint_table())
    return markdown


def check_settings_table(markdown: str) -> None:
    from common.settings import Settings

    rows = SETTING_ROW.findall(markdown)
    documented = [name for name, _ in rows]
    fields = {f.name.upper(): f for f in msgspec.structs.fields(Settings)}
    twice = sorted({name for name in documented if documented.count(name) > 1})
    missing, unknown = sorted(set(fields) - set(documented)), sorted(set(documented) - set(fields))
    wrong = [f"{name} says {shown.strip()}, the code {_default(fields[name])}" for name, shown in rows
             if name in fields and not _same_default(shown.strip().strip("`"), fields[name], fields)]
    if twice or missing or unknown or wrong:
        raise PluginError(f"configuration.md's settings table: missing {missing}, not settings {unknown}, "
                          f"listed twice {twice}, defaults {wrong}")


def _default(field: Any) -> str:
    """A setting's default as the table writes it: `unset`, `true`, 30, 0.5, a text."""
    value = None if field.default is msgspec.NODEFAULT else field.default
    if value is None or value == "":
        return "unset"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _same_default(shown: str, field: Any, fields: dict[str, Any]) -> bool:
    """The table's default is the code's, or (for an unset one) the setting it falls back to."""
    code = _default(field)
    return shown == code or (code == "unset" and shown in fields)


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
            schema = next(iter(content.values())).get("schema", {}) if content else {}
            body = schema.get("$ref", "").rsplit("/", 1)[-1] or ("multipart" if "multipart/form-data" in content
                                                                  else "")
            what = (operation.get("description") or operation.get("summary") or "").strip().split("\n")[0]
            rows.append(f"| {method.upper()} | `{path}` | {f'`{body}`' if body else ''} | {what} |")
    return "\n".join(rows)
