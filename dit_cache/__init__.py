"""dit-cache: learned feature caching for diffusers diffusion transformers."""

from .cache import CacheHandle, CacheStats, apply_cache, compile_units, get_cache_handle, remove_cache
from .embedded import (EMBEDDED_GUIDANCE_SCALE, embedded_adaptive_rule_path, embedded_harmonica_router_path,
                       embedded_model_path, embedded_router_path)
from .flops import unit_flops
from .linear_fit import fit_linear_forecaster
from .plan import Action, CachePlan
from .router import CacheRouter
from .schedule import CacheSchedule
from .units import CacheUnit, cache_units

__version__ = "0.1.0"


def __getattr__(name):
    # The pipelines import diffusers' pipeline classes; load them only when asked for.
    if name in ("accelerate", "decelerate"):
        from . import pipelines

        return getattr(pipelines, name)
    raise AttributeError(f"module 'dit_cache' has no attribute {name!r}")

__all__ = [
    "EMBEDDED_GUIDANCE_SCALE",
    "Action",
    "CachePlan",
    "fit_linear_forecaster",
    "CacheHandle",
    "CacheRouter",
    "CacheSchedule",
    "CacheStats",
    "CacheUnit",
    "accelerate",
    "apply_cache",
    "cache_units",
    "compile_units",
    "decelerate",
    "embedded_adaptive_rule_path",
    "embedded_harmonica_router_path",
    "embedded_model_path",
    "embedded_router_path",
    "get_cache_handle",
    "remove_cache",
    "unit_flops",
]
