"""Re-render a ``dit-cache bench`` result folder with the current statistics, from its own per-image seconds (no
pipeline runs): how bench_v7, timed before the speedup became the total-time ratio, got its tables and plot.

    python experiments/rescore_bench.py docs/results/bench_v7
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from jsonargparse import CLI

from dit_cache.bench.peer_bench import write_outputs


def main(folder: Path) -> None:
    results = json.loads((folder / "bench.json").read_text())
    uncached = next(row for row in results["rows"] if row["label"] == "uncached")
    reference = np.array([image["seconds"] for image in uncached["per_image"]])
    for row in results["rows"]:
        seconds = np.array([image["seconds"] for image in row["per_image"]])
        row["speedup_median"] = float(np.median(reference / seconds))
        row["speedup"] = float(reference.sum() / seconds.sum())
    write_outputs(results, folder, plot=results["meta"].get("quality", True))


if __name__ == "__main__":
    CLI(main, as_positional=True)
