"""Every whole-step plan with a given set of computed steps in a window, scored on a few tuning images: is there
a plan at the shipped router's 75% budget (5 computed steps of 20) that the greedy search and its +-1 refinement
missed? Each skipped step forecasts (FORECAST1, REUSE where a unit has computed once); the score is the final-latent
MSE against uncached (the search's own error), its mean and mean log10 over the images:

    OMP_NUM_THREADS=1 python experiments/plan_enumeration.py search --actions '[forecast_two]' --shard 0 \
        --shards 2 --output outputs/enum_75_0.json     # and --shard 1 beside it

``forecast_two`` (FORECAST1 on the two steps after a computed one, REUSE further on) scores the shipped plan's
computed steps as well as its searched actions do. ``verify`` then scores the best plans of those files by the
final images' PSNR on other tuning images, paired per image against the shipped 75% plan:

    OMP_NUM_THREADS=2 python experiments/plan_enumeration.py verify --results '[outputs/enum_75_0.json,
        outputs/enum_75_1.json]' --top 6 --count 16 --seed 70000 --output outputs/enum_75_verify.json
"""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import numpy as np
import torch
from diffusers import PixArtAlphaPipeline
from jsonargparse import CLI

import dit_cache
from dit_cache.plan import Action, CachePlan
from dit_cache.router import plan_with_fallbacks
from dit_cache.metrics import paired_difference, psnr as image_psnr
from dit_cache.toy.evaluation import generate, plan_error, prompt_set


# What each skipped step does, by its distance to the last computed step (1: the step right after it).
ACTION_RULES = {
    "forecast": lambda distance: Action.FORECAST1,
    "reuse": lambda distance: Action.REUSE,
    "forecast_first": lambda distance: Action.FORECAST1 if distance == 1 else Action.REUSE,
    "forecast_two": lambda distance: Action.FORECAST1 if distance <= 2 else Action.REUSE,
    "reuse_first": lambda distance: Action.REUSE if distance == 1 else Action.FORECAST1,
}


def plan_of(computed: tuple[int, ...], num_steps: int, num_units: int, actions: str = "forecast"):
    codes = torch.full((num_steps, num_units), int(Action.COMPUTE), dtype=torch.int8)
    last = 0
    for step in range(1, num_steps):
        if step in computed:
            last = step
        else:
            codes[step] = int(ACTION_RULES[actions](step - last))
    return plan_with_fallbacks(codes)


def _tuning_images(count: int, seed: int, steps: int):
    """The embedded pipeline, its unit count, ``count`` tuning captions (half two-object) and seeds, and their
    uncached final latents."""
    pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    units = len(dit_cache.cache_units(pipe.transformer))
    prompts = prompt_set(2, count // 2, seed) + prompt_set(1, count - count // 2, seed)
    seeds = list(range(seed, seed + count))
    return pipe, units, prompts, seeds, latents(pipe, prompts, seeds, steps)


def _latent_mse(pipe, plan, prompts, seeds, steps, reference) -> torch.Tensor:
    """Per image, the final latent's MSE under ``plan`` against ``reference``."""
    dit_cache.accelerate(pipe, plan=plan)
    try:
        return ((latents(pipe, prompts, seeds, steps) - reference) ** 2).flatten(1).mean(1).double()
    finally:
        dit_cache.decelerate(pipe)


def latents(pipe, prompts, seeds, steps):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    return pipe(prompts, generator=generators, num_inference_steps=steps, output_type="latent",
                guidance_scale=dit_cache.EMBEDDED_GUIDANCE_SCALE, clean_caption=False).images


def search(windows: list[list[int]] = ([2, 6], [5, 10], [8, 14], [14, 18]), count: int = 4, seed: int = 70_100,
         steps: int = 20, actions: list[str] = ("forecast",), shard: int = 0, shards: int = 1, output: str = "outputs/plan_enumeration.json") -> None:
    torch.set_num_threads(1)
    pipe, units, prompts, seeds, reference = _tuning_images(count, seed, steps)
    combos = [c for c in itertools.combinations(range(1, steps), len(windows))
              if all(low <= step <= high for step, (low, high) in zip(c, windows))]
    shipped = dit_cache.CacheRouter.load(dit_cache.embedded_router_path()).plan(skip_flops=0.75)
    candidates = {"shipped 75%": shipped} if shard == 0 else {}
    candidates.update({f"{' '.join(map(str, c))} {rule}": plan_of(c, steps, units, rule)
                       for c in combos[shard::shards] for rule in actions})
    path = Path(output)
    results = json.loads(path.read_text()) if path.exists() else {}
    for name, plan in candidates.items():
        if name in results:
            continue
        mse = _latent_mse(pipe, plan, prompts, seeds, steps, reference)
        results[name] = {"mse": float(mse.mean()), "log_mse": float(mse.log10().mean()), "per_image": mse.tolist()}
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results))
    best = sorted(results.items(), key=lambda item: item[1]["log_mse"])[:10]
    for name, r in best:
        print(f"{name:28s} log10 MSE {r['log_mse']:.3f}  MSE {r['mse']:.5f}")


def _parse(name: str, steps: int, units: int, known: dict | None = None):
    """The plan a name stands for: ``"4 6 9 16 forecast_two"`` (computed steps and an action rule), or a name
    ``known`` holds the action codes of (a ``refine`` output)."""
    if known and "codes" in known.get(name, {}):
        return CachePlan(torch.tensor(known[name]["codes"], dtype=torch.int8))
    *computed, rule = name.split()
    return plan_of(tuple(int(step) for step in computed), steps, units, rule)


def _known(files: list[str]) -> dict:
    known = {}
    for file in files:
        known.update(json.loads(Path(file).read_text()))
    return known


def refine(start: str, count: int = 8, seed: int = 70_100, steps: int = 20, passes: int = 2,
           output: str = "outputs/plan_refinement.json") -> None:
    """Coordinate descent on the skipped steps' actions of the plan ``start`` (a name as ``verify`` takes): each
    skipped step in turn tries REUSE, FORECAST1 and FORECAST2 for all its units (a step every unit skips alike
    stays foldable) and keeps the one with the lowest mean log10 final-latent MSE on ``count`` tuning images.
    Writes ``{name: {"codes", "log_mse"}}`` with the name ``"<start> refined"``, which ``verify`` and ``adopt``
    take with ``--known``."""
    pipe, units, prompts, seeds, reference = _tuning_images(count, seed, steps)
    scores: dict[bytes, float] = {}

    def score(codes: torch.Tensor) -> float:
        plan = plan_with_fallbacks(codes)
        key = plan.actions.numpy().tobytes()
        if key not in scores:
            scores[key] = float(_latent_mse(pipe, plan, prompts, seeds, steps, reference).log10().mean())
        return scores[key]

    codes = _parse(start, steps, units).actions.clone()
    best = score(codes)
    print(f"{start}: log10 MSE {best:.3f}", flush=True)
    skipped = [step for step in range(1, steps) if not bool((codes[step] == Action.COMPUTE).all())]
    for round_ in range(passes):
        changed = False
        for step in skipped:
            for action in (Action.REUSE, Action.FORECAST1, Action.FORECAST2):
                trial = codes.clone()
                trial[step] = int(action)
                value = score(trial)
                if value < best - 1e-4:
                    best, codes, changed = value, plan_with_fallbacks(trial).actions.clone(), True
                    print(f"pass {round_ + 1} step {step} -> {action.name}: log10 MSE {best:.3f}", flush=True)
        if not changed:
            break
    result = {f"{start} refined": {"codes": codes.tolist(), "log_mse": best, "start": start,
                                   "start_log_mse": score(_parse(start, steps, units).actions)}}
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    Path(output).write_text(json.dumps(result))


def verify(results: list[str] = (), top: int = 6, count: int = 16, seed: int = 70_000, steps: int = 20,
           plans: list[str] = (), baseline: str = "shipped 75%", known: list[str] = (),
           output: str = "outputs/plan_enumeration_verify.json") -> None:
    """``plans``: plan names to score (e.g. ``"4 6 9 16 forecast_two"``) instead of the ``top`` of ``results``;
    each is compared with ``baseline`` ("shipped 75%" or "shipped 70%"), paired per image."""
    scored = {}
    for file in results:
        scored.update(json.loads(Path(file).read_text()))
    best = list(plans) or [name for name, _ in sorted(scored.items(), key=lambda item: item[1]["log_mse"])
                           if not name.startswith("shipped")]
    pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    units = len(dit_cache.cache_units(pipe.transformer))
    prompts = prompt_set(2, count // 2, seed) + prompt_set(1, count - count // 2, seed)
    seeds = list(range(seed, seed + count))
    call = dict(num_inference_steps=steps, guidance_scale=dit_cache.EMBEDDED_GUIDANCE_SCALE)
    reference = generate(pipe, prompts, seeds, batch_size=8, **call)
    router = dit_cache.CacheRouter.load(dit_cache.embedded_router_path())
    candidates = {"shipped 75%": router.plan(skip_flops=0.75), "shipped 70%": router.plan(skip_flops=0.7),
                  **{name: _parse(name, steps, units, _known(known)) for name in best[:top]}}
    path = Path(output)
    done = json.loads(path.read_text()) if path.exists() else {}
    for name, plan in candidates.items():
        if name not in done:
            error = plan_error(pipe, plan, prompts, seeds, reference, **call)
            psnr = image_psnr(error["per_image_mse"]).tolist()
            done[name] = {"flops": plan.cached_share(router.unit_flops), "mean_psnr": float(np.mean(psnr)),
                          "per_image_psnr": psnr, "codes": plan.actions.tolist()}
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(done))
    for name in candidates:
        line = f"{name:28s} {done[name]['flops']:.3f} {done[name]['mean_psnr']:6.2f} dB"
        if name != baseline:
            d = paired_difference(done[name]["per_image_psnr"], done[baseline]["per_image_psnr"])
            line += f"  vs {baseline}: {d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}]"
        print(line, flush=True)


def adopt(plans: list[str], base: str = "dit_cache/assets/embedded_router.safetensors",
          output: str = "outputs/router_with_enumerated_plans.safetensors", steps: int = 20,
          known: list[str] = ()) -> None:
    """A copy of the router ``base`` whose plans at the budgets of ``plans`` (names as ``verify`` prints them) are
    those plans (``CacheRouter.with_plans``); ``output`` may be ``base``."""
    router = dit_cache.CacheRouter.load(base)
    adopted = [_parse(name, steps, router.num_units, _known(known)) for name in plans]
    merged = router.with_plans(adopted, found_by="experiments/plan_enumeration.py", names=list(plans))
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    merged.save(output)
    for name, plan in zip(plans, adopted):
        print(f"{output}: {name} at {plan.cached_share(router.unit_flops):.0%} of the FLOPs skipped")


if __name__ == "__main__":
    CLI([search, verify, refine, adopt], as_positional=False)
