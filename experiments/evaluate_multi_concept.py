"""Both-concepts-present rate of two-object prompts on the embedded model: baseline vs Correction by
Similarities vs Cross-Token NMS vs both, with and without caching, and the time each fix costs.

    python experiments/evaluate_multi_concept.py            # writes outputs/multi_concept.json
    python experiments/evaluate_multi_concept.py --correction_alpha 0.5 --nms_step_fraction 0.3
    python experiments/evaluate_multi_concept.py --with_cache false --count 100 --methods "[both]"   # a sweep point
"""

import json
import math
import shlex
import sys
from collections import Counter
from pathlib import Path
from typing import Literal

from diffusers import PixArtAlphaPipeline
from jsonargparse import CLI
from tqdm.auto import tqdm

from dit_cache import EMBEDDED_GUIDANCE_SCALE, embedded_model_path, embedded_router_path
from dit_cache.toy import shapes
from dit_cache.toy.evaluation import generate, prompt_set
from dit_cache.pipelines import AcceleratedPixArtAlphaPipeline, MultiConceptConfig


METHODS = ("baseline", "correction by similarities", "cross-token NMS", "both")


def prompt_concepts(prompt: str, kind: str) -> tuple[str, ...]:
    """The concepts of a two-object caption: its shape words, its color words, or its object phrases."""
    objects = shapes.parse_caption(prompt)
    if kind == "objects":
        return tuple(f"{color} {shape}" for color, shape in objects)
    # In prompt order, which fixes the batches (and so the images) of the runs the README reports.
    return tuple(dict.fromkeys(color if kind == "colors" else shape for color, shape in objects))


def paired_change(before: list[bool], after: list[bool]) -> str:
    """Prompts a method fixed and broke against the baseline, with the exact two-sided McNemar p-value."""
    fixed = sum(not b and a for b, a in zip(before, after))
    broken = sum(b and not a for b, a in zip(before, after))
    changed = fixed + broken
    tail = sum(math.comb(changed, k) for k in range(min(fixed, broken) + 1)) / 2**changed
    return f"{fixed} / {broken} (p = {min(1.0, 2 * tail):.2f})"


def main(model: str | None = None, count: int = 200, steps: int = 20,
         guidance_scale: float = EMBEDDED_GUIDANCE_SCALE, seed: int = 30_000,
         correction_alpha: float = 0.25, correction_threshold: float = 0.5, correction_window: int = 2,
         nms_suppression: float = 0.0, nms_step_fraction: float = 0.5, nms_blocks: list[int] | None = None,
         nms_renormalize: bool = True,
         concept_words: Literal["shapes", "colors", "objects"] = "shapes", with_cache: bool = True,
         methods: list[str] = list(METHODS), output: str = "outputs/multi_concept.json"):
    """Args:
        model: a PixArt pipeline folder or hub id (default: the embedded model). The cached rows use the embedded
            model's router, which fits the embedded architecture only: pass ``--with_cache false`` for another one.
        count: two-object prompts, each with its own seed.
        correction_alpha / correction_threshold / correction_window: Correction by Similarities.
        nms_suppression / nms_step_fraction / nms_blocks / nms_renormalize: Cross-Token NMS (blocks: None = every
            block).
        concept_words: the concepts of "a red circle and a blue square": the shape words, the color words, or
            the objects' phrases ("red circle", "blue square"; each phrase's tokens win or lose NMS together).
        with_cache: also evaluate with the embedded router's caching (off for quick parameter sweeps).
        methods: which of the four rows to run (the time ratio needs ``baseline`` among them).
        output: result JSON (default under the untracked ``outputs/``; the tracked results are in docs/results/).
    """
    unknown = sorted(set(methods) - set(METHODS))
    if unknown:
        raise ValueError(f"unknown methods {unknown}; choose from {list(METHODS)}")
    stock = PixArtAlphaPipeline.from_pretrained(model or embedded_model_path())
    uncached = AcceleratedPixArtAlphaPipeline.from_pipe(stock)  # no router: stock generation, plus concepts=
    cached = AcceleratedPixArtAlphaPipeline.from_pipe(stock, router=embedded_router_path())
    for pipe in (uncached, cached):
        pipe.set_progress_bar_config(disable=True)
    prompts = prompt_set(2, count, seed)
    seeds = list(range(seed, seed + count))
    correction = dict(correction_alpha=correction_alpha, correction_threshold=correction_threshold,
                      correction_window=correction_window)
    nms = dict(nms_suppression=nms_suppression, nms_step_fraction=nms_step_fraction, nms_renormalize=nms_renormalize,
               nms_blocks=None if nms_blocks is None else tuple(nms_blocks))
    configs = {
        "baseline": None,
        "correction by similarities": MultiConceptConfig(nms=False, **correction),
        "cross-token NMS": MultiConceptConfig(correction_alpha=0.0, **nms),
        "both": MultiConceptConfig(**correction, **nms),
    }
    configs = {name: configs[name] for name in METHODS if name in methods}
    rows = {}
    # Batched by concept words, as in the runs the README reports (a call may now take one list per prompt,
    # but a different batch composition changes the images slightly).
    groups = {}
    for i, prompt in enumerate(prompts):
        groups.setdefault(prompt_concepts(prompt, concept_words), []).append(i)
    call = {"num_inference_steps": steps, "guidance_scale": guidance_scale}

    def method_call(config, words):
        return call if config is None else {**call, "concepts": list(words), "concept_config": config}

    for cache_name, pipe in (("no cache", uncached), ("cached", cached))[: 2 if with_cache else 1]:
        # One untimed call per method first, so no row pays for first-call allocations.
        first_words, first_index = next(iter(groups.items()))
        for config in configs.values():
            generate(pipe, [prompts[first_index[0]]], [seed], desc="warm-up", **method_call(config, first_words))
        images = {method: [None] * count for method in configs}
        seconds = dict.fromkeys(configs, 0.0)
        # The methods take turns on each batch, so a change in the machine's load reaches every row alike.
        for words, index in tqdm(groups.items(), desc=cache_name):
            for method, config in configs.items():
                run = generate(pipe, [prompts[i] for i in index], [seeds[i] for i in index],
                               desc=method, **method_call(config, words))
                seconds[method] += run.seconds
                for i, image in zip(index, run.images):
                    images[method][i] = image
        for method in configs:
            scores = [shapes.score_image(image, prompt) for image, prompt in zip(images[method], prompts)]
            present = [score.all_present for score in scores]  # per prompt, for the paired comparison
            rows[(cache_name, method)] = {"both_present": sum(present) / count, "seconds": seconds[method],
                                          "present": present, "outcomes": [score.outcome for score in scores]}
    print(f"{count} two-object prompts x seeds, {steps} steps, cfg {guidance_scale}")
    print("| caching | method | both concepts present | time vs baseline | prompts fixed / broken (McNemar p) |")
    print("|---|---|---|---|---|")
    for (cache_name, method), row in rows.items():
        baseline = rows.get((cache_name, "baseline"))
        overhead = f"{row['seconds'] / baseline['seconds']:.3f}x" if baseline else f"{row['seconds']:.1f} s"
        paired = "" if baseline is None or row is baseline else paired_change(baseline["present"], row["present"])
        print(f"| {cache_name} | {method} | {row['both_present']:.1%} | {overhead} | {paired} |")
    for (cache_name, alone), row in rows.items():  # does adding the other fix help a fix that works alone?
        both = rows.get((cache_name, "both"))
        if both is not None and alone in ("correction by similarities", "cross-token NMS"):
            change = paired_change(row["present"], both["present"])
            print(f"{cache_name}: both fixes against {alone} alone, prompts fixed / broken: {change}")
    print("\nHow the images fail (counts of prompts; see dit_cache.toy.shapes.ConceptScore.outcome)")
    print("| caching | method | " + " | ".join(shapes.OUTCOMES) + " |")
    print("|---|---|" + "---|" * len(shapes.OUTCOMES))
    for (cache_name, method), row in rows.items():
        counts = Counter(row["outcomes"])
        print(f"| {cache_name} | {method} | " + " | ".join(str(counts[o]) for o in shapes.OUTCOMES) + " |")
    for (cache_name, method), row in rows.items():  # did a fix turn the failures it targets into successes?
        baseline = rows.get((cache_name, "baseline"))
        if baseline is not None and row is not baseline:
            moved = Counter((before, after) for before, after in zip(baseline["outcomes"], row["outcomes"])
                            if before != after and before != "all present")
            print(f"{cache_name}, {method}: baseline failures it changed: "
                  + "; ".join(f"{before} -> {after}: {n}" for (before, after), n in sorted(moved.items())))
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w") as file:
        json.dump({"command": shlex.join(["python", *sys.argv]), "count": count,
                   "parameters": {**correction, **nms, "concept_words": concept_words},
                   "model": model or "embedded",
                   "rows": [{"caching": c, "method": m, **r} for (c, m), r in rows.items()]}, file, indent=2)


if __name__ == "__main__":
    CLI(main, as_positional=False)
