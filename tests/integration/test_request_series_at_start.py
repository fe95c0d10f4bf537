"""The per-kind request counters exist at 0 from the engine's start, for each kind it
serves (Prometheus' advice): a kind whose every request fails still has a completed series
for EngineFailureRatioHigh to divide by (deploy/prometheus/alerts_test.yml has that case)."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from consumers.engine import Engine
from core.settings import Settings
from tests.support.dev_engine import dev_engine

pytestmark = [pytest.mark.kafka]

KIND_COUNTERS = ("engine_requests_consumed_total", "engine_requests_completed_total",
                 "engine_requests_cancelled_total", "engine_requests_expired_total",
                 "engine_http_rejected_total")


async def _series(engine: Engine) -> dict[tuple[str, str], float]:
    """``(sample name, kind) → value`` of the kind-keyed samples on /metrics."""
    assert engine.addresses is not None
    async with aiohttp.ClientSession() as session, \
            session.get(engine.addresses.http_url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {(sample.name, sample.labels["kind"]): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples if set(sample.labels) == {"kind"}}


def _expect_zero(series: dict[tuple[str, str], float], kinds: set[str]) -> None:
    for kind in kinds:
        for name in (*KIND_COUNTERS, "engine_in_flight_requests"):
            assert series.get((name, kind)) == 0.0, (name, kind, sorted(series))


async def test_voice_engine_exports_its_request_series_at_zero(engine: Engine) -> None:
    series = await _series(engine)
    _expect_zero(series, {"voice"})
    assert {kind for _, kind in series} == {"voice"}  # no series for kinds it does not serve


@pytest.mark.slow
async def test_image_engine_exports_every_kind_at_zero(settings: Settings, dev_model_dir: Path,
                                                       tmp_path: Path) -> None:
    async with dev_engine(settings, dev_model_dir, tmp_path) as engine:
        _expect_zero(await _series(engine), {"voice", "image", "lora"})
