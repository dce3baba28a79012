"""The benchmark's candidates on tiny pipelines: each diffusers cache applies, changes the output, and is removed
leaving the model bitwise stock; the measured cache ratio matches the engine's own count."""

import json

import pytest
import torch

import dit_cache
from dit_cache.bench import peers
from dit_cache.families import family_of_pipeline
from dit_cache.flops import step_flops
from dit_cache.testing import tiny_dit_pipeline, tiny_pixart_pipeline

STEPS = 8


def _call(pipe):
    generator = torch.Generator().manual_seed(0)
    if hasattr(pipe, "tokenizer"):
        return {"prompt": "a red circle", "clean_caption": False, "generator": generator,
                "num_inference_steps": STEPS, "guidance_scale": 2.0, "output_type": "latent"}
    return {"class_labels": [1], "generator": generator, "num_inference_steps": STEPS, "guidance_scale": 2.0,
            "output_type": "latent"}


def _latents(pipe, candidate=peers.UNCACHED):
    candidate.apply(pipe)
    try:
        with candidate.call_context(pipe):
            output = pipe(**_call(pipe))
        return torch.as_tensor(output.images)
    finally:
        candidate.remove(pipe)


def _setup(pipe):
    pipe.set_progress_bar_config(disable=True)
    meter = peers.StepMeter(pipe.transformer)
    return peers.BenchSetup(pipe, STEPS, step_flops(pipe.transformer)[0], meter, {},
                            mag_ratios=[1.0] * STEPS, cfg_layout=family_of_pipeline(pipe).cfg)


# Aggressive settings, so that each cache certainly skips work on an 8-step run of a random model.
AGGRESSIVE = {
    "first_block_cache": lambda s: peers.first_block_cache_family(s, thresholds=(1e6,)),
    "taylorseer": lambda s: peers.taylorseer_family(s, intervals=(2,)),
    "magcache": lambda s: peers.mag_cache_family(s, thresholds=(10.0,)),
    "fastercache": lambda s: peers.faster_cache_family(s, skips=((2, 2),)),
    "pab": lambda s: peers.pab_family(s, skips=((2, 2),)),
}


def _stock_everywhere(transformer) -> bool:
    return all(not hasattr(m, "_diffusers_hook") and "forward" not in m.__dict__ and not m._forward_hooks
               and not m._forward_pre_hooks for m in transformer.modules())


@pytest.mark.parametrize("make_pipe", [tiny_pixart_pipeline, tiny_dit_pipeline], ids=["pixart", "dit"])
def test_every_peer_changes_the_output_and_its_removal_leaves_the_model_bitwise_stock(make_pipe):
    pipe = make_pipe()
    setup = _setup(pipe)
    stock = _latents(pipe)
    signature = peers.module_signature(pipe.transformer)
    tried = []
    for name, family in AGGRESSIVE.items():
        for candidate in family(setup):
            setup.meter.reset()
            cached = _latents(pipe, candidate)
            assert setup.meter.cache_ratio() > 0, candidate.label
            assert not torch.equal(cached, stock), candidate.label
            assert peers.module_signature(pipe.transformer) == signature, candidate.label
            assert torch.equal(_latents(pipe), stock), candidate.label
            tried.append(name)
    setup.meter.remove()
    assert _stock_everywhere(pipe.transformer)
    if hasattr(pipe, "tokenizer"):
        assert tried == list(AGGRESSIVE)
    else:  # DiT batches [cond, uncond]: FasterCache would drop the conditional half, so it is left out
        assert tried == [name for name in AGGRESSIVE if name != "fastercache"]


def test_taylorseer_hooks_every_branch_with_factors_in_the_model_dtype():
    pipe = tiny_pixart_pipeline()
    setup = _setup(pipe)
    candidate = peers.taylorseer_family(setup, intervals=(2,))[0]
    candidate.apply(pipe)
    try:
        hooked = {name for name, module in pipe.transformer.named_modules()
                  if getattr(module, "_diffusers_hook", None) is not None and module._diffusers_hook.hooks}
        assert hooked == {unit.path for unit in dit_cache.cache_units(pipe.transformer)}
        hook = pipe.transformer.transformer_blocks[0].ff._diffusers_hook.get_hook("taylorseer_cache")
        assert hook.taylor_factors_dtype == pipe.transformer.dtype
    finally:
        candidate.remove(pipe)
        setup.meter.remove()


def assert_no_state_leak(pipe, family):
    """Two calls of ``pipe`` under the first candidate of ``family(setup)`` give the same images."""
    setup = _setup(pipe)
    candidate = family(setup)[0]
    candidate.apply(pipe)
    try:
        outputs = []
        for _ in range(2):
            with candidate.call_context(pipe):
                outputs.append(torch.as_tensor(pipe(**_call(pipe)).images))
    finally:
        candidate.remove(pipe)
        setup.meter.remove()
    assert torch.equal(outputs[0], outputs[1])


def test_the_state_of_one_call_does_not_leak_into_the_next():
    assert_no_state_leak(tiny_pixart_pipeline(), lambda setup: peers.first_block_cache_family(setup, thresholds=(1e6,)))


@pytest.mark.parametrize("family", ["uniform", "router"])
def test_measured_cache_ratio_equals_the_engines_cache_stats(family, tmp_path):
    pipe = tiny_pixart_pipeline()
    setup = _setup(pipe)
    units = len(setup.meter.units)
    router_path = tmp_path / "router.safetensors"
    dit_cache.CacheRouter(STEPS, units, generator=torch.Generator().manual_seed(0)).save(router_path)
    setup.routers = {"shipped": str(router_path)}
    candidates = (peers.uniform_family(setup, intervals=(2, 3)) if family == "uniform"
                  else peers.router_family(setup, budgets=(0.3, 0.6)))
    try:
        for candidate in candidates:
            setup.meter.reset()
            candidate.apply(pipe)
            try:
                pipe(**_call(pipe))
                engine = pipe.cache_stats.cache_ratio
            finally:
                candidate.remove(pipe)
            assert engine > 0
            assert setup.meter.cache_ratio() == pytest.approx(engine, abs=1e-12), candidate.label
    finally:
        setup.meter.remove()


def test_a_unit_run_on_half_the_cfg_batch_counts_half():
    pipe = tiny_pixart_pipeline()
    setup = _setup(pipe)
    # FasterCache drops the unconditional half on some steps; there the cross-attention and MLP run on the
    # conditional half only (and the self-attention is extrapolated).
    candidate = peers.faster_cache_family(setup, skips=((1_000, 2),))[0]
    try:
        _latents(pipe, candidate)
        calls = dict(zip(setup.meter.units, setup.meter.unit_calls))
    finally:
        setup.meter.remove()
    half_steps = {2 * (STEPS - count) for unit, count in calls.items() if unit.branch != "attn1"}
    assert len(half_steps) == 1, calls
    half = half_steps.pop()
    assert half >= 1 and half == int(half), calls


def test_mag_cache_calibration_is_stored_and_reused(tmp_path):
    pipe = tiny_pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    path = tmp_path / "magcache_ratios.json"
    ratios = peers.calibrate_mag_cache(pipe, [_call(pipe)], STEPS, path)
    assert len(ratios) == STEPS and ratios[0] == 1.0
    assert json.loads(path.read_text())["mag_ratios"] == ratios
    assert _stock_everywhere(pipe.transformer)
    assert peers.calibrate_mag_cache(pipe, [], STEPS, path) == ratios  # no calls: read from the file


def test_mag_cache_ratios_of_another_calibration_are_not_reused(tmp_path):
    pipe = tiny_pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    path = tmp_path / "magcache_ratios.json"
    path.write_text(json.dumps({"steps": STEPS, "source": {"calibration_seed": 1}, "mag_ratios": [0.5] * STEPS}))
    ratios = peers.calibrate_mag_cache(pipe, [_call(pipe)], STEPS, path, source={"calibration_seed": 2})
    assert ratios[0] == 1.0 and ratios != [0.5] * STEPS
    assert json.loads(path.read_text())["source"] == {"calibration_seed": 2}


def test_the_adaptive_family_runs_the_embedded_rules_and_removes_itself():
    from diffusers import PixArtAlphaPipeline

    pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    setup = peers.BenchSetup(pipe, 20, step_flops(pipe.transformer)[0], peers.StepMeter(pipe.transformer),
                             {"shipped": dit_cache.embedded_router_path()})
    setup.meter.remove()
    call = {"prompt": "a red circle", "clean_caption": False, "num_inference_steps": 20, "guidance_scale": 2.0,
            "output_type": "latent"}
    stock = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    signature = peers.module_signature(pipe.transformer)
    candidates = peers.adaptive_family(setup)
    assert [c.settings["flop_budget"] for c in candidates] == [0.5, 0.525, 0.55, 0.725]
    assert [c.label for c in candidates][1] == "router adaptive 52.5% FLOPs (prompt_tokens)"
    for candidate in candidates:
        candidate.apply(pipe)
        try:
            cached = pipe(**call, generator=torch.Generator().manual_seed(0)).images
        finally:
            candidate.remove(pipe)
        assert not torch.equal(cached, stock)
        assert peers.module_signature(pipe.transformer) == signature and _stock_everywhere(pipe.transformer)
    assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0)).images, stock)
    other = peers.BenchSetup(pipe, 20, setup.unit_flops, setup.meter, {"shipped": "elsewhere.safetensors"})
    assert peers.adaptive_family(other) == [] and "embedded router" in other.left_out["adaptive"]
