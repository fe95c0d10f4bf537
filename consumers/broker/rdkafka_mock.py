"""librdkafka's mock cluster as the embedded broker, hosted by a small child process.

The cluster is driven through its C API (ctypes, in :mod:`._rdkafka_mock_main`) because
it has no Kafka CreateTopics API: topics are created with ``rd_kafka_mock_topic_create``,
asked for over the child's stdin. Measured (docs/brokers.md): idempotent producing works;
transactions do not (no isolation, transactional offsets are lost); a group rebalance
waits the session timeout minus one second, and a follower whose SyncGroup arrives after
the leader's gets INVALID_REQUEST, which with aiokafka is nearly always: use it for
one-member groups only.

It is also the broker for fault injection (tests/chaos): :meth:`RdkafkaMockBroker.set_down`
and :meth:`~RdkafkaMockBroker.set_up` make an outage, :meth:`~RdkafkaMockBroker.push_errors`
queues error codes for the next requests of one API, :meth:`~RdkafkaMockBroker.set_rtt`
slows every answer.
"""

from __future__ import annotations

import logging
import os
import select
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

from ._process import ChildProcess
from ._ready import wait_until_ready
from .base import BrokerCapabilities, BrokerError, BrokerStartError, EmbeddedBroker

__all__ = ["API_KEYS", "RdkafkaMockBroker"]

logger = logging.getLogger(__name__)

_COMMAND_TIMEOUT_S = 10.0
_GRACE_S = 2.0
# The directory that holds the ``consumers`` package, so that ``python -m`` finds it
# whatever the working directory and however the project is installed.
_IMPORT_ROOT = str(Path(__file__).resolve().parents[2])
#: Kafka protocol API keys by name, for :meth:`RdkafkaMockBroker.push_errors`.
API_KEYS: Mapping[str, int] = MappingProxyType({
    "Produce": 0, "Fetch": 1, "ListOffsets": 2, "Metadata": 3, "OffsetCommit": 8,
    "OffsetFetch": 9, "FindCoordinator": 10, "JoinGroup": 11, "Heartbeat": 12,
    "LeaveGroup": 13, "SyncGroup": 14, "DescribeGroups": 15, "ListGroups": 16,
    "ApiVersions": 18, "CreateTopics": 19, "InitProducerId": 22,
    "AddPartitionsToTxn": 24, "AddOffsetsToTxn": 25, "EndTxn": 26, "TxnOffsetCommit": 28,
})
#: The broker id of the mock's one broker.
_BROKER_ID = 1


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
        for name in dict.fromkeys(names):
            if not name or any(c.isspace() for c in name):
                raise BrokerError(f"invalid topic name {name!r}")
            self._command(f"create {partitions} {name}", f"creating topic {name!r}")

    # ------------------------------------------------------------- fault injection
    def set_down(self) -> None:
        """Take the broker down: every connection is closed at once and new ones are
        refused (on the same port) until :meth:`set_up`. Topics, records, committed
        offsets and groups stay; group sessions keep expiring meanwhile.

        Raises :class:`BrokerError` when the broker is not running.
        """
        self._command("down -1", "taking the broker down")

    def set_up(self) -> None:
        """Accept connections again after :meth:`set_down` (no-op when already up)."""
        self._command("up -1", "bringing the broker up")

    def set_rtt(self, rtt_ms: int) -> None:
        """Delay every response by ``rtt_ms`` milliseconds (0 restores)."""
        if rtt_ms < 0:
            raise ValueError(f"rtt_ms must be >= 0, got {rtt_ms}")
        self._command(f"rtt -1 {rtt_ms}", "setting the round-trip time")

    def push_errors(self, api: str | int, errors: Sequence[int], *, rtt_ms: int = 0) -> None:
        """Answer the next ``len(errors)`` requests of ``api`` (a name of :data:`API_KEYS`
        or a protocol API key) with these Kafka error codes, in order, whichever client
        sends them; ``0`` in the list answers one request normally, ``-195``
        (librdkafka's ``_TRANSPORT``) closes the connection instead of answering.
        ``rtt_ms`` delays each of those responses. Calls add to what is still queued
        (nothing takes queued errors back); :meth:`errors_left` says how much is.

        Raises ``ValueError`` for an unknown API, an empty list or a negative delay, and
        :class:`BrokerError` when the broker is not running.
        """
        key = _api_key(api)
        if not errors:
            raise ValueError("errors must name at least one error code")
        if rtt_ms < 0:
            raise ValueError(f"rtt_ms must be >= 0, got {rtt_ms}")
        pairs = ",".join(f"{int(code)}:{rtt_ms}" for code in errors)
        self._command(f"broker-errors {_BROKER_ID} {key} {pairs}",
                      f"queueing errors for API {api}")

    def errors_left(self, api: str | int) -> int:
        """How many errors queued by :meth:`push_errors` for ``api`` no request has used
        yet."""
        key = _api_key(api)
        answer = self._command(f"errors-left {_BROKER_ID} {key}", f"counting errors of {api}")
        return int(answer.split()[-1])

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            child, self._child = self._child, None
            if child is None:
                return
            # Closing stdin asks the host to destroy the cluster and exit by itself.
            status = child.stop(timeout, grace=_GRACE_S)
            logger.info("rdkafka-mock broker %s stopped (status %s)", self._bootstrap, status)
            self._bootstrap = None

    def _command(self, line: str, what: str) -> str:
        """Sends one command line to the host and returns its ``OK …`` answer; raises
        :class:`BrokerError` for an ``ERR`` answer, a dead host or a silent one."""
        with self._lock:
            if self._child is None or not self._child.alive():
                raise BrokerError("the rdkafka-mock broker is not running")
            try:
                self._child.stdin.write(line.encode() + b"\n")
                self._child.stdin.flush()
            except OSError as exc:
                raise BrokerError(f"the rdkafka-mock host is gone: {exc}") from exc
            answer = self._read_line(_COMMAND_TIMEOUT_S, what=what, error=BrokerError)
        if not answer.startswith("OK"):
            raise BrokerError(f"rdkafka-mock refused {what}: {answer.removeprefix('ERR ')}")
        return answer

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


def _api_key(api: str | int) -> int:
    if isinstance(api, str):
        try:
            return API_KEYS[api]
        except KeyError:
            raise ValueError(f"unknown Kafka API {api!r}; known: {', '.join(API_KEYS)}") from None
    if not 0 <= api <= 32767:
        raise ValueError(f"a Kafka API key is 0..32767, got {api}")
    return api
