"""Drop-in accelerated diffusers pipelines and the one-line ``accelerate(pipe, router=...)``.

The pipelines' own ``__call__`` runs untouched; the mixin only arms the transformer's cache hooks for the
duration of a call, validates the step count, and records ``pipe.cache_stats``. Outside a call the hooks are
bypassed, so a transformer shared with a stock pipeline (``from_pipe``) keeps behaving like the stock one.
"""

from __future__ import annotations

import inspect
import json
import warnings
from pathlib import Path

import diffusers

from dit_cache.cache import CacheStats, apply_cache, compile_units, get_cache_handle, remove_cache
from dit_cache.compile import compile_options
from dit_cache.deprecation import skip_flops_argument
from dit_cache.families import FAMILIES, ModelFamily, family_of_pipeline
from dit_cache.router import CacheRouter
from dit_cache.plan import Action, CachePlan, as_plan
from dit_cache.units import cache_units, unit_layout

from .families import check_family_call
from .multi_concept import MultiConceptConfig, multi_concept_call


def _resolve_plan(pipe, router, schedule, plan, threshold, flops=None) -> tuple[CachePlan, CacheRouter | None]:
    # ``flops`` here is the share of the units' FLOPs to skip (the public keyword: skip_flops=).
    given = [name for name, value in (("router", router), ("schedule", schedule), ("plan", plan)) if value is not None]
    if len(given) != 1:
        raise ValueError("Pass exactly one of router= (a CacheRouter or a path to router.safetensors), plan= (a "
                         f"CachePlan) or schedule= (a CacheSchedule); got {', '.join(given) or 'none'}.")
    num_units = len(cache_units(pipe.transformer))
    if router is None and flops is not None:
        raise ValueError("skip_flops= chooses a router's budget; pass router= with it (a plan's budget is fixed).")
    if router is None:
        plan = as_plan(plan if plan is not None else schedule)
        plan.check_compatible(num_units=num_units)
        return plan, None
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
    return router.plan(threshold, skip_flops=flops), router


class CachedPipelineMixin:
    """Adds caching to a diffusers pipeline class; see :func:`accelerate`."""

    _dit_cache_plan: CachePlan | None = None
    _dit_cache_router: CacheRouter | None = None
    cache_stats: CacheStats | None = None

    @property
    def model_family(self) -> ModelFamily:
        """This pipeline's family record (``dit_cache.families``): its units, CFG layout, refusals."""
        return family_of_pipeline(self)

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *, router=None, schedule=None, plan=None,
                        threshold=None, skip_flops=None, flops=None, **kwargs):
        """The stock ``from_pretrained`` plus ``router=`` (path or CacheRouter), ``plan=`` or ``schedule=``;
        none of them: no cache. ``skip_flops``: the router's budget (see :func:`accelerate`)."""
        flops = skip_flops_argument(skip_flops, flops, f"{cls.__name__}.from_pretrained")
        pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        return _install(pipe, router, schedule, plan, threshold, flops) if (router, schedule, plan) != (None,) * 3 else pipe

    @classmethod
    def from_pipe(cls, pipeline, *, router=None, schedule=None, plan=None, threshold=None, skip_flops=None,
                  flops=None, **kwargs):
        """A new pipeline sharing ``pipeline``'s components; the original keeps running uncached."""
        flops = skip_flops_argument(skip_flops, flops, f"{cls.__name__}.from_pipe")
        pipe = super().from_pipe(pipeline, **kwargs)
        return _install(pipe, router, schedule, plan, threshold, flops) if (router, schedule, plan) != (None,) * 3 else pipe

    def to_json_string(self) -> str:
        """The stock pipeline's config: caching is attached at load time (``router=``), so a saved folder names the
        diffusers class and loads with stock diffusers, ``DiffusionPipeline.from_pretrained`` included."""
        config = json.loads(super().to_json_string())
        config["_class_name"] = next(c for c in type(self).__mro__ if c.__module__.startswith("diffusers.")).__name__
        return json.dumps(config, indent=2, sort_keys=True) + "\n"

    def _call_argument(self, args, kwargs, name: str):
        """The value ``name`` takes in this call: given, or the stock ``__call__``'s default."""
        signature = inspect.signature(super().__call__)
        bound = signature.bind_partial(*args, **kwargs)
        if name in bound.arguments:
            return bound.arguments[name]
        parameter = signature.parameters.get(name)
        return None if parameter is None else parameter.default

    def _requested_steps(self, args, kwargs) -> int:
        for custom in ("timesteps", "sigmas"):
            value = self._call_argument(args, kwargs, custom)
            if value is not None:
                return len(value)
        return self._call_argument(args, kwargs, "num_inference_steps")

    def _check_call(self, plan: CachePlan, args, kwargs) -> None:
        """Everything that would make this call's cache wrong, refused (or warned about) before generating."""
        order = getattr(self.scheduler, "order", 1)
        if order != 1:  # the cache counts one transformer call as one denoising step
            raise ValueError(f"{type(self.scheduler).__name__} calls the transformer {order} times per step, "
                             "but cache plans and routers count one call per step. Use a scheduler that "
                             "calls it once (DPMSolverMultistepScheduler, DDIMScheduler, EulerDiscreteScheduler, "
                             "...), or call the pipeline with cache=False.")
        steps = self._requested_steps(args, kwargs)
        router = self._dit_cache_router
        if router is not None:
            router.check_compatible(unit_layout(self.transformer), steps)
        else:
            plan.check_compatible(num_steps=steps)
        guidance = self._call_argument(args, kwargs, "guidance_scale")
        layout = self.model_family.cfg
        if plan.uses(Action.CFG_SHARE) and (layout.conditional_half is None or not guidance or guidance <= 1):
            raise ValueError("This plan uses CFG_SHARE, which needs a classifier-free-guidance batch, but this call "
                             f"has none ({type(self).__name__}, guidance_scale={guidance}; the pipeline runs "
                             f"{layout.value}). Use a guidance scale > 1 with a family that batches CFG, or a plan "
                             "without CFG_SHARE.")
        trained_at = router.metadata.get("guidance_scale") if router is not None else None
        if trained_at is not None and guidance is not None and float(guidance) != float(trained_at):
            warnings.warn(f"This router was trained at guidance_scale={trained_at} but the call uses {guidance}; "
                          f"cache decisions may not transfer. Pass guidance_scale={trained_at}.", stacklevel=3)

    def __call__(self, *args, cache: bool = True, concepts=None, concept_config: MultiConceptConfig | None = None,
                 **kwargs):
        """The stock call. ``cache=False`` runs this call uncached; ``concepts=["cat", "dog"]`` applies the
        multi-concept fixes (PixArt pipelines) configured by ``concept_config``. A concept may be a phrase
        (``concepts=["red circle", "blue square"]``): Cross-Token NMS then keeps or suppresses its tokens together.
        For a list of prompts, ``concepts`` may also give one list per prompt."""
        plan = self._dit_cache_plan
        cached = cache and plan is not None
        handle = get_cache_handle(self.transformer)
        check_family_call(self, self.model_family, cached, concepts, kwargs)
        if cached:
            if handle is None:
                raise RuntimeError("The cache was removed from this pipeline's transformer (dit_cache.remove_cache "
                                   "on it). Call dit_cache.accelerate(pipe, ...) again, or pipe(..., cache=False).")
            self._check_call(plan, args, kwargs)
        call = super().__call__
        if concepts:
            call = multi_concept_call(self, call, concepts, concept_config or MultiConceptConfig())
        if not cached:
            self.cache_stats = None
            return call(*args, **kwargs)
        with handle.generation(plan) as states:  # CFG_SHARE computes the family's conditional half
            try:
                return call(*args, **kwargs)
            finally:
                # Every unit holds its outputs from the first step on, so the end of the call is the cache's peak;
                # recorded also when the call raised midway. Leaving the block frees the cache.
                self.cache_stats = CacheStats.of(states)


_ACCELERATED: dict[type, type] = {}


def _accelerated_class(cls):
    """``Accelerated<Name>``: ``cls`` with the caching mixin in front (one class per pipeline class)."""
    if issubclass(cls, CachedPipelineMixin):
        return cls
    if cls not in _ACCELERATED:
        doc = (f"``{cls.__name__}`` with learned caching: ``from_pretrained(model, router=...)``, "
               "``from_pipe(pipe, router=...)``; its family record: ``pipe.model_family``.")
        _ACCELERATED[cls] = type(f"Accelerated{cls.__name__}", (CachedPipelineMixin, cls),
                                 {"__doc__": doc, "__module__": __name__})
    return _ACCELERATED[cls]


def accelerated_pipeline_names() -> list[str]:
    """The drop-in classes, one per pipeline of the registry: ``AcceleratedPixArtAlphaPipeline``, ..."""
    return [f"Accelerated{name}" for name in FAMILIES.pipeline_classes()]


def __getattr__(name: str):
    # The drop-in classes are built from the registry on first use: importing one diffusers pipeline class per
    # family up front would load every family's text encoder code.
    if name.startswith("Accelerated") and name[len("Accelerated"):] in FAMILIES.pipeline_classes():
        return _accelerated_class(getattr(diffusers, name[len("Accelerated"):]))
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _install(pipe, router, schedule, plan, threshold, flops=None, compile=False):
    options = compile_options(compile)  # checked before anything changes
    plan, router = _resolve_plan(pipe, router, schedule, plan, threshold, flops)
    handle = get_cache_handle(pipe.transformer) or apply_cache(pipe.transformer, plan)
    if options is not None and handle.compile_options != options:
        compile_units(handle, **options)
    handle.idle_bypassed()
    handle.pipelines.add(pipe)
    pipe._dit_cache_plan, pipe._dit_cache_router = plan, router
    return pipe


def accelerate(pipe, router=None, *, plan=None, schedule=None, threshold: float | None = None, compile=False,
               skip_flops: float | None = None, flops: float | None = None):
    """Turn an existing diffusers pipeline into a cached one, in place; returns it.

    ``router``: a trained router (path or ``CacheRouter``, at its threshold unless ``threshold`` is given);
    ``plan``: a ``CachePlan`` (e.g. ``CachePlan.taylor(20, units, interval=3)``); ``schedule``: a ``CacheSchedule``.
    ``compile=True`` (or a dict of ``torch.compile`` options) compiles each unit's computation; the cache
    decisions stay eager, so no plan change recompiles (docs/compile.md).
    ``skip_flops``: for a router that serves a range of budgets (``objective: search``), the share of the units'
    FLOPs to skip, e.g. ``skip_flops=0.55``; a budget outside the router's range is refused
    (``router.flops_range``). ``flops=`` is its old name (deprecated).

    Example::

        pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
        pipe = dit_cache.accelerate(pipe, router=dit_cache.embedded_router_path(), skip_flops=0.55)
        image = pipe("a red circle and a blue square", guidance_scale=2.0).images[0]
        print(pipe.cache_stats.cache_ratio)
    """
    if not hasattr(pipe, "transformer"):
        raise TypeError(f"{type(pipe).__name__} has no transformer: dit-cache accelerates DiT-style pipelines.")
    original_class = type(pipe)
    flops = skip_flops_argument(skip_flops, flops, "accelerate")
    _install(pipe, router, schedule, plan, threshold, flops, compile)  # validates first: a bad router changes nothing
    if not isinstance(pipe, CachedPipelineMixin):
        pipe.__class__ = _accelerated_class(original_class)
        pipe._dit_cache_original_class = original_class
    return pipe


def decelerate(pipe):
    """Remove caching from a pipeline (and restore its stock class if ``accelerate`` changed it).

    The transformer's hooks go when the last accelerated pipeline sharing it is decelerated; the others keep
    caching."""
    handle = get_cache_handle(pipe.transformer)
    if handle is not None:
        handle.pipelines.discard(pipe)
        if not handle.pipelines:
            remove_cache(pipe.transformer)
    pipe._dit_cache_plan = pipe._dit_cache_router = None
    pipe.cache_stats = None
    original = pipe.__dict__.pop("_dit_cache_original_class", None)
    if original is not None:
        pipe.__class__ = original
    return pipe
