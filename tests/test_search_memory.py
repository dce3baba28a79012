"""The search's bounded memory: the cache state's snapshot / restore, the trajectory snapshots (a limit, the CPU,
the disk), the same router whatever the bound, and settings refused with the fix."""

import json

import pytest
import torch

from conftest import train_cli
from dit_cache import CachePlan, CacheRouter, apply_cache, cache_units
from dit_cache.testing import tiny_pixart
from dit_cache.training.denoising import GuidedDenoiser, text_conditioning
from dit_cache.training.plan_search import SearchSettings, TrajectoryRunner
from dit_cache.training.trajectory_snapshots import TrajectorySnapshots, snapshot_steps
from test_plan_search import _search_args, pixart_folder  # noqa: F401 (a fixture)

STEPS = 6


def _runner(history=2):
    from diffusers import DPMSolverMultistepScheduler

    transformer = tiny_pixart(num_layers=2)
    units = len(cache_units(transformer))
    handle = apply_cache(transformer, CachePlan.full(STEPS, units))
    generator = torch.Generator().manual_seed(0)
    embeds = torch.randn(2, 5, 16, generator=generator)
    mask = torch.ones(2, 5, dtype=torch.long)
    conditioning = text_conditioning(embeds, mask, torch.zeros_like(embeds), mask, transformer)
    noise = torch.randn(2, 4, 8, 8, generator=generator)
    runner = TrajectoryRunner(GuidedDenoiser(transformer, 2.0), DPMSolverMultistepScheduler(), handle, noise,
                              conditioning, STEPS, history=history)
    return runner, units


def _forecasting_plan(units):
    plan = CachePlan.full(STEPS, units).actions.clone()
    plan[2], plan[4] = 4, 2  # FORECAST1, REUSE
    return CachePlan(plan)


def test_a_restored_cache_state_goes_on_to_the_same_bits():
    runner, units = _runner()
    plan = _forecasting_plan(units)
    state = runner.handle.state
    final, snapshots = runner.recorded(plan)
    cache = snapshots.latest(3).cache
    assert cache.step == 3 and len(cache.times) == 3 and cache.nbytes > 0
    assert [step for step, _ in cache.outputs[0]] == [0, 1]  # history 2: steps 0 and 1 computed, 2 forecast
    for start in range(1, STEPS):
        assert torch.equal(runner.final_latents(plan, start, snapshots), final)
    state.restore(cache)  # the state holds what was snapshotted, and a new snapshot of it is the same
    again = state.snapshot()
    assert (again.step, again.times, again.last_time) == (cache.step, cache.times, cache.last_time)
    assert all(a is b for ha, hb in zip(again.outputs, cache.outputs) for (_, a), (_, b) in zip(ha, hb))
    state.reset()


def test_restore_refuses_a_snapshot_of_another_model_or_plan():
    runner, units = _runner()
    _, snapshots = runner.recorded(CachePlan.full(STEPS, units))
    cache = snapshots.latest(STEPS - 1).cache
    state = runner.handle.state
    wrong_units = cache.with_outputs(cache.outputs[:-1])
    with pytest.raises(ValueError, match="restore it on the model it was taken from"):
        state.restore(wrong_units)
    from dit_cache.hooks import CompiledPlan

    state.set_plan(CompiledPlan(CachePlan.full(3, units)))
    with pytest.raises(ValueError, match="under a plan of as many steps"):
        state.restore(cache)


def test_snapshot_steps_are_spread_so_a_restart_recomputes_few_steps():
    assert snapshot_steps(20, None) == list(range(1, 20)) == snapshot_steps(20, 19) == snapshot_steps(20, 50)
    assert snapshot_steps(20, 4) == [4, 8, 12, 16]
    assert snapshot_steps(20, 0) == []
    for limit in range(0, 20):
        steps = snapshot_steps(20, limit)
        assert len(steps) <= limit
        gaps = [b - a for a, b in zip([0, *steps], [*steps, 20])]
        assert max(gaps) <= -(-20 // (limit + 1))


@pytest.mark.parametrize("limit,location", [(1, "memory"), (2, "cpu"), (2, "disk"), (None, "disk")])
def test_bounded_snapshots_hold_at_most_the_bound_and_give_the_same_finals(limit, location, tmp_path):
    runner, units = _runner()
    plan = _forecasting_plan(units)
    final, loose = runner.recorded(plan)
    settings = SearchSettings(snapshot_limit=limit, snapshot_location=location,
                              snapshot_dir=str(tmp_path) if location == "disk" else None)
    with settings.snapshots(STEPS) as bounded:
        assert torch.equal(runner.recorded(plan, bounded)[0], final)
        one_output = loose.latest(1).cache.nbytes // units  # step 1's snapshot: one output per unit
        kept = len(bounded)
        assert kept == (STEPS - 1 if limit is None else limit)
        if location == "disk":
            assert bounded.held_bytes == 0 and bounded.disk_bytes >= one_output * units * 2
            assert any(tmp_path.iterdir())
        else:
            assert 0 < bounded.held_bytes <= kept * units * runner.history * one_output
        for start in range(1, STEPS):  # a candidate departing at any step: the same bits as from its own snapshot
            changed = plan.actions.clone()
            changed[start:] = 2
            changed = CachePlan(changed)
            assert torch.equal(runner.final_latents(changed, start, bounded),
                               runner.final_latents(changed, start, loose))
    assert bounded.held_bytes == 0 and len(bounded) == 0
    assert not any(tmp_path.iterdir())  # closing deletes the files


def test_the_search_gives_the_same_router_whatever_the_memory_bound(pixart_folder, tmp_path):
    def run(name, *extra):
        train_cli(_search_args(pixart_folder, tmp_path / name, 40) + list(extra))
        return CacheRouter.load(tmp_path / name / "router.safetensors")

    loose = run("loose", "--model.search.snapshot_location", "memory")  # one snapshot per step, in memory
    bounded = run("one_snapshot_on_disk", "--model.search.snapshot_location", "disk",
                  "--model.search.snapshot_limit", "1")  # one snapshot, at step 3 of 5: restarts recompute
    assert torch.equal(bounded.logits, loose.logits) and torch.equal(bounded.cheap_actions, loose.cheap_actions)
    assert torch.equal(bounded.refined_plans, loose.refined_plans)
    for key in ("search_trace", "refined_errors", "search_evaluations"):
        assert json.dumps(bounded.metadata[key]) == json.dumps(loose.metadata[key])

@pytest.mark.parametrize("settings,message", [
    ({"snapshot_limit": -1}, "snapshot_limit must be a whole number >= 0"),
    ({"snapshot_limit": 2.5}, "snapshot_limit must be a whole number >= 0"),
    ({"snapshot_location": "gpu"}, "snapshot_location must be one of memory, cpu, disk"),
    ({"snapshot_dir": "/tmp"}, "set snapshot_location: disk"),
    ({"snapshot_location": "disk", "snapshot_dir": "/no/such/folder"}, "is not a folder: create it first"),
])
def test_bad_snapshot_settings_are_refused_naming_the_fix(settings, message):
    with pytest.raises(ValueError, match=message):
        SearchSettings(**settings)
