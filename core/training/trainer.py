"""One training chunk: from a state (or the start) to the next checkpoint, in the GPU
worker thread.

A chunk attaches the adapter (:func:`~core.training.adapter.attached_adapter`), rebuilds
AdamW from the saved state, runs its steps of the flow-matching objective, and returns the
new state as CPU tensors; the pipeline is restored before it returns. Everything random
(image choice, latent sampling, noise, σ) comes from one CPU generator whose state is part
of the saved state, so an interrupted training that resumes ends with the same weights as
one that never stopped.

The trainable LoRA weights, their gradients and AdamW's state are float32 whatever the
transformer's dtype (:func:`~core.training.adapter.attached_adapter`). On CUDA (a bf16
transformer) the forward runs under bf16 autocast with gradient checkpointing; on a CPU
both are off (fp32, the tiny model). A compiled transformer is trained through its plain
``forward`` (compiling the backward of a model whose adapters come and go would recompile
every chunk).
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from core.image.attention import native_attention
from core.training.adapter import adapter_weights, attached_adapter
from core.training.encode import TrainingCache
from core.training.objective import flow_matching_loss, sample_sigmas

__all__ = ["ChunkPlan", "ChunkResult", "TrainState", "probe_loss", "run_chunk"]

GUIDANCE = 3.5  # FLUX.1-dev's distilled guidance, as the script trains it
_MAX_GRAD_NORM = 1.0
_WEIGHT_DECAY = 1e-4
_LOSS_SMOOTHING = 0.9  # exponential moving average of the reported loss
_PROBE_SEED = 20240101
_PROBE_SIGMAS = (0.2, 0.4, 0.6, 0.8)
_PROBE_IMAGES = 8

StepCallback = Callable[[int, float], None]


@dataclass(frozen=True)
class TrainState:
    """Where a training stands after ``step`` steps: the adapter's ``weights`` (fp32, CPU),
    AdamW's ``optimizer`` state dict, the ``rng`` generator state, and the smoothed
    ``loss`` (None before the first step)."""

    step: int
    weights: dict[str, torch.Tensor]
    optimizer: dict[str, Any]
    rng: torch.Tensor
    loss: float | None


@dataclass(frozen=True)
class ChunkPlan:
    """Train adapter ``adapter_name`` from ``state`` (None: step 0, initialised from
    ``seed``) up to step ``end_step``. ``probe_before``/``probe_after`` ask for
    :func:`probe_loss` at the chunk's start/end."""

    adapter_name: str
    seed: int
    end_step: int
    learning_rate: float
    batch_size: int
    state: TrainState | None = None
    probe_before: bool = False
    probe_after: bool = False


@dataclass(frozen=True)
class ChunkResult:
    state: TrainState
    seconds_per_step: float | None
    probe_before: float | None = None
    probe_after: float | None = None


def run_chunk(
    pipeline: Any,
    cache: TrainingCache,
    plan: ChunkPlan,
    *,
    on_step: StepCallback | None = None,
    stop: threading.Event | None = None,
) -> ChunkResult:
    """Run ``plan`` on ``pipeline`` (call it in the GPU worker thread). ``on_step(step,
    loss)`` is called after each step; when ``stop`` is set the chunk ends after the
    current step and returns the state reached. The pipeline is left as it was, also
    when this raises (torch's errors, out of memory included, pass through)."""
    transformer = pipeline.transformer
    device = pipeline._execution_device
    dtype = transformer.dtype
    cuda = torch.device(device).type == "cuda"
    start = plan.state.step if plan.state is not None else 0
    generator = torch.Generator("cpu")
    if plan.state is None:
        generator.manual_seed(plan.seed)
    else:
        generator.set_state(plan.state.rng)
    loss_ema = plan.state.loss if plan.state is not None else None
    text = cache.text.to(device, dtype)
    forward = _forward_of(transformer)
    probe_before = probe_after = None
    with attached_adapter(transformer, plan.adapter_name,
                          weights=plan.state.weights if plan.state is not None else None,
                          init_seed=plan.seed, gradient_checkpointing=cuda) as params, \
            native_attention(transformer), _attention_kernels(cuda):
        optimizer = torch.optim.AdamW(params, lr=plan.learning_rate,
                                      weight_decay=_WEIGHT_DECAY)
        if plan.state is not None and plan.state.optimizer:
            optimizer.load_state_dict(plan.state.optimizer)
        for group in optimizer.param_groups:
            group["lr"] = plan.learning_rate
        if plan.probe_before:
            probe_before = probe_loss(forward, cache, device=device, dtype=dtype)
        started = time.perf_counter()
        step = start
        while step < plan.end_step and not (stop is not None and stop.is_set()):
            index = torch.randint(0, cache.image_count, (plan.batch_size,), generator=generator)
            mean, std = cache.latent_mean[index], cache.latent_std[index]
            latents = mean + std * torch.randn(mean.shape, generator=generator)
            noise = torch.randn(latents.shape, generator=generator)
            sigmas = sample_sigmas(plan.batch_size, generator)
            with _autocast(cuda):
                loss = flow_matching_loss(forward, latents.to(device, dtype),
                                          noise.to(device, dtype), sigmas, text,
                                          guidance=_guidance(transformer))
            torch.autograd.backward(loss)
            torch.nn.utils.clip_grad_norm_(params, _MAX_GRAD_NORM)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            value = float(loss.detach())
            loss_ema = value if loss_ema is None else (
                _LOSS_SMOOTHING * loss_ema + (1 - _LOSS_SMOOTHING) * value)
            if on_step is not None:
                on_step(step, loss_ema)
        elapsed = time.perf_counter() - started
        if plan.probe_after and step >= plan.end_step:
            probe_after = probe_loss(forward, cache, device=device, dtype=dtype)
        state = TrainState(
            step=step,
            weights=adapter_weights(transformer, plan.adapter_name, torch.float32),
            optimizer=_to_cpu(optimizer.state_dict()),
            rng=generator.get_state(),
            loss=loss_ema,
        )
    done = step - start
    return ChunkResult(state, elapsed / done if done else None, probe_before, probe_after)


def probe_loss(forward: Callable[..., Any], cache: TrainingCache, *,
               device: torch.device | str, dtype: torch.dtype) -> float:
    """The objective on a fixed probe: the first images' latent means, each at the noise
    levels 0.2/0.4/0.6/0.8 with noise from a fixed seed, so two calls differ only by the
    model. ``forward`` is the transformer (with whatever adapter is active). Without
    gradients; call it in the GPU worker thread."""
    generator = torch.Generator("cpu").manual_seed(_PROBE_SEED)
    latents = cache.latent_mean[:_PROBE_IMAGES]
    text = cache.text.to(device, dtype)
    guidance = _guidance(getattr(forward, "__self__", forward))
    total = 0.0
    with torch.no_grad(), _autocast(torch.device(device).type == "cuda"):
        for sigma in _PROBE_SIGMAS:
            noise = torch.randn(latents.shape, generator=generator)
            sigmas = torch.full((latents.shape[0],), sigma)
            total += float(flow_matching_loss(forward, latents.to(device, dtype),
                                              noise.to(device, dtype), sigmas, text,
                                              guidance=guidance))
    return total / len(_PROBE_SIGMAS)


def _forward_of(transformer: Any) -> Callable[..., Any]:
    if getattr(transformer, "_compiled_call_impl", None) is not None:
        return transformer.forward  # type: ignore[no-any-return]
    return transformer  # type: ignore[no-any-return]


def _guidance(transformer: Any) -> float | None:
    config = getattr(transformer, "config", None)
    return GUIDANCE if getattr(config, "guidance_embeds", False) else None


def _autocast(cuda: bool) -> contextlib.AbstractContextManager[Any]:
    return torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()


def _attention_kernels(cuda: bool) -> contextlib.AbstractContextManager[Any]:
    """Training's attention without cuDNN's kernel. On an H200 (torch 2.11, CUDA 13) the
    first FLUX.1-dev-sized training step with the default kernels died with "illegal
    memory access" in the checkpointed backward; with cuDNN attention off, 512² and 1024²
    steps ran (bench/gpu_check.py, docs/benchmarks.md). Flash and memory-efficient
    attention remain; image generation keeps its kernels. The attention backend is torch's
    SDPA meanwhile (:func:`core.image.attention.native_attention`): a cuDNN backend chosen
    for images (ATTENTION_BACKEND=auto on Hopper) would override this exclusion."""
    if not cuda:
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                        SDPBackend.MATH])


def _to_cpu(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu").clone()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_to_cpu(item) for item in value]
    return value
