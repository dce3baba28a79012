"""CacheRouter (logits, fixed rows, schedules, file format, resampling, calibration) and the soft-gated cache."""

import json
import math
import pickle
from fractions import Fraction

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import dit_cache
from dit_cache import CachePlan, CacheRouter, CacheSchedule, apply_cache, cache_units
from dit_cache.plan import Action
from dit_cache.router import LOGIT_LIMIT
from dit_cache.testing import step_inputs, tiny_pixart

PINNED = 1 / (1 + math.exp(-LOGIT_LIMIT))  # sigmoid(5): the score of a fixed row


def _router(num_steps=10, num_units=6, seed=0, **kwargs):
    return CacheRouter(num_steps, num_units, generator=torch.Generator().manual_seed(seed), **kwargs)


# ---- logits, fixed rows, schedules ------------------------------------------------------------------------
def test_init_logits_are_standard_normal_and_seeded():
    a, b, c = _router(seed=3), _router(seed=3), _router(seed=4)
    assert torch.equal(a.logits, b.logits)
    assert not torch.equal(a.logits, c.logits)
    # The non-fixed rows are exactly the generator's N(0, 1) draw (clamping to +-5 changes nothing there).
    expected = torch.randn(10, 6, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a.logits[1:].detach(), expected[1:])
    big = _router(num_steps=400, num_units=50, seed=1).logits[1:].detach()
    assert abs(big.mean().item()) < 0.03 and abs(big.std().item() - 1) < 0.03


def test_first_row_is_pinned_and_gets_no_gradient():
    router = _router()
    with torch.no_grad():
        router.logits[0] = -3.0  # even a corrupted stored value reads as +5
    scores = router.scores()
    assert torch.allclose(scores[0], torch.full((6,), PINNED))
    (scores * torch.arange(1.0, 61.0).view(10, 6)).sum().backward()
    assert torch.equal(router.logits.grad[0], torch.zeros(6))
    assert bool((router.logits.grad[1:] != 0).all())


def test_extra_fixed_rows_are_pinned_too():
    fixed = torch.arange(8) % 2 == 0
    router = _router(num_steps=8, fixed_rows=fixed)
    router.scores().sum().backward()
    assert torch.equal(router.fixed_rows, fixed)
    assert bool((router.logits.grad[fixed] == 0).all()) and bool((router.logits.grad[~fixed] != 0).all())
    assert bool(router.schedule().mask[fixed].all())


def test_clamp_keeps_logits_in_range():
    router = _router()
    with torch.no_grad():
        router.logits[1:5] = 12.0
        router.logits[5:] = -40.0
        router.logits[0] = -7.0
    router.clamp_()
    logits = router.logits.detach()
    assert float(logits.max()) <= LOGIT_LIMIT and float(logits.min()) >= -LOGIT_LIMIT
    assert bool((logits[1:5] == LOGIT_LIMIT).all()) and bool((logits[5:] == -LOGIT_LIMIT).all())
    assert bool((logits[0] == LOGIT_LIMIT).all())


@pytest.mark.parametrize("threshold", [0.05, 0.1, 0.5, 0.9])
def test_schedule_is_scores_above_threshold(threshold):
    router = _router(seed=2)
    schedule = router.schedule(threshold)
    assert torch.equal(schedule.mask, router.scores().detach() > threshold)
    assert router.schedule() == router.schedule(router.threshold)


def test_first_step_always_computes():
    router = _router()
    with torch.no_grad():
        router.logits.fill_(-LOGIT_LIMIT)
    router.clamp_()
    for threshold in (0.5, 0.9, 0.99):
        mask = router.schedule(threshold).mask
        assert bool(mask[0].all()) and not bool(mask[1:].any())


# ---- file format ------------------------------------------------------------------------------------------
def test_save_load_round_trip(tmp_path):
    fixed = torch.tensor([True, False, True, False, False, True])
    metadata = {"unit_layout": "PixArtTransformer2DModel:2xattn1+attn2+ff", "guidance_scale": 4.5,
                "scheduler_config": {"beta_start": 0.0001, "solver_order": 2, "names": ["a", "b"]}}
    router = _router(num_steps=6, threshold=0.237, fixed_rows=fixed, metadata=metadata)
    with torch.no_grad():
        router.logits.mul_(2.2)  # some values beyond +-5 before clamping
    router.clamp_()
    router.save(tmp_path / "r.safetensors", objective="sdt", note="trained on CPU")
    loaded = CacheRouter.load(tmp_path / "r.safetensors")
    assert torch.equal(loaded.logits, router.logits) and loaded.logits.dtype == torch.float32
    assert torch.equal(loaded.fixed_rows, fixed)
    assert loaded.threshold == 0.237
    assert loaded.metadata == {**metadata, "objective": "sdt", "note": "trained on CPU"}
    assert loaded.schedule() == router.schedule()
    # cache_ratio is written to the header (for inspection) but is not part of the loaded metadata.
    with safe_open(str(tmp_path / "r.safetensors"), framework="pt") as file:
        header = file.metadata()
    assert json.loads(header["cache_ratio"]) == pytest.approx(router.schedule().cache_ratio)
    assert "cache_ratio" not in loaded.metadata


class _Tripwire:
    """Unpickling this creates a marker file: a loader that unpickles leaves a trace."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.fixture
def no_unpickling(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the router loader must never unpickle")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)


def test_loading_other_files_is_refused_without_unpickling(tmp_path, no_unpickling):
    marker = tmp_path / "unpickled"
    torch.save({"logits": torch.zeros(3, 2), "evil": _Tripwire(marker)}, tmp_path / "router.pt")
    (tmp_path / "random.safetensors").write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    (tmp_path / "notes.txt").write_text("format: dit-cache/router\nlogits: 1 2 3\n")
    save_file({"logits": torch.zeros(3, 2)}, str(tmp_path / "weights.safetensors"))
    save_file({"mask": torch.ones(3, 2, dtype=torch.uint8)}, str(tmp_path / "schedule.safetensors"),
              metadata={"format": "dit-cache/schedule"})
    for name in ("router.pt", "random.safetensors", "notes.txt", "weights.safetensors", "schedule.safetensors"):
        with pytest.raises(ValueError, match="not a dit-cache router"):
            CacheRouter.load(tmp_path / name)
    assert not marker.exists()


def test_router_file_without_fixed_rows_is_refused(tmp_path):
    save_file({"logits": torch.zeros(3, 2)}, str(tmp_path / "r.safetensors"), metadata={"format": "dit-cache/router"})
    with pytest.raises(ValueError, match="not a dit-cache router"):
        CacheRouter.load(tmp_path / "r.safetensors")


def test_missing_file_raises_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing_here"):
        CacheRouter.load(tmp_path / "nothing_here.safetensors")
    with pytest.raises(FileNotFoundError):
        CacheRouter.load(tmp_path)  # a folder is not a router file either


def test_check_compatible_names_both_sides_and_the_fix():
    router = _router(num_steps=20, metadata={"unit_layout": "PixArtTransformer2DModel:28xattn1+attn2+ff"})
    router.check_compatible("PixArtTransformer2DModel:28xattn1+attn2+ff", 20)  # matching: no error
    with pytest.raises(ValueError) as layout_error:
        router.check_compatible("DiTTransformer2DModel:28xattn1+ff", 20)
    message = str(layout_error.value)
    assert "PixArtTransformer2DModel:28xattn1+attn2+ff" in message and "DiTTransformer2DModel:28xattn1+ff" in message
    assert "dit-cache-train" in message
    with pytest.raises(ValueError) as steps_error:
        router.check_compatible("PixArtTransformer2DModel:28xattn1+attn2+ff", 25)
    message = str(steps_error.value)
    assert "20" in message and "25" in message and "resample(25)" in message
    _router(num_steps=20).check_compatible("anything", 20)  # no recorded layout: only the steps are checked


# ---- resampling and calibration ---------------------------------------------------------------------------
def _nearest_by_position(source_steps, target_steps):
    """For each target row, the source row at the nearest relative position (exact arithmetic, no ties)."""
    rows = []
    for i in range(target_steps):
        position = Fraction(i, target_steps - 1)
        distances = [abs(position - Fraction(j, source_steps - 1)) for j in range(source_steps)]
        best = min(distances)
        assert distances.count(best) == 1, "pick step counts without ties"
        rows.append(distances.index(best))
    return rows


@pytest.mark.parametrize("num_steps", [6, 8, 12, 28])
def test_resample_maps_rows_by_relative_position(num_steps):
    router = _router(num_steps=10, threshold=0.3, metadata={"objective": "harmonica"})
    resampled = router.resample(num_steps)
    rows = _nearest_by_position(10, num_steps)
    assert rows[0] == 0 and rows[-1] == 9
    assert resampled.num_steps == num_steps and resampled.num_units == 6
    assert torch.equal(resampled.logits.detach(), router.logits.detach()[rows])
    # sigmoid's vectorised kernel may round the tail of a 60- and a 48-element tensor differently in the last
    # bit, so the scores are compared to float precision; the logits above are compared bitwise
    torch.testing.assert_close(resampled.scores(), router.scores()[rows], rtol=0, atol=1e-7)
    assert resampled.threshold == 0.3
    assert resampled.metadata == {"objective": "harmonica", "resampled_from_steps": 10}
    assert bool(resampled.schedule().mask[0].all())


@pytest.mark.parametrize("target", [0.0, 0.05, 0.25, 1 / 3, 0.5, 0.7, 0.85])
def test_calibrate_threshold_lands_on_the_target(target):
    router = _router(num_steps=10, num_units=6, seed=5)
    threshold = router.calibrate_threshold(target)
    assert router.threshold == threshold
    assert abs(router.schedule().cache_ratio - target) <= 1 / 60 + 1e-6


def test_calibrate_threshold_counts_only_trainable_rows():
    router = _router(num_steps=8, num_units=3, fixed_rows=torch.arange(8) % 2 == 0, seed=6)
    for target in (0.1, 0.25, 0.5):  # at most 12 of 24 evaluations can be reused
        router.calibrate_threshold(target)
        schedule = router.schedule()
        assert abs(schedule.cache_ratio - target) <= 1 / 24 + 1e-6
        assert bool(schedule.mask[::2].all())


def test_calibrate_threshold_by_unit_weights_matches_the_skipped_share():
    router = _router(num_steps=10, num_units=6, seed=7)
    weights = torch.tensor([1.0, 1.0, 4.0, 1.0, 1.0, 4.0])  # two expensive units
    for target in (0.2, 0.5):
        router.calibrate_threshold(target, unit_weights=weights)
        skipped = float(((~router.schedule().mask).double() * weights).sum() / (weights.sum() * 10))
        assert abs(skipped - target) <= 4 / 120 + 1e-6  # within one expensive unit
    by_count = _router(num_steps=10, num_units=6, seed=7)
    by_count.calibrate_threshold(0.5)
    assert router.threshold != by_count.threshold
    with pytest.raises(ValueError, match="one per unit"):
        router.calibrate_threshold(0.5, unit_weights=torch.ones(5))
    with pytest.raises(ValueError, match="positive"):
        router.calibrate_threshold(0.5, unit_weights=torch.zeros(6))


def test_calibrated_threshold_keeps_the_first_step_computing():
    router = _router(num_steps=10, num_units=6)
    with torch.no_grad():
        router.logits[1:] = 4.5  # confident 'compute' everywhere, as after training with a small beta
    router.calibrate_threshold(0.9)  # the maximum reachable CUR
    schedule = router.schedule()
    assert bool(schedule.mask[0].all()) and schedule.cache_ratio == pytest.approx(0.9)


# ---- soft gating on a tiny PixArt transformer -------------------------------------------------------------
STEPS = 4


@pytest.fixture
def gated_setup():
    transformer = tiny_pixart(num_layers=2).requires_grad_(False)
    num_units = len(cache_units(transformer))
    first = step_inputs(transformer, timestep=900, seed=0)
    second = step_inputs(transformer, timestep=600, seed=1)
    second["encoder_hidden_states"] = first["encoder_hidden_states"]
    handle = apply_cache(transformer, CacheSchedule.full(STEPS, num_units))
    with torch.no_grad():
        transformer(**first)  # step 0 computes every unit and fills the cache
    return transformer, handle, num_units, first, second


def test_gate_of_ones_is_the_uncached_step(gated_setup):
    transformer, handle, num_units, first, second = gated_setup
    with torch.no_grad():
        with handle.bypassed():
            uncached = transformer(**second).sample
        handle.set_gate(torch.ones(num_units), 0.1)
        with handle.gated():
            gated = transformer(**second).sample
    assert torch.allclose(gated, uncached, atol=1e-6)
    assert handle.state.step == 2


def test_gate_of_zeros_is_the_hard_reuse_step(gated_setup):
    transformer, handle, num_units, first, second = gated_setup
    with torch.no_grad():
        handle.set_gate(torch.zeros(num_units), 0.1)
        with handle.gated():
            gated = transformer(**second).sample
        mask = torch.ones(STEPS, num_units, dtype=torch.bool)
        mask[1] = False
        handle.set_plan(CacheSchedule(mask))
        transformer(**first)
        reused = transformer(**second).sample
        with handle.bypassed():
            uncached = transformer(**second).sample
    assert torch.allclose(gated, reused, atol=1e-6)
    assert not torch.allclose(reused, uncached, atol=1e-3)  # reuse really differs from computing


def test_gate_gradients_reach_the_scores_only(gated_setup):
    transformer, handle, num_units, first, second = gated_setup
    scores = torch.full((num_units,), 0.5, requires_grad=True)
    handle.set_gate(scores, 0.1)
    with handle.gated():
        output = transformer(**second).sample
    output.pow(2).mean().backward()
    assert scores.grad is not None and bool((scores.grad != 0).all())
    assert all(p.grad is None for p in transformer.parameters())


def test_gate_writes_the_cache_only_above_the_threshold(gated_setup):
    transformer, handle, num_units, first, second = gated_setup
    assert num_units == 6
    before = [handle.state.outputs[u][-1][1] for u in range(num_units)]
    scores = torch.tensor([0.9, 0.05, 0.5, 0.1, 0.2, 0.09])
    with torch.no_grad():
        handle.set_gate(scores, 0.1)
        with handle.gated():
            transformer(**second)
    writes = [handle.state.outputs[u][-1][0] == 1 for u in range(num_units)]
    assert writes == [True, False, True, False, True, False]
    for unit in range(num_units):
        stored = handle.state.outputs[unit][-1][1]
        assert (stored is before[unit]) != writes[unit]
        assert not stored.requires_grad


# ---- bad values are refused, never silently used (issue 18) ------------------------------------------------
@pytest.mark.parametrize("threshold", [0.0, 1.0, 2.0, -0.1, float("nan"), float("inf")])
def test_thresholds_outside_zero_one_are_refused_everywhere(threshold):
    router = _router()
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        router.schedule(threshold)
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        router.threshold = threshold
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        _router(threshold=threshold)
    assert router.threshold == 0.1  # unchanged by the refused assignment


def test_accelerate_refuses_a_threshold_outside_zero_one_and_changes_nothing():
    from dit_cache.pipelines import accelerate
    from dit_cache.testing import tiny_pixart_pipeline

    pipe = tiny_pixart_pipeline()
    router = CacheRouter(6, len(cache_units(pipe.transformer)))
    with pytest.raises(ValueError, match=r"threshold must be in \(0, 1\)"):
        accelerate(pipe, router=router, threshold=2.0)
    assert not hasattr(pipe, "cache_stats") or pipe.cache_stats is None


@pytest.mark.parametrize("target", [-0.1, 1.5, float("nan")])
def test_calibrate_threshold_refuses_targets_outside_zero_one(target):
    router = _router()
    with pytest.raises(ValueError, match=r"target_cache_ratio must be in \[0, 1\]"):
        router.calibrate_threshold(target)
    assert router.threshold == 0.1


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_router_file_with_non_finite_logits_is_refused_naming_the_file(tmp_path, bad):
    logits = torch.zeros(4, 3)
    logits[2, 1] = bad
    save_file({"logits": logits, "fixed_rows": torch.tensor([1, 0, 0, 0], dtype=torch.uint8)},
              str(tmp_path / "nan.safetensors"), metadata={"format": "dit-cache/router"})
    with pytest.raises(ValueError, match=r"nan\.safetensors is a damaged router: tensor 'logits' holds NaN or infinite"):
        CacheRouter.load(tmp_path / "nan.safetensors")


def test_non_finite_logits_in_memory_give_no_schedule():
    router = _router()
    with torch.no_grad():
        router.logits[3, 2] = float("nan")  # e.g. a diverged training run; clamp_ keeps NaN
    router.clamp_()
    with pytest.raises(ValueError, match="not all finite"):
        router.schedule()


def test_fixed_rows_that_do_not_match_the_logits_are_refused_naming_the_file(tmp_path):
    save_file({"logits": torch.zeros(4, 3), "fixed_rows": torch.ones(6, dtype=torch.uint8)},
              str(tmp_path / "rows.safetensors"), metadata={"format": "dit-cache/router"})
    with pytest.raises(ValueError, match=r"rows\.safetensors is a damaged router: tensor 'fixed_rows' has shape \(6,\), shape \(4,\)"):
        CacheRouter.load(tmp_path / "rows.safetensors")
    with pytest.raises(ValueError, match=r"one flag per step, shape \(4,\)"):
        CacheRouter(4, 3, fixed_rows=torch.ones(6, dtype=torch.bool))


def test_bad_json_in_router_metadata_names_the_file_and_the_key(tmp_path):
    save_file({"logits": torch.zeros(4, 3), "fixed_rows": torch.ones(4, dtype=torch.uint8)},
              str(tmp_path / "json.safetensors"), metadata={"format": "dit-cache/router", "guidance_scale": "{oops"})
    with pytest.raises(ValueError, match=r"json\.safetensors is a damaged router: metadata 'guidance_scale' is not JSON"):
        CacheRouter.load(tmp_path / "json.safetensors")


def test_a_router_file_with_a_threshold_outside_zero_one_is_refused_naming_the_file(tmp_path):
    save_file({"logits": torch.zeros(4, 3), "fixed_rows": torch.ones(4, dtype=torch.uint8)},
              str(tmp_path / "tau.safetensors"), metadata={"format": "dit-cache/router", "threshold": "1.5"})
    with pytest.raises(ValueError, match=r"tau\.safetensors is a damaged router: metadata 'threshold' is 1\.5, a number in \(0, 1\)"):
        CacheRouter.load(tmp_path / "tau.safetensors")


# ---- resampling keeps everything a searched router holds ----------------------------------------------------
SHIPPED_BUDGETS = (0.0, 0.3, 0.55, 0.7, 0.75, 0.8)


def _shipped():
    import dit_cache

    return CacheRouter.load(dit_cache.embedded_router_path())


def test_resampling_the_shipped_router_to_its_own_step_count_is_the_identity():
    router = _shipped()
    same = router.resample(router.num_steps)
    assert same.flops_range == router.flops_range and torch.equal(same.unit_flops, router.unit_flops)
    for budget in SHIPPED_BUDGETS:  # before: every budget refused ("serves one budget"), all skips REUSE
        assert same.plan(flops=budget) == router.plan(flops=budget), budget
    assert same.plan() == router.plan()


@pytest.mark.parametrize("num_steps", [16, 25, 40])
def test_resampling_the_shipped_router_keeps_its_actions_flops_range_and_refined_plans(num_steps):
    from dit_cache.plan import Action
    from dit_cache.router import plan_with_fallbacks

    router = _shipped()
    resampled = router.resample(num_steps)
    source, target = torch.linspace(0, 1, router.num_steps), torch.linspace(0, 1, num_steps)
    rows = (target[:, None] - source[None, :]).abs().argmin(dim=1)  # nearest by position, ties to the earlier row
    assert torch.equal(resampled.cheap_actions, router.cheap_actions[rows])
    assert torch.equal(resampled.unit_flops, router.unit_flops)
    low, high = resampled.flops_range
    assert low == 0.0 and 0.75 < high <= router.flops_range[1]
    plan = resampled.plan(flops=0.55)
    assert plan.uses(Action.FORECAST1) and abs(plan.cached_share(resampled.unit_flops) - 0.55) < 0.05
    assert resampled.refined_plans.shape == (len(router.refined_plans), num_steps, router.num_units)
    mapped = plan_with_fallbacks(router.refined_plans[-1][rows])
    assert resampled.plan(flops=high) == mapped  # the deepest refined plan, mapped, still serves its budget
    assert resampled.metadata["num_steps"] == num_steps and resampled.metadata["resampled_from_steps"] == 20


def test_a_resampled_router_saves_and_loads_with_the_same_plans(tmp_path):
    resampled = _shipped().resample(25)
    resampled.save(tmp_path / "r25.safetensors")
    loaded = CacheRouter.load(tmp_path / "r25.safetensors")
    for budget in SHIPPED_BUDGETS:
        assert loaded.plan(flops=budget) == resampled.plan(flops=budget), budget


def test_resampling_down_drops_a_refined_plan_whose_level_has_no_step_left_and_says_so():
    with pytest.warns(UserWarning, match="Resampling to 10 steps drops the refined plans skipping"):
        resampled = _shipped().resample(10)
    assert resampled.refined_plans is None or len(resampled.refined_plans) < 2


@pytest.mark.parametrize("bad", [0, -3, 2.5, True, "20"])
def test_resample_refuses_a_step_count_that_is_not_a_whole_number(bad):
    with pytest.raises(ValueError, match="resample needs a whole number of steps >= 1"):
        _router().resample(bad)


# ---- learned forecasts merged into a router (refined plans with LINEAR weights) -----------------------------
def _learned(plan: CachePlan) -> CachePlan:
    """``plan`` with every skipped entry that has two computed outputs behind it LINEAR, weights by step."""
    from dit_cache.training.forecast_weights import learnable_entries

    learn = learnable_entries(plan)
    actions = plan.actions.clone()
    actions[learn] = int(Action.LINEAR)
    weights = torch.zeros(*actions.shape, 2)
    steps = torch.arange(plan.num_steps, dtype=torch.float32)[:, None].expand(learn.shape)
    weights[..., 0], weights[..., 1] = 1.2 + 0.01 * steps, -0.2 - 0.01 * steps
    return CachePlan(actions, weights * learn[..., None])


def test_learned_forecasts_replace_the_plan_they_were_fitted_on_and_survive_a_file(tmp_path):
    shipped = CacheRouter.load(dit_cache.embedded_router_path())
    learned = _learned(shipped.plan(skip_flops=0.75))  # a refined plan of the shipped router
    nested = _learned(shipped.plan(skip_flops=0.6))  # a nested one
    merged = shipped.with_learned_forecasts([learned, nested], epochs=3)
    assert merged.plan(skip_flops=0.75) == learned and merged.plan(skip_flops=0.6) == nested
    assert merged.plan(skip_flops=0.75).linear_weights is not None
    assert all(merged.plan(skip_flops=f) == shipped.plan(skip_flops=f) for f in (0.5, 0.55, 0.65, 0.7, 0.8))
    assert merged.metadata["learned_forecasts"][-1] == {"shares": [0.6, 0.75], "epochs": 3}
    merged.save(tmp_path / "learned.safetensors")
    loaded = CacheRouter.load(tmp_path / "learned.safetensors")
    assert all(loaded.plan(skip_flops=f) == merged.plan(skip_flops=f) for f in (0.5, 0.6, 0.7, 0.75, 0.8))
    assert shipped.plan(skip_flops=0.75) != learned  # the original is left as it was


def test_a_learned_plan_that_computes_elsewhere_is_refused_and_resampling_drops_learned_weights():
    shipped = CacheRouter.load(dit_cache.embedded_router_path())
    wrong = _learned(shipped.plan(skip_flops=0.75))
    actions = wrong.actions.clone()
    assert bool((actions[4] == Action.COMPUTE).all()) and not bool((actions[5] == Action.COMPUTE).any())
    actions[4, :], actions[5, :] = int(Action.REUSE), int(Action.COMPUTE)  # the same share, one step later
    moved = CachePlan(actions, wrong.linear_weights * (actions == Action.LINEAR)[..., None])
    with pytest.raises(ValueError, match="does not compute where this router's plan"):
        shipped.with_learned_forecasts([moved])
    merged = shipped.with_learned_forecasts([wrong])
    with pytest.warns(UserWarning, match="hold learned LINEAR weights"):
        resampled = merged.resample(25)
    assert resampled.refined_weights is None or not bool((resampled.refined_plans == Action.LINEAR).any())


def test_a_router_file_with_refined_weights_but_no_refined_plans_is_refused(tmp_path):
    shipped = CacheRouter.load(dit_cache.embedded_router_path())
    merged = shipped.with_learned_forecasts([_learned(shipped.plan(skip_flops=0.75))])
    merged.save(tmp_path / "learned.safetensors")
    tensors = load_file(tmp_path / "learned.safetensors")
    del tensors["refined_plans"]
    with safe_open(tmp_path / "learned.safetensors", "pt") as handle:
        header = handle.metadata()
    save_file(tensors, tmp_path / "broken.safetensors", metadata=header)
    with pytest.raises(ValueError, match="refined_weights"):
        CacheRouter.load(tmp_path / "broken.safetensors")


def test_with_plans_replaces_the_plan_of_a_budget_with_one_computing_elsewhere(tmp_path):
    shipped = CacheRouter.load(dit_cache.embedded_router_path())
    own = shipped.plan(skip_flops=0.75)
    actions = own.actions.clone()
    computed = [step for step in range(1, own.num_steps) if bool((actions[step] == Action.COMPUTE).all())]
    moved_from = computed[-1]
    actions[moved_from], actions[moved_from - 1] = actions[moved_from - 1].clone(), int(Action.COMPUTE)
    moved = CachePlan(actions)  # the same share, its last computed step one earlier
    merged = shipped.with_plans([moved], found_by="a test")
    assert merged.plan(skip_flops=0.75) == moved and moved != own
    assert all(merged.plan(skip_flops=f) == shipped.plan(skip_flops=f) for f in (0.5, 0.6, 0.65, 0.7, 0.8))
    assert merged.metadata["replaced_plans"][-1] == {"shares": [0.75], "found_by": "a test"}
    merged.save(tmp_path / "replaced.safetensors")
    assert CacheRouter.load(tmp_path / "replaced.safetensors").plan(skip_flops=0.75) == moved
    assert shipped.plan(skip_flops=0.75) == own  # the original is left as it was


def test_with_plans_refuses_a_share_that_is_no_budget_level_or_another_shape():
    shipped = CacheRouter.load(dit_cache.embedded_router_path())
    between = shipped.plan(skip_flops=0.75).actions.clone()
    between[1, : between.shape[1] // 2] = int(Action.COMPUTE)  # half a step more: between two levels
    with pytest.raises(ValueError, match="matches none of this router's budget levels"):
        shipped.with_plans([CachePlan(between)])
    with pytest.raises(ValueError, match="cannot replace a plan of this router"):
        shipped.with_plans([CachePlan.full(shipped.num_steps, shipped.num_units + 1)])
