"""The contract every model family of the registry passes on its tiny random model and pipeline.

Parametrised over ``dit_cache.families.FAMILIES`` (as diffusers applies its ``CacheTesterMixin`` per model): a new
record is checked by every test here without a line of test code of its own.
"""

import re

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dit_cache
from dit_cache import CachePlan, CacheRouter, CacheSchedule, apply_cache, cache_units, remove_cache
from dit_cache.families import FAMILIES, CFGLayout, family_of
from dit_cache.pipelines import decelerate
from dit_cache.step_invariant import STEP_INVARIANT_HOOK
from dit_cache.testing import TINY_FAMILIES, run_steps
from dit_cache.units import unit_layout

STEPS = 4
NAMES = FAMILIES.names()
WITH_PIPELINE = [name for name in NAMES if TINY_FAMILIES[name].pipeline is not None]
BATCHED_CFG = [name for name in WITH_PIPELINE if FAMILIES.named(name).cfg.conditional_half is not None]


def test_every_family_has_a_tiny_model_and_every_pipeline_a_tiny_pipeline():
    assert set(TINY_FAMILIES) == set(NAMES)
    for family in FAMILIES:
        transformer = TINY_FAMILIES[family.name].model()
        assert FAMILIES.of_transformer(transformer) is family
        assert (TINY_FAMILIES[family.name].pipeline is None) == (not family.pipelines), family.name


def _unit_flops_of_run(transformer, num_steps):
    """FLOPs each unit really spent over a run (counted, not declared): a skipped unit runs nothing."""
    with FlopCounterMode(display=False, depth=None) as counter:
        outputs = run_steps(transformer, num_steps)
    by_module = counter.get_flop_counts()
    prefix = type(transformer).__name__
    return outputs, [sum(by_module.get(f"{prefix}.{unit.path}", {}).values()) for unit in cache_units(transformer)]


def _is_stock(module: torch.nn.Module) -> bool:
    """No hook left and no instance-level forward. (A pipeline that calls transformer.cache_context leaves an
    empty hook registry on the transformer, as the stock pipeline does itself.)"""
    return not any(getattr(getattr(m, "_diffusers_hook", None), "hooks", None) or "forward" in m.__dict__
                   for m in module.modules())


@pytest.mark.parametrize("name", NAMES)
def test_full_plan_is_bitwise_stock_uniform_skips_the_units_and_removal_restores(name):
    transformer = TINY_FAMILIES[name].model()
    num_units = len(cache_units(transformer))
    stock, stock_flops = _unit_flops_of_run(transformer, STEPS)
    assert num_units > 0 and all(f > 0 for f in stock_flops)

    apply_cache(transformer, CachePlan.full(STEPS, num_units))
    assert all(torch.equal(a, b) for a, b in zip(stock, run_steps(transformer, STEPS)))
    remove_cache(transformer)

    schedule = CacheSchedule.uniform(STEPS, num_units, interval=2)
    handle = apply_cache(transformer, schedule)
    _, reused_flops = _unit_flops_of_run(transformer, STEPS)  # with the step-invariant work done once
    handle._unregister(STEP_INVARIANT_HOOK)  # the plan's skipping alone
    cached, cached_flops = _unit_flops_of_run(transformer, STEPS)
    assert [c * STEPS for c in cached_flops] == [s * STEPS // 2 for s in stock_flops]  # each unit: 2 of 4 steps
    assert torch.equal(stock[0], cached[0]) and not torch.equal(stock[-1], cached[-1])
    saves = bool(family_of(transformer).step_invariant)  # its cross-attention keys and values once, not per step
    assert all(r <= c for r, c in zip(reused_flops, cached_flops)) and (sum(reused_flops) < sum(cached_flops)) == saves

    assert remove_cache(transformer) and _is_stock(transformer)
    assert all(torch.equal(a, b) for a, b in zip(stock, run_steps(transformer, STEPS)))


@pytest.mark.parametrize("name", NAMES)
def test_reuse_returns_exactly_what_compute_stored(name):
    """No block modifies a branch output in place after it is returned (a cached tensor would change), and the
    cache holds the very tensors the branches returned."""
    transformer = TINY_FAMILIES[name].model()
    units = cache_units(transformer)
    handle = apply_cache(transformer, CacheSchedule.uniform(2, len(units), interval=2))
    returned = {unit.index: [] for unit in units}

    def record(index):
        def hook(module, args, output):
            elements = output if isinstance(output, tuple) else (output,)
            returned[index].append((elements, [t.clone() for t in elements]))
        return hook

    handles = [transformer.get_submodule(u.path).register_forward_hook(record(u.index)) for u in units]
    run_steps(transformer, 2)  # the second step reuses every unit (replayed blocks never call them)
    for hook in handles:
        hook.remove()
    for unit in units:
        (computed, values), = returned[unit.index][:1]
        stored = handle.state.newest(unit.index)
        stored = stored if isinstance(stored, tuple) else (stored,)
        assert len(computed) == unit.outputs, unit.path
        assert all(a is b for a, b in zip(computed, stored)), unit.path
        assert all(torch.equal(t, v) for t, v in zip(stored, values)), unit.path


@pytest.mark.parametrize("name", NAMES)
def test_a_plan_or_router_for_another_model_is_refused_with_the_fix_and_nothing_installed(name):
    transformer = TINY_FAMILIES[name].model()
    num_units = len(cache_units(transformer))
    with pytest.raises(ValueError, match=r"num_units=len\(dit_cache.cache_units\(transformer\)\)"):
        apply_cache(transformer, CacheSchedule.full(STEPS, num_units + 1))
    assert _is_stock(transformer)
    other = TINY_FAMILIES["pixart" if name != "pixart" else "dit"].model()
    router = CacheRouter(STEPS, len(cache_units(other)), metadata={"unit_layout": unit_layout(other)})
    with pytest.raises(ValueError, match=f"trained for {type(other).__name__}.*Train a router for this model"):
        router.check_compatible(unit_layout(transformer))


def _pipeline(name):
    pipe = TINY_FAMILIES[name].pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(pipe, name, prompt="a red circle and a blue square"):
    if FAMILIES.named(name).bench_inputs == "class_labels":
        return {"class_labels": [0 if "red" in prompt else 1]}
    return {"prompt": prompt}


def _calls_per_step(name) -> int:
    """Transformer calls per step of the CFG call: two with true CFG (a negative prompt, FLUX / Qwen-Image)."""
    return 2 if "negative_prompt" in TINY_FAMILIES[name].cfg_call else FAMILIES.named(name).cfg.calls_per_step


def _generate(pipe, name, steps=STEPS, prompt="a red circle and a blue square", cfg=True, **kwargs):
    tiny = TINY_FAMILIES[name]
    # Later settings win: a test may override the family's call (Lumina2's guidance_scale=1.0).
    call = {**tiny.call, **(tiny.cfg_call if cfg else {}), **kwargs}
    output = pipe(**_inputs(pipe, name, prompt), num_inference_steps=steps, output_type="pt",
                  generator=torch.Generator().manual_seed(0), **call)
    return output.frames if hasattr(output, "frames") else output.images  # video pipelines return frames


@pytest.mark.parametrize("name", WITH_PIPELINE)
def test_the_accelerated_pipeline_is_stock_with_a_full_plan_skips_with_uniform_and_decelerate_restores(name):
    pipe = _pipeline(name)
    stock = _generate(pipe, name)
    num_units = len(cache_units(pipe.transformer))
    calls = _calls_per_step(name)  # two calls per step (cond, uncond) each count their units

    stock_class = type(pipe)
    dit_cache.accelerate(pipe, schedule=CacheSchedule.full(STEPS, num_units))
    assert type(pipe).__name__ == f"Accelerated{stock_class.__name__}"
    assert torch.equal(_generate(pipe, name), stock)
    assert pipe.cache_stats.steps == STEPS and pipe.cache_stats.computed == calls * STEPS * num_units
    decelerate(pipe)

    dit_cache.accelerate(pipe, schedule=CacheSchedule.uniform(STEPS, num_units, interval=2))
    assert not torch.equal(_generate(pipe, name), stock)
    assert pipe.cache_stats.steps == STEPS and pipe.cache_stats.reused == calls * (STEPS // 2) * num_units
    with pytest.raises(ValueError, match=f"num_inference_steps={STEPS}"):
        _generate(pipe, name, steps=STEPS + 1)
    assert torch.equal(_generate(pipe, name, cache=False), stock)
    decelerate(pipe)
    assert torch.equal(_generate(pipe, name), stock) and _is_stock(pipe.transformer)

    fast = type(dit_cache.accelerate(_pipeline(name), schedule=CacheSchedule.full(STEPS, num_units))).from_pipe(
        pipe, schedule=CacheSchedule.full(STEPS, num_units))
    assert torch.equal(_generate(fast, name), stock) and torch.equal(_generate(pipe, name), stock)


def _plan(spec, steps, num_units):
    if spec == "linear":  # not a CLI preset (its weights are fitted); unfitted it reuses with weight 1
        return CachePlan.linear(steps, num_units, interval=2, order=2)
    return CachePlan.parse(spec, steps, num_units)


@pytest.mark.parametrize("spec", ["taylor:2:1", "taylor:3:2", "linear", "cfg:2"])
@pytest.mark.parametrize("name", WITH_PIPELINE)
def test_every_action_runs_or_is_refused_with_the_reason(name, spec):
    family = FAMILIES.named(name)
    steps = 6
    pipe = _pipeline(name)
    stock = _generate(pipe, name, steps=steps)
    dit_cache.accelerate(pipe, plan=_plan(spec, steps, len(cache_units(pipe.transformer))))
    if spec.startswith("cfg") and family.cfg.conditional_half is None:
        with pytest.raises(ValueError, match="CFG_SHARE, which needs a classifier-free-guidance batch"):
            _generate(pipe, name, steps=steps)
        return
    cached = _generate(pipe, name, steps=steps)
    assert torch.isfinite(cached).all() and not torch.equal(cached, stock)
    decelerate(pipe)
    assert torch.equal(_generate(pipe, name, steps=steps), stock)


def _last_unit_outputs(pipe, name, **kwargs):
    """The last unit's output at every call of a generation (its image stream for joint attention); the last
    unit, since the first may not see the prompt yet (PixArt's first self-attention)."""
    module = pipe.transformer.get_submodule(cache_units(pipe.transformer)[-1].path)
    outputs = []
    handle = module.register_forward_hook(
        lambda m, args, output: outputs.append((output[0] if isinstance(output, tuple) else output).clone()))
    try:
        _generate(pipe, name, steps=3, **kwargs)
    finally:
        handle.remove()
    return outputs


@pytest.mark.parametrize("name", BATCHED_CFG)
def test_cfg_share_computes_the_conditional_half_of_the_batch(name):
    """Which half is conditional is found from the pipeline itself, not from the record: the half of the batch
    whose output changes with the prompt. At the first CFG_SHARE step (every unit shares, so the last unit's
    input is still the stock one up to float rounding) the unit runs on one half only; those rows must be the
    stock run's rows of that conditional half."""
    pipe = _pipeline(name)
    one, other = _last_unit_outputs(pipe, name), _last_unit_outputs(pipe, name, prompt="a green triangle")
    half = one[0].shape[0] // 2
    changed = [not torch.equal(one[0][i * half:(i + 1) * half], other[0][i * half:(i + 1) * half]) for i in (0, 1)]
    assert changed.count(True) == 1, "exactly one half of the CFG batch depends on the prompt"
    conditional = changed.index(True)

    num_units = len(cache_units(pipe.transformer))
    compute, share = int(dit_cache.Action.COMPUTE), int(dit_cache.Action.CFG_SHARE)
    plan = CachePlan(torch.tensor([[compute] * num_units, [share] * num_units, [compute] * num_units]))
    dit_cache.accelerate(pipe, plan=plan)
    shared = _last_unit_outputs(pipe, name)[1]  # step 1: the computed half, and the other rebuilt beside it
    rows = [slice(0, half), slice(half, None)]
    computed, rebuilt = shared[rows[conditional]], shared[rows[1 - conditional]]
    assert torch.allclose(computed, one[1][rows[conditional]], atol=1e-5)
    assert not torch.allclose(rebuilt, one[1][rows[1 - conditional]], atol=1e-5)  # an estimate, not the stock rows


def _turns_on(option, value) -> bool:
    try:
        return bool(option.is_on({option.keyword: value}))
    except (TypeError, ValueError):  # not a value this option takes
        return False


@pytest.mark.parametrize("name", [n for n in WITH_PIPELINE if FAMILIES.named(n).second_calls])
def test_options_that_add_an_unnamed_call_per_step_are_refused_while_cached(name):
    pipe = _pipeline(name)
    dit_cache.accelerate(pipe, schedule=CacheSchedule.full(2, len(cache_units(pipe.transformer))))
    for option in FAMILIES.named(name).second_calls:
        value = next(v for v in ([0], 2.0, 0.5) if _turns_on(option, v))  # a value that turns it on
        with pytest.raises(ValueError, match=f"{option.keyword}=.*{re.escape(option.effect[:30])}.*cache=False"):
            _generate(pipe, name, steps=2, **{option.keyword: value})


@pytest.mark.parametrize("name", [n for n in WITH_PIPELINE if FAMILIES.named(n).concepts_refusal])
def test_concepts_are_refused_with_the_reason_where_the_family_cannot_take_them(name):
    pipe = dit_cache.accelerate(_pipeline(name), schedule=CacheSchedule.full(2, len(cache_units(
        _pipeline(name).transformer))))
    reason = FAMILIES.named(name).concepts_refusal[:30]
    with pytest.raises(TypeError, match=f"concepts= is not supported.*{reason[:20]}"):
        _generate(pipe, name, steps=2, concepts=["circle", "square"])


@pytest.mark.parametrize("name", [n for n in WITH_PIPELINE if FAMILIES.named(n).supports_training])
def test_a_router_trains_a_few_steps_exports_and_drives_the_pipeline(name, tmp_path, train_router):
    router = train_router(_pipeline(name), tmp_path, latent_size=8 if FAMILIES.named(name).latent_layout
                          == "packed" else None)
    pipe = _pipeline(name)
    dit_cache.accelerate(pipe, router=router, threshold=0.5)
    assert router.metadata["unit_layout"] == unit_layout(pipe.transformer)
    _generate(pipe, name, steps=3)
    calls = _calls_per_step(name)
    assert pipe.cache_stats.steps == 3
    assert pipe.cache_stats.computed == calls * router.plan(0.5).counts()["COMPUTE"]


@pytest.mark.parametrize("name", [n for n in NAMES if not FAMILIES.named(n).supports_training])
def test_router_training_refuses_a_family_it_cannot_reproduce_naming_the_supported_ones(name):
    from dit_cache.training.denoising import denoising_family

    with pytest.raises(TypeError, match="Router training does not support .*supported: "):
        denoising_family(TINY_FAMILIES[name].model())


def test_cfg_layouts_state_what_cfg_share_computes():
    assert CFGLayout.UNCONDITIONAL_FIRST.conditional_half == 1 and CFGLayout.CONDITIONAL_FIRST.conditional_half == 0
    assert CFGLayout.SEPARATE_CALLS.conditional_half is None and CFGLayout.SEPARATE_CALLS.calls_per_step == 2
    with pytest.raises(TypeError, match="does not support Linear.*Supported transformers.*registry.py"):
        FAMILIES.of_transformer(torch.nn.Linear(2, 2))
