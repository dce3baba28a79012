"""The two hooks of the cache engine and the state of one generation.

The hooks hold no data: each call finds its generation's ``CacheState`` through the handle (a context variable,
so concurrent calls through one transformer never see each other's cache). The hot path is one list lookup per
unit: every decision is precomputed into rows of action codes when the plan is set.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch
from diffusers.hooks import ModelHook

from .actions import ACTIONS, BYPASSED, GATED, SCHEDULE, Action  # noqa: F401  (modes: re-exported)
from .forecast import extrapolate, lagrange_weights, weighted_sum
from .parallel import check_step
from .plan import CachePlan

# Codes only the engine uses, next to the plan's Action codes.
BYPASS = 0  # compute, leave the cache alone (teacher passes, caching switched off for one call)
GATE = 3  # training: blend fresh and cached outputs with the router's soft score
COMPUTE = Action.COMPUTE
FORECASTS = (Action.FORECAST1, Action.FORECAST2)
# action code -> the CacheState method producing a skipped unit's output (the table's ``runs``)
_RUNNERS = {int(action): facts.runs for action, facts in ACTIONS.items() if facts.runs}


UNIT_HOOK = "dit_cache.unit"

# An outer torch.compile (of the transformer or its blocks) must not trace the cache decisions: it would guard on
# them and recompile at every plan change. It breaks its graph at the hooks instead, whichever order it came in;
# with fullgraph=True it stops there, and this reason is its error.
_EAGER = torch.compiler.disable(reason=(
    "dit-cache's hooks decide per step what each unit does and stay eager, so an outer torch.compile cannot use "
    "fullgraph=True: drop it, or compile the units themselves with dit_cache.accelerate(pipe, ..., compile=True)"))


class PreparedPlan:
    """A plan as the hooks read it: rows of plain ints, per-unit history depths, and LINEAR weights as floats.
    (Nothing to do with ``torch.compile``; it was called ``CompiledPlan``, a name kept as an alias.)"""

    def __init__(self, plan: CachePlan, min_history: int = 1):
        self.plan = plan
        self.rows = [tuple(row) for row in plan.actions.tolist()]
        self.num_steps, self.num_units = plan.num_steps, plan.num_units
        self.history = [max(depth, min_history) for depth in plan.history_depth]
        self.linear = None if plan.linear_weights is None else plan.linear_weights.tolist()
        self.needs_time = plan.uses(*FORECASTS)


@dataclass(frozen=True)
class CacheSnapshot:
    """What ``CacheState.restore`` needs to go on with a generation from the start of ``step``: the timesteps
    seen and, per unit, its stored ``(step computed, output)`` pairs, oldest first. The outputs are the stored
    tensors themselves (no copy): a snapshot holds them as long as it lives."""

    step: int
    times: tuple[float, ...]
    last_time: float | None
    outputs: tuple[tuple[tuple[int, object], ...], ...]

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(output) for history in self.outputs for _, output in history)

    def with_outputs(self, outputs) -> "CacheSnapshot":
        """The same snapshot over other outputs (each unit's ``(step, output)`` pairs), e.g. moved to the CPU."""
        return CacheSnapshot(self.step, self.times, self.last_time, tuple(tuple(history) for history in outputs))


class CacheState:
    """One generation: step counter, timesteps seen, each unit's last computed outputs, the current action row."""

    def __init__(self, compiled: PreparedPlan, mode: str = SCHEDULE, computed_half: int = 1,
                 detect_new_generation: bool = False):
        self.mode = mode
        self.computed_half = computed_half  # CFG_SHARE runs this half of the batch (1: PixArt's conditional half)
        self.detect_new_generation = detect_new_generation
        self.gate_scores: torch.Tensor | None = None
        self.gate_writes: list[bool] = []
        self.runners = {code: getattr(self, name) for code, name in _RUNNERS.items()}  # bound once, for the hooks
        self.set_plan(compiled)

    def set_plan(self, compiled: PreparedPlan) -> None:
        """Follow ``compiled`` from a new generation on."""
        self.compiled = compiled
        num_units = compiled.num_units
        self._compute_row = (COMPUTE,) * num_units
        self._bypass_row = (BYPASS,) * num_units
        self._gate_row = (GATE,) * num_units
        self.outputs = [deque(maxlen=depth) for depth in compiled.history]
        self.reset()

    def reset(self) -> None:
        self.step = 0
        self.times: list[float] = []
        self.last_time: float | None = None
        # (step, the steps its history was computed at) -> Lagrange weights, shared by the units alike there
        self._forecast_weights: dict[tuple, list[float]] = {}
        self.actions = self._compute_row
        for history in self.outputs:
            history.clear()

    def snapshot(self) -> CacheSnapshot:
        """The generation so far, to ``restore`` later (under this plan or another one for the same model)."""
        return CacheSnapshot(self.step, tuple(self.times), self.last_time,
                             tuple(tuple(history) for history in self.outputs))

    def restore(self, snapshot: CacheSnapshot) -> None:
        """Go on from ``snapshot`` under the current plan: the next denoising step is ``snapshot.step``. A unit
        keeps at most its plan's history depth of the snapshot's outputs (the newest)."""
        if len(snapshot.outputs) != len(self.outputs):
            raise ValueError(f"This snapshot holds {len(snapshot.outputs)} units' outputs, but the cache has "
                             f"{len(self.outputs)} units: restore it on the model it was taken from.")
        if not 0 <= snapshot.step < self.compiled.num_steps or len(snapshot.times) != snapshot.step:
            raise ValueError(f"This snapshot resumes at step {snapshot.step} after {len(snapshot.times)} timesteps; "
                             f"the plan has {self.compiled.num_steps} steps: take it under a plan of as many steps.")
        self.reset()
        self.step, self.times, self.last_time = snapshot.step, list(snapshot.times), snapshot.last_time
        for history, saved in zip(self.outputs, snapshot.outputs):
            history.extend(saved)

    def begin_step(self, timestep) -> None:
        if self.mode == BYPASSED:
            self.actions = self._bypass_row
            return
        time = None
        if timestep is not None and (self.compiled.needs_time or self.detect_new_generation):
            time = float(timestep.reshape(-1)[0]) if torch.is_tensor(timestep) else float(timestep)
        if self.step >= self.compiled.num_steps:
            self.reset()
        elif (self.detect_new_generation and self.step > 0 and time is not None and self.last_time is not None
              and time >= self.last_time):
            self.reset()  # a generation's timesteps fall (the step hook negates rising ones): a larger one starts anew
        self.last_time = time
        self.times.append(float(self.step) if time is None else time)
        if self.step == 0:
            self.actions = self._compute_row
        elif self.mode == SCHEDULE:
            self.actions = self.compiled.rows[self.step]
        else:
            self.actions = self._gate_row

    def end_step(self) -> None:
        if self.mode != BYPASSED:
            self.step += 1

    # ---- what the actions do (dit_cache.actions.ACTIONS names the method of each) --------------------------
    def store(self, unit: int, output) -> None:
        self.outputs[unit].append((self.step, output))

    def newest(self, unit: int):
        return self.outputs[unit][-1][1]

    def reuse(self, unit: int, forward, args, kwargs):
        return self.newest(unit)

    def forecast1(self, unit: int, forward, args, kwargs):
        return self.forecast(unit, 1)

    def forecast2(self, unit: int, forward, args, kwargs):
        return self.forecast(unit, 2)

    def forecast(self, unit: int, order: int):
        """Polynomial extrapolation in the timestep through the last ``order + 1`` computed outputs."""
        history = list(self.outputs[unit])[-(order + 1):]
        sources = tuple(step for step, _ in history)
        weights = self._forecast_weights.get((self.step, sources))
        if weights is None:
            weights = lagrange_weights([self.times[step] for step in sources], self.times[self.step])
            self._forecast_weights[(self.step, sources)] = weights
        return extrapolate(weights, [output for _, output in history])

    def linear(self, unit: int, forward=None, args=(), kwargs=None):
        """The plan's learned weights over the last K computed outputs, the newest first."""
        weights = self.compiled.linear[self.step][unit]
        history = list(self.outputs[unit])[-len(weights):][::-1]
        return weighted_sum(weights, [output for _, output in history])

    def cfg_share(self, unit: int, forward, args, kwargs):
        """Run ``forward`` on one half of the CFG batch; the other half is that result plus the difference
        between the halves in the unit's newest computed output."""
        newest = self.newest(unit)
        batch = _first_tensor(newest).shape[0]
        if batch % 2:
            raise ValueError(f"CFG_SHARE needs a classifier-free-guidance batch (two halves), but unit {unit} ran "
                             f"on a batch of {batch}. Use a guidance scale > 1, or a plan without CFG_SHARE.")
        half = batch // 2
        keep = slice(half, None) if self.computed_half else slice(0, half)
        sliced_args = [_take(a, keep, batch) for a in args]
        sliced_kwargs = {k: _take(v, keep, batch) for k, v in kwargs.items()}
        computed = forward(*sliced_args, **sliced_kwargs)
        return _rebuild(computed, newest, self.computed_half, half)

    def gate(self, unit: int, fresh):
        blended = _blend(self.gate_scores[unit], fresh, self.newest(unit))
        # Official HarmoniCa behaviour: the cache only takes the blend where the hard gate would compute.
        if self.gate_writes[unit]:
            self.store(unit, _detached(blended))
        return blended

    # ---- accounting ------------------------------------------------------------------------------------------
    @property
    def completed_steps(self) -> int:
        return min(self.step, self.compiled.num_steps)

    @property
    def cache_bytes(self) -> int:
        return sum(_nbytes(output) for history in self.outputs for _, output in history)


def _first_tensor(output) -> torch.Tensor:
    return output if torch.is_tensor(output) else next(o for o in output if torch.is_tensor(o))


def _nbytes(output) -> int:
    if torch.is_tensor(output):
        return output.numel() * output.element_size()
    return sum(_nbytes(o) for o in output if o is not None)


def _blend(score: torch.Tensor, fresh, cached):
    """``score * fresh + (1 - score) * cached``, element by element for tuple outputs (joint attention)."""
    if fresh is None:
        return None
    if not torch.is_tensor(fresh):
        return type(fresh)(_blend(score, f, c) for f, c in zip(fresh, cached))
    score = score.to(fresh.dtype)
    return score * fresh + (1 - score) * cached


def _detached(output):
    if output is None or torch.is_tensor(output):
        return None if output is None else output.detach()
    return type(output)(_detached(o) for o in output)


def _take(value, keep: slice, batch: int):
    if isinstance(value, (tuple, list)):
        # Per-sample tuples (LTX-Video's rotary (cos, sin), each [B, T, D]) are halved; a tuple holding anything
        # else (Allegro's rotary frequencies and position grids, which may have as many rows as the batch) is not.
        leaves = _tensor_leaves(value)
        per_sample = leaves and all(t.ndim > 0 and t.shape[0] == batch for t in leaves)
        return type(value)(_take(v, keep, batch) for v in value) if per_sample else value
    return value[keep] if torch.is_tensor(value) and value.ndim > 0 and value.shape[0] == batch else value


def _tensor_leaves(value) -> list[torch.Tensor]:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (tuple, list)):
        return [leaf for item in value for leaf in _tensor_leaves(item)]
    return []


def _rebuild(computed, newest, computed_half: int, half: int):
    if computed is None:
        return None
    if not torch.is_tensor(computed):
        return type(computed)(_rebuild(c, n, computed_half, half) for c, n in zip(computed, newest))
    mine, other = (newest[half:], newest[:half]) if computed_half else (newest[:half], newest[half:])
    rebuilt = computed + (other - mine)
    return torch.cat([rebuilt, computed] if computed_half else [computed, rebuilt])


CompiledPlan = PreparedPlan  # the old name (training code and user code may use it)


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

    @_EAGER
    def _end(self, module, args, output):
        state = self.handle.active_state()
        if state is not None:
            state.end_step()
