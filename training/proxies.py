"""HarmoniCa's Image Error Proxy: how much caching at each step damages the final sample.

Both variants take ``final_latents(schedule, conditioning, noise)``, a full sampling run under a hard schedule,
and return one weight per step (step 0 always computes, so its weight is 0).
"""

from __future__ import annotations

from typing import Callable

import torch

from dit_cache import CacheSchedule

FinalLatents = Callable[[CacheSchedule, object, torch.Tensor], torch.Tensor]


def _squared_error(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Squared Frobenius norm per sample, averaged over the batch."""
    return (a.float() - b.float()).pow(2).flatten(1).sum(dim=1).mean()


def paper_proxy(schedule: CacheSchedule, final_latents: FinalLatents, conditioning, noise) -> torch.Tensor:
    """lambda_t = ||x0(router) - x0(router with caching disabled at step t only)||_F^2 (T + 1 sampling runs)."""
    reference = final_latents(schedule, conditioning, noise)
    weights = torch.zeros(schedule.num_steps)
    for step in range(1, schedule.num_steps):
        if bool(schedule.mask[step].all()):
            continue  # nothing cached at this step: disabling caching there changes nothing
        mask = schedule.mask.clone()
        mask[step] = True
        weights[step] = _squared_error(reference, final_latents(CacheSchedule(mask), conditioning, noise))
    return weights


def cumulative_proxy(schedule: CacheSchedule, final_latents: FinalLatents, conditioning, noise) -> torch.Tensor:
    """Official-code variant: enable the router one step at a time from the noisiest step; lambda_t is the
    mean squared change of the final latent that enabling step t causes."""
    mask = torch.ones_like(schedule.mask)
    previous = final_latents(CacheSchedule(mask), conditioning, noise)
    weights = torch.zeros(schedule.num_steps)
    for step in range(1, schedule.num_steps):
        mask[step] = schedule.mask[step]
        current = final_latents(CacheSchedule(mask.clone()), conditioning, noise)
        weights[step] = (current.float() - previous.float()).pow(2).mean()
        previous = current
    return weights


def sensitivity_proxy(schedule: CacheSchedule, final_latents: FinalLatents, conditioning, noise) -> torch.Tensor:
    """lambda_t = ||x0(router, step t fully computed) - x0(router, step t fully cached)||_F^2 (up to 2T runs).

    Our variant. The paper's proxy is 0 at a step the current schedule computes in full, so at the next
    refresh the sparsity term alone decides that step and the router caches it, however much the image
    depends on it (on the embedded model the router then had twice the error of a uniform schedule).
    Contrasting both settings of step t, with every other step as the router has it, measures the step
    whatever its row is.
    """
    reference = final_latents(schedule, conditioning, noise)
    weights = torch.zeros(schedule.num_steps)
    for step in range(1, schedule.num_steps):
        row = schedule.mask[step]
        settings = []
        for compute in (True, False):
            if bool((row == compute).all()):
                settings.append(reference)  # the router's own run already has this setting
                continue
            mask = schedule.mask.clone()
            mask[step] = compute
            settings.append(final_latents(CacheSchedule(mask), conditioning, noise))
        weights[step] = _squared_error(*settings)
    return weights


PROXIES = {"paper": paper_proxy, "cumulative": cumulative_proxy, "sensitivity": sensitivity_proxy}


def check_proxy(kind: str) -> None:
    if kind not in PROXIES:
        raise ValueError(f"Unknown proxy {kind!r}; choose one of {sorted(PROXIES)}.")


def image_error_proxy(kind: str, schedule, final_latents: FinalLatents, conditioning, noise,
                      floor: float = 0.01) -> torch.Tensor:
    """The chosen proxy, floored at ``floor`` x its mean so no step's error term vanishes entirely."""
    check_proxy(kind)
    weights = PROXIES[kind](schedule, final_latents, conditioning, noise)
    trained = weights[1:]
    if trained.numel():
        weights[1:] = trained.clamp_min(floor * float(trained.mean()) + 1e-12)
    return weights
