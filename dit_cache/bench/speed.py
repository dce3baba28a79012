"""Wall-clock speed of cache plans on a transformer, against the stock model in the same interleaved run
(``compare_schedules``; ``experiments/benchmark_speed.py``, ``experiments/benchmark_families.py``)."""

from __future__ import annotations

import gc
import statistics
import time
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..cache import apply_cache, remove_cache
from ..families import family_of
from ..flops import unit_flops
from ..plan import CachePlan
from ..schedule import CacheSchedule
from ..units import transformer_blocks


@dataclass
class SpeedResult:
    name: str
    cache_ratio: float
    seconds: float  # median seconds per generation
    speedup: float  # stock seconds / seconds
    theoretical_speedup: float

    @property
    def efficiency(self) -> float:
        """Achieved / FLOP-theoretical speedup."""
        return self.speedup / self.theoretical_speedup


@contextmanager
def collector_paused():
    """Python's cyclic garbage collector off for a timed region, as ``timeit`` does: a full collection of a loaded
    pipeline's ~500,000 objects takes ~0.4 s on this CPU, and it lands in whichever call happens to cross the
    collector's threshold (more often after a configuration that allocates on apply), not in the one that caused it.
    """
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _BlockClock:
    """Seconds spent inside the transformer blocks (forward pre-hook to forward hook of each block)."""

    def __init__(self, transformer, device):
        self.seconds, self.device = 0.0, device
        self._handles = [hook for block in transformer_blocks(transformer)
                         for hook in (block.register_forward_pre_hook(self._start),
                                      block.register_forward_hook(self._stop))]

    def _start(self, module, args):
        _synchronize(self.device)
        self._started = time.perf_counter()

    def _stop(self, module, args, output):
        _synchronize(self.device)
        self.seconds += time.perf_counter() - self._started

    def remove(self):
        for handle in self._handles:
            handle.remove()


@torch.no_grad()
def _generation_seconds(transformer, inputs: dict, num_steps: int, per_block: bool = False) -> float:
    """Seconds of one generation of ``num_steps`` steps: the whole forward, or (``per_block``) the blocks only."""
    family = family_of(transformer)
    key = family.timestep_argument
    device, batch = inputs[key].device, inputs[key].shape[0]
    # Decreasing scheduler timesteps, as a sampler gives them, mapped as the family's pipeline passes them:
    # forecasting extrapolates over them, and a timestep that goes back starts a new generation. Built before the
    # clock starts.
    config = getattr(transformer, "_orig_mod", transformer).config
    timesteps = [family.timesteps(999 - step * 999 // num_steps, batch, config).to(device)
                 for step in range(num_steps)]
    clock = _BlockClock(transformer, device) if per_block else None
    try:
        with collector_paused():
            _synchronize(device)
            start = time.perf_counter()
            for timestep in timesteps:
                transformer(**{**inputs, key: timestep})
            _synchronize(device)
            seconds = time.perf_counter() - start
        return seconds if clock is None else clock.seconds
    finally:
        if clock is not None:
            clock.remove()


def compare_schedules(transformer, schedules: dict[str, CacheSchedule | CachePlan], inputs: dict, rounds: int = 5,
                      warmup: int = 1, compile=False, baseline: str = "stock",
                      per_block: bool = False) -> list[SpeedResult]:
    """Time one generation per schedule, interleaved over ``rounds``; the stock model runs in every round too.

    ``compile``: passed to ``apply_cache`` (the warmup rounds then also compile). Speedups are over ``baseline``,
    the stock model or one of ``schedules`` (e.g. the full plan, compiled: compiled + cached over compiled).
    ``per_block``: time and count FLOPs inside the transformer blocks only, leaving out the embeddings and the
    final layer, which a shallow copy of a deep model (1-2 of its 20-60 blocks) would otherwise overweight.

    Interleaving spreads background noise (other processes, thermal state) evenly over the candidates, so the
    ratios stay meaningful on a busy machine. Returns the stock model first.
    """
    num_steps = next(iter(schedules.values())).num_steps
    per_unit, total = unit_flops(transformer, blocks_only=per_block, **inputs)
    candidates = {"stock": None, **schedules}
    seconds = {name: [] for name in candidates}
    if baseline not in seconds:
        raise ValueError(f"baseline must be 'stock' or one of the schedules, got {baseline!r}.")
    names = list(candidates)
    for round_index in tqdm(range(warmup + rounds), desc="benchmark rounds"):
        # Rotate the order each round so no candidate always runs first (cold caches) or last.
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            schedule = candidates[name]
            if schedule is not None:
                apply_cache(transformer, schedule, compile=compile)
            elapsed = _generation_seconds(transformer, inputs, num_steps, per_block)
            remove_cache(transformer)
            if round_index >= warmup:
                seconds[name].append(elapsed)
    stock = statistics.median(seconds[baseline])
    results = []
    for name, schedule in candidates.items():
        median = statistics.median(seconds[name])
        schedule = schedule or CacheSchedule.full(num_steps, len(per_unit))
        results.append(
            SpeedResult(name, schedule.cache_ratio, median, stock / median, schedule.theoretical_speedup(per_unit, total))
        )
    return results


def format_results(results: list[SpeedResult]) -> str:
    lines = [
        "| schedule | CUR | s / generation | measured speedup | FLOP-theoretical | measured / theoretical |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(
            f"| {r.name} | {r.cache_ratio:.0%} | {r.seconds:.3f} | {r.speedup:.3f}x | {r.theoretical_speedup:.3f}x "
            f"| {r.efficiency:.3f} |"
        )
    return "\n".join(lines)
