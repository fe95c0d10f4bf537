"""Fused QKV projections that keep the LoRA hotswap slot (FUSE_QKV, compiled models).

Each FLUX attention projects its input three times (query, key, value: ``to_q``, ``to_k``,
``to_v``) and, in the double blocks, the text stream three more times (``add_q_proj``…).
Fused, each triple is one matrix multiplication over the three weights stacked (what
diffusers' ``fuse_qkv_projections`` does): one kernel instead of three, on a wider matrix.

diffusers' own fusion drops the LoRA layers peft puts on ``to_q``/``to_k``/``to_v`` (its
fused layer is a plain ``Linear``), so with it a LoRA silently does nothing. Here the fused
layer (:class:`FusedProjection`) computes the stacked base weights once and adds each
projection's LoRA output to its third, exactly as peft's own layer adds it
(``base + lora_B(lora_A(x)) * scaling``, the scaling a tensor the slot writes into): a
hot-swapped LoRA, its ``lora_scale`` and the silenced slot of the base model all act as
before, with no new graph.

Order (:func:`core.image.loader.prepare_model`): :func:`fuse_projections` stacks the weights
(the three projections keep views of their thirds, so nothing is held twice), fp8
quantizes the fused layers and leaves the views alone (:func:`quantizable`), the hotswap
slot wraps the projections, then :func:`release_projection_weights` replaces their base
weights with placeholders of the same shape, device and dtype that hold one zero (peft
still places a training's adapter by them): only their LoRA layers are used, the fused
layer computes the base. Compiled models only: an eager model's LoRA set loads and unloads
adapters, which rebuilds the projections' layers.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["FusedProjection", "fuse_projections", "quantizable", "release_projection_weights"]

_TRIPLES = (("to_q", "to_k", "to_v"), ("add_q_proj", "add_k_proj", "add_v_proj"))
_FUSED_NAMES = ("to_qkv", "to_added_qkv")


class FusedProjection(torch.nn.Module):
    """Three projections of one attention as one: ``base``, a ``Linear`` over the stacked
    weights (what fp8 quantizes), plus the LoRA output of each projection
    (``owner.<name>``, looked up at every call: peft replaces a projection by its LoRA layer
    after fusion)."""

    def __init__(self, owner: torch.nn.Module, names: tuple[str, str, str],
                 weight: torch.Tensor, bias: torch.Tensor | None) -> None:
        super().__init__()
        self.base = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                                    device="meta")
        self.base.weight = torch.nn.Parameter(weight, requires_grad=False)
        if bias is not None:
            self.base.bias = torch.nn.Parameter(bias, requires_grad=False)
        self.names = names
        self.sizes = [getattr(owner, name).out_features for name in names]
        # a plain list, not a submodule: the attention owns the projections
        self._owner = [owner]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        fused: torch.Tensor = self.base(hidden)
        owner = self._owner[0]
        deltas = [_lora_output(getattr(owner, name), hidden) for name in self.names]
        if all(delta is None for delta in deltas):
            return fused
        thirds = list(torch.split(fused, self.sizes, dim=-1))
        for index, delta in enumerate(deltas):
            if delta is not None:
                thirds[index] = (thirds[index] + delta).to(fused.dtype)
        return torch.cat(thirds, dim=-1)


def _lora_output(projection: Any, hidden: torch.Tensor) -> Any:
    """What peft's ``lora.Linear`` adds to its base layer's output for ``hidden`` (None:
    nothing, the projection has no active LoRA)."""
    from peft.tuners.lora import LoraLayer

    if not isinstance(projection, LoraLayer) or projection.disable_adapters:
        return None
    if projection.merged:
        raise RuntimeError("a LoRA merged into a fused projection's base weights")
    total: Any = None
    for adapter in projection.active_adapters:
        if adapter not in projection.lora_A:
            continue
        if adapter in projection.lora_variant:  # DoRA and the like: not a plain sum
            raise RuntimeError(f"LoRA variant of adapter {adapter!r} on a fused projection")
        lora_a: Any = projection.lora_A[adapter]
        lora_b: Any = projection.lora_B[adapter]
        x = hidden.to(lora_a.weight.dtype)
        delta = lora_b(lora_a(projection.lora_dropout[adapter](x))) * projection.scaling[adapter]
        total = delta if total is None else total + delta
    return total


def fuse_projections(transformer: torch.nn.Module) -> int:
    """Fuse every attention's query/key/value triples of ``transformer`` (plain
    ``Linear`` layers, before any LoRA is loaded); returns how many triples were fused.
    diffusers reads either every fused layer of an attention or none, so an attention with
    a triple that cannot be fused (not three ``Linear`` layers alike) is left whole."""
    fused = 0
    for module in list(transformer.modules()):
        attention: Any = module
        if not hasattr(attention, "fused_projections"):
            continue  # not a diffusers attention
        triples = [(names, fused_name, [getattr(attention, name, None) for name in names])
                   for names, fused_name in zip(_TRIPLES, _FUSED_NAMES, strict=True)]
        present = [triple for triple in triples if any(p is not None for p in triple[2])]
        if not present or present[0][1] != "to_qkv" or not all(
                _fusable(parts) for _, _, parts in present):
            continue
        for names, fused_name, parts in present:
            setattr(attention, fused_name, _stack(attention, names, parts))
            fused += 1
        attention.fused_projections = True  # diffusers' processors read the fused layers
    return fused


def _fusable(parts: list[Any]) -> bool:
    return (all(isinstance(part, torch.nn.Linear) for part in parts)
            and len({part.bias is None for part in parts}) == 1)


def _stack(owner: torch.nn.Module, names: tuple[str, str, str],
           parts: list[Any]) -> FusedProjection:
    with torch.no_grad():
        weight = torch.cat([part.weight.data for part in parts])
        biases = [part.bias.data for part in parts if part.bias is not None]
        bias = torch.cat(biases) if len(biases) == len(parts) else None
        start = 0
        for part in parts:  # each projection keeps a view of its rows: no second copy
            rows = part.out_features
            part.weight = torch.nn.Parameter(weight[start:start + rows], requires_grad=False)
            if bias is not None:
                part.bias = torch.nn.Parameter(bias[start:start + rows], requires_grad=False)
            start += rows
    return FusedProjection(owner, names, weight, bias)


def quantizable(transformer: torch.nn.Module) -> Any:
    """torchao's ``filter_fn`` for fp8: every ``Linear`` except LoRA matrices and the
    projections whose weights live in a fused layer (their views would be quantized into a
    second copy, which :func:`release_projection_weights` drops anyway)."""
    skipped = {id(_base(getattr(module, name))) for module in transformer.modules()
               if isinstance(getattr(module, "to_qkv", None), FusedProjection)
               for triple in _TRIPLES for name in triple if hasattr(module, name)}

    def accept(module: torch.nn.Module, fqn: str) -> bool:
        return (isinstance(module, torch.nn.Linear) and id(module) not in skipped
                and ".lora_" not in fqn)  # adapters stay in bf16 beside the fp8 layers

    return accept


def release_projection_weights(transformer: torch.nn.Module) -> int:
    """Replace the base weights of the fused projections (views, or fp8 copies) with
    placeholders of their shape, device and dtype holding no memory, after the LoRA slot
    is loaded; returns how many."""
    released = 0
    for module in transformer.modules():
        for fused_name, names in zip(_FUSED_NAMES, _TRIPLES, strict=True):
            if not isinstance(getattr(module, fused_name, None), FusedProjection):
                continue
            for name in names:
                base = _base(getattr(module, name))
                base.weight = _placeholder(base.weight)
                if base.bias is not None:
                    base.bias = _placeholder(base.bias)
                released += 1
    return released


def _placeholder(tensor: torch.Tensor) -> torch.nn.Parameter:
    """One zero of ``tensor``'s device and dtype seen in its shape: what peft reads of a
    base layer when it adds an adapter (a training's), holding no memory."""
    zero = torch.zeros((), device=tensor.device, dtype=tensor.dtype)
    return torch.nn.Parameter(zero.expand(tensor.shape), requires_grad=False)


def _base(projection: Any) -> Any:
    """The ``Linear`` holding a projection's base weights (under its LoRA layer, if any)."""
    return projection.get_base_layer() if hasattr(projection, "get_base_layer") else projection
