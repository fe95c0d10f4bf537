"""What a finished training hands back, read from its registered LoRA's metadata: the
:class:`TrainingOutcome` ``generation.completed`` (kind ``lora``) carries, and its
``completed`` :class:`~core.training.status.TrainingStatus`."""

from __future__ import annotations

from dataclasses import dataclass

from core.lora.registry import LoraInfo, LoraRegistry
from core.training.status import TrainingStatus

__all__ = ["TrainingOutcome", "completed_status", "outcome_of"]


@dataclass(frozen=True)
class TrainingOutcome:
    """A finished training: what ``generation.completed`` (kind ``lora``) carries.
    ``replayed`` when it was found registered rather than trained now."""

    training_id: str
    request_id: str
    conversation_id: str | None
    character_id: str
    trigger_word: str
    lora_id: str
    validation_image_url: str | None
    replayed: bool = False
    location: str | None = None  # the registration in the shared store, if there is one


def completed_status(info: LoraInfo) -> TrainingStatus:
    """The ``completed`` status of the training that registered ``info``."""
    training = info.training or {}
    steps = int(training.get("steps", 0))
    return TrainingStatus(
        training_id=str(training.get("training_id", "")),
        request_id=str(training.get("request_id", "")),
        character_id=str(training.get("character_id", "")),
        trigger_word=info.trigger_word or "", state="completed", step=steps, total=steps,
        loss=training.get("final_loss"), lora_id=info.lora_id,
        validation_image_url=training.get("validation_image_url"), estimated_time_minutes=0)


def outcome_of(info: LoraInfo, conversation_id: str | None, *, replayed: bool,
               registry: LoraRegistry) -> TrainingOutcome:
    """The outcome of the training that registered ``info`` in ``registry``."""
    training = info.training or {}
    return TrainingOutcome(
        training_id=str(training.get("training_id", "")),
        request_id=str(training.get("request_id", "")), conversation_id=conversation_id,
        character_id=str(training.get("character_id", "")),
        trigger_word=info.trigger_word or "", lora_id=info.lora_id,
        validation_image_url=training.get("validation_image_url"), replayed=replayed,
        location=registry.shared.location(info.lora_id) if registry.shared else None)
