"""The peer benchmark (``dit-cache bench``): dit-cache's schedules and routers against diffusers' own caches on a
real pipeline, measured in one interleaved run: quality against the uncached image of the same input and seed,
measured cache ratio, speedup, and a Pareto plot. The candidates are set up in :mod:`dit_cache.bench.peers`, the
timed rounds run in :mod:`dit_cache.bench.rounds`; docs/benchmark.md explains how.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .rounds import RestorationError, Rounds, can_fork, default_workers, measure  # noqa: F401  (RestorationError: the bench's error)


# --- the peer benchmark: dit-cache against diffusers' own caches (``dit-cache bench``) ---------------------------

MATPLOTLIB_MISSING = 'the Pareto plot needs matplotlib: pip install "dit-cache[bench]"'


def _prompt_inputs(pipe, count: int, seed: int) -> list[dict]:
    from ..toy.evaluation import prompt_set

    prompts = prompt_set(1, count // 2, seed) + prompt_set(2, count - count // 2, seed + 1)
    return [{"prompt": prompt} for prompt in prompts]


def _caption_inputs(pipe, count: int, seed: int) -> list[dict]:
    from ..families.prompts import can_clean_captions

    return [{**item, "clean_caption": can_clean_captions()} for item in _prompt_inputs(pipe, count, seed)]


def _class_label_inputs(pipe, count: int, seed: int) -> list[dict]:
    import numpy as np

    labels = sorted(set(pipe.labels.values())) if getattr(pipe, "labels", None) else list(range(1000))
    order = np.random.default_rng(seed).permutation(len(labels))
    return [{"class_labels": [int(labels[order[i % len(labels)]])]} for i in range(count)]


# A family record's ``bench_inputs`` -> the keyword arguments of each scored image.
_BENCH_INPUTS = {"prompts": _prompt_inputs, "captions": _caption_inputs, "class_labels": _class_label_inputs}


def bench_family(pipe):
    """The family record of ``pipe``; a TypeError naming the supported pipelines for anything else."""
    from ..families import family_of_pipeline

    return family_of_pipeline(pipe)


@dataclass
class BenchConfig:
    """Settings of one peer benchmark run. ``families`` are keys of :data:`dit_cache.bench.peers.FAMILIES`."""

    count: int = 24  # sized with 52 configurations to ~21 min on 2 free cores (docs/benchmark.md, Cost)
    seed: int = 90_000  # scored prompts use seeds seed .. seed + count - 1, never used for tuning
    calibration_count: int = 4  # MagCache calibration images, on prompts and seeds apart from the scored ones
    calibration_seed: int = 10_000  # the calibration range the router's training draws from too
    steps: int = 20
    guidance_scale: float | None = None  # None: the embedded model's
    families: tuple[str, ...] = ()  # empty: all
    routers: tuple[str, ...] = ()  # router files besides the shipped one (embedded model only)
    settings_per_family: int | None = None  # None: all; k: k settings spread over each family's range
    threads: int = 1  # torch threads of each worker
    # Processes measuring shares of the inputs at once (each its own warm-up and checks). None: 2 where there are
    # two CPUs per worker and processes fork (Linux), else 1.
    workers: int | None = None
    resamples: int = 10_000
    plot: bool = True
    # False: speed only (cache ratio, FLOPs skipped, speedup), e.g. on randomly initialised tiny models, where
    # image quality against the uncached image means nothing. No Pareto plot then (its y axis is PSNR).
    quality: bool = True
    # More keyword arguments of every pipeline call (height, width, max_sequence_length, ...).
    pipeline_kwargs: dict = field(default_factory=dict)

    def check(self) -> None:
        """One ValueError naming the fix for bad settings, before any model loads or file is written."""
        from .peers import FAMILIES

        if self.count < 1:
            raise ValueError(f"--count must be at least 1 (got {self.count}).")
        if self.steps < 2:
            raise ValueError(f"--steps must be at least 2 (got {self.steps}).")
        if self.workers is not None and self.workers < 1:
            raise ValueError(f"--workers must be at least 1 (got {self.workers}).")
        if (self.workers or 1) > 1 and not can_fork():
            raise ValueError(f"--workers {self.workers} needs processes that fork (Linux); use --workers 1 here.")
        if self.settings_per_family is not None and self.settings_per_family < 1:
            raise ValueError(f"--settings-per-family must be at least 1 (got {self.settings_per_family}).")
        unknown = [name for name in self.families if name not in FAMILIES]
        if unknown:
            raise ValueError(f"unknown candidate famil{'y' if len(unknown) == 1 else 'ies'} "
                             f"{', '.join(map(repr, unknown))}; choose from {', '.join(FAMILIES)}.")
        if "cache_dit" in self.selected_families:
            from .cache_dit_peer import require_cache_dit

            require_cache_dit()
        if "magcache" in self.selected_families and self.calibration_count < 1:
            raise ValueError("MagCache needs --calibration-count >= 1 (or leave magcache out of --families).")
        for path in self.routers:
            if not Path(path).is_file():
                raise ValueError(f"--router {path}: no such file.")
        reserved = sorted(set(self.pipeline_kwargs) & RESERVED_PIPELINE_KWARGS)
        if reserved:
            raise ValueError(f"pipeline keyword argument{'s' if len(reserved) > 1 else ''} {', '.join(reserved)} "
                             f"{'are' if len(reserved) > 1 else 'is'} set by the benchmark; use --steps, --guidance, "
                             f"--count and --seed instead.")
        if self.plot and self.quality:
            require_matplotlib()

    def resolved_workers(self) -> int:
        return self.workers if self.workers is not None else default_workers(self.threads)

    @property
    def selected_families(self) -> tuple[str, ...]:
        from .peers import FAMILIES

        return tuple(self.families) or tuple(FAMILIES)


# Set by the benchmark itself for every call (inputs, seeds, steps, guidance, decoded images).
RESERVED_PIPELINE_KWARGS = frozenset({"prompt", "class_labels", "generator", "num_inference_steps", "guidance_scale",
                                      "output_type", "clean_caption"})


def require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ImportError(MATPLOTLIB_MISSING) from None
    return matplotlib


def _spread(items: list, k: int | None) -> list:
    """``k`` items spread evenly over ``items`` (ends included): the family's range, fewer settings."""
    if k is None or k >= len(items):
        return items
    if k == 1:
        return [items[len(items) // 2]]
    return [items[round(i * (len(items) - 1) / (k - 1))] for i in range(k)]


def build_candidates(setup, config: BenchConfig) -> list:
    """The uncached reference and every selected family's candidates."""
    from .peers import FAMILIES, UNCACHED, format_left_out

    candidates = [UNCACHED]
    for name in config.selected_families:
        candidates += _spread(FAMILIES[name](setup), config.settings_per_family)
    if len(candidates) == 1:
        reasons = f" ({format_left_out(setup.left_out)})" if setup.left_out else ""
        raise ValueError(f"the selection {', '.join(config.selected_families)} has no candidate for this model"
                         f"{reasons}.")
    return candidates


@torch.no_grad()
def run_benchmark(pipe, config: BenchConfig, out: str | Path, candidates: list | None = None,
                  router_paths: dict[str, str] | None = None, model_name: str = "") -> dict:
    """Run the peer benchmark on ``pipe`` and write ``bench.json``, ``bench.md`` and ``pareto.png`` to ``out``.

    Every configuration runs once per image, interleaved (order rotated per image, after one untimed warm-up
    call each); every error figure is against the uncached image of the same input and seed. After each
    configuration is removed the model must be structurally stock, and an uncached call must reproduce the
    reference image bitwise (checked once per configuration, and once at the end), or this raises.

    A diffusers cache that fails on this model during its warm-up call (a block type its hook does not know) is
    left out, with the error, in ``results["left_out"]`` and under the table; a dit-cache configuration that fails
    raises. ``BenchConfig(quality=False)`` measures speed only (cache ratio, FLOPs skipped, speedup).

    Example::

        pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
        results = run_benchmark(pipe, BenchConfig(count=4, families=("uniform", "taylorseer")), "bench_out")
        print(results["table"])

    On a tiny random SD3, FLUX.1 or Sana pipeline (speed only)::

        pipe = dit_cache.testing.tiny_flux_pipeline()
        config = BenchConfig(count=2, steps=6, quality=False, pipeline_kwargs={"height": 64, "width": 64})
        print(run_benchmark(pipe, config, "bench_flux")["table"])
    """
    config.check()
    threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)  # timing on one thread: comparable across runs on a shared machine
    try:
        return _run(pipe, config, Path(out), candidates, router_paths, model_name)
    finally:
        torch.set_num_threads(threads)


def _run(pipe, config: BenchConfig, out: Path, candidates, router_paths, model_name: str) -> dict:
    from . import peers
    from ..embedded import EMBEDDED_GUIDANCE_SCALE
    from ..flops import step_flops

    family = bench_family(pipe)
    pipe.set_progress_bar_config(disable=True)
    guidance = config.guidance_scale if config.guidance_scale is not None else EMBEDDED_GUIDANCE_SCALE
    base_call = {**config.pipeline_kwargs, "num_inference_steps": config.steps, "guidance_scale": guidance,
                 "output_type": "np"}
    inputs = _BENCH_INPUTS[family.bench_inputs](pipe, config.count, config.seed)
    seeds = [config.seed + i for i in range(config.count)]
    meter = peers.StepMeter(pipe.transformer)
    try:
        unit_flops, _ = step_flops(pipe.transformer)
        setup = peers.BenchSetup(pipe, config.steps, unit_flops, meter, router_paths or {},
                                 cfg_layout=family.cfg)
        needs_mag = candidates is None and "magcache" in config.selected_families
        total = (config.calibration_count if needs_mag else 0)
        progress = tqdm(total=total, desc="dit-cache bench", unit="image")

        def call(index: int, seed: int | None = None, item: dict | None = None) -> dict:
            generator = torch.Generator().manual_seed(seeds[index] if seed is None else seed)
            return {**base_call, **(item or inputs[index]), "generator": generator}

        if needs_mag:
            calibration = _BENCH_INPUTS[family.bench_inputs](pipe, config.calibration_count, config.calibration_seed)
            calls = [call(0, config.calibration_seed + i, item) for i, item in enumerate(calibration)]
            source = {"model": model_name or type(pipe).__name__, "guidance_scale": guidance,
                      "calibration_seed": config.calibration_seed, "calibration_count": config.calibration_count,
                      "pipeline_kwargs": config.pipeline_kwargs}
            try:
                setup.mag_ratios = peers.calibrate_mag_cache(pipe, calls, config.steps, out / "magcache_ratios.json",
                                                             progress, source)
            except Exception as error:  # MagCache's hook does not know this model's blocks: reported
                peers.remove_diffusers_hooks(pipe.transformer)
                setup.leave_out("MagCache", "calibration: " + peers.describe_failure("MagCache", pipe, error))
        candidates = candidates if candidates is not None else build_candidates(setup, config)
        rounds = Rounds(pipe, candidates, setup, unit_flops, call, config.count, config.threads)
        workers = min(config.resolved_workers(), config.count)
        progress.total += workers * rounds.calls_per_worker() + config.count * len(candidates)
        progress.refresh()
        candidates, records = measure(rounds, workers, lambda: progress.update(1))
        progress.close()
    finally:
        meter.remove()
    results = score(candidates, records, inputs, seeds, family, config)
    results["left_out"] = dict(setup.left_out)
    results["meta"] = {"model": model_name or type(pipe).__name__, "pipeline": type(pipe).__name__,
                       "steps": config.steps, "guidance_scale": guidance, "count": config.count,
                       "seeds": [seeds[0], seeds[-1]], "calibration_seed": config.calibration_seed,
                       "calibration_count": config.calibration_count if any(
                           c.family == "MagCache" for c in candidates) else 0,
                       "torch_threads": config.threads, "workers": workers, "mag_ratios": setup.mag_ratios, "quality": config.quality,
                       "pipeline_kwargs": config.pipeline_kwargs,
                       "unit_flops": unit_flops.tolist()}
    write_outputs(results, out, plot=config.plot and config.quality)
    return results


def score(candidates, records: dict, inputs: list[dict], seeds: list[int], family,
          config: BenchConfig) -> dict:
    """Per-configuration figures, per image and aggregated: speed and measured cache ratios, and (unless
    ``config.quality`` is off) the error against the uncached images."""
    import numpy as np

    reference_seconds = np.asarray(records["uncached"]["seconds"])
    rows = []
    for candidate in candidates:
        record = records[candidate.label]
        ratios = reference_seconds / np.asarray(record["seconds"])
        counts = record["counts"]
        engine = [c["engine_cache_ratio"] for c in counts]
        rows.append({
            "family": candidate.family, "label": candidate.label, "group": candidate.group,
            "settings": candidate.settings,
            "cache_ratio": float(np.mean([c["cache_ratio"] for c in counts])),
            "skipped_flop_share": float(np.mean([c["skipped_flop_share"] for c in counts])),
            "engine_cache_ratio": None if engine[0] is None else float(np.mean(engine)),
            # The uncached seconds of the images over this configuration's: a median of per-image ratios falls in the
            # gap between the two speeds of a configuration that gives images different plans (the adaptive router).
            "speedup": float(reference_seconds.sum() / np.sum(record["seconds"])),
            "speedup_median": float(np.median(ratios)),
            "speedup_iqr": [float(np.quantile(ratios, 0.25)), float(np.quantile(ratios, 0.75))],
            "mse_mean": None, "mse_median": None, "psnr_mean": None, "psnr_interval": None, "ssim_mean": None,
            "concept_accuracy": None,
            "per_image": [{"input": {k: v for k, v in inputs[i].items() if k != "clean_caption"}, "seed": seeds[i],
                           "seconds": float(record["seconds"][i]), "time_ratio": float(ratios[i]),
                           "cache_ratio": counts[i]["cache_ratio"],
                           "skipped_flop_share": counts[i]["skipped_flop_share"]}
                          for i in range(len(seeds))],
        })
        if config.quality:
            _score_quality(rows[-1], record["images"], records["uncached"]["images"], inputs, family, config)
    for row in rows:
        rival = nearest_rival(row, rows) if config.quality else None
        row["vs_nearest_rival"] = None if rival is None else {"label": rival["label"], **paired_comparison(
            row, rival, config.resamples)}
    return {"rows": rows}


def _score_quality(row: dict, images: list, reference_images: list, inputs: list[dict], family,
                   config: BenchConfig) -> None:
    """Fill ``row`` with the error of ``images`` against the uncached ones: MSE, PSNR (bootstrap interval), SSIM,
    and concept accuracy where the detector knows the captions."""
    from PIL import Image

    from ..metrics import image_errors, paired_difference, to_uint8
    from ..toy.shapes import concept_accuracy

    errors = image_errors(images, reference_images)
    mse, psnr, ssim = errors["mse"], errors["psnr"], errors["ssim"]
    # paired_difference against zeros is the plain bootstrap interval of the mean.
    psnr_interval = paired_difference(psnr.tolist(), [0.0] * len(psnr), config.resamples)
    if family.concept_scored:
        pil = [Image.fromarray(to_uint8(a)) for a in images]
        row["concept_accuracy"] = concept_accuracy(pil, [item.get("prompt") for item in inputs])
    row.update({"mse_mean": float(mse.mean()), "mse_median": float(mse.median()), "psnr_mean": psnr_interval["mean"],
                "psnr_interval": [psnr_interval["low"], psnr_interval["high"]], "ssim_mean": float(ssim.mean())})
    for i, image in enumerate(row["per_image"]):
        image.update({"mse": float(mse[i]), "psnr": float(psnr[i]), "ssim": float(ssim[i])})


def nearest_rival(row: dict, rows: list[dict]) -> dict | None:
    """The configuration of the other group (dit-cache vs diffusers) whose mean PSNR is nearest to ``row``'s."""
    if row["group"] == "reference":
        return None
    others = [r for r in rows if r["group"] not in ("reference", row["group"])]
    return min(others, key=lambda r: abs(r["psnr_mean"] - row["psnr_mean"])) if others else None


def paired_comparison(row: dict, other: dict, resamples: int = 10_000) -> dict:
    """Paired bootstrap differences ``row - other`` over the same images: PSNR (dB) and time ratio vs uncached."""
    from ..metrics import paired_difference

    def values(r, key):
        return [image[key] for image in r["per_image"]]

    return {"psnr": paired_difference(values(row, "psnr"), values(other, "psnr"), resamples),
            "time_ratio": paired_difference(values(row, "time_ratio"), values(other, "time_ratio"), resamples)}


def pareto_front(rows: list[dict]) -> list[dict]:
    """Rows no other row beats on both speedup and PSNR, by increasing speedup."""
    front = [r for r in rows if not any(o["speedup"] >= r["speedup"] and o["psnr_mean"] >= r["psnr_mean"]
                                        and (o["speedup"], o["psnr_mean"]) != (r["speedup"], r["psnr_mean"])
                                        for o in rows)]
    return sorted(front, key=lambda r: r["speedup"])


FRONT_LEVELS = (*range(20, 31), 32, 34, 36)  # PSNR levels (dB) at which the fronts are compared


def front_by_level(rows: list[dict], levels=FRONT_LEVELS) -> list[dict]:
    """At each PSNR level: the fastest dit-cache and the fastest diffusers configuration whose mean PSNR reaches it,
    and the ratio of their speedups (> 1: dit-cache is ahead there)."""
    table = []
    for level in levels:
        best = {}
        for group in ("dit-cache", "diffusers"):
            reaching = [r for r in rows if r["group"] == group and r["psnr_mean"] >= level]
            best[group] = max(reaching, key=lambda r: r["speedup"]) if reaching else None
        ours, theirs = best["dit-cache"], best["diffusers"]
        ratio = ours["speedup"] / theirs["speedup"] if ours and theirs else None
        table.append({"level": level, "dit-cache": ours and ours["label"], "diffusers": theirs and theirs["label"],
                      "dit-cache_speedup": ours and ours["speedup"], "diffusers_speedup": theirs and theirs["speedup"],
                      "ratio": ratio})
    return table


def format_front(results: dict) -> str:
    """The fronts compared level by level (see :func:`front_by_level`)."""
    lines = ["| PSNR >= | fastest dit-cache configuration | speedup | fastest peer configuration | speedup | "
             "dit-cache / best peer |", "|---|---|---|---|---|---|"]
    for row in front_by_level(results["rows"]):
        def cell(group):
            return (row[group] or "none", f"{row[group + '_speedup']:.2f}x" if row[group] else "")
        ratio = f"**{row['ratio']:.2f}x**" if row["ratio"] and row["ratio"] >= 1 else (
            f"{row['ratio']:.2f}x" if row["ratio"] else "")
        lines.append(f"| {row['level']} dB | {' | '.join(cell('dit-cache'))} | {' | '.join(cell('diffusers'))} | "
                     f"{ratio} |")
    return "\n".join(lines)


def format_table(results: dict) -> str:
    """The markdown table of ``results``; speed-only runs (``quality`` off) have no error columns. Families left
    out on this model follow the table, each with its reason."""
    speed_only = results["rows"][0]["psnr_mean"] is None
    lines = (["| family | configuration | measured CUR | FLOPs skipped | speedup (total time) [per-image IQR] |",
              "|---|---|---|---|---|"] if speed_only else
             ["| family | configuration | measured CUR | FLOPs skipped | speedup (total time) [per-image IQR] | "
              "PSNR dB [95% CI] | "
              "MSE mean / median | SSIM | concept acc. | vs nearest-PSNR rival: ΔPSNR [95% CI], Δtime ratio |",
              "|---|---|---|---|---|---|---|---|---|---|"])
    for r in results["rows"]:
        line = (f"| {r['family']} | {r['label']} | {r['cache_ratio']:.1%} | {r['skipped_flop_share']:.1%} | "
                f"{r['speedup']:.2f}x [{r['speedup_iqr'][0]:.2f}, {r['speedup_iqr'][1]:.2f}] |")
        if not speed_only:
            rival = r["vs_nearest_rival"]
            versus = "" if rival is None else (
                f"{rival['label']}: {rival['psnr']['mean']:+.2f} [{rival['psnr']['low']:+.2f}, "
                f"{rival['psnr']['high']:+.2f}], {rival['time_ratio']['mean']:+.2f}x")
            accuracy = "" if r["concept_accuracy"] is None else f"{r['concept_accuracy']:.0%}"
            line += (f" {r['psnr_mean']:.2f} [{r['psnr_interval'][0]:.2f}, {r['psnr_interval'][1]:.2f}] | "
                     f"{r['mse_mean']:.5f} / {r['mse_median']:.5f} | {r['ssim_mean']:.3f} | {accuracy} | {versus} |")
        lines.append(line)
    if not speed_only:
        lines += ["", format_front(results)]
    left_out = results.get("left_out") or {}
    if left_out:
        lines += ["", "Left out on this model:"] + [f"* {family}: {reason}" for family, reason in left_out.items()]
    return "\n".join(lines)


_MARKERS = "osD^v<>pP*hX"


def plot_pareto(results: dict, path: Path) -> None:
    """Speedup (x) against PSNR (y), one marker per family, the dit-cache and diffusers fronts drawn."""
    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in results["rows"] if r["group"] != "reference"]
    figure, axes = plt.subplots(figsize=(8, 5.5))
    for index, family in enumerate(dict.fromkeys(r["family"] for r in rows)):
        members = [r for r in rows if r["family"] == family]
        color = ("tab:blue" if members[0]["group"] == "dit-cache" else
                 "tab:green" if family.startswith("cache-dit") else "tab:orange")
        axes.scatter([r["speedup"] for r in members], [r["psnr_mean"] for r in members], label=family,
                     marker=_MARKERS[index % len(_MARKERS)], color=color, edgecolor="black", s=55, zorder=3)
    for group, color in (("dit-cache", "tab:blue"), ("diffusers", "tab:orange")):
        front = pareto_front([r for r in rows if r["group"] == group])
        if front:  # the "diffusers" group holds every peer: diffusers' caches and cache-dit
            axes.plot([r["speedup"] for r in front], [r["psnr_mean"] for r in front], color=color, lw=1.5,
                      ls="--", label=f"{'peers' if group == 'diffusers' else group} front", zorder=2)
    meta = results.get("meta", {})
    axes.set_xlabel("wall-clock speedup vs uncached (total time over the images)")
    axes.set_ylabel("PSNR vs uncached image (dB, mean)")
    axes.set_title(f"{meta.get('model', '')}: {meta.get('count', '')} images, {meta.get('steps', '')} steps")
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8, loc="best")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def write_outputs(results: dict, out: Path, plot: bool = True) -> None:
    import json

    out.mkdir(parents=True, exist_ok=True)
    results["table"] = format_table(results)
    (out / "bench.json").write_text(json.dumps(results, indent=2))
    (out / "bench.md").write_text(results["table"] + "\n")
    if plot:
        plot_pareto(results, out / "pareto.png")


# --- ``dit-cache bench`` ------------------------------------------------------------------------------------------


def add_bench_parser(commands) -> None:
    """Register ``dit-cache bench`` on the CLI's subparsers."""
    from .peers import FAMILIES

    bench = commands.add_parser("bench", help="benchmark dit-cache against diffusers' caches (Pareto plot)")
    bench.add_argument("--out", required=True, help="output folder: bench.json, bench.md, pareto.png")
    bench.add_argument("--model", default="embedded", help="diffusers folder or hub id (default: embedded)")
    bench.add_argument("--count", type=int, default=BenchConfig.count, help="scored images (half one-object, "
                       "half two-object prompts)")
    bench.add_argument("--seed", type=int, default=BenchConfig.seed, help="seed of the first scored image")
    bench.add_argument("--steps", type=int, default=BenchConfig.steps, help="denoising steps")
    bench.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the embedded model's)")
    bench.add_argument("--families", nargs="*", default=None, metavar="FAMILY",
                       help=f"candidate families (default: all): {', '.join(FAMILIES)}")
    bench.add_argument("--router", action="append", default=[], metavar="PATH",
                       help="another router.safetensors to include (repeatable)")
    bench.add_argument("--settings-per-family", type=int, default=None, help="fewer settings per family")
    bench.add_argument("--calibration-count", type=int, default=BenchConfig.calibration_count,
                       help="MagCache calibration images (prompts and seeds apart from the scored ones)")
    bench.add_argument("--workers", type=int, default=None, help="processes timing shares of the images at once, "
                       "one torch thread each (default: 2 on a machine with 2 or more CPUs)")
    bench.add_argument("--no-plot", action="store_true", help="skip the Pareto plot (no matplotlib needed)")
    bench.add_argument("--speed-only", action="store_true", help="no image-quality figures (e.g. a randomly "
                       "initialised model): cache ratio, FLOPs skipped, speedup; no plot")
    bench.add_argument("--pipeline-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="another keyword argument of every pipeline call, the value read as JSON where it "
                       "parses (e.g. height=512, use_resolution_binning=false); repeatable")


def parse_pipeline_args(items: list[str]) -> dict:
    """``["height=512", "use_resolution_binning=false"]`` -> ``{"height": 512, "use_resolution_binning": False}``."""
    import json

    kwargs = {}
    for item in items:
        key, separator, value = item.partition("=")
        if not separator or not key.isidentifier():
            raise ValueError(f"--pipeline-arg {item!r}: write KEY=VALUE, e.g. --pipeline-arg height=512.")
        try:
            kwargs[key] = json.loads(value)
        except json.JSONDecodeError:
            kwargs[key] = value
    return kwargs


def run_bench(args) -> int:
    """``dit-cache bench``: check the arguments, load the model, run, print the table."""
    import sys

    from diffusers import DiffusionPipeline

    from .. import embedded

    try:
        config = BenchConfig(count=args.count, seed=args.seed, steps=args.steps, guidance_scale=args.guidance,
                             families=tuple(args.families) if args.families is not None else (),
                             routers=tuple(args.router), settings_per_family=args.settings_per_family,
                             calibration_count=args.calibration_count, plot=not args.no_plot, workers=args.workers,
                             quality=not args.speed_only, pipeline_kwargs=parse_pipeline_args(args.pipeline_arg))
        if args.families is not None and not args.families:
            raise ValueError("--families was given no family; name at least one.")
        config.check()
        routers = {}
        if "router" in config.selected_families and args.model == "embedded":
            routers["shipped"] = embedded.embedded_router_path()
        routers.update({Path(path).stem if Path(path).stem != "router" else str(path): path for path in args.router})
        pipe = DiffusionPipeline.from_pretrained(embedded.resolve_model(args.model))
        started = time.perf_counter()
        results = run_benchmark(pipe, config, args.out, router_paths=routers, model_name=args.model)
    except (ValueError, TypeError, ImportError, FileNotFoundError, OSError) as error:
        print(f"dit-cache: error: {error}", file=sys.stderr)
        return 2
    print(results["table"])
    print(f"{config.count} images, {len(results['rows'])} configurations, {time.perf_counter() - started:.0f} s; "
          f"results in {args.out}")
    return 0
