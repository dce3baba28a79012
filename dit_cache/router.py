"""``CacheRouter``: learned per-(step, unit) cache decisions (Learning-to-Cache / HarmoniCa)."""

from __future__ import annotations

import copy
import json
import math
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from .actions import ACTION_COST, ROUTER_CHOICES, Action
from .deprecation import skip_flops_argument
from .file_checks import FileChecker
from .plan import CachePlan
from .schedule import CacheSchedule, check_unit_weights

ROUTER_FORMAT = "dit-cache/router"
LOGIT_LIMIT = 5.0
DEFAULT_THRESHOLD = 0.1
# Cheap actions a router may assign to the entries it does not compute; a FORECAST falls back to a lower order,
# then to REUSE, where its unit has not computed often enough yet (see ``plan_with_fallbacks``).
CHEAP_ACTIONS = ROUTER_CHOICES  # what a router may choose for a skipped entry (dit_cache.actions.ACTIONS)
BUDGET_TOLERANCE = 0.01


class CacheRouter(torch.nn.Module):
    """Input-independent logits ``[num_steps, num_units]``; ``sigmoid(logit) > threshold`` computes the unit.

    Rows in ``fixed_rows`` (always the first step, whose cache is empty) are pinned to +5 and get no gradient.

    Example::

        router = CacheRouter.load(dit_cache.embedded_router_path())
        schedule = router.schedule()            # hard decisions at the trained threshold
        print(schedule.cache_ratio)
        plan = router.plan(skip_flops=0.55)     # a router with a searched budget range: 55% of unit FLOPs skipped
        print(plan.cached_share(router.unit_flops))

    Optional parts (routers from ``objective: search``): ``cheap_actions`` ``[num_steps, num_units]``, the
    :class:`Action` each entry takes where it does not compute (default REUSE); ``unit_flops`` ``[num_units]``,
    what ``flops=`` budgets are counted in; metadata ``flops_range`` ``[low, high]``, the budgets it serves;
    ``refined_plans`` ``[K, num_steps, num_units]``, action codes of plans the search improved at single budgets,
    each replacing the nested plan (the threshold's) that skips the same share; ``refined_weights``
    ``[K, num_steps, num_units, W]``, the LINEAR weights of those plans (where one has LINEAR entries: forecast
    weights learned end to end, ``training/forecast_weights.py``, merged by :meth:`with_learned_forecasts`).
    """

    def __init__(self, num_steps: int, num_units: int, *, threshold: float = DEFAULT_THRESHOLD,
                 fixed_rows: torch.Tensor | None = None, metadata: dict | None = None, generator=None,
                 cheap_actions: torch.Tensor | None = None, unit_flops: torch.Tensor | None = None,
                 refined_plans: torch.Tensor | None = None, refined_weights: torch.Tensor | None = None):
        super().__init__()
        if num_steps < 1 or num_units < 1:
            raise ValueError(f"A router needs num_steps >= 1 and num_units >= 1, got {num_steps} and {num_units}.")
        if fixed_rows is not None and tuple(fixed_rows.shape) != (num_steps,):
            raise ValueError(f"fixed_rows must hold one flag per step, shape ({num_steps},); "
                             f"got shape {tuple(fixed_rows.shape)}.")
        fixed = torch.zeros(num_steps, dtype=torch.bool) if fixed_rows is None else fixed_rows.clone().bool()
        fixed[0] = True
        self.register_buffer("fixed_rows", fixed)
        self.logits = torch.nn.Parameter(torch.randn(num_steps, num_units, generator=generator))
        self.threshold = threshold
        self.metadata = dict(metadata or {})
        # Plain attributes, not buffers: RouterModule checkpoints of routers without them keep loading.
        self.cheap_actions = _checked_actions(cheap_actions, num_steps, num_units)
        self.unit_flops = None if unit_flops is None else check_unit_weights(unit_flops, num_units)
        self.refined_plans, self.refined_weights = self._checked_refined_plans(refined_plans, refined_weights)
        self.clamp_()

    @property
    def threshold(self) -> float:
        """tau: a unit computes where its score is above it; in (0, 1), since scores are sigmoids."""
        return self._threshold

    @threshold.setter
    def threshold(self, value: float) -> None:
        self._threshold = check_threshold(value)

    @property
    def num_steps(self) -> int:
        return self.logits.shape[0]

    @property
    def num_units(self) -> int:
        return self.logits.shape[1]

    def scores(self) -> torch.Tensor:
        """Soft scores in (0, 1); fixed rows read as +5 whatever their stored value, so they get no gradient."""
        pinned = torch.full_like(self.logits, LOGIT_LIMIT)
        return torch.sigmoid(torch.where(self.fixed_rows[:, None], pinned, self.logits))

    @torch.no_grad()
    def clamp_(self) -> None:
        self.logits.clamp_(-LOGIT_LIMIT, LOGIT_LIMIT)
        self.logits[self.fixed_rows] = LOGIT_LIMIT

    def schedule(self, threshold: float | None = None) -> CacheSchedule:
        threshold = self.threshold if threshold is None else check_threshold(threshold)
        if not bool(torch.isfinite(self.logits).all()):  # NaN > tau is False: every unit would silently cache
            raise ValueError("The router's logits are not all finite (NaN or inf); retrain it, e.g. with a lower "
                             "learning rate.")
        mask = self.scores().detach().cpu() > threshold
        mask[self.fixed_rows.cpu()] = True  # pinned rows compute whatever the threshold
        return CacheSchedule(mask)

    def plan(self, threshold: float | None = None, *, skip_flops: float | None = None,
             flops: float | None = None) -> CachePlan:
        """The hard decisions as a :class:`CachePlan`: computed entries COMPUTE, the others take their cheap action
        (REUSE for routers without ``cheap_actions``, so ``plan() == CachePlan.from_schedule(schedule())``).

        ``skip_flops``: the share of the units' FLOPs to skip (counted with the router's ``unit_flops``), for routers
        that serve a range of budgets (metadata ``flops_range``); the threshold is then chosen for it. A FORECAST
        entry whose unit has not computed often enough at that budget falls back to REUSE.
        """
        flops = skip_flops_argument(skip_flops, flops, "CacheRouter.plan")  # flops=: the old name
        if threshold is not None and flops is not None:
            raise ValueError("Pass threshold= or skip_flops=, not both: skip_flops= chooses the threshold.")
        if flops is not None:
            threshold = self.threshold_for_flops(flops)
        mask = self.schedule(threshold).mask
        if self.cheap_actions is None:
            return CachePlan.from_schedule(CacheSchedule(mask))
        nested = plan_with_fallbacks(torch.where(mask, int(Action.COMPUTE), self.cheap_actions))
        if self.refined_plans is not None:
            share = nested.cached_share(self.unit_flops)
            for index, replaces in enumerate(self.refined_shares):
                if abs(replaces - share) < 1e-9:
                    return self.refined_plan(index)
        return nested

    def refined_plan(self, index: int) -> CachePlan:
        """Refined plan ``index`` (its LINEAR weights with it, where it has them)."""
        weights = None if self.refined_weights is None else self.refined_weights[index]
        codes = self.refined_plans[index]
        return CachePlan(codes, weights if bool((codes == Action.LINEAR).any()) else None)

    def _checked_refined_plans(self, plans, weights=None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if plans is None:
            if weights is not None:
                raise ValueError("refined_weights need the refined_plans they belong to.")
            self.refined_shares = []
            return None, None
        plans = torch.as_tensor(plans)
        if plans.ndim != 3 or tuple(plans.shape[1:]) != (self.num_steps, self.num_units) or plans.is_floating_point():
            raise ValueError(f"refined_plans must be integer Action codes of shape (K, {self.num_steps}, "
                             f"{self.num_units}), got {plans.dtype} {tuple(plans.shape)}.")
        if self.unit_flops is None or self.cheap_actions is None:
            raise ValueError("refined_plans need the router's unit_flops and cheap_actions (a searched router): "
                             "they replace its nested plan at the same FLOP share.")
        if weights is not None:
            weights = torch.as_tensor(weights, dtype=torch.float32)
            if weights.ndim != 4 or tuple(weights.shape[:3]) != tuple(plans.shape):
                raise ValueError(f"refined_weights must be LINEAR weights of shape ({len(plans)}, {self.num_steps}, "
                                 f"{self.num_units}, W), one per refined plan; got {tuple(weights.shape)}.")
            weights = weights.cpu().clone()
        checked = []
        for index, codes in enumerate(plans):
            linear = bool((codes == Action.LINEAR).any())
            try:  # refuses unknown codes, forecasts without the history they need, LINEAR without weights
                checked.append(CachePlan(codes, weights[index] if linear and weights is not None else None))
            except (TypeError, ValueError) as error:
                raise ValueError(f"refined_plans[{index}]: {error}") from None
        plans = plans.to(torch.int8).cpu().clone()
        # Which nested plan each refined plan replaces, by that plan's FLOP share (a share is one threshold level:
        # every level skips more). A searched router's refined plans skip the very share they replace; a
        # resampled one's may not, so it stores the shares (metadata 'refined_shares').
        shares = self.metadata.get("refined_shares")
        if shares is None:
            shares = [plan.cached_share(self.unit_flops) for plan in checked]
        elif len(shares) != len(plans):
            raise ValueError(f"metadata 'refined_shares' holds {len(shares)} shares for {len(plans)} refined plans "
                             "(one each expected).")
        self.refined_shares = [float(share) for share in shares]
        return plans, weights

    @property
    def flops_range(self) -> tuple[float, float] | None:
        """The budgets (shares of the units' FLOPs skipped) this router serves, or None (one budget)."""
        low_high = self.metadata.get("flops_range")
        return None if low_high is None else (float(low_high[0]), float(low_high[1]))

    def threshold_for_flops(self, flops: float) -> float:
        """The threshold whose plan skips the share ``flops`` of the units' FLOPs most closely.

        Entries with equal scores (a search removes a whole branch group at once) are cached together, so every
        budget gives one of the plans the router was built from."""
        span = self.flops_range
        if span is None or self.unit_flops is None:
            raise ValueError("This router serves one budget (its threshold, "
                             f"{self.threshold:.4g}); flops= needs a router with a searched budget range "
                             "(dit-cache-train fit --config training/configs/embedded_search.yaml). "
                             "Pass threshold= instead, or calibrate_threshold(target, unit_weights=...).")
        try:
            flops = float(flops)
        except (TypeError, ValueError):
            raise ValueError(f"flops must be a number (the share of FLOPs to skip), got {flops!r}.") from None
        if not span[0] - BUDGET_TOLERANCE <= flops <= span[1] + BUDGET_TOLERANCE:  # also refuses NaN
            raise ValueError(f"flops={flops} is outside the budgets this router was searched for: it skips "
                             f"{span[0]:.0%} to {span[1]:.0%} of the units' FLOPs. Ask for a share in that range, "
                             "or search a router for a wider one (search.max_flops).")
        levels, share = self._budget_levels()
        return _level_threshold(levels, int((share - flops).abs().argmin()))

    def _budget_levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(levels, shares): the distinct scores of the trainable entries, ascending, and the FLOP share skipped
        by the plan that caches the ``c`` lowest levels, ``c = 0 .. len(levels)`` (a refined plan's own share where
        it replaces that level's nested plan)."""
        if not bool(torch.isfinite(self.logits).all()):
            raise ValueError("The router's logits are not all finite (NaN or inf); retrain it.")
        trainable = ~self.fixed_rows.cpu()
        scores = self.scores().detach().cpu().double()[trainable]
        actions = (torch.full_like(scores, int(Action.REUSE), dtype=torch.int8) if self.cheap_actions is None
                   else self.cheap_actions[trainable])
        saving = torch.tensor([1.0 - ACTION_COST[Action(int(a))] for a in actions.flatten()],
                              dtype=torch.float64).view_as(scores)
        saved = saving * self.unit_flops.expand_as(scores)
        levels = scores.unique(sorted=True)
        per_level = torch.stack([saved[scores == level].sum() for level in levels])
        share = torch.cat([torch.zeros(1, dtype=torch.float64), per_level.cumsum(0)])
        share = share / (self.unit_flops.sum() * self.num_steps)
        if self.refined_plans is not None:
            for index, replaces in enumerate(self.refined_shares):
                # the nested plan of a level is its cut with FORECAST fallbacks: same costs, so the same share
                close = (share - replaces).abs() < 1e-9
                share[close] = self.refined_plan(index).cached_share(self.unit_flops)
        return levels, share

    @torch.no_grad()
    def calibrate_threshold(self, target_cache_ratio: float, unit_weights: torch.Tensor | None = None) -> float:
        """Move the threshold so the hard schedule's CUR is as close to the target as the scores allow.

        With ``unit_weights`` (e.g. the per-unit FLOPs of :func:`dit_cache.flops.unit_flops`) a cached unit counts
        by its weight, so the target is the share of the units' work that is skipped rather than of their number.
        """
        if not 0.0 <= target_cache_ratio <= 1.0:  # also refuses NaN
            raise ValueError(f"target_cache_ratio must be in [0, 1], got {target_cache_ratio}.")
        weights = check_unit_weights(unit_weights, self.num_units)
        trainable = self.scores().detach().cpu()[~self.fixed_rows.cpu()]  # (rows, units); fixed rows always compute
        scores, order = trainable.flatten().sort()
        cached_weight = weights.expand_as(trainable).flatten()[order].cumsum(0)
        # share skipped when the k lowest scores are cached, k = 0 .. all trainable entries
        share = torch.cat([torch.zeros(1, dtype=torch.float64), cached_weight]) / (weights.sum() * self.num_steps)
        cached = int((share - target_cache_ratio).abs().argmin())
        if cached == 0:
            self.threshold = float(scores[0]) / 2
        elif cached == scores.numel():
            self.threshold = (float(scores[-1]) + 1.0) / 2
        else:
            self.threshold = (float(scores[cached - 1]) + float(scores[cached])) / 2
        return self.threshold

    def resample(self, num_steps: int) -> "CacheRouter":
        """The same router mapped to another step count by relative position in the trajectory (opt-in).

        Everything per step is mapped with the rows (logits, fixed rows, cheap actions, refined plans); the FLOP
        weights are per unit and kept; the budget range becomes the part of the old one the new router reaches.
        A refined plan whose budget level has no step left at the new count (going down) cannot be mapped: it is
        dropped with a warning, and that budget gets the nearest nested plan. The same step count gives an exact
        copy."""
        if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
            raise ValueError(f"resample needs a whole number of steps >= 1, got {num_steps!r}.")
        if num_steps == self.num_steps:
            return copy.deepcopy(self)
        source = torch.linspace(0, 1, self.num_steps)
        target = torch.linspace(0, 1, num_steps)
        rows = (target[:, None] - source[None, :]).abs().argmin(dim=1)
        metadata = {**self.metadata, "resampled_from_steps": self.metadata.get("resampled_from_steps",
                                                                                 self.num_steps)}
        for key in ("refined_shares", "flops_range"):
            metadata.pop(key, None)
        if "num_steps" in metadata:
            metadata["num_steps"] = num_steps
        resampled = CacheRouter(num_steps, self.num_units, threshold=self.threshold,
                                fixed_rows=self.fixed_rows.cpu()[rows], metadata=metadata,
                                cheap_actions=None if self.cheap_actions is None else self.cheap_actions[rows],
                                unit_flops=self.unit_flops)
        with torch.no_grad():
            resampled.logits.copy_(self.logits.detach()[rows])
            resampled.clamp_()
        if self.refined_plans is not None:
            resampled._map_refined_plans(self, rows)
        if self.flops_range is not None:
            low, high = self.flops_range
            reached = resampled._budget_levels()[1]
            resampled.metadata["flops_range"] = [max(low, float(reached.min())), min(high, float(reached.max()))]
        return resampled

    def _map_refined_plans(self, original: "CacheRouter", rows: torch.Tensor) -> None:
        """Each of ``original``'s refined plans with its rows mapped, replacing this router's nested plan at the
        same threshold level (scores are mapped with the rows, so a level is the same score interval)."""
        levels, shares = original._budget_levels()
        nested_shares = shares.clone()
        kept, replaced, dropped = [], [], []
        for codes, replaces in zip(original.refined_plans, original.refined_shares):
            cached = int((nested_shares - replaces).abs().argmin())  # the level this refined plan replaces
            below, at = _level_threshold(levels, cached - 1), _level_threshold(levels, cached)
            here, under = self.plan(at), self.plan(below)
            # LINEAR weights were learned for the original steps' timesteps and gaps: they do not map
            if cached == 0 or torch.equal(here.actions, under.actions) or bool((codes == Action.LINEAR).any()):
                dropped.append(round(replaces, 4))
                continue
            kept.append(plan_with_fallbacks(codes[rows]).actions)
            replaced.append(here.cached_share(self.unit_flops))
        if dropped:
            warnings.warn(f"Resampling to {self.num_steps} steps drops the refined plans skipping {dropped} of the "
                          "FLOPs (no step of their budget level is left, or they hold learned LINEAR weights, "
                          "which belong to the original timesteps); those budgets get the nearest nested plan. "
                          "Search a router for this step count for refined plans at it.",
                          stacklevel=3)
        if kept:
            self.metadata["refined_shares"] = replaced
            self.refined_plans, self.refined_weights = self._checked_refined_plans(torch.stack(kept))

    def with_refined_plans(self, source: "CacheRouter", shares) -> "CacheRouter":
        """A copy whose plans at the FLOP shares ``shares`` are ``source``'s refined plans there, replacing this
        router's plan at each (refined or nested); the other budgets keep this router's plans.

        ``source`` must share this router's order (logits, fixed rows, cheap actions, unit FLOPs), as a search
        with ``search.order_from`` of this router exports it, so that each budget is one level of both. E.g. keep
        only the budgets another refinement improved on held-out seeds::

            merged = shipped.with_refined_plans(CacheRouter.load("runs/.../router.safetensors"), [0.65, 0.7])
        """
        same = (self.num_steps, self.num_units) == (source.num_steps, source.num_units) and all(
            mine is not None and theirs is not None and torch.equal(mine.cpu(), theirs.cpu())
            for mine, theirs in ((self.logits.detach(), source.logits.detach()), (self.fixed_rows, source.fixed_rows),
                                 (self.cheap_actions, source.cheap_actions), (self.unit_flops, source.unit_flops)))
        if not same:
            raise ValueError("with_refined_plans needs a source router with this router's order (logits, fixed rows, "
                             "cheap actions and unit FLOPs equal): one searched with search.order_from set to "
                             "this router's file.")
        offered = [] if source.refined_plans is None else [(share, source.refined_plan(i))
                                                           for i, share in enumerate(source.refined_shares)]
        taken = []
        for share in shares:
            match = [(s, plan) for s, plan in offered if abs(s - float(share)) < 1e-6]
            if not match:
                raise ValueError(f"The source router has no refined plan at {share} of the FLOPs skipped; it has "
                                 f"them at {[round(s, 6) for s, _ in offered]}.")
            taken.append(match[0])
        own = [] if self.refined_plans is None else [(share, self.refined_plan(i))
                                                     for i, share in enumerate(self.refined_shares)]
        kept = [(s, plan) for s, plan in own if all(abs(s - t) >= 1e-6 for t, _ in taken)]
        plans = sorted(kept + taken, key=lambda entry: entry[0])
        metadata = copy.deepcopy(self.metadata)
        metadata["refined_shares"] = [float(s) for s, _ in plans]
        errors = {round(e[0], 6): e for e in metadata.get("refined_errors", [])}
        for share, _ in taken:
            errors.pop(round(share, 6), None)
            errors.update({round(e[0], 6): e for e in source.metadata.get("refined_errors", [])
                           if abs(e[0] - share) < 1e-6})
        metadata["refined_errors"] = [errors[key] for key in sorted(errors)]
        metadata.setdefault("refined_plans_from", []).append(
            {"shares": [round(float(s), 6) for s, _ in taken], "search": source.metadata.get("search")})
        return self._with_plans(plans, metadata)

    def with_plans(self, plans, provenance_key: str = "replaced_plans", **provenance) -> "CacheRouter":
        """A copy whose plan at each of ``plans``' budgets is that plan: any plan skipping the FLOP share of one of
        this router's budget levels replaces the plan there (nested or refined), e.g. one a wider enumeration of
        its computed steps found better on held-out seeds; the other budgets keep this router's plans.
        ``provenance`` is recorded in the metadata under ``provenance_key``, with the shares replaced."""
        # (the nested share it replaces, plan) per refined plan, the new ones taking the place of the plan skipping
        # their share
        entries = [(share, self.refined_plan(i)) for i, share in enumerate(self.refined_shares)]
        _, levels = self._budget_levels()
        for plan in plans:
            if (plan.num_steps, plan.num_units) != (self.num_steps, self.num_units):
                raise ValueError(f"A plan of {plan.num_steps} steps x {plan.num_units} units cannot replace a plan of "
                                 f"this router ({self.num_steps} x {self.num_units}).")
            share = plan.cached_share(self.unit_flops)
            if not bool(((levels - share).abs() < 1e-9).any()):
                raise ValueError(f"A plan skipping {share:.4f} of the FLOPs matches none of this router's budget "
                                 "levels (router.plan(skip_flops=...)): it can only replace a plan skipping as much.")
            own = self.plan(skip_flops=share)
            refined = [i for i, (_, entry) in enumerate(entries) if torch.equal(entry.actions, own.actions)]
            if refined:
                entries[refined[0]] = (entries[refined[0]][0], plan)
            else:
                entries.append((share, plan))
        entries.sort(key=lambda entry: entry[0])
        metadata = copy.deepcopy(self.metadata)
        metadata["refined_shares"] = [float(share) for share, _ in entries]
        metadata.setdefault(provenance_key, []).append(
            {"shares": sorted(round(plan.cached_share(self.unit_flops), 6) for plan in plans), **provenance})
        return self._with_plans(entries, metadata)

    def with_learned_forecasts(self, plans, **provenance) -> "CacheRouter":
        """A copy whose plan at each of ``plans``' budgets is that plan: the same computed entries as this router's
        plan skipping the same share, with skipped entries forecast by learned LINEAR weights
        (``training/forecast_weights.fit_forecast_weights``). ``provenance`` is recorded in the metadata
        (``learned_forecasts``: how the weights were fitted)."""
        for plan in plans:
            share = plan.cached_share(self.unit_flops)
            own = self.plan(skip_flops=share)
            if (abs(own.cached_share(self.unit_flops) - share) > 1e-9
                    or not torch.equal(plan.actions == Action.COMPUTE, own.actions == Action.COMPUTE)):
                raise ValueError(f"A learned plan skipping {share:.4f} of the FLOPs does not compute where this "
                                 "router's plan at that budget does: fit its weights on router.plan(skip_flops=...) "
                                 "of this router.")
        return self.with_plans(plans, "learned_forecasts", **provenance)

    def _with_plans(self, plans: list[tuple[float, CachePlan]], metadata: dict) -> "CacheRouter":
        """This router's order with ``plans`` (share, plan) as its refined plans."""
        width = max((plan.linear_weights.shape[2] for _, plan in plans if plan.linear_weights is not None), default=0)
        weights = None
        if width:
            weights = torch.zeros(len(plans), self.num_steps, self.num_units, width)
            for index, (_, plan) in enumerate(plans):
                if plan.linear_weights is not None:
                    weights[index, ..., :plan.linear_weights.shape[2]] = plan.linear_weights
        merged = CacheRouter(self.num_steps, self.num_units, threshold=self.threshold, fixed_rows=self.fixed_rows.cpu(),
                             metadata=metadata, cheap_actions=self.cheap_actions, unit_flops=self.unit_flops,
                             refined_plans=torch.stack([plan.actions for _, plan in plans]), refined_weights=weights)
        with torch.no_grad():
            merged.logits.copy_(self.logits.detach().cpu())
        return merged

    def save(self, path: str | Path, **metadata) -> None:
        """Save logits and fixed rows as safetensors; metadata values are stored as JSON."""
        if "format" in metadata:
            raise ValueError("'format' is reserved in router metadata; use another key.")
        info = {**self.metadata, **metadata, "threshold": self.threshold, "cache_ratio": self.schedule().cache_ratio}
        header = {"format": ROUTER_FORMAT, **{key: json.dumps(value) for key, value in info.items()}}
        tensors = {"logits": self.logits.detach().cpu().contiguous(), "fixed_rows": self.fixed_rows.cpu().to(torch.uint8)}
        if self.cheap_actions is not None:
            tensors["cheap_actions"] = self.cheap_actions.contiguous()
        if self.unit_flops is not None:
            tensors["unit_flops"] = self.unit_flops.contiguous()
        if self.refined_plans is not None:
            tensors["refined_plans"] = self.refined_plans.contiguous()
        if self.refined_weights is not None:
            tensors["refined_weights"] = self.refined_weights.contiguous()
        save_file(tensors, str(path), metadata=header)

    @classmethod
    def load(cls, path: str | Path) -> "CacheRouter":
        """A router file, checked as a whole (see :func:`check_router_file`): every tensor and every metadata
        field the router reads; a damaged file is refused in one line naming the file, the field and the fix."""
        logits, options = check_router_file(path)
        try:
            router = cls(*logits.shape, **options)
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path} is a damaged router: {error}") from None
        with torch.no_grad():
            router.logits.copy_(logits)
        return router

    def check_compatible(self, layout: str, num_steps: int | None = None) -> None:
        """Raise a ValueError with the fix if this router was trained for another model or step count."""
        trained_layout = self.metadata.get("unit_layout")
        if trained_layout is not None and trained_layout != layout:
            raise ValueError(
                f"This router was trained for {trained_layout} but the transformer is {layout}. "
                "Train a router for this model with dit-cache-train."
            )
        if num_steps is not None and num_steps != self.num_steps:
            raise ValueError(
                f"This router was trained for {self.num_steps} denoising steps but {num_steps} were requested. "
                f"Use num_inference_steps={self.num_steps}, or router.resample({num_steps}) to map it by timestep."
            )

    def extra_repr(self) -> str:
        return f"num_steps={self.num_steps}, num_units={self.num_units}, threshold={self.threshold}"


def plan_with_fallbacks(codes: torch.Tensor) -> CachePlan:
    """A plan from action codes, each FORECAST lowered to the order its unit's computed history allows by then
    (FORECAST2 -> FORECAST1 -> REUSE), so a nested plan cut at any budget is valid."""
    codes = torch.as_tensor(codes).to(torch.int8).clone()
    computed = torch.zeros(codes.shape[1], dtype=torch.long)
    for row in codes:
        row[(row == Action.FORECAST2) & (computed < 3)] = int(Action.FORECAST1)
        row[(row == Action.FORECAST1) & (computed < 2)] = int(Action.REUSE)
        computed += (row == Action.COMPUTE).long()
    return CachePlan(codes)


def _checked_actions(actions, num_steps: int, num_units: int) -> torch.Tensor | None:
    if actions is None:
        return None
    actions = torch.as_tensor(actions)
    if tuple(actions.shape) != (num_steps, num_units) or actions.is_floating_point():
        raise ValueError(f"cheap_actions must be integer Action codes of shape ({num_steps}, {num_units}), got "
                         f"{actions.dtype} {tuple(actions.shape)}.")
    allowed = {int(a) for a in CHEAP_ACTIONS}
    bad = sorted(set(actions.flatten().tolist()) - allowed)
    if bad:
        raise ValueError(f"cheap_actions holds codes {bad}; allowed: "
                         + ", ".join(f"{a.name}={int(a)}" for a in CHEAP_ACTIONS) + ".")
    return actions.to(torch.int8).cpu().clone()


def check_threshold(threshold) -> float:
    """``threshold`` as a float if it is in (0, 1), else a ValueError: scores are sigmoids, so a threshold
    outside (0, 1) (or NaN) would cache every unit or none, whatever the router learned."""
    try:
        value = float(threshold)
    except (TypeError, ValueError):
        raise ValueError(f"threshold must be a number in (0, 1), got {threshold!r}.") from None
    if not 0.0 < value < 1.0:  # also refuses NaN
        raise ValueError(f"threshold must be in (0, 1) (scores are sigmoids), got {threshold}.")
    return value


ROUTER_TENSORS = {"cheap_actions", "unit_flops", "refined_plans", "refined_weights"}  # besides logits and fixed_rows


def check_router_file(path: str | Path) -> tuple[torch.Tensor, dict]:
    """(logits, the constructor's keyword arguments) of a router file whose every tensor (dtype, rank, shape,
    finiteness) and every metadata field the router reads (type, range) is valid; else a ValueError naming the
    file, the field and the fix. Free-form metadata (search traces, scheduler configs) only has to be JSON."""
    check = FileChecker(path, "router", "re-save it with CacheRouter.save, or retrain it")
    _, header, tensors = check.read((ROUTER_FORMAT,))
    check.only(tensors, {"logits", "fixed_rows"}, ROUTER_TENSORS)
    logits = check.tensor(tensors, "logits", "float", (None, None)).float()
    steps, units = logits.shape
    fixed_rows = check.tensor(tensors, "fixed_rows", "flag", (steps,), fix="re-export the router (one flag per step)")
    cheap_actions = check.tensor(tensors, "cheap_actions", "int", (steps, units))
    unit_flops = check.tensor(tensors, "unit_flops", "float", (units,))
    if unit_flops is not None and not bool((unit_flops > 0).all()):
        check.fail("tensor 'unit_flops'", f"holds {unit_flops.tolist()}, positive FLOP counts (one per unit) expected")
    refined_plans = check.tensor(tensors, "refined_plans", "int", (None, steps, units))
    count = None if refined_plans is None else len(refined_plans)
    refined_weights = check.tensor(tensors, "refined_weights", "float", (count, steps, units, None))
    if refined_weights is not None and refined_plans is None:
        check.fail("tensor 'refined_weights'", "needs the tensor 'refined_plans' it holds the LINEAR weights of")

    fields = check.json_fields(header)
    threshold = check.number(fields, "threshold", 0.0, 1.0, open_low=True, open_high=True)
    check.number(fields, "cache_ratio", 0.0, 1.0)
    fields.pop("cache_ratio", None)  # recomputed on save
    for key in ("num_steps", "resampled_from_steps"):
        check.number(fields, key, 1, math.inf, integer=True)
    if fields.get("resampled_from_steps") is None and fields.get("num_steps") not in (None, steps):
        check.fail("metadata 'num_steps'", f"is {fields['num_steps']} but the logits have {steps} rows (steps)")
    if fields.get("guidance_scale") is not None:
        check.number(fields, "guidance_scale", 0.0, math.inf)
    for key in ("unit_layout", "scheduler_class", "transformer_class", "objective"):
        check.text(fields, key)
    check.mapping(fields, "scheduler_config")
    span = check.numbers(fields, "flops_range", 2, 0.0, 1.0)
    if span is not None:
        if span[0] > span[1] or span[1] >= 1.0:
            check.fail("metadata 'flops_range'", f"is {span}, [low, high] with 0 <= low <= high < 1 expected")
        if unit_flops is None:
            check.fail("metadata 'flops_range'", "needs the tensor 'unit_flops' (what budgets are counted in)")
    if "refined_shares" in fields:
        count = None if refined_plans is None else len(refined_plans)
        check.numbers(fields, "refined_shares", count, 0.0, 1.0)
    options = dict(threshold=DEFAULT_THRESHOLD if threshold is None else threshold, fixed_rows=fixed_rows,
                   metadata={k: v for k, v in fields.items() if k != "threshold"}, cheap_actions=cheap_actions,
                   unit_flops=unit_flops, refined_plans=refined_plans, refined_weights=refined_weights)
    return logits, options


def _level_threshold(levels: torch.Tensor, cached: int) -> float:
    """The threshold that caches the ``cached`` lowest score levels (midway to the next, so rounding never moves
    an entry across it)."""
    if cached <= 0:
        return float(levels[0]) / 2
    if cached >= len(levels):
        return (float(levels[-1]) + 1.0) / 2
    return (float(levels[cached - 1]) + float(levels[cached])) / 2
