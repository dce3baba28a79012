"""Routers searched on one kind of caption (one-object or two-object scenes) against the shipped router (searched on
a mix), on captions of that kind only, at the same budgets: mean PSNR of the final images against uncached and
the paired difference per image (95% bootstrap interval). Tuning seeds (70000+) to choose, held-out seeds (80000+)
to report:

    OMP_NUM_THREADS=1 python experiments/prompt_group_routers.py --objects 2 --count 16 --seed 70000 \
        --routers '{two_objects: runs/router/embedded_search_two_objects/router.safetensors}' \
        --budgets '[0.65,0.7,0.75,0.8]' --output outputs/two_objects_tuning.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from diffusers import PixArtAlphaPipeline
from jsonargparse import CLI

import dit_cache
from dit_cache.metrics import paired_difference, psnr as image_psnr
from dit_cache.toy.evaluation import generate, plan_error, prompt_set


def main(objects: int, routers: dict[str, str], budgets: list[float], count: int = 16, seed: int = 70_000,
         steps: int = 20, output: str = "outputs/prompt_group_routers.json") -> None:
    pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = prompt_set(objects, count, seed), list(range(seed, seed + count))
    call = dict(num_inference_steps=steps, guidance_scale=dit_cache.EMBEDDED_GUIDANCE_SCALE)
    reference = generate(pipe, prompts, seeds, batch_size=8, **call)
    path = Path(output)
    results = json.loads(path.read_text()) if path.exists() else {}
    for name, file in {"shipped": dit_cache.embedded_router_path(), **routers}.items():
        router = dit_cache.CacheRouter.load(file)
        for budget in budgets:
            key = f"{name} {budget:.0%}"
            if key not in results:
                error = plan_error(pipe, router.plan(skip_flops=budget), prompts, seeds, reference, **call)
                psnr = image_psnr(error["per_image_mse"]).tolist()
                results[key] = {"router": file, "budget": budget, "mean_psnr": float(np.mean(psnr)),
                                "per_image_psnr": psnr}
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(json.dumps(results, indent=1))
            line = f"{key:24s} {results[key]['mean_psnr']:6.2f} dB"
            shipped = results.get(f"shipped {budget:.0%}")
            if name != "shipped" and shipped is not None:
                d = paired_difference(results[key]["per_image_psnr"], shipped["per_image_psnr"])
                line += f"   vs shipped {d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"
            print(line, flush=True)


if __name__ == "__main__":
    CLI(main, as_positional=False)
