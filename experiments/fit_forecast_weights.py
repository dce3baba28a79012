"""Forecast weights learned end to end (training/forecast_weights.py) for the shipped router's plans, and their
effect on the final images, paired per image against the plans as shipped.

    # fit on 32 calibration images (seeds 10000+), one plan file per budget
    OMP_NUM_THREADS=1 python experiments/fit_forecast_weights.py fit --budgets '[0.75]' --share step \\
        --out runs/forecast_weights
    # score on images nothing was fitted on: tuning seeds 70000+, held-out seeds 80000+
    python experiments/fit_forecast_weights.py evaluate --plans runs/forecast_weights --seed 70000 --count 16
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from diffusers import PixArtAlphaPipeline
from jsonargparse import CLI

import dit_cache
from dit_cache import CachePlan
from dit_cache.toy.evaluation import generate, plan_error, prompt_set
from dit_cache.training.forecast_weights import fit_forecast_weights

CALL = dict(num_inference_steps=20, guidance_scale=dit_cache.EMBEDDED_GUIDANCE_SCALE)


def _images(count: int, seed: int) -> tuple[list[str], list[int]]:
    """Half two-object, half one-object captions, as the router search's and the benchmark's sets are made."""
    return prompt_set(2, count // 2, seed) + prompt_set(1, count - count // 2, seed), list(range(seed, seed + count))


def _pipe():
    pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def fit(budgets: list[float], out: Path, share: str = "step", epochs: int = 8, learning_rate: float = 0.03,
        seed: int = 10_000, count: int = 32) -> None:
    """Fit weights for the shipped router's plan at each budget; writes ``plan_<budget>.safetensors``."""
    pipe, router = _pipe(), dit_cache.CacheRouter.load(dit_cache.embedded_router_path())
    prompts, seeds = _images(count, seed)
    out.mkdir(parents=True, exist_ok=True)
    for budget in budgets:
        plan = fit_forecast_weights(pipe, router.plan(skip_flops=budget), prompts, seeds, share=share,
                                    epochs=epochs, learning_rate=learning_rate, **CALL)
        plan.save(out / f"plan_{budget:.2f}.safetensors")
        print(f"{budget:.0%}: written to {out / f'plan_{budget:.2f}.safetensors'}", flush=True)


def evaluate(plans: Path, seed: int = 70_000, count: int = 16, resamples: int = 10_000,
             out: Path | None = None) -> None:
    """Mean image PSNR against uncached of each learned plan and of the shipped plan it came from, paired."""
    pipe, router = _pipe(), dit_cache.CacheRouter.load(dit_cache.embedded_router_path())
    prompts, seeds = _images(count, seed)
    reference = generate(pipe, prompts, seeds, batch_size=8, **CALL)
    rng, rows = np.random.default_rng(0), []
    for path in sorted(plans.glob("plan_*.safetensors")):
        budget = float(path.stem.split("_")[1])
        psnr = {}
        for name, plan in [("shipped", router.plan(skip_flops=budget)), ("learned", CachePlan.load(path))]:
            error = plan_error(pipe, plan, prompts, seeds, reference, **CALL)
            psnr[name] = -10 * np.log10(np.array(error["per_image_mse"]))
        gain = psnr["learned"] - psnr["shipped"]
        means = gain[rng.integers(0, count, (resamples, count))].mean(1)
        row = {"budget": budget, "shipped_psnr": float(psnr["shipped"].mean()),
               "learned_psnr": float(psnr["learned"].mean()), "gain": float(gain.mean()),
               "gain_ci": [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))],
               "better": int((gain > 0).sum()), "images": count, "seed": seed}
        rows.append(row)
        print(f"{budget:.0%}: shipped {row['shipped_psnr']:.2f} dB, learned {row['learned_psnr']:.2f} dB, "
              f"{row['gain']:+.2f} [{row['gain_ci'][0]:+.2f}, {row['gain_ci'][1]:+.2f}], better on "
              f"{row['better']}/{count}", flush=True)
    if out is not None:
        out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    CLI([fit, evaluate], as_positional=False)
