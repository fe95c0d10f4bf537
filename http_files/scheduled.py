"""HTTP requests under the same admission and scheduling as Kafka work.

A POST takes a slot of its kind at once or answers 503 with ``Retry-After`` (it never
queues without bound); it is then a pending request like a Kafka one: ``DELETE
/requests/{id}`` and a passed ``deadline`` stop it, and a client that goes away cancels it
(the app runs with handler cancellation, so its handler task is cancelled). Like a Kafka
request, its work waits until the cancels published before it arrived were read.

A request is scheduled as its conversation (admission's per-conversation share, the voice
gate's turns); one that names none (``conversation_id`` "http", the original API's clients)
as a conversation of its own, ``http:{request_id}``, so that two slow requests of one
client do not take every other client's share. Its answer, its events and its cancels keep
the ``conversation_id`` it has ("http": ``DELETE /requests/{id}?conversation_id=http``
still finds it on any instance).

Its time is measured as a Kafka request's: ``engine_queue_wait_seconds`` from arrival to the
start of its work (a GPU job taken, a voice call begun), ``engine_processing_seconds`` from
there to its result (or its error, or its cancel), so that the two add up per kind whatever
the entry point.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Coroutine
from dataclasses import replace
from typing import Any, TypeVar

from core.scheduling import PendingRequest, Priority, cancels_read, deadline_of, supervise
from core.voice.turns import queued_as
from http_files.errors import retry_later
from http_files.services import AppServices
from http_files.validation import ANONYMOUS_CONVERSATION
from schemas.errors import RequestCancelledError, RequestExpiredError

__all__ = ["run_scheduled", "scheduling_owner"]

T = TypeVar("T")

_RETRY_AFTER_SECONDS = 2


async def run_scheduled(services: AppServices, kind: str, event: Any,
                        work: Callable[[PendingRequest], Coroutine[Any, Any, T]]) -> T:
    """``work(pending)`` in a slot of ``kind``, its voice calls queued as the request's
    owner and priority (:mod:`core.voice.turns`; the owner as the module docstring says).
    Raises a 503 when the kind is full,
    :class:`InvalidRequestError` for a deadline that is no date-time (a 422), and
    :class:`RequestCancelledError` / :class:`RequestExpiredError` (counted) when
    stopped."""
    scheduling = services.scheduling
    priority = Priority(event.priority) if getattr(event, "priority", None) else (
        Priority.INTERACTIVE)
    deadline = deadline_of(getattr(event, "deadline", None))
    owner = scheduling_owner(event.conversation_id, event.request_id)
    if not scheduling.admission.try_acquire(kind, owner, priority):
        services.metrics.http_rejected.labels(kind).inc()
        raise retry_later(f"the engine is at its limit for {kind} requests",
                          _RETRY_AFTER_SECONDS)
    pending = scheduling.pending.add(event.request_id, event.conversation_id, kind, priority,
                                     deadline=deadline, published_at=time.time())
    mark = services.read_barrier() if services.read_barrier is not None else None

    async def after_cancels() -> T:
        await cancels_read(mark, pending)
        with queued_as(replace(pending.placement(), owner=owner)):
            return await work(pending)

    try:
        return await supervise(pending, after_cancels())
    except (RequestCancelledError, asyncio.CancelledError):  # the latter: client gone
        services.metrics.cancelled.labels(kind).inc()
        raise
    except RequestExpiredError:
        services.metrics.expired.labels(kind).inc()
        raise
    finally:
        scheduling.pending.remove(pending)
        scheduling.admission.release(kind, owner, priority)
        if pending.started_at is not None:  # work start → result, as on the Kafka path
            services.metrics.processing.labels(kind).observe(
                time.monotonic() - pending.started_at)


def scheduling_owner(conversation_id: str, request_id: str) -> str:
    """The owner a request is scheduled as: its conversation, or ``http:{request_id}`` for
    one that names none (see the module docstring)."""
    if conversation_id == ANONYMOUS_CONVERSATION:
        return f"{ANONYMOUS_CONVERSATION}:{request_id}"
    return conversation_id
