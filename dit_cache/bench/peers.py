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
from pathlib import Path
from typing import Callable

import torch
from diffusers.hooks import HookRegistry

from ..families import CFGLayout
from ..flops import percent
from ..units import _unwrap


from .candidates import (METER_HOOK, UNCACHED, BenchSetup, Candidate, StepMeter,  # noqa: F401  (re-exported)
                         describe_failure, format_left_out)


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
# Shares of the units' FLOPs a router skips (the shipped router serves 0 to 0.8): every 5% from 40%, so that each
# PSNR level from 20 to 36 dB has a router point near it, and 30% for the highest levels.
ROUTER_FLOP_BUDGETS = (0.3, 0.4, 0.45, 0.5, 0.55, 0.6, 0.65, 0.7, 0.75, 0.8)


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


def adaptive_family(setup: BenchSetup) -> list[Candidate]:
    """The embedded router's adaptive rules, at the budgets where they are its default (``dit-cache generate``)."""
    from .. import embedded
    from ..adaptive import AdaptiveRule, apply_adaptive, remove_adaptive

    router = setup.routers.get("shipped")
    if router is None or Path(router).resolve() != Path(embedded.embedded_router_path()).resolve():
        return setup.leave_out("adaptive", "its rules are fitted for the embedded router and model")
    candidates = []
    for budget in embedded.EMBEDDED_ADAPTIVE_BUDGETS:
        rule_path = embedded.embedded_adaptive_rule_path(budget)
        rule = AdaptiveRule.load(rule_path)
        candidates.append(Candidate(
            "router adaptive", f"router adaptive {percent(budget)} FLOPs ({rule.signal})",
            apply=lambda pipe, rule=rule: apply_adaptive(pipe, router, rule), remove=remove_adaptive,
            settings={"router": str(router), "rule": rule_path, "flop_budget": budget}, group="dit-cache"))
    return candidates


# --- diffusers' caches -----------------------------------------------------------------------------------------


def _hook_names() -> tuple[str, ...]:
    from diffusers.hooks.faster_cache import _FASTER_CACHE_BLOCK_HOOK, _FASTER_CACHE_DENOISER_HOOK
    from diffusers.hooks.first_block_cache import _FBC_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK
    from diffusers.hooks.mag_cache import _MAG_CACHE_BLOCK_HOOK, _MAG_CACHE_LEADER_BLOCK_HOOK
    from diffusers.hooks.pyramid_attention_broadcast import _PYRAMID_ATTENTION_BROADCAST_HOOK
    from diffusers.hooks.sea_cache import (_SEA_CACHE_BLOCK_HOOK, _SEA_CACHE_LEADER_BLOCK_HOOK,
                                           _SEA_CACHE_POST_NORM_HOOK, _SEA_CACHE_ROOT_HOOK)
    from diffusers.hooks.taylorseer_cache import _TAYLORSEER_CACHE_HOOK

    return (_FASTER_CACHE_DENOISER_HOOK, _FASTER_CACHE_BLOCK_HOOK, _FBC_LEADER_BLOCK_HOOK, _FBC_BLOCK_HOOK,
            _MAG_CACHE_LEADER_BLOCK_HOOK, _MAG_CACHE_BLOCK_HOOK, _PYRAMID_ATTENTION_BROADCAST_HOOK,
            _TAYLORSEER_CACHE_HOOK, _SEA_CACHE_ROOT_HOOK, _SEA_CACHE_LEADER_BLOCK_HOOK, _SEA_CACHE_BLOCK_HOOK,
            _SEA_CACHE_POST_NORM_HOOK)


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


def diffusers_candidate(family: str, label: str, settings: dict, apply_hooks: Callable,
                        call_context: Callable = diffusers_cache_call) -> Candidate:
    """``apply_hooks(transformer)`` installs the hooks with diffusers' own ``apply_*`` function."""

    def apply(pipe):
        from diffusers.hooks import HookRegistry

        apply_hooks(pipe.transformer)
        HookRegistry.check_if_exists_or_initialize(pipe.transformer).invalidate_child_registries_cache()

    return Candidate(family, label, apply, lambda pipe: remove_diffusers_hooks(pipe.transformer),
                     call_context=call_context, settings=settings, group="diffusers")


# Settings span each method's useful range on the embedded model (about 18 to 35 dB PSNR against uncached, 20
# steps): chosen with `samples/` style sweeps of 2 prompts each, see docs/benchmark.md.
FBC_THRESHOLDS = (0.15, 0.3, 0.5, 0.8)
TAYLORSEER_INTERVALS = (2, 3, 4, 6)  # 5 skips no more than 4 here (warm-up of 3 steps), at lower PSNR
MAG_CACHE_THRESHOLDS = (0.12, 0.24, 0.5, 1.0)  # from 1.0 up: 3 skipped in a row at most, 60 %
PAB_SKIPS = ((2, 2), (2, 4), (3, 6), (4, 8), (6, 12))  # (self-attention, cross-attention) block skip range
FASTER_CACHE_SKIPS = ((2, 5), (2, 3), (2, 2), (3, 2), (5, 2))  # (spatial attention, unconditional batch) skip range
SEA_CACHE_THRESHOLDS = (0.1, 0.25, 0.5, 1.0)  # from 1.0 up: 2 cached in a row at most, 60 % skipped
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


def _image_latents(module, args, kwargs) -> list[torch.Tensor] | None:
    """SeaCache's ``raw_vision_callback`` for image transformers: each latent of the batch ``(B, C, H, W)`` as the
    one-frame video ``(C, 1, H, W)`` its spectral filter takes; None (SeaCache then runs in full) otherwise."""
    hidden_states = args[0] if args else kwargs.get("hidden_states")
    if not torch.is_tensor(hidden_states) or hidden_states.ndim != 4:
        return None
    return [latent.unsqueeze(1) for latent in hidden_states]


def _flow_sigma(scheduler) -> Callable[[float], float]:
    """Timestep in [0, 1000] -> the noise level SeaCache's filter takes, in the flow-matching convention
    ``x = (1 - sigma) x0 + sigma noise``. A variance-preserving scheduler (PixArt's DPM-Solver, DiT's DDIM) noises
    as ``sqrt(abar) x0 + sqrt(1 - abar) noise``, the same mix up to a scale: sigma = s / (a + s)."""
    alphas = getattr(scheduler, "alphas_cumprod", None)
    if alphas is None or getattr(scheduler.config, "use_flow_sigmas", False):
        return lambda timestep: min(max(timestep / 1000.0, 0.0), 1.0)

    def sigma(timestep: float) -> float:
        abar = float(alphas[min(max(round(timestep), 0), len(alphas) - 1)])
        a, s = abar ** 0.5, (1.0 - abar) ** 0.5
        return s / (a + s)

    return sigma


def sea_cache_call_context(setup: BenchSetup) -> Callable:
    """The per-step cache context SeaCache reads (``step_index``, ``sigma``, ``num_inference_steps``), which the
    PixArt / DiT pipelines, lacking ``CacheMixin``, do not set: a forward pre-hook on the transformer fills it in
    before every call from the meter's timestep (the meter's pre-hook runs first)."""

    @contextmanager
    def call(pipe):
        from diffusers.hooks.hooks import CacheContext, _set_cache_context

        transformer = pipe.transformer
        HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks()
        to_sigma, steps_seen = _flow_sigma(pipe.scheduler), []

        def on_step(module, args, kwargs):  # a context is frozen: a new one per step, its state kept by name
            _set_cache_context(transformer, CacheContext("cond", step_index=len(steps_seen),
                                                         num_inference_steps=setup.steps,
                                                         sigma=to_sigma(setup.meter.timestep)))
            steps_seen.append(None)

        handle = transformer.register_forward_pre_hook(on_step, with_kwargs=True)
        _set_cache_context(transformer, CacheContext("cond", num_inference_steps=setup.steps))
        try:
            yield
        finally:
            handle.remove()
            _set_cache_context(transformer, None)
            HookRegistry.check_if_exists_or_initialize(transformer).reset_stateful_hooks()

    return call


def sea_cache_family(setup: BenchSetup, thresholds=SEA_CACHE_THRESHOLDS) -> list[Candidate]:
    """SeaCache (diffusers 0.42) with its defaults (first-order residual, 1 retained step at each end, at most 2
    cached in a row, power prior 3) at each threshold; the image latent is its one-frame video."""
    from diffusers.hooks import SeaCacheConfig, apply_sea_cache

    if type(_unwrap(setup.pipe.transformer)).__name__ == "FluxTransformer2DModel":
        return setup.leave_out("SeaCache", "FLUX.1 packs its latent into tokens: no (C, T, H, W) view for "
                                           "SeaCache's spectral filter.")
    context = sea_cache_call_context(setup)
    return [diffusers_candidate("SeaCache", f"SeaCache threshold {t}", {"threshold": t},
                                lambda tr, t=t: apply_sea_cache(tr, SeaCacheConfig(
                                    threshold=t, raw_vision_callback=_image_latents)), call_context=context)
            for t in thresholds]


def cache_dit_families(setup: BenchSetup) -> list[Candidate]:
    from .cache_dit_peer import cache_dit_family

    return cache_dit_family(setup)


FAMILIES: dict[str, Callable[[BenchSetup], list[Candidate]]] = {
    "uniform": uniform_family,
    "taylor": taylor_family,
    "router": router_family,
    "adaptive": adaptive_family,
    "first_block_cache": first_block_cache_family,
    "taylorseer": taylorseer_family,
    "magcache": mag_cache_family,
    "fastercache": faster_cache_family,
    "pab": pab_family,
    "seacache": sea_cache_family,
    "cache_dit": cache_dit_families,
}
DIFFUSERS_FAMILIES = ("first_block_cache", "taylorseer", "magcache", "fastercache", "pab", "seacache")
PEER_FAMILIES = (*DIFFUSERS_FAMILIES, "cache_dit")  # everything dit-cache is compared against


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
