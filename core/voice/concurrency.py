"""A concurrency limit that adapts to an upstream's refusals (additive increase,
multiplicative decrease, as TCP does with its window).

ElevenLabs counts concurrent requests per account, while each engine instance knows only
its own. Instances that share an account and each fill their own fixed limit overrun the
account's and turn into a stream of 429 ``too_many_concurrent_requests``. Without talking to
each other they can still settle within it: each instance cuts its own limit when upstream
says the account is full and probes upward again slowly while it is not.

- **Decrease:** :meth:`Slot.overloaded` (a 429 for concurrency) halves the limit, never
  below ``floor``. One cut per congestion episode: only a request that started after the
  last cut can cut again, so the four answers of four requests refused together cut once,
  not four times.
- **Increase:** after ``grow_after`` successes (:meth:`Slot.succeeded`) of requests that
  started after the last cut and found the limit in full use, the limit grows by one, up
  to ``ceiling``. Successes while the limit was not reached prove nothing about a higher
  one, so a quiet instance does not creep back to its ceiling and burst into the account.
- **Fairness:** a slot is handed over on release, so a cut takes effect as the requests
  above it finish (none is interrupted). Waiters are served as the engine's other queues
  serve (:mod:`core.scheduling.admission`, :mod:`core.scheduling.gpu_queue`): interactive
  before background, then owners (conversations) in turn, the owner holding the fewest
  slots first, so that a chat's one line does not wait behind another chat's long text;
  each owner's waiters in arrival order. A background waiter whose request is promoted
  (:class:`~core.scheduling.placement.Promotion`: a live request of its conversation waits
  behind it) waits as interactive from then on, as in admission.
- **Fixed:** ``floor == ceiling`` is a plain semaphore of that size.

Each change of the limit is one INFO line. A limit lives on one event loop; it is not
thread-safe.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from core.scheduling.lanes import Lanes
from core.scheduling.placement import Priority, Promotion

__all__ = ["AdaptiveLimit", "Slot"]

logger = logging.getLogger(__name__)


class Slot:
    """One holder's place under an :class:`AdaptiveLimit`; say how the request went before
    leaving it (neither: a fault that says nothing about concurrency, such as a 500)."""

    __slots__ = ("_epoch", "_full", "_outcome")

    def __init__(self, epoch: int, full: int) -> None:
        self._epoch = epoch
        self._full = full  # the limit's count of times it was full, as this slot was asked for
        self._outcome: bool | None = None  # True: succeeded, False: overloaded

    def succeeded(self) -> None:
        """The request succeeded: evidence that the limit is not too high."""
        self._outcome = True

    def overloaded(self) -> None:
        """Upstream refused the request for concurrency: the limit is too high."""
        self._outcome = False


class AdaptiveLimit:
    """At most :attr:`limit` holders at once, the limit moving between ``floor`` and
    ``ceiling`` (see the module docstring); it starts at ``start`` (default ``ceiling``).
    ``name`` labels its log lines. Raises ``ValueError`` naming the argument unless
    ``1 <= floor <= start <= ceiling`` and ``grow_after >= 1``."""

    def __init__(self, ceiling: int, *, floor: int = 1, start: int | None = None,
                 grow_after: int = 10, name: str = "upstream") -> None:
        start = ceiling if start is None else start
        if floor < 1:
            raise ValueError(f"floor must be >= 1, got {floor}")
        if ceiling < floor:
            raise ValueError(f"ceiling must be >= floor ({floor}), got {ceiling}")
        if not floor <= start <= ceiling:
            raise ValueError(f"start must be within {floor}..{ceiling}, got {start}")
        if grow_after < 1:
            raise ValueError(f"grow_after must be >= 1, got {grow_after}")
        self._floor = floor
        self._ceiling = ceiling
        self._limit = start
        self._grow_after = grow_after
        self._name = name
        self._in_flight = 0
        self._epoch = 0  # advances on every cut: older requests cannot cut again
        self._run = 0  # successes counted towards the next increase
        self._full = 0  # times the limit was found in full use
        self._held: dict[str, int] = {}  # owner → slots it holds
        # priority → owner → its waiters; owners in turn order (the one served last last)
        self._waiting = Lanes()

    def __repr__(self) -> str:
        return (f"AdaptiveLimit({self._name}: {self._in_flight} in flight, limit "
                f"{self._limit} of {self._floor}..{self._ceiling})")

    @property
    def limit(self) -> int:
        """Holders allowed at once now."""
        return self._limit

    @property
    def ceiling(self) -> int:
        return self._ceiling

    @property
    def floor(self) -> int:
        return self._floor

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @asynccontextmanager
    async def slot(self, owner: str = "", priority: Priority = Priority.INTERACTIVE,
                   promotion: Promotion | None = None) -> AsyncIterator[Slot]:
        """Wait for a place (in the order the module docstring says, as ``owner`` at
        ``priority``; interactive once ``promotion`` is set, even while waiting), hold it
        for the block, and on leaving adapt the limit to what the
        block said through the :class:`Slot`. The slot counts towards growth if it found
        the limit in full use (it waited, or it filled the limit) or saw it so while it
        was held."""
        full = self._full
        await self._acquire(owner, priority, promotion)
        slot = Slot(self._epoch, full)
        if self._in_flight >= self._limit:
            self._full += 1
        try:
            yield slot
        finally:
            self._give_back(owner)
            self._settle(slot)
            self._wake()

    async def _acquire(self, owner: str, priority: Priority,
                       promotion: Promotion | None) -> None:
        if self._in_flight < self._limit and not self._waiting:
            self._take(owner)
            return
        self._full += 1
        if promotion is not None and promotion.is_set():
            priority = Priority.INTERACTIVE
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiting.add(priority, owner, waiter)
        waits_as = self._waiting.follow(promotion, priority, owner, waiter, self._wake)
        self._wake()  # room after a cut's holders left: it may be this waiter's
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # granted as it was cancelled
                self._give_back(owner)
                self._wake()
            raise
        finally:
            self._waiting.remove(waits_as(), owner, waiter)

    def _take(self, owner: str) -> None:
        self._in_flight += 1
        self._held[owner] = self._held.get(owner, 0) + 1

    def _give_back(self, owner: str) -> None:
        self._in_flight -= 1
        left = self._held[owner] - 1
        if left:
            self._held[owner] = left
        else:
            del self._held[owner]

    def _wake(self) -> None:
        """Hand free places to waiters: the highest priority first, then the owner holding
        the fewest places, owners in turn among equals (the one served goes to the end)."""
        while self._in_flight < self._limit:
            priority, owner = self._next_owner()
            if priority is None:
                return
            waiter = self._waiting.serve(priority, owner)
            self._take(owner)  # the place is the waiter's from now on
            waiter.set_result(None)

    def _next_owner(self) -> tuple[Priority | None, str]:
        """The priority and owner of the next waiter to serve (``None``: nobody waits)."""
        for priority in self._waiting.priorities:
            owners = self._waiting.owners(priority)
            if owners:
                return priority, min(owners, key=lambda owner: self._held.get(owner, 0))
        return None, ""

    def _settle(self, slot: Slot) -> None:
        if slot._outcome is False and slot._epoch == self._epoch:
            self._epoch += 1
            self._run = 0
            self._change(max(self._floor, self._limit // 2), "upstream refused for concurrency")
        elif slot._outcome is True and slot._full < self._full and slot._epoch == self._epoch:
            self._run += 1
            if self._run >= self._grow_after and self._limit < self._ceiling:
                self._run = 0
                self._change(self._limit + 1,
                             f"{self._grow_after} requests at the limit without a refusal")

    def _change(self, limit: int, why: str) -> None:
        if limit != self._limit:
            logger.info("%s concurrency limit %d -> %d (%s; ceiling %d)",
                        self._name, self._limit, limit, why, self._ceiling)
            self._limit = limit
