"""Video families beyond the contract test: what their pipelines may not do while cached, and CFG_SHARE on a
family whose branches take per-sample tuples (LTX-Video's rotary (cos, sin))."""

import pytest
import torch

import dit_cache
from dit_cache import CacheSchedule, cache_units
from dit_cache.pipelines import decelerate
from dit_cache.plan import CachePlan
from dit_cache.testing import TINY_FAMILIES, tiny_wan


def _pipeline(name):
    pipe = TINY_FAMILIES[name].pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, name, steps=2, **kwargs):
    tiny = TINY_FAMILIES[name]
    return pipe("a red circle", num_inference_steps=steps, output_type="pt", generator=torch.Generator().manual_seed(0),
                **tiny.call, **{**tiny.cfg_call, **kwargs}).frames


def test_hunyuan_video15_follows_plain_cfg_and_refuses_guiders_that_change_the_calls():
    from diffusers.guiders import ClassifierFreeGuidance, SkipLayerGuidance

    pipe = _pipeline("hunyuan-video-1.5")
    num_units = len(cache_units(pipe.transformer))
    dit_cache.accelerate(pipe, schedule=CacheSchedule.full(2, num_units))
    _generate(pipe, "hunyuan-video-1.5")  # "pred_cond" and "pred_uncond": two calls per step, one state each
    assert pipe.cache_stats.steps == 2 and pipe.cache_stats.computed == 2 * 2 * num_units
    refusals = {
        "its guider runs CFG only from 0.2 to 1.0 of the steps": ClassifierFreeGuidance(guidance_scale=6.0, start=0.2),
        "its guider is SkipLayerGuidance": SkipLayerGuidance(guidance_scale=6.0, skip_layer_guidance_layers=[0])}
    for reason, guider in refusals.items():
        pipe.guider = guider
        with pytest.raises(ValueError, match=f"cannot run cached: {reason}.*cache=False"):
            _generate(pipe, "hunyuan-video-1.5")  # refused before generating anything
    assert torch.isfinite(_generate(pipe, "hunyuan-video-1.5", cache=False)).all()
    pipe.guider = ClassifierFreeGuidance(guidance_scale=1.0)  # no CFG: one call per step
    _generate(pipe, "hunyuan-video-1.5")
    assert pipe.cache_stats.steps == 2 and pipe.cache_stats.computed == 2 * num_units


def test_wan22_two_experts_are_refused_with_the_fix():
    pipe = _pipeline("wan")
    pipe.register_modules(transformer_2=tiny_wan(seed=1))
    pipe.register_to_config(boundary_ratio=0.5)
    dit_cache.accelerate(pipe, schedule=CacheSchedule.full(2, len(cache_units(pipe.transformer))))
    with pytest.raises(ValueError, match="transformer_2 .*Use a one-transformer Wan .*cache=False"):
        _generate(pipe, "wan")
    assert torch.isfinite(_generate(pipe, "wan", cache=False)).all()


def test_ltx_cfg_share_slices_the_per_sample_rotary_and_computes_the_conditional_half():
    """LTXPipeline batches [negative, prompt]; its self-attention takes rotary (cos, sin) of batch size rows, which
    CFG_SHARE must halve along with the hidden states."""
    pipe = _pipeline("ltx-video")
    transformer = pipe.transformer
    units = cache_units(transformer)
    attn2 = transformer.get_submodule(units[1].path)  # block 0's cross-attention: the halves differ there
    seen = []
    handle = attn2.register_forward_hook(lambda module, args, output: seen.append(output.detach().clone()))
    _generate(pipe, "ltx-video", steps=4)
    stock = seen[1]  # step 1
    seen.clear()
    dit_cache.accelerate(pipe, plan=CachePlan.parse("cfg:2", 4, len(units)))  # step 1: CFG_SHARE
    _generate(pipe, "ltx-video", steps=4)
    handle.remove()
    decelerate(pipe)
    cached, half = seen[1], stock.shape[0] // 2
    assert torch.allclose(cached[half:], stock[half:], atol=1e-6)  # computed: the conditional (second) half
    assert not torch.allclose(cached[:half], stock[:half], atol=1e-4)  # rebuilt from the stored difference
