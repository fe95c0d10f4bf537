"""How one request is placed in the engine's queues: its priority, its owner (the unit of
round robin, a conversation) and its deadline.

Interactive work (a live chat) always goes before background work (an explicit
``priority: background``, or a record old enough to be a replay); within a priority, owners
take turns. A background request that a live request of its conversation waits behind is
promoted to interactive (:class:`Promotion`, priority inheritance), so that the live one
never waits at background priority. A request not started by its deadline is answered
``EXPIRED`` without work.

Work shared by several requests (twins with the same content, a redelivery joining kept
work) is placed for all of them (:class:`JointPlacement`): interactive once any of them is,
and expired only past the latest of their deadlines (never while one has none).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum

from core.shared_work import Keeper
from schemas.errors import InvalidRequestError
from schemas.events import parse_instant

__all__ = ["JointPlacement", "Placement", "Priority", "Promotion", "deadline_of",
           "effective_priority"]


class Priority(StrEnum):
    """Scheduling class; the wire values of the events' ``priority`` field."""

    INTERACTIVE = "interactive"
    BACKGROUND = "background"

    @property
    def rank(self) -> int:
        """0 is served first."""
        return 0 if self is Priority.INTERACTIVE else 1


class Promotion:
    """A background request raised to interactive, once: a live request of its conversation
    waits behind it (priority inheritance). The queues holding the request watch it and
    move it to their interactive line. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._set = False
        self._watchers: list[Callable[[], None]] = []

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        """Promotes; calls the watchers, in this thread. Idempotent."""
        with self._lock:
            if self._set:
                return
            self._set = True
            watchers, self._watchers = self._watchers, []
        for watcher in watchers:
            watcher()

    def watch(self, callback: Callable[[], None]) -> None:
        """Calls ``callback`` once promoted: from :meth:`set`'s thread, or at once when
        already promoted. It must be quick, and harmless when its work is gone."""
        with self._lock:
            if not self._set:
                self._watchers.append(callback)
                return
        callback()


@dataclass(frozen=True)
class Placement:
    """Where a request stands in line.

    ``deadline`` is wall-clock epoch seconds (``time.time()``), or ``None``.
    ``on_start`` is called once, from whichever thread starts the work, when the request
    leaves its queue for real work (the queue-wait metric); it must be quick and
    thread-safe. ``keep_when_abandoned`` is asked when the caller goes away while the work
    runs (:class:`~core.shared_work.Keeper`): keeping it (a revoke or a stop: the request
    will come again) lets the work finish into the result cache, unless the request is
    cancelled meanwhile; not keeping it, or absent (a cancel, an HTTP client gone), stops it.
    ``promotion``, when set, makes a background request interactive (:class:`Promotion`).
    ``joint``, for work shared by several requests, replaces ``deadline`` with theirs
    (:class:`JointPlacement`); its ``promotion`` is then the joint one.
    """

    priority: Priority = Priority.INTERACTIVE
    owner: str = ""
    deadline: float | None = None
    on_start: Callable[[], None] | None = None
    keep_when_abandoned: Keeper | None = None
    promotion: Promotion | None = None
    joint: JointPlacement | None = None

    def priority_now(self) -> Priority:
        """``priority``, or interactive once promoted."""
        if self.promotion is not None and self.promotion.is_set():
            return Priority.INTERACTIVE
        return self.priority

    def deadline_now(self) -> float | None:
        """``deadline``, or the joint one of the requests sharing the work."""
        return self.joint.deadline() if self.joint is not None else self.deadline

    def expired(self, now: float | None = None) -> bool:
        """True when the deadline (:meth:`deadline_now`) has passed."""
        deadline = self.deadline_now()
        return deadline is not None and (time.time() if now is None else now) >= deadline

    def started(self) -> None:
        """Reports the start (see ``on_start``); safe to call when none is set."""
        if self.on_start is not None:
            self.on_start()


class JointPlacement:
    """The placement of one piece of work for every request attached to it: its
    :attr:`promotion` is set once one of them is (or becomes) interactive, and its
    :meth:`deadline` is the latest of theirs, ``None`` while one has none. A request that
    leaves no longer counts for the deadline, except the last one (its work is being
    dropped). A promotion is one-way, as every promotion of the scheduler is (priority
    inheritance in :mod:`consumers.keyed`): work lifted for an interactive request that
    then leaves stays interactive, at the cost of running one job early, never of delaying
    a live one. Thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._deadlines: dict[object, float | None] = {}
        self.promotion = Promotion()

    def join(self, placement: Placement) -> object:
        """Attaches a request placed as ``placement``; returns a token for :meth:`leave`."""
        token = object()
        with self._lock:
            self._deadlines[token] = placement.deadline_now()
        if placement.priority_now() is Priority.INTERACTIVE:
            self.promotion.set()
        elif placement.promotion is not None:
            placement.promotion.watch(lambda: self._promote(token))
        return token

    def leave(self, token: object) -> None:
        with self._lock:
            if len(self._deadlines) > 1:
                self._deadlines.pop(token, None)

    def deadline(self) -> float | None:
        with self._lock:
            deadlines = list(self._deadlines.values())
        if not deadlines or None in deadlines:
            return None
        return max(d for d in deadlines if d is not None)

    def _promote(self, token: object) -> None:
        with self._lock:
            attached = token in self._deadlines
        if attached:
            self.promotion.set()


def effective_priority(explicit: str | None, *, published_at: float, created_at: float | None,
                       replay_age: float, now: float | None = None) -> Priority:
    """The request's own ``priority`` when it says one; otherwise background when it was
    published (or created) more than ``replay_age`` seconds ago, a replay of old records,
    and interactive when it is live. Times are epoch seconds."""
    if explicit is not None:
        return Priority(explicit)
    born = published_at if created_at is None else min(published_at, created_at)
    current = time.time() if now is None else now
    return Priority.BACKGROUND if current - born > replay_age else Priority.INTERACTIVE


def deadline_of(value: str | None) -> float | None:
    """A request's ``deadline`` (ISO-8601; no offset means UTC) as epoch seconds, or
    ``None``. Raises :class:`InvalidRequestError` naming ``deadline`` for a value that is
    no instant."""
    if value is None:
        return None
    try:
        return parse_instant(value).timestamp()
    except (ValueError, OverflowError):
        raise InvalidRequestError("deadline: not a valid date-time", field="deadline") from None
