"""The voice core remembers what it answered: a request with a seed (its own, or derived from
its request_id) answered before is answered again without an upstream call while its file
exists, and spoken again with the same seed and text once the file is gone; the same
request twice at once costs one call; the memory is bounded."""

from __future__ import annotations

import asyncio
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from pydantic import SecretStr

from core.outputs import OutputStore
from core.remembered import RememberedResults
from core.seeds import derive_seed
from core.voice import (
    SEED_MAX,
    ElevenLabsBackend,
    VoiceJob,
    VoiceResult,
    VoiceResults,
    VoiceService,
)
from schemas.errors import InvalidRequestError
from schemas.events import VoiceRequested
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer, RecordingSleep

RACHEL = "21m00Tcm4TlvDq8ikWAM"


def make_service(http: httpx.AsyncClient, server: ElevenLabsServer, store: OutputStore,
                 *, max_entries: int = 100, output_format: str = "mp3_44100_128"
                 ) -> VoiceService:
    backend = ElevenLabsBackend(http, server.api_url, SecretStr(DEFAULT_KEY),
                                output_format=output_format, sleep=RecordingSleep())
    results = VoiceResults(RememberedResults(store.directory / ".voice-results",
                                             max_entries=max_entries))
    return VoiceService(backend, store, RACHEL, results=results)


@pytest.fixture
def service(http: httpx.AsyncClient, server: ElevenLabsServer, store: OutputStore
            ) -> VoiceService:
    return make_service(http, server, store)


def event(request_id: str = "r-1", **fields: object) -> VoiceRequested:
    return VoiceRequested.model_validate(
        {"request_id": request_id, "conversation_id": "c", "text": "Hello, darling!",
         **fields})


def same_output(a: VoiceResult, b: VoiceResult) -> bool:
    """The same file and description (``timestamp`` says when it was answered)."""
    return replace(a, timestamp="") == replace(b, timestamp="")


async def test_a_replay_costs_no_call_and_after_cleanup_asks_the_same_seed(
    service: VoiceService, server: ElevenLabsServer, store: OutputStore
) -> None:
    first = await service.generate(event())
    again = await service.generate(event())
    assert server.tts_calls == 1
    assert same_output(again, first)
    assert first.seed == derive_seed("r-1", SEED_MAX) == server.received[0].json["seed"]

    path = store.resolve(first.filename)
    assert path is not None
    path.unlink()
    remade = await service.generate(event())
    assert server.tts_calls == 2
    before, after = (r.json for r in server.tts_requests())
    assert after == before  # the same text, settings and seed
    assert remade.filename != first.filename and store.exists(remade.filename)
    assert (remade.enhanced_text, remade.seed) == (first.enhanced_text, first.seed)
    assert same_output(await service.generate(event()), remade)
    assert server.tts_calls == 2


async def test_what_decides_the_audio_decides_the_entry(
    service: VoiceService, server: ElevenLabsServer
) -> None:
    await service.generate(event("r-1"))
    await service.generate(event("r-2"))  # another request: another derived seed
    await service.generate(event("r-3", seed=7))
    await service.generate(event("r-4", seed=7))  # same content and seed: same audio
    await service.generate(event("r-5", seed=7, stability=0.3))
    await service.generate(event("r-6", seed=7, model_id="eleven_flash_v2_5"))
    await service.generate(event("r-7", seed=7, inject_emotion=False))
    assert [r.json.get("seed") for r in server.tts_requests()] == [
        derive_seed("r-1", SEED_MAX), derive_seed("r-2", SEED_MAX), 7, 7, 7, 7]


async def test_another_output_format_is_not_answered_with_the_old_file(
    http: httpx.AsyncClient, server: ElevenLabsServer, store: OutputStore
) -> None:
    # the same store and remembered results, ELEVENLABS_OUTPUT_FORMAT changed in between
    first = await make_service(http, server, store).generate(event())
    low = make_service(http, server, store, output_format="mp3_22050_32")
    second = await low.generate(event())
    assert server.tts_calls == 2
    assert [r.query["output_format"] for r in server.tts_requests()] == [
        "mp3_44100_128", "mp3_22050_32"]
    assert second.filename != first.filename
    paths = [store.resolve(r.filename) for r in (first, second)]
    assert paths[0] is not None and paths[1] is not None
    assert paths[1].read_bytes() == server.audio_sent(second.enhanced_text, rate=22050)
    assert paths[0].read_bytes() != paths[1].read_bytes()
    assert same_output(await low.generate(event()), second)  # and remembered in its format
    assert server.tts_calls == 2


async def test_without_a_seed_nothing_is_remembered(
    service: VoiceService, server: ElevenLabsServer
) -> None:
    job = VoiceJob("Hello, darling!")
    first, second = await service.generate(job), await service.generate(job)
    assert server.tts_calls == 2 and first.filename != second.filename
    assert first.seed is None and all("seed" not in r.json for r in server.tts_requests())


async def test_the_same_request_twice_at_once_makes_one_call(
    service: VoiceService, server: ElevenLabsServer
) -> None:
    server.latency = 0.05  # both arrive while the first is being made
    first, second = await asyncio.gather(service.generate(event()), service.generate(event()))
    assert server.tts_calls == 1 and first.filename == second.filename


async def test_a_cancelled_caller_leaves_the_work_to_the_other(
    service: VoiceService, server: ElevenLabsServer
) -> None:
    server.latency = 0.05
    leaving = asyncio.ensure_future(service.generate(event()))
    staying = asyncio.ensure_future(service.generate(event()))
    await asyncio.sleep(0)  # both have joined
    leaving.cancel()
    result = await staying
    assert leaving.cancelled() and server.tts_calls == 1 and result.filename


@pytest.mark.parametrize("seed", [-1, SEED_MAX + 1, True])
async def test_a_seed_outside_the_upstream_range_is_refused_before_any_call(
    service: VoiceService, server: ElevenLabsServer, seed: int
) -> None:
    with pytest.raises(InvalidRequestError) as caught:
        await service.generate(VoiceJob("Hi.", seed=seed))
    assert caught.value.field == "seed"
    assert server.tts_calls == 0


async def test_the_memory_is_bounded(
    http: httpx.AsyncClient, server: ElevenLabsServer, store: OutputStore
) -> None:
    service = make_service(http, server, store, max_entries=3)
    for i in range(12):
        await service.generate(event(f"r-{i}", text=f"Line {i}."))
    remembered = RememberedResults(store.directory / ".voice-results", max_entries=3)
    assert len(remembered) == 3  # pruned at every write when max_entries < 20


def test_remembered_results_survive_only_while_readable(tmp_path: Path) -> None:
    remembered = RememberedResults(tmp_path, max_entries=10)
    remembered.put("k", {"a": 1})
    assert remembered.get("k") == {"a": 1}
    (tmp_path / "k.json").write_text("{broken")
    assert remembered.get("k") is None and remembered.get("absent") is None
    assert VoiceResults(remembered).get("k") is None
    with pytest.raises(ValueError, match="RESULT_CACHE_MAX_ENTRIES"):
        RememberedResults(tmp_path, max_entries=0)
