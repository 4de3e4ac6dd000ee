"""Reading the environment settings the runtime takes (MOA_ATTENTION_BACKEND, MOA_DECODE_LOADS, ...):
one checked reader, so a bad value is one located line from every command (``SettingError``)."""

from __future__ import annotations

import os

from moa_plan.errors import SettingError


def env_choice(env: str, allowed: tuple[str, ...], default: str | None = None) -> str:
    """The value of ``env`` (stripped, lower case; unset or empty: ``default``, else allowed[0]),
    one of ``allowed``, else SettingError."""
    default = allowed[0] if default is None else default
    value = os.environ.get(env, default).strip().lower() or default
    if value not in allowed:
        raise SettingError(env, value, f"must be one of {', '.join(allowed)} (unset: {default})")
    return value
