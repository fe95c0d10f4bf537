"""Whom a voice call is made for: the place in line its upstream calls queue as.

A request's place (:class:`~core.scheduling.placement.Placement`: its priority and owner,
the conversation) is known where it is scheduled, the consume loop's handler or the HTTP
endpoint, not by the voice service in between, which speaks the same for both. The code
that schedules a request runs its voice work inside :func:`queued_as`; the ElevenLabs
backend reads :func:`current_placement` when a call begins, and its upstream requests wait
for a slot as that owner at that priority (:class:`~core.voice.concurrency.AdaptiveLimit`).
Work outside any (a warm-up, a script) is interactive, of the shared owner ``""``.

The place is a context variable: it follows the work into the tasks it starts, and
concurrent requests each see their own.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from core.scheduling.placement import Placement

__all__ = ["current_placement", "queued_as"]

_ANYONE = Placement()  # interactive, the shared owner (frozen: safe to share)

_current: ContextVar[Placement] = ContextVar("voice_placement", default=_ANYONE)


@contextmanager
def queued_as(placement: Placement) -> Iterator[None]:
    """Within the block (and the tasks it starts), voice calls queue as ``placement``."""
    token = _current.set(placement)
    try:
        yield
    finally:
        _current.reset(token)


def current_placement() -> Placement:
    """The place the voice work running now queues as (see the module docstring)."""
    return _current.get()
