"""Numbers checked for what the math needs: a guidance scale the model's dtype can hold, and a call's result that
is finite. A NaN or an overflow in a diffusion call does not raise by itself: it turns into a black or grey
image that looks like a result; these checks make it an error instead."""

from __future__ import annotations

import math
from numbers import Real

import numpy as np
import torch


def check_guidance(guidance, dtype: torch.dtype = torch.float32):
    """``guidance`` (None: the pipeline's default) as a float that is finite in ``dtype``, the transformer's:
    classifier-free guidance multiplies the prediction difference by it, so a scale the dtype cannot hold (inf,
    NaN, 1e308 in float32) gives an all-NaN result, and ``guidance > 1`` (whether the pipeline batches CFG) is
    False for NaN."""
    if guidance is None:
        return None
    if isinstance(guidance, bool) or not isinstance(guidance, Real):
        raise ValueError(f"guidance_scale must be a number, got {guidance!r}.")
    value = float(guidance)
    limit = torch.finfo(dtype).max if dtype.is_floating_point else torch.finfo(torch.float32).max
    if not math.isfinite(value) or abs(value) > limit:
        raise ValueError(f"guidance_scale={guidance!r} is not a finite {dtype} number (at most {limit:.3g}), so "
                         "classifier-free guidance would give NaN images; use a scale such as 2.0 to 7.0 "
                         "(<= 1 turns guidance off).")
    return value


def non_finite_share(images) -> float:
    """The share of NaN or infinite values in a call's images or latents (array, tensor, or a list of them);
    0.0 for PIL images, which are already 8-bit."""
    if isinstance(images, (list, tuple)):
        parts = [non_finite_share(image) for image in images]
        return max(parts) if parts else 0.0
    if torch.is_tensor(images):
        return 0.0 if not images.is_floating_point() else float((~torch.isfinite(images)).float().mean())
    if isinstance(images, np.ndarray) and np.issubdtype(images.dtype, np.floating):
        return float((~np.isfinite(images)).mean())
    return 0.0


def check_finite_result(images, what: str = "this call") -> None:
    """A ValueError if ``images`` hold NaN or infinite values: such a result must not be used or saved."""
    share = non_finite_share(images)
    if share:
        raise ValueError(f"{what} produced non-finite values (NaN or inf in {share:.0%} of the output), so there "
                         "is no image to return: the guidance scale may be too large for the model's dtype, or "
                         "the model overflowed (float16: try bfloat16 or float32); nothing was saved.")
