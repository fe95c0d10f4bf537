"""librdkafka's mock cluster as the embedded broker, hosted by a small child process.

The cluster is driven through its C API (ctypes, in :mod:`._rdkafka_mock_main`) because
it has no Kafka CreateTopics API: topics are created with ``rd_kafka_mock_topic_create``,
asked for over the child's stdin. Measured (docs/brokers.md): idempotent producing works;
transactions do not (no isolation, transactional offsets are lost); a group rebalance
waits the session timeout minus one second, and a follower whose SyncGroup arrives after
the leader's gets INVALID_REQUEST, which with aiokafka is nearly always: use it for
one-member groups only.
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from ._process import ChildProcess
from ._ready import wait_until_ready
from .base import BrokerCapabilities, BrokerError, BrokerStartError, EmbeddedBroker

__all__ = ["RdkafkaMockBroker"]

logger = logging.getLogger(__name__)

_COMMAND_TIMEOUT_S = 10.0
_GRACE_S = 2.0
# The directory that holds the ``consumers`` package, so that ``python -m`` finds it
# whatever the working directory and however the project is installed.
_IMPORT_ROOT = str(Path(__file__).resolve().parents[2])


class RdkafkaMockBroker(EmbeddedBroker):
    """A one-broker librdkafka mock cluster in a child process, on 127.0.0.1.

    Needs confluent-kafka (its wheel bundles librdkafka) or a system librdkafka.
    """

    name = "rdkafka-mock"
    capabilities = BrokerCapabilities(
        idempotent_producer=True, transactions=False, create_topics_api=False
    )

    def __init__(self) -> None:
        self._child: ChildProcess | None = None
        self._bootstrap: str | None = None
        self._buffer = b""
        self._lock = threading.Lock()

    @property
    def bootstrap_servers(self) -> str:
        if self._bootstrap is None:
            raise BrokerError("the rdkafka-mock broker is not started")
        return self._bootstrap

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.alive()

    def start(self, timeout: float = 15.0) -> None:
        with self._lock:
            if self._child is not None:
                raise BrokerError("the rdkafka-mock broker is already started")
            deadline = time.monotonic() + timeout
            env = dict(os.environ)
            env["PYTHONPATH"] = os.pathsep.join(
                p for p in (_IMPORT_ROOT, env.get("PYTHONPATH")) if p
            )
            argv = [sys.executable, "-m", "consumers.broker._rdkafka_mock_main"]
            try:
                child = ChildProcess(argv, name="rdkafka-mock", pipes=True, env=env)
            except OSError as exc:
                raise BrokerStartError(f"cannot start the rdkafka-mock host: {exc}") from exc
            self._child, self._buffer = child, b""
            try:
                line = self._read_line(deadline - time.monotonic(), what="its address")
                word, _, rest = line.partition(" ")
                if word != "READY":
                    raise BrokerStartError(
                        f"rdkafka-mock host failed: {rest or line}", child.stderr_tail()
                    )
                bootstrap, _, version = rest.partition(" ")
                host, _, port = bootstrap.rpartition(":")
                wait_until_ready(child, host, int(port), max(0.1, deadline - time.monotonic()))
            except BaseException:
                self._child = None
                child.stop(2.0)
                raise
            self._bootstrap = bootstrap
            logger.info(
                "rdkafka-mock broker (librdkafka %s) ready on %s (pid %d)",
                version,
                bootstrap,
                child.popen.pid,
            )

    def create_topics(self, names: Sequence[str], partitions: int) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {partitions}")
        with self._lock:
            if self._child is None or not self._child.alive():
                raise BrokerError("the rdkafka-mock broker is not running")
            for name in dict.fromkeys(names):
                if not name or any(c.isspace() for c in name):
                    raise BrokerError(f"invalid topic name {name!r}")
                try:
                    self._child.stdin.write(f"create {partitions} {name}\n".encode())
                    self._child.stdin.flush()
                except OSError as exc:
                    raise BrokerError(f"the rdkafka-mock host is gone: {exc}") from exc
                answer = self._read_line(
                    _COMMAND_TIMEOUT_S, what=f"creating {name!r}", error=BrokerError
                )
                if not answer.startswith("OK"):
                    raise BrokerError(
                        f"rdkafka-mock refused topic {name!r}: {answer.removeprefix('ERR ')}"
                    )

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            child, self._child = self._child, None
            if child is None:
                return
            # Closing stdin asks the host to destroy the cluster and exit by itself.
            status = child.stop(timeout, grace=_GRACE_S)
            logger.info("rdkafka-mock broker %s stopped (status %s)", self._bootstrap, status)
            self._bootstrap = None

    def _read_line(
        self, timeout: float, *, what: str, error: type[BrokerError] = BrokerStartError
    ) -> str:
        """One line from the host's stdout; ``error`` (with the host's stderr tail) when
        the host exits or stays silent for ``timeout`` seconds."""
        assert self._child is not None
        child = self._child
        fd = child.stdout.fileno()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buffer:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise error(
                    f"rdkafka-mock host did not answer ({what}) within {timeout:g} s",
                    child.stderr_tail(),
                )
            readable, _, _ = select.select([fd], [], [], remaining)
            if readable:
                chunk = os.read(fd, 4096)
                if not chunk:
                    raise error(
                        f"rdkafka-mock host closed its output (status {child.popen.poll()}) "
                        f"before answering ({what})",
                        child.stderr_tail(),
                    )
                self._buffer += chunk
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", errors="replace").strip()
