"""What a family's pipeline call may not do while cached, read from its record (:mod:`dit_cache.families`).

The cache counts one transformer call per step, or one per cache context where the pipeline names its calls
(``cache_context("cond")`` / ``("uncond")``); options that add an unnamed call per step (SD3's skip-layer guidance)
are refused while a cache is applied, and so is ``concepts=`` where the family has no cross-attention over the
prompt tokens for Cross-Token NMS.
"""

from __future__ import annotations

from dit_cache.families import ModelFamily


def check_family_call(pipe, family: ModelFamily, cached: bool, concepts, kwargs: dict) -> None:
    """Refuse, before generating, what the cache cannot follow in this call of ``pipe``."""
    if concepts and family.concepts_refusal:
        raise TypeError(f"concepts= is not supported by {type(pipe).__name__}: {family.concepts_refusal}")
    if not cached:
        return
    for option in family.second_calls:
        if option.is_on(kwargs):
            # An option can be on by default (Lumina2Pipeline's guidance_scale=4.0): say so rather than its value.
            given = (f"{option.keyword}={kwargs[option.keyword]!r}" if option.keyword in kwargs
                     else f"The default {option.keyword}")
            raise ValueError(f"{given} makes {type(pipe).__name__} {option.effect}. {option.fix}, or call the "
                             "pipeline with cache=False.")
    if family.check_pipeline is not None:
        problem = family.check_pipeline(pipe)
        if problem:
            raise ValueError(f"{type(pipe).__name__} cannot run cached: {problem}")
