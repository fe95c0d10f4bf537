"""Requests taken in and not answered yet: what a cancel or a deadline acts on.

Every request (Kafka or HTTP) gets a :class:`PendingRequest` when it arrives and gives it
back when it is answered. A cancel (``generation.control``, ``DELETE /requests/{id}``)
marks the matching ones; the code running each request watches its mark
(:func:`core.scheduling.supervise.supervise`).

A Kafka request whose delivery was dropped (a revoke, a stop) while its work runs may keep
that work for its next delivery (:meth:`PendingRequest.keeps`, a
:class:`~core.shared_work.Keeper`): it then stays registered until the work ends, so that
a cancel still reaches, and stops, the work it left behind.

Cancels are also remembered for ``remember_seconds``, because a cancel may arrive before
its request (another partition, another instance's lag): a request id cancelled recently
is cancelled on arrival, and so is a request of a conversation cancelled as a whole after
the request was published. The memory is bounded (``max_remembered`` entries).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

from core.scheduling.placement import Placement, Priority, Promotion

__all__ = ["PendingRequest", "PendingRequests"]

QueueWaitObserver = Callable[[str, Priority, float], None]


@dataclass(eq=False)
class PendingRequest:
    """One request between arrival and answer. ``deadline`` and ``published_at`` are
    epoch seconds; ``arrived_at`` and ``started_at`` are monotonic."""

    request_id: str
    conversation_id: str
    kind: str
    priority: Priority
    deadline: float | None
    published_at: float
    arrived_at: float
    cancelled: asyncio.Event = field(default_factory=asyncio.Event)
    promotion: Promotion = field(default_factory=Promotion)
    _registry: PendingRequests | None = field(default=None, repr=False)
    _started: bool = False
    _started_at: float | None = None
    _kept: bool = False

    @property
    def started(self) -> bool:
        """True once real work began (a GPU job taken, a voice call made)."""
        return self._started

    @property
    def started_at(self) -> float | None:
        """When real work began (``time.monotonic()``): queue wait ends and processing
        starts here. None before, and for a request answered without starting."""
        return self._started_at

    def mark_started(self) -> None:
        """Reports the start of real work, once; thread-safe (the GPU worker calls it)."""
        if self._registry is not None:
            self._registry._on_start(self)

    @property
    def kept(self) -> bool:
        """True once its work was kept for its next delivery (:meth:`keeps`): it stays
        registered until that work ends (:meth:`released`)."""
        return self._kept

    def keeps(self) -> bool:
        """Asked when its delivery was dropped (a revoke, a stop: the record comes again)
        while its work runs: the work is kept unless the request was cancelled or is no
        longer registered (answered). Kept, the request stays registered, a cancel
        marking it as ever, until :meth:`released`."""
        if self.cancelled.is_set() or (
                self._registry is not None and not self._registry.holds(self)):
            return False
        self._kept = True
        return True

    async def dropped(self) -> None:
        """Returns when its kept work is no longer wanted: the request was cancelled."""
        await self.cancelled.wait()

    def released(self) -> None:
        """Its kept work ended: the request is forgotten."""
        if self._registry is not None:
            self._registry.remove(self)

    def promote(self) -> None:
        """Raises a background request to interactive: a live request of its conversation
        waits behind it (priority inheritance). Its ``priority`` says so from now on, and
        the queues holding it move it (:attr:`promotion`). Idempotent."""
        if self._registry is not None:
            self._registry._promote(self)
        else:
            self.priority = Priority.INTERACTIVE
        self.promotion.set()

    def placement(self) -> Placement:
        """Where this request stands in the GPU worker's queue."""
        return Placement(priority=self.priority, owner=self.conversation_id,
                         deadline=self.deadline, on_start=self.mark_started,
                         promotion=self.promotion)


class PendingRequests:
    """Registry of pending requests and recent cancels; the event loop's, except
    :meth:`PendingRequest.mark_started` (any thread)."""

    def __init__(self, *, remember_seconds: float = 600.0, max_remembered: int = 100_000,
                 on_queue_wait: QueueWaitObserver | None = None,
                 on_depth: Callable[[str, Priority, int], None] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        if remember_seconds < 0:
            raise ValueError(f"CANCEL_MEMORY_SECONDS must be >= 0, got {remember_seconds}")
        self._remember = remember_seconds
        self._max_remembered = max_remembered
        self._on_queue_wait = on_queue_wait
        self._on_depth = on_depth
        self._clock = clock
        self._by_request: dict[str, list[PendingRequest]] = {}
        self._by_conversation: dict[str, set[PendingRequest]] = {}
        # id → (its conversation, or "" for any; forget at)
        self._cancelled_ids: OrderedDict[str, tuple[str, float]] = OrderedDict()
        # conversation → (cancels what was published up to; forget at)
        self._cancelled_conversations: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._lock = threading.Lock()  # guards the depth counts and started flags
        self._depth: dict[tuple[str, Priority], int] = {}
        self._changed: asyncio.Event | None = None  # set at every add and remove

    # --- arrivals and answers ---

    def add(self, request_id: str, conversation_id: str, kind: str, priority: Priority, *,
            deadline: float | None = None, published_at: float | None = None
            ) -> PendingRequest:
        """Registers a request; it comes back already cancelled when a remembered cancel
        names it (its id, or its conversation after it was published)."""
        now = self._clock()
        request = PendingRequest(
            request_id, conversation_id, kind, priority, deadline,
            published_at if published_at is not None else now, time.monotonic(),
            _registry=self)
        self._by_request.setdefault(request_id, []).append(request)
        self._by_conversation.setdefault(conversation_id, set()).add(request)
        self._count(kind, priority, +1)
        if self._remembered_cancel(request, now):
            request.cancelled.set()
        self._notify()
        return request

    def remove(self, request: PendingRequest) -> None:
        """Forgets an answered request. Idempotent."""
        if not self.holds(request):
            return
        same_id = self._by_request[request.request_id]
        same_id.remove(request)
        if not same_id:
            del self._by_request[request.request_id]
        conversation = self._by_conversation[request.conversation_id]
        conversation.discard(request)
        if not conversation:
            del self._by_conversation[request.conversation_id]
        with self._lock:
            if not request._started:
                request._started = True  # never counted as waiting again
                self._count_locked(request.kind, request.priority, -1)
        self._notify()

    def holds(self, request: PendingRequest) -> bool:
        """Whether ``request`` is registered (added, not removed yet)."""
        return request in self._by_request.get(request.request_id, ())

    async def wait_until(self, predicate: Callable[[PendingRequests], bool],
                         timeout: float) -> None:
        """Waits until ``predicate(self)`` holds, re-checked at every arrival and answer
        (no polling). Raises ``TimeoutError`` after ``timeout`` seconds."""
        async def watch() -> None:
            while not predicate(self):
                if self._changed is None:
                    self._changed = asyncio.Event()
                changed = self._changed
                await changed.wait()

        await asyncio.wait_for(watch(), timeout)

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    def _on_start(self, request: PendingRequest) -> None:
        now = time.monotonic()
        with self._lock:
            if request._started:
                return
            request._started = True
            request._started_at = now
            priority = request.priority
            self._count_locked(request.kind, priority, -1)
        if self._on_queue_wait is not None:
            self._on_queue_wait(request.kind, priority, now - request.arrived_at)

    def _promote(self, request: PendingRequest) -> None:
        with self._lock:
            if request.priority is Priority.INTERACTIVE:
                return
            if not request._started:  # it waits as interactive from now on
                self._count_locked(request.kind, request.priority, -1)
                self._count_locked(request.kind, Priority.INTERACTIVE, +1)
            request.priority = Priority.INTERACTIVE

    # --- cancels ---

    def cancel(self, conversation_id: str | None, request_id: str | None = None,
               issued_at: float | None = None) -> list[PendingRequest]:
        """Marks the pending requests a cancel names and remembers the cancel; returns
        those marked now. With ``request_id``: that request, when it belongs to
        ``conversation_id`` (``None``: whichever). Without: every request of the
        conversation published up to ``issued_at`` (epoch seconds, default now)."""
        now = self._clock()
        # a producer's clock ahead of ours must not cancel what comes later, nor pin memory
        issued = min(issued_at, now) if issued_at is not None else now
        if request_id is not None:
            self._cancelled_ids[request_id] = (conversation_id or "", issued + self._remember)
            self._cancelled_ids.move_to_end(request_id)
            hits = [r for r in self._by_request.get(request_id, ())
                    if conversation_id is None or r.conversation_id == conversation_id]
        elif conversation_id is None:
            raise ValueError("a cancel names a request, a conversation, or both")
        else:
            earlier = self._cancelled_conversations.pop(conversation_id, (issued, 0.0))[0]
            latest = max(issued, earlier)
            self._cancelled_conversations[conversation_id] = (latest, latest + self._remember)
            hits = [r for r in self._by_conversation.get(conversation_id, ())
                    if r.published_at <= issued]
        self._prune(now)
        marked = [r for r in hits if not r.cancelled.is_set()]
        for request in marked:
            request.cancelled.set()
        return marked

    def find(self, request_id: str) -> list[PendingRequest]:
        """The pending requests with this id (usually one)."""
        return list(self._by_request.get(request_id, ()))

    # --- what /health and /metrics show ---

    def depths(self) -> dict[str, dict[str, int]]:
        """Requests waiting to start, per kind and priority."""
        with self._lock:
            out: dict[str, dict[str, int]] = {}
            for (kind, priority), count in self._depth.items():
                out.setdefault(kind, {p.value: 0 for p in Priority})[priority.value] = count
            return out

    # --- inside ---

    def _remembered_cancel(self, request: PendingRequest, now: float) -> bool:
        named = self._cancelled_ids.get(request.request_id)
        if named is not None and named[1] > now and named[0] in ("", request.conversation_id):
            return True
        whole = self._cancelled_conversations.get(request.conversation_id)
        return whole is not None and whole[1] > now and request.published_at <= whole[0]

    def _prune(self, now: float) -> None:
        for memory in (self._cancelled_ids, self._cancelled_conversations):
            while memory and (len(memory) > self._max_remembered
                              or next(iter(memory.values()))[1] <= now):
                memory.popitem(last=False)

    def _count(self, kind: str, priority: Priority, delta: int) -> None:
        with self._lock:
            self._count_locked(kind, priority, delta)

    def _count_locked(self, kind: str, priority: Priority, delta: int) -> None:
        value = self._depth.get((kind, priority), 0) + delta
        self._depth[(kind, priority)] = value
        if self._on_depth is not None:
            self._on_depth(kind, priority, value)

