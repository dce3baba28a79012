import pytest
import torch

from dit_cache import CacheSchedule, cache_units, unit_flops
from dit_cache.testing import step_inputs, tiny_pixart


def test_uniform_computes_every_interval_steps():
    schedule = CacheSchedule.uniform(7, 3, interval=3)
    assert schedule.mask[:, 0].tolist() == [True, False, False, True, False, False, True]
    assert schedule.cache_ratio == pytest.approx(4 / 7)
    assert CacheSchedule.full(5, 2).cache_ratio == 0.0


def test_first_step_must_compute():
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[0, 1] = False
    with pytest.raises(ValueError, match="first step must compute"):
        CacheSchedule(mask)


@pytest.mark.parametrize("bad", [torch.ones(3), torch.ones(0, 4), torch.full((2, 2), 2)])
def test_bad_masks_are_rejected(bad):
    with pytest.raises(ValueError):
        CacheSchedule(bad)


def test_interval_must_be_positive():
    with pytest.raises(ValueError, match="interval"):
        CacheSchedule.uniform(4, 2, interval=0)


def test_save_and_load_round_trip(tmp_path):
    schedule = CacheSchedule.uniform(9, 5, interval=2)
    schedule.save(tmp_path / "s.safetensors")
    assert CacheSchedule.load(tmp_path / "s.safetensors") == schedule


def test_loading_a_foreign_safetensors_file_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"mask": torch.ones(2, 2, dtype=torch.uint8)}, tmp_path / "other.safetensors")
    with pytest.raises(ValueError, match="not a dit-cache schedule"):
        CacheSchedule.load(tmp_path / "other.safetensors")


def test_flop_weighted_speedup():
    transformer = tiny_pixart(num_layers=2)
    per_unit, total = unit_flops(transformer, **step_inputs(transformer))
    assert per_unit.shape == (len(cache_units(transformer)),) and (per_unit > 0).all()
    assert per_unit.sum() < total  # embeddings and the final layer are outside the units
    # attention FLOPs are counted, not only the projections
    attention = 2 * 2 * 16 * 16 * 16 * 2  # 2 matmuls, batch 2, 16 tokens, 16 tokens, width 16, x2 for mul+add
    projections = 4 * 2 * 16 * 16 * 16 * 2
    assert per_unit[0] == attention + projections
    full = CacheSchedule.full(4, 6)
    assert full.theoretical_speedup(per_unit, total) == pytest.approx(1.0)
    every_other = CacheSchedule.uniform(4, 6, interval=2)
    expected = 4 * total / (4 * total - 2 * per_unit.sum().item())
    assert every_other.theoretical_speedup(per_unit, total) == pytest.approx(expected)
    with pytest.raises(ValueError, match="unit_flops"):
        every_other.theoretical_speedup(per_unit[:3], total)


def test_cached_share_counts_each_unit_by_its_weight():
    mask = torch.ones(4, 3, dtype=torch.bool)
    mask[1, 0] = mask[2, 2] = mask[3, 2] = False  # cached: one cheap unit once, the expensive unit twice
    schedule = CacheSchedule(mask)
    assert schedule.cached_share(torch.ones(3)) == pytest.approx(schedule.cache_ratio) == pytest.approx(3 / 12)
    assert schedule.cached_share(torch.tensor([1.0, 1.0, 2.0])) == pytest.approx((1 + 2 + 2) / (4 * 4))
    with pytest.raises(ValueError, match="one per unit"):
        schedule.cached_share(torch.ones(2))
    with pytest.raises(ValueError, match="positive"):
        schedule.cached_share(torch.tensor([1.0, 0.0, 1.0]))
