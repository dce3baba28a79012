"""Which sub-modules of a diffusers transformer are cacheable units.

A unit is a branch whose output is added (after an adaLN gate) to the residual stream: self-attention,
cross-attention, MLP. Units are numbered block-major: ``unit = block * branches_per_block + branch``.
Supporting a new architecture means adding rows to the two tables below, not branches of code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention import BasicTransformerBlock

# transformer class name -> attribute holding its list of blocks
TRANSFORMER_BLOCKS: dict[str, str] = {
    "DiTTransformer2DModel": "transformer_blocks",
    "PixArtTransformer2DModel": "transformer_blocks",
}

# block class -> candidate branch attributes, in execution order; a branch that is None in a block
# (DiT blocks have no cross-attention) is simply not a unit.
BLOCK_BRANCHES: dict[type, tuple[str, ...]] = {
    BasicTransformerBlock: ("attn1", "attn2", "ff"),
}


@dataclass(frozen=True)
class CacheUnit:
    index: int
    block: int
    branch: str
    path: str


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # torch.compile wraps the model; the units live in the original.
    return getattr(model, "_orig_mod", model)


def transformer_blocks(transformer: torch.nn.Module) -> torch.nn.ModuleList:
    transformer = _unwrap(transformer)
    name = type(transformer).__name__
    if name not in TRANSFORMER_BLOCKS:
        supported = ", ".join(sorted(TRANSFORMER_BLOCKS))
        raise TypeError(f"dit-cache does not support {name}. Supported transformers: {supported}.")
    return getattr(transformer, TRANSFORMER_BLOCKS[name])


def cache_units(transformer: torch.nn.Module) -> list[CacheUnit]:
    """The cacheable units of ``transformer`` in block-major order."""
    blocks_attribute = TRANSFORMER_BLOCKS.get(type(_unwrap(transformer)).__name__)
    units = []
    for block_index, block in enumerate(transformer_blocks(transformer)):
        branches = BLOCK_BRANCHES.get(type(block))
        if branches is None:
            raise TypeError(f"Block {block_index} is a {type(block).__name__}, which has no entry in BLOCK_BRANCHES.")
        for branch in branches:
            if getattr(block, branch, None) is not None:
                path = f"{blocks_attribute}.{block_index}.{branch}"
                units.append(CacheUnit(len(units), block_index, branch, path))
    return units


def unit_layout(transformer: torch.nn.Module) -> str:
    """A compact signature of the unit layout, stored with routers to catch a mismatched model."""
    units = cache_units(transformer)
    branches = sorted({unit.branch for unit in units}, key=("attn1", "attn2", "ff").index)
    blocks = units[-1].block + 1 if units else 0
    return f"{type(_unwrap(transformer)).__name__}:{blocks}x{'+'.join(branches)}"
