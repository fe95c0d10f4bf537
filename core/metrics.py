"""The engine's Prometheus metrics, registered on an injected registry.

Names carry their unit (``_total``, ``_seconds``, ``_bytes``); labels are a fixed, small
set: ``kind`` (image, voice, lora), ``priority``, ``error_code`` (the contract's codes),
``topic``/``partition`` for consumer lag (only the partitions this instance owns),
``upstream``/``outcome`` for the engine's HTTP calls, ``device`` for GPU memory.

A request's time is split as Triton and vLLM split it: ``engine_queue_wait_seconds`` (arrival
to the start of its work), ``engine_processing_seconds`` (the work: start to result), and
``engine_request_duration_seconds`` (record fetched to result acknowledged by the broker).

GPU memory and the voice quota are read when scraped (:meth:`EngineMetrics.watch_gpu`,
:meth:`EngineMetrics.watch_voice_quota`); without a CUDA device, or before the first
quota check, those metrics have no series. The per-kind request counters of each kind the
engine serves exist from its start, at 0 (:meth:`EngineMetrics.serve`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

__all__ = ["EngineMetrics", "GpuMemory", "VoiceQuotaFigures"]

# seconds for a voice line up to hours for a LoRA training
_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0, 7200.0, 14400.0,
)
_UPSTREAM_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0,
)
_LORA_LOAD_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 3, 4, 6, 8, 12, 16, 32, 64)


class EngineMetrics:
    """All metrics of one engine process; pass a fresh registry per test."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.consumed = Counter(
            "engine_requests_consumed_total", "Request records consumed", ["kind"],
            registry=registry,
        )
        self.completed = Counter(
            "engine_requests_completed_total", "Requests answered with generation.completed",
            ["kind"], registry=registry,
        )
        self.failed = Counter(
            "engine_requests_failed_total", "Requests answered with generation.failed",
            ["kind", "error_code"], registry=registry,
        )
        self.retries = Counter(
            "engine_retries_total", "Retries of transient errors", ["kind", "error_code"],
            registry=registry,
        )
        self.processing = Histogram(
            "engine_processing_seconds", "Work time of a request: from the start of its "
            "work (a GPU job taken, a voice or training call begun) to its result, over "
            "Kafka and HTTP alike", ["kind"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.request_duration = Histogram(
            "engine_request_duration_seconds",
            "Time from a request record fetched to its answer acknowledged by the broker",
            ["kind"], buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.in_flight = Gauge(
            "engine_in_flight_requests", "Requests being worked on", ["kind"], registry=registry
        )
        self.lag = Gauge(
            "engine_consumer_lag_records",
            "Records of a partition not yet answered (high watermark minus committed position)",
            ["topic", "partition"], registry=registry,
        )
        # --- scheduling (core/scheduling) ---
        self.queue_wait = Histogram(
            "engine_queue_wait_seconds",
            "Time from a request's arrival to the start of its work (a GPU job taken, a "
            "voice or training call begun)", ["kind", "priority"],
            buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.queue_depth = Gauge(
            "engine_queue_depth_requests", "Requests taken in and waiting to start",
            ["kind", "priority"], registry=registry,
        )
        self.cancelled = Counter(
            "engine_requests_cancelled_total",
            "Requests answered CANCELLED (generation.control, DELETE, client gone)", ["kind"],
            registry=registry,
        )
        self.expired = Counter(
            "engine_requests_expired_total", "Requests answered EXPIRED (deadline passed "
            "before they started)", ["kind"], registry=registry,
        )
        self.http_rejected = Counter(
            "engine_http_rejected_total", "HTTP requests answered 503 because their kind "
            "was full", ["kind"], registry=registry,
        )
        # --- image worker (core/image/worker.py) ---
        self.image_batch_size = Histogram(
            "engine_image_batch_size", "Images per pipeline call of the GPU worker",
            buckets=_BATCH_BUCKETS, registry=registry,
        )
        self.image_batch_seconds = Histogram(
            "engine_image_batch_seconds", "Duration of one pipeline call of the GPU worker",
            buckets=_LATENCY_BUCKETS, registry=registry,
        )
        self.image_oom = Counter(
            "engine_image_oom_total", "Pipeline calls that ran out of GPU memory",
            registry=registry,
        )
        self.lora_switch_seconds = Histogram(
            "engine_lora_switch_seconds",
            "Time to make a request's LoRA (or none) active, loading it when not cached",
            buckets=(0.0005, 0.001, 0.0025, *_LATENCY_BUCKETS), registry=registry,
        )
        self.lora_evictions = Counter(
            "engine_lora_evictions_total", "LoRA adapters dropped from the loaded set (LRU)",
            registry=registry,
        )
        self.lora_load_seconds = Histogram(
            "engine_lora_load_seconds", "Time to load a LoRA's weights into the pipeline "
            "(a cache miss of the loaded set, or a hot swap)",
            buckets=_LORA_LOAD_BUCKETS, registry=registry,
        )
        # --- upstream HTTP calls (core/telemetry/http.py) ---
        self.upstream_seconds = Histogram(
            "engine_upstream_request_seconds",
            "Duration of an HTTP call to an upstream (elevenlabs, persona_llm, image_fetch), "
            "until its body was read; outcome 2xx..5xx, timeout or error",
            ["upstream", "outcome"], buckets=_UPSTREAM_BUCKETS, registry=registry,
        )
        # --- what this instance is ---
        self.build = Info(
            "engine_build", "The engine's version, image model, whether it is the tiny "
            "development model, and its device", registry=registry,
        )

    def serve(self, kinds: Iterable[str]) -> None:
        """Creates, at 0, the series of each of ``kinds`` of the metrics keyed by kind
        alone (requests consumed, completed, cancelled, expired, rejected, in flight), as
        Prometheus advises: a kind none of whose requests completed yet still has a
        completed series to divide its failures by, and ``rate()`` sees the first one."""
        for kind in kinds:
            for counter in (self.consumed, self.completed, self.cancelled, self.expired,
                            self.http_rejected):
                counter.labels(kind)
            self.in_flight.labels(kind)

    def set_build(self, *, version: str, model: str, development_model: bool,
                  device: str) -> None:
        """The one ``engine_build_info`` series (replaced, e.g. once the model loaded)."""
        self.build.info({"version": version, "model": model,
                         "development_model": str(development_model).lower(),
                         "device": device})

    def watch_gpu(self, read: Callable[[], Sequence[GpuMemory]]) -> None:
        """Exports ``read()``'s figures at each scrape (``engine_gpu_memory_*_bytes``)."""
        self.registry.register(_GpuCollector(read))

    def watch_voice_quota(self, read: Callable[[], VoiceQuotaFigures | None]) -> None:
        """Exports the voice provider's character quota at each scrape
        (``engine_voice_quota_{used,limit}_characters``)."""
        self.registry.register(_QuotaCollector(read))


@dataclass(frozen=True)
class GpuMemory:
    """Bytes of one CUDA device: held by tensors, reserved by the caching allocator, and
    the device's total."""

    device: str
    allocated: int
    reserved: int
    total: int


@dataclass(frozen=True)
class VoiceQuotaFigures:
    used: int
    limit: int


class _GpuCollector(Collector):
    def __init__(self, read: Callable[[], Sequence[GpuMemory]]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        families = {
            "allocated": GaugeMetricFamily(
                "engine_gpu_memory_allocated_bytes", "GPU memory held by tensors",
                labels=["device"]),
            "reserved": GaugeMetricFamily(
                "engine_gpu_memory_reserved_bytes",
                "GPU memory reserved by torch's caching allocator (allocated plus cached)",
                labels=["device"]),
            "total": GaugeMetricFamily(
                "engine_gpu_memory_total_bytes", "The GPU's total memory", labels=["device"]),
        }
        for gpu in self._read():
            for field, family in families.items():
                family.add_metric([gpu.device], getattr(gpu, field))
        yield from families.values()


class _QuotaCollector(Collector):
    def __init__(self, read: Callable[[], VoiceQuotaFigures | None]) -> None:
        self._read = read

    def collect(self) -> Iterator[Metric]:
        used = GaugeMetricFamily(
            "engine_voice_quota_used_characters",
            "Characters of the voice provider's quota used in the current period")
        limit = GaugeMetricFamily(
            "engine_voice_quota_limit_characters",
            "Characters the voice provider's plan allows in the current period")
        figures = self._read()
        if figures is not None:
            used.add_metric([], figures.used)
            limit.add_metric([], figures.limit)
        yield used
        yield limit
