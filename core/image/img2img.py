"""FLUX image-to-image on the modules of the loaded pipeline: no second copy of any weights.

``FluxImg2ImgPipeline`` is built once, in the GPU worker's thread, from the text-to-image
pipeline's own components (transformer, VAE, text encoders, tokenizers), so LoRA adapters,
the attention backend, compilation, quantization and offload hooks, all of which live on
those modules, apply to both. It gets a scheduler of its own (same config): the
image-to-image call moves the scheduler's start index, which must not leak into the next
text-to-image call. Built by the constructor, not ``from_pipe``: ``from_pipe`` casts the
shared modules to its ``dtype`` argument (float32 when not given), which would silently
turn a bf16 or fp8 transformer into a float32 one for both pipelines.
"""

from __future__ import annotations

import inspect
from typing import Any

__all__ = ["ImageToImage"]


class ImageToImage:
    """The image-to-image pipeline of ``pipeline`` (a ``FluxPipeline``), made on first use.

    Used from the GPU worker's thread only."""

    def __init__(self, pipeline: Any) -> None:
        self._base = pipeline
        self._pipeline: Any | None = None

    @property
    def pipeline(self) -> Any:
        """The ``FluxImg2ImgPipeline`` sharing the base pipeline's modules."""
        if self._pipeline is None:
            self._pipeline = _build(self._base)
        return self._pipeline


def _build(base: Any) -> Any:
    from diffusers import FluxImg2ImgPipeline

    pipeline_class: Any = FluxImg2ImgPipeline
    wanted = inspect.signature(pipeline_class.__init__).parameters
    components = {name: module for name, module in base.components.items() if name in wanted}
    components["scheduler"] = type(base.scheduler).from_config(base.scheduler.config)
    pipeline = pipeline_class(**components)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
