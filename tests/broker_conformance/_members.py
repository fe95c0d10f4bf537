"""The test's side of a member process (``_member.py``): start it, read its events with
timeouts, kill it, close it."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["Member"]

_SCRIPT = str(Path(__file__).with_name("_member.py"))


class Member:
    """One consumer-group member process; ``events`` keeps every event it reported."""

    def __init__(self, process: asyncio.subprocess.Process, label: str) -> None:
        self.process = process
        self.label = label
        self.events: list[dict[str, Any]] = []
        self.started = time.monotonic()

    @classmethod
    async def spawn(
        cls, label: str, bootstrap: str, topic: str, group: str, session_ms: int,
        heartbeat_ms: int, security: str = "plaintext",
    ) -> Member:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            _SCRIPT,
            bootstrap,
            topic,
            group,
            str(session_ms),
            str(heartbeat_ms),
            security,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        return cls(process, label)

    async def wait_assignment(
        self, accept: Callable[[list[int]], bool], timeout: float
    ) -> list[int]:
        """Read events until an assignment satisfies ``accept``; return it. Raises
        ``AssertionError`` listing the events seen when the member exits or ``timeout``
        seconds pass first."""
        assert self.process.stdout is not None
        try:
            async with asyncio.timeout(timeout):
                while True:
                    line = await self.process.stdout.readline()
                    if not line:
                        raise AssertionError(
                            f"member {self.label} exited ({await self.process.wait()}) "
                            f"after events {self.events}"
                        )
                    event = json.loads(line)
                    self.events.append(event)
                    if event["event"] == "assigned":
                        partitions = [int(p) for p in event["partitions"]]
                        if accept(partitions):
                            return partitions
        except TimeoutError:
            raise AssertionError(
                f"member {self.label}: no accepted assignment within {timeout:g} s; "
                f"events {self.events}"
            ) from None

    async def kill(self) -> None:
        """SIGKILL, as a crash: no LeaveGroup, no commit."""
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGKILL)
        await self.process.wait()

    async def close(self, timeout: float = 10.0) -> None:
        """Ask it to leave (end of stdin); SIGKILL it if it has not exited in ``timeout``."""
        if self.process.returncode is None and self.process.stdin is not None:
            self.process.stdin.close()
        try:
            await asyncio.wait_for(self.process.wait(), timeout)
        except TimeoutError:
            await self.kill()
