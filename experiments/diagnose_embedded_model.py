"""Why single-object prompts fail on the embedded model: right, wrong shape, wrong color or nothing found,
at several sampler step counts (same prompts and seeds for each).

    OMP_NUM_THREADS=1 python experiments/diagnose_embedded_model.py
    OMP_NUM_THREADS=1 python experiments/diagnose_embedded_model.py --count 100 --step_counts "[20, 50]"
"""

from collections import Counter

from diffusers import PixArtAlphaPipeline
from jsonargparse import CLI

from dit_cache import EMBEDDED_GUIDANCE_SCALE, embedded_model_path
from dit_cache.toy.evaluation import generate, prompt_set
from dit_cache.toy.shapes import detect_objects, parse_caption

OUTCOMES = ("right", "right color, wrong shape", "right shape, wrong color", "both wrong", "nothing found")


def outcome(image, prompt: str) -> str:
    (color, shape), found = parse_caption(prompt)[0], detect_objects(image)
    if (color, shape) in found:
        return "right"
    if not found:
        return "nothing found"
    if any(c == color for c, _ in found):
        return "right color, wrong shape"
    if any(s == shape for _, s in found):
        return "right shape, wrong color"
    return "both wrong"


def main(count: int = 50, step_counts: list[int] = [20, 50],
         guidance_scale: float = EMBEDDED_GUIDANCE_SCALE, seed: int = 10_000):
    pipe = PixArtAlphaPipeline.from_pretrained(embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    prompts, seeds = prompt_set(1, count, seed), list(range(seed, seed + count))
    print(f"{count} one-object prompts x seeds, cfg {guidance_scale}")
    print("| steps | " + " | ".join(OUTCOMES) + " |")
    print("|---" * (len(OUTCOMES) + 1) + "|")
    for steps in step_counts:
        run = generate(pipe, prompts, seeds, num_inference_steps=steps, guidance_scale=guidance_scale)
        counts = Counter(outcome(image, prompt) for image, prompt in zip(run.images, prompts))
        print(f"| {steps} | " + " | ".join(str(counts[name]) for name in OUTCOMES) + " |")


if __name__ == "__main__":
    CLI(main, as_positional=False)
