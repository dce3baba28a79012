"""Transformers built from config with random weights, and inputs for one denoising step.

Used by the tests and the benchmarks, so that neither downloads anything. ``pixart_alpha_shapes`` gives the
block shapes of PixArt-alpha (hidden 1152, 16 heads, 120 text tokens) at any depth and resolution.
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel


def tiny_dit(num_layers: int = 2, heads: int = 2, head_dim: int = 8, sample_size: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=num_layers, sample_size=sample_size, patch_size=2, norm_num_groups=2, num_embeds_ada_norm=10,
    ).eval()


def tiny_pixart(num_layers: int = 2, heads: int = 2, head_dim: int = 8, sample_size: int = 8,
                caption_channels: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=num_layers, cross_attention_dim=heads * head_dim, sample_size=sample_size, patch_size=2,
        caption_channels=caption_channels, use_additional_conditions=False,
    ).eval()


def pixart_alpha_shapes(num_layers: int = 4, sample_size: int = 32, seed: int = 0):
    """PixArt-alpha's block shapes (1152 wide, 16 heads, T5-XXL captions); 256x256 images at sample_size 32."""
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=num_layers,
        cross_attention_dim=1152, sample_size=sample_size, patch_size=2, caption_channels=4096,
        use_additional_conditions=False,
    ).eval()


def step_inputs(transformer, batch: int = 2, text_tokens: int = 6, timestep: int = 500, seed: int = 0) -> dict:
    """Keyword arguments of one denoising step of ``transformer`` with random latents (and text)."""
    config = transformer.config
    generator = torch.Generator().manual_seed(seed)
    size = config.sample_size
    inputs = {
        "hidden_states": torch.randn(batch, config.in_channels, size, size, generator=generator),
        "timestep": torch.full((batch,), timestep, dtype=torch.long),
    }
    if isinstance(transformer, DiTTransformer2DModel):
        inputs["class_labels"] = torch.arange(batch) % config.num_embeds_ada_norm
    else:
        inputs["encoder_hidden_states"] = torch.randn(batch, text_tokens, config.caption_channels, generator=generator)
        mask = torch.ones(batch, text_tokens, dtype=torch.long)
        mask[:, text_tokens // 2 + 1 :] = 0  # padded prompts, as the pipelines produce
        inputs["encoder_attention_mask"] = mask
        inputs["added_cond_kwargs"] = {"resolution": None, "aspect_ratio": None}
    return inputs


def run_steps(transformer, num_steps: int, **step_kwargs) -> list[torch.Tensor]:
    """Call ``transformer`` once per step, feeding each output back as the next latent (a toy sampler)."""
    inputs = step_inputs(transformer, **step_kwargs)
    outputs = []
    with torch.no_grad():
        for step in range(num_steps):
            inputs["timestep"] = torch.full_like(inputs["timestep"], 900 - step * (800 // max(num_steps, 1)))
            output = transformer(**inputs).sample
            outputs.append(output)
            inputs["hidden_states"] = inputs["hidden_states"] - 0.1 * output[:, : inputs["hidden_states"].shape[1]]
    return outputs
