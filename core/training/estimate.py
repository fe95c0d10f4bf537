"""How long a training will take, from measured step times.

Each chunk reports its seconds per step; the newest measurement per (resolution, batch
size) is kept in ``TEMP_DIR/training/step_times.json`` so estimates survive restarts. For
a shape never measured the nearest measured one is scaled by the number of latent pixels
× batch (attention makes it a lower bound at higher resolutions); with nothing measured at
all, a prior: 0.05 s/step for the tiny development model on a CPU, 1.5 s/step for FLUX.1 at
512² on one GPU.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

from core.files import atomic_write

__all__ = ["StepTimes"]

logger = logging.getLogger(__name__)

_PRIOR = {True: (0.05, 64), False: (1.5, 512)}  # development model? → (s/step, at size)
_OVERHEAD_SECONDS = 30.0  # encoding, checkpoints, registration, validation image


class StepTimes:
    """Measured seconds per training step, persisted in ``file``."""

    def __init__(self, file: Path, *, development_model: bool) -> None:
        self._file = file
        self._development = development_model
        self._times: dict[str, float] = self._read()

    def record(self, resolution: int, batch_size: int, seconds_per_step: float) -> None:
        """Remember a measurement (best effort: a write error is logged)."""
        self._times[f"{resolution}x{batch_size}"] = seconds_per_step
        try:
            self._file.parent.mkdir(parents=True, exist_ok=True)
            atomic_write(self._file, json.dumps(self._times, indent=2).encode("utf-8"))
        except OSError as exc:
            logger.warning("step times not saved to %s: %s", self._file, exc)

    def seconds_per_step(self, resolution: int, batch_size: int) -> float:
        """The measured or scaled time of one step of this shape."""
        exact = self._times.get(f"{resolution}x{batch_size}")
        if exact is not None:
            return exact
        measured = [(key, value) for key, value in self._times.items()]
        if measured:
            key, value = min(measured, key=lambda item: abs(_size(item[0])[0] - resolution))
            size, batch = _size(key)
        else:
            value, size = _PRIOR[self._development]
            batch = 1
        return value * (resolution / size) ** 2 * (batch_size / batch)

    def estimate_minutes(self, steps: int, resolution: int, batch_size: int) -> int:
        """Whole minutes (at least 1) for ``steps`` steps plus fixed overhead."""
        seconds = steps * self.seconds_per_step(resolution, batch_size) + _OVERHEAD_SECONDS
        return max(1, math.ceil(seconds / 60))

    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self._file.read_text("utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): float(v) for k, v in data.items()
                if isinstance(v, (int, float)) and _valid_key(str(k))}


def _size(key: str) -> tuple[int, int]:
    resolution, _, batch = key.partition("x")
    return int(resolution), int(batch)


def _valid_key(key: str) -> bool:
    resolution, sep, batch = key.partition("x")
    return bool(sep) and resolution.isdigit() and batch.isdigit()
