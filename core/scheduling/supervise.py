"""Running one request under its cancel mark and its deadline.

The same rules for Kafka and HTTP: a cancelled request stops where it is (queued work is
dropped, a GPU job stops at its next step) and is answered ``CANCELLED``; a request whose
deadline passes before its real work started is stopped and answered ``EXPIRED``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

from core.scheduling.pending import PendingRequest
from schemas.errors import RequestCancelledError, RequestExpiredError

__all__ = ["supervise"]

T = TypeVar("T")


async def supervise(request: PendingRequest, work: Coroutine[Any, Any, T], *,
                    clock: Callable[[], float] = time.time) -> T:
    """``await work``, unless ``request`` is cancelled first (raises
    :class:`RequestCancelledError`) or its deadline passes before it started (raises
    :class:`RequestExpiredError`); ``work`` is then cancelled and awaited, so whatever it
    held is released before this returns. Cancelling the caller cancels ``work`` too."""
    if request.cancelled.is_set() or _expired(request, clock):
        work.close()
        raise _stopped(request, clock)
    task = asyncio.ensure_future(work)
    watchers: list[asyncio.Future[Any]] = [asyncio.ensure_future(request.cancelled.wait())]
    if request.deadline is not None:
        watchers.append(asyncio.ensure_future(_expiry(request, clock)))
    try:
        await asyncio.wait([task, *watchers], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for watcher in watchers:
            watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if not task.cancelled() and task.exception() is None and not request.cancelled.is_set():
        return task.result()
    if request.cancelled.is_set() or (_expired(request, clock) and not request.started):
        raise _stopped(request, clock)
    return task.result()  # its own error (or cancellation) passes through


def _expired(request: PendingRequest, clock: Callable[[], float]) -> bool:
    return request.deadline is not None and clock() >= request.deadline


def _stopped(request: PendingRequest, clock: Callable[[], float]) -> Exception:
    if request.cancelled.is_set():
        return RequestCancelledError(f"request {request.request_id} was cancelled")
    return RequestExpiredError(f"request {request.request_id} was not started by its deadline")


async def _expiry(request: PendingRequest, clock: Callable[[], float]) -> None:
    """Ends when the deadline passed with the work not started; else never."""
    assert request.deadline is not None
    await asyncio.sleep(max(0.0, request.deadline - clock()))
    if request.started:
        await asyncio.Event().wait()  # started in time: the deadline no longer applies
