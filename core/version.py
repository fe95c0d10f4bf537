"""The engine's version, as installed: what ``engine_build_info`` and the API documents say."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

__all__ = ["DISTRIBUTION", "engine_version"]

DISTRIBUTION = "multimodal-engine"


def engine_version() -> str:
    """The installed distribution's version, or ``"unknown"`` when the code runs from a
    source tree that was never installed (never raises)."""
    try:
        return version(DISTRIBUTION)
    except PackageNotFoundError:
        return "unknown"
