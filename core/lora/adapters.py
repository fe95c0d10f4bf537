"""The LoRA adapters loaded into a pipeline: an LRU set switched per request.

Used only by the GPU worker's thread, between pipeline calls. Two modes:

- **LRU set** (eager model): up to ``capacity`` peft adapters stay loaded; a request's
  adapters (its character LoRA and those stacked on it) are made the active ones with
  their scales (``set_adapters(names, weights)``); a request without a LoRA runs
  with the adapters disabled (``disable_lora``), which is bit-identical to the base model
  and takes < 1 ms, where ``unload_lora_weights`` would force reloading the next time.
  The least recently used adapter is deleted when a new one does not fit.
- **Hotswap slot** (compiled transformer): one adapter slot, prepared by
  :func:`prepare_hotswap_slot` before compilation and never disabled; each LoRA is
  hot-swapped into it (``load_lora_weights(..., hotswap=True)``), and "no LoRA" sets the
  slot's scaling tensors to zero (the LoRA's output times 0 adds exactly nothing), so
  neither switching LoRAs nor going to or from the base model changes anything torch.compile
  guards on: no recompilation. (``disable_lora`` would flip a flag and ``requires_grad`` on
  every layer, each a guard: a second set of graphs.) Going back to the LoRA in the slot
  copies its scalings back, without reading its file; a ``lora_scale`` other than 1 writes
  the LoRA's scalings times the scale into the same tensors (values, not guards). One slot
  holds one LoRA: stacking would recompile, so the image service refuses it on a compiled
  model.

Before a LoRA is loaded, in both modes, its tensors are checked against the model's layers
(:meth:`AdapterSet.check_fits`): every layer it names exists, its ``lora_A`` takes the
layer's inputs and its ``lora_B`` gives the layer's outputs. diffusers would otherwise
widen the model's own layers to a LoRA's sizes (its Control-LoRA support) or zero-pad the
LoRA, silently: the model would stay broken for every later request. A LoRA that does not
fit raises :class:`IncompatibleLoraError` (``INVALID_REQUEST``) with the model untouched;
one that fails to load otherwise raises :class:`LoraLoadError`: the request never silently
runs on the base model. A file in another trainer's layout is read and converted once, by
the check, which hands its converted tensors to diffusers for the load.
"""

from __future__ import annotations

import logging
import time
import warnings
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

from core.lora.registry import LoraInfo, LoraLayer, file_sha256, read_lora_layers
from schemas.errors import InternalError, InvalidRequestError

__all__ = ["HOTSWAP_SLOT", "AdapterSet", "IncompatibleLoraError", "LoraLoadError",
           "prepare_hotswap_slot"]

logger = logging.getLogger(__name__)

HOTSWAP_SLOT = "hotswap_slot"
_HOTSWAP_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")


class LoraLoadError(InternalError):
    """A registered LoRA could not be made active (unreadable, changed since it was
    registered, refused by diffusers); ``lora_id`` names it."""

    def __init__(self, message: str, lora_id: str) -> None:
        super().__init__(message)
        self.lora_id = lora_id


class IncompatibleLoraError(InvalidRequestError):
    """A registered LoRA not made for this model (``INVALID_REQUEST``): a layer it names
    is not in the model, its matrices take or give other sizes than that layer's, or its
    tensors are no plain LoRA layers. Raised before anything is loaded, so the model is
    exactly as it was. ``lora_id`` names the LoRA, ``field`` the request's field that
    named it when known (the GPU worker does not know it: see :meth:`naming`)."""

    def __init__(self, reason: str, lora_id: str, field: str | None = None) -> None:
        super().__init__(f"{field}: {reason}" if field else reason, field=field)
        self.reason = reason
        self.lora_id = lora_id

    def naming(self, field: str) -> IncompatibleLoraError:
        """The same refusal, for the request's ``field``."""
        return IncompatibleLoraError(self.reason, self.lora_id, field)


_Key = tuple[str, str]  # (lora_id, sha256): a re-registered id is a new adapter
_UNKNOWN = object()
_MULTIPLE_ADAPTERS_WARNING = "Already found a `peft_config` attribute in the model"


class AdapterSet:
    """The adapters of ``pipeline`` (a ``FluxPipeline``), owned by one thread.

    ``capacity`` bounds the loaded set (ignored with a hotswap slot, which holds one).
    ``on_switch(seconds)`` is told how long each change of the active adapter took;
    ``on_load(seconds)`` how long each load of weights took (part of a switch);
    ``on_evict()`` when an adapter is dropped.
    """

    def __init__(
        self,
        pipeline: Any,
        *,
        capacity: int,
        hotswap_slot: str | None = None,
        on_switch: Callable[[float], None] | None = None,
        on_evict: Callable[[], None] | None = None,
        on_load: Callable[[float], None] | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"LORA_CACHE_SIZE must be >= 1, got {capacity}")
        self._pipeline = pipeline
        self._capacity = capacity
        self._slot = hotswap_slot
        self._on_switch = on_switch
        self._on_evict = on_evict
        self._on_load = on_load
        self._loaded: OrderedDict[_Key, str] = OrderedDict()  # key -> adapter name
        self._slot_content: _Key | None = None  # what the hotswap slot holds
        self._scalings: list[Any] = []  # the LoRA's own scalings, given back after silence
        self._silenced = False
        self._slot_scale = 1.0  # the scale the slot's LoRA runs at now
        # the adapters the next call runs with: (key, scale) pairs ("()": the base model),
        # or _UNKNOWN
        self._state: tuple[tuple[_Key, float], ...] | object = ()
        self._counter = 0
        self._loaded_ids: tuple[str, ...] = ()
        self._layers: dict[str, tuple[int, int]] | None = None  # the model's, when known

    @property
    def loaded(self) -> list[str]:
        """Ids of the loaded LoRAs, least recently used first (a snapshot taken after the
        last change, safe to read from any thread)."""
        return list(self._loaded_ids)

    def activate(self, lora: LoraInfo | None) -> None:
        """Make ``lora`` the only active adapter, at scale 1 (see :meth:`activate_all`);
        None runs the base model exactly."""
        self.activate_all(() if lora is None else ((lora, 1.0),))

    def activate_all(self, adapters: Sequence[tuple[LoraInfo, float]]) -> None:
        """Make ``adapters`` (LoRAs with their scales, each > 0) the active ones, combined
        (``set_adapters(names, weights)``), loading those not loaded; none runs the base
        model exactly. The adapters of one call are never evicted for each other: a call
        that needs more than ``capacity`` holds them all until the next one. Raises
        :class:`IncompatibleLoraError` when one does not fit the model (before any is
        loaded: see :meth:`check_fits`), :class:`LoraLoadError` when one cannot be loaded,
        or with a hotswap slot for more than one LoRA (the set is then left with its
        adapters disabled or intact, never half-switched)."""
        wanted = tuple(((lora.lora_id, lora.fingerprint), float(scale))
                       for lora, scale in adapters)
        if wanted == self._state:
            for key, _ in wanted:
                self._loaded.move_to_end(key)
            return
        started = time.perf_counter()
        self._state = _UNKNOWN
        try:
            if not adapters:
                if self._slot is not None:
                    self._silence_slot()
                elif self._loaded:
                    self._pipeline.disable_lora()
            elif self._slot is not None:
                self._hotswap(*_one_lora(adapters))
            else:
                self._switch(adapters)
        finally:
            self._changed()
        self._state = wanted
        if self._on_switch is not None:
            self._on_switch(time.perf_counter() - started)

    def resync(self) -> None:
        """After foreign code used the pipeline: re-apply the active adapter on the next
        :meth:`activate`, and start over (unload all) if the loaded adapters changed."""
        self._state = _UNKNOWN
        if not self._consistent():
            logger.warning("the pipeline's LoRA adapters changed under the worker; resetting")
            self.reset()

    def reset(self) -> None:
        """Unload every adapter (a hotswap slot stays, silenced): the plain base model."""
        if self._slot is not None:
            self._slot_content = None
            self._silence_slot()
        elif self._present():
            self._pipeline.unload_lora_weights()
        self._loaded.clear()
        self._changed()
        self._state = ()

    def _changed(self) -> None:
        self._loaded_ids = tuple(lora_id for lora_id, _ in self._loaded)

    def _present(self) -> set[str]:
        try:
            return set(self._pipeline.get_list_adapters().get("transformer", []))
        except ValueError:  # no peft adapters at all
            return set()

    def _consistent(self) -> bool:
        expected = {self._slot} if self._slot is not None else set(self._loaded.values())
        return self._present() == expected

    def check_fits(self, lora: LoraInfo) -> str | dict[str, Any]:
        """Raises :class:`IncompatibleLoraError` unless every layer ``lora``'s file adapts
        is a linear layer of the model whose inputs its ``lora_A`` takes and whose outputs
        its ``lora_B`` gives, and :class:`LoraLoadError` when the file is unreadable or
        not the one registered. Reads the file's header (and, for another trainer's
        layout, its tensors, converted as diffusers converts them); changes nothing.
        Returns what to hand to ``load_lora_weights``: the file's path, or the tensors
        already converted (so the file is not read and converted twice; see
        :func:`~core.lora.registry.read_lora_layers`)."""
        _verify_file(lora)
        try:
            layers, converted = read_lora_layers(lora.path)
        except ValueError as exc:
            raise IncompatibleLoraError(f"LoRA {lora.lora_id!r} cannot be used: {exc}",
                                        lora.lora_id) from exc
        except OSError as exc:
            raise LoraLoadError(f"LoRA {lora.lora_id!r} is unreadable: {exc}",
                                lora.lora_id) from exc
        if self._layers is None:
            self._layers = _linear_layers(self._pipeline)
        problems = [problem for layer in layers
                    if (problem := _misfit(layer, self._layers)) is not None]
        if problems:
            more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
            raise IncompatibleLoraError(
                f"LoRA {lora.lora_id!r} was not made for this model: {problems[0]}{more}",
                lora.lora_id)
        return str(lora.path) if converted is None else converted

    def _switch(self, adapters: Sequence[tuple[LoraInfo, float]]) -> None:
        keep = {(lora.lora_id, lora.fingerprint) for lora, _ in adapters}
        checked = {(lora.lora_id, lora.fingerprint): self.check_fits(lora)
                   for lora, _ in adapters  # all of them before anything changes
                   if (lora.lora_id, lora.fingerprint) not in self._loaded}
        names: list[str] = []
        for lora, _ in adapters:
            key = (lora.lora_id, lora.fingerprint)
            name = self._loaded.get(key)
            if name is None:
                while len(self._loaded) >= self._capacity and self._evict(keep):
                    pass
                name = self._load(lora, checked.pop(key))
                self._loaded[key] = name
            self._loaded.move_to_end(key)
            names.append(name)
        self._pipeline.enable_lora()
        self._pipeline.set_adapters(names, [float(scale) for _, scale in adapters])

    def _load(self, lora: LoraInfo, source: str | dict[str, Any]) -> str:
        """Loads ``lora`` as a new adapter from ``source``, what :meth:`check_fits` gave."""
        self._counter += 1
        name = f"lora_{self._counter}"  # ids may hold dots, which peft names may not
        started = time.perf_counter()
        try:
            with warnings.catch_warnings():
                # several adapters in one model is the point of the set
                warnings.filterwarnings("ignore", _MULTIPLE_ADAPTERS_WARNING, UserWarning)
                self._pipeline.load_lora_weights(source, adapter_name=name)
            self._loaded_in(time.perf_counter() - started)
        except Exception as exc:
            self._forget_partial(name)
            if _is_out_of_memory(exc):
                raise  # transient: the worker frees memory and retries
            raise LoraLoadError(
                f"LoRA {lora.lora_id!r} could not be loaded: {exc}", lora.lora_id
            ) from exc
        logger.info("loaded LoRA %s as adapter %s", lora.lora_id, name)
        return name

    def _loaded_in(self, seconds: float) -> None:
        if self._on_load is not None:
            self._on_load(seconds)

    def _evict(self, keep: set[_Key]) -> bool:
        """Drops the least recently used adapter not in ``keep``; False when all are."""
        key = next((key for key in self._loaded if key not in keep), None)
        if key is None:
            return False
        name = self._loaded.pop(key)
        self._pipeline.delete_adapters([name])
        logger.info("evicted LoRA %s (adapter %s)", key[0], name)
        if self._on_evict is not None:
            self._on_evict()
        return True

    def _forget_partial(self, name: str) -> None:
        try:
            if name in self._present():
                self._pipeline.delete_adapters([name])
        except Exception:  # the set is in an unknown state: start over
            logger.exception("cleaning up a failed LoRA load; unloading all adapters")
            self._pipeline.unload_lora_weights()
            self._loaded.clear()

    def _hotswap(self, lora: LoraInfo, scale: float) -> None:
        key = (lora.lora_id, lora.fingerprint)
        if key == self._slot_content:
            if self._silenced or scale != self._slot_scale:  # its weights are still there
                self._scale_slot(scale)
            self._pipeline.enable_lora()  # (a no-op unless foreign code disabled it)
            return
        source = self.check_fits(lora)  # the slot keeps what it holds when this refuses
        self._slot_content = None  # unknown if the swap fails half-way
        started = time.perf_counter()
        try:
            # sets the slot's scalings to this LoRA's, the silenced ones included
            self._pipeline.load_lora_weights(source, adapter_name=self._slot, hotswap=True)
            self._loaded_in(time.perf_counter() - started)
        except Exception as exc:
            self._silence_slot()
            if _is_out_of_memory(exc):
                raise
            raise LoraLoadError(
                f"LoRA {lora.lora_id!r} could not be hot-swapped in (a compiled model "
                f"takes LoRAs of rank <= its slot's on {', '.join(_HOTSWAP_TARGETS)}): "
                f"{exc}",
                lora.lora_id,
            ) from exc
        self._scalings = [value.clone() for value in
                          _slot_scalings(self._pipeline, str(self._slot))]
        self._silenced, self._slot_scale = False, 1.0
        if scale != 1.0:
            self._scale_slot(scale)
        self._slot_content = key
        self._loaded = OrderedDict([(key, str(self._slot))])
        self._pipeline.enable_lora()

    def _scale_slot(self, scale: float) -> None:
        """The slot's LoRA at ``scale``: its own scalings times ``scale``, written into the
        scaling tensors in place (values, not a graph change: nothing recompiles)."""
        _copy_into(_slot_scalings(self._pipeline, str(self._slot)),
                   [value * scale for value in self._scalings])
        self._silenced, self._slot_scale = False, scale

    def _silence_slot(self) -> None:
        """The base model on a compiled transformer: the slot's scalings at zero (its
        weights stay, for a switch back), the slot enabled as always."""
        _zero(_slot_scalings(self._pipeline, str(self._slot)))
        self._silenced = True
        self._pipeline.enable_lora()


def _one_lora(adapters: Sequence[tuple[LoraInfo, float]]) -> tuple[LoraInfo, float]:
    """The one LoRA a hotswap slot can hold, at its scale: stacking would recompile."""
    lora, scale = adapters[0]
    if len(adapters) > 1:
        raise LoraLoadError(
            f"a compiled model (COMPILE_TRANSFORMER=true) runs one LoRA at a time; asked "
            f"for {len(adapters)}", lora.lora_id)
    return lora, scale


def _is_out_of_memory(exc: BaseException) -> bool:
    import torch

    return isinstance(exc, torch.OutOfMemoryError)


def _linear_layers(pipeline: Any) -> dict[str, tuple[int, int]]:
    """(inputs, outputs) of each linear layer of the pipeline's LoRA-loadable components,
    by the name a LoRA file gives it (``transformer.…``, ``text_encoder.…``): peft's
    wrapper (``base_layer``) and compilation's (``_orig_mod``) left out, LoRA matrices
    themselves not counted."""
    import torch

    found: dict[str, tuple[int, int]] = {}
    for component in ("transformer", "text_encoder"):
        model = getattr(pipeline, component, None)
        if model is None:
            continue
        for name, module in model.named_modules():
            parts = [part for part in name.split(".") if part not in ("base_layer", "_orig_mod")]
            if isinstance(module, torch.nn.Linear) and not {"lora_A", "lora_B"} & set(parts):
                found[".".join([component, *parts])] = (module.in_features, module.out_features)
    return found


def _misfit(layer: LoraLayer, layers: dict[str, tuple[int, int]]) -> str | None:
    """Why ``layer`` does not fit the model's ``layers``; None when it does."""
    sizes = layers.get(layer.module)
    if sizes is None:
        return f"it adapts {layer.module}, which is no linear layer of this model"
    inputs, outputs = sizes
    if layer.in_features != inputs:
        return (f"its lora_A for {layer.module} takes {layer.in_features} inputs, the layer "
                f"{inputs}")
    if layer.out_features != outputs:
        return (f"its lora_B for {layer.module} gives {layer.out_features} outputs, the "
                f"layer {outputs}")
    return None


def _verify_file(lora: LoraInfo) -> None:
    """The file must still be the one registered: results are cached by its hash."""
    try:
        digest = file_sha256(lora.path)
    except OSError as exc:
        raise LoraLoadError(f"LoRA {lora.lora_id!r} is unreadable: {exc}", lora.lora_id) from exc
    if digest != lora.fingerprint:
        raise LoraLoadError(
            f"LoRA {lora.lora_id!r} changed on disk since it was registered "
            f"(sha256 {digest[:12]}…, registered {lora.fingerprint[:12]}…)",
            lora.lora_id,
        )


def prepare_hotswap_slot(pipeline: Any, *, rank: int = 16, slot: str = HOTSWAP_SLOT) -> None:
    """Before compiling the transformer: enable hotswap for ranks up to ``rank`` and load
    an all-zero LoRA of that rank on the attention projections into ``slot``, enabled.

    peft must wrap the layers before compilation (``prepare_model_for_compiled_hotswap``
    refuses a compiled model), so the slot exists from the start; its scalings become
    tensors (swapping or silencing one changes a value, never a graph). The zero adapter
    adds exactly nothing, so the outputs are the base model's. The slot stays enabled for
    good: :class:`AdapterSet` silences it for the base model instead of disabling it.
    """
    import torch

    state: dict[str, torch.Tensor] = {}
    for name, module in pipeline.transformer.named_modules():
        if isinstance(module, torch.nn.Linear) and _is_target(name):
            dtype = module.weight.dtype
            state[f"transformer.{name}.lora_A.weight"] = torch.zeros(
                rank, module.in_features, dtype=dtype
            )
            state[f"transformer.{name}.lora_B.weight"] = torch.zeros(
                module.out_features, rank, dtype=dtype
            )
    pipeline.enable_lora_hotswap(target_rank=rank)
    pipeline.load_lora_weights(state, adapter_name=slot)
    pipeline.enable_lora()  # the very state every later call runs in
    scalings = _slot_scalings(pipeline, slot)
    if not scalings:
        raise InternalError(f"no LoRA layer holds the hotswap slot {slot!r} after loading it")
    _zero(scalings)


def _slot_scalings(pipeline: Any, slot: str) -> list[Any]:
    """The slot's scaling tensor of every LoRA layer of the transformer (peft turns them
    into tensors for a compiled hotswap; a float here would be a guard, so it is an
    error)."""
    import torch
    from peft.tuners.lora import LoraLayer

    found: list[torch.Tensor] = []
    for name, module in pipeline.transformer.named_modules():
        if isinstance(module, LoraLayer) and slot in module.scaling:
            value = module.scaling[slot]
            if not isinstance(value, torch.Tensor):
                raise InternalError(f"the hotswap slot's scaling in {name} is a "
                                    f"{type(value).__name__}, not a tensor: it would recompile")
            found.append(value)
    return found


def _zero(tensors: Sequence[Any]) -> None:
    import torch

    with torch.no_grad():
        for tensor in tensors:
            tensor.zero_()


def _copy_into(tensors: Sequence[Any], values: Sequence[Any]) -> None:
    import torch

    with torch.no_grad():
        for tensor, value in zip(tensors, values, strict=True):
            tensor.copy_(value)


def _is_target(module_name: str) -> bool:
    return any(
        module_name == target or module_name.endswith("." + target)
        for target in _HOTSWAP_TARGETS
    )
