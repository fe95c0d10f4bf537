"""generation.requested.lora → the training core → generation.completed (kind lora)."""

from __future__ import annotations

import asyncio

from consumers.routes import HandlerContext
from core.training import TrainingInterrupted, TrainingService
from schemas.events import GenerationCompleted, LoraTrainingRequested

__all__ = ["LoraHandler"]


class LoraHandler:
    """Calls the same core entry as ``POST /train-lora`` and waits for the LoRA; training
    steps become ``generation.progress`` events with the loss."""

    def __init__(self, service: TrainingService, *, model: str, development_model: bool
                 ) -> None:
        self._service = service
        self._model = model
        self._development_model = development_model

    async def __call__(self, event: LoraTrainingRequested, context: HandlerContext
                       ) -> GenerationCompleted:
        try:
            outcome = await self._service.train(event, context.progress)
        except TrainingInterrupted as exc:
            # The engine is stopping (the one time the service raises it): the training
            # is checkpointed, and this record must stay uncommitted so that its
            # redelivery resumes it. A cancellation while the consume loop stops is the
            # one outcome it neither publishes nor commits.
            raise asyncio.CancelledError(str(exc)) from exc
        return GenerationCompleted(
            request_id=event.request_id,
            conversation_id=event.conversation_id,
            kind="lora",
            training_id=outcome.training_id,
            character_id=outcome.character_id,
            trigger_word=outcome.trigger_word,
            lora_id=outcome.lora_id,
            lora_location=outcome.location,
            model=self._model,
            development_model=self._development_model,
        )
