"""Router training's view of a family's pipeline: prompt encoding with the pipeline's own ``encode_prompt``, and
the forward kwargs of one step's call built from the encoded rows, in the pipeline's CFG order.

``encode(pipe, prompts, max_sequence_length)`` returns named tensors; ``negative_*`` ones hold one row (the empty
negative prompt), shared by every prompt. ``conditioning(rows, transformer)`` returns the kwargs of one call.
"""

from __future__ import annotations

import torch

from .inputs import image_ids


def can_clean_captions() -> bool:
    """PixArt cleans captions only with beautifulsoup4 and ftfy installed, and otherwise warns on every call and
    lowercases; asking for what will happen anyway keeps the output free of those warnings."""
    from diffusers.utils import is_bs4_available, is_ftfy_available

    return is_bs4_available() and is_ftfy_available()


def pixart_encode(pipe, prompts, max_sequence_length):
    embeds, mask, negative, negative_mask = pipe.encode_prompt(
        prompts, do_classifier_free_guidance=True, negative_prompt="", device="cpu",
        max_sequence_length=max_sequence_length, clean_caption=False)
    return {"prompt_embeds": embeds, "prompt_mask": mask, "negative_embeds": negative[:1],
            "negative_mask": negative_mask[:1]}


def sd3_encode(pipe, prompts, max_sequence_length):
    embeds, negative, pooled, negative_pooled = pipe.encode_prompt(
        prompts, None, None, device="cpu", do_classifier_free_guidance=True, negative_prompt="",
        max_sequence_length=max_sequence_length)
    return {"prompt_embeds": embeds, "pooled_embeds": pooled, "negative_embeds": negative[:1],
            "negative_pooled_embeds": negative_pooled[:1]}


def flux_encode(pipe, prompts, max_sequence_length):
    embeds, pooled, text_ids = pipe.encode_prompt(prompts, None, device="cpu", max_sequence_length=max_sequence_length)
    return {"prompt_embeds": embeds, "pooled_embeds": pooled, "text_ids": text_ids}


def _negative_rows(rows, key):
    count = rows["prompt_embeds"].shape[0]
    return rows[key].expand(count, *rows[key].shape[1:])


def masked_text_conditioning(rows, transformer) -> dict:
    """PixArt: the negative (unconditional) half first; PixArt-alpha 1024 conditions on size, like its pipeline."""
    count = rows["prompt_embeds"].shape[0]
    added = {"resolution": None, "aspect_ratio": None}
    if transformer.config.sample_size == 128:
        side = transformer.config.sample_size * 8
        added = {"resolution": torch.tensor([[side, side]] * 2 * count, dtype=torch.float32),
                 "aspect_ratio": torch.tensor([[1.0]] * 2 * count)}
    return {"encoder_hidden_states": torch.cat([_negative_rows(rows, "negative_embeds"), rows["prompt_embeds"]]),
            "encoder_attention_mask": torch.cat([_negative_rows(rows, "negative_mask"), rows["prompt_mask"]]),
            "added_cond_kwargs": added}


def sana_conditioning(rows, transformer) -> dict:
    kwargs = masked_text_conditioning(rows, transformer)
    kwargs.pop("added_cond_kwargs")  # PixArt's; Sana has no size conditioning
    return kwargs


def sd3_conditioning(rows, transformer) -> dict:
    return {"encoder_hidden_states": torch.cat([_negative_rows(rows, "negative_embeds"), rows["prompt_embeds"]]),
            "pooled_projections": torch.cat([_negative_rows(rows, "negative_pooled_embeds"), rows["pooled_embeds"]])}


def flux_conditioning(rows, transformer) -> dict:
    """FLUX.1 is guidance-distilled: one call per step on the prompts alone, no negative half."""
    return {"encoder_hidden_states": rows["prompt_embeds"], "pooled_projections": rows["pooled_embeds"],
            "txt_ids": rows["text_ids"]}


def class_conditioning(rows, transformer) -> dict:
    """DiTPipeline puts the conditional half first and uses its last class (1000) as the null label."""
    labels = rows["class_labels"]
    return {"class_labels": torch.cat([labels, torch.full_like(labels, transformer.config.num_embeds_ada_norm)])}


def flux_extra_inputs(transformer, latents, guidance_scale) -> dict:
    import math

    extra = {"img_ids": image_ids(math.isqrt(latents.shape[1])).to(latents.device)}
    if transformer.config.guidance_embeds:
        extra["guidance"] = torch.full((latents.shape[0],), float(guidance_scale), device=latents.device)
    return extra


def _mask_or_ones(embeds, mask):
    # Qwen-Image's encode_prompt returns no mask when no token is padding.
    return torch.ones(embeds.shape[:2], dtype=torch.long) if mask is None else mask


def qwen_image_encode(pipe, prompts, max_sequence_length):
    embeds, mask = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=max_sequence_length)
    # The pipeline runs true CFG only with a negative prompt; its docs suggest " " for none.
    negative, negative_mask = pipe.encode_prompt([" "], device="cpu", max_sequence_length=max_sequence_length)
    return {"prompt_embeds": embeds, "prompt_mask": _mask_or_ones(embeds, mask), "negative_embeds": negative,
            "negative_mask": _mask_or_ones(negative, negative_mask)}


def qwen_image_conditioning(rows, transformer) -> dict:
    """Two calls per step: the prompts ("cond") and the negative prompt ("uncond")."""
    return {"cond": {"encoder_hidden_states": rows["prompt_embeds"],
                     "encoder_hidden_states_mask": rows["prompt_mask"]},
            "uncond": {"encoder_hidden_states": _negative_rows(rows, "negative_embeds"),
                       "encoder_hidden_states_mask": _negative_rows(rows, "negative_mask")}}


def qwen_image_extra_inputs(transformer, latents, guidance_scale) -> dict:
    import math

    side = math.isqrt(latents.shape[1])
    return {"img_shapes": [[(1, side, side)]] * latents.shape[0]}


def qwen_image_guide(conditional, unconditional, scale):
    """QwenImagePipeline's true CFG: the guided prediction rescaled to the conditional one's norm per token."""
    combined = unconditional + scale * (conditional - unconditional)
    return combined * (torch.norm(conditional, dim=-1, keepdim=True) / torch.norm(combined, dim=-1, keepdim=True))


def empty_negative_encode(pipe, prompts, max_sequence_length):
    """Pipelines whose encode_prompt returns (prompt embeds, negative embeds) (Wan, CogView4)."""
    embeds, negative = pipe.encode_prompt(prompts, negative_prompt="", do_classifier_free_guidance=True,
                                          max_sequence_length=max_sequence_length, device="cpu")
    return {"prompt_embeds": embeds, "negative_embeds": negative[:1]}


def two_call_conditioning(rows, transformer) -> dict:
    """Two calls per step: the prompts ("cond") and the empty negative prompt ("uncond")."""
    return {"cond": {"encoder_hidden_states": rows["prompt_embeds"]},
            "uncond": {"encoder_hidden_states": _negative_rows(rows, "negative_embeds")}}


# --- families helper f1 ---
def flux2_encode(pipe, prompts, max_sequence_length):
    """FLUX.2 (Flux2Pipeline and Flux2KleinPipeline alike): stacked text-encoder layers and 4-axis text ids."""
    embeds, text_ids = pipe.encode_prompt(prompts, device="cpu", max_sequence_length=max_sequence_length)
    return {"prompt_embeds": embeds, "text_ids": text_ids}


def flux2_conditioning(rows, transformer) -> dict:
    """FLUX.2-dev is guidance-distilled: one call per step on the prompts alone (Klein's true CFG is not trained)."""
    return {"encoder_hidden_states": rows["prompt_embeds"], "txt_ids": rows["text_ids"]}


def flux2_extra_inputs(transformer, latents, guidance_scale) -> dict:
    import math

    from .inputs import flux2_ids

    extra = {"img_ids": flux2_ids(math.isqrt(latents.shape[1])).to(latents.device)}
    if transformer.config.guidance_embeds:  # Flux2Pipeline passes the scale itself (the model multiplies by 1000)
        extra["guidance"] = torch.full((latents.shape[0],), float(guidance_scale), device=latents.device)
    return extra


def ovis_image_encode(pipe, prompts, max_sequence_length):
    embeds, negative, text_ids, negative_text_ids = pipe.encode_prompt(
        prompts, negative_prompt="", do_classifier_free_guidance=True, device="cpu",
        max_sequence_length=max_sequence_length)
    return {"prompt_embeds": embeds, "text_ids": text_ids, "negative_embeds": negative[:1],
            "negative_text_ids": negative_text_ids}


def ovis_image_conditioning(rows, transformer) -> dict:
    """Two calls per step: the prompts ("cond") and OvisImagePipeline's default negative prompt "" ("uncond")."""
    return {"cond": {"encoder_hidden_states": rows["prompt_embeds"], "txt_ids": rows["text_ids"]},
            "uncond": {"encoder_hidden_states": _negative_rows(rows, "negative_embeds"),
                       "txt_ids": rows["negative_text_ids"]}}


def packed_image_ids(transformer, latents, guidance_scale) -> dict:
    """FLUX.1-style rotary ids of the packed latents' token grid, for families without a guidance input."""
    import math

    return {"img_ids": image_ids(math.isqrt(latents.shape[1])).to(latents.device)}


# --- families-f2 ---
def cogview4_extra_inputs(transformer, latents, guidance_scale) -> dict:
    """The SDXL-style size conditioning CogView4Pipeline passes by default: the image size, no crop."""
    pixels = torch.tensor([[latents.shape[-2] * 8.0, latents.shape[-1] * 8.0]] * latents.shape[0],
                          device=latents.device)
    return {"original_size": pixels, "target_size": pixels.clone(),
            "crop_coords": torch.zeros(latents.shape[0], 2, device=latents.device)}
