"""Transformers built from config with random weights, and inputs for one denoising step.

Used by the tests and the benchmarks, so that neither downloads anything. ``pixart_alpha_shapes`` gives the
block shapes of PixArt-alpha (hidden 1152, 16 heads, 120 text tokens) at any depth and resolution.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
from diffusers import (DiTTransformer2DModel, FluxTransformer2DModel, PixArtTransformer2DModel,
                       QwenImageTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel,
                       WanTransformer3DModel)

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


def run_steps(transformer, num_steps: int, **step_kwargs) -> list[torch.Tensor]:
    """Call ``transformer`` once per step, feeding each output back as the next latent (a toy sampler)."""
    inputs = step_inputs(transformer, **step_kwargs)
    family, config = family_of(transformer), transformer.config
    outputs = []
    with torch.no_grad():
        for step in range(num_steps):
            inputs["timestep"] = family.timesteps(900 - step * (800 // max(num_steps, 1)), inputs["timestep"].shape[0],
                                                  config)
            output = transformer(**inputs, return_dict=False)[0]  # FLUX's CP split hook refuses a return_dict
            outputs.append(output)
            inputs["hidden_states"] = inputs["hidden_states"] - 0.1 * output[:, : inputs["hidden_states"].shape[1]]
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
    "qwen-image": TinyFamily(tiny_qwen_image, None, cfg_call=dict(true_cfg_scale=2.0, negative_prompt="blurry")),
    "wan": TinyFamily(tiny_wan, None),
}


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
