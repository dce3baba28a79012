"""The adaptive router (dit_cache/adaptive.py) against the static shipped router at matched average FLOPs.

Two phases, each a JSON file of per-image figures (resumable: rerunning a phase skips what its file has):

  # the error table: per image its step-0 signal and the final-image PSNR of every ladder plan
  python experiments/adaptive_router.py table --seed 10000 --count 24 --out runs/adaptive/calibration.json
  python experiments/adaptive_router.py table --seed 80000 --count 32 --out runs/adaptive/heldout.json
  # fit a rule per budget on the calibration table; on the held-out images, the static router at the rule's
  # realised mean budget, compared paired per image (bootstrap intervals); writes the markdown and JSON
  python experiments/adaptive_router.py evaluate --calibration runs/adaptive/calibration.json \
      --heldout runs/adaptive/heldout.json --budgets 0.5 0.6 0.7 --out docs/results/adaptive_router

The adaptive router's image for an image is bitwise its chosen ladder plan's image (the switch happens after step
0, which every ladder plan computes in full); ``evaluate`` reruns a few held-out images through
``apply_adaptive`` to check that, so the table's figures are what the adaptive router really produces.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import numpy as np
import torch

from dit_cache.flops import percent

LADDER = tuple(round(0.3 + 0.05 * i, 2) for i in range(11))  # 0.30 ... 0.80, the shipped router's coarse range


def _pipe():
    from diffusers import DiffusionPipeline

    import dit_cache

    pipe = DiffusionPipeline.from_pretrained(dit_cache.embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _inputs(count: int, seed: int) -> list[dict]:
    from dit_cache.bench.peer_bench import _caption_inputs

    return _caption_inputs(None, count, seed)


def _call(item: dict, seed: int, steps: int = 20) -> dict:
    from dit_cache.embedded import EMBEDDED_GUIDANCE_SCALE

    return {**item, "generator": torch.Generator().manual_seed(seed), "num_inference_steps": steps,
            "guidance_scale": EMBEDDED_GUIDANCE_SCALE, "output_type": "np"}


def _psnr(image: np.ndarray, reference: np.ndarray) -> float:
    mse = float(((image.astype(np.float64) - reference.astype(np.float64)) ** 2).mean())
    return 100.0 if mse == 0 else min(100.0, 10 * np.log10(1.0 / mse))


def _signal_of_uncached(pipe, call: dict) -> tuple[np.ndarray, float]:
    from dit_cache.adaptive import step_signal

    seen = []

    def hook(module, args, kwargs, output):
        if not seen:
            hidden = args[0] if args else kwargs["hidden_states"]
            seen.append(float(step_signal(hidden, output[0] if isinstance(output, tuple) else output.sample, True)))

    handle = pipe.transformer.register_forward_hook(hook, with_kwargs=True)
    try:
        image = pipe(**call).images[0]
    finally:
        handle.remove()
    return image, seen[0]


def _prompt_tokens(pipe, prompt: str) -> float:
    """The prompt_tokens signal of a prompt: the attended tokens of the mask its pipeline hands the transformer."""
    _, mask, _, _ = pipe.encode_prompt(prompt, do_classifier_free_guidance=False, clean_caption=False)
    return float(mask.sum())


def _run_plan(pipe, plan, call: dict) -> np.ndarray:
    from dit_cache.pipelines import accelerate, decelerate

    accelerate(pipe, plan=plan)
    try:
        return pipe(**call).images[0]
    finally:
        decelerate(pipe)


def table(args) -> None:
    import dit_cache
    from dit_cache.adaptive import ladder_plans

    router = dit_cache.CacheRouter.load(dit_cache.embedded_router_path())
    plans = ladder_plans(router, LADDER)
    out = Path(args.out)
    done = json.loads(out.read_text()) if out.exists() else {"ladder": list(LADDER), "images": []}
    skipped = [p.cached_share(router.unit_flops) for p in plans]
    done["skipped"] = skipped
    pipe = _pipe()
    inputs = _inputs(args.count, args.seed)
    if args.refresh:
        _refresh(pipe, done, plans, args.refresh, inputs, args.seed, out)
    for index in range(len(done["images"]), args.count):
        seed = args.seed + index
        call = _call(inputs[index], seed)
        reference, signal = _signal_of_uncached(pipe, call)
        psnr = [_psnr(_run_plan(pipe, plan, _call(inputs[index], seed)), reference) for plan in plans]
        done["images"].append({"seed": seed, "prompt": inputs[index]["prompt"], "signal": signal, "psnr": psnr})
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(done, indent=1))
        print(f"{index + 1}/{args.count} signal {signal:.4f} psnr {' '.join(f'{p:.1f}' for p in psnr)}", flush=True)


def _refresh(pipe, done: dict, plans, budgets: list[float], inputs: list[dict], seed: int, out: Path) -> None:
    """Recompute the columns of ``budgets`` in a table whose router's plans there changed (resumable: each image's
    refreshed budgets are recorded)."""
    columns = [LADDER.index(round(b, 2)) for b in budgets]
    for index, image in enumerate(done["images"]):
        if image["prompt"] != inputs[index]["prompt"] or image["seed"] != seed + index:
            raise ValueError(f"{out} was made with other --seed / --count than given: image {index} differs.")
        todo = [j for j in columns if LADDER[j] not in image.setdefault("refreshed", [])]
        if not todo:
            continue
        reference, _ = _signal_of_uncached(pipe, _call(inputs[index], seed + index))
        for j in todo:
            image["psnr"][j] = _psnr(_run_plan(pipe, plans[j], _call(inputs[index], seed + index)), reference)
            image["refreshed"].append(LADDER[j])
        out.write_text(json.dumps(done, indent=1))
        scores = " ".join(f"{image['psnr'][j]:.1f}" for j in todo)
        print(f"refreshed {index + 1}/{len(done['images'])}: {scores}", flush=True)


def evaluate(args) -> None:
    import dit_cache
    from dit_cache.adaptive import apply_adaptive, fit_rule, ladder_plans, remove_adaptive
    from dit_cache.metrics import paired_difference

    calibration, heldout = json.loads(Path(args.calibration).read_text()), json.loads(Path(args.heldout).read_text())
    ladder, skipped = calibration["ladder"], calibration["skipped"]
    router = dit_cache.CacheRouter.load(dit_cache.embedded_router_path())
    pipe = _pipe() if args.static == "run" or args.signal == "prompt_tokens" else None
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    images = heldout["images"][: args.limit]
    if args.signal == "prompt_tokens":  # what the switch reads at run time: the prompt's attended tokens
        calibration_signals = [_prompt_tokens(pipe, i["prompt"]) for i in calibration["images"]]
        held_signals = [_prompt_tokens(pipe, i["prompt"]) for i in images]
    else:
        calibration_signals = [i["signal"] for i in calibration["images"]]
        held_signals = [image["signal"] for image in images]
    held_psnr = np.array([image["psnr"] for image in images])
    inputs = _inputs(len(heldout["images"]), heldout["images"][0]["seed"])
    rules, picks, static_plans = {}, {}, {}
    name = args.objective if args.signal == "cfg_gap" else f"{args.signal}_{args.objective}"
    for budget in args.budgets:
        rule = fit_rule(calibration_signals, [i["psnr"] for i in calibration["images"]], skipped, ladder, budget,
                        bins=args.bins, tolerance=args.tolerance, signal=args.signal, objective=args.objective)
        rule.save(out / f"rule_{name}_{percent(budget, sign=False)}.safetensors")
        rules[budget], picks[budget] = rule, [rule.pick(s) for s in held_signals]
        realised = float(np.mean([skipped[j] for j in picks[budget]]))
        static_plans[budget] = (realised, router.plan(skip_flops=realised))  # the static router at the same mean FLOPs
    static_psnr = {budget: [] for budget in args.budgets}
    if args.static == "ladder":
        # No pipeline runs: the static router at the ladder budget at or below the adaptive router's realised mean
        # (it spends at least as many FLOPs: the comparison can only favour the static router), from the table.
        for budget in args.budgets:
            realised = static_plans[budget][0]
            column = max(j for j, share in enumerate(skipped) if share <= realised + 1e-9)
            static_plans[budget] = (realised, ladder_plans(router, [ladder[column]])[0])
            static_psnr[budget] = held_psnr[:, column].tolist()
        images_to_run = []
    else:
        images_to_run = images
    for index, image in enumerate(images_to_run):
        reference = pipe(**_call(inputs[index], image["seed"])).images[0]
        for budget in args.budgets:
            static = _run_plan(pipe, static_plans[budget][1], _call(inputs[index], image["seed"]))
            static_psnr[budget].append(_psnr(static, reference))
            if index < args.check:  # the adaptive router itself reproduces its chosen ladder plan's image
                apply_adaptive(pipe, router, rules[budget])
                try:
                    measured = _psnr(pipe(**_call(inputs[index], image["seed"])).images[0], reference)
                finally:
                    remove_adaptive(pipe)
                if abs(measured - held_psnr[index, picks[budget][index]]) > 1e-9:
                    raise RuntimeError(f"adaptive run {measured} != table {held_psnr[index, picks[budget][index]]}")
        print(f"image {index + 1}/{len(images)}", flush=True)
    results = []
    for budget in args.budgets:
        rule, realised, plan = rules[budget], *static_plans[budget]
        adaptive_psnr = [float(held_psnr[i, j]) for i, j in enumerate(picks[budget])]
        difference = paired_difference(adaptive_psnr, static_psnr[budget], args.resamples)
        # The same plans in the same proportions, handed out without the signal (every permutation equally
        # likely): what mixing alone gives. The signal's own contribution is the adaptive rule's lead over it.
        rng = np.random.default_rng(0)
        shuffled = [float(np.mean(held_psnr[np.arange(len(images)), rng.permutation(picks[budget])]))
                    for _ in range(2000)]
        mse = lambda values: float(np.mean(10.0 ** (-np.asarray(values) / 10)))
        results.append({"budget": budget, "rule": {k: getattr(rule, k) for k in rule.__dataclass_fields__},
                        "realised_skipped": realised, "static_plan_skipped": plan.cached_share(router.unit_flops),
                        "static": args.static,
                        "adaptive_psnr_mean": float(np.mean(adaptive_psnr)),
                        "static_psnr_mean": float(np.mean(static_psnr[budget])), "difference": difference,
                        "picks": picks[budget], "adaptive_psnr": adaptive_psnr, "static_psnr": static_psnr[budget],
                        "better_share": float(np.mean(np.array(adaptive_psnr) > np.array(static_psnr[budget]))),
                        "shuffled_psnr_mean": float(np.mean(shuffled)),
                        "shuffled_psnr_interval": [float(np.quantile(shuffled, 0.025)),
                                                   float(np.quantile(shuffled, 0.975))],
                        "adaptive_mse_mean": mse(adaptive_psnr), "static_mse_mean": mse(static_psnr[budget]),
                        "adaptive_psnr_median": float(np.median(adaptive_psnr)),
                        "static_psnr_median": float(np.median(static_psnr[budget]))})
    (out / f"adaptive_router_{name}_{args.static}.json").write_text(json.dumps({"ladder": ladder, "skipped": skipped,
                                                          "calibration": args.calibration,
                                                          "heldout": args.heldout, "results": results}, indent=1))
    lines = [f"signal {args.signal}, objective {args.objective}, static router {'run at' if args.static == 'run' else 'ladder plan at or below'} "
             f"the realised mean budget, {args.bins} bins, {len(calibration['images'])} calibration images, "
             f"{len(images)} held-out images", "",
             "| budget asked | held-out mean FLOPs skipped | adaptive PSNR mean / median | static router PSNR mean / "
             "median (same FLOPs) | adaptive - static PSNR [95% CI] | images better | same plans shuffled: PSNR "
             "[95%] | MSE adaptive / static |", "|---|---|---|---|---|---|---|---|"]
    for r in results:
        d = r["difference"]
        lines.append(f"| {percent(r['budget'])} | {r['realised_skipped']:.1%} | {r['adaptive_psnr_mean']:.2f} / "
                     f"{r['adaptive_psnr_median']:.2f} | {r['static_psnr_mean']:.2f} / {r['static_psnr_median']:.2f} "
                     f"| {d['mean']:+.2f} [{d['low']:+.2f}, {d['high']:+.2f}] | {r['better_share']:.0%} | "
                     f"{r['shuffled_psnr_mean']:.2f} [{r['shuffled_psnr_interval'][0]:.2f}, "
                     f"{r['shuffled_psnr_interval'][1]:.2f}] | {r['adaptive_mse_mean']:.5f} / "
                     f"{r['static_mse_mean']:.5f} |")
    (out / f"adaptive_router_{name}_{args.static}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def main() -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    t = commands.add_parser("table")
    t.add_argument("--seed", type=int, required=True)
    t.add_argument("--count", type=int, required=True)
    t.add_argument("--out", required=True)
    t.add_argument("--refresh", type=float, nargs="*", default=[],
                   help="ladder budgets whose columns of the table at --out are recomputed (the router's plans there "
                   "changed), before any new images are added")
    e = commands.add_parser("evaluate")
    e.add_argument("--calibration", required=True)
    e.add_argument("--heldout", required=True)
    e.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.6, 0.7])
    e.add_argument("--bins", type=int, default=3)
    e.add_argument("--tolerance", type=float, default=0.01)
    e.add_argument("--check", type=int, default=2, help="held-out images rerun through apply_adaptive")
    e.add_argument("--static", choices=("run", "ladder"), default="run",
                   help="run: the static router at the realised mean budget, on the held-out images; ladder: its "
                   "table column at the ladder budget at or below that mean (no pipeline runs)")
    e.add_argument("--objective", choices=("psnr", "mse"), default="psnr")
    e.add_argument("--signal", choices=("cfg_gap", "prompt_tokens"), default="cfg_gap",
                   help="cfg_gap: the table's step-0 signal; prompt_tokens: the prompt's attended tokens")
    e.add_argument("--limit", type=int, default=None, help="only the first N held-out images")
    e.add_argument("--resamples", type=int, default=10_000)
    e.add_argument("--out", required=True)
    args = parser.parse_args()
    table(args) if args.command == "table" else evaluate(args)


if __name__ == "__main__":
    main()
