"""Folding a step where every block is replayed into one pass over the block stack.

On such a step each block only adds its units' gated, reused or forecast outputs to the residual stream
(:mod:`dit_cache.families.replays`). Where a family's gates are affine in one embedding that every block is handed
(PixArt: each block's learned table plus the timestep embedding), the stack's whole addition is a few sums of the
stored outputs, formed once per computed step, combined with this step's embedding: ``x + C + e_attn * A +
e_mlp * F``, four passes over the hidden states instead of five per block. The sums add in another order than the
blocks do, so a folded step equals the replayed blocks to float rounding, not bitwise (tests/test_step_fold.py).
"""

from __future__ import annotations

import torch

from .families import family_of
from .forecast import extrapolate, weighted_sum
from .units import _unwrap, transformer_blocks


class StepFold:
    """A transformer's blocks and their units, and its family's fold (``family.fold``): the output of the block
    stack on a folded step, from the generation's stored outputs."""

    def __init__(self, family_fold, blocks: list, block_units: tuple[tuple[int, ...], ...]):
        self.family_fold = family_fold
        self.blocks = blocks
        self.block_units = block_units

    def output(self, state, args, kwargs):
        """The stack's output for the first block's call ``args``/``kwargs`` (``NotImplemented``: the family's
        fold declines this call, and the blocks are replayed one by one)."""
        history = list(state.outputs[self.block_units[0][0]])[-(state.fold_order + 1):]
        sums = [self._sums(state, step) for step, _ in history]
        for step in set(state.fold_sums) - {step for step, _ in state.outputs[self.block_units[0][0]]}:
            del state.fold_sums[step]  # the units no longer hold that step's outputs: its sums go at this fold
        # REUSE (and a forecast with one computed output) takes the newest sums as they are, as a unit reuses.
        linear = state.compiled.fold_weights(state.step)
        if linear is not None:  # the sums are linear in the outputs: the units' shared weights combine them
            combined = weighted_sum(linear, sums[::-1])
        elif len(sums) == 1:
            combined = sums[0]
        else:
            combined = extrapolate(state.forecast_weights(history), sums)
        return self.family_fold.output(self.blocks[0], combined, args, kwargs)

    def passthrough(self, args, kwargs):
        """What a block after the first returns on a folded step: its input, the stack's output."""
        return self.family_fold.passthrough(args, kwargs)

    def _sums(self, state, step: int):
        sums = state.fold_sums.get(step)
        if sums is None:
            outputs = [[_stored_at(state, unit, step) for unit in units] for units in self.block_units]
            sums = state.fold_sums[step] = self.family_fold.sums(self.blocks, outputs)
        return sums


def step_fold(transformer: torch.nn.Module, replayable, num_units: int) -> StepFold | None:
    """The transformer's step fold, where its family has one, every block can be replayed (``replayable``:
    ``(path, units, replay)`` per block, :func:`dit_cache.units.replayable_blocks`) and the blocks hold every unit."""
    family_fold = family_of(transformer).fold
    root = _unwrap(transformer)
    blocks = [root.get_submodule(path) for path, _, _ in replayable]
    if (family_fold is None or len(blocks) != len(transformer_blocks(transformer))
            or sum(len(units) for _, units, _ in replayable) != num_units or not family_fold.applies(blocks)):
        return None
    return StepFold(family_fold, blocks, tuple(units for _, units, _ in replayable))


def _stored_at(state, unit: int, step: int):
    for stored_step, output in state.outputs[unit]:
        if stored_step == step:
            return output
    raise RuntimeError(f"unit {unit} holds no output of step {step}: the step fold needs every unit's history")
