"""The engine as a real subprocess (`multimodal-engine serve` or `dev`), its output read
line by line so tests wait on what it says, never on the clock."""

from __future__ import annotations

import asyncio
import os
import re
import signal
import sys
from collections.abc import Callable
from pathlib import Path

__all__ = ["LINE_LIMIT", "EngineProcess"]

# The longest output line read whole (asyncio's default, 64 KiB, is less than one DEBUG
# line of aiokafka's can be; a longer line would end the reader and hide what follows).
LINE_LIMIT = 16 * 2**20

# the line each command prints once it serves; its group 1 is the HTTP URL
_SERVING = {"serve": re.compile(r"engine serving: kafka=\S+ http=(\S+)"),
            "dev": re.compile(r"^\s+http\s+(http://\S+)")}


class EngineProcess:
    def __init__(self, env: dict[str, str], cwd: Path, name: str = "engine",
                 command: str = "serve") -> None:
        self.env = {**os.environ, **env}
        self.cwd = cwd
        self.name = name
        self.command = command
        self.lines: list[str] = []
        self.http_url: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Condition()

    async def start(self, timeout: float = 30.0) -> str:
        """Starts the process and waits for the line saying it serves; returns its HTTP
        URL."""
        await self.launch()
        serving = _SERVING[self.command]
        line = await self.wait_for_line(lambda text: serving.search(text) is not None, timeout)
        match = serving.search(line)
        assert match is not None
        self.http_url = match.group(1)
        return self.http_url

    async def launch(self) -> None:
        """Starts the process without waiting for anything it says."""
        script = Path(sys.executable).with_name("multimodal-engine")
        self._proc = await asyncio.create_subprocess_exec(
            str(script), self.command, cwd=self.cwd, env=self.env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
            limit=LINE_LIMIT,
        )
        self._reader = asyncio.create_task(self._read())

    @property
    def pid(self) -> int:
        assert self._proc is not None
        return self._proc.pid

    async def _read(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        while line := await self._proc.stdout.readline():
            async with self._changed:
                self.lines.append(line.decode(errors="replace").rstrip())
                self._changed.notify_all()
        async with self._changed:
            self._changed.notify_all()

    async def wait_for_line(self, predicate: Callable[[str], bool], timeout: float,
                            after: int = 0) -> str:
        """Waits for a line (from index ``after`` on) that satisfies ``predicate``."""
        async def find() -> str:
            async with self._changed:
                while True:
                    for line in self.lines[after:]:
                        if predicate(line):
                            return line
                    if self._reader is not None and self._reader.done():
                        raise AssertionError(f"{self.name} exited:\n" + "\n".join(self.lines[-30:]))
                    await self._changed.wait()
        try:
            return await asyncio.wait_for(find(), timeout)
        except TimeoutError:
            raise AssertionError(f"{self.name}: no such line within {timeout}s:\n"
                                 + "\n".join(self.lines[-30:])) from None

    def send_signal(self, sig: signal.Signals) -> None:
        assert self._proc is not None
        self._proc.send_signal(sig)

    async def wait(self, timeout: float = 30.0) -> int:
        assert self._proc is not None
        code = await asyncio.wait_for(self._proc.wait(), timeout)
        if self._reader is not None:
            await asyncio.wait_for(self._reader, timeout)
        return code

    async def stop(self) -> None:
        """Kills the process if it still runs (test clean-up)."""
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        if self._reader is not None:
            self._reader.cancel()
            await asyncio.gather(self._reader, return_exceptions=True)
