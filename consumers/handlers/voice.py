"""generation.requested.voice → the voice core → generation.completed (kind voice)."""

from __future__ import annotations

from consumers.routes import HandlerContext
from core.voice import AudioStream, VoiceService
from schemas.events import GenerationCompleted, VoiceRequested

__all__ = ["VoiceHandler"]


class VoiceHandler:
    """Calls the same core entry as ``POST /generate/voice``, spending the request's retry
    budget (the consume loop's) on upstream retries. A replayed record is answered from the
    voice core's remembered results (no upstream call while the file exists).

    The audio is streamed as it is made: at its first audio one ``generation.progress``
    (step 0 of 1) carries the ``stream_url``."""

    def __init__(self, service: VoiceService) -> None:
        self._service = service

    async def __call__(self, event: VoiceRequested, context: HandlerContext) -> GenerationCompleted:
        async def announce(stream: AudioStream, url: str) -> None:
            await context.progress(0, 1, None, stream_url=url)

        result = await self._service.generate(event, budget=context.budget, on_stream=announce)
        return GenerationCompleted(
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
        )
