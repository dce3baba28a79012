"""What the family contract test does not cover for FLUX.2, Chroma and Z-Image: FLUX.2 Klein's two-call CFG, Chroma's
CFG calls that the cache names itself, Z-Image's refused CFG truncation and its positional, rising model time."""

import pytest
import torch

import dit_cache
from dit_cache import CacheSchedule, apply_cache, cache_units, remove_cache
from dit_cache.pipelines import decelerate
from dit_cache.testing import (run_steps, tiny_chroma, tiny_chroma_pipeline, tiny_flux2_klein_pipeline, tiny_z_image,
                               tiny_z_image_pipeline)

STEPS = 4


def _generate(pipe, steps=STEPS, **kwargs):
    # The FLUX.2 pipelines take ``image`` first: the prompt goes by name for every pipeline here.
    return pipe(prompt="a red circle and a blue square", num_inference_steps=steps, output_type="pt", height=64,
                width=64, max_sequence_length=8, generator=torch.Generator().manual_seed(0), **kwargs).images


def _quiet(pipe):
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_flux2_klein_true_cfg_runs_its_two_calls_per_step_as_one_step_each():
    """Flux2KleinPipeline (a base model, guidance_scale > 1) names its calls cache_context("cond") / ("uncond")."""
    pipe = _quiet(tiny_flux2_klein_pipeline())
    num_units = len(cache_units(pipe.transformer))
    for guidance, calls in ((4.0, 2), (1.0, 1)):  # guidance_scale <= 1: no negative call
        stock = _generate(pipe, guidance_scale=guidance)
        dit_cache.accelerate(pipe, schedule=CacheSchedule.full(STEPS, num_units))
        assert torch.equal(_generate(pipe, guidance_scale=guidance), stock)
        assert pipe.cache_stats.steps == STEPS and pipe.cache_stats.computed == calls * STEPS * num_units
        decelerate(pipe)
        dit_cache.accelerate(pipe, schedule=CacheSchedule.uniform(STEPS, num_units, interval=2))
        assert not torch.equal(_generate(pipe, guidance_scale=guidance), stock)
        assert pipe.cache_stats.reused == calls * (STEPS // 2) * num_units
        decelerate(pipe)
        assert torch.equal(_generate(pipe, guidance_scale=guidance), stock)


def test_chroma_cfg_calls_are_named_by_the_cache_one_history_each():
    """ChromaPipeline calls the transformer for the prompt, then for the negative prompt, without cache_context."""
    pipe = _quiet(tiny_chroma_pipeline())
    num_units = len(cache_units(pipe.transformer))
    for guidance, calls in ((4.0, 2), (1.0, 1)):  # guidance_scale <= 1: no negative call
        stock = _generate(pipe, guidance_scale=guidance)
        dit_cache.accelerate(pipe, schedule=CacheSchedule.uniform(STEPS, num_units, interval=2))
        cached = _generate(pipe, guidance_scale=guidance)
        stats = pipe.cache_stats
        assert stats.steps == STEPS and stats.reused == calls * (STEPS // 2) * num_units, guidance
        decelerate(pipe)
        # A REUSE reading the other call's output would differ from this: each call reuses its own history.
        dit_cache.accelerate(pipe, schedule=CacheSchedule.full(STEPS, num_units))
        assert torch.equal(_generate(pipe, guidance_scale=guidance), stock)
        decelerate(pipe)
        assert not torch.equal(cached, stock)


def test_chroma_call_names_do_not_outlive_the_call():
    from dit_cache.cache import _CALL_CONTEXT

    pipe = _quiet(tiny_chroma_pipeline())
    dit_cache.accelerate(pipe, schedule=CacheSchedule.full(2, len(cache_units(pipe.transformer))))
    _generate(pipe, steps=2, guidance_scale=4.0)
    assert _CALL_CONTEXT.get() is None


def test_chroma_engine_level_uniform_schedule_skips():
    transformer = tiny_chroma()
    stock = run_steps(transformer, STEPS)
    handle = apply_cache(transformer, CacheSchedule.uniform(STEPS, len(cache_units(transformer)), interval=2))
    cached = run_steps(transformer, STEPS)
    assert handle.stats.reused == STEPS // 2 * len(cache_units(transformer))
    assert torch.equal(cached[0], stock[0]) and not torch.equal(cached[-1], stock[-1])
    remove_cache(transformer)


def test_z_image_cfg_truncation_is_refused_while_cached_with_the_fix():
    pipe = _quiet(tiny_z_image_pipeline())
    dit_cache.accelerate(pipe, schedule=CacheSchedule.full(2, len(cache_units(pipe.transformer))))
    with pytest.raises(ValueError, match=r"cfg_truncation=0.5 .*unconditional half.*Leave cfg_truncation=1.0"):
        _generate(pipe, steps=2, cfg_truncation=0.5)
    assert pipe.cache_stats is None  # refused before anything ran
    _generate(pipe, steps=2, cfg_truncation=0.5, cache=False)  # uncached it runs
    _generate(pipe, steps=2, cfg_truncation=1.0)


def test_z_image_positional_rising_time_is_followed_at_engine_level():
    """ZImagePipeline passes (latents, t, text) positionally, t = (1000 - timestep) / 1000 rising over a generation:
    the engine must neither miss the time (forecasts) nor take each step for a new generation."""
    transformer = tiny_z_image()
    num_units = len(cache_units(transformer))
    handle = apply_cache(transformer, CacheSchedule.uniform(STEPS, num_units, interval=2))
    x = list(torch.randn(2, 4, 1, 8, 8, generator=torch.Generator().manual_seed(0)).unbind(0))
    text = list(torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1)).unbind(0))
    with torch.no_grad():
        for step in range(STEPS):
            transformer(x, torch.full((2,), step / STEPS), text)
    assert handle.state.times == [step / -STEPS for step in range(STEPS)]  # seen negated: decreasing
    assert handle.stats.reused == STEPS // 2 * num_units
    remove_cache(transformer)
