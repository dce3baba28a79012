"""cache-dit and SeaCache as benchmark peers on tiny pipelines: each applies, changes the output, and is removed
leaving the model bitwise and structurally stock; a missing cache-dit is one line naming the extra."""

import pytest
import torch

from dit_cache.bench import peers
from dit_cache.testing import tiny_dit_pipeline, tiny_pixart_pipeline

from test_peers import _latents, _setup, _stock_everywhere, assert_no_state_leak

pytest.importorskip("cache_dit")


def _cache_dit(setup):
    from dit_cache.bench.cache_dit_peer import cache_dit_family

    # warm-up of 1 step and a threshold nothing reaches: every step after the first reuses on an 8-step run
    return cache_dit_family(setup, thresholds=(1e6,), mask_policies=("ultra",), warmup=1, max_continuous=-1)


def _sea_cache(setup):
    return peers.sea_cache_family(setup, thresholds=(1e6,))


@pytest.mark.parametrize("make_pipe", [tiny_pixart_pipeline, tiny_dit_pipeline], ids=["pixart", "dit"])
@pytest.mark.parametrize("family", [_cache_dit, _sea_cache], ids=["cache-dit", "seacache"])
def test_each_new_peer_changes_the_output_and_its_removal_leaves_the_model_bitwise_stock(family, make_pipe):
    pipe = make_pipe(num_layers=3)
    setup = _setup(pipe)
    stock = _latents(pipe)
    signature = peers.module_signature(pipe.transformer)
    pipe_class = dict(vars(type(pipe)))
    candidates = family(setup)
    assert candidates
    for candidate in candidates:
        assert candidate.group == "diffusers"  # a peer: on the other side of the fronts
        setup.meter.reset()
        cached = _latents(pipe, candidate)
        assert setup.meter.cache_ratio() > 0, candidate.label
        assert not torch.equal(cached, stock), candidate.label
        assert peers.module_signature(pipe.transformer) == signature, candidate.label
        assert dict(vars(type(pipe))) == pipe_class, candidate.label  # cache-dit patches the pipeline class
        assert torch.equal(_latents(pipe), stock), candidate.label
    setup.meter.remove()
    assert _stock_everywhere(pipe.transformer)
    assert not any(name.startswith("_") and "cache" in name.lower() for name in vars(pipe.transformer))


@pytest.mark.parametrize("family", [_cache_dit, _sea_cache], ids=["cache-dit", "seacache"])
def test_the_new_peers_state_does_not_leak_from_one_call_into_the_next(family):
    assert_no_state_leak(tiny_pixart_pipeline(num_layers=3), family)


def test_seacache_sees_a_noise_level_that_falls_from_one_to_zero():
    from diffusers import DPMSolverMultistepScheduler

    sigma = peers._flow_sigma(DPMSolverMultistepScheduler())
    levels = [sigma(t) for t in (999, 500, 0)]
    assert 0.9 < levels[0] <= 1 and levels[0] > levels[1] > levels[2] and levels[2] < 0.05


def test_a_missing_cache_dit_is_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    import sys

    from dit_cache.cli import main

    monkeypatch.setitem(sys.modules, "cache_dit", None)
    out = tmp_path / "out"
    assert main(["bench", "--out", str(out), "--families", "cache_dit", "--no-plot"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and 'pip install "dit-cache[bench]"' in errors[0] and "cache-dit" in errors[0]
    assert not out.exists()
