"""What makes the transformer faster than plain bf16 eager: fp8 weights, step caches.

Two settings, both measured by ``bench/gpu_check.py``:

- ``QUANTIZATION=fp8``: torchao's dynamic float8 (weights and activations, per row) on
  every linear layer of the transformer. Needs CUDA compute capability 8.9 or newer (Ada,
  Hopper) and torchao. LoRA adapters stay in bf16 beside the fp8 base layers (peft's
  torchao layers), so switching characters still loads nothing twice.
- ``STEP_CACHE``: a diffusers cache hook that skips most of the transformer on steps whose
  output changes little. ``taylorseer`` computes one step in ``STEP_CACHE_INTERVAL`` fully
  and predicts the others by a Taylor series: its schedule is fixed, so the speed-up and the
  pixels depend on the request only. ``first_block`` and ``mag`` decide from the step's
  content (a threshold): the decision is taken over the whole batch, so with them a request
  is never batched with another (:attr:`Acceleration.batch_dependent`), which would make its
  pixels depend on its neighbours.

Every step cache also runs on a compiled transformer (COMPILE_TRANSFORMER=true), its hooks
eager between the compiled graphs: :class:`StepCache` says how.

:meth:`StepCache.before_call` resets the hooks' state before every pipeline call (a call
cut short by a cancel leaves it half filled) and sizes MagCache's ratios to the call's
step count, so the same request always gives the same pixels.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "NO_ACCELERATION", "Acceleration", "AccelerationError", "StepCache",
    "acceleration_warnings", "check_acceleration", "hook_step_cache", "quantize",
]

_FP8_CAPABILITY = (8, 9)  # Ada and Hopper: the first with float8 tensor cores
_FIRST_BLOCK_THRESHOLD = 0.05  # diffusers' FirstBlockCacheConfig default
_MAG_THRESHOLD = 0.06  # diffusers' MagCacheConfig default


class AccelerationError(Exception):
    """A combination of settings this machine cannot run; ``setting`` names the variable."""

    def __init__(self, message: str, *, setting: str) -> None:
        super().__init__(message)
        self.setting = setting


@dataclass(frozen=True)
class Acceleration:
    """The speed settings of one model. ``threshold`` applies to ``first_block`` and
    ``mag`` (None: their defaults), ``interval`` to ``taylorseer``."""

    quantization: str = "none"
    step_cache: str = "none"
    threshold: float | None = None
    interval: int = 5

    @property
    def batch_dependent(self) -> bool:
        """True when a step is skipped or not by the batch's content: such a request must
        run alone to give the same pixels every time."""
        return self.step_cache in ("first_block", "mag")

    @property
    def effective_threshold(self) -> float | None:
        if self.step_cache == "first_block":
            return self.threshold if self.threshold is not None else _FIRST_BLOCK_THRESHOLD
        if self.step_cache == "mag":
            return self.threshold if self.threshold is not None else _MAG_THRESHOLD
        return None

    @property
    def key(self) -> str:
        """What the result cache must tell apart: other settings, other pixels."""
        cache = self.step_cache
        if cache == "taylorseer":
            cache = f"taylorseer/{self.interval}"
        elif cache != "none":
            cache = f"{cache}/{self.effective_threshold}"
        return f"quantization={self.quantization};step_cache={cache}"

    def describe(self) -> dict[str, Any]:
        """For ``/health``."""
        described: dict[str, Any] = {"quantization": self.quantization,
                                     "step_cache": self.step_cache}
        if self.step_cache == "taylorseer":
            described["step_cache_interval"] = self.interval
        elif self.step_cache != "none":
            described["step_cache_threshold"] = self.effective_threshold
        return described


NO_ACCELERATION = Acceleration()


def check_acceleration(acceleration: Acceleration, *, device: str) -> None:
    """Raises :class:`AccelerationError` (one line, naming the setting) for what ``device``
    (resolved: ``cpu``, ``cuda:N``) cannot run; before any weight is loaded. Every step
    cache runs on a compiled transformer too (:class:`StepCache`)."""
    if acceleration.quantization == "fp8":
        if not device.startswith("cuda"):
            raise AccelerationError(
                "QUANTIZATION=fp8 needs a CUDA GPU of compute capability 8.9 or newer (Ada, "
                f"Hopper); the model runs on {device}: use QUANTIZATION=none",
                setting="QUANTIZATION")
        capability = torch.cuda.get_device_capability(torch.device(device))
        if capability < _FP8_CAPABILITY:
            raise AccelerationError(
                f"QUANTIZATION=fp8 needs compute capability 8.9 or newer; this GPU has "
                f"{capability[0]}.{capability[1]}: use QUANTIZATION=none",
                setting="QUANTIZATION")
        if importlib.util.find_spec("torchao") is None:
            raise AccelerationError(
                "QUANTIZATION=fp8 needs torchao (pip install 'multimodal-engine[gpu]')",
                setting="QUANTIZATION")
    if acceleration.step_cache == "mag" and acceleration.threshold is not None \
            and acceleration.threshold > 0.5:
        raise AccelerationError("STEP_CACHE_THRESHOLD above 0.5 makes MagCache skip almost "
                                "every step", setting="STEP_CACHE_THRESHOLD")


def acceleration_warnings(acceleration: Acceleration, *, compiled: bool) -> list[str]:
    """What runs but does not pay, one line each, for the log at start-up."""
    if acceleration.quantization == "fp8" and not compiled:
        return [("QUANTIZATION=fp8 without COMPILE_TRANSFORMER=true saves memory but is "
                 "slower than bf16: torchao quantizes every activation in its own kernels "
                 "unless compilation fuses them (published: slower than bf16 eager); set "
                 "COMPILE_TRANSFORMER=true for speed")]
    return []


class StepCache:
    """The step cache hooked on a transformer; :meth:`before_call` before every call.

    With ``compiled`` (the repeated blocks' ``forward`` already compiled, by
    :func:`core.image.loader.prepare_model`), the cache's Python runs eagerly between
    compiled graphs, never inside one: traced, its per-step state (step counters, whether a
    step is skipped, the Taylor factors' dict) would be guarded on and recompile at every
    step until torch gives up and runs the blocks eagerly. ``first_block`` and ``mag`` hook
    whole blocks: their hooks wrap the compiled ``forward`` (diffusers' hooks call the
    ``forward`` they found, and put it back when removed). ``taylorseer`` hooks the
    attention inside each block: the attention's ``forward`` is compiled before it is
    hooked, and the hooked one is excluded from the block's graph
    (``torch.compiler.disable``), so each block runs as two graphs (before and after its
    attention) around the eager hook and the compiled attention. No CUDA graphs: the
    cache's tensors live from one step to the next.
    """

    def __init__(self, transformer: Any, acceleration: Acceleration, *,
                 compiled: bool = False) -> None:
        self._transformer = transformer
        self._acceleration = acceleration
        self._mag_steps: int | None = None
        if acceleration.step_cache == "mag":
            return  # sized per call
        if compiled and acceleration.step_cache == "taylorseer":
            attentions = _taylorseer_targets(transformer)
            for module in attentions:
                module.forward = torch.compile(module.forward, dynamic=True)
            transformer.enable_cache(_config(acceleration, steps=None))
            for module in attentions:
                module.forward = _outside_graphs(module.forward)
        else:
            transformer.enable_cache(_config(acceleration, steps=None))

    def before_call(self, steps: int) -> None:
        """Forget what the last call left in the hooks; size MagCache to ``steps``."""
        if self._acceleration.step_cache == "mag" and steps != self._mag_steps:
            if self._mag_steps is not None:
                self._transformer.disable_cache()
            self._transformer.enable_cache(_config(self._acceleration, steps=steps))
            self._mag_steps = steps
        self._transformer._reset_stateful_cache()


# TaylorSeer's modules on FLUX: diffusers' default (the attention of every block), named
# here so that a compiled transformer compiles exactly the modules it hooks
_TAYLORSEER_TARGETS = (r"^transformer_blocks.*attn", r"^single_transformer_blocks.*attn")


def _outside_graphs(hooked: Any) -> Any:
    """``hooked`` as a call the enclosing compiled graph breaks at and runs eagerly. A new
    function, not ``torch.compiler.disable(hooked)`` itself: diffusers' hooked ``forward``
    is ``functools``-wrapped around the original one, and dynamo followed that to the
    original, leaving the hook out of the graph (and the cache off)."""
    def forward(*args: Any, **kwargs: Any) -> Any:
        return hooked(*args, **kwargs)

    disable: Any = torch.compiler.disable  # untyped in torch
    return disable(forward)


def _taylorseer_targets(transformer: Any) -> list[Any]:
    return [module for name, module in transformer.named_modules()
            if any(re.fullmatch(pattern, name) for pattern in _TAYLORSEER_TARGETS)]


def _config(acceleration: Acceleration, *, steps: int | None) -> Any:
    import diffusers.hooks

    hooks: Any = diffusers.hooks
    threshold = acceleration.effective_threshold
    if acceleration.step_cache == "first_block":
        return hooks.FirstBlockCacheConfig(threshold=threshold)
    if acceleration.step_cache == "taylorseer":
        return hooks.TaylorSeerCacheConfig(cache_interval=acceleration.interval,
                                           cache_identifiers=list(_TAYLORSEER_TARGETS))
    from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

    # FLUX.1-dev's ratios, measured at 28 steps; diffusers interpolates them to ``steps``
    return hooks.MagCacheConfig(threshold=threshold, num_inference_steps=steps,
                                mag_ratios=FLUX_MAG_RATIOS)


def quantize(pipeline: Any, acceleration: Acceleration) -> None:
    """fp8 weights for the transformer, when asked: before any LoRA is added (the adapters,
    the hotswap slot's included, then wrap the fp8 layers) and before compiling."""
    if acceleration.quantization == "fp8":
        from torchao.quantization import (  # type: ignore[import-not-found,unused-ignore]
            Float8DynamicActivationFloat8WeightConfig,
            PerRow,
            quantize_,
        )

        from core.image.fused_qkv import quantizable

        quantize_(pipeline.transformer,
                  Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()),
                  filter_fn=quantizable(pipeline.transformer))


def hook_step_cache(pipeline: Any, acceleration: Acceleration, *,
                    compiled: bool = False) -> StepCache | None:
    """Hooks the step cache on the transformer, after compilation when ``compiled``
    (see :class:`StepCache`); returns the cache to call before each call."""
    if acceleration.step_cache == "none":
        return None
    return StepCache(pipeline.transformer, acceleration, compiled=compiled)
