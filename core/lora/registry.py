"""The LoRA registry: ``character_lora_id`` → a safetensors file and its metadata.

``LORA_OUTPUT_DIR`` holds ``{lora_id}.safetensors`` and ``{lora_id}.json`` (trigger word,
rank, alpha, targets, base model, sha256, created_at, optional training info). A weights
file dropped in without its JSON is still served, with what its header tells.

Ids are safe names (``^[A-Za-z0-9_.-]{1,64}$``, not starting with a dot), so an id can never
name a path outside the folder. Unknown or unsafe ids raise :class:`UnknownLoraError`
(``UNKNOWN_LORA``) before any GPU work.

A file is registered only if its tensors are plain LoRA matrices as diffusers loads them
(:func:`lora_layers_of`: pairs of ``lora_A``/``lora_B`` of one rank, after diffusers'
conversion of other trainers' layouts); nothing else would load without changing the
model (a Control LoRA widens the model's layers). Whether they fit *this* model's layers
is checked when a LoRA is loaded (:mod:`core.lora.adapters`): the registry knows no model.

With a shared store (``STORAGE_URL``, :class:`~core.lora.shared.SharedLoras`) the store is
the registry and the folder its local cache: a registration is decided by the store (a
conditional create), and a LoRA missing here is looked up there before ``UNKNOWN_LORA``,
so one registered by any instance is usable on every instance at once. Those lookups are
requests to the store: :meth:`LoraRegistry.fetch` them from a worker thread first.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from core.files import atomic_path, atomic_write
from core.lora._header import LoraShape, read_header, read_lora_shape
from core.lora.hashing import file_sha256
from core.lora.ids import SAFE_LORA_ID, is_safe_lora_id
from core.lora.shared import SharedLoras
from schemas.errors import InternalError, UnknownLoraError

__all__ = ["LoraInfo", "LoraLayer", "LoraRegistry", "file_sha256", "is_safe_lora_id",
           "lora_layers_of", "read_lora_layers"]

logger = logging.getLogger(__name__)

# a tensor in diffusers' own layout: the pipeline component (FluxPipeline loads LoRA
# layers into these two), the module, and which part of its LoRA layer it is
_LAYOUT = re.compile(r"^(?P<module>(?:transformer|text_encoder)\..+?)\."
                     r"(?P<part>lora_A\.weight|lora_B\.weight|lora_B\.bias|"
                     r"lora_magnitude_vector|alpha)$")


@dataclass(frozen=True)
class LoraInfo:
    """One registered LoRA. ``sha256`` is the weights file's hash; ``fingerprint`` (the
    same) identifies its content for result caches."""

    lora_id: str
    path: Path
    trigger_word: str | None
    rank: int
    alpha: float
    targets: tuple[str, ...]
    base_model: str | None
    sha256: str
    created_at: str
    training: dict[str, Any] | None = field(default=None, compare=False, hash=False)

    @property
    def fingerprint(self) -> str:
        return self.sha256


@dataclass(frozen=True)
class LoraLayer:
    """One layer a LoRA adapts: ``module`` as its file names it, component first
    (``transformer.single_transformer_blocks.0.attn.to_k``), its rank, and the sizes its
    matrices take in (``lora_A``'s columns) and give out (``lora_B``'s rows)."""

    module: str
    rank: int
    in_features: int
    out_features: int


def lora_layers_of(path: Path) -> list[LoraLayer]:
    """The layers the LoRA file at ``path`` adapts, as diffusers will load it: the first
    half of :func:`read_lora_layers` (which see)."""
    return read_lora_layers(path)[0]


def read_lora_layers(path: Path) -> tuple[list[LoraLayer], dict[str, Any] | None]:
    """The layers the LoRA file at ``path`` adapts, as diffusers will load it, and what to
    hand to ``load_lora_weights`` instead of the file so that it is not read and converted
    a second time: its tensors already converted, or None to load the file itself.

    A file in diffusers' own layout is read from its header alone (None: the load reads
    it); another layout (kohya's, XLabs'…) is converted as diffusers'
    ``FluxLoraLoaderMixin.lora_state_dict`` converts it when loading (reading the
    tensors), and the converted tensors are given back, unless the conversion left network
    alphas, alpha tensors or adapter metadata beside them (which diffusers would read
    otherwise from a dict than from the file: None then). Raises
    ``ValueError`` when a tensor is no part of a plain LoRA layer even so (a Control
    LoRA's norm layers, an unprefixed or unknown name), when a module's matrices do not
    pair (one without the other, not 2-D, ranks that differ), and for a file that is no
    safetensors file; ``OSError`` when it cannot be read.
    """
    _, shapes = read_header(path)
    if all(_LAYOUT.match(key) for key in shapes):
        return _paired(shapes), None
    from diffusers.loaders.lora_pipeline import FluxLoraLoaderMixin

    try:
        converted, alphas, metadata = FluxLoraLoaderMixin.lora_state_dict(
            str(path), return_alphas=True, return_lora_metadata=True)
    except (KeyError, IndexError, TypeError, RuntimeError) as exc:  # its converters'
        raise ValueError(f"diffusers cannot convert its layout: {type(exc).__name__}: "
                         f"{exc}") from exc
    shapes = {key: tuple(tensor.shape) for key, tensor in converted.items()}
    foreign = sorted(key for key in shapes if not _LAYOUT.match(key))
    if foreign:
        raise ValueError(
            f"{len(foreign)} tensor(s) are no LoRA matrices diffusers loads as such "
            f"(first: {foreign[0]}): a Control LoRA or another kind of adapter, "
            "which would change the model's own layers")
    # loading this dict is loading the file only when the file said nothing more: in a
    # dict diffusers finds no metadata, converts no key further, and would take an alpha
    # tensor left in it for a network alpha
    same = not alphas and metadata is None and not any("alpha" in key for key in converted)
    return _paired(shapes), (dict(converted) if same else None)


def _paired(shapes: Mapping[str, Sequence[int]]) -> list[LoraLayer]:
    """The layers of tensors in diffusers' layout: each module's ``lora_A`` (rank × in)
    and ``lora_B`` (out × rank), with a bias or magnitude (DoRA) of ``out`` if any."""
    parts: dict[str, dict[str, Sequence[int]]] = {}
    for key, shape in shapes.items():
        match = _LAYOUT.match(key)
        assert match is not None
        parts.setdefault(match["module"], {})[match["part"]] = shape
    layers: list[LoraLayer] = []
    for module, found in sorted(parts.items()):
        down, up = found.get("lora_A.weight"), found.get("lora_B.weight")
        if down is None or up is None:
            if set(found) <= {"alpha"}:
                continue  # an alpha alone adapts nothing
            raise ValueError(f"{module} has {'lora_B' if down is None else 'lora_A'} "
                             f"without {'lora_A' if down is None else 'lora_B'}")
        if len(down) != 2 or len(up) != 2 or down[0] != up[1] or down[0] < 1:
            raise ValueError(f"{module}: lora_A {tuple(down)} and lora_B {tuple(up)} are not "
                             "the two matrices of one rank")
        for part in ("lora_B.bias", "lora_magnitude_vector"):
            if part in found and tuple(found[part]) != (up[0],):
                raise ValueError(f"{module}: {part} {tuple(found[part])} does not match "
                                 f"its {up[0]} outputs")
        layers.append(LoraLayer(module, int(down[0]), int(down[1]), int(up[0])))
    if not layers:
        raise ValueError("no LoRA layer (lora_A and lora_B) in the file")
    return layers


class LoraRegistry:
    """The LoRAs in ``directory`` (created on first registration).

    Reads go to the disk every time (another process, the trainer, may register), with
    hashes of JSON-less files remembered by size and modification time.
    """

    def __init__(self, directory: Path, *, clock: Callable[[], datetime] | None = None,
                 shared: SharedLoras | None = None) -> None:
        self._directory = Path(directory)
        self._clock = clock or (lambda: datetime.now(UTC))
        self._hashes: dict[tuple[str, int, int], str] = {}
        self._shared = shared

    @property
    def directory(self) -> Path:
        return self._directory

    @property
    def shared(self) -> SharedLoras | None:
        return self._shared

    def fetch(self, lora_ids: list[str]) -> None:
        """Brings the LoRAs among ``lora_ids`` that are registered in the shared store but
        not here into the folder (blocking: a worker thread). Unknown and unsafe ids are
        left for :meth:`get` to refuse; a store that fails is logged (``get`` then says
        ``UNKNOWN_LORA`` as for any LoRA it cannot find)."""
        if self._shared is None:
            return
        for lora_id in lora_ids:
            if is_safe_lora_id(lora_id):
                self._fetch_one(self._shared, lora_id)

    def _fetch_one(self, shared: SharedLoras, lora_id: str,
                   registration: bytes | None = None) -> None:
        """:meth:`fetch` for one safe id; ``registration``: its registration, already read
        from the store (else it is read)."""
        if all((self._directory / f"{lora_id}{suffix}").is_file()
               for suffix in (".safetensors", ".json")):
            return
        try:
            shared.fetch(lora_id, self._directory, registration=registration)
        except (OSError, ValueError, KeyError, TypeError) as exc:
            logger.warning("LoRA %s not fetched from the store: %s", lora_id, exc)

    def versions(self, character_id: str) -> list[int]:
        """The versions ``n`` of ``{character_id}_v{n}`` registered, here or in the store,
        ascending (blocking)."""
        pattern = re.compile(rf"^{re.escape(character_id)}_v(\d+)\.(safetensors|json)$")
        found = [int(match.group(1)) for path in
                 (self._directory.iterdir() if self._directory.is_dir() else ())
                 if (match := pattern.match(path.name))]
        if self._shared is not None:
            found += self._shared.versions(character_id)
        return sorted(set(found))

    def made_by(self, training_id: str) -> LoraInfo | None:
        """The LoRA training ``training_id`` registered, here or in the store, or None
        (blocking). Raises ``OSError`` when the store fails (unknown is not the same as
        not found)."""
        for info in self.list():
            if info.training and info.training.get("training_id") == training_id:
                return info
        if self._shared is None:
            return None
        found = self._shared.made_by(training_id)  # raises StorageError (an OSError)
        if found is None:
            return None
        self._fetch_one(self._shared, found.lora_id, found.body)  # the registration just read, not again
        try:
            return self.get(found.lora_id)
        except UnknownLoraError:
            return None

    def get(self, lora_id: str) -> LoraInfo:
        """The LoRA registered as ``lora_id`` here (with a shared store, :meth:`fetch` the
        ones registered elsewhere first, from a worker thread).

        Raises :class:`UnknownLoraError` when the id is unsafe or has no weights file, and
        :class:`InternalError` when its metadata file exists but is unreadable.
        """
        if not isinstance(lora_id, str) or not is_safe_lora_id(lora_id):
            raise UnknownLoraError(f"unknown LoRA {lora_id!r}: not a valid LoRA id")
        weights = self._directory / f"{lora_id}.safetensors"
        if not weights.is_file():
            raise UnknownLoraError(f"unknown LoRA {lora_id!r}")
        meta_file = self._directory / f"{lora_id}.json"
        if meta_file.is_file():
            return self._from_metadata(lora_id, weights, meta_file)
        return self._from_weights(lora_id, weights)

    def list(self) -> list[LoraInfo]:
        """Every readable LoRA, sorted by id; unreadable ones are logged and left out."""
        found: list[LoraInfo] = []
        if not self._directory.is_dir():
            return found
        for weights in sorted(self._directory.glob("*.safetensors")):
            if not is_safe_lora_id(weights.stem):
                continue
            try:
                found.append(self.get(weights.stem))
            except (UnknownLoraError, InternalError) as exc:
                logger.warning("LoRA %s left out of the list: %s", weights.stem, exc)
        return found

    def register(
        self,
        lora_id: str,
        weights_file: Path,
        *,
        trigger_word: str | None,
        base_model: str | None,
        rank: int | None = None,
        alpha: float | None = None,
        training: dict[str, Any] | None = None,
        replace: bool = False,
    ) -> LoraInfo:
        """Copy ``weights_file`` in as ``lora_id`` and write its metadata; return its info.

        Rank, alpha and targets are read from the file (its peft metadata and tensor
        shapes); a ``rank``/``alpha`` given that disagrees raises ``ValueError``. The
        weights are copied under a temporary name and renamed, then the JSON likewise, so
        a reader never sees half a LoRA. Raises ``ValueError`` for an unsafe id or a file
        that is no LoRA (its tensors must be plain LoRA layers: :func:`lora_layers_of`;
        the message names the first bad one), ``FileExistsError`` when the id exists and
        not ``replace``, ``OSError`` when the disk fails or ``weights_file`` changes while
        it is copied (the changed copy is not put in place).
        """
        if not is_safe_lora_id(lora_id):
            raise ValueError(f"invalid LoRA id {lora_id!r}: allowed {SAFE_LORA_ID.pattern}")
        shape = read_lora_shape(Path(weights_file))
        lora_layers_of(Path(weights_file))
        for name, given, found in (("rank", rank, shape.rank), ("alpha", alpha, shape.alpha)):
            if given is not None and float(given) != float(found):
                raise ValueError(f"{name}={given} given, but {weights_file} has {name} {found}")
        target = self._directory / f"{lora_id}.safetensors"
        if target.exists() and not replace:
            raise FileExistsError(f"LoRA {lora_id!r} is already registered")
        self._directory.mkdir(parents=True, exist_ok=True)
        digest = file_sha256(Path(weights_file))
        metadata: dict[str, Any] = {
            "lora_id": lora_id,
            "trigger_word": trigger_word,
            "rank": shape.rank,
            "alpha": shape.alpha,
            "targets": list(shape.targets),
            "base_model": base_model,
            "sha256": digest,
            "created_at": self._clock().isoformat(),
        }
        if training is not None:
            metadata["training"] = training
        # the store decides first: its conditional create is the one registration
        if self._shared is not None and not self._shared.publish(
                lora_id, Path(weights_file), metadata, replace=replace):
            raise FileExistsError(f"LoRA {lora_id!r} is already registered (in the store)")
        with atomic_path(target) as temporary:
            shutil.copyfile(weights_file, temporary)
            if file_sha256(temporary) != digest:  # checked before it takes the name
                raise OSError(f"{weights_file} changed while LoRA {lora_id!r} was registered")
        atomic_write(self._directory / f"{lora_id}.json",
                     (json.dumps(metadata, indent=2) + "\n").encode("utf-8"))
        logger.info("registered LoRA %s (rank %d, sha256 %s)", lora_id, shape.rank, digest[:12])
        return self.get(lora_id)

    def _from_metadata(self, lora_id: str, weights: Path, meta_file: Path) -> LoraInfo:
        try:
            meta = json.loads(meta_file.read_text(encoding="utf-8"))
            return LoraInfo(
                lora_id=lora_id,
                path=weights,
                trigger_word=meta.get("trigger_word"),
                rank=int(meta["rank"]),
                alpha=float(meta.get("alpha", meta["rank"])),
                targets=tuple(meta.get("targets", ())),
                base_model=meta.get("base_model"),
                sha256=str(meta["sha256"]),
                created_at=str(meta.get("created_at", "")),
                training=meta.get("training"),
            )
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise InternalError(f"metadata of LoRA {lora_id!r} is unreadable: {exc}") from exc

    def _from_weights(self, lora_id: str, weights: Path) -> LoraInfo:
        try:
            shape: LoraShape = read_lora_shape(weights)
            stat = weights.stat()
        except (OSError, ValueError) as exc:
            raise InternalError(f"LoRA file {weights.name} is unreadable: {exc}") from exc
        key = (lora_id, stat.st_size, stat.st_mtime_ns)
        if key not in self._hashes:
            self._hashes[key] = file_sha256(weights)
        return LoraInfo(
            lora_id=lora_id, path=weights, trigger_word=None, rank=shape.rank,
            alpha=shape.alpha, targets=shape.targets, base_model=None, sha256=self._hashes[key],
            created_at=datetime.fromtimestamp(stat.st_mtime, UTC).isoformat(),
        )
