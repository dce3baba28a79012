"""The router search's cost, measured against the cost model of docs/router.md ("Cost model").

``shape``: a short greedy whole-step search (FORECAST1 / REUSE, the shipped recipe's moves) on a random-weight
transformer of a real model's block shapes, reduced in depth, with random prompt embeddings (nothing is downloaded);
prints the measured CPU time and peak RSS next to the model's predictions from three measured constants: the CPU
time of one uncached denoising step, the peak RSS of one uncached sampling run (inference) and the bytes of one
step's unit outputs. ``inference``: the peak RSS of the embedded pipeline generating the shipped search's
calibration batch (8 prompts, 20 steps) with the shipped router, the figure the search's peak is compared with.
Run each in a process of its own (peak RSS is the process's):

    OMP_NUM_THREADS=1 python experiments/search_cost.py shape --shape pixart_alpha_256 --layers 4 --steps 4
    OMP_NUM_THREADS=1 python experiments/search_cost.py shape --shape flux_dev --layers 1 --steps 4
    OMP_NUM_THREADS=1 python experiments/search_cost.py shape --shape embedded --steps 20 --prompts 8 --max_flops 0.2
    OMP_NUM_THREADS=1 python experiments/search_cost.py inference --prompts 8

``--snapshot_location`` / ``--snapshot_limit`` are the search settings of the same name. Every figure is one run on a
shared machine: CPU time (not wall clock) is what is compared.
"""

from __future__ import annotations

import json
import math
import resource
import time

import torch
from jsonargparse import CLI

from dit_cache import Action, CachePlan, apply_cache, cache_units
from dit_cache.flops import step_flops
from dit_cache.training.denoising import GuidedDenoiser, text_conditioning
from dit_cache.training.plan_search import GreedyPlanSearch, SearchSettings, TrajectoryRunner, search_history
from dit_cache.training.trajectory_snapshots import TrajectorySnapshots

GIB = 2 ** 30
COMPUTE = int(Action.COMPUTE)


def peak_rss() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def cpu_time() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


# ---- the cost model ----------------------------------------------------------------------------------------------
def predicted_steps(steps: int, moves: int, lazy: float = 3.0, spacing: int = 1, computed_only: bool = True) -> float:
    """Uncached-step equivalents a whole-step greedy search computes (docs/router.md): the reference run, the
    uncached plan's recording, then one recording per move from the move's step (plan m computes N - m steps; the
    old plan's snapshots before that step are kept, so on average half the steps, plus half the snapshot spacing),
    the first round's N - 1 candidates plus ``lazy`` more per move (lazy greedy re-measures a few), each running
    from its step (the same half) at the plan's computed share. ``computed_only=False``: denoiser calls instead (a
    cached step still runs the embeddings, the final layer and the scheduler)."""
    restart = steps / 2 + (spacing - 1) / 2  # steps a run from a candidate's or a move's step computes, on average
    total = 2 * steps + sum(restart * ((steps - m) / steps if computed_only else 1.0) for m in range(1, moves))
    for m in range(moves):
        candidates = (steps - 1 + lazy) if m == 0 else lazy
        share = (steps - m - 1) / steps if computed_only else 1.0
        total += candidates * restart * share
    return total


def predicted_snapshot_bytes(step_bytes: int, steps: int, history: int, limit: int | None, location: str) -> float:
    """RAM the snapshots of one recording hold: with one per step, every output computed before the last step
    (consecutive snapshots share them); with ``limit`` spread ones, ``limit x history`` steps' outputs at most."""
    if location == "disk":
        return 0.0
    held_steps = steps - 1 if limit is None else min(limit * history, steps - 1)
    return float(step_bytes * held_steps)


# ---- random-weight shapes ------------------------------------------------------------------------------------------
def _pixart(layers: int, sample_size: int):
    from diffusers import DPMSolverMultistepScheduler

    from dit_cache.testing import pixart_alpha_shapes

    return pixart_alpha_shapes(num_layers=layers, sample_size=sample_size), DPMSolverMultistepScheduler(), 4.5


def _embedded(layers: int | None, sample_size: int | None):
    from dit_cache import embedded_model_path
    from dit_cache.training.denoising import load_denoising_components

    transformer, scheduler = load_denoising_components(embedded_model_path())
    return transformer, scheduler, 2.0


def _flux_dev(layers: int, sample_size: int):
    """FLUX.1-dev's blocks (3072 wide, 24 heads x 128, T5-XXL and CLIP-L inputs): ``layers`` double-stream and
    ``layers`` single-stream blocks instead of 19 and 38."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=64, num_layers=layers, num_single_layers=layers, attention_head_dim=128,
        num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
        axes_dims_rope=(16, 56, 56)).eval()
    return transformer, FlowMatchEulerDiscreteScheduler(shift=3.0), 3.5


SHAPES = {"pixart_alpha_256": (_pixart, 32), "pixart_alpha_512": (_pixart, 64), "flux_dev": (_flux_dev, 16),
          "embedded": (_embedded, None)}


def _inputs(transformer, prompts: int, text_tokens: int, sample_size: int | None):
    generator = torch.Generator().manual_seed(0)
    config = transformer.config
    if type(transformer).__name__ == "FluxTransformer2DModel":
        from dit_cache.training.denoising import Conditioning

        kwargs = {"encoder_hidden_states": torch.randn(prompts, text_tokens, 4096, generator=generator),
                  "pooled_projections": torch.randn(prompts, 768, generator=generator),
                  "txt_ids": torch.zeros(text_tokens, 3)}
        noise = torch.randn(prompts, sample_size * sample_size, config.in_channels, generator=generator)
        return Conditioning(kwargs, prompts), noise
    width = config.caption_channels
    embeds = torch.randn(prompts, text_tokens, width, generator=generator)
    mask = torch.ones(prompts, text_tokens, dtype=torch.long)
    side = sample_size or config.sample_size
    noise = torch.randn(prompts, config.in_channels, side, side, generator=generator)
    return text_conditioning(embeds, mask, torch.zeros_like(embeds), mask, transformer), noise


def shape(shape: str = "pixart_alpha_256", layers: int = 4, steps: int = 4, prompts: int = 1, max_flops: float = 0.5,
          text_tokens: int = 120, snapshot_location: str = "memory", snapshot_limit: int | None = None,
          lazy_candidates: int = 2) -> dict:
    """A whole-step search to ``max_flops`` on ``shape`` at ``layers`` blocks; measured vs predicted."""
    build, sample_size = SHAPES[shape]
    transformer, scheduler, guidance = build(layers, sample_size)
    units = cache_units(transformer)
    settings = SearchSettings(groups="step", actions=["FORECAST1", "REUSE"], whole_steps=False, max_flops=max_flops,
                              lazy_candidates=lazy_candidates, snapshot_location=snapshot_location,
                              snapshot_limit=snapshot_limit, calibration_prompts=prompts)
    history = search_history(settings.actions)
    handle = apply_cache(transformer, CachePlan.full(steps, len(units)))
    conditioning, noise = _inputs(transformer, prompts, text_tokens, sample_size)
    denoiser = GuidedDenoiser(transformer, guidance)
    runner = TrajectoryRunner(denoiser, scheduler, handle, noise, conditioning, steps, history=history)
    flops, _ = step_flops(transformer, text_tokens=text_tokens, sample_size=sample_size)

    computed = [0.0]  # uncached-step equivalents run: each call counts its share of computed units

    def counting(latents, t, cond):
        row = handle.state.compiled.rows[handle.state.step] if handle.state.step > 0 else None
        computed[0] += 1.0 if row is None else sum(a == COMPUTE for a in row) / len(row)
        return denoiser(latents, t, cond)

    calls = [0]

    def counting_calls(latents, t, cond):
        calls[0] += 1
        return counting(latents, t, cond)

    runner.denoiser = counting_calls
    # the three constants: one uncached step's CPU time and unit-output bytes, one uncached run's peak RSS
    full = CachePlan.full(steps, len(units))
    runner.final_latents(full)  # warm-up; also inference's peak RSS
    inference_rss = peak_rss()
    start = cpu_time()
    _, one = runner.recorded(full, TrajectorySnapshots([1]))
    step_seconds = (cpu_time() - start) / steps
    step_bytes = one.latest(1).nbytes
    one.close()
    cached = full.actions.clone()
    cached[1:] = int(Action.REUSE)
    start = cpu_time()
    runner.final_latents(CachePlan(cached))
    call_seconds = (cpu_time() - start - step_seconds) / (steps - 1)  # a call whose units all reuse
    computed[0], calls[0] = 0.0, 0

    search = GreedyPlanSearch(settings, units, flops, steps)
    start, wall = cpu_time(), time.perf_counter()
    while not search.ordered:
        search.move(runner)
    search_seconds, wall = cpu_time() - start, time.perf_counter() - wall
    search.release_snapshots()
    moves = int(search.moves)
    spacing = 1 if snapshot_limit is None else max(1, -(-steps // (snapshot_limit + 1)))
    steps_pred = predicted_steps(steps, moves, lazy=lazy_candidates + 1, spacing=spacing)
    calls_pred = predicted_steps(steps, moves, lazy=lazy_candidates + 1, spacing=spacing, computed_only=False)
    time_pred = steps_pred * (step_seconds - call_seconds) + calls_pred * call_seconds
    snap_pred = predicted_snapshot_bytes(step_bytes, steps, history, snapshot_limit, snapshot_location)
    result = {
        "shape": shape, "layers": layers, "steps": steps, "prompts": prompts, "units": len(units),
        "params_M": round(sum(p.numel() for p in transformer.parameters()) / 1e6, 1),
        "snapshot_location": snapshot_location, "snapshot_limit": snapshot_limit, "moves": moves,
        "plans_measured": int(search.evaluations),
        "step_cpu_s": round(step_seconds, 3), "cached_call_cpu_s": round(call_seconds, 3), "step_unit_output_GiB": round(step_bytes / GIB, 4),
        "inference_peak_rss_GiB": round(inference_rss / GIB, 3),
        "computed_steps": {"measured": round(computed[0], 2), "predicted": round(steps_pred, 2)},
        "denoiser_calls": {"measured": calls[0], "predicted": round(calls_pred, 1)},
        "search_cpu_s": {"measured": round(search_seconds, 1), "predicted": round(time_pred, 1)},
        "search_wall_s": round(wall, 1),
        "peak_rss_GiB": {"measured": round(peak_rss() / GIB, 3),
                         "predicted": round((inference_rss + snap_pred) / GIB, 3)},
    }
    print(json.dumps(result))
    return result


def inference(prompts: int = 8, steps: int = 20, flops: float = 0.55, seed: int = 10_000) -> dict:
    """Peak RSS of the embedded pipeline generating ``prompts`` prompts in one batch with the shipped router."""
    from diffusers import PixArtAlphaPipeline

    import dit_cache
    from dit_cache.toy.evaluation import prompt_set

    pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
    pipe = dit_cache.accelerate(pipe, router=dit_cache.embedded_router_path(), flops=flops)
    texts = prompt_set(1, prompts, seed)
    generators = [torch.Generator().manual_seed(seed + i) for i in range(prompts)]
    start = cpu_time()
    pipe(texts, num_inference_steps=steps, guidance_scale=dit_cache.EMBEDDED_GUIDANCE_SCALE, generator=generators,
         output_type="np")
    result = {"prompts": prompts, "steps": steps, "cpu_s": round(cpu_time() - start, 1),
              "peak_rss_GiB": round(peak_rss() / GIB, 3)}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    CLI([shape, inference], as_positional=False)
