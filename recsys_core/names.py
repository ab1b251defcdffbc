"""The name rule for tenants, surfaces and artifact kinds: one definition for the whole product.

Names become path segments (`artifacts/<tenant>/<surface>/<kind>/`), so the rule is also a path-safety rule:
1-64 characters of `A-Z a-z 0-9 . _ -`, and never `.` or `..`, which would walk the tree.
"""

from __future__ import annotations

import re
from typing import Any

NAME_CHARS = "A-Za-z0-9._-"
MAX_NAME_CHARS = 64
# Anchored form, for pandera, polars `str.contains` and JSON Schema (OpenAPI) patterns.
NAME_PATTERN = rf"^[{NAME_CHARS}]{{1,{MAX_NAME_CHARS}}}$"
NAME_RULE = f"1-{MAX_NAME_CHARS} characters of A-Z a-z 0-9 . _ - and not '.' or '..'"
# Used with `fullmatch`, which also refuses a trailing newline (`^...$` with `re.match` would not).
_NAME_RE = re.compile(rf"[{NAME_CHARS}]{{1,{MAX_NAME_CHARS}}}")


class UnsafePathError(ValueError):
    """A name or path that is invalid or would lead outside its root."""


def is_valid_name(value: Any) -> bool:
    """True if `value` is a string that follows the name rule."""
    return isinstance(value, str) and _NAME_RE.fullmatch(value) is not None and value not in (".", "..")


def validate_name(kind_of_name: str, value: Any) -> str:
    """Return `value` if it follows the name rule, else raise `UnsafePathError` saying why."""
    if not isinstance(value, str):
        raise UnsafePathError(f"invalid {kind_of_name} name: expected a string, got {type(value).__name__}")
    if not is_valid_name(value):
        shown = repr(value if len(value) <= 80 else value[:80] + "...")
        raise UnsafePathError(f"invalid {kind_of_name} name {shown}: must be {NAME_RULE}")
    return value
