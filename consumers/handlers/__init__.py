"""Handlers: a validated request event in, a completed event out."""

from consumers.handlers.image import ImageHandler
from consumers.handlers.lora import LoraHandler
from consumers.handlers.voice import VoiceHandler

__all__ = ["ImageHandler", "LoraHandler", "VoiceHandler"]
