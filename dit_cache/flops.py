"""FLOPs of each cacheable unit, counted with ``torch.utils.flop_counter`` on one real forward pass, and the
inputs of such a pass (one denoising step with random latents and text)."""

from __future__ import annotations

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .families import family_of
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


def step_inputs(transformer, batch: int = 2, text_tokens: int = 6, timestep: int = 500, seed: int = 0,
                sample_size: int | None = None) -> dict:
    """Keyword arguments of one denoising step of ``transformer`` with random latents (and text).

    ``sample_size`` is the latent side (FLUX: the side of the packed token grid); default: the model's config.
    """
    family = family_of(transformer)
    config = _unwrap(transformer).config
    size = sample_size or config.get("sample_size", None) or family.sample_size
    generator = torch.Generator().manual_seed(seed)
    inputs = family.step_inputs(config, batch, text_tokens, generator, size)
    inputs[family.timestep_argument] = family.timesteps(timestep, batch, config)
    return inputs


def step_flops(transformer: torch.nn.Module, text_tokens: int | None = None,
               sample_size: int | None = None) -> tuple[torch.Tensor, int]:
    """:func:`unit_flops` of one transformer call as the family's pipeline makes it (batch 2 with a CFG batch, 1
    for guidance-distilled FLUX or where the pipeline calls once per CFG half) with ``text_tokens`` caption
    tokens (default: the family's usual padding, e.g. 120 for PixArt, 512 for FLUX).

    FLOPs do not depend on the values, only on the shapes, and the shares between units hardly depend on the
    caption length.
    """
    family = family_of(transformer)
    inputs = step_inputs(transformer, batch=family.cfg.batch, text_tokens=text_tokens or family.text_tokens,
                         sample_size=sample_size)
    return unit_flops(transformer, **inputs)


def percent(share: float, sign: bool = True) -> str:
    """A share of FLOPs as a percent, with a tenth where it has one: 0.5 -> '50%', 0.525 -> '52.5%'; without the
    sign (``sign=False``: '52.5') for file names."""
    return f"{round(share * 100, 1):g}" + ("%" if sign else "")
