"""One example event per contract topic, for the AsyncAPI document (fixed values, so the
document is the same on every run). Each is validated by its model when the document is
built, so an example that stops fitting its event fails ``multimodal-engine docs``."""

from __future__ import annotations

from typing import Any

__all__ = ["EXAMPLES"]

_REQUEST_ID = "3f1c2b9e-8d7a-4c61-9b0e-5a4d2c1e7f60"
_AT = "2024-05-01T12:00:00.000Z"

EXAMPLES: dict[str, dict[str, Any]] = {
    "ImageRequested": {
        "request_id": _REQUEST_ID, "conversation_id": "conv-42", "character_id": "aria",
        "prompt": "a lighthouse at dusk, watercolor", "width": 1024, "height": 1024,
        "seed": 42, "created_at": _AT, "priority": "interactive",
    },
    "VoiceRequested": {
        "request_id": _REQUEST_ID, "conversation_id": "conv-42", "character_id": "aria",
        "text": "I missed you! How was your day?", "voice_id": "21m00Tcm4TlvDq8ikWAM",
        "stability": 0.5, "inject_emotion": True, "created_at": _AT,
    },
    "LoraTrainingRequested": {
        "request_id": _REQUEST_ID, "conversation_id": "conv-42", "character_id": "aria",
        "trigger_word": "ariachar",
        "image_urls": [f"https://images.example/aria/{n}.png" for n in range(1, 6)],
        "steps": 1000, "created_at": _AT,
    },
    "GenerationControl": {
        "action": "cancel", "request_id": _REQUEST_ID, "conversation_id": "conv-42",
        "created_at": _AT,
    },
    "GenerationCompleted": {
        "request_id": _REQUEST_ID, "conversation_id": "conv-42", "kind": "image",
        "timestamp": _AT, "image_id": "0b7c6f43-2f5e-4d1a-9c3b-8e2f1a6d5c40",
        "filename": "0b7c6f43-2f5e-4d1a-9c3b-8e2f1a6d5c40.png",
        "prompt": "a lighthouse at dusk, watercolor, highly detailed", "width": 1024,
        "height": 1024, "url": "/outputs/0b7c6f43-2f5e-4d1a-9c3b-8e2f1a6d5c40.png",
        "seed": 42, "model": "black-forest-labs/FLUX.1-dev", "development_model": False,
    },
    "GenerationFailed": {
        "request_id": _REQUEST_ID, "conversation_id": "conv-42", "kind": "image",
        "error_code": "UNKNOWN_LORA", "message": "no LoRA named 'aria-v9'", "retryable": False,
        "attempts": 1, "source_topic": "generation.requested.image", "source_partition": 3,
        "source_offset": 1207, "timestamp": _AT,
    },
    "GenerationProgress": {
        "request_id": _REQUEST_ID, "conversation_id": "conv-42", "kind": "lora", "step": 250,
        "total": 1000, "loss": 0.0812, "timestamp": _AT,
    },
}
