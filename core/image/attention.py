"""ATTENTION_BACKEND: which attention kernel the transformer calls.

``native`` (torch's SDPA, picking its kernel per call) is diffusers' default. ``auto`` picks
the fastest kernel this machine has for FLUX's attention (head size 128, bf16, no mask),
in the order of published H100 figures, and keeps the first one that runs a probe call on
the model's device and dtype:

1. ``_flash_3``: FlashAttention 3 (Hopper only; the ``flash_attn_interface`` package),
   about 1.5–2× FlashAttention 2 on an H100;
2. ``_native_cudnn``: torch's cuDNN attention (compute capability 9.0 or newer), up to
   75 % faster than FlashAttention 2 on an H100 (PyTorch 2.5 release notes);
3. ``flash``: FlashAttention 2 (the ``flash-attn`` package);
4. ``native``: anything else, the CPU included.

``bench/gpu_check.py`` times every kernel the card has at FLUX's 1024² shape, which shows
whether the order holds there. Any other name is set as asked: unknown names, kernels that
download from the Hub (the engine runs offline) are a :class:`AttentionBackendError` naming
the setting, and so is ``xformers`` unless its memory-efficient attention runs a probe call
(a package built for another torch or CUDA imports, but its kernels do not load).
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
from collections.abc import Iterator
from typing import Any

import torch

__all__ = ["AttentionBackendError", "auto_candidates", "native_attention",
           "resolve_attention_backend", "set_attention_backend"]

logger = logging.getLogger(__name__)

_HEAD_DIM = 128  # FLUX.1's attention head size


class AttentionBackendError(Exception):
    """ATTENTION_BACKEND names a kernel this machine cannot run."""


def auto_candidates(device: str, capability: tuple[int, int] | None,
                    installed: set[str]) -> list[str]:
    """``auto``'s kernels for ``device`` (a resolved name), fastest first, before probing.
    ``capability`` is the CUDA compute capability (None off CUDA); ``installed`` holds the
    optional packages found (``flash_attn_interface``, ``flash_attn``)."""
    if not device.startswith("cuda") or capability is None:
        return ["native"]
    candidates = []
    if capability[0] == 9 and "flash_attn_interface" in installed:
        candidates.append("_flash_3")
    if capability >= (9, 0):
        candidates.append("_native_cudnn")
    if capability >= (8, 0) and "flash_attn" in installed:
        candidates.append("flash")
    return [*candidates, "native"]


def resolve_attention_backend(requested: str, *, device: str, dtype: torch.dtype) -> str:
    """The backend to set: ``requested`` itself, or for ``auto`` the first of
    :func:`auto_candidates` that runs a probe call on ``device`` in ``dtype``. ``xformers``
    must run one too: :class:`AttentionBackendError` otherwise."""
    if requested == "xformers":
        _require_xformers(device, dtype)
    if requested != "auto":
        return requested
    capability = (torch.cuda.get_device_capability(torch.device(device))
                  if device.startswith("cuda") else None)
    installed = {name for name in ("flash_attn_interface", "flash_attn")
                 if importlib.util.find_spec(name) is not None}
    for candidate in auto_candidates(device, capability, installed):
        if candidate == "native" or _runs(candidate, device, dtype):
            logger.info("ATTENTION_BACKEND=auto: %s", candidate)
            return candidate
    return "native"  # unreachable: "native" ends every list


def _runs(backend: str, device: str, dtype: torch.dtype) -> bool:
    from diffusers.models.attention_dispatch import AttentionBackendName, dispatch_attention_fn

    query = torch.randn(1, 64, 2, _HEAD_DIM, device=device, dtype=dtype)
    try:
        with torch.no_grad():
            dispatch_attention_fn(query, query, query, backend=AttentionBackendName(backend))
    except Exception as exc:  # noqa: BLE001 - any failure: not usable here, say why
        logger.info("ATTENTION_BACKEND=auto: %s does not run here (%s: %s)", backend,
                    type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
        return False
    return True


def _require_xformers(device: str, dtype: torch.dtype) -> None:
    """The call diffusers' xformers backend makes (``xformers.ops.memory_efficient_attention``,
    whose fmha dispatch picks a kernel), once on ``device`` in ``dtype``."""
    try:
        import xformers.ops as xops  # optional: imported only when chosen
    except ModuleNotFoundError as exc:
        if exc.name != "xformers":
            raise AttentionBackendError(
                f"ATTENTION_BACKEND='xformers' but xformers cannot be imported "
                f"({_first_line(exc)}); install the `gpu` extra built for this torch, or use "
                "ATTENTION_BACKEND=auto") from exc
        raise AttentionBackendError(
            "ATTENTION_BACKEND='xformers' but xformers is not installed "
            "(pip install 'multimodal-engine[gpu]', or use ATTENTION_BACKEND=native)"
        ) from exc
    except Exception as exc:  # a build whose import fails
        raise AttentionBackendError(
            f"ATTENTION_BACKEND='xformers' but xformers cannot be imported ({_first_line(exc)}); "
            "install the `gpu` extra built for this torch, or use ATTENTION_BACKEND=auto"
        ) from exc
    query = torch.randn(1, 64, 2, _HEAD_DIM, device=device, dtype=dtype)
    try:
        with torch.no_grad():
            xops.memory_efficient_attention(query, query, query)
    except Exception as exc:  # no kernel for this build, device or dtype
        raise AttentionBackendError(
            f"ATTENTION_BACKEND='xformers' cannot run on {device} in {dtype} "
            f"({_first_line(exc)}); xformers must be built for this torch and CUDA "
            "(docs/image.md), or use ATTENTION_BACKEND=auto") from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


@contextlib.contextmanager
def native_attention(transformer: Any) -> Iterator[None]:
    """Every attention of ``transformer`` on torch's SDPA meanwhile (whose kernels the
    caller may restrict with ``sdpa_kernel``), the kernels set before restored after. For
    training: FlashAttention 3's diffusers op has no backward, and the cuDNN backend would
    override the trainer's exclusion of cuDNN (core/training/trainer.py)."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    processors = [module.processor for module in transformer.modules()
                  if hasattr(getattr(module, "processor", None), "_attention_backend")]
    before = [processor._attention_backend for processor in processors]
    try:
        for processor in processors:
            processor._attention_backend = AttentionBackendName.NATIVE
        yield
    finally:
        for processor, backend in zip(processors, before, strict=True):
            processor._attention_backend = backend


def set_attention_backend(pipeline: Any, backend: str) -> None:
    """Set ``backend`` (resolved: not ``auto``) on the pipeline's transformer."""
    from diffusers.models.attention_dispatch import AttentionBackendName

    if backend == "native":
        return  # diffusers' default (torch SDPA); setting it would only log a warning
    names = {name.value for name in AttentionBackendName}
    if backend not in names:
        allowed = sorted(["auto", *(name for name in names if not name.startswith("_"))])
        raise AttentionBackendError(
            f"ATTENTION_BACKEND={backend!r} is unknown (allowed: {', '.join(allowed)})")
    if backend.endswith("_hub"):
        raise AttentionBackendError(
            f"ATTENTION_BACKEND={backend!r} downloads its kernel from the Hub at start-up; "
            "the engine runs offline")
    try:
        pipeline.transformer.set_attention_backend(backend)
    except (RuntimeError, ValueError, ImportError) as exc:
        raise AttentionBackendError(
            f"ATTENTION_BACKEND={backend!r} is not usable here: {exc}") from exc
