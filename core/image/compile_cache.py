"""torch.compile's results kept for the next start (COMPILE_CACHE, compiled models).

A compiled model pays its compilation in the warm-up, before the instance is ready. Most
of that is Inductor generating and compiling kernels and AOTAutograd tracing, and torch
can hand those back as one blob (``torch.compiler.save_cache_artifacts``, its "mega cache")
that another process loads before compiling (``load_cache_artifacts``): its compilation
then finds every kernel cached and only traces.

- ``local`` (default): the blob in ``OUTPUT_DIR/.compile-cache``, for the next start of an
  instance whose folder outlives its process (a restart, a volume).
- ``shared``: also in the shared store (STORAGE_URL, ``compile-cache/``), so that a new
  instance of the fleet starts with the kernels the first one compiled.
- ``off``.

The blob is named by what its kernels depend on (:func:`cache_name`: torch and its CUDA,
the device, the transformer's architecture and dtype, its speed settings, fused
projections, the attention kernel), not by the weights' values; torch also checks each
kernel's own key on use, so a stale blob only misses. :meth:`CompileCache.load` runs
before the warm-up, :meth:`CompileCache.save` after it, when the warm-up compiled a kernel
the blob did not have or there was none. Neither can stop an instance: a store that
fails, a blob torch refuses or a full disk is a warning, and the warm-up compiles as it
would have. A warm-up that fails after a blob was loaded removes it
(:meth:`CompileCache.forget`): the next start compiles afresh instead of failing again.

Bounded: a torch upgrade or a settings change names a new blob and leaves the old one.
Each successful save (in each place: the folder, the store) removes the blobs of other
names that are older than the one just saved, beyond the newest :data:`KEEP` (the one
just saved counted): a rolling upgrade's old and new instances keep theirs. A blob being
read is safe to remove: an open file stays readable, an S3 read in progress completes,
and a reader that finds it gone compiles as it would with none (a quiet miss). A removal
that fails is a warning.

Trust: the blob holds pickled data that torch loads (code runs as it does), so it is read
only from where the engine itself writes it. With ``shared``, whoever can write the
store's ``compile-cache/`` can run code on every instance: give that prefix the trust of
the model weights, or keep ``local``. No HTTP route writes either place.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from core.files import atomic_path, atomic_write
from core.storage.objects import ObjectStore, StorageError

__all__ = ["KEEP", "CompileCache", "cache_name", "kernel_cache_counts"]

logger = logging.getLogger(__name__)

_MAX_BYTES = 1 << 30  # a blob larger than this is not loaded (FLUX.1's is tens of MB)
_STORE_PREFIX = "compile-cache/"
_PARTIAL = ".*.tmp"  # a blob being written (core.files names it): removed at the next load
_PARTIAL_BEFORE = ".partial-*"  # the same, as earlier versions named it
_BLOB = re.compile(r"[0-9a-f]{32}\.bin")  # what cache_name names: nothing else is pruned

KEEP = 3
"""Blobs kept in each place after a save: the newest, the one just saved among them."""


def cache_name(*, device: str, model: str, options: dict[str, Any]) -> str:
    """The blob's name: a digest of torch's build, the device (its name and compute
    capability on CUDA), ``model`` (the transformer's architecture) and the preparation
    ``options`` (dtype, speed settings, fused projections, attention kernel…)."""
    parts: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                             "device": device, "model": model, "options": options}
    if device.startswith("cuda"):
        index = torch.device(device).index or 0
        properties = torch.cuda.get_device_properties(index)
        parts["gpu"] = [properties.name, properties.major, properties.minor]
    digest = hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()
    return f"{digest[:32]}.bin"


def kernel_cache_counts() -> tuple[int, int]:
    """Inductor's kernel-cache (hits, misses) in this process so far."""
    from torch._dynamo.utils import counters

    inductor = counters["inductor"]
    return int(inductor["fxgraph_cache_hit"]), int(inductor["fxgraph_cache_miss"])


@dataclass(frozen=True)
class Loaded:
    """Where :meth:`CompileCache.load` found the blob (``None``: nowhere), its size."""

    source: str | None
    size: int = 0


class CompileCache:
    """The blob ``name`` in ``folder`` and, when given, in ``store``."""

    def __init__(self, name: str, folder: Path, store: ObjectStore | None = None) -> None:
        self._name = name
        self._folder = folder
        self._store = store

    @property
    def name(self) -> str:
        return self._name

    def load(self) -> Loaded:
        """Hands torch the blob, from the folder or else the store (streamed into the
        folder first, so memory holds one copy); before the model's first compiled call.
        Blocking: call it in a thread."""
        local = self._folder / self._name
        source = str(local)
        _remove_partials(self._folder)
        if not local.exists() and self._store is not None:
            source = f"{self._store.where}/{_STORE_PREFIX}{self._name}"
            self._fetch(local)
        data = _read(local)
        if data is None:
            return Loaded(None)
        try:
            info = torch.compiler.load_cache_artifacts(data)  # None: refused (torch logs why)
            why = "torch refused it" if info is None else ""
        except Exception as exc:  # noqa: BLE001 - a blob torch refuses: compile as usual
            why = f"{type(exc).__name__}: {exc}"
        if why:
            logger.warning("compile cache: %s was not loaded (%s); compiling from scratch",
                           source, why)
            return Loaded(None)
        return Loaded(source, len(data))

    def save(self) -> int:
        """Writes what this process compiled (torch's artifacts) to the folder and the
        store; returns the blob's size (0: nothing to write). Blocking: call it in a
        thread."""
        try:
            artifacts = torch.compiler.save_cache_artifacts()
        except Exception as exc:  # noqa: BLE001 - a cache must not stop an instance
            logger.warning("compile cache: torch could not save its artifacts (%s: %s)",
                           type(exc).__name__, exc)
            return 0
        if artifacts is None:
            return 0
        data = artifacts[0]
        if _write(self._folder / self._name, data):
            self._prune_folder()
        if self._store is not None:
            try:
                self._store.put_bytes(_STORE_PREFIX + self._name, data,
                                      content_type="application/octet-stream")
            except StorageError as exc:
                logger.warning("compile cache: not written to the shared store (%s)", exc)
            else:
                self._prune_store()
        return len(data)

    def forget(self) -> None:
        """Removes the blob here and in the store (it may be why a warm-up failed)."""
        logger.warning("compile cache: the warm-up failed with %s loaded; removed, the next "
                       "start compiles afresh", self._name)
        (self._folder / self._name).unlink(missing_ok=True)
        if self._store is not None:
            try:
                self._store.delete(_STORE_PREFIX + self._name)
            except StorageError as exc:
                logger.warning("compile cache: not removed from the shared store (%s)", exc)

    def _prune_folder(self) -> None:
        """Removes the folder's stale blobs (:func:`_stale`); failures are warnings."""
        written: dict[str, float] = {}
        try:
            for path in self._folder.iterdir():
                with contextlib.suppress(FileNotFoundError):  # removed meanwhile
                    written[path.name] = path.stat().st_mtime
        except OSError as exc:
            logger.warning("compile cache: old blobs in %s not removed (%s)", self._folder, exc)
            return
        for name in _stale(written, self._name):
            try:
                (self._folder / name).unlink(missing_ok=True)
            except OSError as exc:
                logger.warning("compile cache: old blob %s not removed (%s)",
                               self._folder / name, exc)
            else:
                logger.info("compile cache: removed %s, older than %s and beyond the newest "
                            "%d", self._folder / name, self._name, KEEP)

    def _prune_store(self) -> None:
        """Removes the store's stale blobs (:func:`_stale`); failures are warnings."""
        assert self._store is not None
        try:
            listed = self._store.last_modified(_STORE_PREFIX)
            written = {key.removeprefix(_STORE_PREFIX): when.timestamp()
                       for key, when in listed.items()}
            for name in _stale(written, self._name):
                self._store.delete(_STORE_PREFIX + name)
                logger.info("compile cache: removed %s/%s%s, older than %s and beyond the "
                            "newest %d", self._store.where, _STORE_PREFIX, name, self._name,
                            KEEP)
        except StorageError as exc:
            logger.warning("compile cache: old blobs not removed from the shared store (%s)",
                           exc)

    def _fetch(self, local: Path) -> None:
        """The store's blob into ``local`` (through a temporary name), if there is one."""
        assert self._store is not None
        try:
            local.parent.mkdir(parents=True, exist_ok=True)
            with atomic_path(local) as partial:  # none written: the store has none
                self._store.download(_STORE_PREFIX + self._name, partial)
        except OSError as exc:  # StorageError included
            logger.warning("compile cache: not read from the shared store (%s); compiling "
                           "here", exc)


def _read(path: Path) -> bytes | None:
    try:
        if path.stat().st_size > _MAX_BYTES:
            logger.warning("compile cache: %s is over %d bytes; not loaded", path, _MAX_BYTES)
            return None
        return path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        logger.warning("compile cache: %s is unreadable (%s)", path, exc)
        return None


def _stale(written: Mapping[str, float], saved: str) -> list[str]:
    """Of the blobs ``written`` (name: when), those to remove after ``saved`` was: other
    names, older than it and not among the newest :data:`KEEP`. None when ``saved`` is not
    there (a listing that missed it dates nothing)."""
    if saved not in written:
        return []
    blobs = {name: when for name, when in written.items() if _BLOB.fullmatch(name)}
    blobs[saved] = written[saved]
    newest = sorted(blobs, key=lambda name: (blobs[name], name), reverse=True)[:KEEP]
    return sorted(name for name, when in blobs.items()
                  if name not in newest and when < written[saved])


def _write(path: Path, data: bytes) -> bool:
    """Atomically (:func:`core.files.atomic_write`): a reader never sees half a blob; a
    failed write leaves nothing behind (and is ``False``)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    except OSError as exc:
        logger.warning("compile cache: %s not written (%s)", path, exc)
        return False
    return True


def _remove_partials(folder: Path) -> None:
    """What a process killed while writing left: temporary files over an hour old (a
    younger one may be another instance's write in progress)."""
    now = time.time()
    for partial in (*folder.glob(_PARTIAL), *folder.glob(_PARTIAL_BEFORE)):
        with contextlib.suppress(OSError):
            if now - partial.stat().st_mtime > 3600:
                partial.unlink()
