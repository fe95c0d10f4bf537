"""Who gets the next ElevenLabs slot: interactive before background, then conversation by
conversation (the one holding the fewest first), and a long text never takes every slot.
First the limit on its own (core/voice/concurrency.py), then the backend against a local
ElevenLabs that holds each request until the test lets it go, so that the order in which
upstream sees the requests is decided by the engine alone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiohttp import web
from pydantic import SecretStr

from core.scheduling import Placement, Priority, Promotion
from core.voice import ElevenLabsBackend, VoiceSettings, queued_as
from core.voice.chunking import split_text
from core.voice.concurrency import AdaptiveLimit
from tests.support.elevenlabs_server import DEFAULT_KEY, ElevenLabsServer

RACHEL = "21m00Tcm4TlvDq8ikWAM"
BACKGROUND = Priority.BACKGROUND
INTERACTIVE = Priority.INTERACTIVE


async def _yield(times: int = 5) -> None:
    """Let every ready task run (no time passes: a turn of the loop, not a wait)."""
    for _ in range(times):
        await asyncio.sleep(0)


class Holders:
    """Tasks taking slots of a limit as an owner at a priority, in the order they entered,
    each holding its slot until told to leave."""

    def __init__(self, limit: AdaptiveLimit) -> None:
        self.limit = limit
        self.entered: list[str] = []
        self._leave: dict[str, asyncio.Event] = {}
        self.tasks: dict[str, asyncio.Task[None]] = {}

    def start(self, name: str, owner: str, priority: Priority = INTERACTIVE,
              promotion: Promotion | None = None) -> None:
        self._leave[name] = asyncio.Event()
        self.tasks[name] = asyncio.create_task(self._hold(name, owner, priority, promotion))

    async def _hold(self, name: str, owner: str, priority: Priority,
                    promotion: Promotion | None) -> None:
        async with self.limit.slot(owner, priority, promotion):
            self.entered.append(name)
            await self._leave[name].wait()

    async def leave(self, name: str) -> None:
        self._leave[name].set()
        await asyncio.wait_for(self.tasks[name], 5)
        await _yield()  # the slot's next holder runs its first step


# --- the limit on its own ---


async def test_interactive_waiters_go_before_background_ones_whoever_came_first() -> None:
    holders = Holders(AdaptiveLimit(1))
    holders.start("replay-0", "old-chat-0", BACKGROUND)
    await _yield()
    for n in (1, 2, 3):
        holders.start(f"replay-{n}", f"old-chat-{n}", BACKGROUND)
    holders.start("live", "chat", INTERACTIVE)
    await _yield()
    assert holders.entered == ["replay-0"]
    for name in ("replay-0", "live", "replay-1", "replay-2"):
        await holders.leave(name)
    assert holders.entered == ["replay-0", "live", "replay-1", "replay-2", "replay-3"]
    await holders.leave("replay-3")


async def test_a_promoted_background_waiter_moves_to_the_interactive_line() -> None:
    """A live request of the chat waits behind its background story: the story's waiter,
    already in line, goes before the background waiters that came before it, and so does
    one of the chat's that queues once the promotion is set."""
    holders = Holders(AdaptiveLimit(1))
    promotion = Promotion()
    holders.start("live", "elsewhere")
    await _yield()
    holders.start("replay", "old-chat", BACKGROUND)
    holders.start("story", "chat", BACKGROUND, promotion)
    await _yield()
    promotion.set()
    holders.start("story-later", "chat", BACKGROUND, promotion)
    await _yield()
    await holders.leave("live")
    assert holders.entered == ["live", "story"]
    await holders.leave("story")
    assert holders.entered == ["live", "story", "story-later"]
    for name in ("story-later", "replay"):
        await holders.leave(name)
    assert holders.limit.in_flight == 0


async def test_the_owner_holding_fewest_slots_goes_next_owners_in_turn_among_equals() -> None:
    limit = AdaptiveLimit(2)
    holders = Holders(limit)
    for name in ("a0", "a1"):
        holders.start(name, "A")  # A fills the limit
    await _yield()
    for name, owner in (("a2", "A"), ("a3", "A"), ("b0", "B"), ("c0", "C")):
        holders.start(name, owner)
    await _yield()
    assert holders.entered == ["a0", "a1"]
    await holders.leave("a0")  # A holds 1, B and C none: B, the first of them to come
    await holders.leave("a1")  # A and C hold none: A's turn came before C's
    await holders.leave("b0")  # A holds 1, C none
    await holders.leave("a2")
    assert holders.entered == ["a0", "a1", "b0", "a2", "c0", "a3"]
    for name in ("c0", "a3"):
        await holders.leave(name)
    assert limit.in_flight == 0


async def test_a_cancelled_waiter_of_one_owner_leaves_the_turns_of_the_others_intact() -> None:
    limit = AdaptiveLimit(1)
    holders = Holders(limit)
    holders.start("a0", "A")
    await _yield()
    holders.start("b0", "B")
    holders.start("c0", "C")
    await _yield()
    holders.tasks["b0"].cancel()
    await asyncio.gather(holders.tasks["b0"], return_exceptions=True)
    await holders.leave("a0")
    assert holders.entered == ["a0", "c0"]
    await holders.leave("c0")
    assert limit.in_flight == 0
    async with limit.slot("B"):  # free at once
        assert limit.in_flight == 1


# --- in the backend, against upstream ---


class HoldingServer(ElevenLabsServer):
    """The local ElevenLabs, noting each speech request's text as it arrives and holding
    it until :meth:`release` lets it go (:meth:`release_all`: every one, now and later)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.arrived: list[str] = []
        self._held: list[asyncio.Event] = []
        self._all = asyncio.Event()
        self._changed = asyncio.Event()

    async def _tts(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()  # aiohttp keeps the body: the server reads it again
        go = asyncio.Event()
        self.arrived.append(body["text"])
        self._held.append(go)
        self._changed.set()
        if not self._all.is_set():
            await asyncio.wait([asyncio.ensure_future(go.wait()),
                                asyncio.ensure_future(self._all.wait())],
                               return_when=asyncio.FIRST_COMPLETED)
        return await super()._tts(request)

    async def until(self, ready: Callable[[list[str]], bool], timeout: float = 10) -> None:
        """Waits until ``ready(arrived)`` holds, checked at every arrival."""
        async def watch() -> None:
            while not ready(self.arrived):
                self._changed.clear()
                await self._changed.wait()

        await asyncio.wait_for(watch(), timeout)

    def release(self, index: int) -> None:
        self._held[index].set()

    def release_all(self) -> None:
        self._all.set()

    async def stop(self) -> None:
        self.release_all()
        await super().stop()


@pytest.fixture
async def holding() -> AsyncIterator[HoldingServer]:
    server = HoldingServer(seconds_per_char=0.0002)
    await server.start()
    try:
        yield server
    finally:
        await server.stop()


def backend_on(http: httpx.AsyncClient, server: ElevenLabsServer) -> ElevenLabsBackend:
    return ElevenLabsBackend(http, server.api_url, SecretStr(DEFAULT_KEY), max_concurrency=4,
                             timeout=httpx.Timeout(10.0))


async def speak_as(backend: ElevenLabsBackend, placement: Placement, path: Path, text: str,
                   model_id: str | None = None) -> bytes:
    with queued_as(placement):
        await backend.synthesize_to(path, text, VoiceSettings(RACHEL, model_id=model_id, seed=7))
    return path.read_bytes()


STORY = " ".join(f"This is sentence {n} of a long story that the character tells at length."
                 for n in range(260))  # 20,000 characters: ten eleven_v3 parts
LINE = "Are you there?"


async def test_a_long_text_leaves_a_slot_for_another_conversations_line(
    http: httpx.AsyncClient, holding: HoldingServer, server: ElevenLabsServer, tmp_path: Path,
) -> None:
    backend = backend_on(http, holding)
    parts = split_text(STORY, 2000)
    assert len(parts) >= 10
    story = asyncio.create_task(speak_as(backend, Placement(owner="storyteller"),
                                         tmp_path / "story.mp3", STORY, "eleven_v3"))
    await holding.until(lambda arrived: len(arrived) >= 1)  # the story is being told
    line = asyncio.create_task(speak_as(backend, Placement(owner="victim"),
                                        tmp_path / "line.mp3", LINE))
    # upstream holds every request: the line arrives now, or never while they are held
    await holding.until(lambda arrived: LINE in arrived
                        or len(arrived) >= backend.concurrency_limit)
    seen = list(holding.arrived)
    holding.release_all()
    told, _ = await asyncio.wait_for(asyncio.gather(story, line), 60)
    assert LINE in seen, (f"the line waited behind the story: upstream was asked for "
                          f"{len(seen)} of its parts and nothing else")
    assert seen.index(LINE) <= 2  # at most two of the story's parts went before it
    assert sorted(t for t in holding.arrived if t != LINE) == sorted(parts)

    # the story told alone, every part at once on a backend of its own: the same file
    alone = ElevenLabsBackend(http, server.api_url, SecretStr(DEFAULT_KEY), max_concurrency=32,
                              timeout=httpx.Timeout(10.0))
    server.seconds_per_char = holding.seconds_per_char
    assert told == await speak_as(alone, Placement(), tmp_path / "alone.mp3", STORY,
                                  "eleven_v3")


async def test_a_live_line_goes_before_a_replays_backlog_at_the_upstream_limit(
    http: httpx.AsyncClient, holding: HoldingServer, tmp_path: Path,
) -> None:
    backend = backend_on(http, holding)
    backlog = [f"Line number {n} of an old chat." for n in range(10)]
    replays = [asyncio.create_task(speak_as(
        backend, Placement(priority=BACKGROUND, owner=f"old-chat-{n}"),
        tmp_path / f"old-{n}.mp3", text)) for n, text in enumerate(backlog)]
    await holding.until(lambda arrived: len(arrived) >= backend.concurrency_limit)
    live = asyncio.create_task(speak_as(backend, Placement(owner="chat"),
                                        tmp_path / "live.mp3", LINE))
    await _yield()  # it queues for a slot (nothing before that waits)
    holding.release(0)  # one slot comes free
    await holding.until(lambda arrived: len(arrived) > backend.concurrency_limit)
    upstream_order = list(holding.arrived)
    holding.release_all()
    await asyncio.wait_for(asyncio.gather(live, *replays), 60)
    assert upstream_order[backend.concurrency_limit] == LINE, upstream_order


async def test_a_promoted_background_line_goes_before_the_replays_queued_before_it(
    http: httpx.AsyncClient, holding: HoldingServer, tmp_path: Path,
) -> None:
    """A background line of the chat waits for a slot behind a replay's; a live request of
    the chat then waits behind it (promoted): the next free slot is the chat's."""
    backend = ElevenLabsBackend(http, holding.api_url, SecretStr(DEFAULT_KEY),
                                max_concurrency=1, timeout=httpx.Timeout(10.0))
    busy = asyncio.create_task(speak_as(backend, Placement(owner="elsewhere"),
                                        tmp_path / "busy.mp3", "Busy elsewhere."))
    await holding.until(lambda arrived: len(arrived) >= 1)  # the one slot is taken
    replay = asyncio.create_task(speak_as(
        backend, Placement(priority=BACKGROUND, owner="old-chat"), tmp_path / "old.mp3",
        "A line of an old chat."))
    await _yield()  # it queues for the slot
    promotion = Promotion()
    chat = asyncio.create_task(speak_as(
        backend, Placement(priority=BACKGROUND, owner="chat", promotion=promotion),
        tmp_path / "chat.mp3", LINE))
    await _yield()  # it queues behind the replay, both background
    promotion.set()  # a live request of the chat now waits behind it
    holding.release(0)  # the slot comes free
    await holding.until(lambda arrived: len(arrived) >= 2)
    upstream_order = list(holding.arrived)
    holding.release_all()
    await asyncio.wait_for(asyncio.gather(busy, replay, chat), 60)
    assert upstream_order == ["Busy elsewhere.", LINE], upstream_order
