"""The stock pipelines' denoising step, reproduced for training: CFG batching, guidance, learned sigma.

Only the model call is here; every update of the latents is the diffusers scheduler's own ``step``.
"""

from __future__ import annotations

from dataclasses import dataclass

import diffusers
import torch
from diffusers import DiffusionPipeline, DiTTransformer2DModel

from dit_cache.embedded import resolve_model


@dataclass
class Conditioning:
    """Forward kwargs for a CFG batch in the stock pipeline's order, plus the number of samples."""

    kwargs: dict
    batch_size: int

    def to(self, device) -> "Conditioning":
        moved = {k: v.to(device) if torch.is_tensor(v) else v for k, v in self.kwargs.items()}
        return Conditioning(moved, self.batch_size)


def text_conditioning(prompt_embeds, prompt_mask, negative_embeds, negative_mask, transformer) -> Conditioning:
    """PixArt pipelines put the negative (unconditional) half first."""
    batch = prompt_embeds.shape[0]
    added = {"resolution": None, "aspect_ratio": None}
    if transformer.config.sample_size == 128:  # PixArt-alpha 1024 conditions on size, like its pipeline
        side = transformer.config.sample_size * 8
        added = {"resolution": torch.tensor([[side, side]] * 2 * batch, dtype=torch.float32),
                 "aspect_ratio": torch.tensor([[1.0]] * 2 * batch)}
    kwargs = {
        "encoder_hidden_states": torch.cat([negative_embeds, prompt_embeds]),
        "encoder_attention_mask": torch.cat([negative_mask, prompt_mask]),
        "added_cond_kwargs": added,
    }
    return Conditioning(kwargs, batch)


def class_conditioning(class_labels: torch.Tensor, null_class: int = 1000) -> Conditioning:
    """DiTPipeline puts the conditional half first and uses class 1000 as the null label."""
    null = torch.full_like(class_labels, null_class)
    return Conditioning({"class_labels": torch.cat([class_labels, null])}, class_labels.shape[0])


class GuidedDenoiser:
    """``denoiser(latents, t, conditioning)`` -> the guided model output the scheduler consumes."""

    def __init__(self, transformer, guidance_scale: float):
        self.transformer = transformer
        self.guidance_scale = guidance_scale
        self.conditional_first = isinstance(transformer, DiTTransformer2DModel)

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        channels = latents.shape[1]
        model_input = torch.cat([latents, latents])
        timesteps = timestep.expand(model_input.shape[0]).to(latents.device)
        output = self.transformer(model_input, timestep=timesteps, **conditioning.kwargs).sample
        prediction = output[:, :channels]  # learned-sigma models also predict a variance; samplers drop it
        first, second = prediction.chunk(2)
        conditional, unconditional = (first, second) if self.conditional_first else (second, first)
        return unconditional + self.guidance_scale * (conditional - unconditional)


def load_denoising_components(model: str, scheduler: str | None = None, torch_dtype=torch.float32):
    """Transformer and scheduler of a diffusers pipeline folder or hub id, without its text encoder or VAE.

    ``scheduler`` names another diffusers scheduler class to sample with (built from the pipeline's config).
    """
    model = resolve_model(model)
    config = DiffusionPipeline.load_config(model)
    skip = {name: None for name in ("text_encoder", "tokenizer", "vae") if name in config}
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=torch_dtype, **skip)
    if scheduler is not None:
        if not hasattr(diffusers, scheduler):
            raise ValueError(f"diffusers has no scheduler {scheduler!r} (e.g. DDIMScheduler, DPMSolverMultistepScheduler).")
        pipe.scheduler = getattr(diffusers, scheduler).from_config(pipe.scheduler.config)
    return pipe.transformer, pipe.scheduler


def fresh_scheduler(scheduler, num_steps: int, device=None):
    """A new scheduler of the same class and config, with its timesteps set (schedulers are stateful)."""
    copy = type(scheduler).from_config(scheduler.config)
    copy.set_timesteps(num_steps, device=device)
    return copy


@torch.no_grad()
def sample_latents(denoiser: GuidedDenoiser, scheduler, latents, conditioning: Conditioning, num_steps: int,
                   handle=None, schedule=None, on_step=None) -> torch.Tensor:
    """A whole sampling run; with ``handle`` and ``schedule``, cached by that hard schedule.

    ``on_step(index, model_input, t, output)`` is called after every model call (e.g. to measure it).
    """
    steps = fresh_scheduler(scheduler, num_steps, latents.device)
    if handle is not None:
        handle.set_schedule(schedule)
    latents = latents * steps.init_noise_sigma
    for index, t in enumerate(steps.timesteps):
        model_input = steps.scale_model_input(latents, t)
        output = denoiser(model_input, t, conditioning)
        if on_step is not None:
            on_step(index, model_input, t, output)
        latents = steps.step(output, t, latents).prev_sample
    return latents
