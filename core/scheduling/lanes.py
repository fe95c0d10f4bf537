"""Waiters in line for a place, the one shape admission (:mod:`core.scheduling.admission`)
and the ElevenLabs slots (:mod:`core.voice.concurrency`) share: by priority (interactive
first), then by owner (a conversation), owners in serving order (the one served last goes
to the end), each owner's waiters in arrival order. A background waiter whose request is
promoted (:class:`~core.scheduling.placement.Promotion`) moves to the interactive lane.
Which owner goes next, and whether it may, is the user's rule. The event loop's; not
thread-safe."""

from __future__ import annotations

import asyncio
from collections import OrderedDict, deque
from collections.abc import Callable

from core.scheduling.placement import Priority, Promotion

__all__ = ["Lanes"]

Waiter = asyncio.Future[None]


class Lanes:
    def __init__(self) -> None:
        self._lanes: dict[Priority, OrderedDict[str, deque[Waiter]]] = {
            priority: OrderedDict() for priority in sorted(Priority, key=lambda p: p.rank)}

    def __len__(self) -> int:
        """Waiters in line (those withdrawn but not yet passed over included)."""
        return sum(len(waiters) for lane in self._lanes.values() for waiters in lane.values())

    def __bool__(self) -> bool:
        return any(self._lanes.values())

    @property
    def priorities(self) -> list[Priority]:
        """The lanes' priorities, the first served first."""
        return list(self._lanes)

    def add(self, priority: Priority, owner: str, waiter: Waiter) -> None:
        self._lanes[priority].setdefault(owner, deque()).append(waiter)

    def remove(self, priority: Priority, owner: str, waiter: Waiter) -> None:
        """Takes ``waiter`` out of ``owner``'s line at ``priority``, if it is there."""
        waiters = self._lanes[priority].get(owner)
        if waiters is not None and waiter in waiters:
            waiters.remove(waiter)
            if not waiters:
                del self._lanes[priority][owner]

    def owners(self, priority: Priority) -> list[str]:
        """The owners waiting at ``priority``, in serving order; waiters done meanwhile
        (cancelled) are dropped on the way."""
        lane = self._lanes[priority]
        for owner in list(lane):
            waiters = lane[owner]
            while waiters and waiters[0].done():
                waiters.popleft()
            if not waiters:
                del lane[owner]
        return list(lane)

    def serve(self, priority: Priority, owner: str) -> Waiter:
        """``owner``'s first waiter at ``priority``, out of line; the owner goes to the end
        of its lane (or leaves it, with nobody left)."""
        lane = self._lanes[priority]
        waiters = lane[owner]
        waiter = waiters.popleft()
        if waiters:
            lane.move_to_end(owner)
        else:
            del lane[owner]
        return waiter

    def follow(self, promotion: Promotion | None, priority: Priority, owner: str,
               waiter: Waiter, moved: Callable[[], None]) -> Callable[[], Priority]:
        """Moves ``waiter`` (in line at ``priority``) to the interactive lane when
        ``promotion`` is set while it waits, then calls ``moved``; returns the priority it
        waits at now."""
        at = priority

        def promote() -> None:  # from the event loop, like everything here
            nonlocal at
            if waiter.done() or at is Priority.INTERACTIVE:
                return
            self.remove(at, owner, waiter)
            at = Priority.INTERACTIVE
            self.add(at, owner, waiter)
            moved()

        if promotion is not None and priority is not Priority.INTERACTIVE:
            promotion.watch(promote)
        return lambda: at
