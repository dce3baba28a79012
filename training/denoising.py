"""The stock pipelines' denoising step, reproduced for training: prompt encoding, CFG batching, guidance, learned
sigma, as each model family's record (:mod:`dit_cache.families`) describes it.

Only the model call is here; every update of the latents is the diffusers scheduler's own ``step``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import diffusers
import torch
from diffusers import DiffusionPipeline

from dit_cache.embedded import resolve_model
from dit_cache.families import FAMILIES, CFGLayout, ModelFamily, family_of
from dit_cache.families import prompts


@dataclass
class Conditioning:
    """Forward kwargs of a step's call in the stock pipeline's CFG order (two calls: {"cond": ..., "uncond": ...}),
    plus the number of samples."""

    kwargs: dict
    batch_size: int

    def to(self, device) -> "Conditioning":
        return Conditioning(_moved(self.kwargs, device), self.batch_size)


def _moved(value, device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, dict):
        return {key: _moved(item, device) for key, item in value.items()}
    return value


def text_conditioning(prompt_embeds, prompt_mask, negative_embeds, negative_mask, transformer) -> Conditioning:
    """PixArt pipelines put the negative (unconditional) half first."""
    rows = {"prompt_embeds": prompt_embeds, "prompt_mask": prompt_mask, "negative_embeds": negative_embeds,
            "negative_mask": negative_mask}
    return Conditioning(prompts.masked_text_conditioning(rows, transformer), prompt_embeds.shape[0])


def denoising_family(transformer) -> ModelFamily:
    """The family record of ``transformer``, refused with the reason if router training cannot reproduce its step."""
    family = family_of(transformer)
    if not family.supports_training:
        trainable = ", ".join(f.transformer for f in FAMILIES if f.supports_training)
        raise TypeError(f"Router training does not support {family.transformer} yet (its family record has no "
                        f"prompt conditioning); supported: {trainable}.")
    return family


def encode_prompts(pipe, transformer_class: str, prompts: list[str], max_sequence_length: int) -> dict:
    """The prompts' (and the empty negative prompt's) embeddings, with the pipeline's own ``encode_prompt``."""
    family = denoising_family(transformer_class)
    with torch.no_grad():
        return family.encode(pipe, prompts, max_sequence_length)


# Tensors every prompt of a batch shares: the empty negative prompt's embeddings (one row) and FLUX's text ids.
_SHARED_BY_PROMPTS = ("negative_", "text_ids")


def conditioning_rows(conditioning: dict, indices: torch.Tensor) -> dict:
    """The rows ``indices`` of encoded prompts (:func:`encode_prompts`) or class labels: one batch's conditioning."""
    return {key: value if key.startswith(_SHARED_BY_PROMPTS) else value[indices]
            for key, value in conditioning.items()}


def step_conditioning(rows: dict, transformer) -> Conditioning:
    """Forward kwargs of a batch's conditioning rows (:func:`conditioning_rows`), batched as the pipeline does."""
    count = next(value for key, value in rows.items() if not key.startswith(_SHARED_BY_PROMPTS)).shape[0]
    return Conditioning(denoising_family(transformer).conditioning(rows, transformer), count)


def latent_noise(transformer, batch_size: int, generator: torch.Generator, latent_size=None,
                 latent_frames: int = 1):
    """Initial noise in the transformer's input layout. ``latent_size``: the latent side, or ``[height, width]``
    (default: the config's ``sample_size``; FLUX, which has none, the side of its packed token grid: 64 = 1024 px);
    ``latent_frames``: the latent frames of a video family (Wan 2.1 at 81 frames: 21)."""
    config = transformer.config
    layout = denoising_family(transformer).latent_layout
    if latent_frames != 1 and layout != "video":
        raise ValueError(f"latent_frames={latent_frames} is for video families; "
                         f"{type(transformer).__name__} makes images: leave latent_frames at 1.")
    if isinstance(latent_size, (list, tuple)):
        height, width = latent_size
    else:
        configured = None if layout == "packed" else config.get("sample_size", None)
        height = width = latent_size or configured or 64
    if layout == "packed":
        return torch.randn((batch_size, height * width, config.in_channels), generator=generator)
    frames = (latent_frames,) if layout == "video" else ()
    return torch.randn((batch_size, config.in_channels, *frames, height, width), generator=generator)


def latent_tokens(latent_size=None) -> int:
    """Latent positions of one frame at ``latent_size`` (a side or ``[height, width]``; None: 64 x 64)."""
    if isinstance(latent_size, (list, tuple)):
        return int(latent_size[0]) * int(latent_size[1])
    return (latent_size or 64) ** 2


def init_noise_sigma(scheduler) -> float:
    return getattr(scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers start at sigma 1


def scale_model_input(scheduler, latents, t):
    # Flow-matching schedulers have no input scaling.
    return scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents


def static_shift(scheduler, image_tokens: int):
    """A FLUX-style scheduler with resolution-dependent ("dynamic") shifting turned into the static shift that the
    pipeline computes for ``image_tokens``: set_timesteps then needs no ``mu``, and gives the pipeline's sigmas."""
    config = scheduler.config
    if not config.get("use_dynamic_shifting", False):
        return scheduler
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    mu = calculate_shift(image_tokens, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
                         config.get("base_shift", 0.5), config.get("max_shift", 1.15))
    return type(scheduler).from_config(config, use_dynamic_shifting=False, shift=math.exp(mu))


class GuidedDenoiser:
    """``denoiser(latents, t, conditioning)`` -> the guided model output the scheduler consumes, with the model
    calls the family's pipeline makes: one on the CFG batch, one conditional call, or a conditional and an
    unconditional call in ``cache_context("cond")`` / ``("uncond")`` (``conditioning.kwargs`` then holds the two
    calls' kwargs under "cond" and "uncond")."""

    def __init__(self, transformer, guidance_scale: float):
        self.transformer = transformer
        self.guidance_scale = guidance_scale
        self.family = denoising_family(transformer)

    def _call(self, latents, timestep, kwargs):
        family = self.family
        timesteps = family.timestep(timestep.expand(latents.shape[0]).to(latents.device), self.transformer.config)
        extra = {} if family.extra_inputs is None else family.extra_inputs(self.transformer, latents,
                                                                           self.guidance_scale)
        return self.transformer(latents, timestep=timesteps, **kwargs, **extra).sample

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        layout = self.family.cfg
        if layout is CFGLayout.SEPARATE_CALLS:
            with self.transformer.cache_context("cond"):
                conditional = self._call(latents, timestep, conditioning.kwargs["cond"])
            if self.guidance_scale <= 1:
                return conditional
            with self.transformer.cache_context("uncond"):
                unconditional = self._call(latents, timestep, conditioning.kwargs["uncond"])
            return self.family.guide(conditional, unconditional, self.guidance_scale)
        output = self._call(torch.cat([latents] * layout.batch), timestep, conditioning.kwargs)
        if layout.conditional_half is None:
            return output
        channels = latents.shape[1]
        prediction = output[:, :channels]  # learned-sigma models also predict a variance; samplers drop it
        halves = prediction.chunk(2)
        conditional, unconditional = halves[layout.conditional_half], halves[1 - layout.conditional_half]
        return self.family.guide(conditional, unconditional, self.guidance_scale)


def load_denoising_components(model: str, scheduler: str | None = None, dtype=torch.float32):
    """Transformer and scheduler of a diffusers pipeline folder or hub id, without its text encoder or VAE.

    ``scheduler`` names another diffusers scheduler class to sample with (built from the pipeline's config).
    """
    model = resolve_model(model)
    config = DiffusionPipeline.load_config(model)
    skip = {name: None for name in ("text_encoder", "tokenizer", "vae") if name in config}
    pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype, **skip)
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
        handle.set_plan(schedule)
    latents = latents * init_noise_sigma(steps)
    for index, t in enumerate(steps.timesteps):
        model_input = scale_model_input(steps, latents, t)
        output = denoiser(model_input, t, conditioning)
        if on_step is not None:
            on_step(index, model_input, t, output)
        latents = steps.step(output, t, latents).prev_sample
    return latents
