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


# --- families helper f1 ---
def flux2_ids(side: int) -> torch.Tensor:
    """FLUX.2's 4-axis rotary position ids (T, H, W, L) of a ``side`` x ``side`` token grid."""
    rows, columns = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
    zeros = torch.zeros_like(rows)
    return torch.stack([zeros, rows, columns, zeros], dim=-1).reshape(-1, 4)


def flux2(config, batch, text_tokens, generator, size):
    # Packed 2x2 latents, ``size`` the side of the token grid; text ids count the tokens along the L axis.
    text_ids = torch.zeros(text_tokens, 4, dtype=torch.long)
    text_ids[:, 3] = torch.arange(text_tokens)
    inputs = {"hidden_states": torch.randn(batch, size * size, config.in_channels, generator=generator),
              "encoder_hidden_states": torch.randn(batch, text_tokens, config.joint_attention_dim, generator=generator),
              "img_ids": flux2_ids(size), "txt_ids": text_ids}
    if config.guidance_embeds:  # FLUX.2-dev: the guidance scale is an input
        inputs["guidance"] = torch.full((batch,), 4.0)
    return inputs


def chroma(config, batch, text_tokens, generator, size):
    # FLUX.1's packed layout and ids, no pooled text; the mask covers the text and image tokens.
    mask = torch.ones(batch, text_tokens + size * size, dtype=torch.bool)
    mask[:, text_tokens // 2 + 1 : text_tokens] = False  # padded prompts (Chroma keeps one padding token unmasked)
    return {"hidden_states": torch.randn(batch, size * size, config.in_channels, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, config.joint_attention_dim, generator=generator),
            "img_ids": image_ids(size), "txt_ids": torch.zeros(text_tokens, 3), "attention_mask": mask}


def z_image(config, batch, text_tokens, generator, size):
    # Lists, one tensor per sample, as ZImagePipeline passes them: latents [C, 1, H, W] (one frame) and the prompt's
    # unpadded text features [tokens, cap_feat_dim].
    return {"x": list(torch.randn(batch, config.in_channels, 1, size, size, generator=generator).unbind(0)),
            "cap_feats": list(torch.randn(batch, text_tokens, config.cap_feat_dim, generator=generator).unbind(0))}


def ovis_image(config, batch, text_tokens, generator, size):
    # FLUX.1's packed layout and ids, without pooled text or a guidance input.
    return {"hidden_states": torch.randn(batch, size * size, config.in_channels, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, config.joint_attention_dim, generator=generator),
            "img_ids": image_ids(size), "txt_ids": torch.zeros(text_tokens, 3)}


# --- video families (helper f3): latents of ``frames`` latent frames; 2 keeps the tiny videos tiny ---
VIDEO_FRAMES = 2


def hunyuan_video15(config, batch, text_tokens, generator, size, frames=VIDEO_FRAMES):
    """HunyuanVideo 1.5's context is three streams the transformer joins, padding included: Qwen2.5-VL prompt
    tokens (1000 in the pipeline), ByT5 glyph tokens (256, all padding without quoted text) and SigLIP image
    tokens (729, zeros and masked out for text-to-video). ``text_tokens`` is their total, split in those shares."""
    glyph, image = max(1, text_tokens * 256 // 1985), max(1, text_tokens * 729 // 1985)
    prompt = max(2, text_tokens - glyph - image)
    return {"hidden_states": torch.randn(batch, config.in_channels, frames, size, size, generator=generator),
            "encoder_hidden_states": torch.randn(batch, prompt, config.text_embed_dim, generator=generator),
            "encoder_attention_mask": padded_mask(batch, prompt),
            "encoder_hidden_states_2": torch.zeros(batch, glyph, config.text_embed_2_dim),
            "encoder_attention_mask_2": torch.zeros(batch, glyph, dtype=torch.long),
            "image_embeds": torch.zeros(batch, image, config.image_embed_dim)}


def ltx_video(config, batch, text_tokens, generator, size, frames=VIDEO_FRAMES):
    """LTX-Video takes packed tokens [B, F*H*W, C] and the latent grid's size for its rotary positions; the
    interpolation scale is LTXPipeline's at 25 fps with the real VAE (8x in time, 32x in space)."""
    return {"hidden_states": torch.randn(batch, frames * size * size, config.in_channels, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, config.caption_channels, generator=generator),
            "encoder_attention_mask": padded_mask(batch, text_tokens),
            "num_frames": frames, "height": size, "width": size, "rope_interpolation_scale": (8 / 25, 32, 32)}


def cogvideox(config, batch, text_tokens, generator, size, frames=VIDEO_FRAMES):
    """CogVideoX latents are frame-major [B, F, C, H, W]. With sin-cos positions (2B) the text length is the
    config's (226 real); the rotary positions (5B, 1.5) are the pipeline's own, for this latent grid."""
    from types import SimpleNamespace

    from diffusers import CogVideoXPipeline

    inputs = {"hidden_states": torch.randn(batch, frames, config.in_channels, size, size, generator=generator),
              "encoder_hidden_states": torch.randn(
                  batch, text_tokens if config.use_rotary_positional_embeddings else config.max_text_seq_length,
                  config.text_embed_dim, generator=generator)}
    if config.use_rotary_positional_embeddings:
        grid = SimpleNamespace(transformer=SimpleNamespace(config=config), vae_scale_factor_spatial=1)
        inputs["image_rotary_emb"] = CogVideoXPipeline._prepare_rotary_positional_embeddings(
            grid, size, size, frames, torch.device("cpu"))
    return inputs


def hunyuan_video(config, batch, text_tokens, generator, size, frames=VIDEO_FRAMES):
    """HunyuanVideo (1.0): Llama prompt tokens with their mask, a CLIP pooled vector, and the distilled guidance
    scale as an input (x1000, as HunyuanVideoPipeline passes it)."""
    return {"hidden_states": torch.randn(batch, config.in_channels, frames, size, size, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, config.text_embed_dim, generator=generator),
            "encoder_attention_mask": padded_mask(batch, text_tokens),
            "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=generator),
            "guidance": torch.full((batch,), 6.0 * 1000)}


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
