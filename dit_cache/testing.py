"""Transformers built from config with random weights, and inputs for one denoising step.

Used by the tests and the benchmarks, so that neither downloads anything. ``pixart_alpha_shapes`` gives the
block shapes of PixArt-alpha (hidden 1152, 16 heads, 120 text tokens) at any depth and resolution.
"""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel

from .flops import step_inputs  # noqa: F401  (re-exported: the tests and benchmarks build inputs with it)


def tiny_dit(num_layers: int = 2, heads: int = 2, head_dim: int = 8, sample_size: int = 8, seed: int = 0):
    torch.manual_seed(seed)
    return DiTTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=num_layers, sample_size=sample_size, patch_size=2, norm_num_groups=2, num_embeds_ada_norm=1000,
    ).eval()


def tiny_pixart(num_layers: int = 2, heads: int = 2, head_dim: int = 8, sample_size: int = 8,
                caption_channels: int = 16, seed: int = 0, patch_size: int = 2):
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=8,
        num_layers=num_layers, cross_attention_dim=heads * head_dim, sample_size=sample_size,
        patch_size=patch_size, caption_channels=caption_channels, use_additional_conditions=False,
    ).eval()


def pixart_alpha_shapes(num_layers: int = 4, sample_size: int = 32, seed: int = 0):
    """PixArt-alpha's block shapes (1152 wide, 16 heads, T5-XXL captions); 256x256 images at sample_size 32."""
    torch.manual_seed(seed)
    return PixArtTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=num_layers,
        cross_attention_dim=1152, sample_size=sample_size, patch_size=2, caption_channels=4096,
        use_additional_conditions=False,
    ).eval()


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


def tiny_tokenizer():
    from transformers import T5Tokenizer

    words = ["a", "and", "red", "green", "blue", "circle", "square", "triangle", "cat", "dog"]
    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -5.0)] + [("▁" + w, -1.0) for w in words]
    vocab += [(letter, -10.0) for letter in "abcdefghijklmnopqrstuvwxyz,"]
    return T5Tokenizer(vocab=vocab, extra_ids=0)


def tiny_vae():
    """Scale factor 8, as real PixArt / DiT VAEs: the stock pipelines' resolution binning then works."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4),
                         layers_per_block=1, latent_channels=4, norm_num_groups=2, sample_size=256).eval()


def tiny_pixart_pipeline(num_layers: int = 2, pipeline_class=None):
    """A PixArt-alpha pipeline from tiny random components (text encoder included): no download."""
    from diffusers import DPMSolverMultistepScheduler, PixArtAlphaPipeline
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    text_encoder = T5EncoderModel(T5Config(vocab_size=64, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                                           dropout_rate=0.0)).eval()
    return (pipeline_class or PixArtAlphaPipeline)(
        tokenizer=tiny_tokenizer(), text_encoder=text_encoder, vae=tiny_vae(),
        # sample_size 32 is one the stock pipeline's resolution binning accepts (256x256 images).
        transformer=tiny_pixart(num_layers=num_layers, caption_channels=16, sample_size=32, patch_size=4),
        scheduler=DPMSolverMultistepScheduler(),
    )


def tiny_dit_pipeline(num_layers: int = 2, pipeline_class=None):
    from diffusers import DDIMScheduler, DiTPipeline

    return (pipeline_class or DiTPipeline)(
        transformer=tiny_dit(num_layers=num_layers), vae=tiny_vae(), scheduler=DDIMScheduler(),
        id2label={0: "cat", 1: "dog"},
    )
