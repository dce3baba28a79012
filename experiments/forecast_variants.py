"""Other forecasts on the shipped router's skipped steps, at the same computed steps (same FLOPs), on tuning seeds
(70000+): second-order Taylor (FORECAST2, where three computed steps exist) instead of FORECAST1, and damped
first-order forecasts ``y_new + d * (y_new - y_old) * (t - t_new) / (t_new - t_old)`` (d = 1 is FORECAST1, d = 0
REUSE), written as LINEAR weights. Mean PSNR against uncached, and on how many images each variant beats the plan:

    OMP_NUM_THREADS=2 python experiments/forecast_variants.py --budgets '[0.6,0.65,0.7,0.75,0.8]'
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers import PixArtAlphaPipeline
from jsonargparse import CLI

import dit_cache
from dit_cache import CachePlan
from dit_cache.plan import Action
from dit_cache.toy.evaluation import generate, plan_error, prompt_set


def second_order(plan: CachePlan) -> CachePlan:
    actions, computed = plan.actions.clone(), 0
    for step, row in enumerate(actions):
        if bool((row == Action.COMPUTE).all()):
            computed += 1
        elif bool((row == Action.FORECAST1).all()) and computed >= 3:
            actions[step] = Action.FORECAST2
    return CachePlan(actions)


def damped(plan: CachePlan, damping: float, timesteps: list[float]) -> CachePlan:
    actions = plan.actions.clone()
    weights = torch.zeros(*actions.shape, 2)  # newest first
    computed: list[int] = []
    for step, row in enumerate(actions):
        if bool((row == Action.COMPUTE).all()):
            computed.append(step)
        elif bool((row == Action.FORECAST1).all()) and len(computed) >= 2:
            newest, older = computed[-1], computed[-2]
            ratio = (timesteps[step] - timesteps[newest]) / (timesteps[newest] - timesteps[older])
            weights[step, :, 0], weights[step, :, 1] = 1 + damping * ratio, -damping * ratio
            actions[step] = Action.LINEAR
    return CachePlan(actions, weights)


def main(budgets: list[float] = (0.6, 0.65, 0.7, 0.75, 0.8), dampings: list[float] = (0.75, 0.5), count: int = 8,
         seed: int = 70_000, steps: int = 20) -> None:
    pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    prompts = prompt_set(2, count // 2, seed) + prompt_set(1, count - count // 2, seed)
    seeds = list(range(seed, seed + count))
    call = dict(num_inference_steps=steps, guidance_scale=dit_cache.EMBEDDED_GUIDANCE_SCALE)
    reference = generate(pipe, prompts, seeds, batch_size=count, **call)
    pipe.scheduler.set_timesteps(steps)
    timesteps = [float(t) for t in pipe.scheduler.timesteps]
    router = dit_cache.CacheRouter.load(dit_cache.embedded_router_path())
    for budget in budgets:
        plan = router.plan(skip_flops=budget)
        variants = {"FORECAST1 (shipped)": plan, "FORECAST2": second_order(plan),
                    **{f"damped {d}": damped(plan, d, timesteps) for d in dampings}}
        line, base = f"{budget:.0%}:", None
        for name, variant in variants.items():
            error = plan_error(pipe, variant, prompts, seeds, reference, batch_size=count, **call)
            mse = np.array(error["per_image_mse"])
            base = mse if base is None else base
            line += f" | {name} {error['psnr']:.2f} dB ({int((mse < base).sum())}/{count} better)"
        print(line, flush=True)


if __name__ == "__main__":
    CLI(main, as_positional=False)
