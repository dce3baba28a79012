"""The stock pipelines' denoising step, reproduced for training: prompt encoding, CFG batching, guidance, learned
sigma, per model family (one row of ``DENOISING_FAMILIES`` each).

Only the model call is here; every update of the latents is the diffusers scheduler's own ``step``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import diffusers
import torch
from diffusers import DiffusionPipeline

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


def _flux_conditioning(rows, transformer) -> Conditioning:
    """FLUX.1 is guidance-distilled: one call per step on the prompts alone, no negative half."""
    kwargs = {"encoder_hidden_states": rows["prompt_embeds"], "pooled_projections": rows["pooled_embeds"],
              "txt_ids": rows["text_ids"]}
    return Conditioning(kwargs, rows["prompt_embeds"].shape[0])


def _sd3_conditioning(rows, transformer) -> Conditioning:
    count = rows["prompt_embeds"].shape[0]
    kwargs = {"encoder_hidden_states": torch.cat([rows["negative_embeds"].expand(count, -1, -1),
                                                  rows["prompt_embeds"]]),
              "pooled_projections": torch.cat([rows["negative_pooled_embeds"].expand(count, -1),
                                               rows["pooled_embeds"]])}
    return Conditioning(kwargs, count)


def _masked_text_conditioning(rows, transformer) -> Conditioning:
    count = rows["prompt_embeds"].shape[0]
    return text_conditioning(rows["prompt_embeds"], rows["prompt_mask"], rows["negative_embeds"].expand(count, -1, -1),
                             rows["negative_mask"].expand(count, -1), transformer)


def _sana_conditioning(rows, transformer) -> Conditioning:
    conditioning = _masked_text_conditioning(rows, transformer)
    conditioning.kwargs.pop("added_cond_kwargs")  # PixArt's; Sana has no size conditioning
    return conditioning


def _pixart_prompts(pipe, prompts, max_sequence_length):
    embeds, mask, negative, negative_mask = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=True, negative_prompt="", device="cpu",
        max_sequence_length=max_sequence_length, clean_caption=False)
    return {"prompt_embeds": embeds, "prompt_mask": mask, "negative_embeds": negative[:1],
            "negative_mask": negative_mask[:1]}


def _sd3_prompts(pipe, prompts, max_sequence_length):
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompts, None, None, device="cpu", do_classifier_free_guidance=True, negative_prompt="",
        max_sequence_length=max_sequence_length)
    return {"prompt_embeds": embeds, "pooled_embeds": pooled, "negative_embeds": negative[:1],
            "negative_pooled_embeds": negative_pooled[:1]}


def _flux_prompts(pipe, prompts, max_sequence_length):
    embeds, pooled, text_ids = pipe.encode_prompt(prompts, None, device="cpu",
                                                  max_sequence_length=max_sequence_length)
    return {"prompt_embeds": embeds, "pooled_embeds": pooled, "text_ids": text_ids}


def _image_ids(side: int) -> torch.Tensor:
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).float()


@dataclass(frozen=True)
class DenoisingFamily:
    """How a family's pipeline encodes prompts, batches one step and calls its transformer; one row per family.

    ``encode(pipe, prompts, max_sequence_length)`` -> named tensors (``negative_*`` ones hold one row, shared by
    every prompt); ``conditioning(rows, transformer)`` -> the forward kwargs of a step on a batch's rows of them
    (:func:`conditioning_rows`); ``cfg_batch``:
    the pipeline batches the unconditional half in (FLUX.1 is guidance-distilled: the scale is an input);
    ``timestep(t, transformer)``: what the pipeline passes for the scheduler's timestep ``t``.
    """

    encode: Callable | None
    conditioning: Callable | None
    cfg_batch: bool = True
    conditional_first: bool = False
    timestep: Callable = lambda t, transformer: t
    packed: bool = False  # FLUX: latents are 2x2-packed tokens [batch, tokens, channels] with position ids


DENOISING_FAMILIES: dict[str, DenoisingFamily] = {
    "DiTTransformer2DModel": DenoisingFamily(None, None, conditional_first=True),
    "PixArtTransformer2DModel": DenoisingFamily(_pixart_prompts, _masked_text_conditioning),
    "SanaTransformer2DModel": DenoisingFamily(_pixart_prompts, _sana_conditioning,
                                              timestep=lambda t, tr: t * tr.config.timestep_scale),
    "SD3Transformer2DModel": DenoisingFamily(_sd3_prompts, _sd3_conditioning),
    "FluxTransformer2DModel": DenoisingFamily(_flux_prompts, _flux_conditioning, cfg_batch=False,
                                              timestep=lambda t, tr: t / 1000, packed=True),
}


def denoising_family(transformer_class: str) -> DenoisingFamily:
    if transformer_class not in DENOISING_FAMILIES:
        raise TypeError(f"Router training does not support {transformer_class}; supported: "
                        f"{', '.join(DENOISING_FAMILIES)}.")
    return DENOISING_FAMILIES[transformer_class]


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
    if "class_labels" in rows:
        return class_conditioning(rows["class_labels"], transformer.config.num_embeds_ada_norm)
    return denoising_family(type(transformer).__name__).conditioning(rows, transformer)


def latent_noise(transformer, batch_size: int, generator: torch.Generator, latent_size: int | None = None):
    """Initial noise in the transformer's input layout; ``latent_size``: the latent side (default: the config's
    ``sample_size``; FLUX: the side of its packed token grid, default 64 = 1024 px)."""
    config = transformer.config
    if denoising_family(type(transformer).__name__).packed:
        side = latent_size or 64
        return torch.randn((batch_size, side * side, config.in_channels), generator=generator)
    side = latent_size or config.sample_size
    return torch.randn((batch_size, config.in_channels, side, side), generator=generator)


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
    """``denoiser(latents, t, conditioning)`` -> the guided model output the scheduler consumes."""

    def __init__(self, transformer, guidance_scale: float):
        self.transformer = transformer
        self.guidance_scale = guidance_scale
        self.family = denoising_family(type(transformer).__name__)
        self.conditional_first = self.family.conditional_first

    def __call__(self, latents: torch.Tensor, timestep: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        family = self.family
        model_input = torch.cat([latents, latents]) if family.cfg_batch else latents
        timesteps = family.timestep(timestep.expand(model_input.shape[0]).to(latents.device), self.transformer)
        extra = {}
        if family.packed:
            extra["img_ids"] = _image_ids(math.isqrt(latents.shape[1])).to(latents.device)
            if self.transformer.config.guidance_embeds:
                extra["guidance"] = torch.full((latents.shape[0],), float(self.guidance_scale), device=latents.device)
        output = self.transformer(model_input, timestep=timesteps, **conditioning.kwargs, **extra).sample
        if not family.cfg_batch:
            return output
        channels = latents.shape[1]
        prediction = output[:, :channels]  # learned-sigma models also predict a variance; samplers drop it
        first, second = prediction.chunk(2)
        conditional, unconditional = (first, second) if self.conditional_first else (second, first)
        return unconditional + self.guidance_scale * (conditional - unconditional)


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
        handle.set_schedule(schedule)
    latents = latents * init_noise_sigma(steps)
    for index, t in enumerate(steps.timesteps):
        model_input = scale_model_input(steps, latents, t)
        output = denoiser(model_input, t, conditioning)
        if on_step is not None:
            on_step(index, model_input, t, output)
        latents = steps.step(output, t, latents).prev_sample
    return latents
