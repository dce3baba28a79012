"""Drop-in accelerated diffusers pipelines and the one-line ``accelerate(pipe, router=...)``.

The pipelines' own ``__call__`` runs untouched; the mixin only arms the transformer's cache hooks for the
duration of a call, validates the step count, and records ``pipe.cache_stats``. Outside a call the hooks are
bypassed, so a transformer shared with a stock pipeline (``from_pipe``) keeps behaving like the stock one.
"""

from __future__ import annotations

import inspect
import json
import warnings
from contextlib import nullcontext
from pathlib import Path

from diffusers import (DiTPipeline, FluxPipeline, PixArtAlphaPipeline, PixArtSigmaPipeline, SanaPipeline,
                       StableDiffusion3Pipeline)

from dit_cache.cache import CacheStats, apply_cache, get_cache_handle, remove_cache
from dit_cache.router import CacheRouter
from dit_cache.schedule import CacheSchedule
from dit_cache.units import cache_units, unit_layout

from .families import FluxCallChecks, SanaCallChecks, StableDiffusion3CallChecks
from .multi_concept import MultiConceptConfig, multi_concept_call


def _resolve_schedule(pipe, router, schedule, threshold) -> tuple[CacheSchedule, CacheRouter | None]:
    if (router is None) == (schedule is None):
        raise ValueError("Pass exactly one of router= (a CacheRouter or a path to router.safetensors) or schedule=.")
    num_units = len(cache_units(pipe.transformer))
    if schedule is not None:
        if not isinstance(schedule, CacheSchedule):
            raise TypeError(f"schedule must be a dit_cache.CacheSchedule, got {type(schedule).__name__}.")
        schedule.check_compatible(num_units=num_units)
        return schedule, None
    if isinstance(router, (str, Path)):
        router = CacheRouter.load(router)
    if not isinstance(router, CacheRouter):
        raise TypeError(f"router must be a CacheRouter or a path to router.safetensors, got {type(router).__name__}.")
    router.check_compatible(unit_layout(pipe.transformer))
    if router.num_units != num_units:
        raise ValueError(f"This router has {router.num_units} units but the transformer has {num_units}.")
    trained_with = router.metadata.get("scheduler_class")
    if trained_with and trained_with != type(pipe.scheduler).__name__:
        warnings.warn(
            f"This router was trained with {trained_with} but the pipeline uses {type(pipe.scheduler).__name__}; "
            "cache decisions may not transfer. Set pipe.scheduler to the training scheduler for best quality.",
            stacklevel=3,
        )
    return router.schedule(threshold), router


class CachedPipelineMixin:
    """Adds caching to a diffusers pipeline class; see :func:`accelerate`."""

    _dit_cache_schedule: CacheSchedule | None = None
    _dit_cache_router: CacheRouter | None = None
    cache_stats: CacheStats | None = None

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, router=None, schedule=None, threshold=None,
                        **kwargs):
        """The stock ``from_pretrained`` plus ``router=`` (path or CacheRouter) or ``schedule=``; None: no cache."""
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        return _install(pipe, router, schedule, threshold) if router is not None or schedule is not None else pipe

    @classmethod
    def from_pipe(cls, pipeline, *, router=None, schedule=None, threshold=None, **kwargs):
        """A new pipeline sharing ``pipeline``'s components; the original keeps running uncached."""
        pipe = super().from_pipe(pipeline, **kwargs)
        return _install(pipe, router, schedule, threshold) if router is not None or schedule is not None else pipe

    def to_json_string(self) -> str:
        """The stock pipeline's config: caching is attached at load time (``router=``), so a saved folder names the
        diffusers class and loads with stock diffusers, ``DiffusionPipeline.from_pretrained`` included."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = next(c for c in type(self).__mro__ if c.__module__.startswith("diffusers.")).__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def _requested_steps(self, args, kwargs) -> int:
        bound = inspect.signature(super().__call__).bind_partial(*args, **kwargs)
        for custom in ("timesteps", "sigmas"):
            if bound.arguments.get(custom) is not None:
                return len(bound.arguments[custom])
        parameters = inspect.signature(super().__call__).parameters
        return bound.arguments.get("num_inference_steps", parameters["num_inference_steps"].default)

    def __call__(self, *args, cache: bool = True, concepts=None, concept_config: MultiConceptConfig | None = None,
                 **kwargs):
        """The stock call. ``cache=False`` runs this call uncached; ``concepts=["cat", "dog"]`` applies the
        multi-concept fixes (PixArt pipelines) configured by ``concept_config``. A concept may be a phrase
        (``concepts=["red circle", "blue square"]``): Cross-Token NMS then keeps or suppresses its tokens together.
        For a list of prompts, ``concepts`` may also give one list per prompt."""
        handle = get_cache_handle(self.transformer)
        schedule = self._dit_cache_schedule
        cached = cache and handle is not None and schedule is not None
        if cached:
            order = getattr(self.scheduler, "order", 1)
            if order != 1:  # the cache counts one transformer call as one denoising step
                raise ValueError(f"{type(self.scheduler).__name__} calls the transformer {order} times per step, "
                                 "but cache schedules and routers count one call per step. Use a scheduler that "
                                 "calls it once (DPMSolverMultistepScheduler, DDIMScheduler, EulerDiscreteScheduler, "
                                 "...), or call the pipeline with cache=False.")
            steps = self._requested_steps(args, kwargs)
            if self._dit_cache_router is not None:
                self._dit_cache_router.check_compatible(unit_layout(self.transformer), steps)
            else:
                schedule.check_compatible(num_steps=steps)
            if handle.schedule is not schedule:
                handle.set_schedule(schedule)
            handle.reset()
        call = super().__call__
        if concepts:
            call = multi_concept_call(self, call, concepts, concept_config or MultiConceptConfig())
        try:
            with handle.scheduled() if cached else nullcontext():
                return call(*args, **kwargs)
        finally:
            # Every unit holds one output from the first step on, so the end of the call is the cache's peak.
            self.cache_stats = handle.stats if cached else None
            if cached:
                handle.reset()  # free the cached tensors between calls, also when the call raised


class AcceleratedPixArtAlphaPipeline(CachedPipelineMixin, PixArtAlphaPipeline):
    """``PixArtAlphaPipeline`` with learned caching: ``from_pretrained(model, router=...)``."""


class AcceleratedPixArtSigmaPipeline(CachedPipelineMixin, PixArtSigmaPipeline):
    """``PixArtSigmaPipeline`` with learned caching: ``from_pretrained(model, router=...)``."""


class AcceleratedDiTPipeline(CachedPipelineMixin, DiTPipeline):
    """``DiTPipeline`` with learned caching: ``from_pretrained(model, router=...)``."""


class AcceleratedStableDiffusion3Pipeline(StableDiffusion3CallChecks, CachedPipelineMixin, StableDiffusion3Pipeline):
    """``StableDiffusion3Pipeline`` (SD3, SD3.5) with learned caching: ``from_pretrained(model, router=...)``."""


class AcceleratedFluxPipeline(FluxCallChecks, CachedPipelineMixin, FluxPipeline):
    """``FluxPipeline`` (FLUX.1-dev / schnell) with learned caching: ``from_pretrained(model, router=...)``."""


class AcceleratedSanaPipeline(SanaCallChecks, CachedPipelineMixin, SanaPipeline):
    """``SanaPipeline`` with learned caching: ``from_pretrained(model, router=...)``."""


_ACCELERATED = {
    PixArtAlphaPipeline: AcceleratedPixArtAlphaPipeline,
    PixArtSigmaPipeline: AcceleratedPixArtSigmaPipeline,
    DiTPipeline: AcceleratedDiTPipeline,
    StableDiffusion3Pipeline: AcceleratedStableDiffusion3Pipeline,
    FluxPipeline: AcceleratedFluxPipeline,
    SanaPipeline: AcceleratedSanaPipeline,
}


def _accelerated_class(cls):
    if issubclass(cls, CachedPipelineMixin):
        return cls
    if cls not in _ACCELERATED:
        _ACCELERATED[cls] = type(f"Accelerated{cls.__name__}", (CachedPipelineMixin, cls), {})
    return _ACCELERATED[cls]


def _install(pipe, router, schedule, threshold):
    schedule, router = _resolve_schedule(pipe, router, schedule, threshold)
    handle = get_cache_handle(pipe.transformer) or apply_cache(pipe.transformer, schedule)
    handle.idle_bypassed()
    pipe._dit_cache_schedule, pipe._dit_cache_router = schedule, router
    return pipe


def accelerate(pipe, router=None, *, schedule=None, threshold: float | None = None):
    """Turn an existing diffusers pipeline into a cached one, in place; returns it.

    Example::

        pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
        pipe = dit_cache.accelerate(pipe, router=dit_cache.embedded_router_path())
        image = pipe("a red circle and a blue square").images[0]
        print(pipe.cache_stats.cache_ratio)
    """
    if not hasattr(pipe, "transformer"):
        raise TypeError(f"{type(pipe).__name__} has no transformer: dit-cache accelerates DiT-style pipelines.")
    original_class = type(pipe)
    _install(pipe, router, schedule, threshold)  # validates first: a bad router changes nothing
    if not isinstance(pipe, CachedPipelineMixin):
        pipe.__class__ = _accelerated_class(original_class)
        pipe._dit_cache_original_class = original_class
    return pipe


def decelerate(pipe):
    """Remove caching from a pipeline (and restore its stock class if ``accelerate`` changed it)."""
    remove_cache(pipe.transformer)
    pipe._dit_cache_schedule = pipe._dit_cache_router = None
    pipe.cache_stats = None
    original = pipe.__dict__.pop("_dit_cache_original_class", None)
    if original is not None:
        pipe.__class__ = original
    return pipe
