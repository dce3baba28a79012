"""The state of one generation: the step, the timesteps seen, each unit's last computed outputs and what the
actions do with them (``CacheState``), a plan prepared into rows of action codes (``PreparedPlan``), and the
snapshots the router search restarts from (``CacheSnapshot``). The hooks (:mod:`dit_cache.hooks`) hold no data;
they find a call's ``CacheState`` through the handle."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

import torch

from .actions import ACTIONS, BYPASSED, SCHEDULE, Action
from .forecast import extrapolate, lagrange_weights, weighted_sum
from .plan import CachePlan

# Codes only the engine uses, next to the plan's Action codes.
BYPASS = 0  # compute, leave the cache alone (teacher passes, caching switched off for one call)
GATE = 3  # training: blend fresh and cached outputs with the router's soft score
COMPUTE = Action.COMPUTE
LINEAR = int(Action.LINEAR)
FORECASTS = (Action.FORECAST1, Action.FORECAST2)
# action code -> the CacheState method producing a skipped unit's output (the table's ``runs``)
_RUNNERS = {int(action): facts.runs for action, facts in ACTIONS.items() if facts.runs}
# Actions that produce a unit's output without running it: a block whose units all take one can be replayed.
_WITHOUT_FORWARD = frozenset(int(action) for action, facts in ACTIONS.items() if facts.runs and facts.cost == 0)
# Actions whose output is a weighted sum of the unit's stored outputs, with weights every unit shares at a step
# (given the same computed steps): a step where every unit takes the same one can be folded (dit_cache.fold).
_SHARED_WEIGHTS = {int(Action.REUSE): 0, int(Action.FORECAST1): 1, int(Action.FORECAST2): 2}  # -> forecast order


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
        self._replay_rows: dict[tuple, list[tuple[bool, ...]]] = {}
        self._fold_rows: list[int | None] | None = None
        self._fold_weights: list[list[float] | None] = [None] * self.num_steps  # set with the fold rows

    def replay_rows(self, blocks: tuple[tuple[int, ...], ...]) -> list[tuple[bool, ...]]:
        """Per step, per block of ``blocks`` (each the units of one replayable block): whether none of its units
        runs its forward, so the block can be replayed (:mod:`dit_cache.families.replays`)."""
        rows = self._replay_rows.get(blocks)
        if rows is None:
            rows = self._replay_rows[blocks] = [
                tuple(all(row[unit] in _WITHOUT_FORWARD for unit in units) for units in blocks) for row in self.rows]
        return rows

    def fold_rows(self) -> list[int | None]:
        """Per step: the forecast order (0: REUSE; K - 1 for LINEAR over K outputs) every unit takes there, where
        all take the same shared-weight action and have computed at the same steps so far, so the step can be
        folded into one pass; else None. A LINEAR row folds where every unit has the same weights."""
        if self._fold_rows is None:
            rows, computed = [], [frozenset()] * self.num_units
            for step, row in enumerate(self.rows):
                order = _SHARED_WEIGHTS.get(row[0]) if step > 0 and len(set(row)) == 1 else None
                if step > 0 and set(row) == {LINEAR}:
                    shared = self.linear[step][0]
                    if all(weights == shared for weights in self.linear[step]):
                        order, self._fold_weights[step] = len(shared) - 1, shared
                rows.append(order if len(set(computed)) == 1 else None)
                computed = [steps | {step} if code == COMPUTE else steps for steps, code in zip(computed, row)]
            self._fold_rows = rows
        return self._fold_rows

    def fold_weights(self, step: int) -> list[float] | None:
        """The LINEAR weights (newest first) a folded ``step`` combines its sums with; None: a REUSE or FORECAST
        step, whose weights are the Lagrange ones of its computed steps' timesteps. Found with the fold rows."""
        self.fold_rows()
        return self._fold_weights[step]


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
                 detect_new_generation: bool = False, replay_blocks: tuple[tuple[int, ...], ...] = ()):
        self.mode = mode
        self.replay_blocks = replay_blocks  # the units of each block the engine can replay, by block hook
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
        self._no_replays = (False,) * len(self.replay_blocks)
        self._replay_rows = compiled.replay_rows(self.replay_blocks)
        self._fold_orders = compiled.fold_rows()
        self.outputs = [deque(maxlen=depth) for depth in compiled.history]
        self.reset()

    def switch_plan(self, compiled: PreparedPlan) -> None:
        """Follow ``compiled`` from the next step on, in this generation: its history so far is kept (each unit's
        to the new plan's depth)."""
        for unit, history in enumerate(self.outputs):
            if history.maxlen != compiled.history[unit]:
                self.outputs[unit] = deque(history, maxlen=compiled.history[unit])
        self.compiled = compiled
        self._replay_rows = compiled.replay_rows(self.replay_blocks)
        self._fold_orders = compiled.fold_rows()

    def reset(self) -> None:
        self.step = 0
        self.times: list[float] = []
        self.last_time: float | None = None
        # (step, the steps its history was computed at) -> Lagrange weights, shared by the units alike there
        self._forecast_weights: dict[tuple, list[float]] = {}
        self.actions = self._compute_row
        self.replays = self._no_replays
        self.fold_order: int | None = None  # this step can fold (dit_cache.fold), forecasting to this order
        self.folded = False  # the first block folded this step: the others pass its output on
        self.fold_sums: dict[int, object] = {}  # a computed step -> its outputs' sums, as a StepFold forms them
        self.invariant: dict[int, tuple] = {}  # step-invariant modules' kept outputs (dit_cache.step_invariant)
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
        self.fold_order, self.folded = None, False
        if self.mode == BYPASSED:
            self.actions, self.replays = self._bypass_row, self._no_replays
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
            self.actions, self.replays = self._compute_row, self._no_replays
        elif self.mode == SCHEDULE:
            self.actions, self.replays = self.compiled.rows[self.step], self._replay_rows[self.step]
            self.fold_order = self._fold_orders[self.step]
        else:
            self.actions, self.replays = self._gate_row, self._no_replays

    def run_every_block(self) -> None:
        """This step, every block runs its forward (no replay, no fold)."""
        self.replays, self.fold_order = self._no_replays, None

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
        return extrapolate(self.forecast_weights(history), [output for _, output in history])

    def forecast_weights(self, history) -> list[float]:
        """The Lagrange weights of this step's forecast from ``history``'s ``(step, output)`` pairs, oldest first
        (shared by every unit computed at the same steps)."""
        sources = tuple(step for step, _ in history)
        weights = self._forecast_weights.get((self.step, sources))
        if weights is None:
            weights = lagrange_weights([self.times[step] for step in sources], self.times[self.step])
            self._forecast_weights[(self.step, sources)] = weights
        return weights

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
        stored = sum(_nbytes(output) for history in self.outputs for _, output in history)
        return stored + sum(_nbytes(sums) for sums in self.fold_sums.values())

    @property
    def invariant_bytes(self) -> int:
        """The step-invariant outputs kept besides (dit_cache.step_invariant), not in ``cache_bytes``."""
        return sum(_nbytes(output) for _, _, output, _ in self.invariant.values())


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
