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
"""

import math

import torch
from diffusers import (ChromaTransformer2DModel, Flux2Transformer2DModel, FluxTransformer2DModel,
                       OvisImageTransformer2DModel, SanaTransformer2DModel, SD3Transformer2DModel,
                       ZImageTransformer2DModel)
from jsonargparse import CLI

from dit_cache import CacheSchedule, cache_units
from dit_cache.bench.speed import compare_schedules, format_results
from dit_cache.families import family_of
from dit_cache.flops import unit_flops
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
}


def _sample_size(name: str, transformer, image_tokens: int) -> int:
    side = math.isqrt(image_tokens)
    # FLUX-style (packed) inputs are the token grid itself; SD3 patches 2x2 latents; Sana's patch is 1.
    if family_of(transformer).latent_layout == "packed":
        return side
    config = transformer.config
    return side * (config.patch_size if "patch_size" in config else config.all_patch_size[0])  # Z-Image: a list


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
                         sample_size=_sample_size(name, transformer, image_tokens))
    per_unit, total = unit_flops(transformer, blocks_only=True, **{k: _to(v, "meta") for k, v in inputs.items()})
    num_units = len(cache_units(transformer))
    speedups = [CacheSchedule.uniform(num_steps, num_units, k).theoretical_speedup(per_unit, total) for k in (2, 3)]
    return (f"{name}: {image_tokens} image + {text_tokens} text tokens, batch {batch}: units {float(per_unit.sum()) / total:.1%} "
            f"of the blocks' FLOPs; FLOP-theoretical speedup interval 2 {speedups[0]:.3f}x, interval 3 {speedups[1]:.3f}x")


def main(families: tuple[str, ...] = tuple(FAMILIES), image_tokens: int = 144, full_text: bool = False,
         num_steps: int = 6, rounds: int = 3, device: str = "cpu", whole_model: bool = False,
         flops_only: bool = False):
    """Stock, a full schedule (hook overhead) and uniform schedules (interval 2 and 3), per family.

    Args:
        families: which of flux1-dev, sd3.5-large, sana-1600m, flux2-dev, chroma1-hd, z-image-turbo,
                ovis-image.
        image_tokens: image tokens per sample (a square number); text tokens scale with it unless ``full_text``.
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
        inputs = step_inputs(transformer, batch=batch, text_tokens=text_tokens,
                             sample_size=_sample_size(name, transformer, image_tokens))
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
        head_dim = config.get("attention_head_dim") or config.dim // heads
        print(f"\n## {name}: {len(transformer_blocks(transformer))} "
              f"blocks, {heads} heads x {head_dim}, {image_tokens} image + "
              f"{text_tokens} text tokens (real: {real_image_tokens} + {real_text_tokens}), batch {batch}, "
              f"{num_units} units, {num_steps} steps, {device}, torch threads {torch.get_num_threads()}, "
              f"timed: {'whole forward' if whole_model else 'blocks'}")
        print(format_results(results))
        print(f"hook overhead with the full schedule: {results[1].seconds / results[0].seconds - 1:+.2%}")
        del transformer


if __name__ == "__main__":
    CLI(main, as_positional=False)
