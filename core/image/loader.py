"""Load a FLUX pipeline from a local folder, once, at start-up.

:func:`load_pipeline` checks the folder first (one :class:`ModelLoadError` listing all that
is missing), never touches the network, picks the dtype (:func:`choose_precision`: bf16 on
CUDA, also when USE_FP16 asks for fp16, which FLUX cannot run in; fp32 on CPU), and
applies the memory mode, the attention backend, the speed settings (fp8, a step cache:
:mod:`core.image.acceleration`) and, when asked, compilation with a LoRA hotswap slot and
fused QKV projections (:mod:`core.image.fused_qkv`). The tiny development model is
recognised by its marker file.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.image._fresh_thread import run_in_fresh_thread
from core.image._layout import missing_parts
from core.image.acceleration import (
    NO_ACCELERATION,
    Acceleration,
    AccelerationError,
    StepCache,
    acceleration_warnings,
    check_acceleration,
    hook_step_cache,
    quantize,
)
from core.image.attention import (
    AttentionBackendError,
    resolve_attention_backend,
    set_attention_backend,
)
from core.image.devmodel import read_dev_marker
from core.image.fused_qkv import fuse_projections, release_projection_weights

__all__ = [
    "LoadedModel", "ModelLoadError", "Precision", "choose_precision", "load_pipeline",
    "prepare_model", "resolve_device",
]

logger = logging.getLogger(__name__)

_MEMORY_MODES = ("none", "model_offload", "sequential_offload")
HOTSWAP_RANK = 16  # the highest LoRA rank a compiled model can swap in


class ModelLoadError(Exception):
    """The image model cannot be loaded. ``path`` is the model folder; ``missing`` lists
    what it lacks (empty for other causes); ``setting`` names the variable at fault, if
    one is (MEMORY_MODE, ATTENTION_BACKEND, DEVICE, QUANTIZATION, STEP_CACHE)."""

    def __init__(
        self, message: str, *, path: Path, missing: tuple[str, ...] = (),
        setting: str | None = None,
    ) -> None:
        super().__init__(message)
        self.path = path
        self.missing = missing
        self.setting = setting


@dataclass(frozen=True)
class LoadedModel:
    """A pipeline ready for the GPU worker. ``device`` is where it computes (``cuda:0``,
    ``cpu``); ``hotswap_slot`` names the adapter slot of a compiled transformer (None:
    adapters are loaded into an LRU set); ``precision_note`` says why ``dtype`` is not what
    USE_FP16 asked for (None: it is)."""

    pipeline: Any
    name: str
    development_model: bool
    device: str
    dtype: torch.dtype
    memory_mode: str = "none"
    compiled: bool = False
    hotswap_slot: str | None = None
    precision_note: str | None = None
    acceleration: Acceleration = NO_ACCELERATION
    step_cache: StepCache | None = None
    fused_qkv: bool = False
    attention_backend: str = "native"

    def before_call(self, steps: int) -> None:
        """Called by the GPU worker before each pipeline call of ``steps`` steps."""
        if self.step_cache is not None:
            self.step_cache.before_call(steps)

    @property
    def dtype_name(self) -> str:
        """``bfloat16``, ``float32`` … (for ``/health``)."""
        return str(self.dtype).removeprefix("torch.")


@dataclass(frozen=True)
class Precision:
    """The dtype every component of the pipeline runs in, and ``note``: why it is not
    what was asked for (None when it is)."""

    dtype: torch.dtype
    note: str | None = None


def choose_precision(device: str, use_fp16: bool) -> Precision:
    """FLUX's dtype on ``device`` (resolved: ``cpu``, ``cuda``, ``cuda:N``).

    - CUDA: bfloat16, FLUX's native dtype. With USE_FP16 too: the FLUX transformer's
      and T5's activations exceed float16's range (65504), so in fp16 they overflow to
      inf/NaN and every image comes out black. One dtype for all components, because
      FluxPipeline hands tensors between them without casting.
    - Anything else (the CPU): float32; USE_FP16 does not apply there.
    """
    if device.startswith("cuda"):
        note = ("USE_FP16=true ignored: FLUX's transformer and T5 overflow in float16 "
                "(black images); running in bfloat16") if use_fp16 else None
        return Precision(torch.bfloat16, note)
    note = (f"USE_FP16=true ignored on {device}: half precision applies to CUDA only; "
            "running in float32") if use_fp16 else None
    return Precision(torch.float32, note)


def resolve_device(device: str) -> str:
    """``auto`` → ``cuda`` when torch sees one, else ``cpu``; anything else unchanged."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def load_pipeline(
    path: Path,
    *,
    device: str,
    use_fp16: bool,
    memory_mode: str,
    attention_backend: str,
    compile_transformer: bool,
    acceleration: Acceleration = NO_ACCELERATION,
    fuse_qkv: bool = True,
) -> LoadedModel:
    """Load the ``FluxPipeline`` in ``path`` for ``device`` (``auto``, ``cpu``, ``cuda[:n]``).

    Raises :class:`ModelLoadError` when the folder is missing or incomplete (listing every
    missing part), when DEVICE names CUDA on a machine without it, when MEMORY_MODE asks
    for offloading without an accelerator, when ATTENTION_BACKEND is unknown or not
    usable here, when QUANTIZATION or STEP_CACHE ask for what this machine cannot run, or
    when diffusers fails to load what is there.
    """
    path = Path(path)
    missing = missing_parts(path)
    if missing:
        raise ModelLoadError(
            f"image model at {path} is incomplete: missing {', '.join(missing)} "
            "(FLUX_MODEL_PATH must be a diffusers FluxPipeline folder)",
            path=path, missing=tuple(missing),
        )
    resolved = _check_machine(device, memory_mode, compile_transformer, acceleration, path)
    precision = choose_precision(resolved, use_fp16)
    if precision.note is not None:
        logger.warning("%s", precision.note)
    marker = read_dev_marker(path)
    # torch work off the caller's thread: see core/image/_fresh_thread.py
    pipeline = run_in_fresh_thread(lambda: _from_pretrained(path, precision.dtype))
    return prepare_model(
        pipeline, name=str(marker["name"]) if marker else path.name, path=path,
        development_model=marker is not None, device=resolved, memory_mode=memory_mode,
        attention_backend=attention_backend, compile_transformer=compile_transformer,
        acceleration=acceleration, precision_note=precision.note, fuse_qkv=fuse_qkv,
    )


def prepare_model(
    pipeline: Any,
    *,
    name: str,
    path: Path,
    development_model: bool,
    device: str,
    memory_mode: str = "none",
    attention_backend: str = "native",
    compile_transformer: bool = False,
    acceleration: Acceleration = NO_ACCELERATION,
    precision_note: str | None = None,
    fuse_qkv: bool = True,
) -> LoadedModel:
    """Make a constructed ``FluxPipeline`` (already in its dtype) ready for the GPU worker:
    what :func:`load_pipeline` does after reading the folder. ``bench/gpu_check.py`` uses
    it for a full-size FLUX.1-dev with random weights built directly on the GPU.

    ``fuse_qkv`` (FUSE_QKV) fuses the attention projections of a compiled model kept on
    its device (:mod:`core.image.fused_qkv`); an eager model's LoRA set rebuilds the
    projections' layers, and offloading moves weights that fusion shares, so neither is
    fused (``LoadedModel.fused_qkv`` says which)."""
    resolved = _check_machine(device, memory_mode, compile_transformer, acceleration, path)
    fused = fuse_qkv and compile_transformer and memory_mode == "none"
    for warning in acceleration_warnings(acceleration, compiled=compile_transformer):
        logger.warning("%s", warning)

    def prepare() -> tuple[StepCache | None, str | None, str]:
        pipeline.set_progress_bar_config(disable=True)
        try:
            backend = resolve_attention_backend(attention_backend, device=resolved,
                                                dtype=pipeline.transformer.dtype)
            set_attention_backend(pipeline, backend)
        except AttentionBackendError as exc:
            raise ModelLoadError(str(exc), path=path, setting="ATTENTION_BACKEND") from exc
        if memory_mode == "model_offload":
            pipeline.enable_model_cpu_offload(device=resolved)
        elif memory_mode == "sequential_offload":
            pipeline.enable_sequential_cpu_offload(device=resolved)
        else:
            pipeline.to(resolved)
        if fused:
            fuse_projections(pipeline.transformer)
        quantize(pipeline, acceleration)
        # order: fused projections, fp8 layers, the hotswap slot around them, compilation,
        # then the step cache's hooks around the compiled blocks (StepCache says why)
        slot = (_compile(pipeline, hooked=acceleration.step_cache != "none", fused=fused)
                if compile_transformer else None)
        return (hook_step_cache(pipeline, acceleration, compiled=slot is not None), slot,
                backend)

    step_cache, slot, backend = run_in_fresh_thread(prepare)
    dtype = pipeline.transformer.dtype
    logger.info("loaded image model %s from %s on %s (%s, memory mode %s, %s, attention %s%s%s)",
                name, path, resolved, dtype, memory_mode, acceleration.key, backend,
                ", compiled" if slot else "", ", fused QKV" if fused else "")
    return LoadedModel(
        pipeline=pipeline, name=name, development_model=development_model, device=resolved,
        dtype=dtype, memory_mode=memory_mode, compiled=slot is not None, hotswap_slot=slot,
        precision_note=precision_note, acceleration=acceleration, step_cache=step_cache,
        fused_qkv=fused, attention_backend=backend,
    )


def _check_machine(device: str, memory_mode: str, compile_transformer: bool,
                   acceleration: Acceleration, path: Path) -> str:
    """The resolved device, once the settings are known to be runnable on it."""
    resolved = resolve_device(device)
    is_cuda = resolved.startswith("cuda")
    if is_cuda and not torch.cuda.is_available():
        raise ModelLoadError(f"DEVICE={device!r} but torch sees no CUDA device", path=path,
                             setting="DEVICE")
    _check_memory_mode(memory_mode, is_cuda, path)
    try:
        check_acceleration(acceleration, device=resolved)
    except AccelerationError as exc:
        raise ModelLoadError(str(exc), path=path, setting=exc.setting) from None
    return resolved


def _check_memory_mode(memory_mode: str, is_cuda: bool, path: Path) -> None:
    if memory_mode not in _MEMORY_MODES:
        raise ModelLoadError(
            f"MEMORY_MODE={memory_mode!r} is unknown (allowed: {', '.join(_MEMORY_MODES)})",
            path=path, setting="MEMORY_MODE",
        )
    if memory_mode != "none" and not is_cuda:
        # diffusers would raise "requires accelerator" deep inside; say it here
        raise ModelLoadError(
            f"MEMORY_MODE={memory_mode!r} offloads to a GPU, but the model runs on the CPU "
            "(no CUDA device); use MEMORY_MODE=none",
            path=path, setting="MEMORY_MODE",
        )


def _from_pretrained(path: Path, dtype: torch.dtype) -> Any:
    import diffusers

    pipeline_class: Any = diffusers.FluxPipeline
    try:
        return pipeline_class.from_pretrained(path, dtype=dtype, local_files_only=True)
    except (OSError, ValueError, RuntimeError, KeyError, TypeError) as exc:
        raise ModelLoadError(f"image model at {path} failed to load: {exc}", path=path) from exc


def _compile(pipeline: Any, *, hooked: bool, fused: bool = False) -> str:
    """Prepare the LoRA hotswap slot, then compile the transformer's repeated blocks.

    The slot must exist before compilation (peft refuses to prepare a compiled model).
    Regional compilation: the ``forward`` of each of FLUX's double and single blocks (its
    ``_repeated_blocks``) is compiled, and the blocks of a kind share its graphs (their
    weights are inputs, not guards): FLUX.1's 57 blocks cost a few block-sized compilations
    instead of one of the whole transformer (on the CPU, with FLUX.1's block count, 90 s
    instead of 594 s: docs/image.md). The first block of a kind gets its inputs laid out
    otherwise than the next ones (a contiguous tensor, then a view of the joint sequence),
    which is a second graph for that kind. The embedders and the output layer around the
    blocks stay eager.

    Without a step cache: diffusers' ``compile_repeated_blocks`` (``nn.Module.compile`` of
    each block: its call, which traces whatever ``forward`` is at call time). With one
    (``hooked``): each block's ``forward`` itself is compiled, because the cache's hooks,
    added afterwards, replace ``forward`` with Python that calls the one they found: they
    then run eagerly around the graphs instead of being traced into them, which would
    recompile at every step (:class:`core.image.acceleration.StepCache`). Caveat of that
    form, seen on the tiny model: when an image's token count equals the attention's head
    size (16 tokens, a 64×64 image, on the tiny model; 128 tokens on FLUX.1), torch ties the
    two and the next other size compiles once more.

    Shapes are dynamic from the start (``dynamic=True``, and no "duck sizing", which would
    tie an image's token count to any other dimension that happens to be equal), so other
    image sizes do not recompile. Sizes 0 and 1 are always specialised by torch: a batch of
    one image and a batch of several have graphs of their own. Compilation happens at the
    first calls, which the warm-up (:mod:`core.image.warmup`) makes before the engine is
    ready.
    """
    import torch.fx.experimental._config as fx_config

    from core.lora.adapters import HOTSWAP_SLOT, prepare_hotswap_slot

    prepare_hotswap_slot(pipeline, rank=HOTSWAP_RANK, slot=HOTSWAP_SLOT)
    if fused:  # the projections keep their LoRA layers only (core/image/fused_qkv.py)
        release_projection_weights(pipeline.transformer)
    fx_config.use_duck_shape = False  # read when a graph is traced (process-wide)
    transformer = pipeline.transformer
    if not hooked:
        transformer.compile_repeated_blocks(dynamic=True)
        return HOTSWAP_SLOT
    repeated = tuple(transformer._repeated_blocks)
    for module in transformer.modules():
        if type(module).__name__ in repeated:
            module.forward = torch.compile(module.forward, dynamic=True)
    return HOTSWAP_SLOT
