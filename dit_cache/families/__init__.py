"""The model-family registry: what each supported diffusers transformer is (``dit_cache.families.FAMILIES``)."""

from .record import Branch, CFGLayout, FamilyRegistry, ModelFamily, SecondCall
from .registry import FAMILIES


def family_of(transformer) -> ModelFamily:
    """The family of a transformer (model, compiled wrapper or class name); a TypeError naming the supported ones."""
    return FAMILIES.of_transformer(transformer)


def family_of_pipeline(pipe) -> ModelFamily:
    return FAMILIES.of_pipeline(pipe)


__all__ = ["FAMILIES", "Branch", "CFGLayout", "FamilyRegistry", "ModelFamily", "SecondCall", "family_of",
           "family_of_pipeline"]
