"""GPU memory as torch's CUDA allocator sees it, read when ``/metrics`` is scraped."""

from __future__ import annotations

import sys

from core.metrics import GpuMemory

__all__ = ["cuda_memory"]


def cuda_memory(device: str) -> list[GpuMemory]:
    """The memory of ``device`` (``cuda`` or ``cuda:N``); empty for a CPU device, a build
    without CUDA, or before CUDA was initialised (a scrape never initialises it: that
    would take memory on a device the engine may not use)."""
    torch = sys.modules.get("torch")
    if torch is None or not device.startswith("cuda") or not torch.cuda.is_available() \
            or not torch.cuda.is_initialized():
        return []
    index = torch.device(device).index
    if index is None:
        index = torch.cuda.current_device()
    name = f"cuda:{index}"
    return [GpuMemory(
        device=name,
        allocated=int(torch.cuda.memory_allocated(index)),
        reserved=int(torch.cuda.memory_reserved(index)),
        total=int(torch.cuda.get_device_properties(index).total_memory),
    )]
