"""torch.compile with the cache: each unit's computation compiled, the cache decisions eager.

Compiled and eager runs agree within TOLERANCE (inductor reorders float32 reductions and fuses ops, so results
are not bitwise equal: observed differences are ~1e-6 on these tiny models); a plan change never recompiles;
removing the cache restores the stock model bitwise; an outer compile of the transformer, before or after the
cache, gives the cached result too. The outer-compile tests use the ``aot_eager`` backend: dynamo's tracing,
guards and recompilations are the same as with inductor, without the C++ build time.
"""

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from dit_cache import CachePlan, apply_cache, cache_units, compile_units, get_cache_handle, remove_cache
from dit_cache.compile import uncompile_units
from dit_cache.testing import run_steps, tiny_pixart, tiny_pixart_pipeline

TOLERANCE = dict(rtol=1e-4, atol=1e-5)
STEPS = 6


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


def _plans(num_units: int) -> dict[str, CachePlan]:
    return {
        # COMPUTE on the whole CFG batch and CFG_SHARE on half of it: both static shapes are compiled here.
        "cfg": CachePlan.cfg_share(STEPS, num_units, 2),
        "taylor": CachePlan.taylor(STEPS, num_units, 2, 1),
        "uniform": CachePlan.uniform(STEPS, num_units, 3),
    }


def _eager(transformer, plan) -> list[torch.Tensor]:
    apply_cache(transformer, plan)
    try:
        return run_steps(transformer, STEPS)
    finally:
        remove_cache(transformer)


def _assert_close(outputs, expected):
    for output, reference in zip(outputs, expected, strict=True):
        torch.testing.assert_close(output, reference, **TOLERANCE)


def _compiled_frames() -> int:
    return counters["frames"]["ok"]


def test_compiled_units_match_eager_and_a_new_plan_never_recompiles():
    transformer = tiny_pixart()
    plans = _plans(len(cache_units(transformer)))
    expected = {name: _eager(transformer, plan) for name, plan in plans.items()}

    handle = apply_cache(transformer, plans["cfg"], compile=True)
    assert handle.compile_options == {"dynamic": False}
    _assert_close(run_steps(transformer, STEPS), expected["cfg"])
    frames = _compiled_frames()
    assert frames >= 3  # self-attention, cross-attention, MLP (shared by the repeated blocks)

    with torch._dynamo.config.patch(error_on_recompile=True):
        for name in ("taylor", "uniform"):
            handle.set_plan(plans[name])
            _assert_close(run_steps(transformer, STEPS), expected[name])
    assert _compiled_frames() == frames
    assert not counters["recompiles"]

    uncompile_units(handle)  # back to the eager units: the eager cached result, bitwise
    assert handle.compile_options is None
    for output, reference in zip(run_steps(transformer, STEPS), expected["uniform"], strict=True):
        assert torch.equal(output, reference)

    assert remove_cache(transformer)
    stock = tiny_pixart()
    for output, reference in zip(run_steps(transformer, 2), run_steps(stock, 2)):
        assert torch.equal(output, reference)  # removal gives back the stock model, bitwise
    assert not any(hasattr(module, "_diffusers_hook") for module in transformer.modules())


@pytest.mark.parametrize("order", ["wrapped before", "in place before", "in place after"])
def test_an_outer_compile_of_the_transformer_works_in_either_order(order):
    transformer = tiny_pixart()
    plans = _plans(len(cache_units(transformer)))
    expected = {name: _eager(transformer, plan) for name, plan in plans.items()}
    if order == "wrapped before":
        model = torch.compile(transformer, backend="aot_eager")
        handle = apply_cache(model, plans["cfg"], compile={"backend": "aot_eager"})
    elif order == "in place before":
        model = transformer
        model.compile(backend="aot_eager")
        handle = apply_cache(model, plans["cfg"])
    else:
        model = transformer
        handle = apply_cache(model, plans["cfg"])
        model.compile(backend="aot_eager")
    _assert_close(run_steps(model, STEPS), expected["cfg"])
    assert handle.stats.cfg_shared > 0  # the cache ran under the outer compile
    with torch._dynamo.config.patch(error_on_recompile=True):
        handle.set_plan(plans["taylor"])
        _assert_close(run_steps(model, STEPS), expected["taylor"])
    assert handle.stats.forecast > 0


def test_accelerate_compile_gives_the_eager_images_and_decelerate_restores_stock():
    import dit_cache

    call = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=2.0, output_type="pt",
                height=16, width=16)
    pipe = tiny_pixart_pipeline()
    stock = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    plan = CachePlan.taylor(STEPS, len(cache_units(pipe.transformer)), 2, 1)
    dit_cache.accelerate(pipe, plan=plan)
    eager = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    dit_cache.decelerate(pipe)

    dit_cache.accelerate(pipe, plan=plan, compile={"backend": "aot_eager"})
    assert get_cache_handle(pipe.transformer).compile_options == {"dynamic": False, "backend": "aot_eager"}
    compiled = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(compiled, eager, **TOLERANCE)
    assert pipe.cache_stats.forecast > 0
    dit_cache.decelerate(pipe)
    assert torch.equal(pipe(**call, generator=torch.Generator().manual_seed(0)).images, stock)


@pytest.mark.parametrize("compile, error", [
    ({"bogus": 1}, "Unknown torch.compile option(s) ['bogus']"),
    ("yes", "compile must be True, False or a dict"),
])
def test_bad_compile_options_are_refused_before_anything_is_installed(compile, error):
    transformer = tiny_pixart()
    plan = CachePlan.uniform(STEPS, len(cache_units(transformer)), 2)
    with pytest.raises(TypeError, match=error.replace("(", r"\(").replace(")", r"\)").replace("[", r"\[")):
        apply_cache(transformer, plan, compile=compile)
    assert get_cache_handle(transformer) is None
    assert not any(hasattr(module, "_diffusers_hook") for module in transformer.modules())


def test_compile_units_needs_a_cache_first():
    with pytest.raises(ValueError, match="call dit_cache.apply_cache"):
        compile_units(tiny_pixart())


def test_compare_schedules_measures_compiled_plans_against_a_compiled_baseline():
    from dit_cache.bench.speed import compare_schedules
    from dit_cache.testing import step_inputs

    transformer = tiny_pixart()
    num_units = len(cache_units(transformer))
    plans = {"compiled full": CachePlan.full(STEPS, num_units),
             "compiled uniform 2": CachePlan.uniform(STEPS, num_units, 2)}
    inputs = step_inputs(transformer)
    with pytest.raises(ValueError, match="baseline must be 'stock' or one of the schedules"):
        compare_schedules(transformer, plans, inputs, rounds=1, baseline="compiled")
    results = compare_schedules(transformer, plans, inputs, rounds=1, compile={"backend": "aot_eager"},
                                baseline="compiled full")
    assert [r.name for r in results] == ["stock", "compiled full", "compiled uniform 2"]
    assert results[1].speedup == 1.0
    assert counters["frames"]["ok"] > 0  # the units were compiled
    assert get_cache_handle(transformer) is None


@pytest.mark.parametrize("order", ["before", "after"])
def test_compile_repeated_blocks_works_before_or_after_the_cache(order):
    from dit_cache.testing import tiny_flux

    transformer = tiny_flux()  # of the supported families, only FLUX declares _repeated_blocks in diffusers
    plan = CachePlan.taylor(STEPS, len(cache_units(transformer)), 2, 1)
    expected = _eager(transformer, plan)
    if order == "before":
        transformer.compile_repeated_blocks(backend="aot_eager")
    handle = apply_cache(transformer, plan)
    if order == "after":
        transformer.compile_repeated_blocks(backend="aot_eager")
    _assert_close(run_steps(transformer, STEPS), expected)
    assert handle.stats.forecast > 0
    assert counters["frames"]["ok"] > 0  # the code between the units was compiled


def test_an_outer_fullgraph_compile_fails_with_the_reason_and_the_fix():
    transformer = tiny_pixart()
    apply_cache(transformer, CachePlan.uniform(STEPS, len(cache_units(transformer)), 2))
    transformer.compile(backend="aot_eager", fullgraph=True)
    with pytest.raises(Exception, match=r"cannot use fullgraph=True: drop it, or compile the units themselves"):
        run_steps(transformer, 1)


def test_a_pipeline_whose_transformer_is_wrapped_by_torch_compile_after_accelerate_still_caches():
    import dit_cache

    call = dict(prompt="a red circle", num_inference_steps=STEPS, guidance_scale=2.0, output_type="pt",
                height=16, width=16)
    pipe = tiny_pixart_pipeline()
    plan = CachePlan.taylor(STEPS, len(cache_units(pipe.transformer)), 2, 1)
    dit_cache.accelerate(pipe, plan=plan)
    eager = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    pipe.transformer = torch.compile(pipe.transformer, backend="aot_eager")
    compiled = pipe(**call, generator=torch.Generator().manual_seed(0)).images
    torch.testing.assert_close(compiled, eager, **TOLERANCE)
    assert pipe.cache_stats.forecast > 0
    assert counters["frames"]["ok"] > 0
