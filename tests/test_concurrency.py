"""The cache belongs to the call, not to the transformer: concurrent calls, shared transformers, early stops."""

import copy

import numpy as np
import pytest
import torch

from dit_cache import CachePlan, apply_cache, cache_units, get_cache_handle, remove_cache
from dit_cache.pipelines import AcceleratedPixArtAlphaPipeline, accelerate, decelerate
from dit_cache.testing import run_in_lockstep as _in_lockstep
from dit_cache.testing import run_steps, tiny_pixart, tiny_pixart_pipeline

STEPS = 6
CALL = dict(num_inference_steps=STEPS, output_type="np", guidance_scale=3.0)


def _sibling(stock, plan):
    """An accelerated pipeline sharing ``stock``'s transformer, with a scheduler and a tokenizer of its own: both are
    stateful (a fast tokenizer used by two threads at once raises "Already borrowed"), so two concurrent calls could
    never share them, cached or not."""
    scheduler = type(stock.scheduler).from_config(stock.scheduler.config)
    return AcceleratedPixArtAlphaPipeline.from_pipe(stock, plan=plan, scheduler=scheduler,
                                                    tokenizer=copy.deepcopy(stock.tokenizer))


def _generate(pipe, prompt, seed, **kwargs):
    return pipe(prompt, generator=torch.Generator().manual_seed(seed), **CALL, **kwargs).images


@pytest.fixture()
def stock():
    pipe = tiny_pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _plans(pipe):
    units = len(cache_units(pipe.transformer))
    return CachePlan.uniform(STEPS, units, interval=2), CachePlan.taylor(STEPS, units, interval=2, order=1)


@pytest.mark.parametrize("repeat", range(3))
def test_two_pipelines_sharing_a_transformer_generate_concurrently_as_they_do_one_after_the_other(stock, repeat):
    reuse, forecast = _plans(stock)
    a, b = _sibling(stock, reuse), _sibling(stock, forecast)
    sequential = [_generate(a, "a red circle", 1), _generate(b, "a blue square", 2)]
    concurrent = _in_lockstep(stock.transformer, [lambda: _generate(a, "a red circle", 1),
                                                  lambda: _generate(b, "a blue square", 2)])
    assert all(np.array_equal(x, y) for x, y in zip(sequential, concurrent))
    assert a.cache_stats.reused > 0 and b.cache_stats.forecast > 0


def test_a_stock_pipeline_sharing_the_transformer_stays_stock_while_a_cached_call_runs(stock):
    reference = _generate(stock, "a red circle", 1)
    cached = _sibling(stock, _plans(stock)[0])
    cached_alone = _generate(cached, "a blue square", 2)
    concurrent = _in_lockstep(stock.transformer, [lambda: _generate(stock, "a red circle", 1),
                                                  lambda: _generate(cached, "a blue square", 2)])
    assert np.array_equal(concurrent[0], reference) and np.array_equal(concurrent[1], cached_alone)
    assert not np.array_equal(cached_alone, _generate(stock, "a blue square", 2))


def test_decelerating_one_pipeline_leaves_a_sibling_cached_and_the_last_one_removes_the_hooks(stock):
    reference = _generate(stock, "a red circle", 1)
    a, b = _sibling(stock, _plans(stock)[0]), _sibling(stock, _plans(stock)[0])
    before = _generate(b, "a red circle", 1)
    decelerate(a)
    assert np.array_equal(_generate(b, "a red circle", 1), before) and b.cache_stats.reused > 0
    assert a.cache_stats is None and np.array_equal(_generate(a, "a red circle", 1), reference)
    decelerate(b)
    assert get_cache_handle(stock.transformer) is None
    assert not any(hasattr(m, "_diffusers_hook") for m in stock.transformer.modules())


def test_removing_the_cache_under_a_pipeline_is_refused_at_its_next_call(stock):
    cached = accelerate(stock, plan=_plans(stock)[0])
    remove_cache(stock.transformer)
    with pytest.raises(RuntimeError, match="cache was removed.*accelerate"):
        _generate(cached, "a red circle", 1)
    assert _generate(cached, "a red circle", 1, cache=False).shape == (1, 256, 256, 3)


def test_an_engine_level_generation_stopped_early_does_not_leak_into_the_next():
    transformer = tiny_pixart()
    plan = CachePlan.taylor(STEPS, len(cache_units(transformer)), interval=2, order=1)
    apply_cache(transformer, plan)
    fresh = run_steps(transformer, STEPS)
    run_steps(transformer, 3)  # stopped after 3 of 6 steps; no reset
    again = run_steps(transformer, STEPS)
    assert all(torch.equal(x, y) for x, y in zip(fresh, again))
    run_steps(transformer, 1)  # stopped after the first step: the next one starts at the same timestep
    assert all(torch.equal(x, y) for x, y in zip(fresh, run_steps(transformer, STEPS)))


def test_a_pipeline_call_stopped_by_an_error_leaves_the_next_call_exact(stock):
    cached = accelerate(stock, plan=_plans(stock)[1])
    reference = _generate(cached, "a red circle", 1)

    def fail_at_step_3(step, timestep, latents):
        if step == 3:
            raise KeyboardInterrupt  # what a user's Ctrl-C looks like to the pipeline

    with pytest.raises(KeyboardInterrupt):
        _generate(cached, "a red circle", 1, callback=fail_at_step_3)
    assert np.array_equal(_generate(cached, "a red circle", 1), reference)
