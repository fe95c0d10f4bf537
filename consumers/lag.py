"""Consumer lag per owned partition, kept true while flow control pauses it.

Lag is the end of the partition's log minus the position of its next record not yet
answered. aiokafka learns a partition's end (its high watermark) only from fetch responses,
and flow control pauses the partitions holding their share of a full kind: exactly where the
backlog grows, the fetched high watermark stops moving. So besides the update after every fetch
(:meth:`ConsumerLag.update`), the end offsets of the owned partitions are asked for every
few seconds (:meth:`ConsumerLag.run`: one ListOffsets request per broker, one refresh at a
time, off the fetch path). A refresh that fails or times out leaves the previous values.
The later of the two ends counts: a refresh may answer after a newer fetch did, and
and Tansu (the embedded broker) answers the last batch's base offset + 1, which is never
above the true end (docs/brokers.md).

A partition none of whose records were fetched since it was assigned (assigned while its
kind was full, or idle) counts from the consumer's position: the committed offset.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import KafkaError
from prometheus_client import Gauge

from consumers.committer import Committer, partition_names

__all__ = ["REFRESH_INTERVAL", "ConsumerLag"]

logger = logging.getLogger(__name__)

REFRESH_INTERVAL = 5.0  # seconds between two asks for the end offsets
_REFRESH_TIMEOUT = 5.0  # for one ask (aiokafka's own would be request_timeout_ms: 40 s)


class ConsumerLag:
    """Sets ``gauge`` (labels topic, partition) for the partitions ``committer`` owns."""

    def __init__(self, consumer: AIOKafkaConsumer, committer: Committer, gauge: Gauge, *,
                 interval: float = REFRESH_INTERVAL,
                 timeout: float = _REFRESH_TIMEOUT) -> None:
        if interval <= 0:
            raise ValueError(f"lag refresh interval must be > 0 seconds, got {interval}")
        if timeout <= 0:
            raise ValueError(f"lag refresh timeout must be > 0 seconds, got {timeout}")
        self._consumer = consumer
        self._committer = committer
        self._gauge = gauge
        self._interval = interval
        self._timeout = timeout
        self._ends: dict[TopicPartition, int] = {}  # learnt by the last refresh
        self._refreshing: asyncio.Task[None] | None = None
        self._failing = False  # warn once per run of failed refreshes

    def update(self) -> None:
        """Sets the lag of the owned partitions from what is known now (after a fetch)."""
        assigned = self._consumer.assignment()
        for tp in self._committer.owned:
            if tp in assigned:
                self._show(tp, None)

    async def run(self) -> None:
        """Refreshes the end offsets every ``interval`` seconds, until cancelled. Never
        raises otherwise: a failed refresh is logged and the next one tried."""
        while True:
            await asyncio.sleep(self._interval)
            refresh = self._refreshing = asyncio.create_task(self.refresh(), name="lag")
            try:
                await asyncio.wait({refresh})  # a refresh cancelled by forget() is no error
            finally:
                self._refreshing = None
                if not refresh.done():  # run() itself was cancelled
                    refresh.cancel()
                    await asyncio.gather(refresh, return_exceptions=True)
            if not refresh.cancelled() and refresh.exception() is not None:
                logger.error("lag refresh failed", exc_info=refresh.exception())

    async def refresh(self) -> None:
        """Asks the brokers for the end offsets of the owned partitions and sets their lag.
        A broker error or no answer within the timeout is logged; the values stay."""
        owned = self._committer.owned
        if not owned:
            return
        try:
            async with asyncio.timeout(self._timeout):
                ends = await self._consumer.end_offsets(owned)
                # nothing fetched since assigned: counted from the consumer's position
                # (known without a request once aiokafka has looked it up)
                assigned = self._consumer.assignment()
                unfetched = {tp: await self._consumer.position(tp) for tp in owned
                             if tp in assigned and self._fetched_position(tp) is None}
        except (KafkaError, TimeoutError) as exc:
            log = logger.debug if self._failing else logger.warning
            log("lag of %s not refreshed (the last values stay): %s", partition_names(owned),
                str(exc) or type(exc).__name__)
            self._failing = True
            return
        self._failing = False
        assigned = self._consumer.assignment()
        for tp, end in ends.items():
            if self._committer.tracker(tp) is not None and tp in assigned:  # still ours
                self._ends[tp] = end
                self._show(tp, unfetched.get(tp))

    def forget(self, partitions: Iterable[TopicPartition]) -> None:
        """The partitions are no longer ours (revoked): their series go (another member
        counts them now) and a refresh in flight is cancelled."""
        if self._refreshing is not None:
            self._refreshing.cancel()
        for tp in partitions:
            self._ends.pop(tp, None)
            try:
                self._gauge.remove(tp.topic, str(tp.partition))
            except KeyError:
                pass

    def _fetched_position(self, tp: TopicPartition) -> int | None:
        tracker = self._committer.tracker(tp)
        return tracker.position() if tracker is not None else None

    def _show(self, tp: TopicPartition, unfetched: int | None) -> None:
        position = self._fetched_position(tp)
        if position is None:
            position = unfetched
        # the later end (under read_committed a refresh's is the last stable offset, never
        # above the high watermark)
        ends = [end for end in (self._consumer.highwater(tp), self._ends.get(tp))
                if end is not None]
        if position is not None and ends:
            self._gauge.labels(tp.topic, str(tp.partition)).set(max(ends) - position)
