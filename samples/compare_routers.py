"""HarmoniCa vs Learning-to-Cache vs a uniform (FORA) schedule on the embedded model, at matched cache ratio.

    dit-cache-train fit --config training/configs/embedded_flops.yaml # -> runs/router/embedded_flops/router.safetensors
    dit-cache-train fit --config training/configs/embedded_l2c.yaml   # -> runs/router/embedded_l2c/router.safetensors
    python samples/compare_routers.py

Error is measured on the final images against the uncached pipeline with the same seeds.
"""

import json
import statistics

from diffusers import PixArtAlphaPipeline
from jsonargparse import CLI

from dit_cache import EMBEDDED_GUIDANCE_SCALE, CacheRouter, CacheSchedule, embedded_model_path
from dit_cache.evaluation import concept_rate, generate, image_error, paired_difference, prompt_set
from dit_cache.flops import step_flops
from dit_cache.pipelines import AcceleratedPixArtAlphaPipeline


def main(routers: dict[str, str] = {"harmonica": "runs/router/embedded_flops/router.safetensors",
                                    "l2c": "runs/router/embedded_l2c/router.safetensors"},
         uniform_interval: int = 2, match_flops: bool = False, count: int = 100, steps: int = 20,
         guidance_scale: float = EMBEDDED_GUIDANCE_SCALE,
         seed: int = 20_000, output: str = "samples/results/router_comparison.json"):
    """Args:
        routers: name -> router file.
        uniform_interval: the FORA baseline recomputes everything every this many steps.
        match_flops: move each router's threshold so it skips the same share of the units' FLOPs as the uniform
            schedule (default: the threshold it was trained with).
        count: prompts (half one-object, half two-object), each with its own seed.
    """
    pipe = PixArtAlphaPipeline.from_pretrained(embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    prompts = prompt_set(1, count // 2, seed) + prompt_set(2, count - count // 2, seed + 1)
    seeds = list(range(seed, seed + count))
    call = {"num_inference_steps": steps, "guidance_scale": guidance_scale}
    generate(pipe, prompts[:1], seeds[:1], desc="warm-up", **call)  # untimed: first-call allocations
    reference = generate(pipe, prompts, seeds, desc="uncached", **call)
    # CUR counts every unit alike; their FLOPs differ (PixArt's MLP costs about twice its cross-attention).
    per_unit_flops, total_flops = step_flops(pipe.transformer)
    uniform_name = f"uniform (interval {uniform_interval})"
    uniform_schedule = CacheSchedule.uniform(steps, len(per_unit_flops), uniform_interval)
    candidates = {name: {"router": CacheRouter.load(path)} for name, path in routers.items()}
    if match_flops:
        skipped = uniform_schedule.cached_share(per_unit_flops)
        for source in candidates.values():
            source["router"].calibrate_threshold(skipped, unit_weights=per_unit_flops)
    candidates[uniform_name] = {"schedule": uniform_schedule}
    rows = {"uncached": {"cache_ratio": 0.0, "theoretical_speedup": 1.0,
                         "concept_accuracy": concept_rate(reference.images, prompts), "mse": 0.0,
                         "psnr": float("inf"), "per_image_mse": [0.0] * count, "seconds": reference.seconds}}
    for name, source in candidates.items():
        cached = AcceleratedPixArtAlphaPipeline.from_pipe(pipe, **source)
        cached.set_progress_bar_config(disable=True)
        generate(cached, prompts[:1], seeds[:1], desc="warm-up", **call)
        run = generate(cached, prompts, seeds, desc=name, **call)
        schedule = source["router"].schedule() if "router" in source else source["schedule"]
        rows[name] = {"cache_ratio": cached.cache_stats.cache_ratio,
                      "theoretical_speedup": schedule.theoretical_speedup(per_unit_flops, total_flops),
                      "concept_accuracy": concept_rate(run.images, prompts),
                      **image_error(run, reference), "seconds": run.seconds}
    uniform = rows[uniform_name]["per_image_mse"]
    print(f"{count} prompts x seeds, {steps} DPM-Solver steps, cfg {guidance_scale}")
    print("| schedule | CUR | image MSE vs uncached | median image MSE | PSNR (dB) | MSE minus uniform's "
          "[95% bootstrap] | images with less error than uniform | concept accuracy | speedup (wall clock) | "
          "transformer FLOP-theoretical speedup |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name, row in rows.items():
        speedup = rows["uncached"]["seconds"] / row["seconds"]
        paired = " | "
        if name not in ("uncached", uniform_name):
            row["vs_uniform"] = difference = paired_difference(row["per_image_mse"], uniform)
            paired = (f"{difference['mean']:+.5f} [{difference['low']:+.5f}, {difference['high']:+.5f}] | "
                      f"{difference['lower_share']:.0%}")
        median = statistics.median(row["per_image_mse"])
        print(f"| {name} | {row['cache_ratio']:.1%} | {row['mse']:.5f} | {median:.5f} | {row['psnr']:.2f} | {paired} | "
              f"{row['concept_accuracy']:.1%} | {speedup:.2f}x | {row['theoretical_speedup']:.2f}x |")
    with open(output, "w") as file:
        json.dump({"command": "python samples/compare_routers.py", "count": count, "steps": steps,
                   "match_flops": match_flops,
                   "guidance_scale": guidance_scale, "rows": rows}, file, indent=2)


if __name__ == "__main__":
    CLI(main, as_positional=False)
