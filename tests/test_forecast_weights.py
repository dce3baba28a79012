"""Forecast weights learned end to end (training/forecast_weights.py): where they start, that training lowers the
error the engine then measures, that the pipeline is left stock, and clear errors for what cannot be fitted."""

import pytest
import torch

import dit_cache
from dit_cache import CachePlan, cache_units
from dit_cache.plan import Action
from dit_cache.testing import tiny_pixart_pipeline
from dit_cache.training.forecast_weights import fit_forecast_weights, learnable_entries

STEPS = 8
PROMPTS, SEEDS = ["a red circle", "a blue square", "a green triangle", "a red square"], [1, 2, 3, 4]
CALL = dict(guidance_scale=2.0, clean_caption=False)


@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _plan(pipe) -> CachePlan:
    """Computes 0, 1, 4, 7; reuses at 2 and 5, forecasts at 3 and 6."""
    actions = torch.full((STEPS, len(cache_units(pipe.transformer))), int(Action.COMPUTE), dtype=torch.int8)
    actions[[2, 5]], actions[[3, 6]] = int(Action.REUSE), int(Action.FORECAST1)
    return CachePlan(actions)


def _latents(pipe, plan=None) -> torch.Tensor:
    target = pipe if plan is None else dit_cache.accelerate(pipe, plan=plan)
    try:
        generators = [torch.Generator().manual_seed(seed) for seed in SEEDS]
        return target(PROMPTS, generator=generators, num_inference_steps=STEPS, output_type="latent",
                      **CALL).images
    finally:
        if plan is not None:
            dit_cache.decelerate(target)


def _log_error(pipe, plan, reference) -> float:
    return float(torch.log10(((_latents(pipe, plan) - reference) ** 2).flatten(1).mean(1)).mean())


def test_the_learnable_entries_are_the_predicted_ones_with_two_computed_outputs(pipe):
    learn = learnable_entries(_plan(pipe))
    assert learn.any(dim=1).nonzero().flatten().tolist() == [2, 3, 5, 6]  # step 2: steps 0 and 1 are behind it
    actions = _plan(pipe).actions.clone()
    actions[2] = int(Action.CFG_SHARE)  # runs the unit: nothing to learn there
    assert not learnable_entries(CachePlan(actions))[2].any()


def test_untrained_weights_are_the_plans_own_predictions(pipe):
    plan = _plan(pipe)
    start = fit_forecast_weights(pipe, plan, PROMPTS, SEEDS, epochs=0, progress=False, **CALL)
    assert bool((start.actions[[2, 3, 5, 6]] == Action.LINEAR).all())
    assert torch.equal(start.linear_weights[2, 0], torch.tensor([1.0, 0.0]))  # a reuse
    torch.testing.assert_close(_latents(pipe, start), _latents(pipe, plan), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("share", ["step", "branch", "unit"])
def test_training_lowers_the_error_the_engine_measures_and_leaves_the_pipeline_stock(pipe, share):
    reference = _latents(pipe)
    plan = _plan(pipe)
    trained = fit_forecast_weights(pipe, plan, PROMPTS, SEEDS, share=share, epochs=4, learning_rate=0.005,
                                   batch_size=2, progress=False, **CALL)
    assert _log_error(pipe, trained, reference) < _log_error(pipe, plan, reference)
    weights = trained.linear_weights[3]
    distinct = {tuple(w.tolist()) for w in weights}
    assert len(distinct) == {"step": 1, "branch": 3, "unit": weights.shape[0]}[share]
    assert torch.equal(_latents(pipe), reference)  # no unit is left patched


def test_bad_inputs_are_refused_before_anything_runs(pipe):
    plan = _plan(pipe)
    reference = _latents(pipe)
    with pytest.raises(ValueError, match="share must be one of"):
        fit_forecast_weights(pipe, plan, PROMPTS, SEEDS, share="block", **CALL)
    with pytest.raises(ValueError, match="one seed per calibration prompt"):
        fit_forecast_weights(pipe, plan, PROMPTS, SEEDS[:2], **CALL)
    every_step = CachePlan(torch.full_like(plan.actions, int(Action.COMPUTE)))
    with pytest.raises(ValueError, match="no skipped entry"):
        fit_forecast_weights(pipe, every_step, PROMPTS, SEEDS, **CALL)
    cached = dit_cache.accelerate(pipe, plan=plan)
    try:
        with pytest.raises(RuntimeError, match="remove the cache first"):
            fit_forecast_weights(cached, plan, PROMPTS, SEEDS, **CALL)
    finally:
        dit_cache.decelerate(cached)
    assert torch.equal(_latents(pipe), reference)
