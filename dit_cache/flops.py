"""FLOPs of each cacheable unit, counted with ``torch.utils.flop_counter`` on one real forward pass."""

from __future__ import annotations

import torch
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
