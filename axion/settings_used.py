"""Which settings a process reads, found in its packages' source: every `<...>settings.NAME` attribute read whose
NAME is a field of `Settings`. Shown by `axion COMMAND --help`, so the list follows the code."""

from __future__ import annotations

import ast
from functools import cache
from pathlib import Path

import msgspec

from common.settings import Settings

ROOT = Path(__file__).resolve().parents[1]


def _reads(tree: ast.AST, fields: frozenset[str]) -> set[str]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr in fields:
            owner = node.value
            name = owner.attr if isinstance(owner, ast.Attribute) else getattr(owner, "id", "")
            if name.endswith("settings"):
                found.add(node.attr)
    return found


@cache
def _package_reads(package: str) -> frozenset[str]:
    fields = frozenset(f.name for f in msgspec.structs.fields(Settings))
    found: set[str] = set()
    for path in (ROOT / package).rglob("*.py"):
        found |= _reads(ast.parse(path.read_text(), str(path)), fields)
    return frozenset(found)


def settings_read(packages: tuple[str, ...]) -> list[str]:
    """The environment variables the packages' code reads, upper case as they are set."""
    names: set[str] = set()
    for package in packages:
        names |= _package_reads(package)
    return sorted(name.upper() for name in names)
