"""One piece of work for every caller that asks for the same thing at the same time.

A redelivered record, a replay racing the original, or the same request over Kafka and
HTTP: while an output (an image, a voice file) is being made, a second caller with the
same key waits for that work instead of computing it, or paying the upstream, twice. The
work belongs to no single caller: it goes on while anyone still waits. When the last
waiting caller is cancelled, the work is cancelled too, unless that caller's
:class:`Keeper` keeps it (a request that will come again: its result lands where the work
keeps it, a result cache, for that next delivery, which joins the work if it still runs).
Kept work stays its keeper's: it is cancelled when no caller waits and no keeper wants it
any more (the request was cancelled meanwhile), and every keeper is released when it ends.

Work that waits in a queue before its real work begins (an image for the GPU) reports its
start once (:meth:`SharedWork.start_signal`): every caller then attached is told, and so is
each one that joins later, so that a caller who joined queued work stops waiting (its
deadline, the queue depth) when the work starts, not only the caller who queued it.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar

__all__ = ["Keeper", "SharedWork"]

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Keeper(Protocol):
    """A caller's say over the work it leaves running alone (``keep_when_abandoned``)."""

    def keeps(self) -> bool:
        """Asked when the caller goes away while the work runs and nobody else waits for
        it: True keeps the work going (the caller's request comes again)."""
        ...

    async def dropped(self) -> None:
        """While the work is kept: returns once the caller no longer wants it (its request
        was cancelled)."""
        ...

    def released(self) -> None:
        """The kept work ended, however (made, failed or stopped); called once."""
        ...


class _Start:
    """The start of one piece of work, told to each caller attached to it, once: those
    attached when it happens, from the thread that reports it, and those attaching after,
    at once. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._happened = False
        self._told: dict[object, Callable[[], None]] = {}

    def attach(self, on_start: Callable[[], None]) -> object:
        """Tells ``on_start`` of the start; returns a token for :meth:`detach`."""
        token = object()
        with self._lock:
            if not self._happened:
                self._told[token] = on_start
                return token
        _tell(on_start)
        return token

    def detach(self, token: object) -> None:
        """A caller gone before the start is not told of it."""
        with self._lock:
            self._told.pop(token, None)

    def happen(self) -> None:
        """Reports the start; later calls do nothing."""
        with self._lock:
            if self._happened:
                return
            self._happened = True
            told, self._told = list(self._told.values()), {}
        for on_start in told:
            _tell(on_start)


def _tell(on_start: Callable[[], None]) -> None:
    try:
        on_start()
    except Exception:  # one caller's metrics must not keep the others from being told
        logger.exception("a start callback failed")


@dataclass(eq=False)
class _Work(Generic[T]):
    task: asyncio.Task[T]
    start: _Start
    waiters: int = 0
    # callers gone whose request comes again, each with the task watching for its drop
    kept: list[tuple[Keeper, asyncio.Task[None]]] = field(default_factory=list)

    def still_kept(self, besides: Keeper | None = None) -> bool:
        """Whether a keeper other than ``besides`` still wants it."""
        return any(not watch.done() for keeper, watch in self.kept if keeper is not besides)


class SharedWork(Generic[T]):
    """Work in progress by key; ``name`` says what it makes, in log lines. Used from one
    event loop."""

    def __init__(self, name: str = "work") -> None:
        self._name = name
        self._work: dict[str, _Work[T]] = {}

    def __len__(self) -> int:
        return len(self._work)

    def running(self, key: str) -> bool:
        """Whether work for ``key`` is in progress (a caller would join it)."""
        work = self._work.get(key)
        return work is not None and not work.task.done() and not work.task.cancelling()

    async def run(self, key: str, make: Callable[[], Awaitable[T]], *,
                  keep_when_abandoned: Keeper | None = None,
                  on_start: Callable[[], None] | None = None) -> T:
        """The result of the work for ``key``: joined when in progress, else ``make()``
        started as a task of its own. Raises what the work raised.

        ``on_start`` (quick, thread-safe) is called once when the work reports its real
        start (:meth:`start_signal`), at once when it joins work already started, and not
        when this caller is gone before then (unless its keeper kept the work).

        Cancelling this caller cancels the work only when no other caller waits for it,
        no earlier caller's keeper still wants it and ``keep_when_abandoned`` (asked then)
        is absent or does not keep it; when it keeps it, the work goes on alone, a caller
        that comes later joins it, and it is cancelled once that keeper is dropped with
        nobody else wanting it."""
        work = self._work.get(key)
        if work is None or work.task.done() or work.task.cancelling():  # not a dying one
            work = _Work(asyncio.ensure_future(make()), _Start())
            self._work[key] = work
            work.task.add_done_callback(lambda _: self._ended(key, work))
        else:
            logger.info("a request joins the same %s being made", self._name)
        token = work.start.attach(on_start) if on_start is not None else None
        kept = False
        work.waiters += 1
        try:
            return await asyncio.shield(work.task)
        except asyncio.CancelledError:
            if work.waiters == 1 and not work.task.done() and not work.task.cancelling():
                if keep_when_abandoned is not None and keep_when_abandoned.keeps():
                    logger.info("an abandoned %s is still made: it is kept for the "
                                "request's next delivery", self._name)
                    kept = True
                    work.kept.append((keep_when_abandoned, asyncio.ensure_future(
                        self._stop_when_dropped(work, keep_when_abandoned))))
                elif not work.still_kept():
                    work.task.cancel()
            raise
        finally:
            work.waiters -= 1
            if token is not None and not kept:
                work.start.detach(token)

    def start_signal(self, key: str) -> Callable[[], None]:
        """What the work for ``key`` calls, from any thread, when its real work starts
        (an image taken by the GPU): each caller's ``on_start`` is then called, once.
        Called from that work's ``make()``, while it is the work for ``key``; raises
        ``KeyError`` when no work for ``key`` is in progress."""
        return self._work[key].start.happen

    async def _stop_when_dropped(self, work: _Work[T], keeper: Keeper) -> None:
        await keeper.dropped()
        if work.waiters == 0 and not work.still_kept(besides=keeper) \
                and not work.task.done():
            logger.info("a kept %s is no longer wanted (its request was cancelled): "
                        "stopped", self._name)
            work.task.cancel()

    def _ended(self, key: str, work: _Work[T]) -> None:
        if self._work.get(key) is work:
            del self._work[key]
        for keeper, watch in work.kept:
            watch.cancel()
            keeper.released()
        if not work.task.cancelled() and work.task.exception() is not None \
                and work.waiters == 0:
            logger.warning("abandoned %s failed: %s", self._name, work.task.exception())
