"""The engine's version, as recorded in every result and in the checkpoints it writes."""

from __future__ import annotations


def package_version() -> str:
    """The installed qaas version ("unknown" when the package metadata is not installed, e.g. on a machine
    that imports the source tree directly)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("qaas")
    except PackageNotFoundError:
        return "unknown"
