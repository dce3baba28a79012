"""Drop-in accelerated diffusers pipelines (``dit_cache.pipelines``)."""

from .accelerated import (AcceleratedDiTPipeline, AcceleratedPixArtAlphaPipeline, AcceleratedPixArtSigmaPipeline,
                          CachedPipelineMixin, accelerate, decelerate)
from .multi_concept import MultiConceptConfig, concept_positions

__all__ = [
    "AcceleratedDiTPipeline",
    "AcceleratedPixArtAlphaPipeline",
    "AcceleratedPixArtSigmaPipeline",
    "CachedPipelineMixin",
    "MultiConceptConfig",
    "accelerate",
    "concept_positions",
    "decelerate",
]
