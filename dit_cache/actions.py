"""What a unit can do at a step: the :class:`Action` codes and one row of facts per action.

Everything that needs to know an action reads :data:`ACTIONS`: plan validation (the history it needs), FLOP
accounting (its cost), ``CachePlan.describe`` (its glyph), ``CacheStats`` (the field it counts in), routers
(whether a router may choose it for a skipped entry) and the unit hook (the ``CacheState`` method that runs it).
Adding an action is one row here plus that method.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Action(enum.IntEnum):
    COMPUTE = 1  # run the unit and store its output
    REUSE = 2  # return the newest stored output
    FORECAST1 = 4  # extrapolate linearly in the timestep from the last 2 stored outputs (TaylorSeer order 1)
    FORECAST2 = 5  # extrapolate quadratically from the last 3 stored outputs (order 2)
    LINEAR = 6  # learned linear combination of the last K stored outputs (L2P-style; weights in the plan)
    CFG_SHARE = 7  # run the unit on one half of the CFG batch, rebuild the other from the stored difference


@dataclass(frozen=True)
class ActionFacts:
    """``cost``: share of the unit's FLOPs spent (FORECAST and LINEAR cost a few element-wise operations per output
    element, about 1 / (4 * hidden) of the unit, counted as 0); ``history``: computed outputs that must exist
    before it runs (LINEAR: as many as it has weights, known from the plan); ``glyph``: its letter in
    ``CachePlan.describe``; ``stats_field``: the ``CacheStats`` count it adds to; ``router_choice``: a router may
    choose it for a skipped entry; ``runs``: the ``CacheState`` method that produces the unit's output (None:
    the unit computes)."""

    cost: float
    history: int
    glyph: str
    stats_field: str
    router_choice: bool
    runs: str | None


ACTIONS: dict[Action, ActionFacts] = {
    Action.COMPUTE: ActionFacts(1.0, 0, "#", "computed", False, None),
    Action.REUSE: ActionFacts(0.0, 1, ".", "reused", True, "reuse"),
    Action.FORECAST1: ActionFacts(0.0, 2, "f", "forecast", True, "forecast1"),
    Action.FORECAST2: ActionFacts(0.0, 3, "F", "forecast", True, "forecast2"),
    Action.LINEAR: ActionFacts(0.0, 0, "l", "linear", False, "linear"),
    Action.CFG_SHARE: ActionFacts(0.5, 1, "h", "cfg_shared", True, "cfg_share"),
}

ACTION_COST = {action: facts.cost for action, facts in ACTIONS.items()}
ROUTER_CHOICES = tuple(action for action, facts in ACTIONS.items() if facts.router_choice)


# Modes of a generation's cache state, which override every unit's action: follow the plan, blend fresh and cached
# outputs for router training, or run the stock computation (teacher passes, cache=False).
SCHEDULE, GATED, BYPASSED = "schedule", "gated", "bypassed"
