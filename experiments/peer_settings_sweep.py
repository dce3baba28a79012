"""Quality-only sweep of the peers' settings on prompts/seeds outside the scored ones (70000+): per setting the
measured share of FLOPs skipped and the PSNR against the uncached image, no timing. Chooses the ranges in
dit_cache/bench/peers.py and dit_cache/bench/cache_dit_peer.py (docs/benchmark.md).

  python experiments/peer_settings_sweep.py --count 1 --out docs/results/peer_settings_sweep.json
"""

import argparse
import json
from pathlib import Path

import numpy as np
import torch

from dit_cache.bench import peers
from dit_cache.bench.cache_dit_peer import cache_dit_family

SWEEP = {
    "cache_dit": lambda s: cache_dit_family(s, thresholds=(0.08, 0.16, 0.24, 0.32, 0.48, 0.64, 0.96),
                                            mask_policies=("medium", "fast", "ultra")),
    "seacache": lambda s: peers.sea_cache_family(s, thresholds=(0.1, 0.25, 0.5, 1.0, 2.0, 4.0)),
    "first_block_cache": lambda s: peers.first_block_cache_family(s, thresholds=(0.3, 0.5, 0.8, 1.2)),
    "taylorseer": lambda s: peers.taylorseer_family(s, intervals=(4, 6, 8)),
    "magcache": lambda s: peers.mag_cache_family(s, thresholds=(0.5, 1.0, 2.0, 4.0)),
    "fastercache": lambda s: peers.faster_cache_family(s, skips=((2, 2), (3, 2), (5, 2))),
    "pab": lambda s: peers.pab_family(s, skips=((3, 6), (4, 8), (6, 12))),
}


def main():
    from diffusers import DiffusionPipeline

    import dit_cache
    from dit_cache.bench.peer_bench import _caption_inputs
    from dit_cache.embedded import EMBEDDED_GUIDANCE_SCALE
    from dit_cache.flops import step_flops

    torch.set_num_threads(1)
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--count", type=int, default=2)
    parser.add_argument("--seed", type=int, default=70_000)
    parser.add_argument("--families", nargs="*", default=list(SWEEP))
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    pipe = DiffusionPipeline.from_pretrained(dit_cache.embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    inputs = _caption_inputs(pipe, args.count, args.seed)

    def call(i, seed=None):
        return {**inputs[i], "generator": torch.Generator().manual_seed(args.seed + i if seed is None else seed),
                "num_inference_steps": 20, "guidance_scale": EMBEDDED_GUIDANCE_SCALE, "output_type": "np"}

    meter = peers.StepMeter(pipe.transformer)
    flops = step_flops(pipe.transformer)[0]
    calibration = _caption_inputs(pipe, 1, 10_000)
    ratios = peers.calibrate_mag_cache(pipe, [{**calibration[0], "generator": torch.Generator().manual_seed(10_000),
                                               "num_inference_steps": 20, "guidance_scale": EMBEDDED_GUIDANCE_SCALE,
                                               "output_type": "np"}], 20)
    setup = peers.BenchSetup(pipe, 20, flops, meter, {}, mag_ratios=ratios)
    references = [pipe(**call(i)).images[0] for i in range(args.count)]
    rows = []
    for family in args.families:
        for candidate in SWEEP[family](setup):
            psnr, share = [], []
            for i in range(args.count):
                meter.reset()
                candidate.apply(pipe)
                try:
                    with candidate.call_context(pipe):
                        image = pipe(**call(i)).images[0]
                finally:
                    candidate.remove(pipe)
                mse = float(((image - references[i]) ** 2).mean())
                psnr.append(100.0 if mse == 0 else 10 * np.log10(1 / mse))
                share.append(meter.skipped_flop_share(flops))
            rows.append({"label": candidate.label, "psnr": float(np.mean(psnr)), "skipped": float(np.mean(share))})
            print(f"{candidate.label}: PSNR {rows[-1]['psnr']:.1f} dB, FLOPs skipped {rows[-1]['skipped']:.0%}",
                  flush=True)
            Path(args.out).write_text(json.dumps({"count": args.count, "seed": args.seed, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
