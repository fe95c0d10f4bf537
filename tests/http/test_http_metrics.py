"""Work sent over HTTP is measured as Kafka work is: each POST's queue wait and its work
time (``engine_processing_seconds``) per kind, read back from ``GET /metrics``."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from tests.core.test_training_images import photos
from tests.http.conftest import Serve, Served
from tests.http.test_training_status import form


async def samples(served: Served) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    async with served.client.get("/metrics") as response:
        assert response.status == 200
        text = await response.text()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def processing(scraped: dict[tuple[str, tuple[tuple[str, str], ...]], float], kind: str,
               what: str = "count") -> float:
    return scraped.get((f"engine_processing_seconds_{what}", (("kind", kind),)), 0.0)


def queue_wait_count(scraped: dict[tuple[str, tuple[tuple[str, str], ...]], float],
                     kind: str) -> float:
    return scraped.get(("engine_queue_wait_seconds_count",
                        (("kind", kind), ("priority", "interactive"))), 0.0)


async def test_image_and_voice_posts_count_their_queue_wait_and_work_time(
        serve: Serve) -> None:
    served = await serve()
    before = await samples(served)
    assert processing(before, "image") == processing(before, "voice") == 0.0

    async with served.client.post("/generate/voice", json={
            "text": "Hello there.", "voice_id": "21m00Tcm4TlvDq8ikWAM"}) as response:
        assert response.status == 200, await response.text()
    async with served.client.post("/generate/image", json={
            "prompt": "a red cube", "width": 64, "height": 64, "num_inference_steps": 2,
            "seed": 3}) as response:
        assert response.status == 200, await response.text()

    after = await samples(served)
    for kind in ("image", "voice"):
        assert processing(after, kind) == 1.0, kind
        assert queue_wait_count(after, kind) == 1.0, kind  # one request, both halves
        assert processing(after, kind, "sum") > 0.0, kind


async def test_a_lora_training_posted_counts_its_work_time_when_it_ends(serve: Serve) -> None:
    served = await serve()
    async with served.client.post("/train-lora", data=form(photos(5))) as response:
        posted = await response.json()
        assert response.status == 200, posted
    assert posted["status"] == "training_started"
    done = await served.training.wait(posted["training_id"])
    assert done is not None and done.state == "completed"
    after = await samples(served)
    assert processing(after, "lora") == 1.0
    assert processing(after, "lora", "sum") > 0.0

    # posted again: found registered, answered at once, and measured at once
    async with served.client.post(
            "/train-lora", data=form(photos(5), request_id=posted["request_id"])) as response:
        again = await response.json()
        assert response.status == 200, again
    assert again["status"] == "completed"
    assert processing(await samples(served), "lora") == 2.0


async def test_metrics_speak_openmetrics_and_gzip_to_prometheus(serve: Serve) -> None:
    # the headers Prometheus 3 sends by default (scrape_protocols: OpenMetrics first)
    prometheus = {"Accept": "application/openmetrics-text;version=1.0.0,"
                            "application/openmetrics-text;version=0.0.1;q=0.75,"
                            "text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
                  "Accept-Encoding": "gzip"}
    served = await serve()
    async with served.client.get("/metrics", headers=prometheus) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("application/openmetrics-text")
        assert response.headers["Content-Encoding"] == "gzip"
        text = await response.text()  # aiohttp inflates it
    assert text.endswith("# EOF\n")
    assert "engine_build_info" in text
    async with served.client.get("/metrics", headers={"Accept": "text/plain",
                                                      "Accept-Encoding": "identity"}) as plain:
        assert plain.headers["Content-Type"].startswith("text/plain")
        assert "Content-Encoding" not in plain.headers
        assert "# EOF" not in await plain.text()
