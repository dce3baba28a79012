"""Speed of caching at the block shapes of FLUX.1-dev, SD3.5-large and Sana 1600M, against the stock transformer
measured in the same run (as experiments/benchmark_speed.py does for PixArt-alpha).

    OMP_NUM_THREADS=1 python experiments/benchmark_families.py                  # CPU, ~6 min on one thread
    python experiments/benchmark_families.py --device cuda --image_tokens 4096 --full_text  # the real token counts

Widths, heads and branch structure are the real models'; depth is 1-2 blocks, and the figures are per block: the
clock runs inside the transformer blocks only and the FLOP-theoretical speedup counts the blocks' FLOPs only, since
the embeddings and the final layer, run once per step, weigh 20-60x more in a 1-2 block copy than in the real
model (``--whole_model`` times the whole forward instead). On a CPU the token counts are scaled
down from the real ones (FLUX.1-dev 4096 image + 512 text tokens at 1024 px, SD3.5-large 4096 + 333, Sana 1600M
1024 + 300) keeping each model's image:text ratio, so that the whole run takes minutes. Random weights: speed does
not depend on what the weights are.

The video families (Wan 2.1 14B, HunyuanVideo 1.5 and 1.0, LTX-Video 2B, CogVideoX-5b) run two latent frames; their
real token counts (7k-120k video tokens) are far out of a CPU's reach:

    OMP_NUM_THREADS=1 python experiments/benchmark_families.py --families '[ltx-video-2b,cogvideox-5b]' --image_tokens 128
"""

import math

import torch
from diffusers import (AllegroTransformer3DModel, ChromaTransformer2DModel, CogVideoXTransformer3DModel,
                       CogView4Transformer2DModel, Flux2Transformer2DModel, FluxTransformer2DModel,
                       HunyuanImageTransformer2DModel, HunyuanVideo15Transformer3DModel, HunyuanVideoTransformer3DModel,
                       Lumina2Transformer2DModel, LTXVideoTransformer3DModel, OvisImageTransformer2DModel,
                       SanaTransformer2DModel, SD3Transformer2DModel, WanTransformer3DModel, ZImageTransformer2DModel)
from jsonargparse import CLI

from dit_cache import CacheSchedule, cache_units
from dit_cache.bench.speed import compare_schedules, format_results
from dit_cache.families import family_of
from dit_cache.flops import unit_flops
from dit_cache.families.inputs import VIDEO_FRAMES
from dit_cache.testing import step_inputs
from dit_cache.units import transformer_blocks

# name -> (builder of 1-2 real-width blocks, real image tokens, real text tokens)
FAMILIES = {
    "flux1-dev": (lambda: FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True), 4096, 512),
    "sd3.5-large": (lambda: SD3Transformer2DModel(num_layers=2, num_attention_heads=38, attention_head_dim=64,
                                                  caption_projection_dim=2432, pos_embed_max_size=192), 4096, 333),
    "sana-1600m": (lambda: SanaTransformer2DModel(num_layers=2), 1024, 300),
    # --- families helper f1 --- (diffusers' defaults are the released widths)
    "flux2-dev": (lambda: Flux2Transformer2DModel(num_layers=1, num_single_layers=1), 4096, 512),
    "chroma1-hd": (lambda: ChromaTransformer2DModel(num_layers=1, num_single_layers=1), 4096, 512),
    # Z-Image-Turbo: 30 main layers after 2 + 2 refiners; the main layers are timed (text: a typical prompt, unpadded).
    "z-image-turbo": (lambda: ZImageTransformer2DModel(n_layers=2, n_refiner_layers=0), 4096, 128),
    "ovis-image": (lambda: OvisImageTransformer2DModel(num_layers=1, num_single_layers=1), 4096, 256),
    # Video (f3): real tokens of the usual generation (480p; latent frames x tokens per frame), real context.
    # Wan 2.1 14B, 81 frames at 832x480: 21 x 52x30 tokens, 512 text tokens.
    "wan2.1-14b": (lambda: WanTransformer3DModel(num_layers=1, num_attention_heads=40, attention_head_dim=128,
                                                 ffn_dim=13824), 21 * 1560, 512),
    # HunyuanVideo 1.5 480p, 121 frames: 31 x 53x30 tokens (16x VAE, patch 1); 1000 + 256 + 729 context tokens.
    "hunyuan-video-1.5": (lambda: HunyuanVideo15Transformer3DModel(num_layers=1, task_type="t2v"), 31 * 1590, 1985),
    # LTX-Video 2B (0.9.x), 161 frames at 704x480: 21 x 22x15 tokens (32x VAE), 128 text tokens.
    "ltx-video-2b": (lambda: LTXVideoTransformer3DModel(num_layers=2), 21 * 330, 128),
    # CogVideoX-5b, 49 frames at 720x480: 13 x 45x30 tokens (8x VAE, patch 2), 226 text tokens.
    "cogvideox-5b": (lambda: CogVideoXTransformer3DModel(num_layers=2, num_attention_heads=48,
                                                         use_rotary_positional_embeddings=True), 13 * 1350, 226),
    # HunyuanVideo 13B (1 double + 1 single block), 129 frames at 1280x720: 33 x 80x45 tokens, 256 text tokens.
    "hunyuan-video": (lambda: HunyuanVideoTransformer3DModel(num_layers=1, num_single_layers=1), 33 * 3600, 256),
    # families-f2: Lumina-Image 2.0 (one refiner of each kind + 2 joint blocks), CogView4-6B, HunyuanImage-2.1.
    "lumina2": (lambda: Lumina2Transformer2DModel(num_layers=2, num_refiner_layers=1, cap_feat_dim=2304), 4096, 256),
    "cogview4": (lambda: CogView4Transformer2DModel(num_layers=2, num_attention_heads=32, attention_head_dim=128), 4096,
                 128),
    "hunyuan-image-2.1": (lambda: HunyuanImageTransformer2DModel(num_layers=1, num_single_layers=1,
                                                                 text_embed_2_dim=1472), 4096, 1000),
    # Allegro: 88 frames at 720 x 1280 are 22 x 45 x 80 = 79200 latent tokens (one frame per sample here).
    "allegro": (lambda: AllegroTransformer3DModel(num_layers=2), 79200, 512),
}
VIDEO = ("wan2.1-14b", "hunyuan-video-1.5", "ltx-video-2b", "cogvideox-5b", "hunyuan-video")


def _grid(name: str, transformer, image_tokens: int) -> tuple[int, int]:
    """The latent side for about ``image_tokens`` tokens, and the tokens it makes. Video families: VIDEO_FRAMES
    latent frames of side x side tokens each (``--image_tokens 128``: 2 x 8 x 8)."""
    frames = VIDEO_FRAMES if name in VIDEO else 1
    side = math.isqrt(image_tokens // frames)
    # Packed inputs (FLUX-style, LTX) are the token grid itself; SD3 patches 2x2 latents; Sana's patch is 1;
    # Wan's (1, 2, 2); Z-Image keeps a list of patch sizes.
    if family_of(transformer).latent_layout == "packed":
        return side, frames * side * side
    config = transformer.config
    patch = config.patch_size if "patch_size" in config else config.all_patch_size[0]
    patch = patch[-1] if isinstance(patch, (tuple, list)) else patch
    return side * patch, frames * side * side


def _to(value, device):
    if torch.is_tensor(value):
        return value.to(device)
    if isinstance(value, list) and all(torch.is_tensor(v) for v in value):  # Z-Image: a tensor per sample
        return [v.to(device) for v in value]
    return value


def flop_theoretical(name: str, num_steps: int) -> str:
    """The FLOP-theoretical per-block speedups of uniform interval 2 and 3 at the real token counts, counted on
    meta tensors (shapes only: nothing is allocated or computed, so even FLUX.2's 6144-wide blocks take a second)."""
    build, image_tokens, text_tokens = FAMILIES[name]
    with torch.device("meta"):
        transformer = build().eval()
    batch = family_of(transformer).cfg.batch
    inputs = step_inputs(transformer, batch=batch, text_tokens=text_tokens,
                         sample_size=_grid(name, transformer, image_tokens)[0])
    per_unit, total = unit_flops(transformer, blocks_only=True, **{k: _to(v, "meta") for k, v in inputs.items()})
    num_units = len(cache_units(transformer))
    speedups = [CacheSchedule.uniform(num_steps, num_units, k).theoretical_speedup(per_unit, total) for k in (2, 3)]
    return (f"{name}: {image_tokens} image + {text_tokens} text tokens, batch {batch}: units "
            f"{float(per_unit.sum()) / total:.1%} of the blocks' FLOPs; FLOP-theoretical speedup interval 2 "
            f"{speedups[0]:.3f}x, interval 3 {speedups[1]:.3f}x")


def main(families: tuple[str, ...] = tuple(FAMILIES), image_tokens: int = 144, full_text: bool = False,
         num_steps: int = 6, rounds: int = 3, device: str = "cpu", whole_model: bool = False,
         flops_only: bool = False):
    """Stock, a full schedule (hook overhead) and uniform schedules (interval 2 and 3), per family.

    Args:
        families: which of the FAMILIES keys (flux1-dev, sd3.5-large, sana-1600m, flux2-dev, wan2.1-14b, lumina2, ...).
        image_tokens: image tokens per sample (a square number; video: 2 latent frames of a square, 128 = 2 x 8 x 8);
            text tokens scale with it unless ``full_text``.
        full_text: use the real models' text token counts.
        num_steps: denoising steps per generation.
        rounds: timed generations per schedule (the median is reported), after one warm-up round.
        whole_model: time the whole forward (embeddings and final layer included) instead of the blocks.
        flops_only: print only the FLOP-theoretical speedups at the real token counts (seconds, no timing).
    """
    if flops_only:
        for name in families:
            print(flop_theoretical(name, num_steps))
        return
    for name in families:
        build, real_image_tokens, real_text_tokens = FAMILIES[name]
        torch.manual_seed(0)
        transformer = build().eval().to(device)
        text_tokens = real_text_tokens if full_text else max(8, round(real_text_tokens * image_tokens / real_image_tokens))
        batch = family_of(transformer).cfg.batch
        sample_size, tokens = _grid(name, transformer, image_tokens)
        inputs = step_inputs(transformer, batch=batch, text_tokens=text_tokens, sample_size=sample_size)
        inputs = {k: _to(v, device) for k, v in inputs.items()}
        num_units = len(cache_units(transformer))
        schedules = {
            "full (hooks, no reuse)": CacheSchedule.full(num_steps, num_units),
            "uniform interval 2": CacheSchedule.uniform(num_steps, num_units, 2),
            "uniform interval 3": CacheSchedule.uniform(num_steps, num_units, 3),
        }
        results = compare_schedules(transformer, schedules, inputs, rounds=rounds, per_block=not whole_model)
        config = transformer.config
        heads = config.get("num_attention_heads", config.get("n_heads"))
        head_dim = config.get("attention_head_dim") or (config.get("dim") or config.get("hidden_size")) // heads
        print(f"\n## {name}: {len(transformer_blocks(transformer))} "
              f"blocks, {heads} heads x {head_dim}, {tokens} image + "
              f"{text_tokens} text tokens (real: {real_image_tokens} + {real_text_tokens}), batch {batch}, "
              f"{num_units} units, {num_steps} steps, {device}, torch threads {torch.get_num_threads()}, "
              f"timed: {'whole forward' if whole_model else 'blocks'}")
        print(format_results(results))
        print(f"hook overhead with the full schedule: {results[1].seconds / results[0].seconds - 1:+.2%}")
        del transformer


if __name__ == "__main__":
    CLI(main, as_positional=False)
