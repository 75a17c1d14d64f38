"""Names of adapters, configs and aliases: safe as folder and file names."""

from __future__ import annotations

import re

from lqmf.core.errors import InputError

NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")  # fullmatch: a trailing $ matches before a final newline
MAX_NAME_LENGTH = 100


def validate_name(name: str, kind: str = "adapter") -> str:
    """Return name if it is a safe single path component, else raise InputError."""
    if not name:
        raise InputError(f"{kind} name is empty")
    if len(name) > MAX_NAME_LENGTH:
        raise InputError(f"{kind} name '{name[:20]}...' is longer than {MAX_NAME_LENGTH} characters")
    if "/" in name or "\\" in name:
        raise InputError(f"{kind} name '{name}' contains a path separator")
    if ".." in name:
        raise InputError(f"{kind} name '{name}' contains '..'")
    if not NAME_PATTERN.fullmatch(name):
        raise InputError(
            f"{kind} name {name!r} is not allowed: use letters, digits, '.', '_' and '-', "
            "starting with a letter or digit"
        )
    return name


def slug(text: str) -> str:
    """A name-safe form of free text (for default adapter names)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-._")
    return cleaned or "model"
