"""CachePlan and the actions beyond plain reuse: FORECAST (Taylor over the timesteps), LINEAR, CFG_SHARE."""

import numpy as np
import pytest
import torch

import dit_cache
from dit_cache import Action, CachePlan, CacheSchedule, apply_cache, cache_units, remove_cache
from dit_cache.forecast import lagrange_weights
from dit_cache.testing import run_steps, step_inputs, tiny_dit, tiny_dit_pipeline, tiny_pixart, tiny_pixart_pipeline

STEPS = 6
C, R, F1, F2, L, H = (int(a) for a in (Action.COMPUTE, Action.REUSE, Action.FORECAST1, Action.FORECAST2,
                                        Action.LINEAR, Action.CFG_SHARE))


class Clock:
    """The timestep of the current transformer call, for fake units whose output is a function of it."""

    def __init__(self, transformer):
        self.t = None
        transformer.register_forward_pre_hook(self._tick, with_kwargs=True)

    def _tick(self, module, args, kwargs):
        self.t = float(kwargs["timestep"].reshape(-1)[0])


class TimeFunctionUnit(torch.nn.Module):
    """A unit whose output is ``value(t)`` everywhere (shaped like its input), plus ``uncond_offset`` on the first
    half of a CFG batch of ``cfg_batch`` rows: a constant unconditional-conditional difference."""

    def __init__(self, clock, value, cfg_batch=None, uncond_offset=0.0):
        super().__init__()
        self.clock, self.value, self.cfg_batch, self.uncond_offset = clock, value, cfg_batch, uncond_offset

    def forward(self, hidden_states, *args, **kwargs):
        out = torch.zeros_like(hidden_states) + self.value(self.clock.t)
        if hidden_states.shape[0] == self.cfg_batch:
            offset = self.uncond_offset
            out[: self.cfg_batch // 2] += offset(self.clock.t) if callable(offset) else offset
        return out


def _plan_with(unit: int, codes: list[int], num_units: int) -> CachePlan:
    actions = torch.full((len(codes), num_units), C, dtype=torch.int8)
    actions[:, unit] = torch.tensor(codes, dtype=torch.int8)
    return CachePlan(actions)


def _fake_ff(transformer, value, **kwargs):
    clock = Clock(transformer)
    transformer.transformer_blocks[0].ff = TimeFunctionUnit(clock, value, **kwargs)
    return [u.path for u in cache_units(transformer)].index("transformer_blocks.0.ff")


@pytest.mark.parametrize("build", [tiny_pixart, tiny_dit], ids=["pixart", "dit"])
def test_a_full_plan_is_bitwise_the_stock_model(build):
    transformer = build()
    stock = run_steps(transformer, STEPS)
    apply_cache(transformer, CachePlan.full(STEPS, len(cache_units(transformer))))
    assert all(torch.equal(a, b) for a, b in zip(stock, run_steps(transformer, STEPS)))
    remove_cache(transformer)
    assert all(torch.equal(a, b) for a, b in zip(stock, run_steps(transformer, STEPS)))


@pytest.mark.parametrize("order, code, value", [
    (1, F1, lambda t: 0.3 + 0.002 * t),
    (2, F2, lambda t: 0.1 - 0.001 * t + 3e-6 * t * t),
])
def test_forecast_is_exact_on_a_unit_polynomial_in_the_timestep(order, code, value):
    transformer = tiny_pixart()
    unit = _fake_ff(transformer, value)
    num_units = len(cache_units(transformer))
    # run_steps uses unevenly spaced timesteps only if the spacing changes: make it uneven on purpose.
    timesteps = [900, 850, 700, 640, 400, 120]
    computes = [C] * (order + 1)
    plan = _plan_with(unit, computes + [code] * (STEPS - order - 1), num_units)

    def run():
        inputs, outputs = step_inputs(transformer), []
        with torch.no_grad():
            for t in timesteps:
                inputs["timestep"] = torch.full_like(inputs["timestep"], t)
                outputs.append(transformer(**inputs).sample)
                inputs["hidden_states"] = inputs["hidden_states"] - 0.1 * outputs[-1][:, :4]
        return outputs

    exact = run()
    apply_cache(transformer, plan)
    forecast = run()
    for a, b in zip(exact, forecast):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # A lower order than the polynomial's is not exact: the test can tell.
    if order == 2:
        remove_cache(transformer)
        apply_cache(transformer, _plan_with(unit, computes + [F1] * (STEPS - 3), num_units))
        assert not torch.allclose(exact[-1], run()[-1], rtol=1e-5, atol=1e-5)


def test_lagrange_weights_reproduce_polynomials_on_uneven_points():
    times, at = [900.0, 760.0, 500.0], 310.0
    for degree in range(3):
        values = [t ** degree for t in times]
        assert sum(w * v for w, v in zip(lagrange_weights(times, at), values)) == pytest.approx(at ** degree)
    with pytest.raises(ValueError, match="repeated timesteps"):
        lagrange_weights([3.0, 3.0], 1.0)


def test_linear_with_known_weights_combines_the_newest_outputs():
    transformer = tiny_pixart()
    num_units = len(cache_units(transformer))
    actions = torch.full((4, num_units), C, dtype=torch.int8)
    actions[3, 2] = L
    weights = torch.zeros(4, num_units, 2)
    weights[3, 2] = torch.tensor([0.7, -0.25])  # newest, then the one before
    apply_cache(transformer, CachePlan(actions, weights))
    seen = []
    module = transformer.get_submodule(cache_units(transformer)[2].path)
    module.register_forward_hook(lambda m, a, out: seen.append(out.clone()))
    run_steps(transformer, 4)
    torch.testing.assert_close(seen[3], 0.7 * seen[2] - 0.25 * seen[1])


def test_least_squares_recovers_the_weights_of_synthetic_trajectories():
    pipe = tiny_pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    # Output u * g(t) + v * h(t): two independent directions, so the weights over two sources are unique.
    clock = Clock(pipe.transformer)
    u, v = torch.linspace(-1, 1, 16), torch.cos(torch.arange(16.0))
    pipe.transformer.transformer_blocks[0].ff = _Directions(clock, u, v)
    num_units = len(cache_units(pipe.transformer))
    unit = [x.path for x in cache_units(pipe.transformer)].index("transformer_blocks.0.ff")
    actions = torch.full((STEPS, num_units), C, dtype=torch.int8)
    actions[3, unit] = actions[4, unit] = L
    plan = CachePlan(actions, torch.zeros(STEPS, num_units, 2))
    fitted = dit_cache.fit_linear_forecaster(pipe, plan, ["a red circle", "a blue square"], progress=False)
    pipe.scheduler.set_timesteps(STEPS)
    times = [float(t) for t in pipe.scheduler.timesteps]
    for step in (3, 4):
        sources = [2, 1]  # the unit computes at 0, 1, 2 and 5: steps 3 and 4 combine 2 (newest) and 1
        basis = torch.tensor([[_Directions.g(times[s]) for s in sources], [_Directions.h(times[s]) for s in sources]],
                             dtype=torch.float64)
        target = torch.tensor([_Directions.g(times[step]), _Directions.h(times[step])], dtype=torch.float64)
        expected = torch.linalg.solve(basis, target).float()
        torch.testing.assert_close(fitted.linear_weights[step, unit], expected, rtol=1e-3, atol=1e-3)
    assert fitted.linear_weights[:3].abs().sum() == 0  # only LINEAR entries get weights


def test_a_decelerated_pipeline_fits_like_a_stock_one():
    pipe = tiny_dit_pipeline()  # DiTPipeline.__call__ takes no stray keywords: a leftover cache=False would fail
    pipe.set_progress_bar_config(disable=True)
    units = len(cache_units(pipe.transformer))
    plan = CachePlan.linear(STEPS, units, interval=3)
    stock = dit_cache.fit_linear_forecaster(pipe, plan, [1], progress=False)
    dit_cache.decelerate(dit_cache.accelerate(pipe, plan=plan))  # leaves _dit_cache_plan = None behind
    assert torch.equal(dit_cache.fit_linear_forecaster(pipe, plan, [1], progress=False).linear_weights,
                       stock.linear_weights)


class _Directions(torch.nn.Module):
    def __init__(self, clock, u, v):
        super().__init__()
        self.clock, self.u, self.v = clock, u, v

    @staticmethod
    def g(t):
        return 1.0 + t / 1000

    @staticmethod
    def h(t):
        return (t / 1000) ** 3

    def forward(self, hidden_states, *args, **kwargs):
        t = self.clock.t
        return torch.zeros_like(hidden_states) + self.u * self.g(t) + self.v * self.h(t)


def test_cfg_share_equals_compute_when_the_cfg_difference_is_constant():
    transformer = tiny_pixart()
    unit = _fake_ff(transformer, lambda t: 0.001 * t, cfg_batch=2, uncond_offset=0.5)
    num_units = len(cache_units(transformer))
    exact = run_steps(transformer, STEPS, batch=2)
    apply_cache(transformer, _plan_with(unit, [C, H, H, C, H, H], num_units))
    shared = run_steps(transformer, STEPS, batch=2)
    for a, b in zip(exact, shared):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    # A difference that changes with the timestep is not reproduced: the test can tell.
    remove_cache(transformer)
    transformer.transformer_blocks[0].ff.uncond_offset = lambda t: 0.002 * t
    exact = run_steps(transformer, STEPS, batch=2)
    apply_cache(transformer, _plan_with(unit, [C, H, H, C, H, H], num_units))
    assert not torch.allclose(exact[-1], run_steps(transformer, STEPS, batch=2)[-1], rtol=1e-5, atol=1e-5)


def test_cfg_share_on_a_real_unit_computes_half_the_batch():
    transformer = tiny_pixart()
    num_units = len(cache_units(transformer))
    apply_cache(transformer, _plan_with(0, [C, H, H, C], num_units))
    batches = []
    # Count inside the unit: the unit's own pre-hooks see the whole batch before the cache hook slices it.
    transformer.get_submodule(cache_units(transformer)[0].path).to_q.register_forward_pre_hook(
        lambda m, args: batches.append(args[0].shape[0]))
    outputs = run_steps(transformer, 4, batch=4)
    assert batches == [4, 2, 2, 4] and all(o.shape[0] == 4 and torch.isfinite(o).all() for o in outputs)


@pytest.mark.parametrize("actions, weights, message", [
    (torch.ones(3, dtype=torch.int8), None, "2-D"),
    (torch.full((3, 4), 9, dtype=torch.int8), None, "Unknown action code"),
    (torch.tensor([[C, C], [R, C], [F1, C]], dtype=torch.int8), None, "FORECAST1 needs 2 computed outputs"),
    (torch.tensor([[C, C], [C, C], [F2, C]], dtype=torch.int8), None, "FORECAST2 needs 3"),
    (torch.tensor([[C, C], [L, C]], dtype=torch.int8), None, "no linear_weights"),
    (torch.tensor([[C, C], [L, C]], dtype=torch.int8), torch.zeros(2, 2, 2), "LINEAR needs 2"),
    (torch.tensor([[C, C], [L, C]], dtype=torch.int8), torch.zeros(2, 3, 1), r"\[num_steps, num_units, K\]"),
    (torch.tensor([[C, C], [C, L]], dtype=torch.int8), torch.full((2, 2, 1), float("nan")), "NaN"),
    (torch.tensor([[C, R], [C, C]], dtype=torch.int8), None, "first step must COMPUTE"),
])
def test_a_bad_plan_is_refused_when_built(actions, weights, message):
    with pytest.raises(ValueError, match=message):
        CachePlan(actions, weights)


def test_a_boolean_mask_is_not_mistaken_for_codes():
    with pytest.raises(TypeError, match="CacheSchedule"):
        CachePlan(torch.ones(3, 4, dtype=torch.bool))


def test_cfg_share_without_cfg_is_refused_before_generating():
    pipe = tiny_pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    num_units = len(cache_units(pipe.transformer))
    dit_cache.accelerate(pipe, plan=CachePlan.cfg_share(STEPS, num_units, interval=2))
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *a: calls.append(1))
    with pytest.raises(ValueError, match="CFG_SHARE, which needs a classifier-free-guidance batch"):
        pipe("a red circle", num_inference_steps=STEPS, guidance_scale=1.0, output_type="np")
    assert calls == []
    # At the engine level an odd batch is refused at the first CFG_SHARE step.
    transformer = tiny_pixart()
    apply_cache(transformer, CachePlan.cfg_share(STEPS, num_units, interval=2))
    with pytest.raises(ValueError, match="CFG_SHARE needs a classifier-free-guidance batch"):
        run_steps(transformer, 2, batch=1)


def test_cfg_share_handles_several_prompts_and_images_per_prompt():
    pipe = tiny_pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    num_units = len(cache_units(pipe.transformer))
    dit_cache.accelerate(pipe, plan=CachePlan.cfg_share(STEPS, num_units, interval=2))
    call = dict(num_inference_steps=STEPS, guidance_scale=3.0, output_type="np")
    prompts = ["a red circle", "a blue square"]
    generators = [torch.Generator().manual_seed(s) for s in range(4)]
    batch = pipe(prompts, num_images_per_prompt=2, generator=generators, **call).images
    assert batch.shape[0] == 4 and pipe.cache_stats.cfg_shared > 0
    single = pipe(prompts[1], generator=torch.Generator().manual_seed(3), **call).images
    np.testing.assert_allclose(batch[3], single[0], atol=2e-3)


def test_stats_count_each_action_and_cache_bytes_include_the_history():
    transformer = tiny_pixart()
    num_units = len(cache_units(transformer))
    plan = CachePlan.taylor(STEPS, num_units, interval=2, order=2)
    handle = apply_cache(transformer, plan)
    run_steps(transformer, STEPS, batch=2)
    stats = handle.stats
    counts = plan.counts()
    assert stats.computed == counts["COMPUTE"] and stats.forecast == counts["FORECAST2"] > 0
    assert stats.cache_ratio == pytest.approx(plan.cache_ratio)
    one_output = 2 * (transformer.config.sample_size // 2) ** 2 * 16 * 4
    # The history (3 outputs per unit), and the step fold's three sums for each of the 3 steps its FORECAST2 step
    # read (PixArt folds that step: dit_cache/fold.py; the sums go with the next fold or generation).
    assert plan.history_depth == [3] * num_units and sorted(handle.state.fold_sums) == [0, 1, 2]
    assert handle.cache_bytes == (3 * num_units + 3 * 3) * one_output


def test_a_schedule_is_a_plan_with_compute_and_reuse_only(tmp_path):
    schedule = CacheSchedule.uniform(STEPS, 6, interval=2)
    plan = CachePlan.from_schedule(schedule)
    assert plan.counts()["COMPUTE"] + plan.counts()["REUSE"] == STEPS * 6
    assert plan.cache_ratio == pytest.approx(schedule.cache_ratio)
    flops = torch.arange(1.0, 7.0)
    assert plan.theoretical_speedup(flops, 40.0) == pytest.approx(schedule.theoretical_speedup(flops, 40.0))
    schedule.save(tmp_path / "schedule.safetensors")
    assert CachePlan.load(tmp_path / "schedule.safetensors") == plan
    # A boolean schedule and its plan give the same images.
    a, b = tiny_pixart(), tiny_pixart()
    apply_cache(a, schedule)
    apply_cache(b, plan)
    assert all(torch.equal(x, y) for x, y in zip(run_steps(a, STEPS), run_steps(b, STEPS)))


def test_plans_round_trip_through_safetensors_with_their_weights(tmp_path):
    plan = CachePlan.linear(STEPS, 6, interval=3, order=2)
    plan.save(tmp_path / "plan.safetensors")
    loaded = CachePlan.load(tmp_path / "plan.safetensors")
    assert loaded == plan and loaded.linear_weights is not None
    (tmp_path / "bad.safetensors").write_text("not a plan")
    with pytest.raises(ValueError, match="not a dit-cache plan"):
        CachePlan.load(tmp_path / "bad.safetensors")


def test_costs_and_theoretical_speedup_know_each_action():
    plan = CachePlan(torch.tensor([[C, C], [H, C], [C, F1], [R, F1]], dtype=torch.int8))
    assert plan.cache_ratio == pytest.approx((0.5 + 1 + 1 + 1) / 8)
    assert plan.theoretical_speedup(torch.tensor([1.0, 1.0]), 2.0) == pytest.approx(8 / (8 - 3.5))


@pytest.mark.parametrize("spec, message", [("taylr:3", "Unknown plan preset"), ("taylor:x", "positive integers"),
                                            ("taylor:3:3", "order must be 1 or 2"), ("uniform:0", "interval")])
def test_preset_strings_parse_or_name_the_syntax(spec, message):
    with pytest.raises(ValueError, match=message):
        CachePlan.parse(spec, STEPS, 6)
    assert CachePlan.parse("taylor:3:1", STEPS, 6) == CachePlan.taylor(STEPS, 6, interval=3, order=1)


def test_extrapolate_equals_the_weighted_sum_for_tensors_and_tuples():
    from dit_cache.forecast import extrapolate, weighted_sum

    generator = torch.Generator().manual_seed(0)
    for points in (2, 3):
        weights = lagrange_weights([900.0, 700.0, 450.0][:points], 300.0)
        outputs = [(torch.randn(2, 5, generator=generator), None, torch.randn(3, generator=generator))
                   for _ in range(points)]
        fast, plain = extrapolate(weights, outputs), weighted_sum(weights, outputs)
        assert fast[1] is None
        for a, b in zip((fast[0], fast[2]), (plain[0], plain[2])):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_plan_for_another_shape_is_refused_naming_the_plan_and_the_fix():
    plan = CachePlan.uniform(4, 3, 2)
    with pytest.raises(ValueError, match=r"The plan has 3 units per step but the transformer has 5 .* num_units="):
        plan.check_compatible(num_units=5)
    with pytest.raises(ValueError, match=r"The plan has 4 steps but 6 .* num_inference_steps=4, or build a plan"):
        plan.check_compatible(num_steps=6)
    plan.check_compatible(num_steps=4, num_units=3)
