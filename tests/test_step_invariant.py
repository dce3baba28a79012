"""Step-invariant work (dit_cache.step_invariant): the caption projection and cross-attention keys / values are
computed once per generation, bitwise as if recomputed, and recomputed whenever their input may have changed."""

import pytest
import torch

import dit_cache
from dit_cache import CachePlan, apply_cache, cache_units, remove_cache
from dit_cache.step_invariant import STEP_INVARIANT_HOOK
from dit_cache.units import modules_matching
from dit_cache.testing import run_steps, step_inputs, tiny_pixart, tiny_sana, tiny_wan

STEPS = 6


class _Computations:
    """Counts the computations of the step-invariant modules (their hooks' original forwards) while open."""

    def __init__(self, handle):
        self.calls = 0
        self._hooks = [module._diffusers_hook.get_hook(STEP_INVARIANT_HOOK)
                       for module, name, _ in handle._hooked if name == STEP_INVARIANT_HOOK]

    def __enter__(self):
        for hook in self._hooks:
            original = hook.fn_ref.original_forward

            def counted(*args, _original=original, **kwargs):
                self.calls += 1
                return _original(*args, **kwargs)

            hook.fn_ref.original_forward, hook._uncounted = counted, original
        return self

    def __exit__(self, *exc):
        for hook in self._hooks:
            hook.fn_ref.original_forward = hook._uncounted


@pytest.mark.parametrize("build,expected", [(tiny_pixart, 5), (tiny_sana, 6), (tiny_wan, 5)])
def test_computed_once_per_generation_and_bitwise_the_recomputed_model(build, expected):
    transformer = build()
    units = len(cache_units(transformer))
    plan = CachePlan.uniform(STEPS, units, 2)
    handle = apply_cache(transformer, plan)
    handle._unregister(STEP_INVARIANT_HOOK)  # the same plan recomputing everything
    recomputed = run_steps(transformer, STEPS, seed=3)
    remove_cache(transformer)

    handle = apply_cache(transformer, plan)
    hooked = [m for m, name, _ in handle._hooked if name == STEP_INVARIANT_HOOK]
    assert len(hooked) == expected  # caption projection / Wan's text embedder (+ Sana's caption norm) and 2 blocks' to_k, to_v
    with _Computations(handle) as counts:
        kept = run_steps(transformer, STEPS, seed=3)
        assert counts.calls == expected  # once each in the whole generation, not once per step
        run_steps(transformer, STEPS, seed=3)  # a new generation (new inputs) computes them again
        assert counts.calls == 2 * expected
    assert all(torch.equal(a, b) for a, b in zip(kept, recomputed))
    remove_cache(transformer)
    assert all("_diffusers_hook" not in m.__dict__ and "forward" not in m.__dict__ for m in hooked)


def _steps_with(transformer, inputs, change=None):
    outputs = []
    with torch.no_grad():
        for step in range(STEPS):
            if change is not None:
                change(step, inputs)
            inputs["timestep"] = torch.full((inputs["hidden_states"].shape[0],), 900 - 100 * step, dtype=torch.long)
            outputs.append(transformer(**inputs, return_dict=False)[0])
    return outputs


@pytest.mark.parametrize("change", ["in_place", "new_tensor", "same_values_new_tensor"])
def test_an_input_that_may_have_changed_is_recomputed(change):
    transformer = tiny_pixart()
    inputs = step_inputs(transformer, seed=1)

    def changed(step, given):
        if step == 3:
            if change == "in_place":
                given["encoder_hidden_states"].mul_(0.5)
            elif change == "new_tensor":
                given["encoder_hidden_states"] = given["encoder_hidden_states"] * 0.5
            else:
                given["encoder_hidden_states"] = given["encoder_hidden_states"].clone()

    plan = CachePlan.full(STEPS, len(cache_units(transformer)))
    stock = _steps_with(transformer, {k: (v.clone() if torch.is_tensor(v) else v) for k, v in inputs.items()},
                        changed)
    handle = apply_cache(transformer, plan)
    with _Computations(handle) as counts:
        cached = _steps_with(transformer, {k: (v.clone() if torch.is_tensor(v) else v) for k, v in inputs.items()},
                             changed)
    assert all(torch.equal(a, b) for a, b in zip(cached, stock))
    assert counts.calls == 2 * 5  # computed at step 0 and again at step 3
    remove_cache(transformer)


def _cached_first_key_projection():
    """A tiny PixArt under a full plan, its first block's cross-attention key projection and an input for it."""
    transformer = tiny_pixart()
    handle = apply_cache(transformer, CachePlan.full(STEPS, len(cache_units(transformer))))
    to_k = transformer.transformer_blocks[0].attn2.to_k
    return transformer, handle, to_k, torch.randn(2, 4, to_k.in_features)


def test_a_kept_output_written_in_place_is_recomputed():
    transformer, handle, to_k, x = _cached_first_key_projection()
    hook = to_k._diffusers_hook.get_hook(STEP_INVARIANT_HOOK)
    with handle.generation() as states:
        states.current().begin_step(torch.tensor(900))
        assert to_k(x) is not to_k(x)  # an output with a graph (weights that train) is never kept
    with handle.generation() as states, torch.no_grad():
        states.current().begin_step(torch.tensor(900))
        first = to_k(x)
        assert to_k(x) is first  # kept
        first.add_(1.0)  # someone writes the kept output
        again = to_k(x)
        assert again is not first and torch.equal(again, hook.fn_ref.original_forward(x))
    remove_cache(transformer)


def test_bypassed_inference_mode_and_outside_a_generation_compute_every_time():
    transformer, handle, to_k, x = _cached_first_key_projection()
    handle.idle_bypassed()  # outside a generation: the stock model
    with _Computations(handle) as counts:
        to_k(x), to_k(x)
        assert counts.calls == 2
        with handle.generation():
            with torch.inference_mode():
                y = torch.randn(2, 4, to_k.in_features)
                to_k(y), to_k(y)  # no version counter: cannot tell a write, so computes
            assert counts.calls == 4
            with torch.no_grad():
                to_k(x), to_k(x)
            assert counts.calls == 5
    remove_cache(transformer)


def test_the_engine_level_cache_keeps_them_and_bypassed_computes():
    transformer, handle, to_k, x = _cached_first_key_projection()
    with _Computations(handle) as counts, torch.no_grad():
        with handle.bypassed():
            to_k(x), to_k(x)
        assert counts.calls == 2
        to_k(x), to_k(x)
        assert counts.calls == 3
    remove_cache(transformer)


def test_compiled_units_drop_the_hooks_and_uncompiling_restores_them():
    from dit_cache.compile import uncompile_units

    transformer = tiny_pixart()
    handle = apply_cache(transformer, CachePlan.full(STEPS, len(cache_units(transformer))))
    dit_cache.compile_units(handle)
    assert not [m for m, name, _ in handle._hooked if name == STEP_INVARIANT_HOOK]
    assert "_diffusers_hook" not in transformer.caption_projection.__dict__
    uncompile_units(handle)
    assert len([m for m, name, _ in handle._hooked if name == STEP_INVARIANT_HOOK]) == 5
    remove_cache(transformer)
    assert "_diffusers_hook" not in transformer.caption_projection.__dict__


def test_patterns_match_module_names():
    transformer = tiny_pixart(num_layers=3)
    found = modules_matching(transformer, ("transformer_blocks.*.attn2.to_k",))
    assert found == [block.attn2.to_k for block in transformer.transformer_blocks]
    assert modules_matching(transformer, ("no_such_module",)) == []


def test_two_calls_per_step_keep_one_each_and_the_pipeline_stays_bitwise_stock():
    from dit_cache.testing import tiny_wan_pipeline

    pipe = tiny_wan_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red circle", negative_prompt="", num_inference_steps=STEPS, height=16, width=16,
                num_frames=1, guidance_scale=3.0, output_type="latent")
    stock = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    dit_cache.accelerate(pipe, plan=CachePlan.full(STEPS, len(cache_units(pipe.transformer))))
    with _Computations(dit_cache.get_cache_handle(pipe.transformer)) as counts:
        cached = pipe(**call, generator=torch.Generator().manual_seed(0)).frames
    assert torch.equal(cached, stock)
    assert counts.calls == 2 * 5  # the cond and the uncond call (each its own cache context), once per generation
    dit_cache.decelerate(pipe)
