"""FLOPs of each cacheable unit, counted with ``torch.utils.flop_counter`` on one real forward pass, and the
inputs of such a pass (one denoising step with random latents and text)."""

from __future__ import annotations

import torch
from diffusers import DiTTransformer2DModel
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .units import _unwrap, cache_units


def _cpu_flash_attention_flops(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# The CPU kernel behind scaled_dot_product_attention has no formula upstream; without one attention counts as free.
_EXTRA_FORMULAS = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA_FORMULAS[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_flash_attention_flops


@torch.no_grad()
def unit_flops(transformer: torch.nn.Module, **forward_kwargs) -> tuple[torch.Tensor, int]:
    """Per-unit FLOPs ``[num_units]`` and the FLOPs of the whole forward, for the given inputs.

    Call with the exact keyword arguments of one denoising step (batch included: CFG doubles it).
    """
    root = _unwrap(transformer)
    with FlopCounterMode(display=False, depth=None, custom_mapping=_EXTRA_FORMULAS) as counter:
        transformer(**forward_kwargs)
    by_module = counter.get_flop_counts()
    prefix = type(root).__name__
    per_unit = [sum(by_module.get(f"{prefix}.{unit.path}", {}).values()) for unit in cache_units(transformer)]
    return torch.tensor(per_unit, dtype=torch.float64), int(counter.get_total_flops())


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


def step_flops(transformer: torch.nn.Module, text_tokens: int = 120) -> tuple[torch.Tensor, int]:
    """:func:`unit_flops` of one classifier-free-guidance step (batch 2) with ``text_tokens`` caption tokens.

    FLOPs do not depend on the values, only on the shapes; 120 tokens is PixArt's usual caption padding, and the
    shares between units hardly depend on it.
    """
    return unit_flops(transformer, **step_inputs(transformer, batch=2, text_tokens=text_tokens))
