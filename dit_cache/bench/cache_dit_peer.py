"""cache-dit (the ``cache-dit`` package, an optional extra: ``pip install "dit-cache[bench]"``) as a peer of the
benchmark: its DBCache with Fn/Bn compute blocks, with and without its TaylorSeer calibrator, and its static step
mask, each applied with ``cache_dit.enable_cache(pipe, ...)`` as its documentation shows.

``cache_dit.disable_cache(pipe)`` restores the computation bitwise but not the objects: it leaves the class
``forward`` bound on the transformer instance (and, on DiT, its patched forward and an alias ``_norm1_emb`` of
the first block's embedding registered as a submodule), and re-registers the block list. :func:`cache_dit_candidate` records what the transformer
and the pipeline had before and removes what cache-dit added, so the harness's structural check holds.
"""

from __future__ import annotations

import logging
from contextlib import contextmanager

from .candidates import BenchSetup, Candidate

CACHE_DIT_MISSING = 'the cache-dit peers need the cache-dit package: pip install "dit-cache[bench]"'

# DBCache F1B0 (one compute block in front, none behind): cache-dit's fastest DBCache layout and the one its
# documentation and integrations (vLLM-Omni, SGLang) default to, with their defaults for ~20-50 step runs: 4
# warm-up steps, at most 3 cached steps in a row. On the embedded model (20 steps) the thresholds span ~37 dB down
# to where the cap of 3 cached steps saturates (52 % of the FLOPs skipped from 0.32 up; with TaylorSeer, 17.9 dB
# there); the static masks reach further (docs/results/peer_settings_sweep.json: the sweep that chose them).
CACHE_DIT_THRESHOLDS = (0.08, 0.12, 0.16, 0.24, 0.32)
CACHE_DIT_WARMUP_STEPS = 4
CACHE_DIT_MAX_CONTINUOUS_CACHED = 3
CACHE_DIT_MASK_POLICIES = ("medium", "fast")  # cache_dit.steps_mask presets: slow, medium, fast, ultra


def require_cache_dit():
    try:
        import cache_dit
    except ImportError:
        raise ImportError(CACHE_DIT_MISSING) from None
    return cache_dit


@contextmanager
def _quiet():
    """cache-dit logs several lines at INFO and WARNING on every enable and disable; the benchmark applies each
    configuration once per image."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        yield
    finally:
        logging.disable(previous)


def cache_dit_candidate(family: str, label: str, settings: dict, cache_config, calibrator_config=None) -> Candidate:
    """``cache_dit.enable_cache(pipe, cache_config=..., calibrator_config=...)``; removed with ``disable_cache`` and
    then cleared of what that leaves behind (see the module docstring)."""
    before = {}

    def apply(pipe):
        cache_dit = require_cache_dit()
        transformer = pipe.transformer
        before.update(attributes=set(transformer.__dict__), modules=dict(transformer._modules),
                      pipe_attributes=set(pipe.__dict__), pipe_class=dict(vars(type(pipe))))
        with _quiet():
            cache_dit.enable_cache(pipe, cache_config=cache_config, calibrator_config=calibrator_config)

    def remove(pipe):
        import cache_dit

        with _quiet():
            cache_dit.disable_cache(pipe)
        if not before:
            return
        transformer = pipe.transformer
        # cache-dit re-registers the block list (it moves to the end of the children) and adds aliases: the
        # children as they were, in their order
        transformer._modules.clear()
        transformer._modules.update(before["modules"])
        for name in set(transformer.__dict__) - before["attributes"]:
            delattr(transformer, name)
        for name in set(pipe.__dict__) - before["pipe_attributes"]:
            delattr(pipe, name)
        cls, original = type(pipe), before["pipe_class"]
        for name in set(vars(cls)) - set(original):
            delattr(cls, name)
        for name, value in original.items():
            if vars(cls).get(name) is not value and name not in ("__dict__", "__weakref__"):
                setattr(cls, name, value)
        before.clear()

    return Candidate(family, label, apply, remove, settings=settings, group="diffusers")


def cache_dit_family(setup: BenchSetup, thresholds=CACHE_DIT_THRESHOLDS, mask_policies=CACHE_DIT_MASK_POLICIES,
                     warmup: int = CACHE_DIT_WARMUP_STEPS,
                     max_continuous: int = CACHE_DIT_MAX_CONTINUOUS_CACHED) -> list[Candidate]:
    """DBCache F1B0 at each threshold, then the same with the TaylorSeer calibrator (order 1), then the static
    step masks (``steps_mask(mask_policy=...)``, cached steps reuse without a residual check)."""
    cache_dit = require_cache_dit()
    from cache_dit import DBCacheConfig, TaylorSeerCalibratorConfig

    def config(**changes):
        return DBCacheConfig(Fn_compute_blocks=1, Bn_compute_blocks=0, max_warmup_steps=warmup,
                             max_continuous_cached_steps=max_continuous, num_inference_steps=setup.steps, **changes)

    candidates = []
    for taylorseer in (False, True):
        family = "cache-dit DBCache+TaylorSeer" if taylorseer else "cache-dit DBCache"
        for t in thresholds:
            calibrator = TaylorSeerCalibratorConfig(taylorseer_order=1) if taylorseer else None
            candidates.append(cache_dit_candidate(
                family, f"{family} F1B0 threshold {t}",
                {"Fn": 1, "Bn": 0, "threshold": t, "warmup": warmup, "taylorseer": taylorseer},
                config(residual_diff_threshold=t), calibrator))
    for policy in mask_policies:
        mask = cache_dit.steps_mask(mask_policy=policy, total_steps=setup.steps)
        candidates.append(cache_dit_candidate(
            "cache-dit static mask", f"cache-dit static mask {policy}",
            {"mask_policy": policy, "computed_steps": sum(mask)},
            config(steps_computation_mask=mask, steps_computation_policy="static")))
    return candidates
