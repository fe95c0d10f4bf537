"""Where a running ``dev`` says what it started, so ``send`` finds it without configuration.

A small JSON file (``~/.cache/multimodal-engine/dev.json``, or ``$MULTIMODAL_ENGINE_STATE``)
holding the broker address, the HTTP URL, the topic prefix and the dev process' pid.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

__all__ = ["DevState", "clear_state", "read_state", "state_path", "write_state"]


@dataclass(frozen=True)
class DevState:
    pid: int
    bootstrap_servers: str
    http_url: str
    topic_prefix: str


def state_path() -> Path:
    override = os.environ.get("MULTIMODAL_ENGINE_STATE")
    if override:
        return Path(override)
    return Path.home() / ".cache" / "multimodal-engine" / "dev.json"


def write_state(state: DevState) -> Path:
    path = state_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state)))
    tmp.replace(path)
    return path


def read_state() -> DevState | None:
    """The state of a ``dev`` process that is still alive, else None."""
    try:
        data = json.loads(state_path().read_text())
        state = DevState(**data)
    except (OSError, ValueError, TypeError):
        return None
    try:
        os.kill(state.pid, 0)
    except ProcessLookupError:
        return None
    except PermissionError:
        pass
    return state


def clear_state(pid: int) -> None:
    """Removes the file if it is still the one this process wrote."""
    path = state_path()
    try:
        if json.loads(path.read_text()).get("pid") == pid:
            path.unlink()
    except (OSError, ValueError):
        pass
