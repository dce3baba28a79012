"""The two hooks of the cache engine and the state they share.

State lives in one ``CacheState`` per transformer; the hooks hold no data of their own. The hot path is one
list lookup per unit: every per-step decision is precomputed into a row of action codes when a schedule is set.
"""

from __future__ import annotations

from collections import deque

import torch
from diffusers.hooks import ModelHook

# Action codes, one per unit and step. A new policy (e.g. forecasting from the history) is one new code.
BYPASS = 0  # compute, leave the cache alone (teacher passes, caching switched off for one call)
COMPUTE = 1  # compute and store
REUSE = 2  # return the newest stored output without running the module
GATE = 3  # training: blend fresh and cached outputs with the router's soft score

SCHEDULE, GATED, BYPASSED = "schedule", "gated", "bypassed"

UNIT_HOOK = "dit_cache.unit"


class CacheState:
    """Step counter, per-unit output history and the current step's action row."""

    def __init__(self, mask: torch.Tensor, history: int = 1):
        if history < 1:
            raise ValueError(f"history must be >= 1, got {history}.")
        self.num_units = mask.shape[1]
        self.outputs = [deque(maxlen=history) for _ in range(self.num_units)]
        self.mode = SCHEDULE
        self.gate_scores: torch.Tensor | None = None
        self.gate_writes: list[bool] = []
        self._compute_row = (COMPUTE,) * self.num_units
        self._bypass_row = (BYPASS,) * self.num_units
        self._gate_row = (GATE,) * self.num_units
        self.set_mask(mask)

    def set_mask(self, mask: torch.Tensor) -> None:
        self.rows = [tuple(COMPUTE if c else REUSE for c in row) for row in mask.tolist()]
        self.num_steps = len(self.rows)
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.actions = self._compute_row
        for history in self.outputs:
            history.clear()

    def begin_step(self) -> None:
        if self.mode == BYPASSED:
            self.actions = self._bypass_row
            return
        if self.step >= self.num_steps:
            self.reset()
        if self.step == 0:
            self.actions = self._compute_row
        elif self.mode == SCHEDULE:
            self.actions = self.rows[self.step]
        else:
            self.actions = self._gate_row

    def end_step(self) -> None:
        if self.mode != BYPASSED:
            self.step += 1

    def store(self, unit: int, output: torch.Tensor) -> None:
        self.outputs[unit].append((self.step, output))

    def newest(self, unit: int) -> torch.Tensor:
        return self.outputs[unit][-1][1]

    def gate(self, unit: int, fresh: torch.Tensor) -> torch.Tensor:
        score = self.gate_scores[unit].to(fresh.dtype)
        blended = score * fresh + (1 - score) * self.newest(unit)
        # Official HarmoniCa behaviour: the cache only takes the blend where the hard gate would compute.
        if self.gate_writes[unit]:
            self.store(unit, blended.detach())
        return blended

    @property
    def cache_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for history in self.outputs for _, t in history)


class UnitCacheHook(ModelHook):
    """Wraps one branch (attn1 / attn2 / ff): computes it, or returns its cached pre-gate output."""

    def __init__(self, state: CacheState, unit: int):
        super().__init__()
        self.state = state
        self.unit = unit

    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state, unit = self.state, self.unit
        action = state.actions[unit]
        if action == REUSE:
            return state.newest(unit)
        output = self.fn_ref.original_forward(*args, **kwargs)
        if action == COMPUTE:
            state.store(unit, output)
        elif action == GATE:
            output = state.gate(unit, output)
        return output


class DenoisingStepHook:
    """On the transformer: one forward call is one denoising step.

    Installed as plain torch forward (pre-)hooks rather than by replacing ``forward``: removal is then exact
    whatever else wraps the transformer's forward later (accelerate's CPU offload does).
    """

    def __init__(self, state: CacheState):
        self.state = state

    def attach(self, transformer: torch.nn.Module) -> list:
        return [
            transformer.register_forward_pre_hook(lambda module, args: self.state.begin_step()),
            transformer.register_forward_hook(lambda module, args, output: self.state.end_step()),
        ]
