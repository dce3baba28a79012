"""Cache memory per rank and the cost of the ranks' plan check under context parallelism (docs/multi_gpu.md).

Three measurements:

    # tiny FLUX.1, Qwen-Image and Wan: cache bytes at degree 1 (no parallelism) and degree 2 (Ulysses), the same
    # plans, and the largest difference of the outputs from one process
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 experiments/context_parallel.py tiny

    # the real configurations (FLUX.1-dev, Qwen-Image, Wan 2.1 14B) on the meta device: no weights, no compute,
    # the units' true output shapes at the stated resolution; degree 1, one history entry per unit
    python experiments/context_parallel.py real

    # the per-step check (one 8-byte all-gather) against a stock context-parallel step of tiny FLUX.1, interleaved
    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 experiments/context_parallel.py check_cost

A rank caches its own shard of the tokens, so at degree d each rank holds 1/d of the degree-1 bytes, exactly when
the tokens split evenly (the tiny run checks it; tests/test_context_parallel.py asserts it for every plan).
"""

from __future__ import annotations

import os
import sys
from typing import Literal
from unittest import mock

import torch
from jsonargparse import CLI

from dit_cache import CachePlan, apply_cache, cache_units, remove_cache
from dit_cache.testing import run_steps, step_inputs, tiny_flux, tiny_qwen_image, tiny_wan

STEPS = 6


def _tiny_sharded(build, degree: int):
    from diffusers import ContextParallelConfig

    model = build()
    # diffusers 0.42 divides by the accelerator count, 0 on a CPU-only machine
    with mock.patch("torch.accelerator.device_count", return_value=1):
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=degree))
    return model


def tiny() -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo")
    rank, degree = dist.get_rank(), dist.get_world_size()
    plans = {"stock (no cache)": None,
             "uniform interval 2 (REUSE, 1 entry)": lambda n: CachePlan.uniform(STEPS, n, 2),
             "taylor interval 2 order 2 (3 entries)": lambda n: CachePlan.taylor(STEPS, n, 2, order=2)}
    rows = []
    for name, build in [("FLUX.1", tiny_flux), ("Qwen-Image", tiny_qwen_image), ("Wan", tiny_wan)]:
        for plan_name, make in plans.items():
            bytes_at, final = {}, {}
            for parallel in (False, True):
                model = _tiny_sharded(build, degree) if parallel else build()
                handle = None if make is None else apply_cache(model, make(len(cache_units(model))))
                final[parallel] = run_steps(model, STEPS, sample_size=16)[-1]
                bytes_at[degree if parallel else 1] = 0 if handle is None else handle.stats.cache_bytes
                if handle is not None:
                    remove_cache(model)
            bytes_at["difference"] = float((final[True] - final[False]).abs().max())
            gathered = [None] * degree
            dist.all_gather_object(gathered, bytes_at)
            rows.append((name, plan_name, gathered))
    if rank == 0:
        print(f"| tiny model, batch 2, 16x16 latent | plan | cache, degree 1 | degree {degree}, per rank | ratio | "
              f"max abs difference of the last step's output, degree {degree} vs 1 |")
        print("|---|---|---|---|---|---|")
        for name, plan_name, gathered in rows:
            single = gathered[0][1]
            per_rank = [g[degree] for g in gathered]
            shown = " / ".join(f"{b / 1024:.0f} KiB" for b in per_rank)
            ratio = f"{single / max(per_rank):.2f}" if single else "-"
            difference = max(g["difference"] for g in gathered)
            print(f"| {name} | {plan_name} | {single / 1024:.0f} KiB | {shown} | {ratio} | {difference:.1e} |")
    dist.destroy_process_group()


def _on_meta(value):
    if torch.is_tensor(value):
        return value.to("meta", torch.bfloat16 if value.is_floating_point() else value.dtype)
    if isinstance(value, dict):
        return {key: _on_meta(item) for key, item in value.items()}
    return value


def _wan_video_inputs(wan):
    inputs = step_inputs(wan, batch=1, text_tokens=512)
    inputs["hidden_states"] = torch.zeros(1, 16, 21, 60, 104)  # 81 frames at 480x832: 21 x 30 x 52 tokens
    return inputs


# (what, transformer class and config overrides, its step inputs); diffusers' defaults are the released
# configurations (FLUX.1-dev adds guidance_embeds).
REAL_MODELS = [
    ("FLUX.1-dev, 1024x1024 (4096 image + 512 text tokens)", "FluxTransformer2DModel", {"guidance_embeds": True},
     lambda model: step_inputs(model, batch=1, text_tokens=512, sample_size=64)),
    ("Qwen-Image, 1024x1024 (4096 image + 256 text tokens)", "QwenImageTransformer2DModel", {},
     lambda model: step_inputs(model, batch=1, text_tokens=256, sample_size=64)),
    ("Wan 2.1 14B, 81 frames 480x832 (32760 video tokens)", "WanTransformer3DModel", {}, _wan_video_inputs),
]


def real() -> None:
    import diffusers

    print("| model (bf16, batch 1) | units | 1 entry per unit (REUSE) | 2 (FORECAST1) | 3 (FORECAST2) | "
          "per rank at degree 2 / 4 / 8, 2 entries |")
    print("|---|---|---|---|---|---|")
    gib = 2 ** 30
    for name, class_name, overrides, make_inputs in REAL_MODELS:
        with torch.device("meta"):
            model = getattr(diffusers, class_name)(**overrides).to(torch.bfloat16)
        units = cache_units(model)
        handle = apply_cache(model, CachePlan.uniform(2, len(units), 2))
        handle.idle_bypassed()  # a generation of our own, which reads no timestep (a meta tensor has no value)
        with torch.no_grad(), handle.generation() as state:
            model(**_on_meta(make_inputs(model)), return_dict=False)
            one = state.cache_bytes
        remove_cache(model)
        per_rank = " / ".join(f"{2 * one / degree / gib:.2f}" for degree in (2, 4, 8))
        print(f"| {name} | {len(units)} | {one / gib:.2f} GiB | {2 * one / gib:.2f} GiB | {3 * one / gib:.2f} GiB "
              f"| {per_rank} GiB |")


def check_cost(repeats: int = 5, checks: int = 200, steps: int = 20) -> None:
    import time

    import torch.distributed as dist

    from dit_cache.parallel import _all_gather_int, context_parallel_group

    dist.init_process_group("gloo")
    model = _tiny_sharded(tiny_flux, dist.get_world_size())
    group = context_parallel_group(model)
    for repeat in range(repeats):  # interleaved: the machine's load moves both alike
        dist.barrier()
        start = time.perf_counter()
        for _ in range(checks):
            _all_gather_int(repeat, group)
        check = (time.perf_counter() - start) / checks
        dist.barrier()
        start = time.perf_counter()
        run_steps(model, steps)
        step = (time.perf_counter() - start) / steps
        if dist.get_rank() == 0:
            print(f"repeat {repeat}: check {check * 1e3:.2f} ms, stock context-parallel step of tiny FLUX.1 "
                  f"{step * 1e3:.1f} ms: the check adds {check / step:.1%}")
    dist.destroy_process_group()


def main(what: Literal["tiny", "real", "check_cost"]):
    """Args:
        what: ``tiny`` and ``check_cost`` (under torchrun), or ``real`` (one process, meta device).
    """
    if what != "real" and "WORLD_SIZE" not in os.environ:
        sys.exit(f"Launch the {what} measurement with torchrun --nproc_per_node 2 (see the docstring).")
    {"tiny": tiny, "real": real, "check_cost": check_cost}[what]()


if __name__ == "__main__":
    CLI(main)
