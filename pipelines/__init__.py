"""Drop-in accelerated diffusers pipelines (``dit_cache.pipelines``).

One ``Accelerated<Pipeline>`` class per diffusers pipeline of the family registry (``dit_cache.families``), built
on first use: ``AcceleratedPixArtAlphaPipeline``, ``AcceleratedQwenImagePipeline``, ``AcceleratedWanPipeline``, ...
(``accelerated_pipeline_names()`` lists them).
"""

from . import accelerated
from .accelerated import CachedPipelineMixin, accelerate, accelerated_pipeline_names, decelerate
from .multi_concept import MultiConceptConfig, concept_positions


def __getattr__(name: str):
    return getattr(accelerated, name)  # the Accelerated* classes, built from the registry


def __dir__():
    return sorted(set(globals()) | set(accelerated_pipeline_names()))


__all__ = [
    "CachedPipelineMixin",
    "MultiConceptConfig",
    "accelerate",
    "accelerated_pipeline_names",
    "concept_positions",
    "decelerate",
    *accelerated_pipeline_names(),
]
