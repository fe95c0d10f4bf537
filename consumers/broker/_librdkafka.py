"""ctypes bindings for librdkafka's mock cluster (``rdkafka_mock.h``), nothing more.

librdkafka calls this API experimental. The library is the one bundled in the
confluent-kafka wheel (``confluent_kafka.libs/librdkafka-*.so*``), else a system one.
Besides creating topics, the cluster injects faults: a broker taken down (its connections
closed, new ones refused on the same port) and up again, slower answers, and error codes
queued for a broker's next requests of a given API key (each with an optional delay; the
queue can be counted). The cluster-wide queue (``rd_kafka_mock_push_request_errors``)
is not bound: it cannot be counted, and on a one-broker cluster the broker's queue does
the same.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import importlib.util
from collections.abc import Sequence
from pathlib import Path

__all__ = ["LibrdkafkaError", "MockCluster", "find_librdkafka"]

_RD_KAFKA_PRODUCER = 0
_ERRSTR_SIZE = 512
_TOPIC_ALREADY_EXISTS = 36
# rd_kafka_mock_broker_push_request_error_rtts is variadic: push this many pairs per call.
_VARIADIC_CHUNK = 32


class LibrdkafkaError(RuntimeError):
    """librdkafka is missing or refused a call; the message says which and why."""


def find_librdkafka() -> str:
    """Path of a librdkafka shared library; raises :class:`LibrdkafkaError` if none."""
    spec = importlib.util.find_spec("confluent_kafka")
    if spec is not None and spec.origin is not None:
        libs = Path(spec.origin).parent.parent / "confluent_kafka.libs"
        for candidate in sorted(libs.glob("librdkafka*.so*")):
            return str(candidate)
    system = ctypes.util.find_library("rdkafka")
    if system:
        return system
    raise LibrdkafkaError(
        "librdkafka not found: install confluent-kafka (pip install confluent-kafka), "
        "whose wheel bundles it"
    )


def _bind(lib: ctypes.CDLL) -> None:
    vp, cp, i = ctypes.c_void_p, ctypes.c_char_p, ctypes.c_int
    i16, i32, size = ctypes.c_int16, ctypes.c_int32, ctypes.c_size_t
    signatures: dict[str, tuple[list[type], type | None]] = {
        "rd_kafka_conf_new": ([], vp),
        "rd_kafka_conf_set": ([vp, cp, cp, cp, ctypes.c_size_t], i),
        "rd_kafka_new": ([i, vp, cp, ctypes.c_size_t], vp),
        "rd_kafka_destroy": ([vp], None),
        "rd_kafka_err2str": ([i], cp),
        "rd_kafka_version_str": ([], cp),
        "rd_kafka_mock_cluster_new": ([vp, i], vp),
        "rd_kafka_mock_cluster_destroy": ([vp], None),
        "rd_kafka_mock_cluster_bootstraps": ([vp], cp),
        "rd_kafka_mock_topic_create": ([vp, cp, i, i], i),
        "rd_kafka_mock_group_initial_rebalance_delay_ms": ([vp, i32], None),
        # rd_kafka_resp_err_t is a C enum: an int
        "rd_kafka_mock_broker_set_down": ([vp, i32], i),
        "rd_kafka_mock_broker_set_up": ([vp, i32], i),
        "rd_kafka_mock_broker_set_rtt": ([vp, i32, i], i),
        # variadic: the fixed arguments only; each (err, rtt_ms) pair follows as two ints
        "rd_kafka_mock_broker_push_request_error_rtts": ([vp, i32, i16, size], i),
        "rd_kafka_mock_broker_error_stack_cnt": ([vp, i32, i16, ctypes.POINTER(size)], i),
    }
    for name, (argtypes, restype) in signatures.items():
        try:
            function = getattr(lib, name)
        except AttributeError as exc:
            raise LibrdkafkaError(f"this librdkafka lacks {name}") from exc
        function.argtypes = argtypes
        function.restype = restype


class MockCluster:
    """A one-broker librdkafka mock cluster living in this process's librdkafka threads.

    Raises :class:`LibrdkafkaError` when the library is missing or refuses to create the
    handle or the cluster. Call :meth:`destroy` exactly once.
    """

    def __init__(self, library_path: str | None = None, brokers: int = 1) -> None:
        self._lib = ctypes.CDLL(library_path or find_librdkafka())
        _bind(self._lib)
        errstr = ctypes.create_string_buffer(_ERRSTR_SIZE)
        conf = self._lib.rd_kafka_conf_new()
        # The handle only hosts the cluster; it never connects anywhere, so keep it quiet.
        self._lib.rd_kafka_conf_set(conf, b"log_level", b"3", errstr, _ERRSTR_SIZE)
        self._rk = self._lib.rd_kafka_new(_RD_KAFKA_PRODUCER, conf, errstr, _ERRSTR_SIZE)
        if not self._rk:
            raise LibrdkafkaError(f"rd_kafka_new failed: {errstr.value.decode()}")
        self._mc = self._lib.rd_kafka_mock_cluster_new(self._rk, brokers)
        if not self._mc:
            self._lib.rd_kafka_destroy(self._rk)
            raise LibrdkafkaError("rd_kafka_mock_cluster_new failed")
        # Otherwise the first member of every group waits ~3 s for others to join.
        self._lib.rd_kafka_mock_group_initial_rebalance_delay_ms(self._mc, 0)

    @property
    def version(self) -> str:
        return str(self._lib.rd_kafka_version_str().decode())

    @property
    def bootstraps(self) -> str:
        return str(self._lib.rd_kafka_mock_cluster_bootstraps(self._mc).decode())

    def create_topic(self, name: str, partitions: int) -> bool:
        """Create ``name``; ``False`` if it already existed. Raises
        :class:`LibrdkafkaError` for any other refusal."""
        err = self._lib.rd_kafka_mock_topic_create(self._mc, name.encode(), partitions, 1)
        if err == 0:
            return True
        if err == _TOPIC_ALREADY_EXISTS:
            return False
        reason = self._lib.rd_kafka_err2str(err).decode()
        raise LibrdkafkaError(f"cannot create topic {name!r}: {reason} (error {err})")

    def set_down(self, broker_id: int = -1) -> None:
        """Close the broker's connections and refuse new ones (``-1``: every broker).
        Partition leaders stay where they are. Raises :class:`LibrdkafkaError`."""
        self._check(self._lib.rd_kafka_mock_broker_set_down(self._mc, broker_id),
                    f"cannot take broker {broker_id} down")

    def set_up(self, broker_id: int = -1) -> None:
        """Accept connections again, on the same port (``-1``: every broker)."""
        self._check(self._lib.rd_kafka_mock_broker_set_up(self._mc, broker_id),
                    f"cannot bring broker {broker_id} up")

    def set_rtt(self, broker_id: int, rtt_ms: int) -> None:
        """Delay every response of the broker by ``rtt_ms`` (``-1``: every broker)."""
        self._check(self._lib.rd_kafka_mock_broker_set_rtt(self._mc, broker_id, rtt_ms),
                    f"cannot set the round-trip time of broker {broker_id}")

    def push_broker_request_errors(
        self, broker_id: int, api_key: int, errors: Sequence[tuple[int, int]]
    ) -> None:
        """Answer broker ``broker_id``'s next requests of ``api_key`` with the error codes
        of ``errors`` (``(code, rtt_ms)`` pairs: ``0`` answers normally, ``rtt_ms`` delays
        the response); ``-195`` (``_TRANSPORT``) closes the connection instead. Raises
        :class:`LibrdkafkaError` for an unknown broker."""
        push = self._lib.rd_kafka_mock_broker_push_request_error_rtts
        for start in range(0, len(errors), _VARIADIC_CHUNK):
            chunk = errors[start : start + _VARIADIC_CHUNK]
            pairs = [ctypes.c_int(v) for code, rtt_ms in chunk for v in (code, rtt_ms)]
            self._check(push(self._mc, broker_id, api_key, len(chunk), *pairs),
                        f"cannot queue errors on broker {broker_id}")

    def broker_errors_left(self, broker_id: int, api_key: int) -> int:
        """How many of :meth:`push_broker_request_errors`' errors for ``api_key`` are still
        queued on broker ``broker_id``."""
        count = ctypes.c_size_t(0)
        self._check(self._lib.rd_kafka_mock_broker_error_stack_cnt(
            self._mc, broker_id, api_key, ctypes.byref(count)),
            f"cannot count the errors queued on broker {broker_id}")
        return int(count.value)

    def _check(self, err: int, what: str) -> None:
        if err != 0:
            reason = self._lib.rd_kafka_err2str(err).decode()
            raise LibrdkafkaError(f"{what}: {reason} (error {err})")

    def destroy(self) -> None:
        self._lib.rd_kafka_mock_cluster_destroy(self._mc)
        self._lib.rd_kafka_destroy(self._rk)
