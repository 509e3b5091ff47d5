"""What a Hugging Face Hub repository id may look like (models, datasets, push targets alike)."""

from __future__ import annotations

import re

# "name" or "owner/name", the characters the Hub allows, no "..", no leading "-" or ".".
_REPO_ID = re.compile(r"^(?:[A-Za-z0-9][A-Za-z0-9_.-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9_.-]{0,95}$")


def repo_id_problem(value: str) -> str | None:
    """None for a well-formed repo id, else what is wrong with it, in words."""
    if not _REPO_ID.match(value) or ".." in value or value.endswith((".", "-")) or value.endswith(".git"):
        return "must look like 'owner/name' (letters, digits, '-', '_', '.')"
    return None
