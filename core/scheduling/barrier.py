"""The read barrier on cancels: work never starts ahead of a cancel published before it.

A cancel may be published just before its request, on ``generation.control``, which every
instance reads on its own. Nothing orders that reading against the request topics, so a
request could start (or be answered from a result cache) while the cancel that names it is
still unread. A :class:`ReadMark` is taken when a request arrives (once per Kafka fetch, so
one offsets lookup serves every record of that fetch); before the request's work starts it
waits for :meth:`ReadMark.reached`: every control record published before the mark was
taken has then been applied, and a cancel among them has marked the request.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from core.scheduling.pending import PendingRequest
from schemas.errors import RequestCancelledError

__all__ = ["ReadBarrier", "ReadMark", "cancels_read"]


class ReadMark(Protocol):
    async def reached(self) -> None:
        """Returns once every control record published before this mark was taken has
        been applied; or, after the barrier's bounded wait (or a broker error), anyway,
        having logged that it went ahead. Never raises but ``CancelledError``."""


ReadBarrier = Callable[[], ReadMark]
"""Takes a :class:`ReadMark` now."""


async def cancels_read(mark: ReadMark | None, request: PendingRequest) -> None:
    """Waits for ``mark`` (none: nothing to wait for); raises
    :class:`RequestCancelledError` when a cancel read by then names ``request``, at once:
    its supervisor would see the mark only a step later, with the work already begun."""
    if mark is not None:
        await mark.reached()
    if request.cancelled.is_set():
        raise RequestCancelledError(f"request {request.request_id} was cancelled")
