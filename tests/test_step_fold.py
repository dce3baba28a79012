"""Step folds (dit_cache/fold.py): a step where every unit reuses or forecasts alike is one pass over the block
stack. Equal to the block-by-block replay to float rounding, on the steps it may take and no others."""

import numpy as np
import pytest
import torch

import dit_cache
from dit_cache import CachePlan, apply_cache, cache_units, remove_cache
from dit_cache.families.replays import TableGatedFold
from dit_cache.plan import Action
from dit_cache.state import PreparedPlan
from dit_cache.testing import TINY_FAMILIES, run_steps

STEPS = 8


def _block_by_block(monkeypatch):
    monkeypatch.setattr(dit_cache.cache, "step_fold", lambda *args: None)


def _counted_folds(monkeypatch) -> list[int]:
    calls = [0]
    output = TableGatedFold.output

    def counting(self, block, sums, args, kwargs):
        calls[0] += 1
        return output(self, block, sums, args, kwargs)

    monkeypatch.setattr(TableGatedFold, "output", counting)
    return calls


def _run(transformer, plan):
    apply_cache(transformer, plan)
    try:
        return run_steps(transformer, STEPS)
    finally:
        remove_cache(transformer)


def test_fold_rows_take_only_steps_every_unit_skips_alike_after_the_same_computed_steps():
    actions = CachePlan.taylor(STEPS, 6, interval=3).actions.clone()  # computes 0, 1, 4, 7; forecasts the others
    actions[3, 0] = Action.REUSE  # step 3: two actions
    actions[4, 5] = Action.REUSE  # from step 4 on, unit 5 has computed at other steps than the rest
    rows = PreparedPlan(CachePlan(actions)).fold_rows()
    assert rows[:4] == [None, None, 1, None]  # FORECAST1 at step 2
    assert rows[4:] == [None] * 4
    assert PreparedPlan(CachePlan.uniform(STEPS, 6, 2)).fold_rows()[1::2] == [0] * (STEPS // 2)  # REUSE


def _linear(num_units: int, per_unit: bool = False) -> CachePlan:
    """LINEAR over the newest two outputs between computed steps, with weights of every step's own (shared by its
    units, or ``per_unit``: each unit its own)."""
    plan = CachePlan.linear(STEPS, num_units, interval=3)
    weights = torch.zeros_like(plan.linear_weights)
    for step in range(STEPS):
        weights[step, :, 0], weights[step, :, 1] = 1.3 + 0.1 * step, -0.3 - 0.1 * step
        if per_unit:
            weights[step, :, 0] += 0.01 * torch.arange(num_units)
    return CachePlan(plan.actions, weights * (plan.actions == Action.LINEAR)[..., None])


def test_linear_rows_fold_where_their_units_share_the_weights():
    shared, per_unit = PreparedPlan(_linear(6)), PreparedPlan(_linear(6, per_unit=True))
    linear_steps = [step for step, row in enumerate(shared.rows) if set(row) == {int(Action.LINEAR)}]
    assert linear_steps and all(shared.fold_rows()[step] == 1 for step in linear_steps)  # K = 2 -> order 1
    assert shared.fold_weights(linear_steps[0]) == pytest.approx([1.3 + 0.1 * linear_steps[0],
                                                                  -0.3 - 0.1 * linear_steps[0]])
    assert all(per_unit.fold_rows()[step] is None for step in linear_steps)


@pytest.mark.parametrize("name", ["pixart", "sana"])
@pytest.mark.parametrize("plan_of", [lambda n: CachePlan.uniform(STEPS, n, 3),
                                     lambda n: CachePlan.taylor(STEPS, n, interval=3),
                                     lambda n: CachePlan.taylor(STEPS, n, interval=4, order=2),
                                     _linear],
                         ids=["reuse", "forecast1", "forecast2", "linear"])
def test_a_folded_run_is_the_block_by_block_run_to_rounding(name, plan_of, monkeypatch):
    transformer = TINY_FAMILIES[name].model()
    plan = plan_of(len(cache_units(transformer)))
    folds = _counted_folds(monkeypatch)
    folded = _run(transformer, plan)
    expected_folds = sum(order is not None for order in PreparedPlan(plan).fold_rows())
    assert folds[0] == expected_folds > 0
    with monkeypatch.context() as patch:
        _block_by_block(patch)
        replayed = _run(transformer, plan)
    assert folds[0] == expected_folds  # block by block: no fold
    for a, b in zip(folded, replayed):
        # FORECAST2's Lagrange weights (up to about 3 in size here) scale the sums' rounding: 1.5e-6 was seen
        torch.testing.assert_close(a, b, rtol=1e-5, atol=5e-6)
    assert any(not torch.equal(a, b) for a, b in zip(folded, replayed))  # the fold did the adding itself


def test_a_fold_that_declines_leaves_the_blocks_to_their_replays(monkeypatch):
    transformer = TINY_FAMILIES["pixart"].model()
    plan = CachePlan.uniform(STEPS, len(cache_units(transformer)), 2)
    with monkeypatch.context() as patch:
        _block_by_block(patch)
        replayed = _run(transformer, plan)
    monkeypatch.setattr(TableGatedFold, "output", lambda *args: NotImplemented)
    assert all(torch.equal(a, b) for a, b in zip(replayed, _run(transformer, plan)))


def test_gligen_calls_are_not_folded():
    block = TINY_FAMILIES["pixart"].model().transformer_blocks[0]
    gligen = dict(cross_attention_kwargs={"gligen": {"objs": None}})
    assert TableGatedFold().output(block, (None, None, None), (torch.zeros(1, 4, 16),), gligen) is NotImplemented


def test_only_stacks_gated_by_a_table_and_a_shared_embedding_fold():
    from dit_cache.families.replays import SanaFold

    pixart, dit, sana = (TINY_FAMILIES[name].model() for name in ("pixart", "dit", "sana"))
    assert TableGatedFold.applies(pixart.transformer_blocks) and SanaFold.applies(sana.transformer_blocks)
    assert not TableGatedFold.applies(dit.transformer_blocks)  # ada_norm_zero: a gate per block
    assert not SanaFold.applies(pixart.transformer_blocks)
    handle = apply_cache(dit, CachePlan.uniform(STEPS, len(cache_units(dit)), 2))
    hooks = [block._diffusers_hook.get_hook("dit_cache.block") for block in dit.transformer_blocks]
    assert all(hook.fold is None for hook in hooks) and handle.replay_blocks
    remove_cache(dit)


def test_embedded_images_are_bitwise_replayed_and_folded_to_rounding(monkeypatch):
    from diffusers import PixArtAlphaPipeline

    from dit_cache.families.record import ModelFamily

    pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red circle and a blue square", num_inference_steps=20, guidance_scale=2.0,
                output_type="np")

    def images(cached=True):
        if not cached:
            return pipe(generator=torch.Generator().manual_seed(0), **call).images
        cached = dit_cache.accelerate(pipe, router=dit_cache.embedded_router_path(), skip_flops=0.75)
        result = cached(generator=torch.Generator().manual_seed(0), **call).images
        dit_cache.decelerate(cached)
        return result

    folded = images()
    with monkeypatch.context() as patch:
        _block_by_block(patch)
        replayed = images()
        patch.setattr(ModelFamily, "replay_of", lambda self, block: None)
        hooked = images()
    assert np.array_equal(replayed, hooked)
    assert np.abs(folded - hooked).max() < 1e-3
    assert not np.array_equal(hooked, images(cached=False))


def test_fold_sums_are_kept_only_for_the_steps_the_units_still_hold_and_counted_in_cache_bytes():
    transformer = TINY_FAMILIES["pixart"].model()
    units = len(cache_units(transformer))
    handle = apply_cache(transformer, CachePlan.taylor(STEPS, units, interval=2))  # forecasts from the last two
    run_steps(transformer, STEPS - 1)
    state = handle.state
    held = {step for step, _ in state.outputs[0]}
    assert state.fold_sums and set(state.fold_sums) <= held and len(held) == 2
    outputs_only = sum(t.numel() * t.element_size() for history in state.outputs for _, t in history)
    sums = sum(t.numel() * t.element_size() for triple in state.fold_sums.values() for t in triple)
    assert handle.cache_bytes == outputs_only + sums
    remove_cache(transformer)
