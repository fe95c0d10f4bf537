"""Which requests were answered completed, and with which remembered result.

A service that returns a result for a request (made, or from its remembered results)
records ``request_id → the result's key`` here before the caller publishes it, so that the
same request coming again (a redelivery after the instance that completed it died before
committing it) can be told apart from a new request with the same content: only the first
is answered again from the remembered results once it is cancelled or past its deadline
(:meth:`Answers.answered_with`); a new one is answered CANCELLED or EXPIRED as ever.

The record is kept like the remembered results themselves
(:class:`~core.remembered.RememberedResults`: one small JSON object per request in a local
folder, bounded, and in the shared store under its namespace, so that whichever instance
of the fleet gets the redelivery finds it).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from core.remembered import RememberedResults

__all__ = ["Answers"]

logger = logging.getLogger(__name__)


class Answers:
    """Request ids and the result keys they were answered with, in ``store``."""

    def __init__(self, store: RememberedResults) -> None:
        self._store = store

    async def record(self, request_id: str | None, key: str) -> None:
        """Remembers that ``request_id`` was answered with the result under ``key``, here
        and in the shared store (done when this returns), off the event loop. A record that
        cannot be written is only logged: the answer is fine, only a late redelivery of it
        will be answered failed. Nothing for a request without an id."""
        if not request_id:
            return
        try:
            await asyncio.to_thread(self._store.put, _name(request_id),
                                    {"request_id": request_id, "key": key})
        except OSError as exc:
            logger.warning("request_id=%s: its answer not recorded: %s", request_id, exc)

    async def answered_with(self, request_id: str | None, key: str) -> bool:
        """Whether ``request_id`` was answered with the result under ``key`` (the same
        content as then); off the event loop when the shared store may be asked."""
        if not request_id:
            return False

        def look() -> bool:
            found = self._store.get(_name(request_id))
            return found is not None and found.get("request_id") == request_id \
                and found.get("key") == key

        return await asyncio.to_thread(look) if self._store.shared else look()


def _name(request_id: str) -> str:
    """A request id as a file and object name: any string a caller sent becomes hex."""
    return hashlib.sha256(request_id.encode()).hexdigest()
