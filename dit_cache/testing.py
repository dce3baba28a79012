"""Transformers built from config with random weights, and inputs for one denoising step.

Used by the tests and the benchmarks, so that neither downloads anything. ``pixart_alpha_shapes`` gives the
block shapes of PixArt-alpha (hidden 1152, 16 heads, 120 text tokens) at any depth and resolution.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers import (CogVideoXTransformer3DModel, DiTTransformer2DModel, FluxTransformer2DModel,
                       HunyuanVideo15Transformer3DModel, HunyuanVideoTransformer3DModel, LTXVideoTransformer3DModel,
                       PixArtTransformer2DModel, QwenImageTransformer2DModel, SanaTransformer2DModel,
                       SD3Transformer2DModel, WanTransformer3DModel)

from .families import family_of
from .flops import step_inputs  # noqa: F401  (re-exported for the tests and benchmarks)
from .toy.tokenizers import word_tokenizer


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


def tiny_sd3(num_layers: int = 2, heads: int = 2, head_dim: int = 8, sample_size: int = 8, text_dim: int = 32,
             pooled_dim: int = 32, dual_attention_layers: tuple[int, ...] = (), seed: int = 0):
    """SD3 / SD3.5 (``dual_attention_layers`` gives those blocks SD3.5's second attention); the last block is
    context-pre-only, as in the real models."""
    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=pooled_dim, pos_embed_max_size=16,
        dual_attention_layers=tuple(dual_attention_layers),
    ).eval()


def tiny_flux(num_layers: int = 1, num_single_layers: int = 2, heads: int = 2, head_dim: int = 16,
              in_channels: int = 16, text_dim: int = 32, pooled_dim: int = 16, guidance_embeds: bool = True,
              seed: int = 0):
    """FLUX.1 (``guidance_embeds``: dev's guidance distillation; schnell has none). ``in_channels`` is the packed
    latent width: 4 x the VAE's latent channels."""
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=in_channels, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_dim,
        pooled_projection_dim=pooled_dim, guidance_embeds=guidance_embeds, axes_dims_rope=(4, 4, 8),
    ).eval()


def tiny_sana(num_layers: int = 2, heads: int = 2, head_dim: int = 8, sample_size: int = 8,
              caption_channels: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    return SanaTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=num_layers,
        num_cross_attention_heads=heads, cross_attention_head_dim=head_dim, cross_attention_dim=heads * head_dim,
        caption_channels=caption_channels, sample_size=sample_size, patch_size=1,
    ).eval()


def tiny_qwen_image(num_layers: int = 2, heads: int = 2, head_dim: int = 16, text_dim: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=num_layers, attention_head_dim=head_dim,
        num_attention_heads=heads, joint_attention_dim=text_dim, axes_dims_rope=(4, 6, 6),
    ).eval()


def tiny_wan(num_layers: int = 2, heads: int = 2, head_dim: int = 12, text_dim: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4,
        text_dim=text_dim, freq_dim=16, ffn_dim=32, num_layers=num_layers, rope_max_seq_len=32,
    ).eval()


def tiny_hunyuan_video15(num_layers: int = 2, heads: int = 2, head_dim: int = 16, latent_channels: int = 4,
                         text_dim: int = 16, glyph_dim: int = 8, image_dim: int = 8, seed: int = 0):
    """HunyuanVideo 1.5; its input is the latents, the image-condition latents and their mask (2C + 1 channels),
    as HunyuanVideo15Pipeline concatenates them."""
    torch.manual_seed(seed)
    return HunyuanVideo15Transformer3DModel(
        in_channels=2 * latent_channels + 1, out_channels=latent_channels, num_attention_heads=heads,
        attention_head_dim=head_dim, num_layers=num_layers, num_refiner_layers=1, mlp_ratio=2.0,
        text_embed_dim=text_dim, text_embed_2_dim=glyph_dim, image_embed_dim=image_dim, rope_axes_dim=(4, 6, 6),
        task_type="t2v",
    ).eval()


def tiny_ltx_video(num_layers: int = 2, heads: int = 2, head_dim: int = 8, in_channels: int = 8,
                   caption_channels: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    return LTXVideoTransformer3DModel(
        in_channels=in_channels, out_channels=in_channels, num_attention_heads=heads, attention_head_dim=head_dim,
        cross_attention_dim=heads * head_dim, num_layers=num_layers, caption_channels=caption_channels,
    ).eval()


def tiny_cogvideox(num_layers: int = 2, heads: int = 2, head_dim: int = 16, text_dim: int = 16, text_tokens: int = 8,
                   rotary: bool = True, seed: int = 0):
    """CogVideoX (``rotary``: the 5B's rotary positions; the 2B's are sin-cos); the text length is part of the
    config (226 in the real models)."""
    torch.manual_seed(seed)
    return CogVideoXTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4, time_embed_dim=8,
        text_embed_dim=text_dim, num_layers=num_layers, sample_width=4, sample_height=4, sample_frames=5,
        patch_size=2, temporal_compression_ratio=4, max_text_seq_length=text_tokens,
        use_rotary_positional_embeddings=rotary, norm_eps=1e-5,
    ).eval()


def tiny_hunyuan_video(num_layers: int = 1, num_single_layers: int = 2, heads: int = 2, head_dim: int = 8,
                       text_dim: int = 16, pooled_dim: int = 16, seed: int = 0):
    torch.manual_seed(seed)
    return HunyuanVideoTransformer3DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=num_layers,
        num_single_layers=num_single_layers, num_refiner_layers=1, mlp_ratio=2.0, patch_size=1, patch_size_t=1,
        text_embed_dim=text_dim, pooled_projection_dim=pooled_dim, rope_axes_dim=(2, 2, 4),
    ).eval()


def run_steps(transformer, num_steps: int, **step_kwargs) -> list[torch.Tensor]:
    """Call ``transformer`` once per step, feeding each output back as the next latent (a toy sampler)."""
    inputs = step_inputs(transformer, **step_kwargs)
    family, config = family_of(transformer), transformer.config
    latent, timestep = next(iter(inputs)), family.timestep_argument  # every family's step inputs start with the latents
    outputs = []
    with torch.no_grad():
        for step in range(num_steps):
            inputs[timestep] = family.timesteps(900 - step * (800 // max(num_steps, 1)), inputs[timestep].shape[0],
                                                config)
            output = transformer(**inputs, return_dict=False)[0]  # FLUX's CP split hook refuses a return_dict
            listed = isinstance(output, list)  # Z-Image: one tensor per sample, in and out
            output = torch.stack(output) if listed else output
            outputs.append(output)
            latents = torch.stack(inputs[latent]) if listed else inputs[latent]
            # HunyuanVideo 1.5 reads more channels than it predicts (image condition + mask): update the latents'.
            channels = min(latents.shape[1], output.shape[1])
            latents = torch.cat([latents[:, :channels] - 0.1 * output[:, :channels], latents[:, channels:]], dim=1)
            inputs[latent] = list(latents.unbind(0)) if listed else latents
    return outputs


def tiny_tokenizer():
    return word_tokenizer(["a", "and", "red", "green", "blue", "circle", "square", "triangle", "cat", "dog"])


def tiny_vae(shift_factor: float | None = None):
    """Scale factor 8, as real PixArt / DiT VAEs: the stock pipelines' resolution binning then works.
    ``shift_factor``: SD3 and FLUX VAEs shift their latents (their pipelines read the value)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
                         up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4),
                         layers_per_block=1, latent_channels=4, norm_num_groups=2, sample_size=256,
                         shift_factor=shift_factor).eval()


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


def _tiny_t5(d_model: int = 16):
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(0)
    return T5EncoderModel(T5Config(vocab_size=64, d_model=d_model, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                                   dropout_rate=0.0)).eval()


def _tiny_clip(with_projection: bool, hidden: int = 16, seed: int = 0):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    # Token ids of tiny_tokenizer: </s> (1) ends a prompt, which is where CLIP pools.
    config = CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
                            bos_token_id=0, eos_token_id=1, pad_token_id=0)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _clip_slot_tokenizer():
    # The pipelines pad CLIP prompts to the tokenizer's model_max_length (77 for real CLIP tokenizers).
    tokenizer = tiny_tokenizer()
    tokenizer.model_max_length = 77
    return tokenizer


def tiny_sd3_pipeline(num_layers: int = 2, pipeline_class=None):
    """A StableDiffusion3Pipeline from tiny random components (two CLIPs and a T5): no download."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    # Two CLIPs of width 16: their concatenated hidden states (32) fill the T5 width; pooled = 16 + 16.
    return (pipeline_class or StableDiffusion3Pipeline)(
        transformer=tiny_sd3(num_layers=num_layers, text_dim=32, pooled_dim=32, sample_size=32),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(shift_factor=0.0),
        text_encoder=_tiny_clip(True, seed=1), tokenizer=_clip_slot_tokenizer(),
        text_encoder_2=_tiny_clip(True, seed=2), tokenizer_2=_clip_slot_tokenizer(),
        text_encoder_3=_tiny_t5(d_model=32), tokenizer_3=tiny_tokenizer(),
    )


def tiny_flux_pipeline(num_layers: int = 1, num_single_layers: int = 2, pipeline_class=None):
    """A FluxPipeline (dev-style, guidance-distilled) from tiny random components (a CLIP and a T5)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    return (pipeline_class or FluxPipeline)(
        transformer=tiny_flux(num_layers=num_layers, num_single_layers=num_single_layers, pooled_dim=16,
                              text_dim=32, in_channels=16),
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(shift_factor=0.0),
        text_encoder=_tiny_clip(False), tokenizer=_clip_slot_tokenizer(),
        text_encoder_2=_tiny_t5(d_model=32), tokenizer_2=tiny_tokenizer(),
    )


def tiny_sana_pipeline(num_layers: int = 2, pipeline_class=None):
    """A SanaPipeline from tiny random components (a Gemma-2 text encoder, a DC-AE): no download."""
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaPipeline
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    text_encoder = Gemma2Model(Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32,
                                            num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=1,
                                            head_dim=8, max_position_embeddings=512)).eval()
    vae = AutoencoderDC(
        in_channels=3, latent_channels=4, attention_head_dim=2, encoder_block_types=("ResBlock", "EfficientViTBlock"),
        decoder_block_types=("ResBlock", "EfficientViTBlock"), encoder_block_out_channels=(8, 8),
        decoder_block_out_channels=(8, 8), encoder_qkv_multiscales=((), (5,)), decoder_qkv_multiscales=((), (5,)),
        encoder_layers_per_block=(1, 1), decoder_layers_per_block=(1, 1), downsample_block_type="conv",
        upsample_block_type="interpolate", decoder_norm_types="rms_norm", decoder_act_fns="silu",
        scaling_factor=0.41407,
    ).eval()
    # Sana's flow-matching DPM-Solver, as the real pipelines ship it.
    scheduler = DPMSolverMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0)
    return (pipeline_class or SanaPipeline)(
        tokenizer=tiny_tokenizer(), text_encoder=text_encoder, vae=vae,
        transformer=tiny_sana(num_layers=num_layers, caption_channels=16, sample_size=32), scheduler=scheduler,
    )


def tiny_qwen_image_pipeline(num_layers: int = 2, pipeline_class=None):
    """A QwenImagePipeline from tiny random components (a Qwen2.5-VL text encoder, the Qwen-Image VAE)."""
    from diffusers import AutoencoderKLQwenImage, FlowMatchEulerDiscreteScheduler, QwenImagePipeline
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    torch.manual_seed(0)
    ids = dict(bos_token_id=0, eos_token_id=1, pad_token_id=0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config=dict(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}, **ids),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=16, num_heads=2, out_hidden_size=16,
                           patch_size=2, spatial_merge_size=2, temporal_patch_size=1, fullatt_block_indexes=[0]),
        vocab_size=64, hidden_size=16, **ids)).eval()
    vae = AutoencoderKLQwenImage(base_dim=4, z_dim=4, dim_mult=[1, 2, 4], num_res_blocks=1,
                                 temperal_downsample=[False, True], latents_mean=[0.0] * 4,
                                 latents_std=[1.0] * 4).eval()
    # 2x2-packed latents of a 4-channel VAE: the transformer reads 16 channels and predicts 4 per token x 4.
    return (pipeline_class or QwenImagePipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae, text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(), transformer=tiny_qwen_image(num_layers=num_layers))


# The text encoders of FLUX.2 and Z-Image are chat models: their tokenizers format each prompt with a chat template.
# The tiny ones keep the user's text only (FLUX.2's system message would fill the few tiny tokens).
_USER_TEXT_TEMPLATE = ("{% for m in messages %}{% if m['role'] == 'user' %}{% if m['content'] is string %}"
                       "{{ m['content'] }}{% else %}{% for c in m['content'] %}{{ c['text'] }}{% endfor %}{% endif %}"
                       "{% endif %}{% endfor %}")


def _chat_tokenizer():
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = _USER_TEXT_TEMPLATE
    return tokenizer


# FLUX.2 stacks three hidden states of its text encoder (Mistral 3 layers 10, 20, 30; Klein's Qwen3 9, 18, 27): the
# tiny encoders have 31 narrow layers so that the pipelines' default layers exist.
_FLUX2_TEXT_LAYERS = 31


def tiny_flux2(num_layers: int = 1, num_single_layers: int = 2, heads: int = 2, head_dim: int = 16,
               text_dim: int = 48, guidance_embeds: bool = True, seed: int = 0):
    """FLUX.2 (``guidance_embeds``: dev's guidance distillation; Klein has none). 16 packed channels: a 4-channel
    VAE's 2x2 patches; ``text_dim``: three stacked text-encoder layers of width 16."""
    from diffusers import Flux2Transformer2DModel

    torch.manual_seed(seed)
    return Flux2Transformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_dim,
        timestep_guidance_channels=32, mlp_ratio=2.0, axes_dims_rope=(4, 4, 4, 4), guidance_embeds=guidance_embeds,
    ).eval()


def _tiny_flux2_vae():
    from diffusers import AutoencoderKLFlux2

    torch.manual_seed(0)
    return AutoencoderKLFlux2(down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                              block_out_channels=(4, 4, 4, 4), layers_per_block=1, latent_channels=4,
                              norm_num_groups=2, sample_size=64).eval()


def tiny_flux2_pipeline(num_layers: int = 1, num_single_layers: int = 2, pipeline_class=None):
    """A Flux2Pipeline (FLUX.2-dev: guidance-distilled, one call per step) from tiny random components (a
    Mistral 3 text encoder, the FLUX.2 VAE). Its ``__call__`` takes ``image`` first: pass ``prompt=``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2Pipeline
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    torch.manual_seed(0)
    text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
        text_config=dict(model_type="mistral", vocab_size=64, hidden_size=16, intermediate_size=16,
                         num_hidden_layers=_FLUX2_TEXT_LAYERS, num_attention_heads=2, num_key_value_heads=1,
                         head_dim=8, max_position_embeddings=512),
        vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=16, num_hidden_layers=1,
                           num_attention_heads=2, head_dim=8, image_size=16, patch_size=4),
        spatial_merge_size=1)).eval()
    return (pipeline_class or Flux2Pipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_flux2_vae(), text_encoder=text_encoder,
        tokenizer=_chat_tokenizer(), transformer=tiny_flux2(num_layers, num_single_layers))


def tiny_flux2_klein_pipeline(num_layers: int = 1, num_single_layers: int = 2, pipeline_class=None):
    """A Flux2KleinPipeline (FLUX.2 [klein] base: true CFG, two calls per step in cache_context) from tiny random
    components (a Qwen3 text encoder). Its ``__call__`` takes ``image`` first: pass ``prompt=``."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Flux2KleinPipeline
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    text_encoder = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=64, hidden_size=16, intermediate_size=16, num_hidden_layers=_FLUX2_TEXT_LAYERS,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, max_position_embeddings=512)).eval()
    return (pipeline_class or Flux2KleinPipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=_tiny_flux2_vae(), text_encoder=text_encoder,
        tokenizer=_chat_tokenizer(),
        transformer=tiny_flux2(num_layers, num_single_layers, guidance_embeds=False))


def tiny_chroma(num_layers: int = 1, num_single_layers: int = 2, heads: int = 2, head_dim: int = 16,
                text_dim: int = 32, seed: int = 0):
    """Chroma: FLUX.1-schnell's blocks, modulation from a small approximator network instead of per-block MLPs."""
    from diffusers import ChromaTransformer2DModel

    torch.manual_seed(seed)
    return ChromaTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_dim, axes_dims_rope=(4, 4, 8),
        approximator_num_channels=8, approximator_hidden_dim=32, approximator_layers=1,
    ).eval()


def tiny_chroma_pipeline(num_layers: int = 1, num_single_layers: int = 2, pipeline_class=None):
    """A ChromaPipeline from tiny random components (a T5, a FLUX-style VAE)."""
    from diffusers import ChromaPipeline, FlowMatchEulerDiscreteScheduler

    return (pipeline_class or ChromaPipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(shift_factor=0.0), text_encoder=_tiny_t5(d_model=32),
        tokenizer=tiny_tokenizer(), transformer=tiny_chroma(num_layers, num_single_layers))


def tiny_z_image(num_layers: int = 2, refiner_layers: int = 1, heads: int = 2, dim: int = 32, text_dim: int = 16,
                 seed: int = 0):
    """Z-Image: single-stream blocks over [image, text] tokens, after refiner blocks on each stream alone."""
    from diffusers import ZImageTransformer2DModel

    torch.manual_seed(seed)
    return ZImageTransformer2DModel(
        all_patch_size=(2,), all_f_patch_size=(1,), in_channels=4, dim=dim, n_layers=num_layers,
        n_refiner_layers=refiner_layers, n_heads=heads, n_kv_heads=heads, cap_feat_dim=text_dim, axes_dims=[4, 6, 6],
        axes_lens=[128, 32, 32],  # text positions come first: 128 covers the tiny prompts padded to 32 tokens
    ).eval()


def tiny_z_image_pipeline(num_layers: int = 2, pipeline_class=None):
    """A ZImagePipeline from tiny random components (a Qwen3 text encoder, a FLUX-style VAE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, ZImagePipeline
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                          max_position_embeddings=512)).eval()
    return (pipeline_class or ZImagePipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=tiny_vae(shift_factor=0.0), text_encoder=text_encoder,
        tokenizer=_chat_tokenizer(), transformer=tiny_z_image(num_layers=num_layers))


def tiny_ovis_image(num_layers: int = 1, num_single_layers: int = 2, heads: int = 2, head_dim: int = 16,
                    text_dim: int = 16, seed: int = 0):
    """Ovis-Image: FLUX.1-style double and single blocks (SwiGLU MLPs), no pooled text, no guidance input."""
    from diffusers import OvisImageTransformer2DModel

    torch.manual_seed(seed)
    return OvisImageTransformer2DModel(
        patch_size=1, in_channels=16, out_channels=16, num_layers=num_layers, num_single_layers=num_single_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=text_dim, axes_dims_rope=(4, 4, 8),
    ).eval()


def tiny_ovis_image_pipeline(num_layers: int = 1, num_single_layers: int = 2, pipeline_class=None):
    """An OvisImagePipeline from tiny random components (a Qwen3 text encoder, a FLUX-style VAE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, OvisImagePipeline
    from transformers import Qwen3Config, Qwen3Model

    torch.manual_seed(0)
    text_encoder = Qwen3Model(Qwen3Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                          num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                          max_position_embeddings=512)).eval()
    return (pipeline_class or OvisImagePipeline)(
        scheduler=FlowMatchEulerDiscreteScheduler(), vae=tiny_vae(shift_factor=0.0), text_encoder=text_encoder,
        tokenizer=_chat_tokenizer(), transformer=tiny_ovis_image(num_layers, num_single_layers))


def tiny_umt5(d_model: int = 16):
    """A tiny UMT5 encoder (Wan's text encoder family)."""
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(0)
    return UMT5EncoderModel(UMT5Config(vocab_size=64, d_model=d_model, d_kv=4, d_ff=32, num_layers=1, num_heads=4,
                                       relative_attention_num_buckets=8, dropout_rate=0.0)).eval()


def tiny_wan_vae(z_dim: int = 4):
    """Wan's causal video VAE with its real compression (4x in time, 8x in space) at width 3: 5 frames of 32x32
    pixels are 2 latent frames of 4x4."""
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=z_dim, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * z_dim,
                            latents_std=[1.0] * z_dim).eval()


def tiny_wan_pipeline(num_layers: int = 2, pipeline_class=None):
    """A WanPipeline (Wan 2.1 text-to-video: one transformer) from tiny random components (a UMT5, a Wan VAE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, WanPipeline

    return (pipeline_class or WanPipeline)(
        tokenizer=tiny_tokenizer(), text_encoder=tiny_umt5(d_model=16), vae=tiny_wan_vae(z_dim=4),
        transformer=tiny_wan(num_layers=num_layers, text_dim=16), scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0),
    )


def _chat_prompt_tokenizer():
    """tiny_tokenizer with a plain chat template: HunyuanVideo 1.5 formats its prompt as a chat."""
    tokenizer = tiny_tokenizer()
    tokenizer.chat_template = ("{% for message in messages %}{{ message['role'] }} {{ message['content'] }} "
                               "{% endfor %}{% if add_generation_prompt %}assistant {% endif %}")
    return tokenizer


def _short_hunyuan_video15_class():
    """HunyuanVideo15Pipeline with tiny text lengths. The real ones (1000 prompt tokens after a 108-token system
    prompt, 256 glyph and 729 image tokens) are set in ``__init__``, not taken as arguments, and a 2000-token context
    makes the tiny pipeline 10x slower; shortening them in a subclass's ``__init__`` (not on an instance) keeps
    them through ``from_pipe``, which builds the pipeline anew."""
    global _ShortHunyuanVideo15Pipeline
    if "_ShortHunyuanVideo15Pipeline" not in globals():
        from diffusers import HunyuanVideo15Pipeline

        class _ShortHunyuanVideo15Pipeline(HunyuanVideo15Pipeline):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)
                self.tokenizer_max_length, self.prompt_template_encode_start_idx = 8, 4
                self.tokenizer_2_max_length, self.vision_num_semantic_tokens = 4, 4

        import inspect

        # diffusers reads the components from the signature of __init__.
        _ShortHunyuanVideo15Pipeline.__init__.__signature__ = inspect.signature(HunyuanVideo15Pipeline.__init__)
        _ShortHunyuanVideo15Pipeline.__init__.__annotations__ = HunyuanVideo15Pipeline.__init__.__annotations__
        _ShortHunyuanVideo15Pipeline.__name__ = _ShortHunyuanVideo15Pipeline.__qualname__ = "TinyHunyuanVideo15Pipeline"
    return _ShortHunyuanVideo15Pipeline


def tiny_hunyuan_video15_pipeline(num_layers: int = 2, pipeline_class=None):
    """A HunyuanVideo15Pipeline (with tiny text lengths: ``_short_hunyuan_video15_class``) from tiny random
    components (a Qwen2.5-VL text model, a ByT5, the 16x VAE)."""
    from diffusers import AutoencoderKLHunyuanVideo15, FlowMatchEulerDiscreteScheduler
    from diffusers.guiders import ClassifierFreeGuidance
    from transformers import ByT5Tokenizer, Qwen2_5_VLTextConfig, Qwen2_5_VLTextModel

    torch.manual_seed(0)
    # The pipeline reads hidden_states[-3]: three layers. mrope sections of the tiny head (head_dim 8).
    text_encoder = Qwen2_5_VLTextModel(Qwen2_5_VLTextConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        num_key_value_heads=1, max_position_embeddings=256, bos_token_id=0, eos_token_id=1, pad_token_id=0,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]})).eval()
    vae = AutoencoderKLHunyuanVideo15(latent_channels=4, block_out_channels=(8, 8, 8, 8, 8), layers_per_block=1,
                                      spatial_compression_ratio=16, temporal_compression_ratio=4).eval()
    return (pipeline_class or _short_hunyuan_video15_class())(
        text_encoder=text_encoder, tokenizer=_chat_prompt_tokenizer(), transformer=tiny_hunyuan_video15(num_layers),
        vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), text_encoder_2=_tiny_t5(d_model=8),
        tokenizer_2=ByT5Tokenizer(), guider=ClassifierFreeGuidance(guidance_scale=6.0))


def tiny_ltx_vae(latent_channels: int = 8):
    """LTX's video VAE at width 8 without its 4x4 patching: 8x in time and in space (the real one: 8x, 32x), so
    that 9 frames of 32x32 pixels (the pipeline wants multiples of 32) are 2 latent frames of 4x4."""
    from diffusers import AutoencoderKLLTXVideo

    torch.manual_seed(0)
    flags = (True, True, True, False)
    return AutoencoderKLLTXVideo(
        latent_channels=latent_channels, block_out_channels=(8,) * 4, decoder_block_out_channels=(8,) * 4,
        layers_per_block=(1,) * 5, decoder_layers_per_block=(1,) * 5, spatio_temporal_scaling=flags,
        decoder_spatio_temporal_scaling=flags, decoder_inject_noise=(False,) * 5, upsample_residual=(False,) * 4,
        upsample_factor=(1,) * 4, patch_size=1, patch_size_t=1).eval()


def tiny_ltx_pipeline(num_layers: int = 2, pipeline_class=None):
    """An LTXPipeline from tiny random components (a T5, LTX's video VAE)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, LTXPipeline

    return (pipeline_class or LTXPipeline)(
        transformer=tiny_ltx_video(num_layers=num_layers, in_channels=8, caption_channels=16), vae=tiny_ltx_vae(8),
        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=_tiny_t5(d_model=16), tokenizer=tiny_tokenizer())


def tiny_cogvideox_pipeline(num_layers: int = 2, pipeline_class=None):
    """A CogVideoXPipeline from tiny random components (a T5, CogVideoX's video VAE: 4x in time, 8x in space)."""
    from diffusers import AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXPipeline

    torch.manual_seed(0)
    vae = AutoencoderKLCogVideoX(block_out_channels=(8,) * 4, latent_channels=4, layers_per_block=1,
                                 norm_num_groups=2, temporal_compression_ratio=4).eval()
    return (pipeline_class or CogVideoXPipeline)(
        tokenizer=tiny_tokenizer(), text_encoder=_tiny_t5(d_model=16), vae=vae,
        transformer=tiny_cogvideox(num_layers=num_layers, text_dim=16, text_tokens=8),
        scheduler=CogVideoXDDIMScheduler(timestep_spacing="trailing"))


def tiny_hunyuan_video_pipeline(num_layers: int = 1, num_single_layers: int = 2, pipeline_class=None):
    """A HunyuanVideoPipeline from tiny random components (a Llama, a CLIP, HunyuanVideo's VAE: 4x in time, 8x in
    space); call it with TINY_FAMILIES["hunyuan-video"].call (a one-slot prompt template)."""
    from diffusers import AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler, HunyuanVideoPipeline
    from transformers import LlamaConfig, LlamaModel

    torch.manual_seed(0)
    # The pipeline reads hidden_states[-3]: three layers.
    text_encoder = LlamaModel(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                                          num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                                          bos_token_id=0, eos_token_id=1, pad_token_id=0)).eval()
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4, block_out_channels=(8,) * 4, layers_per_block=1, norm_num_groups=4,
        down_block_types=("HunyuanVideoDownBlock3D",) * 4, up_block_types=("HunyuanVideoUpBlock3D",) * 4,
        spatial_compression_ratio=8, temporal_compression_ratio=4).eval()
    return (pipeline_class or HunyuanVideoPipeline)(
        text_encoder=text_encoder, tokenizer=tiny_tokenizer(), transformer=tiny_hunyuan_video(num_layers,
                                                                                              num_single_layers),
        vae=vae, scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=_tiny_clip(False, seed=1),
        tokenizer_2=_clip_slot_tokenizer())


@dataclass(frozen=True)
class TinyFamily:
    """A family's tiny random model and pipeline, as the contract test (tests/test_family_contract.py) runs them.

    ``model()`` builds the transformer; ``pipeline()`` a whole pipeline of tiny components, or None where diffusers
    has no pipeline for the family; ``call`` holds the pipeline keyword arguments every call needs (sizes, text
    length); ``cfg_call`` those that make the pipeline run classifier-free guidance.
    """

    model: Callable
    pipeline: Callable | None = None
    call: dict = field(default_factory=dict)
    cfg_call: dict = field(default_factory=lambda: {"guidance_scale": 3.0})


# One entry per record of dit_cache.families.FAMILIES (the contract test checks the two agree).
TINY_FAMILIES: dict[str, TinyFamily] = {
    "dit": TinyFamily(tiny_dit, tiny_dit_pipeline),
    "pixart": TinyFamily(tiny_pixart, tiny_pixart_pipeline, dict(clean_caption=False)),
    "sd3": TinyFamily(lambda: tiny_sd3(num_layers=3, dual_attention_layers=(0,)), tiny_sd3_pipeline,
                      dict(height=64, width=64, max_sequence_length=8)),
    "flux": TinyFamily(tiny_flux, tiny_flux_pipeline, dict(height=64, width=64, max_sequence_length=8),
                       cfg_call=dict(true_cfg_scale=2.0, negative_prompt="blurry")),
    "sana": TinyFamily(tiny_sana, tiny_sana_pipeline,
                       dict(height=32, width=32, max_sequence_length=8, use_resolution_binning=False)),
    "qwen-image": TinyFamily(tiny_qwen_image, tiny_qwen_image_pipeline,
                             dict(height=32, width=32, max_sequence_length=8),
                             cfg_call=dict(true_cfg_scale=2.0, negative_prompt="blurry")),
    # --- families helper f1 ---
    # FLUX.2-dev: one guidance-distilled call per step (Klein's two-call CFG: tests/test_families_flux2_chroma_z_image.py).
    "flux2": TinyFamily(tiny_flux2, tiny_flux2_pipeline, dict(height=64, width=64, max_sequence_length=8),
                        cfg_call=dict(guidance_scale=4.0)),
    "chroma": TinyFamily(tiny_chroma, tiny_chroma_pipeline, dict(height=64, width=64, max_sequence_length=8),
                         cfg_call=dict(guidance_scale=4.0, negative_prompt="blurry")),
    "z-image": TinyFamily(tiny_z_image, tiny_z_image_pipeline, dict(height=64, width=64, max_sequence_length=8),
                          cfg_call=dict(guidance_scale=4.0)),  # one call on [prompt, ""]
    "ovis-image": TinyFamily(tiny_ovis_image, tiny_ovis_image_pipeline, dict(height=64, width=64, max_sequence_length=8),
                             cfg_call=dict(guidance_scale=4.0, negative_prompt="blurry")),
    "wan": TinyFamily(tiny_wan, tiny_wan_pipeline, dict(height=32, width=32, num_frames=5, max_sequence_length=8)),
    "hunyuan-video-1.5": TinyFamily(tiny_hunyuan_video15, tiny_hunyuan_video15_pipeline,
                                    dict(height=32, width=32, num_frames=5), cfg_call={}),  # CFG: the guider's
    "ltx-video": TinyFamily(tiny_ltx_video, tiny_ltx_pipeline, dict(height=32, width=32, num_frames=9,
                                                                    max_sequence_length=8)),
    "cogvideox": TinyFamily(tiny_cogvideox, tiny_cogvideox_pipeline, dict(height=32, width=32, num_frames=5,
                                                                          max_sequence_length=8)),
    # The real prompt template (a system prompt, cropped after 95 tokens) is an argument: a one-slot one here.
    "hunyuan-video": TinyFamily(tiny_hunyuan_video, tiny_hunyuan_video_pipeline,
                                dict(height=32, width=32, num_frames=5, max_sequence_length=8,
                                     prompt_template={"template": "{}", "crop_start": 0}),
                                cfg_call=dict(true_cfg_scale=2.0, negative_prompt="blurry")),
}


def run_in_lockstep(transformer, jobs):
    """Run ``jobs`` in threads that meet at every transformer call, so their steps interleave one by one."""
    barrier = threading.Barrier(len(jobs), timeout=30)

    def meet(module, args):
        barrier.wait()  # returns an int, which a pre-hook must not return: it would replace the inputs

    hook = transformer.register_forward_pre_hook(meet)
    results, errors = [None] * len(jobs), []

    def run(index, job):
        try:
            results[index] = job()
        except Exception as error:  # surfaced below: a thread's exception is otherwise lost
            errors.append(error)
            barrier.abort()

    threads = [threading.Thread(target=run, args=(i, job)) for i, job in enumerate(jobs)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    hook.remove()
    if errors:
        raise errors[0]
    return results


# --- families-f2: Lumina2, CogView4, HunyuanImage 2.1 (tiny random models and pipelines) ---
def tiny_lumina2(num_layers: int = 2, num_refiner_layers: int = 1, heads: int = 2, head_dim: int = 8,
                 sample_size: int = 8, cap_feat_dim: int = 16, seed: int = 0):
    from diffusers import Lumina2Transformer2DModel

    torch.manual_seed(seed)
    return Lumina2Transformer2DModel(
        sample_size=sample_size, patch_size=2, in_channels=4, hidden_size=heads * head_dim, num_layers=num_layers,
        num_refiner_layers=num_refiner_layers, num_attention_heads=heads, num_kv_heads=1, multiple_of=16,
        axes_dim_rope=(4, 2, 2), axes_lens=(64, 32, 32), cap_feat_dim=cap_feat_dim,
    ).eval()


def tiny_cogview4(num_layers: int = 2, heads: int = 2, head_dim: int = 8, text_dim: int = 16, seed: int = 0):
    from diffusers import CogView4Transformer2DModel

    torch.manual_seed(seed)
    return CogView4Transformer2DModel(
        patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers, attention_head_dim=head_dim,
        num_attention_heads=heads, text_embed_dim=text_dim, time_embed_dim=8, condition_dim=4, sample_size=8,
        rope_axes_dim=(8, 8),
    ).eval()


def tiny_hunyuan_image(num_layers: int = 1, num_single_layers: int = 2, heads: int = 2, head_dim: int = 8,
                       text_dim: int = 16, text_2_dim: int | None = 16, seed: int = 0):
    from diffusers import HunyuanImageTransformer2DModel

    torch.manual_seed(seed)
    return HunyuanImageTransformer2DModel(
        in_channels=4, out_channels=4, num_attention_heads=heads, attention_head_dim=head_dim, num_layers=num_layers,
        num_single_layers=num_single_layers, num_refiner_layers=1, patch_size=(1, 1), text_embed_dim=text_dim,
        text_embed_2_dim=text_2_dim, rope_axes_dim=(4, 4),
    ).eval()


def _tiny_gemma2(hidden: int = 16):
    from transformers import Gemma2Config, Gemma2Model

    torch.manual_seed(0)
    return Gemma2Model(Gemma2Config(vocab_size=64, hidden_size=hidden, intermediate_size=32, num_hidden_layers=2,
                                    num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                                    max_position_embeddings=512)).eval()


def tiny_lumina2_pipeline(num_layers: int = 2, pipeline_class=None):
    """A Lumina2Pipeline from tiny random components (a Gemma-2 text encoder): no download."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline

    return (pipeline_class or Lumina2Pipeline)(
        transformer=tiny_lumina2(num_layers=num_layers, cap_feat_dim=16), vae=tiny_vae(shift_factor=0.0),
        scheduler=FlowMatchEulerDiscreteScheduler(), text_encoder=_tiny_gemma2(16), tokenizer=tiny_tokenizer(),
    )


def tiny_cogview4_pipeline(num_layers: int = 2, pipeline_class=None):
    """A CogView4Pipeline from tiny random components (a GLM text encoder): no download."""
    from diffusers import CogView4Pipeline, FlowMatchEulerDiscreteScheduler
    from transformers import GlmConfig, GlmModel

    torch.manual_seed(0)
    text_encoder = GlmModel(GlmConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                      num_attention_heads=2, num_key_value_heads=1, head_dim=8, pad_token_id=0,
                                      max_position_embeddings=512)).eval()
    # CogView4's dynamic shifting, as the real pipeline ships its scheduler.
    scheduler = FlowMatchEulerDiscreteScheduler(base_shift=0.25, max_shift=0.75, base_image_seq_len=256,
                                                use_dynamic_shifting=True, time_shift_type="linear")
    return (pipeline_class or CogView4Pipeline)(
        transformer=tiny_cogview4(num_layers=num_layers, text_dim=16), vae=tiny_vae(), scheduler=scheduler,
        text_encoder=text_encoder, tokenizer=tiny_tokenizer(),
    )


def tiny_hunyuan_image_pipeline(num_layers: int = 1, num_single_layers: int = 2, pipeline_class=None):
    """A HunyuanImagePipeline (2.1, with its adaptive projected guider) from tiny random components: a
    Qwen2.5-VL text encoder, a ByT5 glyph encoder and a HunyuanImage VAE; no download. As the real pipeline, it
    pads every prompt to 1000 tokens."""
    from diffusers import (AdaptiveProjectedMixGuidance, AutoencoderKLHunyuanImage, FlowMatchEulerDiscreteScheduler,
                           HunyuanImagePipeline)
    from transformers import ByT5Tokenizer, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, T5Config, T5EncoderModel

    torch.manual_seed(0)
    text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
        text_config={"hidden_size": 16, "intermediate_size": 32, "num_hidden_layers": 3, "num_attention_heads": 2,
                     "num_key_value_heads": 1, "vocab_size": 64, "bos_token_id": 0, "eos_token_id": 1,
                     "rope_scaling": {"mrope_section": [1, 1, 2], "rope_type": "default", "type": "default"}},
        vision_config={"depth": 1, "hidden_size": 16, "intermediate_size": 16, "num_heads": 2, "out_hidden_size": 16},
        vocab_size=64, vision_start_token_id=60, vision_end_token_id=61, vision_token_id=62, image_token_id=63,
        video_token_id=63)).eval()
    glyph_encoder = T5EncoderModel(T5Config(vocab_size=384, d_model=16, d_kv=4, d_ff=32, num_layers=1, num_heads=2,
                                            dropout_rate=0.0, feed_forward_proj="gated-gelu")).eval()
    vae = AutoencoderKLHunyuanImage(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(32,) * 4,
                                    layers_per_block=1, scaling_factor=0.476986, spatial_compression_ratio=8,
                                    sample_size=64).eval()
    return (pipeline_class or HunyuanImagePipeline)(
        transformer=tiny_hunyuan_image(num_layers=num_layers, num_single_layers=num_single_layers),
        scheduler=FlowMatchEulerDiscreteScheduler(shift=5.0), vae=vae, text_encoder=text_encoder,
        tokenizer=tiny_tokenizer(), text_encoder_2=glyph_encoder, tokenizer_2=ByT5Tokenizer(),
        guider=AdaptiveProjectedMixGuidance(guidance_scale=3.0, adaptive_projected_guidance_start_step=2),
    )


TINY_FAMILIES.update({
    # Lumina2Pipeline's CFG is an unnamed second call per step, refused while cached: no cfg_call.
    "lumina2": TinyFamily(tiny_lumina2, tiny_lumina2_pipeline,
                          dict(height=64, width=64, max_sequence_length=32, system_prompt="", guidance_scale=1.0),
                          cfg_call={}),
    "cogview4": TinyFamily(tiny_cogview4, tiny_cogview4_pipeline, dict(height=64, width=64, max_sequence_length=16),
                           cfg_call=dict(guidance_scale=3.0, negative_prompt="blurry")),
    # Its guider (set on the pipeline) runs CFG at every step; the call has no guidance_scale.
    "hunyuan-image": TinyFamily(tiny_hunyuan_image, tiny_hunyuan_image_pipeline, dict(height=64, width=64),
                                cfg_call=dict(negative_prompt="blurry")),
})


def tiny_allegro(num_layers: int = 2, heads: int = 2, head_dim: int = 12, caption_channels: int = 16, seed: int = 0):
    """``head_dim`` splits in three for its 3D rotary embedding (frames, rows, columns)."""
    from diffusers import AllegroTransformer3DModel

    torch.manual_seed(seed)
    return AllegroTransformer3DModel(
        num_attention_heads=heads, attention_head_dim=head_dim, in_channels=4, out_channels=4, num_layers=num_layers,
        cross_attention_dim=heads * head_dim, caption_channels=caption_channels, sample_height=8, sample_width=8,
        sample_frames=2,
    ).eval()


def tiny_allegro_pipeline(num_layers: int = 2, pipeline_class=None):
    """An AllegroPipeline (text-to-video) from tiny random components (a T5, a tiled 3D VAE): no download."""
    from diffusers import AllegroPipeline, AutoencoderKLAllegro, DDIMScheduler

    torch.manual_seed(0)
    vae = AutoencoderKLAllegro(
        in_channels=3, out_channels=3, down_block_types=("AllegroDownBlock3D",) * 4,
        up_block_types=("AllegroUpBlock3D",) * 4, block_out_channels=(8,) * 4, latent_channels=4, layers_per_block=1,
        norm_num_groups=2, temporal_compression_ratio=4).eval()
    vae.enable_tiling()  # diffusers' Allegro VAE decodes tiled only
    # ... in tiles of 24 frames x 320 x 320 pixels, which an 8-frame 16 x 16 video does not fill (it would decode to
    # nothing): one tile of exactly the tiny video.
    vae.kernel = vae.stride = (8, 16, 16)
    return (pipeline_class or AllegroPipeline)(
        transformer=tiny_allegro(num_layers=num_layers), vae=vae, scheduler=DDIMScheduler(),
        text_encoder=_tiny_t5(d_model=16), tokenizer=tiny_tokenizer(),
    )


TINY_FAMILIES["allegro"] = TinyFamily(tiny_allegro, tiny_allegro_pipeline,
                                      dict(height=16, width=16, num_frames=8, max_sequence_length=8,
                                           clean_caption=False))
