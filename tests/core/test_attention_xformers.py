"""ATTENTION_BACKEND=xformers is refused at start-up, in one line naming the setting, unless
xformers' memory-efficient attention runs: absent, failing to import, or importable with
no kernel for this torch/CUDA (the `gpu` extra built for another torch). xformers is a
third-party package: a stand-in module plays each case."""

from __future__ import annotations

import sys
import types
from collections.abc import Callable

import pytest
import torch

from core.image.attention import AttentionBackendError, resolve_attention_backend


def install_xformers(monkeypatch: pytest.MonkeyPatch,
                     attention: Callable[..., torch.Tensor]) -> list[torch.Tensor]:
    """A stand-in ``xformers`` whose ``ops.memory_efficient_attention`` is ``attention``;
    returns the queries it was called with."""
    calls: list[torch.Tensor] = []

    def memory_efficient_attention(query: torch.Tensor, key: torch.Tensor,
                                   value: torch.Tensor) -> torch.Tensor:
        calls.append(query)
        return attention(query, key, value)

    package = types.ModuleType("xformers")
    ops = types.ModuleType("xformers.ops")
    ops.memory_efficient_attention = memory_efficient_attention  # type: ignore[attr-defined]
    package.ops = ops  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "xformers", package)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)
    return calls


def refusal(device: str = "cpu", dtype: torch.dtype = torch.float32) -> str:
    with pytest.raises(AttentionBackendError) as caught:
        resolve_attention_backend("xformers", device=device, dtype=dtype)
    message = str(caught.value)
    assert "\n" not in message and message.startswith("ATTENTION_BACKEND='xformers'"), message
    return message


def test_absent_xformers_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "xformers", None)  # import raises ImportError
    monkeypatch.setitem(sys.modules, "xformers.ops", None)
    assert "cannot be imported" in refusal()


def test_xformers_without_a_usable_kernel_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_operator(*_: torch.Tensor) -> torch.Tensor:
        # what xformers' fmha dispatch raises when its extension did not load
        raise NotImplementedError(
            "No operator found for `memory_efficient_attention_forward` with inputs:\n"
            "     query : shape=(1, 64, 2, 128) (torch.bfloat16)\n"
            "`cutlassF-pt` is not supported because:\n    xFormers wasn't build with CUDA")

    calls = install_xformers(monkeypatch, no_operator)
    message = refusal()
    assert "NotImplementedError: No operator found for `memory_efficient_attention_forward`" \
        in message
    assert "built for this torch and CUDA" in message
    assert len(calls) == 1 and calls[0].shape[-1] == 128  # FLUX's head size, on the device


def test_xformers_that_runs_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    def attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.scaled_dot_product_attention(
            query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)).transpose(1, 2)

    calls = install_xformers(monkeypatch, attention)
    assert resolve_attention_backend("xformers", device="cpu", dtype=torch.float32) == "xformers"
    assert calls[0].dtype == torch.float32 and calls[0].device.type == "cpu"
