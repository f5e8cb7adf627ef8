"""The docs pages that come from the code: the settings table must match `Settings`, and the endpoint table is the
served OpenAPI document's (`devtools/docs_hooks.py`; `make test` builds the whole site with warnings as errors)."""

from __future__ import annotations

from pathlib import Path

import pytest
from mkdocs.exceptions import PluginError

from devtools.docs_hooks import check_settings_table, endpoint_table

CONFIGURATION = Path(__file__).resolve().parents[1] / "docs" / "configuration.md"


def test_the_settings_table_lists_every_setting_once() -> None:
    page = CONFIGURATION.read_text()
    check_settings_table(page)
    row = next(line for line in page.splitlines() if line.startswith("| `MAX_SEQ_LEN`"))
    with pytest.raises(PluginError, match="MAX_SEQ_LEN"):
        check_settings_table(page.replace(row + "\n", ""))
    with pytest.raises(PluginError, match="listed twice"):
        check_settings_table(page.replace(row, row + "\n" + row))


def test_the_endpoint_table_is_the_openapi_documents() -> None:
    table = endpoint_table()
    for row in ("| POST | `/v1/responses` | `ResponsesRequest` |", "| POST | `/v1/files` | `multipart` |",
                "| GET | `/version` |"):
        assert row in table


def test_the_settings_tables_defaults_are_the_codes() -> None:
    page = CONFIGURATION.read_text()
    with pytest.raises(PluginError, match="MAX_SEQ_LEN says `8192`"):
        check_settings_table(page.replace("| `MAX_SEQ_LEN` | `4096` |", "| `MAX_SEQ_LEN` | `8192` |"))
