import pytest
import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, UNet2DModel

import dit_cache
from dit_cache import CacheSchedule, apply_cache, cache_units, remove_cache
from dit_cache.testing import run_steps, step_inputs, tiny_dit, tiny_pixart

TINY_CONFIGS = [
    pytest.param(lambda: tiny_dit(num_layers=2), id="dit-2x2h"),
    pytest.param(lambda: tiny_dit(num_layers=3, heads=4, head_dim=4, sample_size=16), id="dit-3x4h-16px"),
    pytest.param(lambda: tiny_pixart(num_layers=2), id="pixart-2x2h"),
    pytest.param(lambda: tiny_pixart(num_layers=3, heads=3, head_dim=8, caption_channels=24), id="pixart-3x3h"),
]
STEPS = 6


def test_units_are_block_major_with_the_right_branches():
    dit_units, pixart_units = cache_units(tiny_dit(num_layers=3)), cache_units(tiny_pixart(num_layers=3))
    assert [u.branch for u in dit_units] == ["attn1", "ff"] * 3
    assert [u.branch for u in pixart_units] == ["attn1", "attn2", "ff"] * 3
    assert [u.block for u in pixart_units] == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert [u.index for u in pixart_units] == list(range(9))
    assert pixart_units[4].path == "transformer_blocks.1.attn2"


def test_unsupported_model_lists_the_supported_classes():
    unet = UNet2DModel(sample_size=8, block_out_channels=(8, 8), norm_num_groups=4, layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(TypeError, match="DiTTransformer2DModel.*PixArtTransformer2DModel"):
        cache_units(unet)
    with pytest.raises(TypeError, match="UNet2DModel"):
        apply_cache(unet, CacheSchedule.full(4, 4))
    assert not hasattr(unet, "_diffusers_hook")


@pytest.mark.parametrize("build", TINY_CONFIGS)
def test_full_schedule_is_bitwise_equal_to_the_stock_model(build):
    transformer = build()
    stock = run_steps(transformer, STEPS)
    handle = apply_cache(transformer, CacheSchedule.full(STEPS, len(cache_units(transformer))))
    cached = run_steps(transformer, STEPS)
    assert handle.stats.computed == STEPS * len(handle.units) and handle.stats.reused == 0
    assert all(torch.equal(a, b) for a, b in zip(stock, cached))
    assert remove_cache(transformer)
    restored = run_steps(transformer, STEPS)
    assert all(torch.equal(a, b) for a, b in zip(stock, restored))
    # Nothing of ours is left on the model.
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ for m in transformer.modules())
    assert not transformer._forward_pre_hooks and not transformer._forward_hooks


def _count_calls(transformer):
    """Counts executions of each unit's first Linear layer, i.e. whether the unit's work really ran."""
    counts = {}
    for unit in cache_units(transformer):
        unit_module = transformer.get_submodule(unit.path)
        module = next(m for m in unit_module.modules() if isinstance(m, torch.nn.Linear))
        counts[unit.index] = 0

        def count(module, args, index=unit.index):
            counts[index] += 1

        module.register_forward_pre_hook(count)
    return counts


@pytest.mark.parametrize("build", TINY_CONFIGS)
def test_uniform_schedule_skips_the_reused_modules(build):
    transformer = build()
    num_units = len(cache_units(transformer))
    schedule = CacheSchedule.uniform(STEPS, num_units, interval=3)
    counts = _count_calls(transformer)
    handle = apply_cache(transformer, schedule)
    outputs = run_steps(transformer, STEPS)
    # Steps 0 and 3 compute; 1, 2, 4, 5 reuse.
    assert all(count == 2 for count in counts.values()), counts
    assert handle.stats.reused == 4 * num_units
    assert handle.stats.cache_ratio == pytest.approx(schedule.cache_ratio)
    assert all(torch.isfinite(o).all() for o in outputs)
    # Reuse really changes the result (the cache is not silently bypassed).
    remove_cache(transformer)
    assert not torch.equal(outputs[1], run_steps(transformer, STEPS)[1])


def test_reused_output_is_the_cached_pre_gate_tensor(monkeypatch):
    # A block whose units all reuse is replayed (dit_cache/families/replays.py): record what its replay is handed.
    from dit_cache.families.record import ModelFamily

    replay_of = ModelFamily.replay_of
    handed = []

    def recording(self, block):
        replay = replay_of(self, block)
        return lambda block, outputs, args, kwargs: handed.extend(outputs) or replay(block, outputs, args, kwargs)

    monkeypatch.setattr(ModelFamily, "replay_of", recording)
    monkeypatch.setattr(dit_cache.cache, "step_fold", lambda *args: None)  # block by block (a fold sums them)
    transformer = tiny_pixart()
    handle = apply_cache(transformer, CacheSchedule.uniform(2, 6, interval=2))
    inputs = step_inputs(transformer)
    with torch.no_grad():
        transformer(**inputs)
        stored = [handle.state.newest(u) for u in range(6)]
        # The next step of the same generation: a lower timestep (a higher one would start a new generation).
        transformer(**{**inputs, "timestep": inputs["timestep"] - 100})
    assert len(handed) == 6 and all(handed[u] is stored[u] for u in range(6))


def test_generation_restarts_after_the_last_step_and_on_reset():
    transformer = tiny_dit()
    num_units = len(cache_units(transformer))
    mask = torch.ones(3, num_units, dtype=torch.bool)
    mask[1:, 0] = False
    handle = apply_cache(transformer, CacheSchedule(mask))
    counts = _count_calls(transformer)
    first = run_steps(transformer, 3)
    second = run_steps(transformer, 3)  # a new generation: step 0 computes again
    assert counts[0] == 2 and counts[1] == 6
    assert all(torch.equal(a, b) for a, b in zip(first, second))
    run_steps(transformer, 1)
    assert handle.stats.steps == 1 and handle.cache_bytes > 0
    handle.reset()
    assert handle.stats.steps == 0 and handle.cache_bytes == 0


def test_cfg_batch_and_batch_sizes_share_one_decision_per_unit():
    transformer = tiny_pixart()
    num_units = len(cache_units(transformer))
    apply_cache(transformer, CacheSchedule.uniform(4, num_units, interval=2))
    for batch in (1, 2, 4):
        outputs = run_steps(transformer, 4, batch=batch)
        assert outputs[-1].shape[0] == batch and all(torch.isfinite(o).all() for o in outputs)
    # Row 0 of a batch equals the same row run alone: reuse does not mix rows.
    inputs = step_inputs(transformer, batch=2)
    alone = {k: v[:1] if torch.is_tensor(v) else v for k, v in inputs.items()}
    with torch.no_grad():
        batched_out = [transformer(**inputs).sample for _ in range(4)]
        alone_out = [transformer(**alone).sample for _ in range(4)]
    torch.testing.assert_close(batched_out[-1][:1], alone_out[-1], rtol=1e-5, atol=1e-5)


def test_cache_bytes_counts_one_output_per_unit_and_the_kept_text_projections_apart():
    transformer = tiny_pixart()
    handle = apply_cache(transformer, CacheSchedule.full(2, 6))
    run_steps(transformer, 1, batch=2, text_tokens=6)
    hidden = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    tokens = (transformer.config.sample_size // 2) ** 2
    assert handle.cache_bytes == 6 * 2 * tokens * hidden * 4
    # the caption projection and 2 blocks' cross-attention keys and values, of the 6 text tokens
    assert handle.invariant_bytes == 5 * 2 * 6 * hidden * 4


def test_history_keeps_the_last_outputs_with_their_steps():
    transformer = tiny_dit()
    handle = apply_cache(transformer, CacheSchedule.full(4, 4), history=2)
    run_steps(transformer, 3)
    assert [step for step, _ in handle.state.outputs[0]] == [1, 2]


def test_wrong_unit_count_names_both_shapes_and_applies_nothing():
    transformer = tiny_pixart(num_layers=2)
    with pytest.raises(ValueError, match="4 units per step.*6 cacheable units"):
        apply_cache(transformer, CacheSchedule.full(5, 4))
    assert dit_cache.get_cache_handle(transformer) is None
    assert not any(hasattr(m, "_diffusers_hook") for m in transformer.modules())


def test_applying_twice_raises_and_keeps_the_first_cache():
    transformer = tiny_dit()
    first = apply_cache(transformer, CacheSchedule.full(3, 4))
    with pytest.raises(RuntimeError, match="remove_cache"):
        apply_cache(transformer, CacheSchedule.uniform(3, 4, 2))
    assert dit_cache.get_cache_handle(transformer) is first
    assert remove_cache(transformer) and not remove_cache(transformer)


def test_wrong_step_count_is_reported_with_the_fix():
    schedule = CacheSchedule.full(20, 6)
    with pytest.raises(ValueError, match="20 steps but 10 denoising steps.*num_inference_steps=20"):
        schedule.check_compatible(num_steps=10, num_units=6)
    schedule.check_compatible(num_steps=20, num_units=6)


def test_bypassed_calls_are_stock_and_do_not_advance_the_step():
    transformer = tiny_pixart()
    stock = run_steps(transformer, 2)
    handle = apply_cache(transformer, CacheSchedule.uniform(2, 6, interval=2))
    with handle.bypassed():
        bypassed = run_steps(transformer, 2)
    assert handle.stats.steps == 0 and handle.cache_bytes == 0
    assert all(torch.equal(a, b) for a, b in zip(stock, bypassed))


def test_swapping_the_model_class_is_rejected_cleanly():
    with pytest.raises(TypeError, match="CacheSchedule"):
        apply_cache(tiny_dit(), torch.ones(3, 4, dtype=torch.bool))
