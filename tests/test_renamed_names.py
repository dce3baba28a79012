"""Renamed public names still work for a release, each warning once; the shipped files still load."""

import warnings

import pytest
import torch

import dit_cache
from dit_cache import CachePlan, CacheRouter, apply_cache, cache_units, deprecation
from dit_cache.testing import run_steps, tiny_pixart


@pytest.fixture(autouse=True)
def _fresh_warnings():
    deprecation._WARNED.clear()


def _warnings_of(call):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call()
    return result, [w for w in caught if issubclass(w.category, FutureWarning)]


def test_flops_is_the_old_name_of_skip_flops_and_warns_once():
    router = CacheRouter.load(dit_cache.embedded_router_path())
    new, none = _warnings_of(lambda: router.plan(skip_flops=0.55))
    old, first = _warnings_of(lambda: router.plan(flops=0.55))
    _, second = _warnings_of(lambda: router.plan(flops=0.55))
    assert not none and len(first) == 1 and "skip_flops" in str(first[0].message) and not second
    assert torch.equal(old.actions, new.actions)
    with pytest.raises(ValueError, match="skip_flops= only"):
        router.plan(skip_flops=0.5, flops=0.5)


def test_set_schedule_compile_and_compiled_plan_are_the_old_names():
    from dit_cache.hooks import CompiledPlan, PreparedPlan

    assert CompiledPlan is PreparedPlan
    transformer = tiny_pixart()
    units = len(cache_units(transformer))
    handle = apply_cache(transformer, CachePlan.full(2, units))
    plan = CachePlan.uniform(2, units, 2)
    _, caught = _warnings_of(lambda: handle.set_schedule(plan))
    assert len(caught) == 1 and "set_plan" in str(caught[0].message) and handle.plan is plan
    prepared, caught = _warnings_of(lambda: handle.compile(plan))
    assert len(caught) == 1 and "prepare" in str(caught[0].message) and isinstance(prepared, PreparedPlan)
    run_steps(transformer, 2)
    assert handle.stats.reused == units


@pytest.mark.parametrize("path", [dit_cache.embedded_router_path(), dit_cache.embedded_harmonica_router_path()])
def test_the_shipped_router_files_still_load_and_plan(path):
    router = CacheRouter.load(path)
    plan = router.plan() if router.flops_range is None else router.plan(skip_flops=router.flops_range[1])
    assert plan.num_steps == router.num_steps and plan.counts()["COMPUTE"] < plan.num_steps * plan.num_units
