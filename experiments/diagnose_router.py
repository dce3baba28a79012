"""Where a learned router stands against a uniform schedule: its training objective, and its error in latent and
in pixel space, per image.

    python experiments/diagnose_router.py                                   # the shipped router
    python experiments/diagnose_router.py --router runs/router/embedded/router.safetensors

``compare_routers.py`` scores final images; the router is trained on latents. This script separates the two:
* objective: the HarmoniCa loss the router minimizes, sum over steps of lambda_t x the local error of the
  guided model output against the full model on the same latent, along each schedule's own trajectory, with the
  proxy weights lambda_t the router was last trained with (its ``proxy_weights`` metadata);
* final latent and decoded image of each prompt against the uncached run, with the paired difference.
"""

import statistics

import torch
import torch.nn.functional as F
from diffusers import PixArtAlphaPipeline
from jsonargparse import CLI
from tqdm.auto import tqdm

from dit_cache import (EMBEDDED_GUIDANCE_SCALE, CacheRouter, CacheSchedule, apply_cache, cache_units,
                       embedded_model_path, embedded_router_path)
from dit_cache.toy.evaluation import paired_difference, per_image_mse, prompt_set
from dit_cache.training.denoising import GuidedDenoiser, sample_latents, text_conditioning


def trajectory(denoiser, scheduler, handle, schedule, noise, conditioning, num_steps):
    """Final latents of a sampling run under ``schedule`` and the local error of each step's model output."""
    errors = torch.zeros(num_steps)

    def local_error(index, model_input, t, output):
        if index:  # the first step computes everything
            with handle.bypassed():
                errors[index] = F.mse_loss(output, denoiser(model_input, t, conditioning))

    measure = not bool(schedule.mask.all())  # a schedule that computes everything has no local error
    latents = sample_latents(denoiser, scheduler, noise, conditioning, num_steps, handle, schedule,
                             on_step=local_error if measure else None)
    return latents, errors


def main(router: str = str(embedded_router_path()), uniform_interval: int = 2,
         batches: int = 6, batch_size: int = 16, guidance_scale: float = EMBEDDED_GUIDANCE_SCALE,
         seed: int = 50_000):
    """Args:
        router: router file to diagnose.
        batches / batch_size: prompts (half one-object, half two-object per batch), each batch its own noise.
    """
    router = CacheRouter.load(router)
    steps = router.num_steps
    pipe = PixArtAlphaPipeline.from_pretrained(embedded_model_path())
    transformer = pipe.transformer
    units = len(cache_units(transformer))
    handle = apply_cache(transformer, CacheSchedule.full(steps, units))
    denoiser = GuidedDenoiser(transformer, guidance_scale)
    schedules = {"uncached": CacheSchedule.full(steps, units), "router": router.schedule(),
                 f"uniform (interval {uniform_interval})": CacheSchedule.uniform(steps, units, uniform_interval)}
    latents = {name: [] for name in schedules}
    images = {name: [] for name in schedules}
    local_errors = {name: torch.zeros(steps) for name in schedules}
    for batch in tqdm(range(batches), desc="batches"):
        half = batch_size // 2
        prompts = prompt_set(1, half, seed + 2 * batch) + prompt_set(2, batch_size - half, seed + 2 * batch + 1)
        with torch.no_grad():
            embeds, mask, negative, negative_mask = pipe.encode_prompt(prompts, device="cpu", clean_caption=False)
        conditioning = text_conditioning(embeds, mask, negative, negative_mask, transformer)
        noise = torch.randn(batch_size, transformer.config.in_channels, transformer.config.sample_size,
                            transformer.config.sample_size, generator=torch.Generator().manual_seed(seed + batch))
        for name, schedule in schedules.items():
            final, errors = trajectory(denoiser, pipe.scheduler, handle, schedule, noise, conditioning, steps)
            local_errors[name] += errors / batches
            with torch.no_grad():
                decoded = pipe.vae.decode(final / pipe.vae.config.scaling_factor).sample
            latents[name].append(final)
            images[name].append((decoded / 2 + 0.5).clamp(0, 1))
    weights = router.metadata.get("proxy_weights")  # absent from routers trained before it was recorded
    weights = None if weights is None else torch.tensor(weights)
    print(f"{batches * batch_size} prompts, {steps} steps, cfg {guidance_scale}")
    print("| schedule | CUR | objective | final latent MSE: mean / median | image MSE: mean / median |")
    print("|---|---|---|---|---|")
    per_image = {}
    for name, schedule in list(schedules.items())[1:]:
        objective = f"{float((weights * local_errors[name]).sum()):.4f}" if weights is not None else "-"
        cells = []
        for space, outputs in (("latent", latents), ("image", images)):
            error = per_image_mse(torch.cat(outputs[name]), torch.cat(outputs["uncached"])).tolist()
            per_image[name, space] = error
            cells.append(f"{statistics.mean(error):.5f} / {statistics.median(error):.5f}")
        print(f"| {name} | {schedule.cache_ratio:.1%} | {objective} | {cells[0]} | {cells[1]} |")
    uniform = list(schedules)[2]
    for space in ("latent", "image"):
        difference = paired_difference(per_image["router", space], per_image[uniform, space])
        print(f"router minus uniform, {space} MSE: {difference['mean']:+.5f} "
              f"[95% bootstrap {difference['low']:+.5f}, {difference['high']:+.5f}], router lower on "
              f"{difference['lower_share']:.0%} of the prompts")


if __name__ == "__main__":
    CLI(main, as_positional=False)
