"""Greedy search of a cache plan on the final-latent error (ECAD-style), one move per training step.

The search starts from the uncached plan and, move after move, turns the COMPUTE entries of one
(step, branch group) into a cheap action (FORECAST1, REUSE, ...), choosing the move that raises the final-latent
MSE against the uncached run least per FLOP share saved, on a fixed batch of calibration prompts. A group is one
branch type (attn1, attn2, ff) across all blocks; with ``whole_steps`` a whole step is one more candidate move.

The order of the moves is the router: an entry removed earlier gets a lower logit, so cutting the order at any
budget gives the plan the search had at that point (``CacheRouter.plan(flops=...)``).

Refinement (``refine_from``): a nested order is greedy, so its coarsest plans inherit every early choice (on the
embedded model the 75% plan left a six-step gap no later move could close). Once the order is complete, the plan at
each budget from ``refine_from`` up is improved on its own by local search at that budget: move a computed entry up
to ``refine_radius`` steps, or switch a cached entry to another action of the same cost, keeping the best improving
change, up to ``refine_moves`` changes; one budget per training step. The router keeps these plans next to the order
(``CacheRouter.refined_plans``): they replace the nested plan that skips the same share.

Cost: a move changes the trajectory only from its step on, so every candidate restarts from a snapshot of the
current plan's trajectory at that step (latents, scheduler, the cache's stored outputs). Lazy greedy: the first
round measures the whole-step moves only (each group move starts from its step's score per FLOP); after it only
the few best-scoring candidates (and the whole-step move at the step of the last move) are measured, each move.
Memory: the snapshots hold each unit's last computed outputs at every step; ``snapshot_limit`` bounds how many a
trajectory keeps (a restart recomputes the steps from the latest one, the same result to the bit) and
``snapshot_location`` where they live (``trajectory_snapshots``). The cost model is in docs/router.md.
"""

from __future__ import annotations

import copy
import itertools
import math
from dataclasses import dataclass, field

import torch

from dit_cache.cache import CacheHandle
from dit_cache.state import PreparedPlan
from dit_cache.plan import ACTION_COST, Action, CachePlan
from dit_cache.router import LOGIT_LIMIT, CacheRouter, plan_with_fallbacks

from .denoising import init_noise_sigma, scale_model_input
from .trajectory_snapshots import TrajectorySnapshots, check_snapshot_settings, snapshot_steps

# Outputs a unit keeps during the search, by the deepest history its cheap actions read (a FORECAST2 reads three),
# so a snapshot fits every candidate.
HISTORY_READ = {"FORECAST1": 2, "FORECAST2": 3, "REUSE": 1, "CFG_SHARE": 1}


def batch_mse(final: torch.Tensor, reference: torch.Tensor, floor: float) -> float:
    return float((final.double() - reference.double()).pow(2).mean())


def mean_log_mse(final: torch.Tensor, reference: torch.Tensor, floor: float) -> float:
    per_image = (final.double() - reference.double()).pow(2).flatten(1).mean(1)
    return float((per_image + floor).log10().mean())


FINAL_ERRORS = {"mse": batch_mse, "log_mse": mean_log_mse}


def search_history(actions) -> int:
    return max(HISTORY_READ[name] for name in actions)


@dataclass
class SearchSettings:
    """Settings of ``objective: search``.

    Args:
        groups: ``branch``: a move caches one branch type (attn1 / attn2 / ff) of all blocks at one step;
            ``step``: a move caches a whole step (the whole-step baseline).
        actions: cheap actions a move may use, by name (FORECAST1, FORECAST2, REUSE, CFG_SHARE); a FORECAST
            falls back to REUSE where its unit has not computed often enough.
        whole_steps: with ``groups: branch``, also try caching all remaining groups of a step in one move.
        calibration_prompts: prompts of the calibration batch (the data module's first ones).
        calibration_seed: noise seed of the first calibration prompt (each next prompt: +1).
        max_flops: stop once this share of the units' FLOPs is skipped; the router serves budgets up to it.
        lazy_candidates: candidates measured again per move after the first round.
        default_flops: the budget of the exported router's threshold (what it does without ``flops=``); None: the
            largest one searched.
        refine_from: after the order is complete, refine the plan of every budget from this skipped share up
            (None: no refinement).
        refine_radius: how many steps a refinement may move a computed entry.
        refine_moves: improving changes per refined budget, at most.
        refine_together: computed entries of a group one change may move at once: 1, or 2 (also every pair of
            them, each by up to ``refine_radius`` steps: a gap a single move cannot close without opening another).
        validation_prompts: prompts after the calibration ones (noise seeds following theirs) on which every
            refinement change must lower the error too, or the refinement of that budget stops: a guard against
            fitting the calibration batch (0: no guard).
        snapshot_limit: trajectory snapshots kept at once, at most (None: one per step): the search's memory
            is then bounded by ``snapshot_limit x units x history x batch x tokens x width`` whatever the step count;
            a candidate restarts from the latest snapshot before it and recomputes the steps in between (same
            result, more time: see docs/router.md).
        snapshot_location: where the snapshots' unit outputs live: ``memory`` (on the model's device), ``cpu``
            (copied to the CPU, for a GPU run) or ``disk`` (safetensors files in a temporary folder).
        snapshot_dir: the folder of that temporary folder (``disk`` only; default: the system's temporary folder).
        error: what a plan's final latents are scored by against the uncached ones: ``mse``, the batch's mean
            squared error, or ``log_mse``, the mean over images of ``log10(MSE + error_floor)``, i.e. minus their mean
            PSNR over 10, the figure the benchmark reports. Per-image errors are heavy-tailed (a prompt whose
            composition flips dominates the batch's MSE); the log weighs every image alike.
        error_floor: added to each image's MSE under ``log_mse``, so the uncached plan (MSE 0) scores finitely; in
            squared latent units.
        order_from: a router file of an earlier search of this model (the same steps, units and groups): its move
            order, cheap actions and refined plans are taken as they are, and only the budgets from
            ``refine_from`` up that it did not refine are refined (e.g. under another ``error``, on more prompts).
        refine_adopted: with ``order_from``, refine its refined plans from ``refine_from`` up again, each starting
            from where the earlier refinement ended (e.g. under another ``error``), rather than keeping them.
    """

    groups: str = "branch"
    actions: list[str] = field(default_factory=lambda: ["FORECAST1", "REUSE"])
    whole_steps: bool = True
    calibration_prompts: int = 2
    calibration_seed: int = 10_000
    max_flops: float = 0.7
    lazy_candidates: int = 2
    default_flops: float | None = 0.5
    refine_from: float | None = None
    refine_radius: int = 1
    refine_moves: int = 3
    refine_together: int = 1
    validation_prompts: int = 0
    snapshot_limit: int | None = None
    snapshot_location: str = "memory"
    snapshot_dir: str | None = None
    error: str = "mse"
    error_floor: float = 1e-6
    order_from: str | None = None
    refine_adopted: bool = False

    def __post_init__(self):
        if self.groups not in ("branch", "step"):
            raise ValueError(f"search.groups must be 'branch' or 'step', got {self.groups!r}.")
        allowed = ("FORECAST1", "FORECAST2", "REUSE", "CFG_SHARE")
        if not self.actions or any(name not in allowed for name in self.actions):
            raise ValueError(f"search.actions must name some of {', '.join(allowed)}; got {self.actions!r}.")
        if not 0.0 < self.max_flops < 1.0:
            raise ValueError(f"search.max_flops must be in (0, 1), got {self.max_flops}.")
        if self.refine_from is not None and not 0.0 < self.refine_from <= self.max_flops:
            raise ValueError(f"search.refine_from must be in (0, search.max_flops], or null for no refinement; "
                             f"got {self.refine_from}.")
        if self.validation_prompts < 0:
            raise ValueError(f"search.validation_prompts must be >= 0, got {self.validation_prompts}.")
        for name in ("calibration_prompts", "lazy_candidates", "refine_radius", "refine_moves"):
            if getattr(self, name) < 1:
                raise ValueError(f"search.{name} must be >= 1, got {getattr(self, name)}.")
        if self.refine_together not in (1, 2):
            raise ValueError(f"search.refine_together must be 1 or 2 (computed entries one change moves), got "
                             f"{self.refine_together}.")
        check_snapshot_settings(self.snapshot_limit, self.snapshot_location, self.snapshot_dir)
        if self.error not in FINAL_ERRORS:
            raise ValueError(f"search.error must be one of {', '.join(FINAL_ERRORS)}; got {self.error!r}.")
        if not self.error_floor > 0:
            raise ValueError(f"search.error_floor must be > 0 (log10 of an exact image's MSE is -inf), "
                             f"got {self.error_floor}.")
        if self.refine_adopted and (self.order_from is None or self.refine_from is None):
            raise ValueError("search.refine_adopted refines the refined plans of search.order_from again from "
                             "search.refine_from up: set both, or leave refine_adopted false.")

    @property
    def error_label(self) -> str:
        return {"mse": "final-latent MSE", "log_mse": "mean log10 final-latent MSE"}[self.error]

    def final_error(self, final: torch.Tensor, reference: torch.Tensor) -> float:
        """The score of final latents ``final`` against the uncached ``reference`` (lower is better)."""
        return FINAL_ERRORS[self.error](final, reference, self.error_floor)

    def snapshots(self, num_steps: int) -> TrajectorySnapshots:
        """An empty store for one recorded trajectory, as these settings want it."""
        return TrajectorySnapshots(snapshot_steps(num_steps, self.snapshot_limit), self.snapshot_location,
                                   self.snapshot_dir)


def unit_groups(units, groups: str) -> list[list[int]]:
    """Unit indices of each group: one per branch type (in first-seen order), or all units (``step``)."""
    if groups == "step":
        return [[unit.index for unit in units]]
    branches = list(dict.fromkeys(unit.branch for unit in units))
    return [[unit.index for unit in units if unit.branch == branch] for branch in branches]


class GreedyPlanSearch(torch.nn.Module):
    """The search's state (buffers, so a checkpoint resumes it) and its moves.

    State: ``rank[step, group]`` (the move order, -1: still computed), ``action[step, group]``, the last measured
    score of each candidate move ``estimate[step, group or whole-step, action]`` (NaN: to measure), the current
    error and the (skipped share, error) after each move (``trace``).
    """

    def __init__(self, settings: SearchSettings, units, unit_flops: torch.Tensor, num_steps: int):
        super().__init__()
        self.settings = settings
        self.groups = unit_groups(units, settings.groups)
        self.actions = [Action[name] for name in settings.actions]
        self.num_steps, self.num_units = num_steps, len(units)
        flops = torch.as_tensor(unit_flops, dtype=torch.float64)
        self.register_buffer("unit_flops", flops, persistent=False)
        # share of the whole run's unit FLOPs one group holds at one step
        self.group_share = [float(flops[g].sum() / (flops.sum() * num_steps)) for g in self.groups]
        moves = len(self.groups) + (1 if settings.whole_steps and len(self.groups) > 1 else 0)
        self.register_buffer("rank", torch.full((num_steps, len(self.groups)), -1, dtype=torch.long))
        self.register_buffer("action", torch.zeros(num_steps, len(self.groups), dtype=torch.int8))
        self.register_buffer("estimate", torch.full((num_steps, moves, len(self.actions)), math.nan,
                                                    dtype=torch.float64))
        self.register_buffer("error", torch.zeros((), dtype=torch.float64))
        self.register_buffer("trace", torch.full((num_steps * len(self.groups) + 1, 2), math.nan,
                                                 dtype=torch.float64))
        self.register_buffer("moves", torch.zeros((), dtype=torch.long))
        self.register_buffer("evaluations", torch.zeros((), dtype=torch.long))
        # refined[R]: the refined group codes of the plan that caches the R first entries of the order (0: not
        # refined); refined_errors[R]: (error before, error after) on the calibration batch.
        entries = num_steps * len(self.groups) + 1
        self.register_buffer("refined", torch.zeros(entries, num_steps, len(self.groups), dtype=torch.int8))
        self.register_buffer("refined_errors", torch.full((entries, 2), math.nan, dtype=torch.float64))
        # R -> the adopted refined plan that refining level R starts from (refine_adopted); not a buffer: adopt()
        # derives it again on every attach, resumes included, and older checkpoints keep loading
        self._refine_start: dict[int, torch.Tensor] = {}
        self._snapshots = None  # the current plan's trajectory, rebuilt after each move (and after a resume)
        self._reference = self._validation_reference = None

    def adopt(self, router: CacheRouter) -> None:
        """Take ``router``'s move order, cheap actions and refined plans (a router this search's settings would
        have exported for the same model), so that only refinement is left to do."""
        if (router.num_steps, router.num_units) != (self.num_steps, self.num_units) or router.cheap_actions is None:
            raise ValueError(f"search.order_from must be a searched router of this model: {router.num_steps} steps x "
                             f"{router.num_units} units (with cheap actions), got {self.num_steps} x {self.num_units}.")
        first = [units[0] for units in self.groups]
        for units in self.groups:
            if not (torch.equal(router.logits[:, units], router.logits[:, units[:1]].expand(-1, len(units)))
                    and torch.equal(router.cheap_actions[:, units], router.cheap_actions[:, units[:1]].expand(-1, len(units)))):
                raise ValueError(f"search.order_from: the router's units differ within a group of search.groups="
                                 f"{self.settings.groups!r}; search with the groups it was searched with.")
        logits = router.logits.detach()[:, first].double()
        removed = logits < LOGIT_LIMIT
        order = sorted(((float(logits[s, g]), s, g) for s, g in removed.nonzero().tolist()))
        rank = torch.full_like(self.rank, -1)
        for position, (_, step, group) in enumerate(order):
            rank[step, group] = position
        self.rank.copy_(rank)
        self.action.copy_(torch.where(removed, router.cheap_actions[:, first], torch.zeros_like(self.action)))
        self.moves.fill_(len(order))
        trace = router.metadata.get("search_trace") or []
        for index, (share, error) in enumerate(trace[: self.trace.shape[0]]):
            self.trace[index] = torch.tensor([share, error], dtype=torch.float64)
        for codes in [] if router.refined_plans is None else router.refined_plans:
            share = CachePlan(codes).cached_share(self.unit_flops)
            level = next((r for r in range(1, len(order) + 1) if abs(self.plan(
                group_codes=self.group_codes(removed=r)).cached_share(self.unit_flops) - share) < 1e-9), None)
            if level is not None and self.settings.refine_adopted and share >= self.settings.refine_from - 1e-9:
                self._refine_start[level] = codes[:, first].clone()
            elif level is not None:
                self.refined[level] = codes[:, first]
                errors = [e for e in router.metadata.get("refined_errors", []) if abs(e[0] - share) < 1e-6]
                if errors:
                    self.refined_errors[level] = torch.tensor(errors[0][1:], dtype=torch.float64)

    def _apply(self, fn, recurse=True):
        """Buffers follow the module's device, never its dtype: under ``trainer.precision: bf16-true`` the scores,
        errors and unit FLOPs stay float64 (and the order stays integer)."""
        for name, buffer in self._buffers.items():
            if buffer is not None:
                self._buffers[name] = buffer.to(fn(buffer).device)
        return self

    # ---- plans -------------------------------------------------------------------------------------------
    def group_codes(self, rank=None, action=None, removed: int | None = None) -> torch.Tensor:
        """Action codes ``[num_steps, num_groups]``: the entries the order caches (its ``removed`` first ones, or
        all so far) take their action, the others COMPUTE."""
        rank = (self.rank if rank is None else rank).cpu()
        action = (self.action if action is None else action).cpu()
        cached = (rank >= 0) if removed is None else (rank >= 0) & (rank < removed)
        return torch.where(cached, action, torch.full_like(action, int(Action.COMPUTE)))

    def codes(self, rank=None, action=None, group_codes=None) -> torch.Tensor:
        """Unit-level action codes ``[num_steps, num_units]`` of the order so far (or of ``group_codes``)."""
        group_codes = self.group_codes(rank, action) if group_codes is None else group_codes
        codes = torch.empty((self.num_steps, self.num_units), dtype=torch.int8)
        for index, units in enumerate(self.groups):
            codes[:, units] = group_codes[:, index, None]
        return codes

    def plan(self, rank=None, action=None, group_codes=None) -> CachePlan:
        return plan_with_fallbacks(self.codes(rank, action, group_codes))

    def skipped_share(self, rank=None, action=None) -> float:
        return self.plan(rank, action).cached_share(self.unit_flops)

    @property
    def ordered(self) -> bool:
        """The greedy order is complete: it reached ``max_flops``, or nothing is left to cache."""
        return self.skipped_share() >= self.settings.max_flops - 1e-9 or not self._candidates()

    @property
    def done(self) -> bool:
        return self.ordered and not self._levels_to_refine()

    def _levels_to_refine(self) -> list[int]:
        """The R (entries of the order cached) of the budgets still to refine, coarsest first."""
        if self.settings.refine_from is None:
            return []
        total = int((self.rank >= 0).sum())
        return [removed for removed in range(total, 0, -1) if not bool(self.refined[removed].any())
                and self.plan(group_codes=self.group_codes(removed=removed)).cached_share(self.unit_flops)
                >= self.settings.refine_from - 1e-9]

    def _candidates(self) -> list[tuple[int, int, int]]:
        """(step, move, action index) of every move still possible; move ``len(groups)`` is the whole step."""
        found = []
        for step in range(1, self.num_steps):
            left = [g for g in range(len(self.groups)) if self.rank[step, g] < 0]
            moves = list(left)
            if len(left) > 1 and self.estimate.shape[1] > len(self.groups):
                moves.append(len(self.groups))
            found += [(step, move, a) for move in moves for a in range(len(self.actions))]
        return found

    def _with_move(self, step: int, move: int, action_index: int):
        """Rank and action tensors with the move made (not stored)."""
        rank, action = self.rank.clone(), self.action.clone()
        targets = [move] if move < len(self.groups) else [g for g in range(len(self.groups)) if rank[step, g] < 0]
        start = int(self.rank.max()) + 1
        for offset, group in enumerate(targets):
            rank[step, group] = start + offset
            action[step, group] = int(self.actions[action_index])
        return rank, action

    # ---- one move ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def move(self, runner: "TrajectoryRunner", validation: "TrajectoryRunner | None" = None) -> dict:
        """Measure the candidates this round needs, make the best move (or, once the order is complete, refine
        one budget, each change checked on ``validation`` if given); returns what happened."""
        if self._reference is None:
            self._reference = runner.final_latents(CachePlan.full(self.num_steps, self.num_units))
            self.release_snapshots()
        if self.ordered:
            self.release_snapshots()  # refinement records the plans it refines
            return self._refine_next(runner, validation)
        if self._snapshots is None:
            self._record(runner)
            if int(self.moves) == 0:
                self.trace[0] = torch.tensor([0.0, float(self.error)], dtype=torch.float64)
        candidates = self._candidates()
        base_share = self.skipped_share()
        fresh = {}

        def measure(candidate):
            rank, action = self._with_move(*candidate)
            plan = self.plan(rank, action)
            final = runner.final_latents(plan, start=candidate[0], snapshots=self._snapshots)
            self.evaluations += 1
            saved = plan.cached_share(self.unit_flops) - base_share
            fresh[candidate] = (runner.error(final, self._reference) - float(self.error)) / max(saved, 1e-9)
            self.estimate[candidate] = fresh[candidate]

        # Moves never measured (the first round; the whole-step move at the step of the last move): their first action, whose score
        # the other actions start from. Then the few best-scoring candidates, measured on the current plan.
        unmeasured = sorted({(s, m) for s, m, _ in candidates if math.isnan(float(self.estimate[s, m].max()))})
        whole = len(self.groups) if self.estimate.shape[1] > len(self.groups) else None
        for step, move in unmeasured:
            if move != whole and (step, whole) in unmeasured:
                continue  # whole steps first: its group moves start from the whole step's score per FLOP
            measure((step, move, 0))
            targets = [move] if move != whole else range(self.estimate.shape[1])
            for target in targets:
                scores = self.estimate[step, target]
                self.estimate[step, target] = torch.where(torch.isnan(scores), fresh[(step, move, 0)], scores)
        # Lazy greedy: measure in the order of the stale scores until the best fresh score beats the next stale
        # one (at least lazy_candidates, at most 4x as many), so a move whose score went stale is not taken blind.
        ranked = sorted((c for c in candidates if c not in fresh), key=lambda c: float(self.estimate[c]))
        least, most = self.settings.lazy_candidates, 4 * self.settings.lazy_candidates
        for count, candidate in enumerate(ranked):
            if count >= most or (count >= least and min(fresh.values()) <= float(self.estimate[candidate])):
                break
            measure(candidate)
        best = min(fresh, key=fresh.get)
        step, move_index, action_index = best
        self.rank, self.action = self._with_move(*best)
        self.moves += 1
        # The whole-step move of that step now caches fewer groups: measure it again. (The other moves at that
        # step keep their stale scores, as every other candidate: lazy greedy measures them again when they rank
        # among the best.)
        if self.estimate.shape[1] > len(self.groups):
            self.estimate[step, len(self.groups)] = math.nan
        self._record(runner, start=step)
        share = self.skipped_share()
        self.trace[int(self.moves)] = torch.tensor([share, float(self.error)], dtype=torch.float64)
        return {"moved": True, "step": step, "move": move_index, "action": self.actions[action_index].name,
                "share": share, "error": float(self.error), "measured": len(fresh)}

    def _record(self, runner: "TrajectoryRunner", start: int | None = None) -> None:
        """Sample the current plan, keeping its snapshots. ``start``: the step of the move just made; the old
        plan's snapshots up to it are the new plan's too and the run starts there (None: the old set is freed
        first and the run starts from the noise; never two sets at once either way)."""
        if start is None or self._snapshots is None:
            self.release_snapshots()
            final, self._snapshots = runner.recorded(self.plan(), self.settings.snapshots(self.num_steps))
        else:
            final, self._snapshots = runner.recorded(self.plan(), self._snapshots, start=start)
        self.error.fill_(runner.error(final, self._reference))

    def release_snapshots(self) -> None:
        if self._snapshots is not None:
            self._snapshots.close()
        self._snapshots = None

    # ---- refinement ------------------------------------------------------------------------------------------
    def _neighbours(self, codes: torch.Tensor):
        """(start step, codes) of every change refinement tries: a computed entry moved up to ``refine_radius``
        steps (the entry it swaps with keeps its action), with ``refine_together: 2`` also two computed entries of
        a group moved at once, or a cached entry switched to another action of the same cost; all keep the
        skipped share."""
        compute = int(Action.COMPUTE)
        for group in range(codes.shape[1]):
            computed = [step for step in range(1, self.num_steps) if int(codes[step, group]) == compute]
            moves = {step: self._moves_of(codes, group, step) for step in computed}
            for step in computed:
                for other in moves[step]:
                    yield min(step, other), self._swapped(codes, group, [(step, other)])
            if self.settings.refine_together == 2:
                for first, second in itertools.combinations(computed, 2):
                    for one, two in itertools.product(moves[first], moves[second]):
                        if one != two:
                            yield min(first, second, one, two), self._swapped(codes, group, [(first, one),
                                                                                            (second, two)])
            for step in range(1, self.num_steps):
                code = int(codes[step, group])
                if code == compute:
                    continue
                for action in self.actions:
                    if int(action) != code and ACTION_COST[action] == ACTION_COST[Action(code)]:
                        switched = codes.clone()
                        switched[step, group] = int(action)
                        yield step, switched

    def _moves_of(self, codes: torch.Tensor, group: int, step: int) -> list[int]:
        """The cached steps within ``refine_radius`` of computed ``step`` that it may move to."""
        radius, compute = self.settings.refine_radius, int(Action.COMPUTE)
        return [other for other in range(max(1, step - radius), min(self.num_steps, step + radius + 1))
                if int(codes[other, group]) != compute]

    @staticmethod
    def _swapped(codes: torch.Tensor, group: int, moves: list[tuple[int, int]]) -> torch.Tensor:
        """``codes`` with each computed entry ``(step, to)`` moved to ``to``, whose action goes to ``step``."""
        moved = codes.clone()
        for step, to in moves:
            moved[step, group], moved[to, group] = codes[to, group], int(Action.COMPUTE)
        return moved

    def _refine_next(self, runner: "TrajectoryRunner", validation: "TrajectoryRunner | None" = None) -> dict:
        """Refine the coarsest budget not refined yet: best improving change, up to ``refine_moves`` times; with
        ``validation``, a change that does not lower the validation error too ends it (and is not made)."""
        levels = self._levels_to_refine()
        if not levels:
            return {"moved": False}
        removed = levels[0]
        codes = self._refine_start[removed].clone() if removed in self._refine_start \
            else self.group_codes(removed=removed)
        final, snapshots = runner.recorded(self.plan(group_codes=codes), self.settings.snapshots(self.num_steps))
        before = error = runner.error(final, self._reference)
        held_out = None  # the validation error of the current plan, measured once a change needs checking
        changes = 0
        for _ in range(self.settings.refine_moves):
            best, current = None, self.plan(group_codes=codes)
            for start, candidate in self._neighbours(codes):
                plan = self.plan(group_codes=candidate)
                if plan == current:
                    continue  # a switch to a forecast its unit lacks the history for: it falls back, nothing changes
                final = runner.final_latents(plan, start=start, snapshots=snapshots)
                self.evaluations += 1
                measured = runner.error(final, self._reference)
                if measured < (error if best is None else best[0]):
                    best = (measured, candidate)
            if best is None:
                break
            if validation is not None:
                if held_out is None:
                    held_out = self._validation_error(validation, codes)
                checked = self._validation_error(validation, best[1])
                if checked >= held_out:
                    break
                held_out = checked
            error, codes = best
            changes += 1
            snapshots.close()
            final, snapshots = runner.recorded(self.plan(group_codes=codes), self.settings.snapshots(self.num_steps))
        snapshots.close()
        self.refined[removed] = codes
        self.refined_errors[removed] = torch.tensor([before, error], dtype=torch.float64)
        share = self.plan(group_codes=codes).cached_share(self.unit_flops)
        return {"moved": False, "refined": share, "error": error, "error_before": before, "changes": changes,
                "summary": f"refined the {share:.1%} plan: {self.settings.error_label} {before:.3g} -> {error:.3g} "
                           f"({changes} changes)"}

    def _validation_error(self, validation: "TrajectoryRunner", codes: torch.Tensor) -> float:
        if self._validation_reference is None:
            self._validation_reference = validation.final_latents(CachePlan.full(self.num_steps, self.num_units))
        return validation.error(validation.final_latents(self.plan(group_codes=codes)), self._validation_reference)

    # ---- export ------------------------------------------------------------------------------------------
    def router(self, metadata: dict | None = None) -> CacheRouter:
        """The move order as a router: removed entries get logits in [-4.5, -0.5] by order, the others +5."""
        default = torch.get_default_dtype()
        torch.set_default_dtype(torch.float32)  # bf16-true sets a bf16 default: the router file stays float32
        try:
            return self._router(metadata)
        finally:
            torch.set_default_dtype(default)

    def _router(self, metadata: dict | None) -> CacheRouter:
        removed = self.rank >= 0
        count = max(int(self.rank.max()) + 1, 1)
        group_logits = torch.where(removed, -4.5 + 4.0 * self.rank.double() / count,
                                   torch.full_like(self.rank, LOGIT_LIMIT, dtype=torch.float64))
        logits = torch.zeros(self.num_steps, self.num_units)
        actions = torch.full((self.num_steps, self.num_units), int(Action.REUSE), dtype=torch.int8)
        for index, units in enumerate(self.groups):
            logits[:, units] = group_logits[:, index, None].float()
            actions[:, units] = torch.where(removed[:, index], self.action[:, index],
                                            torch.full_like(self.action[:, index], int(Action.REUSE)))[:, None]
        reached = self.skipped_share()
        info = {**(metadata or {}), "flops_range": [0.0, reached],
                "search_trace": [[round(float(s), 6), float(e)] for s, e in self.trace[: int(self.moves) + 1]],
                "search_evaluations": int(self.evaluations)}
        levels = [removed for removed in range(self.refined.shape[0]) if bool(self.refined[removed].any())]
        refined = None
        if levels:
            refined = torch.stack([self.plan(group_codes=self.refined[r]).actions for r in levels])
            info["refined_errors"] = [[round(self.plan(group_codes=self.refined[r]).cached_share(self.unit_flops), 6),
                                       *map(float, self.refined_errors[r])] for r in levels]
        router = CacheRouter(self.num_steps, self.num_units, metadata=info, cheap_actions=actions,
                             unit_flops=self.unit_flops.cpu(), refined_plans=refined)
        with torch.no_grad():
            router.logits.copy_(logits)
        default = self.settings.default_flops
        router.threshold = router.threshold_for_flops(reached if default is None else min(default, reached))
        return router


class TrajectoryRunner:
    """Sampling runs of one calibration batch under a plan, on the engine-level state of a cache handle; every unit
    keeps at least ``history`` computed outputs (what the search's cheap actions read)."""

    def __init__(self, denoiser, scheduler, handle: CacheHandle, noise: torch.Tensor, conditioning,
                 num_steps: int, history: int = 3, settings: SearchSettings | None = None):
        from .denoising import fresh_scheduler

        self.denoiser, self.handle, self.noise, self.conditioning = denoiser, handle, noise, conditioning
        self.num_steps, self.history = num_steps, history
        self.scheduler = fresh_scheduler(scheduler, num_steps, noise.device)
        self.settings = settings or SearchSettings()

    def error(self, final: torch.Tensor, reference: torch.Tensor) -> float:
        """The search's score of ``final`` against ``reference`` (``SearchSettings.error``)."""
        return self.settings.final_error(final, reference)

    @torch.no_grad()
    def _run(self, plan: CachePlan, snapshot=None, record: TrajectorySnapshots | None = None) -> torch.Tensor:
        handle = self.handle
        handle.set_plan(PreparedPlan(plan, self.history))  # every cache context's state (two-call CFG has two)
        if snapshot is None:
            scheduler, latents, first = copy.deepcopy(self.scheduler), self.noise * init_noise_sigma(self.scheduler), 0
        else:
            handle.restore(snapshot.cache)
            scheduler, latents, first = snapshot.scheduler, snapshot.latents, snapshot.step
        recorded_from = first if snapshot is None else first + 1  # a restart's own snapshot is recorded already
        for index in range(first, self.num_steps):
            t = scheduler.timesteps[index]
            if record is not None and index >= recorded_from and index in record.steps:
                record.add(index, latents, scheduler, handle.snapshot())
            output = self.denoiser(scale_model_input(scheduler, latents, t), t, self.conditioning)
            latents = scheduler.step(output, t, latents).prev_sample
        handle.reset()
        return latents

    def final_latents(self, plan: CachePlan, start: int = 0, snapshots: TrajectorySnapshots | None = None):
        """Final latents of ``plan``, which departs from the trajectory recorded in ``snapshots`` at step ``start``:
        restarted from the latest snapshot at or before it (none: from the noise)."""
        snapshot = snapshots.latest(start, self.noise.device) if snapshots is not None and start > 0 else None
        return self._run(plan, snapshot)

    def recorded(self, plan: CachePlan, snapshots: TrajectorySnapshots | None = None, start: int = 0):
        """Final latents, and ``snapshots`` (default: one before every step after the first, in memory) filled.

        ``start``: ``snapshots`` holds the trajectory of a plan that ``plan`` follows up to step ``start``; its
        snapshots up to there are kept and the run starts from the latest of them (none: from the noise)."""
        snapshots = TrajectorySnapshots(range(1, self.num_steps)) if snapshots is None else snapshots
        snapshots.truncate(start)
        restart = snapshots.latest(start, self.noise.device) if start > 0 else None
        return self._run(plan, snapshot=restart, record=snapshots), snapshots
