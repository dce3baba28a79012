"""The two hooks of the cache engine: one per unit (compute it, or produce its output from the cache) and one on
the transformer (one forward call is one denoising step).

The hooks hold no data: each call finds its generation's ``CacheState`` (:mod:`dit_cache.state`) through the handle
(a context variable, so concurrent calls through one transformer never see each other's cache). The hot path is one
list lookup per unit: every decision is precomputed into rows of action codes when the plan is set.
"""

from __future__ import annotations

import torch
from diffusers.hooks import ModelHook

from .actions import BYPASSED, GATED, SCHEDULE  # noqa: F401  (modes: re-exported)
from .parallel import check_step
from .state import COMPUTE, GATE
from .state import CacheSnapshot, CacheState, CompiledPlan, PreparedPlan  # noqa: F401  (re-exported: their old home)


UNIT_HOOK = "dit_cache.unit"
BLOCK_HOOK = "dit_cache.block"

# An outer torch.compile (of the transformer or its blocks) must not trace the cache decisions: it would guard on
# them and recompile at every plan change. It breaks its graph at the hooks instead, whichever order it came in;
# with fullgraph=True it stops there, and this reason is its error.
_EAGER = torch.compiler.disable(reason=(
    "dit-cache's hooks decide per step what each unit does and stay eager, so an outer torch.compile cannot use "
    "fullgraph=True: drop it, or compile the units themselves with dit_cache.accelerate(pipe, ..., compile=True)"))


class UnitCacheHook(ModelHook):
    """Wraps one branch (attn1 / attn2 / ff / ...): computes it, or produces its pre-gate output from the cache."""

    def __init__(self, handle, unit: int):
        super().__init__()
        self.handle = handle
        self.unit = unit
        self.compiled_forward = None  # the unit's own computation compiled (dit_cache.compile_units), else None

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        # The cached outputs belong to generations (CacheState), not to the hook: nothing to reset here.
        return module

    @_EAGER
    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = self.handle.active_state()
        if state is None:  # no cached generation: exactly the stock module, not even its compiled twin
            return self.fn_ref.original_forward(*args, **kwargs)
        forward = self.compiled_forward or self.fn_ref.original_forward
        unit = self.unit
        action = state.actions[unit]
        runner = state.runners.get(action)
        if runner is not None:
            return runner(unit, forward, args, kwargs)
        output = forward(*args, **kwargs)
        if action == COMPUTE:
            state.store(unit, output)
        elif action == GATE:
            output = state.gate(unit, output)
        return output


class BlockReplayHook(ModelHook):
    """Wraps one block whose family has a replay: on a step where none of its units runs, the block's output
    comes from its input and its units' cached or forecast outputs alone (:mod:`dit_cache.families.replays`);
    on every other step the block runs its forward, its units hooked. With a step fold (:mod:`dit_cache.fold`),
    a step every unit skips alike is the first block's fold of the whole stack, the others passing it on."""

    def __init__(self, handle, block: int, units: tuple[int, ...], replay, fold=None):
        super().__init__()
        self.handle = handle
        self.block = block  # this block's index among the replayable ones (a CacheState.replays position)
        self.units = units
        self.replay = replay
        self.fold = fold  # the transformer's StepFold, or None

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    @_EAGER
    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        state = self.handle.active_state()
        if state is not None and state.replays[self.block]:
            if self.fold is not None and state.fold_order is not None:
                if self.block > 0:
                    if state.folded:
                        return self.fold.passthrough(args, kwargs)
                else:
                    output = self.fold.output(state, args, kwargs)
                    state.folded = output is not NotImplemented
                    if state.folded:
                        return output
            actions, runners = state.actions, state.runners
            outputs = [runners[actions[unit]](unit, None, (), {}) for unit in self.units]
            output = self.replay(module, outputs, args, kwargs)
            if output is not NotImplemented:
                return output
        return self.fn_ref.original_forward(*args, **kwargs)


class DenoisingStepHook:
    """On the transformer: one forward call is one denoising step.

    Installed as plain torch forward (pre-)hooks rather than by replacing ``forward``: removal is then exact
    whatever else wraps the transformer's forward later (accelerate's CPU offload does).
    """

    def __init__(self, handle, family=None):
        self.handle = handle
        self.timestep_argument = "timestep" if family is None else family.timestep_argument
        self.timestep_position: int | None = None  # where a positional call passes the timestep
        self.family = family
        self.time_sign = 1.0

    def attach(self, transformer: torch.nn.Module) -> list:
        import inspect

        model = getattr(transformer, "_orig_mod", transformer)
        names = list(inspect.signature(type(model).forward).parameters)[1:]  # without self
        if self.timestep_argument in names:
            self.timestep_position = names.index(self.timestep_argument)
        if self.family is not None:
            # The state expects a generation's times to decrease, as scheduler timesteps do; a family whose model
            # time runs the other way (Z-Image: (1000 - t) / 1000) is seen negated, which forecasts alike.
            early, late = (float(self.family.timesteps(t, 1, model.config)[0]) for t in (900, 100))
            self.time_sign = -1.0 if early < late else 1.0
        return [
            transformer.register_forward_pre_hook(self._begin, with_kwargs=True),
            transformer.register_forward_hook(self._end),
        ]

    def _timestep(self, args, kwargs):
        if self.timestep_argument in kwargs:
            timestep = kwargs[self.timestep_argument]
        else:
            position = self.timestep_position
            timestep = args[position] if position is not None and position < len(args) else None
        return timestep if timestep is None or self.time_sign > 0 else -timestep

    @_EAGER
    def _begin(self, module, args, kwargs):
        self.handle.name_call()
        state = self.handle.active_state()
        if state is not None:
            state.begin_step(self._timestep(args, kwargs))
            check_step(module, self.handle, state)  # under context parallelism: the ranks agree, or an error
            if not self.handle.blocks_replayable():
                state.run_every_block()

    @_EAGER
    def _end(self, module, args, output):
        state = self.handle.active_state()
        if state is not None:
            state.end_step()
