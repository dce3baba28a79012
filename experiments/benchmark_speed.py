"""Speed of caching at PixArt-alpha block shapes, against the stock transformer measured in the same run.

    python experiments/benchmark_speed.py                       # CPU, 4 blocks, 10 steps
    python experiments/benchmark_speed.py --device cuda --num_layers 28 --dtype float16
    python experiments/benchmark_speed.py --compile default     # + compiled rows (docs/compile.md)

Random weights: speed does not depend on what the weights are.
"""

import time

import torch
from jsonargparse import CLI
from torch._dynamo.utils import counters

from dit_cache import CachePlan, CacheSchedule, apply_cache, cache_units, remove_cache
from dit_cache.bench.speed import _generation_seconds, compare_schedules, format_results
from dit_cache.testing import pixart_alpha_shapes, step_inputs


def main(num_layers: int = 4, sample_size: int = 32, num_steps: int = 10, rounds: int = 5, batch: int = 2,
         text_tokens: int = 120, device: str = "cpu", dtype: str = "float32", compile: str | None = None):
    """Benchmark no cache, a full schedule (hook overhead), uniform schedules (FORA) of interval 2 and 3, and plans
    with the predicting actions: Taylor FORECAST (order 1 and 2), LINEAR (weights of plain reuse: the cost does not
    depend on their values) and CFG_SHARE.

    Args:
        num_layers: transformer blocks (PixArt-alpha has 28).
        sample_size: latent side; 32 gives 256 image tokens (256x256 images).
        num_steps: denoising steps per generation.
        rounds: timed generations per schedule (the median is reported).
        batch: 2 = one prompt with classifier-free guidance.
        text_tokens: T5 tokens (PixArt-alpha pads prompts to 120).
        compile: a torch.compile mode ("default", "reduce-overhead", "max-autotune", ...): also time compiled units
            (dit_cache.compile_units) without reuse, with uniform interval 2 and with a Taylor plan, each against
            the compiled units without reuse, and report the compile time.
    """
    torch_dtype = getattr(torch, dtype)
    transformer = pixart_alpha_shapes(num_layers, sample_size).to(device)
    if torch_dtype != torch.float32:
        transformer = transformer.to(torch_dtype)
    inputs = step_inputs(transformer, batch=batch, text_tokens=text_tokens)
    inputs = {k: v.to(device) if torch.is_tensor(v) else v for k, v in inputs.items()}
    for key in ("hidden_states", "encoder_hidden_states"):
        inputs[key] = inputs[key].to(torch_dtype)
    num_units = len(cache_units(transformer))
    schedules = {
        "full (hooks, no reuse)": CacheSchedule.full(num_steps, num_units),
        "uniform interval 2": CacheSchedule.uniform(num_steps, num_units, 2),
        "uniform interval 3": CacheSchedule.uniform(num_steps, num_units, 3),
        "taylor interval 2 order 1 (FORECAST)": CachePlan.taylor(num_steps, num_units, 2, order=1),
        "taylor interval 3 order 2 (FORECAST)": CachePlan.taylor(num_steps, num_units, 3, order=2),
        "linear interval 3, K=2 (LINEAR)": CachePlan.linear(num_steps, num_units, 3, order=2),
    }
    if batch % 2 == 0:  # CFG_SHARE splits a CFG batch
        schedules["cfg share interval 2 (CFG_SHARE)"] = CachePlan.cfg_share(num_steps, num_units, 2)
    results = compare_schedules(transformer, schedules, inputs, rounds=rounds)
    print(f"PixArt-alpha shapes: {num_layers} blocks, {(sample_size // 2) ** 2} image tokens, {text_tokens} text "
          f"tokens, batch {batch}, {num_steps} steps, {device} {dtype}, torch threads {torch.get_num_threads()}")
    print(format_results(results))
    overhead = results[1].seconds / results[0].seconds - 1
    print(f"hook overhead with the full schedule: {overhead:+.2%}")
    if compile is not None:
        compiled_rows(transformer, inputs, num_steps, num_units, rounds, compile)


def compiled_rows(transformer, inputs: dict, num_steps: int, num_units: int, rounds: int, mode: str) -> None:
    """Compiled + cached against compiled uncached (the full plan on compiled units), measured in one run.

    The shipped router is trained for the 8-block embedded model and cannot plan for these shapes; the Taylor plan
    (interval 3, order 1) stands in for a router's plan: unit-wise skips with forecasting, like the router's.
    """
    options = {} if mode == "default" else {"mode": mode}
    full = CachePlan.full(num_steps, num_units)
    start = time.perf_counter()
    apply_cache(transformer, full, compile=options or True)
    first = _generation_seconds(transformer, inputs, num_steps)  # compiles every unit's graph
    second = _generation_seconds(transformer, inputs, num_steps)
    remove_cache(transformer)
    print(f"compile time (first compiled generation minus the second): {first - second:.1f} s "
          f"({time.perf_counter() - start:.1f} s for both)")
    baseline = "compiled, no reuse (full plan)"
    plans = {
        baseline: full,
        "compiled + uniform interval 2": CachePlan.uniform(num_steps, num_units, 2),
        "compiled + taylor interval 3 order 1 (router-like)": CachePlan.taylor(num_steps, num_units, 3, order=1),
    }
    compiles_before = counters["frames"]["ok"]
    results = compare_schedules(transformer, plans, inputs, rounds=rounds, compile=options or True,
                                baseline=baseline)
    print(f"torch.compile mode {mode!r}, units compiled (dynamic=False); speedups over {baseline!r}:")
    print(format_results(results))
    print(f"graphs compiled during the timed rounds (a plan change must not recompile): "
          f"{counters['frames']['ok'] - compiles_before}")


if __name__ == "__main__":
    CLI(main, as_positional=False)
