"""Config switches read as meant when they arrive from the command line as text."""

from __future__ import annotations

from typing import Any

__all__ = ["as_flag"]

_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "none", "null", "")


def as_flag(value: Any) -> bool:
    """A config switch as a bool, also when it comes from the command line as text.

    ``python -m monai.bundle run ... --tta_flip false`` hands the config the *string* ``"false"`` (Fire only
    converts ``False``), and ``bool("false")`` is True; this reads ``true/false/yes/no/on/off/1/0`` as meant.
    """
    if isinstance(value, str):
        text = value.strip().lower()
        if text in _TRUE:
            return True
        if text in _FALSE:
            return False
        raise ValueError(f"expected a true/false switch, got {value!r}")
    return bool(value)
