"""Random inputs of one denoising step, per family: tests, FLOP counts and the benchmarks call the transformer
with these (random latents and text of the real shapes, no text encoder)."""

from __future__ import annotations

import torch


def padded_mask(batch: int, text_tokens: int) -> torch.Tensor:
    mask = torch.ones(batch, text_tokens, dtype=torch.long)
    mask[:, text_tokens // 2 + 1 :] = 0  # padded prompts, as the pipelines produce
    return mask


def image_ids(side: int) -> torch.Tensor:
    """FLUX-style rotary position ids of a ``side`` x ``side`` token grid."""
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    return torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).float()


def dit(config, batch, text_tokens, generator, size):
    return {"hidden_states": torch.randn(batch, config.in_channels, size, size, generator=generator),
            "class_labels": torch.arange(batch) % config.num_embeds_ada_norm}


def pixart(config, batch, text_tokens, generator, size):
    return {"hidden_states": torch.randn(batch, config.in_channels, size, size, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, config.caption_channels, generator=generator),
            "encoder_attention_mask": padded_mask(batch, text_tokens),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def sd3(config, batch, text_tokens, generator, size):
    return {"hidden_states": torch.randn(batch, config.in_channels, size, size, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, config.joint_attention_dim, generator=generator),
            "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=generator)}


def flux(config, batch, text_tokens, generator, size):
    # Packed latents: ``size`` is the side of the token grid (64 for 1024 px), with rotary position ids.
    inputs = {"hidden_states": torch.randn(batch, size * size, config.in_channels, generator=generator),
              "encoder_hidden_states": torch.randn(batch, text_tokens, config.joint_attention_dim, generator=generator),
              "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=generator),
              "img_ids": image_ids(size), "txt_ids": torch.zeros(text_tokens, 3)}
    if config.guidance_embeds:  # FLUX.1-dev: guidance distillation, the scale is an input
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


def sana(config, batch, text_tokens, generator, size):
    return {"hidden_states": torch.randn(batch, config.in_channels, size, size, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, config.caption_channels, generator=generator),
            "encoder_attention_mask": padded_mask(batch, text_tokens)}


def qwen_image(config, batch, text_tokens, generator, size):
    # Packed 2x2 latents like FLUX; ``size`` is the side of the token grid. Rotary positions come from img_shapes.
    return {"hidden_states": torch.randn(batch, size * size, config.in_channels, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, config.joint_attention_dim, generator=generator),
            "encoder_hidden_states_mask": torch.ones(batch, text_tokens, dtype=torch.long),
            "img_shapes": [[(1, size, size)]] * batch}


def wan(config, batch, text_tokens, generator, size):
    # One frame (an image); a video adds frames along dim 2.
    return {"hidden_states": torch.randn(batch, config.in_channels, 1, size, size, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, config.text_dim, generator=generator)}


# --- families-f2: Lumina2, CogView4, HunyuanImage 2.1 ---
def lumina2(config, batch, text_tokens, generator, size):
    return {"hidden_states": torch.randn(batch, config.in_channels, size, size, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, config.cap_feat_dim, generator=generator),
            "encoder_attention_mask": padded_mask(batch, text_tokens)}


def cogview4(config, batch, text_tokens, generator, size):
    # SDXL-style size conditioning, as the pipeline passes it for a square image of the latent's size.
    pixels = torch.tensor([[size * 8.0, size * 8.0]] * batch)
    return {"hidden_states": torch.randn(batch, config.in_channels, size, size, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, config.text_embed_dim, generator=generator),
            "original_size": pixels, "target_size": pixels.clone(), "crop_coords": torch.zeros(batch, 2)}


def hunyuan_image(config, batch, text_tokens, generator, size):
    # The pipeline pads the Qwen2.5-VL prompt to its 1000 tokens and adds 128 ByT5 glyph tokens (all padding when
    # the prompt quotes no text); the glyph tokens scale with text_tokens, so scaled-down benchmarks keep the ratio.
    inputs = {"hidden_states": torch.randn(batch, config.in_channels, size, size, generator=generator),
              "encoder_hidden_states": torch.randn(batch, text_tokens, config.text_embed_dim, generator=generator),
              "encoder_attention_mask": padded_mask(batch, text_tokens)}
    if config.text_embed_2_dim is not None:
        glyphs = max(1, text_tokens * 128 // 1000)
        inputs["encoder_hidden_states_2"] = torch.randn(batch, glyphs, config.text_embed_2_dim, generator=generator)
        inputs["encoder_attention_mask_2"] = torch.zeros(batch, glyphs, dtype=torch.long)
    if config.guidance_embeds:  # the distilled model: the pipeline passes distilled_guidance_scale x 1000
        inputs["guidance"] = torch.full((batch,), 3250.0)
    if config.use_meanflow:
        inputs["timestep_r"] = torch.full((batch,), 400.0)
    return inputs


def allegro(config, batch, text_tokens, generator, size):
    # One latent frame (an image); a video adds frames along dim 2 (88 frames are 22 latent frames).
    return {"hidden_states": torch.randn(batch, config.in_channels, 1, size, size, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, config.caption_channels, generator=generator),
            "encoder_attention_mask": padded_mask(batch, text_tokens)}
