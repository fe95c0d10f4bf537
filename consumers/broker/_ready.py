"""Wait until a freshly started broker child answers Kafka requests, or say why not."""

from __future__ import annotations

import subprocess
import time

from ._probe import ProbeError, api_versions
from ._process import ChildProcess
from .base import BrokerStartError

__all__ = ["wait_until_ready"]

_RETRY_PAUSE_S = 0.02


def wait_until_ready(
    child: ChildProcess, host: str, port: int, timeout: float
) -> dict[int, tuple[int, int]]:
    """Probe ``host:port`` with ApiVersions until it answers; return the advertised versions.

    Raises :class:`BrokerStartError` with the child's stderr tail when the child exits
    first or nothing answers within ``timeout`` seconds (the child is left to the caller).
    """
    deadline = time.monotonic() + timeout
    last_error: ProbeError | None = None
    while True:
        if not child.alive():
            raise BrokerStartError(
                f"{child.name} exited with status {child.popen.returncode} before answering "
                f"Kafka requests on {host}:{port}",
                child.stderr_tail(),
            )
        remaining = deadline - time.monotonic()
        try:
            return api_versions(host, port, timeout=max(0.05, min(1.0, remaining)))
        except ProbeError as exc:
            last_error = exc
        if time.monotonic() >= deadline:
            raise BrokerStartError(
                f"{child.name} did not answer Kafka requests on {host}:{port} within "
                f"{timeout:g} s (last attempt: {last_error})",
                child.stderr_tail(),
            )
        try:
            # The pause between attempts doubles as a watch for the child's death.
            child.popen.wait(_RETRY_PAUSE_S)
        except subprocess.TimeoutExpired:
            pass
