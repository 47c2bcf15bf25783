"""Options that set a config key take their help from the config field: one text, in one place."""

from __future__ import annotations

import typing

from entclip.contracts.config import FIELDS, Config


def method_choices() -> tuple[str, ...]:
    """The entropy-control methods, in the order the Config field's Literal lists them."""
    return typing.get_args(typing.get_type_hints(Config)["entropy_control"])


def config_help(key: str) -> str:
    """The help of config key `key`, as `entclip train --help-config` shows it."""
    text = FIELDS[key].metadata["help"]
    if key == "entropy_control":
        text += "; one of " + " | ".join(method_choices())
    return text
