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
from diffusers import (AllegroTransformer3DModel, CogView4Transformer2DModel, FluxTransformer2DModel,
                       HunyuanImageTransformer2DModel, Lumina2Transformer2DModel, SanaTransformer2DModel,
                       SD3Transformer2DModel)
from jsonargparse import CLI

from dit_cache import CacheSchedule, cache_units
from dit_cache.bench.speed import compare_schedules, format_results
from dit_cache.families import family_of
from dit_cache.testing import step_inputs
from dit_cache.units import transformer_blocks

# name -> (builder of 1-2 real-width blocks, real image tokens, real text tokens)
FAMILIES = {
    "flux1-dev": (lambda: FluxTransformer2DModel(num_layers=1, num_single_layers=1, guidance_embeds=True), 4096, 512),
    "sd3.5-large": (lambda: SD3Transformer2DModel(num_layers=2, num_attention_heads=38, attention_head_dim=64,
                                                  caption_projection_dim=2432, pos_embed_max_size=192), 4096, 333),
    "sana-1600m": (lambda: SanaTransformer2DModel(num_layers=2), 1024, 300),
    # families-f2: Lumina-Image 2.0 (one refiner of each kind + 2 joint blocks), CogView4-6B, HunyuanImage-2.1.
    "lumina2": (lambda: Lumina2Transformer2DModel(num_layers=2, num_refiner_layers=1, cap_feat_dim=2304), 4096, 256),
    "cogview4": (lambda: CogView4Transformer2DModel(num_layers=2, num_attention_heads=32, attention_head_dim=128), 4096,
                 128),
    "hunyuan-image-2.1": (lambda: HunyuanImageTransformer2DModel(num_layers=1, num_single_layers=1,
                                                                 text_embed_2_dim=1472), 4096, 1000),
    # Allegro: 88 frames at 720 x 1280 are 22 x 45 x 80 = 79200 latent tokens (one frame per sample here).
    "allegro": (lambda: AllegroTransformer3DModel(num_layers=2), 79200, 512),
}


def _sample_size(name: str, transformer, image_tokens: int) -> int:
    side = math.isqrt(image_tokens)
    # FLUX inputs are the token grid itself; SD3 patches 2x2 latents; Sana's patch is 1.
    patch = transformer.config.patch_size
    return side if name.startswith("flux") else side * (patch[-1] if isinstance(patch, (tuple, list)) else patch)


def _head_dim(config) -> int:
    return config.get("attention_head_dim", None) or config.hidden_size // config.num_attention_heads  # Lumina2


def main(families: tuple[str, ...] = tuple(FAMILIES), image_tokens: int = 144, full_text: bool = False,
         num_steps: int = 6, rounds: int = 3, device: str = "cpu", whole_model: bool = False):
    """Stock, a full schedule (hook overhead) and uniform schedules (interval 2 and 3), per family.

    Args:
        families: which of the FAMILIES keys (flux1-dev, sd3.5-large, sana-1600m, lumina2, cogview4, ...).
        image_tokens: image tokens per sample (a square number); text tokens scale with it unless ``full_text``.
        full_text: use the real models' text token counts.
        num_steps: denoising steps per generation.
        rounds: timed generations per schedule (the median is reported), after one warm-up round.
        whole_model: time the whole forward (embeddings and final layer included) instead of the blocks.
    """
    for name in families:
        build, real_image_tokens, real_text_tokens = FAMILIES[name]
        torch.manual_seed(0)
        transformer = build().eval().to(device)
        text_tokens = real_text_tokens if full_text else max(8, round(real_text_tokens * image_tokens / real_image_tokens))
        batch = family_of(transformer).cfg.batch
        inputs = step_inputs(transformer, batch=batch, text_tokens=text_tokens,
                             sample_size=_sample_size(name, transformer, image_tokens))
        inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
        num_units = len(cache_units(transformer))
        schedules = {
            "full (hooks, no reuse)": CacheSchedule.full(num_steps, num_units),
            "uniform interval 2": CacheSchedule.uniform(num_steps, num_units, 2),
            "uniform interval 3": CacheSchedule.uniform(num_steps, num_units, 3),
        }
        results = compare_schedules(transformer, schedules, inputs, rounds=rounds, per_block=not whole_model)
        config = transformer.config
        print(f"\n## {name}: {len(transformer_blocks(transformer))} "
              f"blocks, {config.num_attention_heads} heads x {_head_dim(config)}, {image_tokens} image + "
              f"{text_tokens} text tokens (real: {real_image_tokens} + {real_text_tokens}), batch {batch}, "
              f"{num_units} units, {num_steps} steps, {device}, torch threads {torch.get_num_threads()}, "
              f"timed: {'whole forward' if whole_model else 'blocks'}")
        print(format_results(results))
        print(f"hook overhead with the full schedule: {results[1].seconds / results[0].seconds - 1:+.2%}")
        del transformer


if __name__ == "__main__":
    CLI(main, as_positional=False)
