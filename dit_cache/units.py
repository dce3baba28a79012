"""Which sub-modules of a diffusers transformer are cacheable units.

A unit is a branch whose output is added (after an adaLN gate) to the residual stream: self-attention,
cross-attention, joint attention, MLP. Units are numbered in execution order: block list by block list (FLUX runs
its double-stream ``transformer_blocks`` before its ``single_transformer_blocks``), block by block, branch by
branch. Supporting a new architecture means adding rows to the tables below, not branches of code.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.models.attention import BasicTransformerBlock, JointTransformerBlock
from diffusers.models.transformers.sana_transformer import SanaTransformerBlock
from diffusers.models.transformers.transformer_flux import FluxSingleTransformerBlock, FluxTransformerBlock
from diffusers.models.transformers.transformer_qwenimage import QwenImageTransformerBlock
from diffusers.models.transformers.transformer_wan import WanTransformerBlock

# transformer class name -> attributes holding its lists of blocks, in execution order
TRANSFORMER_BLOCKS: dict[str, tuple[str, ...]] = {
    "DiTTransformer2DModel": ("transformer_blocks",),
    "PixArtTransformer2DModel": ("transformer_blocks",),
    "SD3Transformer2DModel": ("transformer_blocks",),
    "FluxTransformer2DModel": ("transformer_blocks", "single_transformer_blocks"),
    "SanaTransformer2DModel": ("transformer_blocks",),
    "QwenImageTransformer2DModel": ("transformer_blocks",),
    "WanTransformer3DModel": ("blocks",),
}

# block class -> candidate branch attributes, in execution order; a branch that is None in a block (DiT blocks
# have no cross-attention, SD3's last block no ``ff_context``, SD3.5 blocks outside ``dual_attention_layers`` no
# ``attn2``) is simply not a unit. FLUX single blocks run ``proj_mlp`` and ``attn`` in parallel and project
# their concatenation: the units are the two branches before that projection.
BLOCK_BRANCHES: dict[type, tuple[str, ...]] = {
    BasicTransformerBlock: ("attn1", "attn2", "ff"),
    JointTransformerBlock: ("attn", "attn2", "ff", "ff_context"),
    FluxTransformerBlock: ("attn", "ff", "ff_context"),
    FluxSingleTransformerBlock: ("proj_mlp", "attn"),
    SanaTransformerBlock: ("attn1", "attn2", "ff"),
    QwenImageTransformerBlock: ("attn", "img_mlp", "txt_mlp"),
    WanTransformerBlock: ("attn1", "attn2", "ffn"),
}

# (block class, branch) -> how many tensors the branch returns where that is not one: joint attention returns
# the image stream's output and the text stream's output.
TUPLE_BRANCHES: dict[tuple[type, str], int] = {
    (JointTransformerBlock, "attn"): 2,
    (FluxTransformerBlock, "attn"): 2,
    (QwenImageTransformerBlock, "attn"): 2,
}


@dataclass(frozen=True)
class CacheUnit:
    index: int
    block: int  # in execution order over all block lists (FLUX: single blocks follow the double ones)
    branch: str
    path: str
    outputs: int = 1  # tensors the branch returns (2: joint attention's image and text outputs)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # torch.compile wraps the model; the units live in the original.
    return getattr(model, "_orig_mod", model)


def _block_lists(transformer: torch.nn.Module) -> list[tuple[str, torch.nn.ModuleList]]:
    transformer = _unwrap(transformer)
    name = type(transformer).__name__
    if name not in TRANSFORMER_BLOCKS:
        supported = ", ".join(sorted(TRANSFORMER_BLOCKS))
        raise TypeError(f"dit-cache does not support {name}. Supported transformers: {supported}.")
    return [(attribute, getattr(transformer, attribute)) for attribute in TRANSFORMER_BLOCKS[name]]


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """Every block of ``transformer`` in execution order (all block lists, one after the other)."""
    return [block for _, blocks in _block_lists(transformer) for block in blocks]


def _branches(block: torch.nn.Module, where: str) -> tuple[str, ...]:
    branches = BLOCK_BRANCHES.get(type(block))
    if branches is None:
        raise TypeError(f"{where} is a {type(block).__name__}, which has no entry in dit_cache.units.BLOCK_BRANCHES.")
    return branches


def cache_units(transformer: torch.nn.Module) -> list[CacheUnit]:
    """The cacheable units of ``transformer`` in execution order."""
    units = []
    block_number = 0
    for attribute, blocks in _block_lists(transformer):
        for local_index, block in enumerate(blocks):
            for branch in _branches(block, f"{attribute}.{local_index}"):
                if getattr(block, branch, None) is not None:
                    path = f"{attribute}.{local_index}.{branch}"
                    outputs = TUPLE_BRANCHES.get((type(block), branch), 1)
                    units.append(CacheUnit(len(units), block_number, branch, path, outputs))
            block_number += 1
    return units


def unit_layout(transformer: torch.nn.Module) -> str:
    """A compact signature of the unit layout, stored with routers to catch a mismatched model.

    ``PixArtTransformer2DModel:28xattn1+attn2+ff``; with several block lists, one such term per list, joined by
    commas (``FluxTransformer2DModel:19xattn+ff+ff_context,38xproj_mlp+attn``).
    """
    terms = []
    for attribute, blocks in _block_lists(transformer):
        if len(blocks) == 0:
            continue
        order = _branches(blocks[0], f"{attribute}.0")
        present = {branch for block in blocks for branch in _branches(block, attribute)
                   if getattr(block, branch, None) is not None}
        terms.append(f"{len(blocks)}x{'+'.join(b for b in order if b in present)}")
    return f"{type(_unwrap(transformer)).__name__}:{','.join(terms) or '0x'}"
