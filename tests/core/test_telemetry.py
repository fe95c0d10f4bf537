"""Trace context, JSON logs, spans and the observed HTTP client (against a real local
server), each on its own."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import sys
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry

from consumers.records import trace_context
from core.metrics import EngineMetrics
from core.telemetry import (
    ContextSpans,
    ObservedClient,
    TraceContext,
    UpstreamNames,
    build_spans,
    configure_logging,
    current_trace,
    log_context,
)
from core.telemetry.gpu import cuda_memory

PARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


# --------------------------------------------------------------------------- trace context


def test_a_valid_traceparent_is_read_and_continued() -> None:
    context = trace_context([("TraceParent", PARENT.encode()), ("tracestate", b"congo=t61rcWkgMzE")])
    assert context == TraceContext("4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7", 1,
                                   "congo=t61rcWkgMzE")
    child = context.child()
    assert child.trace_id == context.trace_id and child.span_id != context.span_id
    assert child.traceparent.startswith("00-4bf92f3577b34da6a3ce929d0e0e4736-")
    assert dict(child.headers()) == {"traceparent": child.traceparent,
                                     "tracestate": "congo=t61rcWkgMzE"}


@pytest.mark.parametrize("value", [
    "", "garbage", PARENT.upper(), PARENT[:-1],
    "00-00000000000000000000000000000000-00f067aa0ba902b7-01",  # zero trace id
    "00-4bf92f3577b34da6a3ce929d0e0e4736-0000000000000000-01",  # zero span id
    "ff-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",  # forbidden version
    PARENT + "-extra",  # version 00 has exactly four fields
])
def test_a_malformed_traceparent_is_ignored(value: str) -> None:
    assert trace_context([("traceparent", value.encode())]) is None


def test_a_later_version_is_read_by_its_first_fields_and_bad_tracestate_dropped() -> None:
    context = trace_context([
        ("traceparent", b"01-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-00-future"),
        ("tracestate", "x=\u00e9".encode("latin-1"))])
    assert context is not None and context.flags == 0 and context.state is None
    assert trace_context(None) is None and trace_context([("traceparent", None)]) is None


def test_context_spans_carry_a_trace_and_invent_none() -> None:
    spans = ContextSpans()
    with spans.span("none", None) as nothing:
        assert nothing is None and current_trace.get() is None
    parent = TraceContext.parse(PARENT)
    with spans.span("consume", parent) as own:
        assert own is not None and own.trace_id == parent.trace_id  # type: ignore[union-attr]
        assert current_trace.get() is own
    assert current_trace.get() is None
    assert isinstance(build_spans(None, "svc"), ContextSpans)


def test_otel_spans_nest_consume_work_publish() -> None:
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
    from opentelemetry.sdk.trace.export import SimpleSpanProcessor
    from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

    from core.telemetry.otel import OtelSpans

    exporter = InMemorySpanExporter()
    spans = OtelSpans(SimpleSpanProcessor(exporter), "multimodal-engine")
    parent = TraceContext.parse(PARENT, "congo=t61rcWkgMzE")
    with spans.span("t process", parent, "consumer") as consume:
        with spans.span("voice work", current_trace.get()) as work:
            pass
        with spans.span("t publish", current_trace.get(), "producer") as publish:
            pass
    spans.shutdown()
    assert consume is not None and work is not None and publish is not None
    assert {c.trace_id for c in (consume, work, publish)} == {parent.trace_id}  # type: ignore[union-attr]
    assert publish.state == "congo=t61rcWkgMzE"
    finished = {span.name: span for span in exporter.get_finished_spans()}
    assert set(finished) == {"t process", "voice work", "t publish"}
    assert finished["t process"].parent.span_id == int(parent.span_id, 16)  # type: ignore[union-attr]
    for name in ("voice work", "t publish"):
        assert finished[name].parent.span_id == int(consume.span_id, 16)  # type: ignore[union-attr]
    assert format(finished["t publish"].context.span_id, "016x") == publish.span_id


def test_an_endpoint_without_the_otel_extra_only_carries_context(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    for name in [n for n in sys.modules if n == "opentelemetry" or n.startswith(
            ("opentelemetry.", "core.telemetry.otel"))]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "opentelemetry", None)  # as if not installed
    spans = build_spans("http://127.0.0.1:4318", "svc")
    assert isinstance(spans, ContextSpans)
    assert "the otel extra is not installed" in caplog.text


def test_an_endpoint_with_the_otel_extra_exports() -> None:
    pytest.importorskip("opentelemetry.sdk", reason="the otel extra is not installed")
    from core.telemetry.otel import OtelSpans

    spans = build_spans("http://127.0.0.1:9", "svc")  # nothing listens; nothing recorded
    assert isinstance(spans, OtelSpans)
    spans.shutdown()


# --------------------------------------------------------------------------- logs


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    configure_logging("INFO", "json", secrets=["sk_secret\"key"], stream=stream)
    try:
        yield stream
    finally:
        root.handlers[:] = saved[0]
        root.setLevel(saved[1])
        logging.captureWarnings(False)


def test_json_lines_carry_context_extra_trace_and_never_the_key(json_log: io.StringIO) -> None:
    log = logging.getLogger("engine.test")
    log.info("before")
    with log_context(topic="generation.requested.voice", partition=2, offset=17, kind="voice"), \
            ContextSpans().span("consume", TraceContext.parse(PARENT)):
        with log_context(request_id="r-1", conversation_id="c-1"):
            log.warning("failed: key %s", "sk_secret\"key", extra={"error_code": "TIMEOUT"})
            try:
                raise ValueError("boom")
            except ValueError:
                log.exception("with a traceback")
        log.info("outside the request")
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    assert [line["message"] for line in lines] == [
        "before", "failed: key **********", "with a traceback", "outside the request"]
    assert set(lines[0]) == {"time", "level", "logger", "message"}
    failed = lines[1]
    assert failed["level"] == "WARNING" and failed["logger"] == "engine.test"
    assert failed["time"].endswith("Z")
    assert {k: failed[k] for k in ("request_id", "conversation_id", "kind", "topic",
                                   "partition", "offset", "error_code")} == {
        "request_id": "r-1", "conversation_id": "c-1", "kind": "voice",
        "topic": "generation.requested.voice", "partition": 2, "offset": 17,
        "error_code": "TIMEOUT"}
    assert failed["trace_id"] == "4bf92f3577b34da6a3ce929d0e0e4736"
    assert "ValueError: boom" in lines[2]["exception"]
    assert "request_id" not in lines[3] and lines[3]["offset"] == 17
    assert "sk_secret" not in json_log.getvalue()


def test_log_context_names_only_known_fields() -> None:
    with pytest.raises(ValueError, match="unknown log fields"), log_context(user="x"):
        pass
    with pytest.raises(ValueError, match="LOG_FORMAT"):
        configure_logging("INFO", "xml")  # type: ignore[arg-type]


# --------------------------------------------------------------------------- HTTP client


@pytest.fixture
async def upstream() -> AsyncIterator[tuple[str, list[dict[str, str]], asyncio.Event]]:
    """A real server: /ok, /fail (503), /slow (never answers until released)."""
    seen: list[dict[str, str]] = []
    release = asyncio.Event()

    async def handle(request: web.Request) -> web.StreamResponse:
        seen.append({"path": request.path, **{k.lower(): v for k, v in request.headers.items()
                                              if k.lower() in ("traceparent", "tracestate",
                                                               "cookie")}})
        if request.path.endswith("/cookie"):
            return web.Response(headers={"Set-Cookie": "tracker=user-a; Path=/"})
        if request.path.endswith("/slow"):
            await release.wait()
        status = 503 if request.path.endswith("/fail") else 200
        return web.Response(status=status, body=b"x" * 1000)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        yield f"http://127.0.0.1:{port}", seen, release
    finally:
        release.set()
        await runner.cleanup()


async def test_observed_client_times_each_upstream_and_outcome(
        upstream: tuple[str, list[dict[str, str]], asyncio.Event]) -> None:
    base, seen, _ = upstream
    metrics = EngineMetrics(CollectorRegistry())
    names = UpstreamNames([(f"{base}/v1", "elevenlabs"), (f"{base}/llm", "persona_llm")])

    def observe(name: str, outcome: str, seconds: float) -> None:
        metrics.upstream_seconds.labels(name, outcome).observe(seconds)

    async with ObservedClient(upstreams=names, observe=observe) as client:
        with ContextSpans().span("work", TraceContext.parse(PARENT, "a=b")) as work:
            await client.post(f"{base}/v1/text-to-speech/x", json={})
            await client.get(f"{base}/llm/chat/fail")
            async with client.stream("GET", f"{base}/images/cat.png") as response:
                assert len(await response.aread()) == 1000
            with pytest.raises(httpx.ReadTimeout):
                await client.get(f"{base}/v1/slow", timeout=0.2)
        await client.get(f"{base}/v1x/ok")  # not under /v1; no trace outside the work

    def count(name: str, outcome: str) -> float | None:
        return metrics.registry.get_sample_value(
            "engine_upstream_request_seconds_count", {"upstream": name, "outcome": outcome})

    assert count("elevenlabs", "2xx") == 1
    assert count("persona_llm", "5xx") == 1
    assert count("image_fetch", "2xx") == 2  # the stream (timed until closed) and /v1x
    assert count("elevenlabs", "timeout") == 1
    slow = metrics.registry.get_sample_value(
        "engine_upstream_request_seconds_sum", {"upstream": "elevenlabs", "outcome": "timeout"})
    assert slow is not None and slow >= 0.2
    assert work is not None
    by_path = {entry["path"]: entry for entry in seen}
    for path in ("/v1/text-to-speech/x", "/llm/chat/fail", "/v1/slow"):
        assert by_path[path]["traceparent"] == work.traceparent, path
        assert by_path[path]["tracestate"] == "a=b"
    assert "traceparent" not in by_path["/images/cat.png"]  # a stranger gets no ids
    assert "traceparent" not in by_path["/v1x/ok"]


def test_upstream_names_refuse_a_bad_base() -> None:
    with pytest.raises(ValueError, match="persona_llm"):
        UpstreamNames([("persona:8000", "persona_llm")])


# --------------------------------------------------------------------------- GPU


def test_gpu_memory_is_absent_without_cuda() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("a CUDA device is present: covered by the GPU check")
    assert cuda_memory("cpu") == [] and cuda_memory("cuda:0") == []
    metrics = EngineMetrics(CollectorRegistry())
    metrics.watch_gpu(lambda: cuda_memory("cuda:0"))
    assert metrics.registry.get_sample_value(
        "engine_gpu_memory_total_bytes", {"device": "cuda:0"}) is None


async def test_the_shared_client_keeps_no_cookies(
        upstream: tuple[str, list[dict[str, str]], asyncio.Event]) -> None:
    # one user's fetch must leave nothing that another user's request carries back
    base, seen, _ = upstream
    async with ObservedClient(upstreams=UpstreamNames([]), observe=lambda *_: None) as client:
        first = await client.get(f"{base}/images/cookie")
        assert first.headers["Set-Cookie"].startswith("tracker=")
        await client.get(f"{base}/images/next.png")
    assert "cookie" not in seen[-1] and not client.cookies
