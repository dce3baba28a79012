"""``CacheRouter``: learned per-(step, unit) cache decisions (Learning-to-Cache / HarmoniCa)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .actions import ACTION_COST, ROUTER_CHOICES, Action
from .deprecation import skip_flops_argument
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
    each replacing the nested plan (the threshold's) that skips the same share.
    """

    def __init__(self, num_steps: int, num_units: int, *, threshold: float = DEFAULT_THRESHOLD,
                 fixed_rows: torch.Tensor | None = None, metadata: dict | None = None, generator=None,
                 cheap_actions: torch.Tensor | None = None, unit_flops: torch.Tensor | None = None,
                 refined_plans: torch.Tensor | None = None):
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
        self.refined_plans = self._checked_refined_plans(refined_plans)
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
            for codes in self.refined_plans:
                refined = CachePlan(codes)
                if abs(refined.cached_share(self.unit_flops) - share) < 1e-9:
                    return refined
        return nested

    def _checked_refined_plans(self, plans) -> torch.Tensor | None:
        if plans is None:
            return None
        plans = torch.as_tensor(plans)
        if plans.ndim != 3 or tuple(plans.shape[1:]) != (self.num_steps, self.num_units) or plans.is_floating_point():
            raise ValueError(f"refined_plans must be integer Action codes of shape (K, {self.num_steps}, "
                             f"{self.num_units}), got {plans.dtype} {tuple(plans.shape)}.")
        if self.unit_flops is None or self.cheap_actions is None:
            raise ValueError("refined_plans need the router's unit_flops and cheap_actions (a searched router): "
                             "they replace its nested plan at the same FLOP share.")
        for codes in plans:
            CachePlan(codes)  # refuses unknown codes and forecasts without the history they need
        return plans.to(torch.int8).cpu().clone()

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
        cached = int((share - flops).abs().argmin())
        if cached == 0:
            return float(levels[0]) / 2
        if cached == len(levels):
            return (float(levels[-1]) + 1.0) / 2
        return (float(levels[cached - 1]) + float(levels[cached])) / 2

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
        """The same router mapped to another step count by relative position in the trajectory (opt-in)."""
        source = torch.linspace(0, 1, self.num_steps)
        target = torch.linspace(0, 1, num_steps)
        nearest = (target[:, None] - source[None, :]).abs().argmin(dim=1)
        resampled = CacheRouter(num_steps, self.num_units, threshold=self.threshold,
                                fixed_rows=self.fixed_rows.cpu()[nearest],
                                metadata={**self.metadata, "resampled_from_steps": self.num_steps})
        with torch.no_grad():
            resampled.logits.copy_(self.logits.detach()[nearest])
            resampled.clamp_()
        return resampled

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
        save_file(tensors, str(path), metadata=header)

    @classmethod
    def load(cls, path: str | Path) -> "CacheRouter":
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No router file at {path}.")
        try:
            with safe_open(str(path), framework="pt") as file:
                header = file.metadata() or {}
                tensors = {key: file.get_tensor(key) for key in file.keys()}
        except Exception as error:  # safetensors raises its own error types for non-safetensors input
            raise ValueError(f"{path} is not a dit-cache router: it is not a safetensors file ({error}).") from None
        if header.get("format") != ROUTER_FORMAT or {"logits", "fixed_rows"} - set(tensors):
            raise ValueError(f"{path} is not a dit-cache router (no '{ROUTER_FORMAT}' metadata).")
        metadata = {key: _json_value(path, key, value) for key, value in header.items() if key != "format"}
        threshold = metadata.pop("threshold", DEFAULT_THRESHOLD)
        metadata.pop("cache_ratio", None)
        logits, fixed_rows = tensors["logits"].float(), tensors["fixed_rows"].bool()
        if logits.ndim != 2 or tuple(fixed_rows.shape) != logits.shape[:1]:
            raise ValueError(f"{path} is a damaged router: its fixed_rows have shape {tuple(fixed_rows.shape)} but "
                             f"its logits {tuple(logits.shape)} (one flag per step expected); re-export the router.")
        if not bool(torch.isfinite(logits).all()):
            raise ValueError(f"{path} holds non-finite logits (NaN or inf): the router is unusable; retrain it, "
                             "e.g. with a lower learning rate.")
        try:
            router = cls(*logits.shape, threshold=threshold, fixed_rows=fixed_rows, metadata=metadata,
                         cheap_actions=tensors.get("cheap_actions"), unit_flops=tensors.get("unit_flops"),
                         refined_plans=tensors.get("refined_plans"))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{path}: {error}") from None
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


def _json_value(path: Path, key: str, text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{path} is a damaged router: its metadata {key!r} is not JSON ({error}); "
                         "re-save it with CacheRouter.save.") from None
