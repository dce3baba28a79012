"""``apply_cache`` / ``remove_cache``: install the cache engine's hooks on a diffusers transformer."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from diffusers.hooks import HookRegistry

from .hooks import BYPASSED, GATED, SCHEDULE, UNIT_HOOK, CacheState, DenoisingStepHook, UnitCacheHook
from .schedule import CacheSchedule
from .units import CacheUnit, _unwrap, cache_units

_HANDLE_ATTRIBUTE = "_dit_cache_handle"


@dataclass(frozen=True)
class CacheStats:
    """Unit evaluations of one generation, and the memory its cache held."""

    steps: int
    computed: int
    reused: int
    cache_bytes: int

    @property
    def cache_ratio(self) -> float:
        total = self.computed + self.reused
        return self.reused / total if total else 0.0


class CacheHandle:
    """What ``apply_cache`` returns: the live schedule, statistics and controls of one cached transformer."""

    def __init__(self, transformer: torch.nn.Module, schedule: CacheSchedule, units: list[CacheUnit], history: int):
        self.transformer = transformer
        self.units = units
        self.schedule = schedule
        self.state = CacheState(schedule.mask, history)
        self._hooked: list[tuple[torch.nn.Module, str, bool]] = []
        self._step_hooks: list = []

    def set_schedule(self, schedule: CacheSchedule) -> None:
        """Swap the schedule (same unit count); starts a new generation."""
        schedule.check_compatible(num_units=len(self.units))
        self.schedule = schedule
        self.state.set_mask(schedule.mask)

    def reset(self) -> None:
        """Start a new generation at the next forward call and free the cached tensors."""
        self.state.reset()

    @property
    def stats(self) -> CacheStats:
        """Computed / reused unit counts of the current generation (the last one, once it has finished)."""
        steps = min(self.state.step, self.schedule.num_steps)
        computed = int(self.schedule.mask[:steps].sum())
        reused = steps * len(self.units) - computed
        return CacheStats(steps=steps, computed=computed, reused=reused, cache_bytes=self.cache_bytes)

    @property
    def cache_bytes(self) -> int:
        return self.state.cache_bytes

    @contextmanager
    def _mode(self, mode: str):
        previous = self.state.mode
        self.state.mode = mode
        try:
            yield self
        finally:
            self.state.mode = previous

    def bypassed(self):
        """Run the stock computation: no cache reads or writes, the step counter does not move."""
        return self._mode(BYPASSED)

    def scheduled(self):
        """Follow the schedule (the default after ``apply_cache``; pipelines idle bypassed between calls)."""
        return self._mode(SCHEDULE)

    def gated(self):
        """Training mode: every unit after the first step blends fresh and cached outputs (see ``set_gate``)."""
        return self._mode(GATED)

    def idle_bypassed(self) -> None:
        """Make bypass the mode outside ``scheduled()`` blocks: a transformer shared with a stock pipeline
        then behaves exactly like the stock one there."""
        self.state.mode = BYPASSED

    def set_gate(self, scores: torch.Tensor, threshold: float) -> None:
        """Soft scores ``[num_units]`` for the next step; units scoring above ``threshold`` refresh their cache."""
        self.state.gate_scores = scores
        self.state.gate_writes = (scores.detach() > threshold).tolist()

    def _register(self, module: torch.nn.Module, hook, name: str) -> None:
        had_registry = hasattr(module, "_diffusers_hook")
        HookRegistry.check_if_exists_or_initialize(module).register_hook(hook, name)
        self._hooked.append((module, name, had_registry))

    def _unregister_all(self) -> None:
        for hook in self._step_hooks:
            hook.remove()
        self._step_hooks.clear()
        for module, name, had_registry in reversed(self._hooked):
            registry = module._diffusers_hook
            registry.remove_hook(name, recurse=False)
            if not had_registry and not registry.hooks:
                # Leave the module exactly as we found it: no empty registry, no instance-level forward.
                del module._diffusers_hook
                instance_forward = module.__dict__.get("forward")
                if getattr(instance_forward, "__func__", None) is type(module).forward:
                    del module.forward
        self._hooked.clear()
        root_registry = getattr(self.transformer, "_diffusers_hook", None)
        if root_registry is not None and hasattr(root_registry, "invalidate_child_registries_cache"):
            root_registry.invalidate_child_registries_cache()

    def __repr__(self) -> str:
        return f"CacheHandle({type(self.transformer).__name__}, {self.schedule})"


def apply_cache(transformer: torch.nn.Module, schedule: CacheSchedule, *, history: int = 1) -> CacheHandle:
    """Install caching on ``transformer`` following ``schedule``; returns the handle.

    One forward call is one denoising step; after the schedule's last step the next call starts a new
    generation. ``history`` is how many computed outputs each unit keeps (1 suffices for reuse).

    Example::

        units = dit_cache.cache_units(pipe.transformer)
        schedule = dit_cache.CacheSchedule.uniform(20, len(units), interval=2)
        handle = dit_cache.apply_cache(pipe.transformer, schedule)
        image = pipe("a red circle", num_inference_steps=20).images[0]
        print(handle.stats)
    """
    if get_cache_handle(transformer) is not None:
        raise RuntimeError(
            f"{type(transformer).__name__} already has a cache applied. "
            "Call dit_cache.remove_cache(transformer) first, or handle.set_schedule(...) to change it."
        )
    if not isinstance(schedule, CacheSchedule):
        raise TypeError(f"schedule must be a dit_cache.CacheSchedule, got {type(schedule).__name__}.")
    units = cache_units(transformer)
    schedule.check_compatible(num_units=len(units))
    handle = CacheHandle(transformer, schedule, units, history)
    root = _unwrap(transformer)
    try:
        for unit in units:
            handle._register(root.get_submodule(unit.path), UnitCacheHook(handle.state, unit.index), UNIT_HOOK)
        handle._step_hooks = DenoisingStepHook(handle.state).attach(transformer)
    except Exception:
        handle._unregister_all()
        raise
    setattr(transformer, _HANDLE_ATTRIBUTE, handle)
    return handle


def remove_cache(transformer: torch.nn.Module) -> bool:
    """Remove caching and restore the stock model; returns False if no cache was applied."""
    handle = get_cache_handle(transformer)
    if handle is None:
        return False
    handle._unregister_all()
    handle.state.reset()
    delattr(transformer, _HANDLE_ATTRIBUTE)
    return True


def get_cache_handle(transformer: torch.nn.Module) -> CacheHandle | None:
    return getattr(transformer, _HANDLE_ATTRIBUTE, None)
