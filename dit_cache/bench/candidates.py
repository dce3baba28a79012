"""What the benchmark compares: a ``Candidate`` (a configuration that applies itself to a pipeline, resets per call
and removes itself), the ``BenchSetup`` the candidate families are built from, and the ``StepMeter`` that counts
what really ran (transformer calls, unit calls) whatever cache is applied."""

from __future__ import annotations

import contextlib

from dataclasses import dataclass, field
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
