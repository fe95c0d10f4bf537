"""An in-process engine on the tiny development model (with the development LoRA
``sarah_v1`` registered), started and stopped around a test."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

from consumers.engine import Engine
from consumers.serve import prepare_dev_model
from core.settings import Settings

__all__ = ["dev_engine"]


@contextlib.asynccontextmanager
async def dev_engine(settings: Settings, dev_model_dir: Path, tmp_path: Path,
                     **updates: Any) -> AsyncIterator[Engine]:
    """``settings`` with the development model in ``dev_model_dir``, LoRAs under
    ``tmp_path``, and ``updates``; the engine's HTTP app on 127.0.0.1."""
    configured = settings.model_copy(update={
        "dev_model_dir": dev_model_dir, "lora_output_dir": tmp_path / "loras", **updates})
    model_path = await asyncio.to_thread(prepare_dev_model, configured)
    assert configured.kafka_bootstrap_servers is not None
    engine = Engine(configured, configured.kafka_bootstrap_servers, model_path=model_path,
                    http_host="127.0.0.1", registry=CollectorRegistry())
    await engine.start()
    try:
        yield engine
    finally:
        await engine.stop()
