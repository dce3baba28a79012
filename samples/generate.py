"""Generate a list of prompts with the embedded model, uncached and cached, and save them side by side.

    python samples/generate.py                                # writes outputs/side_by_side.png
    python samples/generate.py --prompts "[a red circle, a green triangle and a blue square]" --out side.png
"""

from pathlib import Path

from diffusers import PixArtAlphaPipeline
from jsonargparse import CLI
from PIL import Image, ImageDraw

import dit_cache
from dit_cache import EMBEDDED_GUIDANCE_SCALE
from dit_cache.toy.evaluation import generate

DEFAULT_PROMPTS = ["a red circle", "a blue square", "a yellow triangle", "a purple circle and a green square",
                   "a green triangle", "a red square and a blue circle"]


def main(prompts: list[str] = DEFAULT_PROMPTS, steps: int = 20,
         guidance_scale: float = EMBEDDED_GUIDANCE_SCALE, seed: int = 0,
         repeats: int = 3, out: str = "outputs/side_by_side.png"):
    """Args:
        prompts: one image per prompt, seeds seed, seed + 1, ...
        repeats: timed repetitions (the fastest is reported, to damp background noise).
        out: the image to write (docs/images/side_by_side.png is this script's output with ``--out`` pointing there).
    """
    pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    seeds = list(range(seed, seed + len(prompts)))
    call = {"num_inference_steps": steps, "guidance_scale": guidance_scale}
    uncached = min((generate(pipe, prompts, seeds, **call) for _ in range(repeats)), key=lambda run: run.seconds)
    dit_cache.accelerate(pipe, router=dit_cache.embedded_router_path())
    cached = min((generate(pipe, prompts, seeds, **call) for _ in range(repeats)), key=lambda run: run.seconds)
    speedup = uncached.seconds / cached.seconds
    size, label = 160, 18
    canvas = Image.new("RGB", (2 * size + 220, len(prompts) * size + label), "white")
    draw = ImageDraw.Draw(canvas)
    draw.text((4, 2), f"uncached | cached (CUR {pipe.cache_stats.cache_ratio:.0%}, {speedup:.2f}x faster)", fill="black")
    for row, (prompt, left, right) in enumerate(zip(prompts, uncached.images, cached.images)):
        y = label + row * size
        canvas.paste(left.resize((size, size)), (0, y))
        canvas.paste(right.resize((size, size)), (size, y))
        draw.text((2 * size + 8, y + size // 2), prompt, fill="black")
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    canvas.save(out)
    print(f"{len(prompts)} images: uncached {uncached.seconds:.2f} s, cached {cached.seconds:.2f} s "
          f"({speedup:.2f}x, CUR {pipe.cache_stats.cache_ratio:.1%}); saved {out}")


if __name__ == "__main__":
    CLI(main, as_positional=False)
