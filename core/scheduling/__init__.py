"""Scheduling: who goes next, for Kafka and HTTP alike.

- :mod:`~core.scheduling.placement`: a request's priority (interactive, background; old
  records count as replays; promoted when a live request waits behind it), owner (its conversation) and deadline;
- :mod:`~core.scheduling.admission`: slots of work per kind and per conversation;
- :mod:`~core.scheduling.lanes`: waiters in line by priority and conversation (admission's
  and the ElevenLabs slots'), promoted ones moved up;
- :mod:`~core.scheduling.pending`: requests between arrival and answer, and the cancels
  that act on them (also those that arrive first);
- :mod:`~core.scheduling.barrier`: requests wait until the cancels published before them
  were read;
- :mod:`~core.scheduling.supervise`: one request run under its cancel mark and deadline;
- :mod:`~core.scheduling.gpu_queue`: the GPU worker's queue (interactive before background,
  round robin across conversations, batching within those rules);
- :mod:`~core.scheduling.factory`: the parts one engine shares, from settings.
"""

from core.scheduling.admission import Admission
from core.scheduling.barrier import ReadBarrier, ReadMark, cancels_read
from core.scheduling.factory import Scheduling, build_scheduling
from core.scheduling.pending import PendingRequest, PendingRequests
from core.scheduling.placement import (
    Placement,
    Priority,
    Promotion,
    deadline_of,
    effective_priority,
)
from core.scheduling.supervise import supervise

__all__ = [
    "Admission",
    "PendingRequest",
    "PendingRequests",
    "Placement",
    "Priority",
    "Promotion",
    "ReadBarrier",
    "ReadMark",
    "Scheduling",
    "build_scheduling",
    "cancels_read",
    "deadline_of",
    "effective_priority",
    "supervise",
]
