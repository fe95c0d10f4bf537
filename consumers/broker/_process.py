"""A broker's child process: its own process group, stderr to a log file, a clean stop."""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO

__all__ = ["ChildProcess"]

logger = logging.getLogger(__name__)

_TAIL_BYTES = 4000
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


class ChildProcess:
    """One started child. Its stderr goes to a temporary log file that :meth:`stop`
    removes; ``stdin``/``stdout`` are pipes only when asked for.

    The child leads its own process group (``start_new_session``) so that a Ctrl-C in the
    terminal reaches the parent alone, and the parent decides how the broker stops.
    Raises ``OSError`` from the constructor when the executable cannot be started.
    """

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        pipes: bool = False,
        env: Mapping[str, str] | None = None,
    ) -> None:
        fd, log_name = tempfile.mkstemp(prefix=f"{name}-", suffix=".log")
        self.log_path = Path(log_name)
        try:
            self.popen: subprocess.Popen[bytes] = subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stderr=fd,
                env=dict(env) if env is not None else None,
                start_new_session=True,
                close_fds=True,
            )
        except OSError:
            self.log_path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        logger.debug("started %s as pid %d, log %s", name, self.popen.pid, self.log_path)
        self.name = name

    @property
    def stdin(self) -> IO[bytes]:
        assert self.popen.stdin is not None, "started without pipes"
        return self.popen.stdin

    @property
    def stdout(self) -> IO[bytes]:
        assert self.popen.stdout is not None, "started without pipes"
        return self.popen.stdout

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stderr_tail(self) -> str:
        """The last few KB of the child's stderr ("" when the log is gone)."""
        try:
            with self.log_path.open("rb") as log:
                size = log.seek(0, os.SEEK_END)
                log.seek(max(0, size - _TAIL_BYTES))
                return _ANSI.sub("", log.read().decode("utf-8", errors="replace"))
        except OSError:
            return ""

    def stop(self, timeout: float, *, grace: float = 0.0, keep_log: bool = False) -> int | None:
        """Close the pipes and give the child ``grace`` seconds to leave on its own, then
        SIGTERM its process group and SIGKILL it after ``timeout`` seconds more. Returns
        the exit status (``None`` if even SIGKILL did not reap it). Idempotent."""
        for stream in (self.popen.stdin, self.popen.stdout):
            if stream is not None and not stream.closed:
                try:
                    stream.close()
                except OSError:  # broken pipe to a dead child
                    pass
        if grace > 0:
            try:
                self.popen.wait(grace)
            except subprocess.TimeoutExpired:
                pass
        if self.popen.poll() is None:
            self._signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                logger.warning(
                    "%s (pid %d) ignored SIGTERM for %.1f s; sending SIGKILL",
                    self.name,
                    self.popen.pid,
                    timeout,
                )
                self._signal(signal.SIGKILL)
                try:
                    self.popen.wait(5.0)
                except subprocess.TimeoutExpired:
                    logger.error("%s (pid %d) survived SIGKILL", self.name, self.popen.pid)
        if not keep_log:
            self.log_path.unlink(missing_ok=True)
        return self.popen.returncode

    def _signal(self, signum: signal.Signals) -> None:
        # Only while the leader is unreaped: its pid, hence the group id, cannot be reused.
        try:
            os.killpg(self.popen.pid, signum)
        except (ProcessLookupError, PermissionError):
            pass
