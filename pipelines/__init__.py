"""Drop-in accelerated diffusers pipelines (``dit_cache.pipelines``)."""

from .accelerated import (AcceleratedDiTPipeline, AcceleratedFluxPipeline, AcceleratedPixArtAlphaPipeline,
                          AcceleratedPixArtSigmaPipeline, AcceleratedSanaPipeline, AcceleratedStableDiffusion3Pipeline,
                          CachedPipelineMixin, accelerate, decelerate)
from .multi_concept import MultiConceptConfig, concept_positions

__all__ = [
    "AcceleratedDiTPipeline",
    "AcceleratedFluxPipeline",
    "AcceleratedPixArtAlphaPipeline",
    "AcceleratedPixArtSigmaPipeline",
    "AcceleratedSanaPipeline",
    "AcceleratedStableDiffusion3Pipeline",
    "CachedPipelineMixin",
    "MultiConceptConfig",
    "accelerate",
    "concept_positions",
    "decelerate",
]
