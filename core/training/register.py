"""A finished training → a registered LoRA; and finding the LoRA a training made.

LoRA ids are ``{character_id}_v{n}``, ``n`` one more than the highest version of that
character in LORA_OUTPUT_DIR and the shared store (``sarah_v1`` → ``sarah_v2``), so an id
is usable at once as ``character_lora_id`` and never replaces an earlier LoRA; two
trainings that pick the same version at once get two versions (the registry's create
decides, the loser takes the next). A registration retried after a store error or a crash
finds the LoRA its training registered (:meth:`LoraRegistry.made_by`; see
:mod:`core.lora.shared` for the order of the writes) and never takes a second version. The
registry's metadata keeps
``training`` (training_id, request_id, steps, images, probe losses, …): a replayed
request finds its result there without training again.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from core.lora.registry import LoraInfo, LoraRegistry
from core.training.adapter import LORA_ALPHA, LORA_RANK
from core.training.checkpoint import TrainingFolder
from core.training.spec import TrainingSpec

__all__ = ["find_registered", "register_lora"]

logger = logging.getLogger(__name__)

_ATTEMPTS = 20  # another writer taking the same version is retried with the next one


def find_registered(registry: LoraRegistry, training_id: str) -> LoraInfo | None:
    """The LoRA registered by training ``training_id``, or None. Blocking (reads the
    registry's folder, and the shared store)."""
    return registry.made_by(training_id)


def register_lora(
    registry: LoraRegistry, folder: TrainingFolder, spec: TrainingSpec,
    weights: dict[str, torch.Tensor], *, dtype: torch.dtype, base_model: str,
    training: dict[str, Any],
) -> LoraInfo:
    """Write ``weights`` as a LoRA file (in ``dtype``, with its adapter metadata) and
    register it under the next free ``{character_id}_v{n}`` with the trigger word, base
    model and ``training`` metadata; the LoRA this training registered already (here or,
    through the shared store, on another instance, or by an earlier attempt that failed
    after its registration landed) when there is one. Blocking. Raises ``OSError`` when a
    file cannot be written or the store fails (retry: the same call finds or completes
    it), ``FileExistsError`` when no version could be taken."""
    for _ in range(_ATTEMPTS):
        # the same training finished elsewhere first (two instances that both ran it):
        # its LoRA is the one, never a second version of the same training
        done = registry.made_by(spec.training_id)
        if done is not None:
            return done
        lora_id = f"{spec.character_id}_v{max([0, *registry.versions(spec.character_id)]) + 1}"
        weights_file = folder.write_lora(lora_id, weights, dtype)
        try:
            return registry.register(
                lora_id, weights_file, trigger_word=spec.trigger_word, base_model=base_model,
                rank=LORA_RANK, alpha=LORA_ALPHA, training=training)
        except FileExistsError:
            logger.info("LoRA id %s was taken meanwhile; trying the next version", lora_id)
        finally:
            weights_file.unlink(missing_ok=True)
    raise FileExistsError(f"no free LoRA version for {spec.character_id!r}")
