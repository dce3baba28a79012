"""Evaluation helpers shared by the sample scripts: batched seeded generation and exact concept scoring."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import shapes
from ..metrics import image_batch, per_image_mse, psnr, to_uint8


@dataclass
class GenerationRun:
    images: list[Image.Image]
    arrays: np.ndarray  # (n, height, width, 3) floats in [0, 1]
    seconds: float


def generate(pipe, prompts: list[str], seeds: list[int], batch_size: int = 25, desc: str = "generating",
             **call) -> GenerationRun:
    """One image per (prompt, seed), in batches; each image has its own seeded generator, so an image does not
    depend on the batch it ran in."""
    arrays, seconds = [], 0.0
    for start in tqdm(range(0, len(prompts), batch_size), desc=desc, leave=False):
        chunk = slice(start, start + batch_size)
        generators = [torch.Generator().manual_seed(seed) for seed in seeds[chunk]]
        begin = time.perf_counter()
        output = pipe(prompts[chunk], generator=generators, output_type="np", **call)
        seconds += time.perf_counter() - begin
        arrays.append(output.images)
    arrays = np.concatenate(arrays)
    images = [Image.fromarray(to_uint8(a)) for a in arrays]
    return GenerationRun(images, arrays, seconds)


def image_error(run: GenerationRun, reference: GenerationRun) -> dict:
    """MSE and PSNR (of the batch's mean MSE) of ``run`` against ``reference`` (e.g. cached vs uncached), the mean of
    the images' PSNRs (the benchmark's figure), and the MSE of each image (for paired comparisons: a few images whose
    composition changes dominate the mean)."""
    per_image = per_image_mse(image_batch(run.arrays), image_batch(reference.arrays))
    return {"mse": float(per_image.mean()), "psnr": float(psnr(per_image.mean())),
            "mean_psnr": float(psnr(per_image).mean()), "per_image_mse": per_image.tolist()}


def plan_error(pipe, plan, prompts: list[str], seeds: list[int], reference: GenerationRun, batch_size: int = 8,
               **call) -> dict:
    """:func:`image_error` of ``pipe`` accelerated with ``plan`` (a ``CachePlan``) against ``reference``; the
    pipeline is left stock again, also when the generation fails."""
    from ..pipelines import accelerate, decelerate

    accelerate(pipe, plan=plan)
    try:
        return image_error(generate(pipe, prompts, seeds, batch_size=batch_size, **call), reference)
    finally:
        decelerate(pipe)


def prompt_set(num_objects: int, count: int, seed: int) -> list[str]:
    """``count`` captions with one or two objects, cycling through all concept combinations in a seeded order."""
    rng = np.random.default_rng(seed)
    concepts = [(c, s) for c in shapes.COLORS for s in shapes.SHAPES]
    if num_objects == 1:
        pool = [[c] for c in concepts]
    else:
        pool = [[a, b] for a in concepts for b in concepts if a != b]
    order = np.concatenate([rng.permutation(len(pool)) for _ in range(count // len(pool) + 1)])[:count]
    return [shapes.caption(pool[i]) for i in order]


def grid(images: list[Image.Image], captions: list[str], columns: int = 4, size: int = 192) -> Image.Image:
    """A labelled image grid for the README."""
    from PIL import ImageDraw

    rows = (len(images) + columns - 1) // columns
    label = 28
    canvas = Image.new("RGB", (columns * size, rows * (size + label)), "white")
    draw = ImageDraw.Draw(canvas)
    for index, (image, text) in enumerate(zip(images, captions)):
        x, y = (index % columns) * size, (index // columns) * (size + label)
        canvas.paste(image.resize((size, size)), (x, y + label))
        draw.text((x + 4, y + 8), text, fill="black")
    return canvas
