"""Per-key ordering with concurrency across keys.

Two requests with the same key (one conversation) take their turns in fetch order;
requests with different keys run concurrently, even inside one partition. A request that
leaves its line early (cancelled, expired, failed) hands nothing to its successor but its
place: the successor still waits for every request ahead of it.

A live request that joins a line urges the turns ahead of it (:meth:`Turn.urge_ahead`): they
run at its priority (priority inheritance), since it cannot go before they are done.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable, Hashable

__all__ = ["KeyedTurns", "Turn"]


class Turn:
    """One place in a key's line: :meth:`wait` until it is first, :meth:`leave` when done
    (always, also when it never got to wait: the line must not wedge)."""

    def __init__(self, line: deque[Turn], forget: Callable[[], object]) -> None:
        self._line = line
        self._forget = forget
        self._go = asyncio.Event()
        self._left = False
        self._urged = False
        self._on_urged: list[Callable[[], object]] = []

    async def wait(self) -> None:
        """Returns once every earlier turn of the same key has left."""
        await self._go.wait()

    @property
    def first(self) -> bool:
        return self._go.is_set()

    def on_urged(self, callback: Callable[[], object]) -> None:
        """Calls ``callback`` once a turn behind this one urges it (at once if one did)."""
        if self._urged:
            callback()
        else:
            self._on_urged.append(callback)

    def urge_ahead(self) -> None:
        """Urges every turn ahead of this one in its line."""
        if self._left:
            return
        for turn in list(self._line):
            if turn is self:
                return
            turn._urge()

    def _urge(self) -> None:
        if self._urged:
            return
        self._urged = True
        callbacks, self._on_urged = self._on_urged, []
        for callback in callbacks:
            callback()

    def leave(self) -> None:
        """Gives up the place; the next in line may go when this one was first. Idempotent."""
        if self._left:
            return
        self._left = True
        was_first = self._line[0] is self
        self._line.remove(self)
        if not self._line:
            self._forget()
        elif was_first:
            self._line[0]._go.set()


class KeyedTurns:
    """The lines of every key with work in flight."""

    def __init__(self) -> None:
        self._lines: dict[Hashable, deque[Turn]] = {}

    def join(self, key: Hashable) -> Turn:
        """A place at the end of ``key``'s line. Call in fetch order (synchronously)."""
        line = self._lines.get(key)
        if line is None:
            line = self._lines[key] = deque()
        turn = Turn(line, lambda: self._lines.pop(key, None))
        line.append(turn)
        if len(line) == 1:
            turn._go.set()
        return turn

    @property
    def active_keys(self) -> int:
        return len(self._lines)
