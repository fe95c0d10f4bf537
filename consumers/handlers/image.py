"""generation.requested.image → the image core → generation.completed (kind image)."""

from __future__ import annotations

from consumers.routes import HandlerContext
from core.image.service import ImageResult, ImageService
from schemas.events import GeneratedImage, GenerationCompleted, ImageRequested

__all__ = ["ImageHandler"]


class ImageHandler:
    """Calls the same core entry as ``POST /generate/image``; denoising steps become
    ``generation.progress`` events."""

    def __init__(self, service: ImageService) -> None:
        self._service = service

    async def __call__(self, event: ImageRequested, context: HandlerContext) -> GenerationCompleted:
        async def progress(step: int, total: int) -> None:
            await context.progress(step, total, None)

        return _completed(event, await self._service.generate(event, progress,
                                                             context.placement))

    async def remembered(self, event: ImageRequested) -> GenerationCompleted | None:
        """The answer already made for ``event``, from the result cache (see
        :meth:`ImageService.remembered`); ``None`` without one."""
        result = await self._service.remembered(event)
        return None if result is None else _completed(event, result)


def _completed(event: ImageRequested, result: ImageResult) -> GenerationCompleted:
    return GenerationCompleted(
        request_id=event.request_id,
        conversation_id=event.conversation_id,
        kind="image",
        image_id=result.image_id,
        filename=result.filename,
        prompt=result.prompt,
        width=result.width,
        height=result.height,
        url=result.url,
        seed=result.seed,
        character_id=event.character_id,
        lora_id=event.character_lora_id,  # which character LoRA made it (operators)
        model=result.model,
        development_model=result.development_model,
        images=[GeneratedImage(image_id=image.image_id, filename=image.filename,
                               url=image.url, seed=image.seed)
                for image in result.images] or None,  # only when it made several
    )
