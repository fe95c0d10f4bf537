"""Building the training service from settings, beside the image core it shares a GPU
worker with."""

from __future__ import annotations

import hashlib
import socket

import httpx

from core.image.service import ImageService
from core.image.worker import GpuWorker
from core.lora.registry import LoraRegistry
from core.net import AllowedHosts
from core.settings import Settings
from core.storage import ObjectStore
from core.training.checkpoint import TrainingStore
from core.training.estimate import StepTimes
from core.training.intake import Intake
from core.training.runner import TrainingRunner
from core.training.service import TrainingService
from core.training.shared import SharedTrainings
from core.training.spec import TrainingLimits

__all__ = ["build_training_service", "training_limits"]


def training_limits(settings: Settings) -> TrainingLimits:
    """The LoRA settings a request is checked against, and its defaults."""
    return TrainingLimits(
        min_images=settings.min_lora_images, max_images=settings.max_lora_images,
        max_image_bytes=settings.lora_max_image_bytes,
        max_image_pixels=settings.lora_max_image_pixels,
        max_resolution=settings.max_image_size, default_steps=settings.lora_train_steps,
        default_learning_rate=settings.lora_learning_rate,
        default_resolution=settings.lora_resolution, batch_size=settings.lora_batch_size,
    )


def build_training_service(settings: Settings, worker: GpuWorker, images: ImageService,
                           fetch_http: httpx.AsyncClient, objects: ObjectStore | None = None
                           ) -> TrainingService:
    """Trainings on ``worker``'s pipeline, files under TEMP_DIR/training, results in
    LORA_OUTPUT_DIR (and the shared store ``images``' registry uses), validation images
    through ``images``; with ``objects`` (the shared store) inputs, checkpoints and
    statuses are kept there too. ``fetch_http`` fetches the requests' ``image_urls`` (the
    engine's client for that takes no proxy). Nothing is written until a training is
    accepted."""
    model = worker.model
    root = settings.temp_dir / "training"
    times = StepTimes(root / "step_times.json", development_model=model.development_model)
    return TrainingService(
        TrainingRunner(worker, times, checkpoint_every=settings.lora_checkpoint_every,
                       max_sequence_length=settings.flux_max_sequence_length),
        Intake(training_limits(settings), fetch_http, settings.lora_fetch_timeout,
               fetch_allowed_hosts=AllowedHosts.parse(settings.lora_fetch_allowed_hosts)),
        TrainingStore(root), LoraRegistry(settings.lora_output_dir, shared=images.loras.shared),
        images, times,
        base_model=model.name, lora_dtype=model.dtype,
        progress_interval=settings.progress_interval,
        shared=SharedTrainings(objects) if objects is not None else None,
        owner=_owner(settings),
    )


def _owner(settings: Settings) -> str:
    """Who this instance is to the other instances (the writer of its trainings' statuses
    in the store): its host and its TEMP_DIR, which outlive a restart together, so an
    instance restarted on the same disk takes back the trainings it left there at once
    rather than waiting for their claims to expire. (Two processes never share a
    TEMP_DIR: each works on its own training folders.)"""
    folder = hashlib.sha256(str(settings.temp_dir.resolve()).encode()).hexdigest()[:12]
    return f"{socket.gethostname()}-{folder}"
