"""Readable messages for validation errors: one line per field, with its dotted path and the value."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError


class FieldError(ValueError):
    """A check across fields that blames one of them.

    Raised from a model validator, it lets the message name ``field`` (dotted,
    relative to the model that raised it) and its ``value`` instead of the whole model.
    """

    def __init__(self, field: str, value: Any, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.value = value


def field_path(location: tuple) -> str:
    return ".".join(str(part) for part in location) or "(root)"


def _shown(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:77] + "..."


def format_validation_error(error: ValidationError, prefix: str = "") -> str:
    lines = []
    for item in error.errors():
        location = tuple(p for p in item["loc"] if p not in ("function-after", "function-before"))
        value = item.get("input")
        cause = (item.get("ctx") or {}).get("error")
        if isinstance(cause, FieldError):
            location += tuple(cause.field.split("."))
            value = cause.value
        path = field_path((*prefix.split("."), *location) if prefix else location)
        message = item["msg"].removeprefix("Value error, ")
        if path == "(root)":
            lines.append(message)
        elif item["type"] == "missing":
            lines.append(f"{path}: field required")
        elif item["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key (value {_shown(value)}); remove it or fix its spelling")
        else:
            lines.append(f"{path}: {message} (got {_shown(value)})")
    return "\n".join(lines)
