"""The engine's Prometheus metrics, registered on an injected registry.

Names carry their unit (``_total``, ``_seconds``); labels are a fixed, small set:
``kind`` (image, voice, lora), ``error_code`` (the contract's codes), and
``topic``/``partition`` for consumer lag.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

__all__ = ["EngineMetrics"]

_LATENCY_BUCKETS = (
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 1800.0,
)
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
            "engine_processing_seconds", "Time from record fetched to result acknowledged",
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
