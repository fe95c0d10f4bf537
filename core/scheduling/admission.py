"""Admission: how much work of each kind the engine takes in at once.

Each kind (image, voice, lora) has its own budget, so a full image budget holds back
images only. Within a kind:

- one owner (a conversation) holds at most ``per_owner`` slots, so others keep moving;
- background work holds at most ``background_share`` of the budget, so an interactive
  request always finds room without waiting for background work to drain;
- waiters are served interactive first, then owners in turn (round robin), each owner's
  waiters in the order they came; a background waiter whose request is promoted
  (:class:`~core.scheduling.placement.Promotion`) waits as interactive from then on.

Kafka work waits for a slot (:meth:`Admission.acquire`); HTTP asks once
(:meth:`Admission.try_acquire`) and answers 503 when there is none.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from core.scheduling.lanes import Lanes
from core.scheduling.placement import Priority, Promotion

__all__ = ["Admission"]


@dataclass
class _Kind:
    budget: int
    background_limit: int
    used: int = 0
    used_background: int = 0
    by_owner: dict[str, int] = field(default_factory=dict)
    waiting: Lanes = field(default_factory=Lanes)


class Admission:
    """Slots of work per kind; not thread-safe (the event loop's)."""

    def __init__(self, budgets: Mapping[str, int], *, per_owner: int,
                 background_share: float = 0.5) -> None:
        if per_owner < 1:
            raise ValueError(f"MAX_IN_FLIGHT_PER_CONVERSATION must be >= 1, got {per_owner}")
        if not 0 < background_share <= 1:
            raise ValueError(f"background_share must be in (0, 1], got {background_share}")
        self._per_owner = per_owner
        self._kinds: dict[str, _Kind] = {}
        for kind, budget in budgets.items():
            if budget < 1:
                raise ValueError(f"MAX_IN_FLIGHT_{kind.upper()} must be >= 1, got {budget}")
            self._kinds[kind] = _Kind(budget, max(1, int(budget * background_share)))

    def in_use(self, kind: str) -> int:
        return self._kinds[kind].used

    def waiting(self, kind: str) -> int:
        return len(self._kinds[kind].waiting)

    def try_acquire(self, kind: str, owner: str, priority: Priority) -> bool:
        """Takes a slot now if one is free for ``owner`` at ``priority`` and nobody of the
        same or a higher priority who could take it is waiting; False otherwise (a waiter
        held back by its own conversation's share does not hold others back)."""
        state = self._kinds[kind]
        if not self._fits(state, owner, priority):
            return False
        self._grant(state)  # waiters first, when they can go
        if not self._fits(state, owner, priority):
            return False
        self._take(state, owner, priority)
        return True

    async def acquire(self, kind: str, owner: str, priority: Priority,
                      promotion: Promotion | None = None) -> Priority:
        """Waits for a slot (see the module's rules) and returns the priority it was taken
        at, which :meth:`release` must be given: interactive when ``promotion`` was set
        before the slot was granted. Cancellation-safe: a cancelled waiter holds nothing."""
        if promotion is not None and promotion.is_set():
            priority = Priority.INTERACTIVE
        if self.try_acquire(kind, owner, priority):
            return priority
        state = self._kinds[kind]
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        state.waiting.add(priority, owner, waiter)
        waits_as = state.waiting.follow(promotion, priority, owner, waiter,
                                        lambda: self._grant(state))
        try:
            await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release(kind, owner, waits_as())  # granted as it was cancelled
            else:
                state.waiting.remove(waits_as(), owner, waiter)
                self._grant(state)
            raise
        return waits_as()

    def release(self, kind: str, owner: str, priority: Priority) -> None:
        """Gives a slot back and hands free slots to waiters."""
        state = self._kinds[kind]
        state.used -= 1
        if priority is Priority.BACKGROUND:
            state.used_background -= 1
        left = state.by_owner[owner] - 1
        if left:
            state.by_owner[owner] = left
        else:
            del state.by_owner[owner]
        self._grant(state)

    @asynccontextmanager
    async def slot(self, kind: str, owner: str, priority: Priority,
                   promotion: Promotion | None = None) -> AsyncIterator[None]:
        """``async with admission.slot(...)``: :meth:`acquire`, then :meth:`release`."""
        taken = await self.acquire(kind, owner, priority, promotion)
        try:
            yield
        finally:
            self.release(kind, owner, taken)

    # --- inside ---

    def _fits(self, state: _Kind, owner: str, priority: Priority) -> bool:
        if state.used >= state.budget or state.by_owner.get(owner, 0) >= self._per_owner:
            return False
        return priority is Priority.INTERACTIVE or state.used_background < state.background_limit

    def _take(self, state: _Kind, owner: str, priority: Priority) -> None:
        state.used += 1
        if priority is Priority.BACKGROUND:
            state.used_background += 1
        state.by_owner[owner] = state.by_owner.get(owner, 0) + 1

    def _grant(self, state: _Kind) -> None:
        # One slot at a time, always from the top: interactive first, then the owner that
        # waited longest since it was last served (served owners move to the end).
        while state.used < state.budget and self._grant_one(state):
            pass

    def _grant_one(self, state: _Kind) -> bool:
        for priority in state.waiting.priorities:
            for owner in state.waiting.owners(priority):
                if not self._fits(state, owner, priority):
                    continue  # this owner (or background) is at its share; others may go
                self._take(state, owner, priority)
                state.waiting.serve(priority, owner).set_result(None)
                return True
        return False
