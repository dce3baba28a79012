"""Partial steps between the shipped router's whole-step levels (70% and 75% of the units' FLOPs skipped).

``cfg``: one step CFG_SHARE (the conditional half of the CFG batch computed, the unconditional half rebuilt from the
newest computed difference): a computed step of the 70% plan, or a skipped step of the 75% plan (72.5% either way).
``drop``: one branch (attn1, attn2 or ff, in every block) forecast instead of computed at one computed step of the
70% plan, or at all of them but the first. ``add``: one branch computed at one skipped step of the 75% plan.
Mean PSNR of the final images against uncached, on tuning seeds (70000+, half two-object prompts), and on how many
images each candidate beats the 75% plan:

    OMP_NUM_THREADS=2 python experiments/partial_steps.py --count 16 --output outputs/partial_steps.json
"""

from __future__ import annotations

import json
from pathlib import Path

from diffusers import PixArtAlphaPipeline
from jsonargparse import CLI

import dit_cache
from dit_cache import CachePlan
from dit_cache.plan import Action
from dit_cache.router import plan_with_fallbacks
from dit_cache.metrics import psnr as image_psnr
from dit_cache.toy.evaluation import generate, plan_error, prompt_set


BRANCHES = ("attn1", "attn2", "ff")  # a PixArt block's units, in the engine's unit order


def changed(plan: CachePlan, steps: list[int], action: Action, branch: str | None = None) -> CachePlan:
    """``plan`` with ``action`` at ``steps`` for every unit (or only the ``branch`` units of every block); a
    forecast that lost one of its two computed outputs falls back to reuse."""
    actions = plan.actions.clone()
    units = slice(None) if branch is None else slice(BRANCHES.index(branch), None, len(BRANCHES))
    for step in steps:
        actions[step, units] = int(action)
    return plan_with_fallbacks(actions)


def computed_steps(plan: CachePlan) -> list[int]:
    return [step for step, row in enumerate(plan.actions) if bool((row == Action.COMPUTE).all())]


def candidates(router, kinds: list[str]) -> dict[str, CachePlan]:
    coarse, fine = router.plan(skip_flops=0.75), router.plan(skip_flops=0.7)
    found = {"70% plan": fine, "75% plan": coarse}
    later = computed_steps(fine)[1:]
    skipped = [step for step in range(1, coarse.num_steps) if step not in computed_steps(coarse)]
    if "cfg" in kinds:
        found.update({f"70% plan, step {s} half": changed(fine, [s], Action.CFG_SHARE) for s in later})
        found.update({f"75% plan, step {s} half": changed(coarse, [s], Action.CFG_SHARE) for s in skipped})
    if "drop" in kinds:
        for branch in BRANCHES:
            found.update({f"70% plan, step {s} without {branch}": changed(fine, [s], Action.FORECAST1, branch)
                          for s in later})
            found[f"70% plan, steps {later} without {branch}"] = changed(fine, later, Action.FORECAST1, branch)
    if "add" in kinds:
        for branch in BRANCHES:
            found.update({f"75% plan, step {s} with {branch}": changed(coarse, [s], Action.COMPUTE, branch)
                          for s in skipped})
    return found


def main(count: int = 16, seed: int = 70_000, steps: int = 20, kinds: list[str] = ("cfg", "drop", "add"),
         only: list[str] | None = None, store_shared: bool = False, output: str = "outputs/partial_steps.json") -> None:
    if store_shared:  # a CFG_SHARE step's rebuilt output joins its unit's history, as a computed one does
        from dit_cache.state import CacheState

        shared = CacheState.cfg_share

        def storing(self, unit, forward, args, kwargs):
            output = shared(self, unit, forward, args, kwargs)
            self.store(unit, output)
            return output

        CacheState.cfg_share = storing
    pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    prompts = prompt_set(2, count // 2, seed) + prompt_set(1, count - count // 2, seed)
    seeds = list(range(seed, seed + count))
    call = dict(num_inference_steps=steps, guidance_scale=dit_cache.EMBEDDED_GUIDANCE_SCALE)
    reference = generate(pipe, prompts, seeds, batch_size=8, **call)
    router = dit_cache.CacheRouter.load(dit_cache.embedded_router_path())
    path = Path(output)
    results = json.loads(path.read_text()) if path.exists() else {}
    for name, plan in candidates(router, kinds).items():
        if name in results or (only and name not in only):
            continue
        error = plan_error(pipe, plan, prompts, seeds, reference, **call)
        psnrs = image_psnr(error["per_image_mse"]).tolist()
        results[name] = {"flops": plan.cached_share(router.unit_flops), "mean_psnr": error["mean_psnr"],
                         "mse": error["mse"], "per_image_psnr": psnrs}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=1))
        base = results.get("75% plan", {}).get("per_image_psnr")
        wins = "" if base is None else f"  better than 75% on {sum(a > b for a, b in zip(psnrs, base))}/{count}"
        print(f"{name:34s} {results[name]['flops']:.3f}  {error['mean_psnr']:6.2f} dB  mse {error['mse']:.5f}{wins}",
              flush=True)


if __name__ == "__main__":
    CLI(main, as_positional=False)
