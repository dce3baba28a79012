"""Image error metrics, once, for ``dit-cache generate --compare``, ``dit-cache bench`` and the experiments:
per-image MSE, PSNR and SSIM of images against references, and paired bootstrap intervals.

Images are the pipelines' numpy output (``output_type="np"``): ``(batch, height, width, 3)`` floats in [0, 1].
"""

from __future__ import annotations

import numpy as np
import torch

MAX_PSNR = 100.0  # identical images (MSE 0) count as this many dB, so means and intervals stay finite


def image_batch(arrays) -> torch.Tensor:
    """Numpy images ``(batch, height, width, 3)`` in [0, 1] (an array or a list of images) as the float
    ``(batch, 3, height, width)`` tensor torchmetrics takes."""
    return torch.from_numpy(np.stack(arrays) if isinstance(arrays, list) else arrays).permute(0, 3, 1, 2).float()


def to_uint8(array: np.ndarray) -> np.ndarray:
    """A [0, 1] float image as 8-bit pixels, rounded as PIL would save it."""
    return (array * 255).round().clip(0, 255).astype(np.uint8)


def per_image_mse(ours: torch.Tensor, theirs: torch.Tensor) -> torch.Tensor:
    """Mean squared error of each item of two equally shaped batches (images or latents)."""
    return (ours.float() - theirs.float()).pow(2).flatten(1).mean(dim=1)


def psnr(mse: torch.Tensor) -> torch.Tensor:
    """PSNR in dB of images in [0, 1] with mean squared error ``mse`` (per image, or of a whole batch), capped at
    :data:`MAX_PSNR` for identical images."""
    mse = torch.as_tensor(mse, dtype=torch.float64)
    return (10 * torch.log10(1.0 / mse)).clamp(max=MAX_PSNR)


def image_errors(images, references) -> dict[str, torch.Tensor]:
    """Per-image ``mse``, ``psnr`` and ``ssim`` of numpy images against their references."""
    from torchmetrics.functional.image import structural_similarity_index_measure

    ours, theirs = image_batch(images), image_batch(references)
    mse = per_image_mse(ours, theirs)
    ssim = structural_similarity_index_measure(ours, theirs, data_range=1.0, reduction="none").reshape(-1)
    return {"mse": mse, "psnr": psnr(mse), "ssim": ssim}


def paired_difference(errors: list[float], baseline: list[float], resamples: int = 10_000,
                      seed: int = 0) -> dict[str, float]:
    """Mean of ``errors - baseline`` over paired images, its 95% bootstrap interval, and the share of images on
    which ``errors`` is lower. Against zeros it is the plain bootstrap interval of the mean."""
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
