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
    cache = snapshots.latest(3).cache[None]
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
    cache = snapshots.latest(STEPS - 1).cache[None]
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
        one_output = loose.latest(1).nbytes // units  # step 1's snapshot: one output per unit
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


@pytest.mark.parametrize("limit,location", [(None, "memory"), (2, "cpu"), (None, "disk"), (2, "disk")])
def test_recording_from_the_shared_prefix_gives_the_trajectory_recorded_from_the_noise(limit, location, tmp_path):
    runner, units = _runner()
    old = _forecasting_plan(units)
    settings = SearchSettings(snapshot_limit=limit, snapshot_location=location,
                              snapshot_dir=str(tmp_path) if location == "disk" else None)
    for start in range(1, STEPS):
        new = old.actions.clone()
        new[start:] = 2  # REUSE from the move's step on; the rows before it are the old plan's
        new = CachePlan(new)
        with settings.snapshots(STEPS) as scratch, settings.snapshots(STEPS) as reused:
            expected, _ = runner.recorded(new, scratch)
            runner.recorded(old, reused)
            final, _ = runner.recorded(new, reused, start=start)
            assert torch.equal(final, expected)
            assert sorted(s for s in scratch._snapshots) == sorted(s for s in reused._snapshots)
            for step in scratch._snapshots:  # later candidates restart from these: the same bits
                a, b = scratch.latest(step), reused.latest(step)
                assert torch.equal(a.latents, b.latents) and a.cache.keys() == b.cache.keys() == {None}
                assert a.cache[None].times == b.cache[None].times
                for ha, hb in zip(a.cache[None].outputs, b.cache[None].outputs):
                    assert [c for c, _ in ha] == [c for c, _ in hb]
                    assert all(torch.equal(x, y) for (_, x), (_, y) in zip(ha, hb))
            assert reused.held_bytes == scratch.held_bytes and reused.disk_bytes <= scratch.disk_bytes + 1024
            if location == "disk":  # the old plan's files after the move's step went, the new plan's replaced them
                assert sorted(p.name for p in reused._folder.iterdir()) == sorted(p.name for p in scratch._folder.iterdir())


def test_the_search_records_each_move_from_its_step_with_the_same_result(pixart_folder, tmp_path, monkeypatch):
    from dit_cache.training import plan_search

    train_cli(_search_args(pixart_folder, tmp_path / "shared", 40))
    shared = CacheRouter.load(tmp_path / "shared" / "router.safetensors")
    starts = []
    recorded = plan_search.TrajectoryRunner.recorded

    def from_the_noise(self, plan, snapshots=None, start=0):
        starts.append(start)
        if snapshots is not None:
            snapshots.truncate(0)
        return recorded(self, plan, snapshots)

    monkeypatch.setattr(plan_search.TrajectoryRunner, "recorded", from_the_noise)
    train_cli(_search_args(pixart_folder, tmp_path / "scratch", 40))
    scratch = CacheRouter.load(tmp_path / "scratch" / "router.safetensors")
    assert any(s > 0 for s in starts)  # the search did ask for recordings from a move's step
    assert torch.equal(shared.logits, scratch.logits) and torch.equal(shared.refined_plans, scratch.refined_plans)
    for key in ("search_trace", "refined_errors", "search_evaluations"):
        assert json.dumps(shared.metadata[key]) == json.dumps(scratch.metadata[key])


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


@pytest.mark.parametrize("name", ["wan", "qwen-image"])  # two-call CFG: a cache state per call's context
def test_the_search_on_a_two_call_family_caches_both_calls_and_restarts_them_exactly(name, tmp_path, monkeypatch):
    import lightning as L

    from dit_cache.testing import TINY_FAMILIES
    from dit_cache.training.data import RouterDataModule
    from dit_cache.training.router_module import RouterModule

    model = tmp_path / "model"
    TINY_FAMILIES[name].pipeline().save_pretrained(model)
    contexts = set()
    add = TrajectorySnapshots.add
    monkeypatch.setattr(TrajectorySnapshots, "add", lambda self, step, latents, scheduler, cache: (
        contexts.update(name for name, snapshot in cache.items() if snapshot.nbytes),
        add(self, step, latents, scheduler, cache))[1])

    def search(**snapshots):
        settings = SearchSettings(groups="step", whole_steps=False, calibration_prompts=2, max_flops=0.5,
                                  default_flops=0.3, **snapshots)
        module = RouterModule(str(model), num_steps=4, objective="search", guidance_scale=3.0, search=settings)
        data = RouterDataModule(str(model), prompts=["a red circle", "a blue square and a cat"], batch_size=1,
                                num_trajectories=10, max_sequence_length=8)
        L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                  enable_progress_bar=False, enable_model_summary=False).fit(module, data)
        return module.search.trace.clone()

    trace = search(snapshot_location="memory")
    assert contexts == {"cond", "uncond"}  # both calls' states are snapshotted (and nothing outside them ran)
    moves = trace[1:][~torch.isnan(trace[1:, 0])]
    assert len(moves) >= 2 and bool((moves[:, 1] > 0).all())  # the plans reached both calls: errors grew
    bounded = search(snapshot_location="disk", snapshot_limit=1)  # restarts recompute from one snapshot
    assert torch.equal(torch.nan_to_num(bounded), torch.nan_to_num(trace))


def test_video_latents_take_the_frames_and_shape_asked_for_and_bad_values_are_refused():
    from dit_cache.testing import TINY_FAMILIES, tiny_pixart
    from dit_cache.training.denoising import latent_noise
    from dit_cache.training.router_module import _check_settings

    wan = TINY_FAMILIES["wan"].model()
    generator = torch.Generator().manual_seed(0)
    noise = latent_noise(wan, 2, generator, latent_size=[6, 10], latent_frames=3)
    assert noise.shape == (2, wan.config.in_channels, 3, 6, 10)
    with pytest.raises(ValueError, match="latent_frames=3 is for video families.*leave latent_frames at 1"):
        latent_noise(tiny_pixart(num_layers=1), 1, generator, latent_frames=3)
    base = dict(num_steps=4, proxy_interval=1, guidance_scale=2.0, learning_rate=0.1, beta=1e-4, beta_rate=0.5,
                threshold=0.1, cost="units", target_cache_ratio=None)
    _check_settings(**base, latent_size=[6, 10], latent_frames=21)  # accepted
    for bad in ([6], [6, 0], 0, [6, 10, 2], 2.5):
        with pytest.raises(ValueError, match="latent_size must be a whole number >= 1.*or \\[height, width\\]"):
            _check_settings(**base, latent_size=bad)
    for bad in (0, -2, True, 1.5):
        with pytest.raises(ValueError, match="latent_frames must be a whole number >= 1"):
            _check_settings(**base, latent_frames=bad)
