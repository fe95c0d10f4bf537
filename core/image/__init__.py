"""FLUX.1 image generation: the model (real or tiny development), its loader, and the GPU
worker that owns it. Request validation, seeds, caching and files live with the image
service that calls :class:`GpuWorker`."""

from core.image.devmodel import DEV_MODEL_NAME, DevModelError, build_dev_model, make_dev_lora
from core.image.job import ImageJob
from core.image.loader import LoadedModel, ModelLoadError, load_pipeline
from core.image.worker import GpuWorker

__all__ = [
    "DEV_MODEL_NAME",
    "DevModelError",
    "GpuWorker",
    "ImageJob",
    "LoadedModel",
    "ModelLoadError",
    "build_dev_model",
    "load_pipeline",
    "make_dev_lora",
]
