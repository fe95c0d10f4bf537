"""The ElevenLabs character quota for ``/health``, checked at most once per ``ttl``.

:meth:`QuotaMonitor.current` answers from a cache younger than ``ttl`` seconds, else asks
``GET /user/subscription`` (one request; concurrent callers share it). A failed check keeps
the last known figures and adds the error code; it never raises. :meth:`QuotaMonitor.run`
refreshes :attr:`EngineHealth.voice_quota <core.health.EngineHealth.voice_quota>` every
``interval`` seconds until a stop event is set.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from datetime import UTC, datetime

from core.health import EngineHealth, VoiceQuota
from core.voice.elevenlabs import ElevenLabsBackend
from schemas.errors import EngineError

__all__ = ["QuotaMonitor"]

logger = logging.getLogger(__name__)


class QuotaMonitor:
    """Cached quota of ``backend``'s account. ``clock`` is monotonic seconds (injectable).
    Raises ``ValueError`` for a negative ``ttl``."""

    def __init__(
        self,
        backend: ElevenLabsBackend,
        ttl: float = 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl < 0:
            raise ValueError(f"ttl must be >= 0 seconds, got {ttl}")
        self._backend = backend
        self._ttl = ttl
        self._clock = clock
        self._quota: VoiceQuota | None = None
        self._checked_at: float | None = None
        self._lock = asyncio.Lock()

    @property
    def cached(self) -> VoiceQuota | None:
        """The last result, however old; ``None`` before the first check."""
        return self._quota

    async def current(self, *, force: bool = False) -> VoiceQuota:
        """The quota, from the cache unless it is older than ``ttl`` or ``force``."""
        async with self._lock:
            fresh = (
                self._checked_at is not None and self._clock() - self._checked_at < self._ttl
            )
            if self._quota is not None and fresh and not force:
                return self._quota
            self._quota = await self._check()
            self._checked_at = self._clock()
            return self._quota

    async def _check(self) -> VoiceQuota:
        try:
            subscription = await self._backend.subscription()
        except EngineError as exc:
            logger.warning("voice quota check failed: %s %s", exc.code, exc.message)
            return replace(self._quota or VoiceQuota(), error=str(exc.code))
        resets = subscription.next_character_count_reset_unix
        return VoiceQuota(
            used=subscription.character_count,
            limit=subscription.character_limit,
            tier=subscription.tier,
            resets_at=(
                datetime.fromtimestamp(resets, UTC).isoformat().replace("+00:00", "Z")
                if resets is not None else None
            ),
        )

    async def run(self, health: EngineHealth, stop: asyncio.Event, interval: float = 60.0) -> None:
        """Put the quota into ``health`` now and every ``interval`` seconds until ``stop``
        is set. Raises ``ValueError`` for an ``interval`` that is not positive."""
        if interval <= 0:
            raise ValueError(f"interval must be > 0 seconds, got {interval}")
        while not stop.is_set():
            health.voice_quota = await self.current()
            try:
                await asyncio.wait_for(stop.wait(), interval)
            except TimeoutError:
                pass
