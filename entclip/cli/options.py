"""Options that set a config key take their help from the config field: one text, in one place."""

from __future__ import annotations

from entclip.contracts.config import FIELDS
from entclip.core.registry import METHODS


def method_choices() -> tuple[str, ...]:
    """The entropy-control methods, as the method registry declares them (the Config field's choices)."""
    return tuple(METHODS)


def config_help(key: str) -> str:
    """The help of config key `key`, as `entclip train --help-config` shows it (entropy_control's names
    every method with a few words, from the registry)."""
    return FIELDS[key].metadata["help"]
