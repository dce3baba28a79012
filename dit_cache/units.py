"""Which sub-modules of a diffusers transformer are cacheable units.

A unit is a branch whose output is added (after an adaLN gate) to the residual stream: self-attention,
cross-attention, joint attention, MLP. Units are numbered in execution order: block list by block list (FLUX runs
its double-stream ``transformer_blocks`` before its ``single_transformer_blocks``), block by block, branch by
branch. Which lists and branches a transformer has is its family record's (:mod:`dit_cache.families`).
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase

import torch

from .families import family_of


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
    return [(attribute, getattr(transformer, attribute)) for attribute in family_of(transformer).block_lists]


def transformer_blocks(transformer: torch.nn.Module) -> list[torch.nn.Module]:
    """Every block of ``transformer`` in execution order (all block lists, one after the other)."""
    return [block for _, blocks in _block_lists(transformer) for block in blocks]


def _branches(family, block: torch.nn.Module, where: str):
    branches = family.branches_of(block)
    if branches is None:
        raise TypeError(f"{where} is a {type(block).__name__}, which the {family.name} family record "
                        f"(dit_cache/families/registry.py) does not list among its blocks: "
                        f"{', '.join(family.branches)}.")
    return branches


def cache_units(transformer: torch.nn.Module) -> list[CacheUnit]:
    """The cacheable units of ``transformer`` in execution order."""
    family = family_of(transformer)
    units = []
    block_number = 0
    for attribute, blocks in _block_lists(transformer):
        for local_index, block in enumerate(blocks):
            for branch in _branches(family, block, f"{attribute}.{local_index}"):
                if getattr(block, branch.name, None) is not None:
                    path = f"{attribute}.{local_index}.{branch.name}"
                    units.append(CacheUnit(len(units), block_number, branch.name, path, branch.outputs))
            block_number += 1
    return units


def replayable_blocks(transformer: torch.nn.Module, units: list[CacheUnit]) -> list[tuple[str, tuple[int, ...], object]]:
    """``(path, its units, its replay)`` of every block of ``transformer`` whose family record has a replay for it
    (:mod:`dit_cache.families.replays`) and that has units."""
    family = family_of(transformer)
    by_block: dict[int, list[int]] = {}
    for unit in units:
        by_block.setdefault(unit.block, []).append(unit.index)
    blocks = []
    number = 0
    for attribute, block_list in _block_lists(transformer):
        for local_index, block in enumerate(block_list):
            replay = family.replay_of(block)
            if replay is not None and number in by_block:
                blocks.append((f"{attribute}.{local_index}", tuple(by_block[number]), replay))
            number += 1
    return blocks


def unit_layout(transformer: torch.nn.Module) -> str:
    """A compact signature of the unit layout, stored with routers to catch a mismatched model.

    ``PixArtTransformer2DModel:28xattn1+attn2+ff``; with several block lists, one such term per list, joined by
    commas (``FluxTransformer2DModel:19xattn+ff+ff_context,38xproj_mlp+attn``).
    """
    family = family_of(transformer)
    terms = []
    for attribute, blocks in _block_lists(transformer):
        if len(blocks) == 0:
            continue
        order = [branch.name for branch in _branches(family, blocks[0], f"{attribute}.0")]
        present = {branch.name for block in blocks for branch in _branches(family, block, attribute)
                   if getattr(block, branch.name, None) is not None}
        terms.append(f"{len(blocks)}x{'+'.join(b for b in order if b in present)}")
    return f"{type(_unwrap(transformer)).__name__}:{','.join(terms) or '0x'}"


def modules_matching(root: torch.nn.Module, patterns: tuple[str, ...]) -> list[torch.nn.Module]:
    """The submodules of ``root`` whose names match one of ``patterns`` (``fnmatch``, e.g.
    ``"transformer_blocks.*.attn2.to_k"``), in module order."""
    return [module for name, module in root.named_modules() if name and any(fnmatchcase(name, p) for p in patterns)]
