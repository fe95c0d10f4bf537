"""What a training is: the validated request, its deterministic id, and the limits.

``training_id`` is ``{character_id}_{sha256(request_id)[:8]}`` (like the original API's
``sarah_12345678``): a redelivered or repeated request has the same id, which is how a
crashed training finds its checkpoint and a finished one its registered LoRA.
"""

from __future__ import annotations

import hashlib
import json
import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from schemas.errors import InvalidRequestError

__all__ = [
    "Origin", "TrainingLimits", "TrainingSpec", "caption_for", "check_character_id",
    "check_hyperparameters", "check_trigger_word", "training_id_for",
]

Origin = Literal["kafka", "http"]

_CHARACTER_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,47}$")  # + "_v12" stays a LoRA id
_TRIGGER_MAX = 64
_TRIGGER_PUNCTUATION = set(" _-.'")


@dataclass(frozen=True)
class TrainingLimits:
    """The settings a training request is checked against (MIN/MAX_LORA_IMAGES,
    LORA_MAX_IMAGE_BYTES, LORA_MAX_IMAGE_PIXELS, MAX_IMAGE_SIZE) and the defaults it
    inherits (LORA_TRAIN_STEPS, LORA_LEARNING_RATE, LORA_RESOLUTION, LORA_BATCH_SIZE)."""

    min_images: int = 5
    max_images: int = 50
    max_image_bytes: int = 20 * 2**20
    max_image_pixels: int = 40_000_000
    min_image_side: int = 64
    max_resolution: int = 2048
    max_steps: int = 100_000
    default_steps: int = 1000
    default_learning_rate: float = 1e-4
    default_resolution: int = 512
    batch_size: int = 1


def training_id_for(character_id: str, request_id: str) -> str:
    """The id of the training a request asks for (same request, same id)."""
    return f"{character_id}_{hashlib.sha256(request_id.encode()).hexdigest()[:8]}"


def caption_for(trigger_word: str) -> str:
    """Every training image's caption: the trigger word in a plain sentence."""
    return f"a photo of {trigger_word}"


def check_character_id(value: str) -> str:
    """``value`` when it is a safe id (letters, digits, ``_``, ``-``; 1–48, starting with a
    letter or digit); raises :class:`InvalidRequestError` (field ``character_id``)."""
    if not _CHARACTER_ID.match(value):
        raise InvalidRequestError(
            f"character_id {value!r} must be 1-48 letters, digits, '_' or '-', starting "
            "with a letter or digit", field="character_id")
    return value


def check_trigger_word(value: str) -> str:
    """``value`` when it is a usable trigger word: 1–64 characters of letters, digits,
    space, ``_ - . '``, with a letter or digit first and last; raises
    :class:`InvalidRequestError` (field ``trigger_word``)."""
    ok = (0 < len(value) <= _TRIGGER_MAX and value[0].isalnum() and value[-1].isalnum()
          and all(c.isalnum() or c in _TRIGGER_PUNCTUATION for c in value)
          and not any(unicodedata.category(c).startswith("C") for c in value))
    if not ok:
        raise InvalidRequestError(
            f"trigger_word {value!r} must be 1-{_TRIGGER_MAX} letters, digits, spaces or "
            "_-.' starting and ending with a letter or digit", field="trigger_word")
    return value


def check_hyperparameters(
    steps: int | None, learning_rate: float | None, resolution: int | None,
    limits: TrainingLimits,
) -> tuple[int, float, int]:
    """The request's steps, learning rate and resolution, or the defaults; raises
    :class:`InvalidRequestError` naming the field that is out of range."""
    steps = limits.default_steps if steps is None else steps
    rate = limits.default_learning_rate if learning_rate is None else learning_rate
    size = limits.default_resolution if resolution is None else resolution
    if not 1 <= steps <= limits.max_steps:
        raise InvalidRequestError(f"steps must be between 1 and {limits.max_steps}, got {steps}",
                                  field="steps")
    if not 0 < rate <= 1:
        raise InvalidRequestError(f"learning_rate must be in (0, 1], got {rate}",
                                  field="learning_rate")
    if size % 16 or not 64 <= size <= limits.max_resolution:
        raise InvalidRequestError(
            f"resolution must be a multiple of 16 between 64 and {limits.max_resolution} "
            f"(MAX_IMAGE_SIZE), got {size}", field="resolution")
    return steps, rate, size


@dataclass(frozen=True)
class TrainingSpec:
    """A validated training, as written to ``spec.json`` beside its checkpoints."""

    training_id: str
    request_id: str
    conversation_id: str | None
    character_id: str
    trigger_word: str
    caption: str
    steps: int
    learning_rate: float
    resolution: int
    batch_size: int
    origin: Origin
    image_sha256: tuple[str, ...] = field(default=())

    @property
    def image_count(self) -> int:
        return len(self.image_sha256)

    @property
    def seed(self) -> int:
        """The training's random seed, from its id (reproducible)."""
        return int(hashlib.sha256(self.training_id.encode()).hexdigest()[:15], 16)

    @property
    def adapter_name(self) -> str:
        """Its peft adapter name while attached (peft names allow no dots or dashes)."""
        return f"training_{hashlib.sha256(self.training_id.encode()).hexdigest()[:12]}"

    def to_json(self) -> str:
        data = asdict(self)
        data["image_sha256"] = list(self.image_sha256)
        return json.dumps(data, indent=2) + "\n"

    @classmethod
    def from_json(cls, text: str) -> TrainingSpec:
        """Raises ``ValueError``/``TypeError``/``KeyError`` for anything that is no spec."""
        data: dict[str, Any] = json.loads(text)
        data["image_sha256"] = tuple(data.get("image_sha256", ()))
        return cls(**data)
