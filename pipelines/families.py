"""Per-family call checks of the accelerated SD3, FLUX and Sana pipelines.

The cache counts one transformer call as one denoising step. Options of these pipelines that call the
transformer twice per step (FLUX's true CFG, SD3's skip-layer guidance) are refused while a cache is applied,
and so is ``concepts=``: SD3 and FLUX have joint attention, not a cross-attention over the text tokens that
Cross-Token NMS needs; Sana prepends its complex human instruction to every prompt, so concept token positions
do not carry over.
"""

from __future__ import annotations

from dit_cache.cache import get_cache_handle


class FamilyCallChecks:
    """Refuses, before generating, what the cache cannot follow in this pipeline family."""

    _concepts_refusal: str = ""
    # (keyword, is the second transformer call on?, the fix)
    _second_call_options: tuple = ()

    def __call__(self, *args, cache: bool = True, concepts=None, **kwargs):
        if concepts:
            raise TypeError(f"concepts= is not supported by {type(self).__name__}: {self._concepts_refusal}")
        if cache and get_cache_handle(self.transformer) is not None:
            for keyword, second_call, fix in self._second_call_options:
                if second_call(kwargs):
                    raise ValueError(f"{keyword}={kwargs[keyword]!r} makes {type(self).__name__} call the transformer "
                                     f"twice per denoising step, but cache schedules and routers count one call per "
                                     f"step. {fix}, or call the pipeline with cache=False.")
        return super().__call__(*args, cache=cache, **kwargs)


_JOINT_ATTENTION = ("its joint attention has no cross-attention over the text tokens, which Cross-Token NMS "
                    "needs. Correct the prompt embeddings yourself (dit_cache.concepts.correct_by_similarities) and "
                    "pass prompt_embeds=.")


class StableDiffusion3CallChecks(FamilyCallChecks):
    _concepts_refusal = _JOINT_ATTENTION
    _second_call_options = (
        ("skip_guidance_layers", lambda kwargs: bool(kwargs.get("skip_guidance_layers")),
         "Leave skip_guidance_layers=None"),
    )


def _true_cfg(kwargs) -> bool:
    # FluxPipeline's own condition for its second (negative) call.
    negative = kwargs.get("negative_prompt") is not None or (
        kwargs.get("negative_prompt_embeds") is not None and kwargs.get("negative_pooled_prompt_embeds") is not None)
    return kwargs.get("true_cfg_scale", 1.0) > 1 and negative


class FluxCallChecks(FamilyCallChecks):
    _concepts_refusal = _JOINT_ATTENTION
    _second_call_options = (
        ("true_cfg_scale", _true_cfg, "Use true_cfg_scale=1 (FLUX.1-dev is guidance-distilled: set guidance_scale)"),
    )


class SanaCallChecks(FamilyCallChecks):
    _concepts_refusal = ("Sana prepends a complex human instruction to every prompt and keeps only the last "
                         "max_sequence_length tokens, so concept token positions do not carry over.")
