"""The model families dit-cache supports: one ``ModelFamily`` record per diffusers transformer class.

Every per-family fact lives here (units, step inputs, timestep mapping, CFG layout, pipelines, refusals, router
training's prompt encoding); the engine, pipelines, training and benchmark read these records. To add a family,
add a record (docs/adding_a_family.md) and a tiny model in ``dit_cache.testing.TINY_FAMILIES``: the contract test
(tests/test_family_contract.py) then checks it like every other family.
"""

from __future__ import annotations

import torch

from . import inputs, prompts, replays
from .record import Branch, CFGLayout, FamilyRegistry, ModelFamily, SecondCall

A, B, C = Branch, CFGLayout, SecondCall  # short names keep each record to a few readable lines


def _float(t, config):
    return t.float()


def _per_mille(t, config):
    return t / 1000


def _sana_timestep(t, config):
    return t * config.get("timestep_scale", 1.0)


def _z_image_timestep(t, config):
    return (1000 - t) / 1000  # ZImagePipeline: the time runs from 0 (noise) to 1 (image)


_JOINT_ATTENTION = ("its joint attention has no cross-attention over the text tokens, which Cross-Token NMS "
                    "needs. Correct the prompt embeddings yourself (dit_cache.concepts.correct_by_similarities) and "
                    "pass prompt_embeds=.")


def _one_wan_transformer(pipe) -> str:
    if getattr(pipe, "transformer_2", None) is None:
        return ""
    return ("it has a transformer_2 (Wan 2.2 A14B: a second expert for the low-noise steps), and dit-cache caches "
            "pipe.transformer only. Use a one-transformer Wan (2.1, 2.2 TI2V-5B), or call with cache=False.")


def _no_concepts(pipeline: str) -> str:
    return (f"{pipeline} has no cross-attention over prompt tokens that Cross-Token NMS can use. Correct the prompt "
            "embeddings yourself (dit_cache.concepts.correct_by_similarities) and pass prompt_embeds=.")


def _plain_two_call_guider(pipe) -> str:
    """HunyuanVideo 1.5 runs CFG through a diffusers guider: one call per condition, each in a cache context named
    after it. Plain CFG over every step is two calls in every step, which the cache follows; a guider that skips
    the unconditional call on some steps (start/stop) or adds calls (skip-layer, PAG) would put a context's
    history out of step with the plan."""
    from diffusers.guiders import ClassifierFreeGuidance

    guider = getattr(pipe, "guider", None)
    if guider is None or type(guider) is not ClassifierFreeGuidance:
        return (f"its guider is {type(guider).__name__}, and dit-cache follows only ClassifierFreeGuidance (one "
                "conditional and one unconditional call in every step). Set pipe.guider = "
                "ClassifierFreeGuidance(guidance_scale=...), or call with cache=False.")
    if guider._start != 0.0 or guider._stop != 1.0:
        return (f"its guider runs CFG only from {guider._start} to {guider._stop} of the steps, so the "
                "unconditional call skips steps of the plan. Use ClassifierFreeGuidance(start=0.0, stop=1.0), or "
                "call with cache=False.")
    return ""


# --- families-f2 helpers (Lumina2, CogView4, HunyuanImage 2.1) ---
def _lumina2_timestep(t, config):
    return 1 - t / 1000  # Lumina2Pipeline: t = 0 is noise, 1 the image (so its timesteps rise)


def _hunyuan_image_guider(pipe) -> str:
    # The guider runs the unconditional call in its own cache context; started late, that context would count
    # its steps from its first call and follow the plan shifted.
    late = [name for name in ("guider", "ocr_guider")
            if getattr(pipe, name, None) is not None and getattr(getattr(pipe, name), "_start", 0.0) > 0]
    if not late:
        return ""
    return (f"its {' and '.join(late)} starts guidance after the first step (start > 0), so the unconditional "
            "call skips the first steps and its cache would follow the plan shifted. Use a guider with start=0.")


# The prompt's projection and the keys and values every cross-attention takes from it: one input through a generation.
_CAPTION_AND_CROSS_ATTENTION = ("caption_projection", "transformer_blocks.*.attn2.to_k",
                                "transformer_blocks.*.attn2.to_v")


FAMILIES = FamilyRegistry([
    ModelFamily(
        "dit", "DiTTransformer2DModel", ("transformer_blocks",),
        {"BasicTransformerBlock": (A("attn1"), A("attn2"), A("ff"))},
        inputs.dit, B.CONDITIONAL_FIRST,  # DiTPipeline batches [labels, null labels]
        pipelines=("DiTPipeline",), conditioning=prompts.class_conditioning, bench_inputs="class_labels",
        replays={"BasicTransformerBlock": replays.basic_transformer_block},
        concepts_refusal="DiT is class-conditional: there are no prompt tokens.", aliases=("DiT",)),
    ModelFamily(
        "pixart", "PixArtTransformer2DModel", ("transformer_blocks",),
        {"BasicTransformerBlock": (A("attn1"), A("attn2"), A("ff"))},
        inputs.pixart, B.UNCONDITIONAL_FIRST,
        pipelines=("PixArtAlphaPipeline", "PixArtSigmaPipeline"), encode=prompts.pixart_encode,
        conditioning=prompts.masked_text_conditioning, bench_inputs="captions", concept_scored=True,
        replays={"BasicTransformerBlock": replays.basic_transformer_block}, fold=replays.TableGatedFold(),
        step_invariant=_CAPTION_AND_CROSS_ATTENTION, timestep_embedder=("adaln_single",),
        aliases=("PixArt-α", "PixArt-Σ")),
    ModelFamily(
        "sd3", "SD3Transformer2DModel", ("transformer_blocks",),
        # SD3.5-medium blocks outside dual_attention_layers have no attn2; the last block no ff_context.
        {"JointTransformerBlock": (A("attn", 2), A("attn2"), A("ff"), A("ff_context"))},
        inputs.sd3, B.UNCONDITIONAL_FIRST, timestep=_float, timestep_dtype=torch.float32,
        replays={"JointTransformerBlock": replays.joint_transformer_block},
        text_tokens=333,  # 77 CLIP + 256 T5
        pipelines=("StableDiffusion3Pipeline",), encode=prompts.sd3_encode, conditioning=prompts.sd3_conditioning,
        second_calls=(C("skip_guidance_layers", lambda kwargs: bool(kwargs.get("skip_guidance_layers")),
                        "Leave skip_guidance_layers=None"),),
        concepts_refusal=_JOINT_ATTENTION, aliases=("SD3", "SD3.5")),
    ModelFamily(
        "flux", "FluxTransformer2DModel", ("transformer_blocks", "single_transformer_blocks"),
        # Single blocks run proj_mlp and attn in parallel and project their concatenation: the units are the two
        # branches before that projection.
        {"FluxTransformerBlock": (A("attn", 2), A("ff"), A("ff_context")),
         "FluxSingleTransformerBlock": (A("proj_mlp"), A("attn"))},
        # Guidance-distilled: the scale is an input; true CFG (true_cfg_scale > 1 with a negative prompt) is a
        # second call in cache_context("uncond"), which the cache follows as the same step.
        inputs.flux, B.NONE, timestep=_per_mille, text_tokens=512, sample_size=8, latent_layout="packed",
        replays={"FluxTransformerBlock": replays.flux_block, "FluxSingleTransformerBlock": replays.flux_single_block},
        pipelines=("FluxPipeline",), encode=prompts.flux_encode, conditioning=prompts.flux_conditioning,
        extra_inputs=prompts.flux_extra_inputs, concepts_refusal=_JOINT_ATTENTION,
        aliases=("FLUX.1-dev", "FLUX.1-schnell")),
    ModelFamily(
        "sana", "SanaTransformer2DModel", ("transformer_blocks",),
        {"SanaTransformerBlock": (A("attn1"), A("attn2"), A("ff"))},
        inputs.sana, B.UNCONDITIONAL_FIRST,  # SanaPipeline batches [negative, prompt]
        replays={"SanaTransformerBlock": replays.sana_block}, fold=replays.SanaFold(),
        step_invariant=(*_CAPTION_AND_CROSS_ATTENTION, "caption_norm"), timestep_embedder=("time_embed",),
        timestep=_sana_timestep, timestep_dtype=torch.float32, text_tokens=300,
        pipelines=("SanaPipeline",), encode=prompts.pixart_encode, conditioning=prompts.sana_conditioning,
        concepts_refusal=("Sana prepends a complex human instruction to every prompt and keeps only the last "
                          "max_sequence_length tokens, so concept token positions do not carry over."),
        aliases=("Sana",)),
    ModelFamily(
        "qwen-image", "QwenImageTransformer2DModel", ("transformer_blocks",),
        {"QwenImageTransformerBlock": (A("attn", 2), A("img_mlp"), A("txt_mlp"))},
        inputs.qwen_image, B.SEPARATE_CALLS, timestep=_per_mille, text_tokens=256, sample_size=8,
        replays={"QwenImageTransformerBlock": replays.qwen_image_block},
        latent_layout="packed", pipelines=("QwenImagePipeline",), concepts_refusal=_JOINT_ATTENTION,
        encode=prompts.qwen_image_encode, conditioning=prompts.qwen_image_conditioning,
        extra_inputs=prompts.qwen_image_extra_inputs, guide=prompts.qwen_image_guide,
        aliases=("Qwen-Image",)),
    ModelFamily(
        "wan", "WanTransformer3DModel", ("blocks",),
        {"WanTransformerBlock": (A("attn1"), A("attn2"), A("ffn"))},
        inputs.wan, B.SEPARATE_CALLS, timestep=_float, timestep_dtype=torch.float32, text_tokens=512,
        replays={"WanTransformerBlock": replays.wan_block},
        # Its text embedder's output is the cross-attention's input (Wan 2.1 T2V; I2V prepends image tokens anew).
        step_invariant=("condition_embedder.text_embedder", "blocks.*.attn2.to_k", "blocks.*.attn2.to_v"),
        sample_size=8, latent_layout="video", pipelines=("WanPipeline",), check_pipeline=_one_wan_transformer,
        encode=prompts.empty_negative_encode, conditioning=prompts.two_call_conditioning,
        concepts_refusal=_no_concepts("WanPipeline"), aliases=("Wan 2.1", "Wan 2.2")),
    # --- families helper f1 ---
    ModelFamily(
        "flux2", "Flux2Transformer2DModel", ("transformer_blocks", "single_transformer_blocks"),
        # A single block's attention also runs its MLP (one fused input and one fused output projection): one unit.
        {"Flux2TransformerBlock": (A("attn", 2), A("ff"), A("ff_context")),
         "Flux2SingleTransformerBlock": (A("attn"),)},
        # Flux2Pipeline (dev) is guidance-distilled: one call per step, the scale an input. Flux2KleinPipeline's
        # true CFG (guidance_scale > 1 on a base model) is a second call in cache_context("uncond"), followed as
        # the same step.
        inputs.flux2, B.NONE, timestep=_per_mille, text_tokens=512, sample_size=8, latent_layout="packed",
        pipelines=("Flux2Pipeline", "Flux2KleinPipeline"), encode=prompts.flux2_encode,
        conditioning=prompts.flux2_conditioning, extra_inputs=prompts.flux2_extra_inputs,
        concepts_refusal=_JOINT_ATTENTION, aliases=("FLUX.2-dev", "FLUX.2-klein"),
        replays={"Flux2TransformerBlock": replays.flux2_block, "Flux2SingleTransformerBlock": replays.flux2_single_block},
        notes=("Router training reproduces the one guidance-distilled call of FLUX.2-dev (Klein base's CFG is not "
               "trained), and samples with FLUX.1's resolution shift, not Flux2Pipeline's empirical mu.")),
    ModelFamily(
        "chroma", "ChromaTransformer2DModel", ("transformer_blocks", "single_transformer_blocks"),
        {"ChromaTransformerBlock": (A("attn", 2), A("ff"), A("ff_context")),
         "ChromaSingleTransformerBlock": (A("proj_mlp"), A("attn"))},  # FLUX.1's blocks
        # ChromaPipeline runs CFG (guidance_scale > 1, its default 5.0) as a second call per step without
        # cache_context: the cache names the calls "cond" then "uncond" itself, in the pipeline's order.
        inputs.chroma, B.SEPARATE_CALLS, timestep=_per_mille, text_tokens=512, sample_size=8, latent_layout="packed",
        pipelines=("ChromaPipeline",), unnamed_cfg_calls=lambda argument: (argument("guidance_scale") or 0) > 1,
        concepts_refusal=_JOINT_ATTENTION, aliases=("Chroma1-HD", "Chroma1-Base"),
        replays={"ChromaTransformerBlock": replays.chroma_block,
                 "ChromaSingleTransformerBlock": replays.chroma_single_block},
        notes=("Router training does not reproduce its CFG calls yet: the pipeline's attention mask spans the "
               "image tokens too, which the conditioning does not know.")),
    ModelFamily(
        "z-image", "ZImageTransformer2DModel", ("noise_refiner", "context_refiner", "layers"),
        # The refiners run on the image tokens (modulated) and on the text tokens alone (unmodulated: the same
        # output at every step), then the main single-stream layers on both.
        {"ZImageTransformerBlock": (A("attention"), A("feed_forward"))},
        inputs.z_image, B.CONDITIONAL_FIRST,  # ZImagePipeline batches [prompt, negative]
        timestep=_z_image_timestep, timestep_dtype=torch.float32, timestep_argument="t",
        text_tokens=128,  # unpadded: the prompt's own tokens with the chat template (typical prompts)
        sample_size=8, pipelines=("ZImagePipeline",), concepts_refusal=_JOINT_ATTENTION,
        replays={"ZImageTransformerBlock": replays.z_image_block},
        second_calls=(C("cfg_truncation", lambda kwargs: isinstance(kwargs.get("cfg_truncation"), (int, float))
                        and kwargs["cfg_truncation"] < 1, "Leave cfg_truncation=1.0",
                        effect=("drop the unconditional half of its CFG batch at the late steps, which outputs "
                                "cached on the two-half batch cannot follow")),),
        aliases=("Z-Image-Turbo", "Z-Image"),
        notes=("Its forward takes lists (one latent and one text tensor per sample) and returns one: router "
               "training does not support it yet.")),
    ModelFamily(
        "ovis-image", "OvisImageTransformer2DModel", ("transformer_blocks", "single_transformer_blocks"),
        {"OvisImageTransformerBlock": (A("attn", 2), A("ff"), A("ff_context")),
         "OvisImageSingleTransformerBlock": (A("proj_mlp"), A("attn"))},  # FLUX.1's blocks, SwiGLU MLPs
        # OvisImagePipeline runs CFG (guidance_scale > 1) as two calls in cache_context("cond") / ("uncond").
        inputs.ovis_image, B.SEPARATE_CALLS, timestep=_per_mille, text_tokens=256, sample_size=8,
        latent_layout="packed", pipelines=("OvisImagePipeline",), concepts_refusal=_JOINT_ATTENTION,
        encode=prompts.ovis_image_encode, conditioning=prompts.ovis_image_conditioning,
        extra_inputs=prompts.packed_image_ids, aliases=("Ovis-Image",),
        replays={"OvisImageTransformerBlock": replays.flux_block,  # the same forward as FLUX.1's block
                 "OvisImageSingleTransformerBlock": replays.ovis_image_single_block}),
    # --- f3 families (video) ---
    ModelFamily(
        "hunyuan-video-1.5", "HunyuanVideo15Transformer3DModel", ("transformer_blocks",),
        # Dual-stream blocks: joint attention returns (video, text); one feed-forward per stream.
        {"HunyuanVideo15TransformerBlock": (A("attn", 2), A("ff"), A("ff_context"))},
        # HunyuanVideo15Pipeline's guider calls the transformer per condition in cache_context("pred_cond") /
        # ("pred_uncond"); it passes the scheduler's t as a float. Context: 1000 + 256 + 729 tokens (inputs.py).
        inputs.hunyuan_video15, B.SEPARATE_CALLS, timestep=_float, timestep_dtype=torch.float32, text_tokens=1985,
        sample_size=4, latent_layout="video", pipelines=("HunyuanVideo15Pipeline",),
        replays={"HunyuanVideo15TransformerBlock": replays.hunyuan_block},
        check_pipeline=_plain_two_call_guider, concepts_refusal=_JOINT_ATTENTION,
        notes="Router training: no video latents or two-call CFG in training/denoising.py yet.",
        aliases=("HunyuanVideo 1.5",)),
    ModelFamily(
        "ltx-video", "LTXVideoTransformer3DModel", ("transformer_blocks",),
        {"LTXVideoTransformerBlock": (A("attn1"), A("attn2"), A("ff"))},
        # LTXPipeline batches [negative, prompt] in one call (cache_context("cond_uncond")), t as a float; the
        # transformer reads packed tokens [B, F*H*W, C] with the grid size as inputs.
        inputs.ltx_video, B.UNCONDITIONAL_FIRST, timestep=_float, timestep_dtype=torch.float32, text_tokens=128,
        sample_size=4, latent_layout="packed", pipelines=("LTXPipeline",),
        concepts_refusal=_no_concepts("LTXPipeline"), replays={"LTXVideoTransformerBlock": replays.ltx_video_block},
        notes="Router training: no video latents in training/denoising.py yet.", aliases=("LTX-Video",)),
    ModelFamily(
        "cogvideox", "CogVideoXTransformer3DModel", ("transformer_blocks",),
        # The joint attention returns (video, text); the feed-forward runs on their concatenation (one output).
        {"CogVideoXBlock": (A("attn1", 2), A("ff"))},
        # CogVideoXPipeline batches [negative, prompt] in one call, with the scheduler's integer t.
        inputs.cogvideox, B.UNCONDITIONAL_FIRST, text_tokens=226, sample_size=4, latent_layout="video",
        pipelines=("CogVideoXPipeline",), concepts_refusal=_JOINT_ATTENTION,
        replays={"CogVideoXBlock": replays.cogvideox_block},
        notes="Latents are frame-major [B, F, C, H, W]. Router training: no video latents in "
              "training/denoising.py yet.", aliases=("CogVideoX-2b", "CogVideoX-5b", "CogVideoX 1.5")),
    ModelFamily(
        "hunyuan-video", "HunyuanVideoTransformer3DModel", ("transformer_blocks", "single_transformer_blocks"),
        # FLUX-like: dual-stream blocks, then single-stream blocks whose proj_mlp and joint attention run in
        # parallel before one projection. The I2V token-replace blocks are other classes: not units (yet).
        {"HunyuanVideoTransformerBlock": (A("attn", 2), A("ff"), A("ff_context")),
         "HunyuanVideoSingleTransformerBlock": (A("proj_mlp"), A("attn", 2))},
        # Guidance-distilled (the scale is an input); true CFG (true_cfg_scale > 1 with a negative prompt) is a
        # second call in cache_context("uncond"), as FLUX's. t passes as a float.
        inputs.hunyuan_video, B.NONE, timestep=_float, timestep_dtype=torch.float32, text_tokens=256,
        sample_size=4, latent_layout="video", pipelines=("HunyuanVideoPipeline",),
        replays={"HunyuanVideoTransformerBlock": replays.hunyuan_block,
                 "HunyuanVideoSingleTransformerBlock": replays.hunyuan_single_block},
        concepts_refusal=_JOINT_ATTENTION,
        notes="Router training: no video latents in training/denoising.py yet.", aliases=("HunyuanVideo",)),
    # --- families-f2 families ---
    ModelFamily(
        "lumina2", "Lumina2Transformer2DModel", ("context_refiner", "noise_refiner", "layers"),
        # The context refiner sees the prompt only (no timestep): its outputs are the same at every step.
        {"Lumina2TransformerBlock": (A("attn"), A("feed_forward"))},
        inputs.lumina2, B.NONE, timestep=_lumina2_timestep, timestep_dtype=torch.float32, text_tokens=256,
        pipelines=("Lumina2Pipeline",), replays={"Lumina2TransformerBlock": replays.lumina2_block},
        # CFG is a second transformer call per step on the negative prompt, outside any cache_context.
        second_calls=(C("guidance_scale", lambda kwargs: float(kwargs.get("guidance_scale", 4.0)) > 1,
                        "Pass guidance_scale=1.0 (one call per step)"),),
        concepts_refusal=_JOINT_ATTENTION,
        notes=("Cached only without CFG: Lumina2Pipeline's CFG is a second call per step with no cache_context "
               "(pairing the two calls of a step by their equal timestep would make it followable). No router "
               "training: the pipeline negates the model output before the scheduler step, which training's "
               "denoiser does not."),
        aliases=("Lumina-Image 2.0",)),
    ModelFamily(
        "cogview4", "CogView4Transformer2DModel", ("transformer_blocks",),
        # One FeedForward module serves both streams, called on the image tokens and then on the text tokens:
        # a unit hook would see two calls a step (REUSE would hand the image output to the text call), so ff is
        # not a unit (an adapter splitting the two calls would be needed).
        {"CogView4TransformerBlock": (A("attn1", 2),)},
        inputs.cogview4, B.SEPARATE_CALLS, timestep=_float, timestep_dtype=torch.float32, text_tokens=128,
        pipelines=("CogView4Pipeline",), concepts_refusal=_JOINT_ATTENTION, encode=prompts.empty_negative_encode,
        conditioning=prompts.two_call_conditioning, extra_inputs=prompts.cogview4_extra_inputs,
        notes=("Units are the joint attentions only (the shared ff runs twice per block). Router training samples "
               "with FLUX's static shift for the resolution; CogView4Pipeline shifts its sigmas linearly with its "
               "own mu, so trained trajectories are close to, not exactly, the pipeline's."),
        aliases=("CogView4-6B",)),
    ModelFamily(
        "hunyuan-image", "HunyuanImageTransformer2DModel", ("transformer_blocks", "single_transformer_blocks"),
        # FLUX-like: dual-stream blocks, then single-stream blocks whose proj_mlp and (image, text) attention run
        # in parallel before one projection.
        {"HunyuanImageTransformerBlock": (A("attn", 2), A("ff"), A("ff_context")),
         "HunyuanImageSingleTransformerBlock": (A("proj_mlp"), A("attn", 2))},
        # The pipeline's guider runs each condition in cache_context("pred_cond") / ("pred_uncond").
        inputs.hunyuan_image, B.SEPARATE_CALLS, timestep=_float, timestep_dtype=torch.float32, text_tokens=1000,
        sample_size=8, pipelines=("HunyuanImagePipeline",), check_pipeline=_hunyuan_image_guider,
        replays={"HunyuanImageTransformerBlock": replays.hunyuan_block,
                 "HunyuanImageSingleTransformerBlock": replays.hunyuan_single_block},
        concepts_refusal=_JOINT_ATTENTION,
        notes=("No router training: its guider is adaptive projected guidance with a momentum buffer, not the "
               "plain CFG rule router training applies."),
        aliases=("HunyuanImage-2.1",)),
    ModelFamily(
        "allegro", "AllegroTransformer3DModel", ("transformer_blocks",),
        {"AllegroTransformerBlock": (A("attn1"), A("attn2"), A("ff"))},
        inputs.allegro, B.UNCONDITIONAL_FIRST,  # AllegroPipeline batches [negative, prompt]
        text_tokens=512, sample_size=8, latent_layout="video", pipelines=("AllegroPipeline",),
        bench_inputs="captions",  # its encode_prompt cleans captions like PixArt's
        replays={"AllegroTransformerBlock": replays.allegro_block},
        concepts_refusal=("multi-concept is wired for the PixArt pipelines only; AllegroPipeline's video call is "
                          "not. Correct the prompt embeddings yourself (dit_cache.concepts.correct_by_similarities) "
                          "and pass prompt_embeds=."),
        notes="No router training: its latents are video (training samples image latents).",
        aliases=("Allegro",)),
])
