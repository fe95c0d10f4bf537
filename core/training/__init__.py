"""Character LoRA training: 5–50 photos and a trigger word → a registered LoRA.

peft rank 16 on the FLUX transformer's attention projections, FLUX's flow-matching
objective on cached latents and caption embeddings, trained in the GPU worker a chunk at a
time (image requests run between chunks), checkpointed and resumable, registered in the
LoRA registry with a validation image. See docs/training.md.
"""

from core.training.factory import build_training_service, training_limits
from core.training.runner import TrainingInterrupted
from core.training.service import TrainingOutcome, TrainingService
from core.training.spec import TrainingLimits, TrainingSpec, training_id_for
from core.training.status import TrainingStatus

__all__ = [
    "TrainingInterrupted", "TrainingLimits", "TrainingOutcome", "TrainingService",
    "TrainingSpec", "TrainingStatus", "build_training_service", "training_id_for",
    "training_limits",
]
