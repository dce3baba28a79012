"""Wall-clock speed of cache schedules against the stock transformer, measured in one interleaved run."""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from .cache import apply_cache, remove_cache
from .flops import unit_flops
from .schedule import CacheSchedule


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


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def _generation_seconds(transformer, inputs: dict, num_steps: int) -> float:
    device = inputs["hidden_states"].device
    _synchronize(device)
    start = time.perf_counter()
    for _ in range(num_steps):
        transformer(**inputs)
    _synchronize(device)
    return time.perf_counter() - start


def compare_schedules(transformer, schedules: dict[str, CacheSchedule], inputs: dict, rounds: int = 5,
                      warmup: int = 1) -> list[SpeedResult]:
    """Time one generation per schedule, interleaved over ``rounds``; the stock model runs in every round too.

    Interleaving spreads background noise (other processes, thermal state) evenly over the candidates, so the
    ratios stay meaningful on a busy machine. Returns the stock model first.
    """
    num_steps = next(iter(schedules.values())).num_steps
    per_unit, total = unit_flops(transformer, **inputs)
    candidates = {"stock": None, **schedules}
    seconds = {name: [] for name in candidates}
    names = list(candidates)
    for round_index in tqdm(range(warmup + rounds), desc="benchmark rounds"):
        # Rotate the order each round so no candidate always runs first (cold caches) or last.
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            schedule = candidates[name]
            if schedule is not None:
                apply_cache(transformer, schedule)
            elapsed = _generation_seconds(transformer, inputs, num_steps)
            remove_cache(transformer)
            if round_index >= warmup:
                seconds[name].append(elapsed)
    stock = statistics.median(seconds["stock"])
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
