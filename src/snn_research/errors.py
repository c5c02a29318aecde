"""Readable messages for validation errors: one line per field, with its dotted path."""

from __future__ import annotations

from pydantic import ValidationError


def field_path(location: tuple) -> str:
    return ".".join(str(part) for part in location) or "(root)"


def format_validation_error(error: ValidationError, prefix: str = "") -> str:
    lines = []
    for item in error.errors():
        path = field_path(tuple(p for p in item["loc"] if p not in ("function-after", "function-before")))
        if prefix:
            path = f"{prefix}.{path}" if path != "(root)" else prefix
        value = item.get("input")
        shown = repr(value) if not isinstance(value, dict) else "{...}"
        if len(shown) > 80:
            shown = shown[:77] + "..."
        message = item["msg"].removeprefix("Value error, ")
        if path == "(root)":
            lines.append(message)
        elif item["type"] == "missing":
            lines.append(f"{path}: field required")
        elif item["type"] == "extra_forbidden":
            lines.append(f"{path}: unknown key (value {shown}); remove it or fix its spelling")
        else:
            lines.append(f"{path}: {message} (got {shown})")
    return "\n".join(lines)
