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
    held is released before this returns. A cancel wins over a result that arrives at the
    same moment (a cancelled request is never completed). Cancelling the caller cancels
    ``work`` too; otherwise only ``work``'s own result or error comes out."""
    if request.cancelled.is_set() or (_expired(request, clock) and not request.started):
        work.close()
        raise _stopped(request)
    task = asyncio.ensure_future(work)
    cancelled = asyncio.ensure_future(request.cancelled.wait())
    expiry = (asyncio.ensure_future(_expiry(request, clock))
              if request.deadline is not None else None)
    watchers = [w for w in (cancelled, expiry) if w is not None]
    stopped: Exception | None = None
    try:
        done, _ = await asyncio.wait([task, *watchers], return_when=asyncio.FIRST_COMPLETED)
        if cancelled in done or request.cancelled.is_set():
            stopped = RequestCancelledError(f"request {request.request_id} was cancelled")
        elif task not in done:  # the expiry watcher: deadline passed, work not started
            stopped = _stopped(request)
    finally:
        for watcher in watchers:
            watcher.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
    if stopped is not None:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: the stop is the answer
        raise stopped
    return task.result()


def _expired(request: PendingRequest, clock: Callable[[], float]) -> bool:
    return request.deadline is not None and clock() >= request.deadline


def _stopped(request: PendingRequest) -> Exception:
    if request.cancelled.is_set():
        return RequestCancelledError(f"request {request.request_id} was cancelled")
    return RequestExpiredError(f"request {request.request_id} was not started by its deadline")


async def _expiry(request: PendingRequest, clock: Callable[[], float]) -> None:
    """Ends when the deadline passed with the work not started; else never."""
    assert request.deadline is not None
    while (left := request.deadline - clock()) > 0:  # the wall clock may step meanwhile
        await asyncio.sleep(left)
    if request.started:
        await asyncio.Event().wait()  # started in time: the deadline no longer applies
