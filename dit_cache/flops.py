"""FLOPs of each cacheable unit, counted with ``torch.utils.flop_counter`` on one real forward pass, and the
inputs of such a pass (one denoising step with random latents and text)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .units import _block_lists, _unwrap, cache_units


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# The CPU kernel behind scaled_dot_product_attention has no formula upstream; without one attention counts as free.
_EXTRA_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_attention_flops


@torch.no_grad()
def unit_flops(transformer: torch.nn.Module, blocks_only: bool = False, **forward_kwargs) -> tuple[torch.Tensor, int]:
    """Per-unit FLOPs ``[num_units]`` and the FLOPs of the whole forward, for the given inputs.

    Call with the exact keyword arguments of one denoising step (batch included: CFG doubles it). With
    ``blocks_only`` the second figure counts the transformer blocks only, without the embeddings and the final
    layer: what a block-level benchmark of a shallow copy measures (in the real model they amortize over its depth).
    """
    root = _unwrap(transformer)
    with FlopCounterMode(display=False, depth=None, custom_mapping=_EXTRA_FORMULAS) as counter:
        transformer(**forward_kwargs)
    by_module = counter.get_flop_counts()
    prefix = type(root).__name__

    def flops(path: str) -> int:
        return sum(by_module.get(f"{prefix}.{path}", {}).values())

    per_unit = [flops(unit.path) for unit in cache_units(transformer)]
    total = (sum(flops(f"{attribute}.{index}") for attribute, blocks in _block_lists(transformer)
                 for index in range(len(blocks))) if blocks_only else int(counter.get_total_flops()))
    return torch.tensor(per_unit, dtype=torch.float64), total


def _dit_inputs(config, batch, text_tokens, generator, size):
    return {"hidden_states": torch.randn(batch, config.in_channels, size, size, generator=generator),
            "class_labels": torch.arange(batch) % config.num_embeds_ada_norm}


def _padded_mask(batch: int, text_tokens: int) -> torch.Tensor:
    mask = torch.ones(batch, text_tokens, dtype=torch.long)
    mask[:, text_tokens // 2 + 1 :] = 0  # padded prompts, as the pipelines produce
    return mask


def _pixart_inputs(config, batch, text_tokens, generator, size):
    return {"hidden_states": torch.randn(batch, config.in_channels, size, size, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, config.caption_channels, generator=generator),
            "encoder_attention_mask": _padded_mask(batch, text_tokens),
            "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}}


def _sd3_inputs(config, batch, text_tokens, generator, size):
    return {"hidden_states": torch.randn(batch, config.in_channels, size, size, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, config.joint_attention_dim, generator=generator),
            "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=generator)}


def _flux_inputs(config, batch, text_tokens, generator, size):
    # FLUX takes packed latents: ``size`` is the side of the token grid (64 for 1024 px), with rotary position ids.
    rows, columns = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    image_ids = torch.stack([torch.zeros_like(rows), rows, columns], dim=-1).reshape(-1, 3).float()
    inputs = {"hidden_states": torch.randn(batch, size * size, config.in_channels, generator=generator),
              "encoder_hidden_states": torch.randn(batch, text_tokens, config.joint_attention_dim, generator=generator),
              "pooled_projections": torch.randn(batch, config.pooled_projection_dim, generator=generator),
              "img_ids": image_ids, "txt_ids": torch.zeros(text_tokens, 3)}
    if config.guidance_embeds:  # FLUX.1-dev: guidance distillation, the scale is an input
        inputs["guidance"] = torch.full((batch,), 3.5)
    return inputs


def _sana_inputs(config, batch, text_tokens, generator, size):
    return {"hidden_states": torch.randn(batch, config.in_channels, size, size, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, config.caption_channels, generator=generator),
            "encoder_attention_mask": _padded_mask(batch, text_tokens)}


def _qwen_image_inputs(config, batch, text_tokens, generator, size):
    # Packed 2x2 latents like FLUX; ``size`` is the side of the token grid. Rotary positions come from img_shapes.
    return {"hidden_states": torch.randn(batch, size * size, config.in_channels, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, config.joint_attention_dim, generator=generator),
            "encoder_hidden_states_mask": torch.ones(batch, text_tokens, dtype=torch.long),
            "img_shapes": [[(1, size, size)]] * batch}


def _wan_inputs(config, batch, text_tokens, generator, size):
    # One frame (an image); a video adds frames along dim 2.
    return {"hidden_states": torch.randn(batch, config.in_channels, 1, size, size, generator=generator),
            "encoder_hidden_states": torch.randn(batch, text_tokens, config.text_dim, generator=generator)}


@dataclass(frozen=True)
class StepFamily:
    """How one denoising step of a transformer family is called.

    ``timestep`` maps a timestep in [0, 1000] to what the family's pipeline passes; ``cfg_batch`` is the model
    batch per image of one step (2 with classifier-free guidance in the batch, 1 for guidance-distilled FLUX.1-dev);
    ``text_tokens`` the real model's usual caption length; ``sample_size`` the default latent side when the config
    has none.
    """

    inputs: Callable
    timestep: Callable = lambda t, batch: torch.full((batch,), t, dtype=torch.long)
    cfg_batch: int = 2
    text_tokens: int = 120
    sample_size: int | None = None


def _float_timestep(t, batch):
    return torch.full((batch,), float(t))


STEP_FAMILIES: dict[str, StepFamily] = {
    "DiTTransformer2DModel": StepFamily(_dit_inputs),
    "PixArtTransformer2DModel": StepFamily(_pixart_inputs),
    "SD3Transformer2DModel": StepFamily(_sd3_inputs, _float_timestep, text_tokens=333),  # 77 CLIP + 256 T5
    "FluxTransformer2DModel": StepFamily(_flux_inputs, lambda t, batch: torch.full((batch,), t / 1000),
                                         cfg_batch=1, text_tokens=512, sample_size=8),
    "SanaTransformer2DModel": StepFamily(_sana_inputs, _float_timestep, text_tokens=300),
    # Qwen-Image and Wan pipelines run classifier-free guidance as two calls per step: one call is batch 1.
    "QwenImageTransformer2DModel": StepFamily(_qwen_image_inputs, lambda t, batch: torch.full((batch,), t / 1000),
                                              cfg_batch=1, text_tokens=256, sample_size=8),
    "WanTransformer3DModel": StepFamily(_wan_inputs, _float_timestep, cfg_batch=1, text_tokens=512, sample_size=8),
}


def step_family(transformer) -> StepFamily:
    name = type(_unwrap(transformer)).__name__
    if name not in STEP_FAMILIES:
        raise TypeError(f"dit-cache has no step inputs for {name}. Supported transformers: {', '.join(STEP_FAMILIES)}.")
    return STEP_FAMILIES[name]


def step_inputs(transformer, batch: int = 2, text_tokens: int = 6, timestep: int = 500, seed: int = 0,
                sample_size: int | None = None) -> dict:
    """Keyword arguments of one denoising step of ``transformer`` with random latents (and text).

    ``sample_size`` is the latent side (FLUX: the side of the packed token grid); default: the model's config.
    """
    family = step_family(transformer)
    config = _unwrap(transformer).config
    size = sample_size or config.get("sample_size", None) or family.sample_size
    generator = torch.Generator().manual_seed(seed)
    inputs = family.inputs(config, batch, text_tokens, generator, size)
    inputs["timestep"] = family.timestep(timestep, batch)
    return inputs


def step_flops(transformer: torch.nn.Module, text_tokens: int | None = None,
               sample_size: int | None = None) -> tuple[torch.Tensor, int]:
    """:func:`unit_flops` of one step as the family's pipeline runs it (batch 2 with classifier-free guidance, 1
    for guidance-distilled FLUX) with ``text_tokens`` caption tokens (default: the family's usual padding, e.g.
    120 for PixArt, 512 for FLUX).

    FLOPs do not depend on the values, only on the shapes, and the shares between units hardly depend on the
    caption length.
    """
    family = step_family(transformer)
    inputs = step_inputs(transformer, batch=family.cfg_batch, text_tokens=text_tokens or family.text_tokens,
                         sample_size=sample_size)
    return unit_flops(transformer, **inputs)
