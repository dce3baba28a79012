"""The cache under diffusers' context parallelism: 2 CPU processes (torchrun, gloo, the native attention backend).

One torchrun runs tests/context_parallel_worker.py on tiny FLUX.1, Qwen-Image and Wan models, with Ulysses and
with ring attention; this process runs the same plans on one process and compares. Ring attention merges partial
attentions by their log-sum-exp, which no attention backend returns on the CPU (native: "Native attention does not
support return_lse=True"; the others are CUDA-only); the worker substitutes torch's CPU flash kernel in the native
backend's forward op for those calls (cases.install_cpu_ring_attention), the ring algorithm staying diffusers'.

Tolerance: the cached outputs under context parallelism equal the single-process cached outputs to float32
rounding (``torch.testing.assert_close`` defaults: rtol 1.3e-6, atol 1e-5). Sharding changes no arithmetic, only
its order: each rank multiplies half the rows, Ulysses attends each head's full sequence after an all-to-all, ring
merges two half-sequence attentions by their log-sum-exp. Those reorder float32 sums (the stock models already
differ by up to ~4e-7 between one and two processes), and a forecast extrapolates that difference by its weights
(up to 3 for a second-order forecast), still far inside the tolerance. Each cached output is also checked to differ
from the stock one by far more than the tolerance, so a cache silently switched off would fail.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import context_parallel_cases as cases
from dit_cache import apply_cache, fit_linear_forecaster, remove_cache
from dit_cache.testing import run_steps, tiny_flux_pipeline

pytestmark = pytest.mark.multiprocess
HERE = Path(__file__).parent


def _launch(folder: Path):
    for build in cases.FAMILIES.values():
        model = build()
        cases.make_router(model).save(cases.router_path(folder, model))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(HERE / "context_parallel_worker.py"), str(folder)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env)  # a hang, not load
    assert result.returncode == 0, result.stderr[-4000:]
    return ([load_file(folder / f"rank{rank}.safetensors") for rank in (0, 1)],
            [json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)])


@pytest.fixture(scope="module")
def parallel(tmp_path_factory):
    folder = tmp_path_factory.mktemp("context_parallel")
    return folder, *_launch(folder)


@pytest.fixture(scope="module")
def single_process(parallel):
    """Every plan's steps and cache statistics on one process, the stock model's steps, the LINEAR weights."""
    folder = parallel[0]
    results = {}
    for family, build in cases.FAMILIES.items():
        model = build()
        results[f"{family}/stock"] = run_steps(model, cases.NUM_STEPS)
        plans = cases.plans(model, folder)
        plans["linear"] = fit_linear_forecaster(cases.StepsPipeline(model), cases.linear_template(model), [0],
                                                progress=False)
        results[f"{family}/linear_weights"] = plans["linear"].linear_weights
        for name, plan in plans.items():
            handle = apply_cache(model, plan)
            results[f"{family}/{name}"] = run_steps(model, cases.NUM_STEPS)
            results[f"{family}/{name}/stats"] = handle.stats
            remove_cache(model)
    return results


def _steps(outputs: dict, key: str) -> list[torch.Tensor]:
    return [outputs[f"{key}/{step}"] for step in range(cases.NUM_STEPS)]


PLANS = ["router", "taylor", "cfg_share", "linear"]
RUNS = pytest.mark.parametrize("attention, family", [(attention, family) for attention in ("ulysses", "ring")
                                                     for family in cases.FAMILIES])


@RUNS
@pytest.mark.parametrize("plan", PLANS)
def test_cached_output_under_context_parallelism_equals_the_single_process_cached_output(
        parallel, single_process, attention, family, plan):
    _, outputs, records = parallel
    run = f"{attention}/{family}/{plan}"
    expected = single_process[f"{family}/{plan}"]
    for rank in (0, 1):
        for got, want in zip(_steps(outputs[rank], run), expected):
            torch.testing.assert_close(got, want)
        # The plan did skip work: far from the stock output (a cache switched off would fail here).
        assert max((got - stock).abs().max() for got, stock in zip(
            _steps(outputs[rank], run), single_process[f"{family}/stock"])) > 100 * 1e-5
    for got0, got1 in zip(_steps(outputs[0], run), _steps(outputs[1], run)):
        assert torch.equal(got0, got1)  # the ranks gathered the same full output, bitwise
    # Same actions, each rank caching its own half of the tokens: exactly half the single-process bytes.
    stats = single_process[f"{family}/{plan}/stats"]
    for record in records:
        mine = record[run]
        assert (mine["computed"], mine["reused"], mine["forecast"], mine["cfg_shared"], mine["linear"]) == (
            stats.computed, stats.reused, stats.forecast, stats.cfg_shared, stats.linear)
        assert 2 * mine["cache_bytes"] == stats.cache_bytes > 0


@RUNS
def test_linear_weights_fitted_under_context_parallelism_are_the_single_process_fit(parallel, single_process,
                                                                                   attention, family):
    _, outputs, _ = parallel
    expected = single_process[f"{family}/linear_weights"]
    assert expected.abs().sum() > 0
    fitted = [outputs[rank][f"{attention}/{family}/linear_weights"] for rank in (0, 1)]
    for weights in fitted:  # the normal equations were summed over the shards: the single-process fit
        torch.testing.assert_close(weights, expected, rtol=1e-4, atol=1e-5)
    assert torch.equal(*fitted)  # and one fit, the same on both ranks


@RUNS
def test_removal_restores_the_stock_context_parallel_model_on_every_rank(parallel, single_process, attention,
                                                                         family):
    _, outputs, records = parallel
    for rank in (0, 1):
        stock = _steps(outputs[rank], f"{attention}/{family}/stock")
        for removed, before in zip(_steps(outputs[rank], f"{attention}/{family}/removed"), stock):
            assert torch.equal(removed, before)  # bitwise: the stock sharded computation, untouched
        for before, single in zip(stock, single_process[f"{family}/stock"]):
            torch.testing.assert_close(before, single)
        assert records[rank][f"{attention}/{family}/registries_left"] == []


@RUNS
def test_cache_applied_before_enable_parallelism_gives_the_same_result(parallel, attention, family):
    _, outputs, records = parallel
    run = f"{attention}/{family}"
    for rank in (0, 1):
        for first, after in zip(_steps(outputs[rank], f"{run}/cache_first"), _steps(outputs[rank], f"{run}/router")):
            assert torch.equal(first, after)
        assert records[rank][f"{run}/cache_first"]["cache_bytes"] == records[rank][f"{run}/router"]["cache_bytes"]


@RUNS
def test_plans_that_differ_between_ranks_and_router_training_are_refused_on_every_rank(parallel, attention,
                                                                                      family):
    _, _, records = parallel
    for record in records:
        mismatch, gated = record[f"{attention}/{family}/mismatch_error"], record[f"{attention}/{family}/gated_error"]
        assert "follow different cache plans" in mismatch and "same plan or router file" in mismatch
        assert "Router training (gated mode) does not work under context parallelism" in gated
        assert "--trainer.strategy ddp" in gated


def test_accelerated_flux_pipeline_under_ulysses_equals_the_single_process_pipeline(parallel):
    _, outputs, records = parallel
    expected, single_bytes = cases.flux_pipeline_call(tiny_flux_pipeline())
    for rank in (0, 1):
        torch.testing.assert_close(outputs[rank]["pipeline/latents"], expected)
        assert 2 * records[rank]["pipeline/cache_bytes"] == single_bytes > 0
