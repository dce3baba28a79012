"""Candidates of the peer benchmark: dit-cache schedules and routers, and diffusers' own caches, set up fairly.

A :class:`Candidate` is ``(family, label, apply(pipe), remove(pipe))`` plus ``call_context(pipe)``, the context
every pipeline call of it runs in. A *family* is one entry of :data:`FAMILIES`: a function of the
:class:`BenchSetup` returning its candidates (one per setting). Adding a family (a new dit-cache plan, another
diffusers hook) is one more entry.

The diffusers hooks need three things the PixArt / DiT pipelines do not give them in diffusers 0.42:

* a cache context: ``PixArtTransformer2DModel`` and ``DiTTransformer2DModel`` have no ``CacheMixin``, so every
  call runs inside the context ``CacheMixin.cache_context("cond")`` would set (``_set_cache_context`` on the root
  registry), after ``reset_stateful_hooks`` so no state leaks from the previous image;
* the current timestep (PAB, FasterCache): :class:`StepMeter` records the ``timestep`` of each transformer call
  with a forward pre-hook;
* module names: TaylorSeer's default patterns match no PixArt module, so it is pointed at each block's ``attn1``,
  ``attn2`` and ``ff``, with its Taylor factors in the model's dtype (its default is bfloat16).

A family that cannot run on a model (FasterCache without a CFG batch; a diffusers hook that fails on a block type)
is left out with its reason in ``BenchSetup.left_out``, which the benchmark reports.
"""

from __future__ import annotations

import contextlib
import io
import json
import re
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from diffusers.hooks import HookRegistry, ModelHook

from ..families import CFGLayout, family_of
from ..units import _unwrap, cache_units


@dataclass
class Candidate:
    """One configuration of the benchmark. ``family`` groups settings of one method on the plot and in the table."""

    family: str
    label: str
    apply: Callable
    remove: Callable
    call_context: Callable = field(default=lambda pipe: contextlib.nullcontext())
    settings: dict = field(default_factory=dict)
    group: str = "dit-cache"  # "dit-cache", "diffusers" or "reference": which Pareto front it belongs to


UNCACHED = Candidate("uncached", "uncached", apply=lambda pipe: None, remove=lambda pipe: None, group="reference")


METER_HOOK = "dit_cache_bench_meter"


class _UnitCallCounter(ModelHook):
    """Counts the calls of a unit's own computation, weighted by the share of the transformer's batch it saw.

    Registered before any cache, so it is the innermost diffusers hook on the unit: a cache that returns a stored
    or forecast output never reaches it. (A torch pre-hook would not do: it runs in ``__call__``, before a cache
    hook decides; and a unit that is itself one layer, FLUX's ``proj_mlp``, has no inner layer to watch.)
    """

    def __init__(self, meter: "StepMeter", index: int):
        super().__init__()
        self.meter, self.index = meter, index

    def pre_forward(self, module, *args, **kwargs):
        first = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
        self.meter.unit_calls[self.index] += first.shape[0] / self.meter.batch
        return args, kwargs


class StepMeter:
    """Hooks that count what really ran: per transformer call its timestep and batch (a torch pre-hook), and per
    cacheable unit the calls of its computation weighted by the share of the batch they saw (a unit run on the
    conditional half of a CFG batch counts half).

    Installed once for the whole benchmark: they observe and never change an output. ``remove`` leaves each
    module as it was.
    """

    def __init__(self, transformer: torch.nn.Module):
        root = _unwrap(transformer)
        self.units = cache_units(transformer)
        self.timestep: float | None = None
        # PAB and FasterCache take timestep ranges in [0, 1000]; FLUX's pipeline passes t / 1000.
        self.timestep_scale = 1000.0 / float(family_of(transformer).timesteps(1000, 1, transformer.config)[0])
        self.batch = 1
        self.transformer_calls = 0
        self.unit_calls = [0.0] * len(self.units)
        self._handles = [transformer.register_forward_pre_hook(self._on_step, with_kwargs=True)]
        self._hooked = []
        for unit in self.units:
            module = root.get_submodule(unit.path)
            self._hooked.append((module, hasattr(module, "_diffusers_hook")))
            HookRegistry.check_if_exists_or_initialize(module).register_hook(_UnitCallCounter(self, unit.index),
                                                                             METER_HOOK)

    def _on_step(self, module, args, kwargs):
        hidden_states = args[0] if args else kwargs["hidden_states"]
        timestep = kwargs.get("timestep", args[1] if len(args) > 1 else None)
        self.batch = hidden_states.shape[0]
        timestep = float(timestep.flatten()[0]) if torch.is_tensor(timestep) else float(timestep)
        self.timestep = timestep * self.timestep_scale
        self.transformer_calls += 1

    def current_timestep(self) -> float:
        """The callback PAB and FasterCache read (``current_timestep_callback``), in [0, 1000]."""
        return self.timestep

    def reset(self) -> None:
        self.transformer_calls = 0
        self.unit_calls = [0.0] * len(self.units)

    def cache_ratio(self) -> float:
        """Share of (step, unit) evaluations that did not run."""
        return 1.0 - sum(self.unit_calls) / (self.transformer_calls * len(self.units))

    def skipped_flop_share(self, unit_flops: torch.Tensor) -> float:
        """Share of the units' FLOPs that did not run (each unit's measured calls weighted by its FLOPs)."""
        flops = unit_flops.double()
        ran = (torch.tensor(self.unit_calls, dtype=torch.float64) * flops).sum()
        return float(1.0 - ran / (flops.sum() * self.transformer_calls))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        for module, had_registry in self._hooked:
            module._diffusers_hook.remove_hook(METER_HOOK, recurse=False)
            if not had_registry and not module._diffusers_hook.hooks:
                del module._diffusers_hook
                if getattr(module.__dict__.get("forward"), "__func__", None) is type(module).forward:
                    del module.forward
        self._hooked.clear()


@dataclass
class BenchSetup:
    """What the families need to build their candidates."""

    pipe: object
    steps: int
    unit_flops: torch.Tensor
    meter: StepMeter
    routers: dict[str, str]  # label -> router file (the shipped one first)
    mag_ratios: list[float] | None = None  # MagCache's calibrated magnitude ratios (see calibrate_mag_cache)
    cfg_layout: CFGLayout = CFGLayout.UNCONDITIONAL_FIRST  # the family's (PixArt, SD3, Sana: [uncond, cond])
    left_out: dict[str, str] = field(default_factory=dict)  # family -> why it does not run on this model

    def leave_out(self, family: str, reason: str) -> list:
        """Record why ``family`` has no candidate here; returns the (empty) candidate list."""
        self.left_out[family] = reason
        return []


def describe_failure(label: str, pipe, error: Exception) -> str:
    """One line for ``left_out``: which cache failed on which pipeline, under which diffusers, and the error."""
    import diffusers

    message = str(error).strip().splitlines()[0] if str(error).strip() else ""
    return (f"{label} failed on {type(pipe).__name__} (diffusers {diffusers.__version__}): "
            f"{type(error).__name__}: {message[:200]}")


def format_left_out(left_out: dict[str, str]) -> str:
    """``left_out`` as one line: ``family: reason; ...``."""
    return "; ".join(f"{family}: {reason}" for family, reason in left_out.items())


# --- dit-cache ------------------------------------------------------------------------------------------------


def dit_cache_candidate(family: str, label: str, settings: dict, **accelerate_kwargs) -> Candidate:
    """A dit-cache configuration: ``accelerate(pipe, **accelerate_kwargs)`` (``schedule=``, ``plan=`` or ``router=``); ``decelerate`` removes it."""

    def apply(pipe):
        from ..pipelines import accelerate

        accelerate(pipe, **accelerate_kwargs)

    def remove(pipe):
        from ..pipelines import decelerate

        decelerate(pipe)

    return Candidate(family, label, apply, remove, settings=settings, group="dit-cache")


UNIFORM_INTERVALS = (2, 3, 4, 5)
# Shares of the units' FLOPs a router skips (the shipped router serves 0 to 0.8), in finer steps at the coarse
# end, where the error grows fastest with the budget.
ROUTER_FLOP_BUDGETS = (0.45, 0.55, 0.65, 0.7, 0.75, 0.8)


def uniform_family(setup: BenchSetup, intervals=UNIFORM_INTERVALS) -> list[Candidate]:
    from ..schedule import CacheSchedule

    units = len(setup.meter.units)
    return [dit_cache_candidate("uniform", f"uniform interval {n}", {"interval": n},
                                schedule=CacheSchedule.uniform(setup.steps, units, n)) for n in intervals]


TAYLOR_INTERVALS = (2, 3, 4)  # 5 is dominated by uniform interval 4 (docs/results/bench_with_harmonica)


def taylor_family(setup: BenchSetup, intervals=TAYLOR_INTERVALS, order: int = 1) -> list[Candidate]:
    """dit-cache's training-free forecasting preset: compute every ``interval`` steps, forecast in between."""
    from ..plan import CachePlan

    units = len(setup.meter.units)
    return [dit_cache_candidate("taylor", f"taylor interval {n} order {order}", {"interval": n, "order": order},
                                plan=CachePlan.taylor(setup.steps, units, n, order)) for n in intervals]


def router_family(setup: BenchSetup, budgets=ROUTER_FLOP_BUDGETS) -> list[Candidate]:
    from ..router import CacheRouter

    candidates = []
    for name, path in setup.routers.items():
        for budget in budgets:
            router = CacheRouter.load(path)
            if router.num_steps != setup.steps:
                router = router.resample(setup.steps)
            span = router.flops_range
            if span is not None:  # one file, any budget in its searched range: the router picks the plan
                if not span[0] <= budget <= span[1]:
                    continue
                threshold = router.threshold_for_flops(budget)
            else:
                threshold = router.calibrate_threshold(budget, unit_weights=setup.unit_flops)
            candidates.append(dit_cache_candidate(
                "router" if name == "shipped" else f"router {name}", f"router {name} {budget:.0%} FLOPs",
                {"router": str(path), "flop_budget": budget, "threshold": threshold}, plan=router.plan(threshold)))
    return candidates


# --- diffusers' caches -----------------------------------------------------------------------------------------


def _hook_names() -> tuple[str, ...]:
    from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    return (_FASTER_CACHE_DENOISER_HOOK, _FASTER_CACHE_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK,
            _MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK, _PYRAMID_ATTENTION_BROADCAST_HOOK,
            _TAYLORSEER_CACHE_HOOK)


def remove_diffusers_hooks(transformer: torch.nn.Module) -> None:
    """Remove every diffusers cache hook and leave each module as it was before: no empty hook registry, no
    instance-level ``forward`` (``disable_cache`` of ``CacheMixin`` leaves both behind)."""
    root = _unwrap(transformer)
    for _, module in root.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is None:
            continue
        for name in _hook_names():
            registry.remove_hook(name, recurse=False)
        if not registry.hooks:
            del module._diffusers_hook
            instance_forward = module.__dict__.get("forward")
            if getattr(instance_forward, "__func__", None) is type(module).forward:
                del module.forward
    for _, module in root.named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        if registry is not None:
            registry.invalidate_child_registries_cache()


@contextmanager
def diffusers_cache_call(pipe, name: str = "cond"):
    """One pipeline call with diffusers' hooks: fresh hook state, and the cache context that
    ``CacheMixin.cache_context(name)`` sets, for the transformers that lack the mixin."""
    from diffusers.hooks import HookRegistry
    from diffusers.hooks.hooks import CacheContext, _set_cache_context

    transformer = pipe.transformer
    HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks()
    _set_cache_context(transformer, CacheContext(name))
    try:
        yield
    finally:
        _set_cache_context(transformer, None)
        HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks()


def diffusers_candidate(family: str, label: str, settings: dict, apply_hooks: Callable) -> Candidate:
    """``apply_hooks(transformer)`` installs the hooks with diffusers' own ``apply_*`` function."""

    def apply(pipe):
        from diffusers.hooks import HookRegistry

        apply_hooks(pipe.transformer)
        HookRegistry.check_if_exists_or_initialize(pipe.transformer).invalidate_child_registries_cache()

    return Candidate(family, label, apply, lambda pipe: remove_diffusers_hooks(pipe.transformer),
                     call_context=diffusers_cache_call, settings=settings, group="diffusers")


# Settings span each method's useful range on the embedded model (about 18 to 35 dB PSNR against uncached, 20
# steps): chosen with `samples/` style sweeps of 2 prompts each, see docs/benchmark.md.
FBC_THRESHOLDS = (0.08, 0.15, 0.3)
TAYLORSEER_INTERVALS = (2, 3, 4)  # 5 skips no more than 4 here (warm-up of 3 steps), at lower PSNR
MAG_CACHE_THRESHOLDS = (0.12, 0.24, 0.5)
PAB_SKIPS = ((2, 2), (2, 4), (3, 6))  # (self-attention, cross-attention) block skip range
FASTER_CACHE_SKIPS = ((2, 5), (2, 3), (2, 2))  # (spatial attention, unconditional batch) skip range
# The transformer inputs that carry the [uncond, cond] batch: diffusers' default list plus SD3's pooled_projections.
FASTER_CACHE_BATCHED_INPUTS = ("hidden_states", "encoder_hidden_states", "timestep", "attention_mask",
                               "encoder_attention_mask", "pooled_projections")


def first_block_cache_family(setup: BenchSetup, thresholds=FBC_THRESHOLDS) -> list[Candidate]:
    from diffusers.hooks import FirstBlockCacheConfig, apply_first_block_cache

    return [diffusers_candidate("FirstBlockCache", f"FirstBlockCache threshold {t}", {"threshold": t},
                                lambda tr, t=t: apply_first_block_cache(tr, FirstBlockCacheConfig(threshold=t)))
            for t in thresholds]


def taylorseer_family(setup: BenchSetup, intervals=TAYLORSEER_INTERVALS) -> list[Candidate]:
    from diffusers.hooks import TaylorSeerCacheConfig, apply_taylorseer_cache

    dtype = setup.pipe.transformer.dtype
    patterns = [re.escape(unit.path) for unit in setup.meter.units]  # every block's attn1, attn2, ff

    def config(interval):
        return TaylorSeerCacheConfig(cache_interval=interval, max_order=1, disable_cache_before_step=3,
                                     taylor_factors_dtype=dtype, cache_identifiers=patterns)

    return [diffusers_candidate("TaylorSeer", f"TaylorSeer interval {n}", {"cache_interval": n, "max_order": 1},
                                lambda tr, n=n: apply_taylorseer_cache(tr, config(n)))
            for n in intervals]


def mag_cache_family(setup: BenchSetup, thresholds=MAG_CACHE_THRESHOLDS) -> list[Candidate]:
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    if "MagCache" in setup.left_out:  # its calibration failed on this model
        return []
    if setup.mag_ratios is None:
        raise ValueError("MagCache needs calibrated magnitude ratios: run calibrate_mag_cache first.")

    def apply(transformer, threshold):
        apply_mag_cache(transformer, MagCacheConfig(threshold=threshold, num_inference_steps=setup.steps,
                                                    mag_ratios=list(setup.mag_ratios)))

    return [diffusers_candidate("MagCache", f"MagCache threshold {t}", {"threshold": t, "max_skip_steps": 3},
                                lambda tr, t=t: apply(tr, t)) for t in thresholds]


def pab_family(setup: BenchSetup, skips=PAB_SKIPS) -> list[Candidate]:
    from diffusers.hooks import PyramidAttentionBroadcastConfig, apply_pyramid_attention_broadcast

    def apply(transformer, spatial, cross):
        config = PyramidAttentionBroadcastConfig(
            spatial_attention_block_skip_range=spatial, cross_attention_block_skip_range=cross,
            spatial_attention_timestep_skip_range=(100, 800), cross_attention_timestep_skip_range=(100, 900),
            current_timestep_callback=setup.meter.current_timestep)
        apply_pyramid_attention_broadcast(transformer, config)

    has_cross = any(u.branch == "attn2" for u in setup.meter.units)
    return [diffusers_candidate("PAB", f"PAB self {s} cross {c}" if has_cross else f"PAB self {s}",
                                {"spatial_skip": s, "cross_skip": c if has_cross else None},
                                lambda tr, s=s, c=c: apply(tr, s, c if has_cross else None))
            for s, c in skips]


def faster_cache_family(setup: BenchSetup, skips=FASTER_CACHE_SKIPS) -> list[Candidate]:
    from diffusers.hooks import FasterCacheConfig, apply_faster_cache

    pipeline = type(setup.pipe).__name__
    if setup.cfg_layout.conditional_half is None:
        return setup.leave_out("FasterCache", f"{pipeline} has no CFG batch (one conditional call per step); "
                                              "FasterCache skips the unconditional half of one.")
    if setup.cfg_layout is not CFGLayout.UNCONDITIONAL_FIRST:
        return setup.leave_out("FasterCache", f"{pipeline} batches CFG as [cond, uncond]; FasterCache would drop "
                                              "the first half, the conditional one, as unconditional.")

    def apply(transformer, spatial, uncond):
        config = FasterCacheConfig(
            spatial_attention_block_skip_range=spatial, unconditional_batch_skip_range=uncond,
            attention_weight_callback=lambda module: 0.5, tensor_format="BCHW",  # images: (batch, channels, h, w)
            current_timestep_callback=setup.meter.current_timestep,
            # SD3 batches its pooled CLIP embeddings too; the default list would leave them at double batch.
            _unconditional_conditional_input_kwargs_identifiers=FASTER_CACHE_BATCHED_INPUTS)
        with contextlib.redirect_stderr(io.StringIO()):  # its "experimental feature" warning, once per setting
            apply_faster_cache(transformer, config)

    return [diffusers_candidate("FasterCache", f"FasterCache attn {s} uncond {u}",
                                {"spatial_skip": s, "uncond_skip": u}, lambda tr, s=s, u=u: apply(tr, s, u))
            for s, u in skips]


FAMILIES: dict[str, Callable[[BenchSetup], list[Candidate]]] = {
    "uniform": uniform_family,
    "taylor": taylor_family,
    "router": router_family,
    "first_block_cache": first_block_cache_family,
    "taylorseer": taylorseer_family,
    "magcache": mag_cache_family,
    "fastercache": faster_cache_family,
    "pab": pab_family,
}
DIFFUSERS_FAMILIES = ("first_block_cache", "taylorseer", "magcache", "fastercache", "pab")


# --- MagCache calibration --------------------------------------------------------------------------------------


def calibrate_mag_cache(pipe, calls: list[dict], steps: int, path: Path | None = None, progress=None,
                        source: dict | None = None) -> list[float]:
    """MagCache's magnitude ratios of ``pipe.transformer``: ``calibrate=True`` over ``calls`` (pipeline keyword
    arguments: prompts and seeds kept apart from the scored ones), averaged per step.

    With ``path`` the ratios are read from that JSON file when it holds ratios of the same step count and
    ``source`` (JSON-able: what the calls were, e.g. model, seeds, guidance), and written there otherwise, so a
    rerun does not recalibrate and a changed calibration does not reuse stale ratios.
    """
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    source = source or {}
    if path is not None and path.exists():
        stored = json.loads(path.read_text())
        if (stored.get("steps") == steps and len(stored.get("mag_ratios", [])) == steps
                and stored.get("source", {}) == source):
            return stored["mag_ratios"]
    runs = []
    apply_mag_cache(pipe.transformer, MagCacheConfig(calibrate=True, num_inference_steps=steps))
    try:
        for call in calls:
            printed = io.StringIO()
            with diffusers_cache_call(pipe), contextlib.redirect_stdout(printed):
                pipe(**call)
            # MagCache prints the ratios of a finished calibration run (its documented output) and then resets.
            match = re.search(r"mag_ratios=\.\.\.\):\s*(\[[^\]]*\])", printed.getvalue())
            if match is None:
                raise RuntimeError("MagCache calibration printed no ratios; is num_inference_steps the step count?")
            runs.append(json.loads(match.group(1)))
            if progress is not None:
                progress.update(1)
    finally:
        remove_diffusers_hooks(pipe.transformer)
    ratios = torch.tensor(runs, dtype=torch.float64).mean(dim=0).tolist()
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"steps": steps, "calibration_calls": len(calls), "source": source,
                                    "mag_ratios": ratios}, indent=2))
    return ratios


# --- exactness ---------------------------------------------------------------------------------------------------


def module_signature(transformer: torch.nn.Module) -> list[tuple]:
    """What a cache could leave behind on each module: diffusers hooks, an instance-level ``forward``, torch
    hooks. Equal signatures before and after a candidate mean its removal was structurally complete.

    An empty diffusers hook registry counts as none: it changes no call, and the stock FLUX and SD3 pipelines
    leave one on the transformer themselves (their ``CacheMixin.cache_context`` creates it)."""
    signature = []
    for name, module in _unwrap(transformer).named_modules():
        registry = getattr(module, "_diffusers_hook", None)
        signature.append((name, tuple(registry.hooks) if registry is not None else (), "forward" in module.__dict__,
                          len(module._forward_hooks), len(module._forward_pre_hooks)))
    return signature
