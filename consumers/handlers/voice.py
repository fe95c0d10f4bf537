"""generation.requested.voice → the voice core → generation.completed (kind voice)."""

from __future__ import annotations

import logging

from consumers.routes import HandlerContext
from core.voice import AudioStream, VoiceResult, VoiceService, queued_as
from schemas.events import GenerationCompleted, VoiceRequested

__all__ = ["MAX_EVENT_BYTES_WITH_WORDS", "VoiceHandler"]

logger = logging.getLogger(__name__)

MAX_EVENT_BYTES_WITH_WORDS = 512 * 1024
"""The largest completed event, in its JSON form (Avro's is smaller), that carries
``words``: half of a Kafka broker's default message limit (1 MB), leaving room for the
record's headers and framing. Every word costs ~85 bytes, so an English text of some
28,000 characters reaches it; a larger event goes without them (see :class:`VoiceHandler`)."""


class VoiceHandler:
    """Calls the same core entry as ``POST /generate/voice``, spending the request's retry
    budget (the consume loop's) on upstream retries. A replayed record is answered from the
    voice core's remembered results (no upstream call while the file exists).

    The audio is streamed as it is made: at its first audio one ``generation.progress``
    (step 0 of 1) carries the ``stream_url``. A voice whose record is revoked meanwhile
    goes on (the placement's ``keep_when_abandoned``): the record's next delivery joins it,
    so that it is neither cut nor paid for again, and its ``stream_url`` stays the one.

    The completed event carries ``words`` while it stays within
    :data:`MAX_EVENT_BYTES_WITH_WORDS`; beyond, ``words`` is null (and a log line says so),
    the timings being at ``alignment_url``, so that a long text's event is never refused
    by the broker for its size."""

    def __init__(self, service: VoiceService) -> None:
        self._service = service

    async def __call__(self, event: VoiceRequested, context: HandlerContext) -> GenerationCompleted:
        async def announce(stream: AudioStream, url: str) -> None:
            await context.progress(0, 1, None, stream_url=url)

        with queued_as(context.placement):  # its upstream calls queue as the request
            result = await self._service.generate(
                event, budget=context.budget, on_stream=announce,
                keep_when_abandoned=context.placement.keep_when_abandoned)
        return _completed(event, result)

    async def remembered(self, event: VoiceRequested) -> GenerationCompleted | None:
        """The answer already made for ``event``, from the remembered results (see
        :meth:`VoiceService.remembered`); ``None`` without one."""
        result = await self._service.remembered(event)
        return None if result is None else _completed(event, result)


def _completed(event: VoiceRequested, result: VoiceResult) -> GenerationCompleted:
    return _within_limit(GenerationCompleted(
        request_id=event.request_id,
        conversation_id=event.conversation_id,
        kind="voice",
        audio_id=result.audio_id,
        filename=result.filename,
        text=result.text,
        enhanced_text=result.enhanced_text,
        voice_id=result.voice_id,
        url=result.url,
        duration_seconds=result.duration_seconds,
        character_id=event.character_id,
        seed=result.seed,
        words=result.words,
        alignment_url=result.alignment_url,
    ))


def _within_limit(completed: GenerationCompleted) -> GenerationCompleted:
    """``completed``, without its ``words`` when with them it is over
    :data:`MAX_EVENT_BYTES_WITH_WORDS` in JSON."""
    if not completed.words:
        return completed
    size = len(completed.model_dump_json().encode())
    if size <= MAX_EVENT_BYTES_WITH_WORDS:
        return completed
    where = (f"the timings are at {completed.alignment_url}" if completed.alignment_url
             else "no timings file was written")
    logger.info("request_id=%s voice %s: its %d words are left out of the completed event "
                "(%d bytes with them, over %d); %s", completed.request_id,
                completed.filename, len(completed.words), size, MAX_EVENT_BYTES_WITH_WORDS,
                where)
    return completed.model_copy(update={"words": None})
