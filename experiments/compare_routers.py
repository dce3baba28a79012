"""HarmoniCa vs Learning-to-Cache vs a uniform (FORA) schedule on the embedded model, at matched cache ratio.

    dit-cache-train fit --config training/configs/embedded_flops.yaml # -> runs/router/embedded_flops/router.safetensors
    dit-cache-train fit --config training/configs/embedded_l2c.yaml   # -> runs/router/embedded_l2c/router.safetensors
    python experiments/compare_routers.py            # writes outputs/router_comparison.json

Error is measured on the final images against the uncached pipeline with the same seeds.

With ``--budgets`` it compares at matched FLOP shares instead (docs/router.md): the searched router (one file, any
budget), the HarmoniCa router calibrated to each budget, the whole-step greedy search, and the fixed presets
(uniform, taylor) at their own shares, paired per image with bootstrap intervals:

    OMP_NUM_THREADS=1 python experiments/compare_routers.py --budgets [0.45,0.55,0.65] --count 40 --seed 80000 \
        --output docs/results/archive/router_budgets.json
"""

import json
import resource
import shlex
import statistics
import sys
from pathlib import Path

from diffusers import PixArtAlphaPipeline
from jsonargparse import CLI

from dit_cache import EMBEDDED_GUIDANCE_SCALE, CachePlan, CacheRouter, CacheSchedule, embedded_model_path
from dit_cache.metrics import paired_difference, psnr
from dit_cache.toy.evaluation import generate, image_error, prompt_set
from dit_cache.toy.shapes import concept_accuracy
from dit_cache.flops import step_flops
from dit_cache.pipelines import AcceleratedPixArtAlphaPipeline


def main(routers: dict[str, str] = {"harmonica": "runs/router/embedded_flops/router.safetensors",
                                    "l2c": "runs/router/embedded_l2c/router.safetensors"},
         uniform_interval: int = 2, match_flops: bool = False, count: int = 100, steps: int = 20,
         guidance_scale: float = EMBEDDED_GUIDANCE_SCALE,
         seed: int = 20_000, output: str = "outputs/router_comparison.json",
         budgets: list[float] | None = None, searched: str = "runs/router/embedded_search/router.safetensors",
         whole_steps: str = "runs/router/embedded_search_steps/router.safetensors",
         presets: list[str] = ["uniform:2", "uniform:3", "taylor:2:1", "taylor:3:1", "taylor:3:2"],
         previous: list[str] = [], only: list[str] | None = None):
    """Args:
        routers: name -> router file.
        uniform_interval: the FORA baseline recomputes everything every this many steps.
        match_flops: move each router's threshold so it skips the same share of the units' FLOPs as the uniform
            schedule (default: the threshold it was trained with).
        count: prompts (half one-object, half two-object), each with its own seed.
        output: result JSON (with ``--budgets`` also a ``.md`` table and a ``.png`` plot beside it); the default
            is under the untracked ``outputs/``, so a run never overwrites the tracked results in docs/results/.
        budgets: compare at these shares of the units' FLOPs skipped (see the module docstring); ``routers`` then
            names the single-budget routers calibrated to each (default here: the HarmoniCa one).
        searched, whole_steps: router files of ``embedded_search.yaml`` and ``embedded_search_steps.yaml``.
        presets: fixed plans (``CachePlan.parse``) measured at their own shares.
        previous: result JSONs of earlier ``--budgets`` runs on the same prompts and seeds: their rows are kept and
            only the plans they lack run (wall-clock seconds then come from several runs). ``--searched ""``: no
            searched router (e.g. the baselines first, while the search runs).
        only: run only these methods (searched, harmonica, whole-step greedy, or a preset), e.g. in two processes.
    """
    if budgets is not None:
        return compare_budgets(budgets, searched, whole_steps, presets, count, steps, guidance_scale, seed, output,
                               previous, only)
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
                         "concept_accuracy": concept_accuracy(reference.images, prompts), "mse": 0.0,
                         "psnr": float("inf"), "per_image_mse": [0.0] * count, "seconds": reference.seconds}}
    for name, source in candidates.items():
        cached = AcceleratedPixArtAlphaPipeline.from_pipe(pipe, **source)
        cached.set_progress_bar_config(disable=True)
        generate(cached, prompts[:1], seeds[:1], desc="warm-up", **call)
        run = generate(cached, prompts, seeds, desc=name, **call)
        schedule = source["router"].schedule() if "router" in source else source["schedule"]
        rows[name] = {"cache_ratio": cached.cache_stats.cache_ratio,
                      "theoretical_speedup": schedule.theoretical_speedup(per_unit_flops, total_flops),
                      "concept_accuracy": concept_accuracy(run.images, prompts),
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
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w") as file:
        json.dump({"command": shlex.join(["python", *sys.argv]), "count": count, "steps": steps,
                   "match_flops": match_flops,
                   "guidance_scale": guidance_scale, "rows": rows}, file, indent=2)


def compare_budgets(budgets, searched, whole_steps, presets, count, steps, guidance_scale, seed, output, previous,
                    only=None):
    from dit_cache.embedded import ASSETS

    pipe = PixArtAlphaPipeline.from_pretrained(embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    prompts = prompt_set(1, count // 2, seed) + prompt_set(2, count - count // 2, seed + 1)
    seeds = list(range(seed, seed + count))
    call = {"num_inference_steps": steps, "guidance_scale": guidance_scale}
    unit_flops, total_flops = step_flops(pipe.transformer)
    units = len(unit_flops)
    harmonica_file = ASSETS / "embedded_router_harmonica.safetensors"
    harmonica = CacheRouter.load(harmonica_file if harmonica_file.exists() else ASSETS / "embedded_router.safetensors")
    searched_router, steps_router = CacheRouter.load(searched) if searched else None, CacheRouter.load(whole_steps)
    plans = {}
    for budget in budgets:
        harmonica.calibrate_threshold(budget, unit_weights=unit_flops)
        if searched_router is not None:
            plans[f"searched@{budget}"] = ("searched", budget, searched_router.plan(flops=budget))
        plans[f"harmonica@{budget}"] = ("harmonica", budget, harmonica.plan())
        if budget <= steps_router.flops_range[1] + 1e-9:  # the baseline was searched to a smaller budget
            plans[f"whole-step greedy@{budget}"] = ("whole-step greedy", budget, steps_router.plan(flops=budget))
    for spec in presets:
        plan = CachePlan.parse(spec, steps, units)
        plans[spec] = (spec, plan.cached_share(unit_flops), plan)
    if only is not None:
        plans = {name: entry for name, entry in plans.items() if entry[0] in only}
    rows, uncached_seconds = {}, None
    for earlier_path in previous:
        earlier = json.loads(Path(earlier_path).read_text())
        uncached_seconds = earlier["uncached_seconds"]
        if (earlier["count"], earlier["seeds"][0], earlier["steps"]) != (count, seed, steps):
            raise ValueError(f"{earlier_path} measured other prompts, seeds or steps; rerun without it.")
        rows.update({name: row for name, row in earlier["rows"].items() if name in plans})
    if set(plans) - set(rows):
        generate(pipe, prompts[:1], seeds[:1], desc="warm-up", **call)
        reference = generate(pipe, prompts, seeds, desc="uncached", **call)
        uncached_seconds = reference.seconds
    for name, (method, budget, plan) in plans.items():
        if name in rows:
            continue
        cached = AcceleratedPixArtAlphaPipeline.from_pipe(pipe, plan=plan)
        cached.set_progress_bar_config(disable=True)
        run = generate(cached, prompts, seeds, desc=name, **call)
        rows[name] = {"method": method, "budget": budget, "flop_share_skipped": plan.cached_share(unit_flops),
                      "theoretical_speedup": plan.theoretical_speedup(unit_flops, total_flops),
                      "counts": {k: v for k, v in plan.counts().items() if v},
                      "seconds": run.seconds, **image_error(run, reference)}
    for budget in budgets if f"searched@{budgets[0]}" in rows else []:
        for name, row in rows.items():
            if row["budget"] == budget and row["method"] != "searched":
                _pair(rows[f"searched@{budget}"], row)
    for name, row in rows.items():  # the presets against the searched router at the nearest budget
        if f"searched@{budgets[0]}" in rows and row["method"] not in ("searched", "harmonica", "whole-step greedy"):
            nearest = min(budgets, key=lambda b: abs(b - row["budget"]))
            if abs(nearest - row["budget"]) <= 0.02:
                _pair(rows[f"searched@{nearest}"], row)
    lines = [f"{count} prompts (half one-object, half two-object), seeds {seed}-{seed + count - 1}, "
             f"{steps} DPM-Solver steps, cfg {guidance_scale}; error of the final images against the uncached ones.",
             "", "| plan | FLOPs skipped (units) | FLOP speedup (transformer) | image MSE | PSNR (dB) | mean image PSNR "
             "(dB) | searched minus this, per-image MSE [95% bootstrap] | searched minus this, per-image PSNR (dB) "
             "| images where searched is better | wall clock (s) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, row in sorted(rows.items(), key=lambda item: (round(item[1]["budget"], 3), item[0])):
        difference, in_psnr = row.get("searched_minus_this"), row.get("searched_minus_this_psnr")
        paired = " | | " if difference is None else (
            f"{difference['mean']:+.5f} [{difference['low']:+.5f}, {difference['high']:+.5f}] | "
            f"{in_psnr['mean']:+.2f} [{in_psnr['low']:+.2f}, {in_psnr['high']:+.2f}] | {difference['lower_share']:.0%}")
        lines.append(f"| {name} | {row['flop_share_skipped']:.1%} | {row['theoretical_speedup']:.2f}x | "
                     f"{row['mse']:.5f} | {row['psnr']:.2f} | {row.get('mean_psnr', float('nan')):.2f} | {paired} | "
                     f"{row['seconds']:.1f} |")
    lines.append(f"\nuncached: {uncached_seconds:.1f} s; peak RSS of this process "
                 f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")
    table = "\n".join(lines)
    print(table)
    quoted = lambda value: shlex.quote(json.dumps(value))  # noqa: E731
    command = (f"OMP_NUM_THREADS=1 python experiments/compare_routers.py --budgets {quoted(budgets)} --count {count} "
               f"--seed {seed} --output {output}" + (f" --previous {quoted(previous)}" if previous else "")
               + (f" --only {quoted(only)}" if only else ""))
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w") as file:
        json.dump({"command": command, "count": count, "steps": steps, "guidance_scale": guidance_scale,
                   "seeds": [seed, seed + count - 1], "searched": searched, "whole_steps": whole_steps,
                   "uncached_seconds": uncached_seconds, "rows": rows}, file, indent=2)
    Path(output).with_suffix(".md").write_text(f"`{command}`\n\n{table}\n")
    _plot(rows, budgets, Path(output).with_suffix(".png"))


def _pair(ours: dict, row: dict) -> None:
    """The searched plan's row ``ours`` against ``row``, image by image: in MSE and in PSNR (the benchmark's figure;
    a mean of PSNR differences weighs every image alike, a mean of MSE differences follows the worst ones)."""
    row["searched_minus_this"] = paired_difference(ours["per_image_mse"], row["per_image_mse"])
    row["searched_minus_this_psnr"] = paired_difference(psnr(ours["per_image_mse"]).tolist(),
                                                        psnr(row["per_image_mse"]).tolist())


def _plot(rows, budgets, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6.4, 4.2))
    methods = dict.fromkeys(row["method"] for row in rows.values())
    for method in methods:
        points = sorted((row["flop_share_skipped"], row["psnr"]) for row in rows.values() if row["method"] == method)
        style = "o-" if method in ("searched", "harmonica", "whole-step greedy") else "s"
        axis.plot(*zip(*points), style, label=method)
    axis.set_xlabel("share of the units' FLOPs skipped")
    axis.set_ylabel("PSNR vs uncached (dB)")
    axis.grid(alpha=0.3)
    axis.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)


if __name__ == "__main__":
    CLI(main, as_positional=False)
