"""One rank of the context-parallel checks (tests/test_context_parallel.py launches it with torchrun, gloo).

For each tiny family: the stock model under diffusers' context parallelism, then every plan of the test cached
under it, then the stock model again after ``remove_cache``; the outputs of every step go to
``OUT/rank{R}.safetensors`` and the cache statistics and errors to ``OUT/rank{R}.json``. The test process compares
them with single-process runs of the same plans.

diffusers 0.42's ``enable_parallelism`` computes ``rank % torch.accelerator.device_count()``, which is a division by
zero on a machine without an accelerator; the worker patches the count to 1 for that call only (the CPU is then
device ``cpu:0`` of every rank, which is what it is).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig
from safetensors.torch import save_file

import dit_cache
from dit_cache import CachePlan, CacheRouter, apply_cache, cache_units, get_cache_handle, remove_cache
from dit_cache.testing import run_steps, tiny_flux_pipeline

import context_parallel_cases as cases


def enable_context_parallelism(model, degree: int, kind: str) -> None:
    config = ContextParallelConfig(ulysses_degree=degree) if kind == "ulysses" else ContextParallelConfig(
        ring_degree=degree)
    with mock.patch("torch.accelerator.device_count", return_value=1):
        model.enable_parallelism(config=config)


def cached_run(model, plan, record: dict, name: str, outputs: dict):
    handle = apply_cache(model, plan)
    steps = run_steps(model, cases.NUM_STEPS)
    stats = handle.stats
    record[name] = {"cache_bytes": stats.cache_bytes, "computed": stats.computed, "reused": stats.reused,
                    "forecast": stats.forecast, "cfg_shared": stats.cfg_shared, "linear": stats.linear}
    for step, output in enumerate(steps):
        outputs[f"{name}/{step}"] = output.contiguous()
    remove_cache(model)


def error_of(function) -> str:
    try:
        function()
    except Exception as error:  # noqa: BLE001 -- the test reads the message
        return f"{type(error).__name__}: {error}"
    return ""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--ulysses", nargs="*", default=list(cases.FAMILIES), help="families to run with Ulysses")
    parser.add_argument("--ring", nargs="*", default=list(cases.FAMILIES), help="families to run with ring attention")
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, degree = dist.get_rank(), dist.get_world_size()
    if args.ring:
        cases.install_cpu_ring_attention()  # only the ring's log-sum-exp calls change; Ulysses never asks for one
    record, outputs = {}, {}
    folder = Path(args.out)
    runs = [("ulysses", family) for family in args.ulysses] + [("ring", family) for family in args.ring]
    for attention, family in runs:
        model = cases.FAMILIES[family]()
        enable_context_parallelism(model, degree, attention)
        key = f"{attention}/{family}"  # the records' prefix
        for step, output in enumerate(run_steps(model, cases.NUM_STEPS)):
            outputs[f"{key}/stock/{step}"] = output.contiguous()
        plans = cases.plans(model, folder)
        for name, plan in plans.items():
            cached_run(model, plan, record, f"{key}/{name}", outputs)
        # LINEAR weights fitted under context parallelism (each rank records its shard; the normal equations are
        # summed over the ranks), then used.
        fitted = dit_cache.fit_linear_forecaster(cases.StepsPipeline(model), cases.linear_template(model),
                                                 [0], progress=False)
        outputs[f"{key}/linear_weights"] = fitted.linear_weights
        cached_run(model, fitted, record, f"{key}/linear", outputs)
        for step, output in enumerate(run_steps(model, cases.NUM_STEPS)):  # after every remove_cache: stock
            outputs[f"{key}/removed/{step}"] = output.contiguous()
        record[f"{key}/registries_left"] = [unit.path for unit in cache_units(model)
                                             if hasattr(model.get_submodule(unit.path), "_diffusers_hook")]

        # Order: the cache applied before enable_parallelism gives the same result as after it.
        model = cases.FAMILIES[family]()
        handle = apply_cache(model, plans["router"])
        enable_context_parallelism(model, degree, attention)
        for step, output in enumerate(run_steps(model, cases.NUM_STEPS)):
            outputs[f"{key}/cache_first/{step}"] = output.contiguous()
        record[f"{key}/cache_first"] = {"cache_bytes": handle.stats.cache_bytes}
        remove_cache(model)

        # Refusals, raised on every rank alike: plans that differ between the ranks, router training.
        units = len(cache_units(model))
        own_plan = CachePlan.uniform(cases.NUM_STEPS, units, interval=2 + rank)
        apply_cache(model, own_plan)
        record[f"{key}/mismatch_error"] = error_of(lambda: run_steps(model, cases.NUM_STEPS))
        remove_cache(model)
        handle = apply_cache(model, CacheRouter(cases.NUM_STEPS, units).schedule())
        with handle.gated():
            handle.set_gate(torch.full((units,), 0.9), 0.5)
            record[f"{key}/gated_error"] = error_of(lambda: run_steps(model, 2))
        remove_cache(model)
        assert get_cache_handle(model) is None
    if "flux" in args.ulysses:  # the user's path: an accelerated pipeline whose transformer is sharded
        pipe = tiny_flux_pipeline()
        enable_context_parallelism(pipe.transformer, degree, "ulysses")
        outputs["pipeline/latents"], record["pipeline/cache_bytes"] = cases.flux_pipeline_call(pipe)
    save_file(outputs, str(folder / f"rank{rank}.safetensors"))
    (folder / f"rank{rank}.json").write_text(json.dumps(record, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
