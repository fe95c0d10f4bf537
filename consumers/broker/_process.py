"""A broker's child process: its own process group, stderr to a log file, a clean stop,
and (on Linux) its death with the parent's, however the parent ends."""

from __future__ import annotations

import ctypes
import functools
import logging
import os
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import IO

__all__ = ["ChildProcess"]

logger = logging.getLogger(__name__)

_TAIL_BYTES = 4000
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl() -> Callable[..., int] | None:
    """libc's ``prctl``, looked up in the parent (the child between fork and exec must
    not load libraries); None off Linux or without it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None


def _die_with_parent(prctl: Callable[..., int], parent: int) -> None:
    """In the child before exec: SIGTERM when the parent dies, even by SIGKILL (no
    ``stop()``, no atexit runs then). Should the parent have died before this call, the
    signal would never come: the child leaves at once instead."""
    prctl(_PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)


class _Spawner:
    """Starts children from one thread that lives as long as the process: the kernel sends
    the parent-death signal when the *thread* that forked the child ends, so a child
    started from a worker thread (``asyncio.to_thread``, a pool) would die with that
    thread. The main thread starts its children itself."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[tuple[Callable[[], subprocess.Popen[bytes]],
                                            Future[subprocess.Popen[bytes]]]] \
            = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None

    def spawn(self, start: Callable[[], subprocess.Popen[bytes]]) -> subprocess.Popen[bytes]:
        if threading.current_thread() is threading.main_thread():
            return start()
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._serve, name="child-spawner",
                                                daemon=True)
                self._thread.start()
        done: Future[subprocess.Popen[bytes]] = Future()
        self._jobs.put((start, done))
        return done.result()

    def _serve(self) -> None:
        while True:
            start, done = self._jobs.get()
            try:
                done.set_result(start())
            except (OSError, ValueError, subprocess.SubprocessError) as exc:  # Popen's own
                done.set_exception(exc)  # raised in the caller's thread


_SPAWNER = _Spawner()


class ChildProcess:
    """One started child. Its stderr goes to a temporary log file that :meth:`stop`
    removes; ``stdin``/``stdout`` are pipes only when asked for.

    The child leads its own process group (``start_new_session``) so that a Ctrl-C in the
    terminal reaches the parent alone, and the parent decides how the broker stops. On
    Linux it gets SIGTERM when the parent dies (``PR_SET_PDEATHSIG``), so that not even a
    SIGKILLed parent leaves it running, holding its port and memory.
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
        prctl = _prctl()
        before_exec = None if prctl is None else functools.partial(_die_with_parent, prctl,
                                                                   os.getpid())

        def start() -> subprocess.Popen[bytes]:
            return subprocess.Popen(
                list(argv),
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stderr=fd,
                env=dict(env) if env is not None else None,
                start_new_session=True,
                close_fds=True,
                # safe with threads here: it takes no lock, only calls prctl and getppid
                preexec_fn=before_exec,  # noqa: PLW1509
            )

        try:
            self.popen: subprocess.Popen[bytes] = _SPAWNER.spawn(start)
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
