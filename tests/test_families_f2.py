"""Lumina2, CogView4 and HunyuanImage 2.1: what is particular to each (the contract test checks what every family
must do)."""

import pytest
import torch

import dit_cache
from dit_cache import CacheSchedule, apply_cache, cache_units, remove_cache
from dit_cache.testing import TINY_FAMILIES, run_steps, tiny_cogview4, tiny_lumina2

STEPS = 4


def _generate(pipe, name, **kwargs):
    call = {**TINY_FAMILIES[name].call, **kwargs}
    return pipe("a red circle and a blue square", num_inference_steps=STEPS, output_type="pt",
                generator=torch.Generator().manual_seed(0), **call).images


def _pipeline(name):
    pipe = TINY_FAMILIES[name].pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_lumina2_rising_timesteps_are_one_generation_at_engine_level():
    """Lumina2's timestep goes from 0 (noise) up to 1: each step must not look like a new generation."""
    transformer = tiny_lumina2()
    num_units = len(cache_units(transformer))
    assert [u.path.split(".")[0] for u in cache_units(transformer)][::2] == ["context_refiner", "noise_refiner",
                                                                              "layers", "layers"]
    handle = apply_cache(transformer, CacheSchedule.uniform(STEPS, num_units, interval=2))
    run_steps(transformer, STEPS)
    assert handle.stats.steps == STEPS and handle.stats.reused == (STEPS // 2) * num_units
    remove_cache(transformer)


def test_lumina2_cfg_is_refused_while_cached_also_by_default():
    pipe = _pipeline("lumina2")
    dit_cache.accelerate(pipe, schedule=CacheSchedule.full(STEPS, len(cache_units(pipe.transformer))))
    call = dict(TINY_FAMILIES["lumina2"].call)
    call.pop("guidance_scale")
    for kwargs, given in (({"guidance_scale": 4.0}, "guidance_scale=4.0"), ({}, "The default guidance_scale")):
        with pytest.raises(ValueError, match=f"{given} makes AcceleratedLumina2Pipeline call the transformer twice.*"
                                             "Pass guidance_scale=1.0"):
            pipe("a cat", num_inference_steps=STEPS, **call, **kwargs)
        assert pipe.cache_stats is None  # refused before generating
    stock = _generate(pipe, "lumina2", cache=False, guidance_scale=4.0)
    assert stock.shape[0] == 1  # cache=False runs the CFG call stock


def test_cogview4_feed_forward_serves_both_streams_so_only_attention_is_a_unit():
    """The reason ff is not a unit: one module, called on the image tokens and then on the text tokens. If a
    diffusers release splits it, this fails and ff can become a unit."""
    transformer = tiny_cogview4(num_layers=1)
    calls = []
    transformer.transformer_blocks[0].ff.register_forward_hook(lambda module, args, output: calls.append(args[0].shape))
    run_steps(transformer, 1)
    assert len(calls) == 2 and calls[0][1] != calls[1][1]  # image tokens, then text tokens
    assert [u.branch for u in cache_units(transformer)] == ["attn1"]


@pytest.mark.parametrize("name", ["cogview4", "hunyuan-image"])
def test_two_call_cfg_follows_the_plan_in_each_context(name):
    pipe = _pipeline(name)
    cfg = TINY_FAMILIES[name].cfg_call
    stock = _generate(pipe, name, **cfg)
    num_units = len(cache_units(pipe.transformer))
    dit_cache.accelerate(pipe, schedule=CacheSchedule.uniform(STEPS, num_units, interval=2))
    cached = _generate(pipe, name, **cfg)
    # Two calls per step (conditional, unconditional), each reusing at every other step.
    assert pipe.cache_stats.steps == STEPS and pipe.cache_stats.reused == 2 * (STEPS // 2) * num_units
    assert not torch.equal(cached, stock)
    assert torch.equal(_generate(pipe, name, cache=False, **cfg), stock)


def test_hunyuan_image_guider_starting_late_is_refused():
    from diffusers import AdaptiveProjectedMixGuidance

    pipe = _pipeline("hunyuan-image")
    dit_cache.accelerate(pipe, schedule=CacheSchedule.full(STEPS, len(cache_units(pipe.transformer))))
    pipe.guider = AdaptiveProjectedMixGuidance(start=0.25)
    with pytest.raises(ValueError, match="guider starts guidance after the first step.*start=0"):
        _generate(pipe, "hunyuan-image")
