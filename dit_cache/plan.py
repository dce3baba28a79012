"""``CachePlan``: what each unit does at each denoising step.

A plan is an integer tensor ``[num_steps, num_units]`` of :class:`Action` codes. ``CacheSchedule`` (a boolean
mask) is the two-action case: True is COMPUTE, False is REUSE. Each action is one method of ``CacheState``
(``dit_cache.state``) and one row of :data:`dit_cache.actions.ACTIONS`; the history each unit must keep follows
from the plan.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from .actions import ACTION_COST, ACTIONS, Action  # noqa: F401  (Action and ACTION_COST: public here too)
from .file_checks import FileChecker
from .schedule import SCHEDULE_FORMAT, CacheSchedule, check_shape, check_unit_weights

PLAN_FORMAT = "dit-cache/plan"



# Spellings accepted by ``CachePlan.parse`` (``--plan taylor:3:1``), each: (builder, parameter names).
PRESETS = {
    "uniform": ("uniform", ("interval",)),
    "taylor": ("taylor", ("interval", "order")),
    "cfg": ("cfg_share", ("interval",)),
}


class CachePlan:
    """Per-step, per-unit :class:`Action` codes, and the weights of LINEAR entries.

    The first step computes every unit (the cache is empty before it), and no entry may need more computed
    outputs than its unit has stored by then; both are checked here, before anything runs.

    Example::

        units = len(dit_cache.cache_units(pipe.transformer))
        plan = CachePlan.taylor(num_steps=20, num_units=units, interval=3, order=1)
        pipe = dit_cache.accelerate(pipe, plan=plan)
        plan.counts()          # {'COMPUTE': ..., 'FORECAST1': ..., ...}
    """

    def __init__(self, actions: torch.Tensor, linear_weights: torch.Tensor | None = None):
        actions = torch.as_tensor(actions)
        if actions.ndim != 2 or actions.shape[0] == 0 or actions.shape[1] == 0:
            raise ValueError(f"A plan must be 2-D [num_steps, num_units], got shape {tuple(actions.shape)}.")
        if actions.dtype == torch.bool or actions.is_floating_point():
            raise TypeError("A plan holds integer Action codes; wrap a boolean mask as CacheSchedule(mask) "
                            "or CachePlan.from_schedule(...).")
        known = torch.tensor([int(a) for a in Action])
        unknown = sorted(set(actions[~torch.isin(actions, known)].tolist()))
        if unknown:
            names = ", ".join(f"{a.name}={int(a)}" for a in Action)
            raise ValueError(f"Unknown action code(s) {unknown} in the plan; the codes are {names}.")
        self.actions = actions.detach().cpu().to(torch.int8).clone()
        if not bool((self.actions[0] == Action.COMPUTE).all()):
            raise ValueError("The first step must COMPUTE every unit (the cache is still empty): set actions[0] = "
                             "Action.COMPUTE.")
        self.linear_weights = self._checked_weights(linear_weights)
        self.history_depth = self._check_history()

    def _checked_weights(self, weights) -> torch.Tensor | None:
        uses_linear = bool((self.actions == Action.LINEAR).any())
        if weights is None:
            if uses_linear:
                raise ValueError("The plan has LINEAR entries but no linear_weights; fit them with "
                                 "dit_cache.fit_linear_forecaster(pipe, plan, prompts).")
            return None
        weights = torch.as_tensor(weights, dtype=torch.float32).detach().cpu().clone()
        if weights.ndim != 3 or weights.shape[:2] != self.actions.shape or weights.shape[2] == 0:
            raise ValueError(f"linear_weights must be [num_steps, num_units, K] = [{self.num_steps}, "
                             f"{self.num_units}, K], got {tuple(weights.shape)}.")
        if not bool(torch.isfinite(weights).all()):
            raise ValueError("linear_weights contain NaN or infinite values; refit them.")
        return weights

    def _check_history(self) -> list[int]:
        """Per unit, how many computed outputs it must keep; raises if an entry needs more than exist."""
        needed = torch.zeros(max(int(a) for a in Action) + 1, dtype=torch.long)  # COMPUTE (and the rest) need 0
        for action, facts in ACTIONS.items():
            needed[int(action)] = facts.history
        if self.linear_weights is not None:
            needed[int(Action.LINEAR)] = self.linear_weights.shape[2]
        computes = (self.actions == Action.COMPUTE).long()
        stored = computes.cumsum(0) - computes  # computed outputs each unit holds when an entry runs
        need = needed[self.actions.long()]
        short = (need > stored).nonzero()
        if len(short):
            step, unit = short[0].tolist()  # the first shortfall in step order, as the hooks would meet it
            code = Action(int(self.actions[step, unit]))
            raise ValueError(
                f"Step {step}, unit {unit}: {code.name} needs {int(need[step, unit])} computed outputs but the unit "
                f"has computed {int(stored[step, unit])} times by then. Compute it at more earlier steps, or use "
                "REUSE (or a lower forecast order) there.")
        return need.amax(0).clamp(min=1).tolist()

    # ---- builders ------------------------------------------------------------------------------------------
    @classmethod
    def from_schedule(cls, schedule: CacheSchedule) -> "CachePlan":
        """The boolean schedule as a plan: True -> COMPUTE, False -> REUSE."""
        if not isinstance(schedule, CacheSchedule):
            raise TypeError(f"Expected a CacheSchedule, got {type(schedule).__name__}.")
        return cls(torch.where(schedule.mask, int(Action.COMPUTE), int(Action.REUSE)).to(torch.int8))

    @classmethod
    def full(cls, num_steps: int, num_units: int) -> "CachePlan":
        return cls(torch.full((num_steps, num_units), int(Action.COMPUTE), dtype=torch.int8))

    @classmethod
    def uniform(cls, num_steps: int, num_units: int, interval: int) -> "CachePlan":
        """Every unit computes every ``interval`` steps and reuses in between (FORA)."""
        return cls.from_schedule(CacheSchedule.uniform(num_steps, num_units, interval))

    @classmethod
    def taylor(cls, num_steps: int, num_units: int, interval: int, order: int = 1) -> "CachePlan":
        """Every unit computes every ``interval`` steps and forecasts in between (TaylorSeer-style).

        Until a unit has ``order + 1`` computed outputs it computes at every step, so the first forecast already
        has a full history; the last step always computes, since the final output matters most.
        """
        if order not in (1, 2):
            raise ValueError(f"order must be 1 or 2, got {order}.")
        forecast = Action.FORECAST1 if order == 1 else Action.FORECAST2
        return cls(_predicting(num_steps, num_units, interval, warmup=order + 1, action=forecast))

    @classmethod
    def linear(cls, num_steps: int, num_units: int, interval: int, order: int = 2) -> "CachePlan":
        """Like :meth:`taylor`, with LINEAR entries over the last ``order`` outputs. Their weights start as
        plain reuse of the newest output; ``dit_cache.fit_linear_forecaster`` fits them."""
        if order < 1:
            raise ValueError(f"order must be >= 1, got {order}.")
        actions = _predicting(num_steps, num_units, interval, warmup=order, action=Action.LINEAR)
        weights = torch.zeros(num_steps, num_units, order)
        weights[..., 0] = 1.0
        return cls(actions, weights * (actions == Action.LINEAR)[..., None])

    @classmethod
    def cfg_share(cls, num_steps: int, num_units: int, interval: int) -> "CachePlan":
        """Every unit computes the whole CFG batch every ``interval`` steps and one half of it in between."""
        _check_interval(interval)
        codes = torch.full((num_steps, num_units), int(Action.CFG_SHARE), dtype=torch.int8)
        codes[torch.arange(num_steps) % interval == 0] = int(Action.COMPUTE)
        return cls(codes)

    @classmethod
    def parse(cls, spec: str, num_steps: int, num_units: int) -> "CachePlan":
        """A preset from a string: ``uniform:2``, ``taylor:3:1`` (interval 3, order 1), ``cfg:2``."""
        name, *values = spec.split(":")
        if name not in PRESETS:
            raise ValueError(f"Unknown plan preset {name!r} in {spec!r}; use one of: "
                             + ", ".join(f"{n}:" + ":".join(p.upper() for p in params)
                                         for n, (_, params) in PRESETS.items()) + ".")
        builder, params = PRESETS[name]
        if not 1 <= len(values) <= len(params) or not all(v.isdigit() for v in values):
            raise ValueError(f"Plan {spec!r}: {name} takes {', '.join(params)} as positive integers, e.g. "
                             f"{name}:" + ":".join(["3", "1"][: len(params)]) + ".")
        return getattr(cls, builder)(num_steps, num_units, **{p: int(v) for p, v in zip(params, values)})

    # ---- what the plan does --------------------------------------------------------------------------------
    @property
    def num_steps(self) -> int:
        return self.actions.shape[0]

    @property
    def num_units(self) -> int:
        return self.actions.shape[1]

    def uses(self, *actions: Action) -> bool:
        return bool(torch.isin(self.actions, torch.tensor([int(a) for a in actions])).any())

    def counts(self, num_steps: int | None = None) -> dict[str, int]:
        """How many (step, unit) entries of the first ``num_steps`` steps take each action."""
        rows = self.actions[: self.num_steps if num_steps is None else num_steps]
        return {action.name: int((rows == action).sum()) for action in Action}

    def costs(self) -> torch.Tensor:
        """The share of each entry's unit FLOPs that runs, ``[num_steps, num_units]``."""
        table = torch.zeros(int(max(Action)) + 1, dtype=torch.float64)
        for action, cost in ACTION_COST.items():
            table[int(action)] = cost
        return table[self.actions.long()]

    @property
    def cache_ratio(self) -> float:
        """The share of unit evaluations skipped; an entry run on half the CFG batch counts half."""
        return 1.0 - self.costs().mean().item()

    def cached_share(self, unit_weights: torch.Tensor) -> float:
        """Like :attr:`cache_ratio`, each unit weighted (e.g. by its FLOPs)."""
        weights = check_unit_weights(unit_weights, self.num_units)
        return ((1 - self.costs()) * weights).sum().item() / (weights.sum().item() * self.num_steps)

    def theoretical_speedup(self, unit_flops: torch.Tensor, total_flops: float) -> float:
        """FLOP-weighted speedup of the transformer over a generation (see ``CacheSchedule``)."""
        unit_flops = torch.as_tensor(unit_flops, dtype=torch.float64)
        if unit_flops.shape != (self.num_units,):
            raise ValueError(f"unit_flops has shape {tuple(unit_flops.shape)}, expected ({self.num_units},).")
        saved = ((1 - self.costs()) * unit_flops).sum().item()
        full = float(total_flops) * self.num_steps
        return full / (full - saved)

    def check_compatible(self, num_steps: int | None = None, num_units: int | None = None) -> None:
        """Raise a ValueError naming both shapes if this plan does not fit the given steps / units."""
        check_shape(self, "plan", num_steps, num_units)

    # ---- files ---------------------------------------------------------------------------------------------
    def save(self, path: str | Path) -> None:
        tensors = {"actions": self.actions.contiguous()}
        if self.linear_weights is not None:
            tensors["linear_weights"] = self.linear_weights.contiguous()
        save_file(tensors, str(path), metadata={"format": PLAN_FORMAT, "cache_ratio": f"{self.cache_ratio:.6f}"})

    @classmethod
    def load(cls, path: str | Path) -> "CachePlan":
        """A plan file (with its LINEAR forecaster weights), or a schedule file (read as its plan), checked as a
        whole: every tensor's dtype, rank, shape and finiteness and the metadata; a damaged file is refused in one
        line naming the file, the field and the fix."""
        check = FileChecker(path, "plan", "re-save it with CachePlan.save")
        kind, header, tensors = check.read((PLAN_FORMAT, SCHEDULE_FORMAT))
        fields = check.json_fields(header)
        check.number(fields, "cache_ratio", 0.0, 1.0)
        if kind == SCHEDULE_FORMAT:
            return cls.from_schedule(CacheSchedule.load(path))
        check.only(tensors, {"actions"}, {"linear_weights"})
        actions = check.tensor(tensors, "actions", "int", (None, None))
        weights = check.tensor(tensors, "linear_weights", "float", (*actions.shape, None),
                               fix="refit them with dit_cache.fit_linear_forecaster and save the plan again")
        try:
            return cls(actions, weights)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path} is a damaged plan: {error}") from None

    def __eq__(self, other) -> bool:
        if not isinstance(other, CachePlan) or not torch.equal(self.actions, other.actions):
            return False
        if self.linear_weights is None or other.linear_weights is None:
            return self.linear_weights is other.linear_weights
        return torch.equal(self.linear_weights, other.linear_weights)

    def __repr__(self) -> str:
        used = ", ".join(f"{name}={count}" for name, count in self.counts().items() if count)
        return f"CachePlan(num_steps={self.num_steps}, num_units={self.num_units}, {used})"

    def describe(self) -> str:
        """One line per step, a glyph per unit: '#' compute, '.' reuse, 'f'/'F' forecast order 1/2, 'l' linear,
        'h' CFG half (``dit_cache.actions.ACTIONS``)."""
        return "\n".join(f"{step:3d} " + "".join(ACTIONS[Action(c)].glyph for c in row)
                         for step, row in enumerate(self.actions.tolist()))


def _predicting(num_steps: int, num_units: int, interval: int, warmup: int, action: Action) -> torch.Tensor:
    """``action`` everywhere except: the first ``warmup`` steps, every ``interval``-th step after them, the last."""
    _check_interval(interval)
    codes = torch.full((num_steps, num_units), int(action), dtype=torch.int8)
    steps = torch.arange(num_steps)
    computes = (steps < warmup) | ((steps - (warmup - 1)) % interval == 0) | (steps == num_steps - 1)
    codes[computes] = int(Action.COMPUTE)
    return codes


def _check_interval(interval: int) -> None:
    if interval < 1:
        raise ValueError(f"interval must be >= 1, got {interval}.")


def as_plan(plan_or_schedule) -> CachePlan:
    """A ``CachePlan`` from a plan or a ``CacheSchedule``; anything else is a TypeError naming both."""
    if isinstance(plan_or_schedule, CachePlan):
        return plan_or_schedule
    if isinstance(plan_or_schedule, CacheSchedule):
        return CachePlan.from_schedule(plan_or_schedule)
    raise TypeError(f"Expected a dit_cache.CachePlan or CacheSchedule, got {type(plan_or_schedule).__name__}.")
