"""Configuration errors and dotted `key=value` overrides, shared by every config section and CLI."""

from __future__ import annotations

from typing import Any

import yaml

from eve_ds.utils.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration key or value that cannot be used; the message names it."""


def check(ok: bool, key: str, value: Any, expected: str) -> None:
    """Raise ConfigError("KEY=VALUE is invalid: expected EXPECTED") unless `ok`."""
    if not ok:
        raise ConfigError(f"{key}={value!r} is invalid: expected {expected}")


def parse_override(item: str) -> tuple[list[str], Any]:
    """`"a.b.c=value"` -> (["a", "b", "c"], value parsed as YAML: numbers, lists, null, strings)."""
    key, sep, value = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} is not of the form key=value (e.g. optim.lr=2e-4)")
    return key.strip().split("."), yaml.safe_load(value)


def apply_override(raw: dict, item: str) -> None:
    """Set the dotted key of `item` in the nested dict `raw`, creating sections as needed."""
    parts, value = parse_override(item)
    node = raw
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {item!r}: {p} is not a section")
    node[parts[-1]] = value
