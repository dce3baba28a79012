"""Evaluation helpers shared by the sample scripts: batched seeded generation and exact concept scoring."""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from . import shapes


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


def image_batch(arrays) -> torch.Tensor:
    """Pipelines' numpy images ``(batch, height, width, 3)`` in [0, 1] (an array or a list of images) as the float
    ``(batch, 3, height, width)`` tensor torchmetrics takes."""
    return torch.from_numpy(np.stack(arrays) if isinstance(arrays, list) else arrays).permute(0, 3, 1, 2).float()


def to_uint8(array: np.ndarray) -> np.ndarray:
    """A [0, 1] float image as 8-bit pixels, rounded as PIL would save it."""
    return (array * 255).round().clip(0, 255).astype(np.uint8)


def per_image_mse(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each item of two equally shaped batches (images or latents)."""
    return (ours.float() - theirs.float()).pow(2).flatten(1).mean(dim=1)


def image_error(run: GenerationRun, reference: GenerationRun) -> dict:
    """MSE and PSNR (torchmetrics) of ``run`` against ``reference`` (e.g. cached vs uncached), and the MSE of
    each image (for paired comparisons: a few images whose composition changes dominate the mean)."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    ours, theirs = image_batch(run.arrays), image_batch(reference.arrays)
    per_image = per_image_mse(ours, theirs)
    psnr = float(peak_signal_noise_ratio(ours, theirs, data_range=1.0))
    return {"mse": float(per_image.mean()), "psnr": psnr, "per_image_mse": per_image.tolist()}


def paired_difference(errors: list[float], baseline: list[float], resamples: int = 10_000,
                      seed: int = 0) -> dict[str, float]:
    """Mean of ``errors - baseline`` over paired images, its 95% bootstrap interval, and the share of images on
    which ``errors`` is lower."""
    a, b = np.asarray(errors, dtype=np.float64), np.asarray(baseline, dtype=np.float64)
    if a.shape != b.shape or a.ndim != 1 or a.size == 0:
        raise ValueError(f"paired_difference needs two equally long, non-empty lists of per-image errors; "
                         f"got {a.shape} and {b.shape}")
    difference = a - b
    draws = np.random.default_rng(seed).integers(0, difference.size, size=(resamples, difference.size))
    means = difference[draws].mean(axis=1)
    low, high = np.quantile(means, [0.025, 0.975])
    return {"mean": float(difference.mean()), "low": float(low), "high": float(high),
            "lower_share": float((a < b).mean())}


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
