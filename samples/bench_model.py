"""Benchmark dit-cache against diffusers' caches on your own pipeline, from Python (``dit-cache bench`` does the
same from the shell).

    python samples/bench_model.py                                   # the embedded model, 4 prompts, a few minutes
    python samples/bench_model.py --model /path/to/sana --count 8 --pipeline_kwargs "{height: 512, width: 512}"
"""

from diffusers import DiffusionPipeline
from jsonargparse import CLI

import dit_cache
from dit_cache.bench.peer_bench import BenchConfig, run_benchmark


def main(model: str = "embedded", count: int = 4, steps: int = 20, settings_per_family: int = 1,
         pipeline_kwargs: dict | None = None, out: str = "outputs/bench_model"):
    """Args:
        model: a diffusers pipeline folder or hub id, or ``embedded``.
        count: scored images (prompts on seeds nothing was tuned on).
        settings_per_family: settings of each cache family to run (spread over its range).
        pipeline_kwargs: more keyword arguments of every pipeline call (height, width, ...).
        out: folder for bench.json, bench.md and pareto.png.
    """
    path = dit_cache.embedded_model_path() if model == "embedded" else model
    pipe = DiffusionPipeline.from_pretrained(path)
    config = BenchConfig(count=count, steps=steps, settings_per_family=settings_per_family,
                         pipeline_kwargs=pipeline_kwargs or {}, quality=True)
    results = run_benchmark(pipe, config, out, model_name=model)
    best = max((r for r in results["rows"] if r["group"] != "reference"), key=lambda r: r["speedup"])
    print(f"{len(results['rows'])} configurations; fastest: {best['label']} {best['speedup']:.2f}x at "
          f"{best['psnr_mean']:.1f} dB; table: {out}/bench.md")


if __name__ == "__main__":
    CLI(main, as_positional=False)
