"""Two ``dit-cache bench`` runs of the same inputs, compared configuration by configuration: speedups, the paired
per-image time-ratio difference (bootstrap interval) and whether the images are the same.

Used to check that ``--workers 2`` measures what one worker measures (docs/benchmark.md):

    OMP_NUM_THREADS=1 dit-cache bench --out runs/w1 --workers 1 --count 16 --settings-per-family 2 \\
        --families uniform router first_block_cache magcache pab --no-plot
    (the same with --out runs/w2 --workers 2)
    python experiments/compare_bench_runs.py runs/w1 runs/w2
"""

import json
from pathlib import Path

from jsonargparse import CLI

from dit_cache.toy.evaluation import paired_difference


def compare(first: Path, second: Path, resamples: int = 10_000) -> str:
    """Markdown table: ``second`` against ``first``, configuration by configuration."""
    runs = [json.loads((Path(folder) / "bench.json").read_text()) for folder in (first, second)]
    names = [f"{run['meta'].get('workers', 1)} worker(s)" for run in runs]
    lines = [f"| configuration | speedup, {names[0]} | speedup, {names[1]} | per-image time ratio, second minus "
             "first: mean [95% CI] | same images |", "|---|---|---|---|---|"]
    for a, b in zip(runs[0]["rows"], runs[1]["rows"], strict=True):
        if a["label"] != b["label"]:
            raise ValueError(f"the runs differ in configurations ({a['label']} / {b['label']}); rerun them alike.")
        if a["group"] == "reference":
            continue
        ratios = [[image["time_ratio"] for image in row["per_image"]] for row in (b, a)]
        difference = paired_difference(*ratios, resamples)
        same = [i.get("mse") for i in a["per_image"]] == [i.get("mse") for i in b["per_image"]]
        lines.append(f"| {a['label']} | {a['speedup']:.2f}x | {b['speedup']:.2f}x | {difference['mean']:+.3f} "
                     f"[{difference['low']:+.3f}, {difference['high']:+.3f}] | {'yes' if same else 'no'} |")
    return "\n".join(lines)


def main(first: Path, second: Path, resamples: int = 10_000) -> None:
    """Print the comparison of two bench output folders."""
    print(compare(first, second, resamples))


if __name__ == "__main__":
    CLI(main)
