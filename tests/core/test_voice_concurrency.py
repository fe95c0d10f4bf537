"""The adaptive concurrency limit (core/voice/concurrency.py) on its own, then in the
ElevenLabs backend: which 429s cut it, ELEVENLABS_ACCOUNT_CONCURRENCY, and three engine
instances sharing one account on the local ElevenLabs, fixed limits against adaptive ones."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from core.backoff import Backoff
from core.outputs import OutputStore
from core.settings import ConfigurationError, load_settings
from core.voice import ElevenLabsBackend, VoiceSettings, build_voice_service
from core.voice.concurrency import AdaptiveLimit, Slot
from core.voice.elevenlabs import GROW_AFTER
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer, Fault, RecordingSleep

RACHEL = "21m00Tcm4TlvDq8ikWAM"
LIMITER_LOG = "core.voice.concurrency"


async def _yield(times: int = 5) -> None:
    """Let every ready task run (no time passes: a turn of the loop, not a wait)."""
    for _ in range(times):
        await asyncio.sleep(0)


class Holders:
    """Tasks holding slots of a limit until told to leave, each reporting how it went."""

    def __init__(self, limit: AdaptiveLimit) -> None:
        self.limit = limit
        self.entered: dict[int, asyncio.Event] = {}
        self._leave: dict[int, asyncio.Future[str | None]] = {}
        self.tasks: dict[int, asyncio.Task[None]] = {}

    def start(self, n: int) -> None:
        """Holder ``n`` queues for a slot."""
        self.entered[n] = asyncio.Event()
        self._leave[n] = asyncio.get_running_loop().create_future()
        self.tasks[n] = asyncio.create_task(self._hold(n))

    async def _hold(self, n: int) -> None:
        async with self.limit.slot() as slot:
            self.entered[n].set()
            outcome = await self._leave[n]
            _report(slot, outcome)

    async def leave(self, n: int, outcome: str | None = None) -> None:
        """Holder ``n`` (which holds a slot) reports ``outcome`` and leaves."""
        await asyncio.wait_for(self.entered[n].wait(), 5)
        self._leave[n].set_result(outcome)
        await asyncio.wait_for(self.tasks[n], 5)

    def inside(self) -> set[int]:
        return {n for n, event in self.entered.items()
                if event.is_set() and not self.tasks[n].done()}


def _report(slot: Slot, outcome: str | None) -> None:
    if outcome == "ok":
        slot.succeeded()
    elif outcome == "429":
        slot.overloaded()


async def _round(limit: AdaptiveLimit, outcome: str) -> None:
    """As many holders as the limit allows, all at once (the limit in full use), each
    reporting ``outcome``."""
    holders = Holders(limit)
    width = limit.limit
    for n in range(width):
        holders.start(n)
    await asyncio.wait_for(asyncio.gather(*(holders.entered[n].wait() for n in range(width))), 5)
    for n in range(width):
        await holders.leave(n, outcome)


# --- the limit on its own ---


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"ceiling": 0}, "floor"), ({"ceiling": 4, "floor": 0}, "floor"),
     ({"ceiling": 2, "floor": 3}, "ceiling"), ({"ceiling": 4, "start": 5}, "start"),
     ({"ceiling": 4, "floor": 2, "start": 1}, "start"), ({"ceiling": 4, "grow_after": 0},
                                                         "grow_after")],
)
def test_invalid_bounds_are_refused_naming_the_argument(kwargs: dict[str, Any],
                                                         named: str) -> None:
    ceiling = kwargs.pop("ceiling")
    with pytest.raises(ValueError, match=named):
        AdaptiveLimit(ceiling, **kwargs)


async def test_no_more_holders_than_the_limit_served_in_arrival_order() -> None:
    limit = AdaptiveLimit(2)
    holders = Holders(limit)
    for n in range(5):
        holders.start(n)
    await _yield()
    assert holders.inside() == {0, 1} and limit.in_flight == 2
    await holders.leave(1)
    await asyncio.wait_for(holders.entered[2].wait(), 5)
    assert holders.inside() == {0, 2}
    await holders.leave(0)
    await asyncio.wait_for(holders.entered[3].wait(), 5)
    assert holders.inside() == {2, 3} and not holders.entered[4].is_set()
    for n in (2, 3, 4):
        await holders.leave(n)
    assert limit.in_flight == 0 and limit.limit == 2  # no outcome reported: no change


async def test_a_refusal_halves_the_limit_once_per_episode_and_never_below_the_floor(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LIMITER_LOG)
    limit = AdaptiveLimit(8, name="Test")
    await _round(limit, "429")  # eight refused together: one cut, not eight
    assert limit.limit == 4
    await _round(limit, "429")
    assert limit.limit == 2
    await _round(limit, "429")
    assert limit.limit == 1
    await _round(limit, "429")
    assert limit.limit == 1  # the floor
    changes = [r.getMessage() for r in caplog.records if r.name == LIMITER_LOG]
    assert changes == [
        "Test concurrency limit 8 -> 4 (upstream refused for concurrency; ceiling 8)",
        "Test concurrency limit 4 -> 2 (upstream refused for concurrency; ceiling 8)",
        "Test concurrency limit 2 -> 1 (upstream refused for concurrency; ceiling 8)",
    ]  # one line per change, none when nothing changed
    assert all(r.levelno == logging.INFO for r in caplog.records if r.name == LIMITER_LOG)


async def test_a_cut_takes_effect_as_holders_leave_and_late_refusals_do_not_cut_again() -> None:
    limit = AdaptiveLimit(4)
    holders = Holders(limit)
    for n in range(6):
        holders.start(n)
    await _yield()
    assert holders.inside() == {0, 1, 2, 3}
    await holders.leave(0, "429")
    assert limit.limit == 2
    await holders.leave(1, "429")  # started before the cut: the same episode
    assert limit.limit == 2
    await _yield()
    assert holders.inside() == {2, 3}  # two left, none admitted: 2 in flight, the new limit
    await holders.leave(2, "ok")
    await asyncio.wait_for(holders.entered[4].wait(), 5)
    assert holders.inside() == {3, 4}
    await holders.leave(3)
    await asyncio.wait_for(holders.entered[5].wait(), 5)
    assert holders.inside() == {4, 5} and limit.in_flight == 2
    await holders.leave(4)
    await holders.leave(5)


async def test_growth_needs_a_run_of_successes_at_the_limit_and_stops_at_the_ceiling() -> None:
    limit = AdaptiveLimit(4, start=2, grow_after=4)
    await _round(limit, "ok")  # 2 successes
    assert limit.limit == 2
    await _round(limit, "ok")  # 4: one more place
    assert limit.limit == 3
    await _round(limit, "ok")  # 3 of the next 4
    assert limit.limit == 3
    await _round(limit, "ok")  # 6 since the last change
    assert limit.limit == 4
    for _ in range(4):
        await _round(limit, "ok")
    assert limit.limit == 4  # the ceiling


async def test_successes_below_the_limit_or_older_than_the_last_cut_do_not_grow_it() -> None:
    limit = AdaptiveLimit(4, start=2, grow_after=2)
    for _ in range(10):  # one at a time: the limit of 2 is never in full use
        async with limit.slot() as slot:
            slot.succeeded()
    assert limit.limit == 2
    holders = Holders(limit)
    for n in range(2):
        holders.start(n)
    await _yield()
    await holders.leave(0, "429")
    assert limit.limit == 1
    await holders.leave(1, "ok")  # began before the cut: no evidence for the new limit
    await _round(limit, "ok")
    assert limit.limit == 1
    await _round(limit, "ok")
    assert limit.limit == 2


async def test_a_cancelled_waiter_leaves_no_place_taken() -> None:
    limit = AdaptiveLimit(1)
    holders = Holders(limit)
    holders.start(0)
    holders.start(1)
    holders.start(2)
    await _yield()
    holders.tasks[1].cancel()
    await asyncio.gather(holders.tasks[1], return_exceptions=True)
    await holders.leave(0)
    await asyncio.wait_for(holders.entered[2].wait(), 5)
    await holders.leave(2)
    assert limit.in_flight == 0
    async with limit.slot():  # free at once
        assert limit.in_flight == 1


async def test_floor_equal_to_ceiling_is_a_fixed_limit() -> None:
    limit = AdaptiveLimit(3, floor=3)
    await _round(limit, "429")
    assert limit.limit == 3


# --- in the backend ---


def backend_for(http: httpx.AsyncClient, server: ElevenLabsServer, **kwargs: Any
                ) -> ElevenLabsBackend:
    kwargs.setdefault("sleep", RecordingSleep())
    kwargs.setdefault("timeout", httpx.Timeout(5.0))
    return ElevenLabsBackend(http, server.api_url, SecretStr(DEFAULT_KEY), **kwargs)


@pytest.mark.parametrize("kind", ["too_many_concurrent_requests", "concurrent_limit_exceeded"])
async def test_a_concurrency_429_in_either_shape_cuts_the_limit_and_is_retried(
    http: httpx.AsyncClient, server: ElevenLabsServer, tmp_path: Path, kind: Any,
) -> None:
    sleep = RecordingSleep()
    backend = backend_for(http, server, sleep=sleep)
    assert backend.concurrency_limit == 4
    server.faults = [Fault(kind, retry_after=0.5)]
    await backend.synthesize_to(tmp_path / "a.mp3", "Hello.", VoiceSettings(RACHEL))
    assert [r.status for r in server.tts_requests()] == [429, 200]
    assert backend.concurrency_limit == 2
    assert len(sleep.calls) == 1 and sleep.calls[0] >= 0.5  # Retry-After honoured as before


async def test_after_a_cut_a_run_of_successes_at_the_limit_raises_it_by_one(
    http: httpx.AsyncClient, server: ElevenLabsServer, tmp_path: Path,
) -> None:
    backend = backend_for(http, server)
    server.faults = [Fault("too_many_concurrent_requests")]
    await backend.synthesize_to(tmp_path / "first.mp3", "Hello.", VoiceSettings(RACHEL))
    assert backend.concurrency_limit == 2
    await asyncio.gather(*(  # all at once: the limit of 2 in full use
        backend.synthesize_to(tmp_path / f"{n}.mp3", f"Message {n}.", VoiceSettings(RACHEL))
        for n in range(GROW_AFTER)))
    assert backend.concurrency_limit == 3
    assert server.peak_in_flight == 2  # the cut held while the run went on


async def test_other_faults_leave_the_limit_alone(
    http: httpx.AsyncClient, server: ElevenLabsServer, tmp_path: Path,
) -> None:
    backend = backend_for(http, server)
    server.faults = [Fault("system_busy"), Fault("server_error"), Fault("drop")]
    await backend.synthesize_to(tmp_path / "a.mp3", "Hello.", VoiceSettings(RACHEL))
    assert [r.status for r in server.tts_requests()] == [429, 500, 200, 200]
    assert backend.concurrency_limit == 4


async def test_a_fixed_backend_keeps_its_limit(
    http: httpx.AsyncClient, server: ElevenLabsServer, tmp_path: Path,
) -> None:
    backend = backend_for(http, server, adaptive_concurrency=False)
    server.faults = [Fault("too_many_concurrent_requests")]
    await backend.synthesize_to(tmp_path / "a.mp3", "Hello.", VoiceSettings(RACHEL))
    assert backend.concurrency_limit == 4


async def test_the_account_limit_caps_the_process_and_comes_from_the_settings(
    http: httpx.AsyncClient, server: ElevenLabsServer, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert backend_for(http, server, account_concurrency=3).concurrency_limit == 3
    assert backend_for(http, server, max_concurrency=2,
                       account_concurrency=5).concurrency_limit == 2
    with pytest.raises(ValueError, match="account_concurrency"):
        backend_for(http, server, account_concurrency=0)

    monkeypatch.chdir(tmp_path)  # no stray .env
    store = OutputStore(tmp_path / "outputs")

    def limit(**overrides: Any) -> int:
        settings = load_settings(elevenlabs_api_key=DEFAULT_KEY,
                                 elevenlabs_api_url=server.api_url, **overrides)
        backend = build_voice_service(settings, store, http).backend
        assert isinstance(backend, ElevenLabsBackend)
        return backend.concurrency_limit

    assert limit() == 4
    assert limit(elevenlabs_account_concurrency=3) == 3
    assert limit(elevenlabs_max_concurrency=2, elevenlabs_account_concurrency=10) == 2
    with pytest.raises(ConfigurationError, match="ELEVENLABS_ACCOUNT_CONCURRENCY=0"):
        load_settings(elevenlabs_account_concurrency=0)


# --- three instances, one account ---

INSTANCES = 3
REQUESTS_EACH = 30
ACCOUNT_LIMIT = 3


@dataclass
class FleetRun:
    refusals: int
    peak_in_flight: int
    peak_admitted: int
    audio: dict[str, bytes]
    lowest_limits: list[int]  # each instance's lowest limit, seen as its answers came
    limit_sums: list[int]  # the fleet's limits added up, as each answer came


@pytest.fixture
async def account() -> AsyncIterator[ElevenLabsServer]:
    server = ElevenLabsServer(seconds_per_char=0.002, latency=0.02,
                              max_concurrency=ACCOUNT_LIMIT)
    await server.start()
    yield server
    await server.stop()


async def _fleet(server: ElevenLabsServer, tmp_path: Path, *, adaptive: bool) -> FleetRun:
    """Three instances (each its own client and backend, 4 at most in flight) speak 30 texts
    each, all at once, on one account of 3."""
    clients = [httpx.AsyncClient() for _ in range(INSTANCES)]
    try:
        backends = [
            ElevenLabsBackend(
                client, server.api_url, SecretStr(DEFAULT_KEY), max_concurrency=4,
                adaptive_concurrency=adaptive, timeout=httpx.Timeout(10.0),
                # room for every retry a fixed limit needs; short waits, as the test's time
                retry=Backoff(max_attempts=400, base_delay=0.005, max_delay=0.04,
                              rng=random.Random(i)),
            )
            for i, client in enumerate(clients)
        ]
        lowest = [b.concurrency_limit for b in backends]
        sums: list[int] = []

        async def speak(i: int, n: int) -> tuple[str, bytes]:
            text = f"Instance {i} says message number {n}."
            path = tmp_path / f"{'adaptive' if adaptive else 'fixed'}-{i}-{n}.mp3"
            await backends[i].synthesize_to(path, text, VoiceSettings(RACHEL))
            lowest[i] = min(lowest[i], backends[i].concurrency_limit)
            sums.append(sum(b.concurrency_limit for b in backends))
            return text, path.read_bytes()

        answers = await asyncio.wait_for(asyncio.gather(
            *(speak(i, n) for n in range(REQUESTS_EACH) for i in range(INSTANCES))), 60)
    finally:
        for client in clients:
            await client.aclose()
    return FleetRun(server.concurrency_refusals, server.peak_in_flight, server.peak_admitted,
                    dict(answers), lowest, sums)


async def test_three_instances_on_one_account_adapt_to_its_limit(
    account: ElevenLabsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger=LIMITER_LOG)
    fixed = await _fleet(account, tmp_path, adaptive=False)
    second = ElevenLabsServer(seconds_per_char=0.002, latency=0.02, max_concurrency=ACCOUNT_LIMIT)
    await second.start()
    try:
        adaptive = await _fleet(second, tmp_path, adaptive=True)
    finally:
        await second.stop()
    print(f"\n429 concurrency refusals: fixed {fixed.refusals}, adaptive {adaptive.refusals}; "
          f"peak in flight (arrivals included) fixed {fixed.peak_in_flight}, adaptive "
          f"{adaptive.peak_in_flight}; peak served {fixed.peak_admitted}/"
          f"{adaptive.peak_admitted}; lowest limits {adaptive.lowest_limits}; fleet limit "
          f"at the end {adaptive.limit_sums[-1]}, mean "
          f"{sum(adaptive.limit_sums) / len(adaptive.limit_sums):.2f}")

    # every request of both fleets succeeded, with the same audio
    texts = {f"Instance {i} says message number {n}." for i in range(INSTANCES)
             for n in range(REQUESTS_EACH)}
    assert set(fixed.audio) == set(adaptive.audio) == texts
    assert fixed.audio == adaptive.audio
    assert all(audio == second.audio_sent(text) for text, audio in adaptive.audio.items())
    # the account's limit held: never more than 3 served at once
    assert fixed.peak_admitted == adaptive.peak_admitted == ACCOUNT_LIMIT
    # each instance met a refusal at the start (12 sent, 3 admitted) and cut its limit
    assert all(lowest <= 2 for lowest in adaptive.lowest_limits)
    assert fixed.lowest_limits == [4, 4, 4]
    # fixed limits: 12 contend for 3 places all along (measured: 330-390 refusals);
    # adaptive: the first burst, then a few per probe upward (measured: 18-42)
    requests = INSTANCES * REQUESTS_EACH
    assert fixed.refusals > requests
    assert adaptive.refusals * 3 < fixed.refusals
    assert adaptive.refusals < requests
    assert any("ElevenLabs concurrency limit 4 -> 2" in r.getMessage() for r in caplog.records)
