"""Does how much an image moves early tell whether it survives the 75% plan as well as the 70% one?

The shipped router's 70% and 75% plans agree on steps 0-7 (computed at 0, 4 and 6), so a switch after step 7
could read signals of those computed steps: the relative change between computed steps of the transformer's
output (``out46``, ``out04``), of its input latent (``x46``), of the first block's attn1 and ff and of the last
block's ff outputs, and the CFG halves' gap at step 6 (``cfg6``). For the images of an adaptive-router table
(docs/results/adaptive_router/*_table.json: per image its PSNR under every ladder plan), this records the signals
under the 70% plan and prints their Spearman correlation with PSNR(75%) - PSNR(70%), over all images and within
the one- and two-object prompts (which the prompt_tokens rule already tells apart):

    OMP_NUM_THREADS=1 python experiments/late_signal.py --table docs/results/adaptive_router/heldout_table.json \
        --output outputs/late_signal_heldout.json
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from diffusers import PixArtAlphaPipeline
from jsonargparse import CLI
from scipy.stats import spearmanr

import dit_cache

RECORDED_STEPS = (0, 4, 6)  # the computed steps the two plans share


def _relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new - old).float().norm() / (old.float().norm() + 1e-12))


def record_signals(table: dict) -> list[dict]:
    torch.set_num_threads(1)
    pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    dit_cache.accelerate(pipe, router=dit_cache.embedded_router_path(), skip_flops=0.7)
    calls, steps, units = [0], {}, {}

    def after_transformer(module, args, kwargs, output):
        if calls[0] in RECORDED_STEPS:
            steps[calls[0]] = (args[0] if args else kwargs["hidden_states"]).clone(), output[0].clone()
        calls[0] += 1

    def after_unit(name):
        # A unit's module runs only where it computes (steps 0, 4, 6 here: the list's positions 0, 1, 2).
        return lambda module, args, output: units.setdefault(name, []).append(output.clone())

    blocks = pipe.transformer.transformer_blocks
    pipe.transformer.register_forward_hook(after_transformer, with_kwargs=True)
    for name, module in {"attn1_first": blocks[0].attn1, "ff_first": blocks[0].ff, "ff_last": blocks[-1].ff}.items():
        module.register_forward_hook(after_unit(name))
    rows = []
    for image in table["images"]:
        calls[0] = 0
        steps.clear(), units.clear()
        pipe(image["prompt"], generator=torch.Generator().manual_seed(image["seed"]), num_inference_steps=20,
             guidance_scale=dit_cache.EMBEDDED_GUIDANCE_SCALE, output_type="latent", clean_caption=False)
        (x0, out0), (x4, out4), (x6, out6) = (steps[s] for s in RECORDED_STEPS)
        conditional, unconditional = out6.chunk(2)[1], out6.chunk(2)[0]
        signals = {"out46": _relative_change(out6, out4), "out04": _relative_change(out4, out0),
                   "x46": _relative_change(x6, x4),
                   "cfg6": float((conditional - unconditional).norm() / out6.norm())}
        for name, outputs in units.items():
            signals[f"{name}_46"] = _relative_change(outputs[2], outputs[1])
            signals[f"{name}_04"] = _relative_change(outputs[1], outputs[0])
        rows.append(signals)
    return rows


def main(table: str, output: str = "outputs/late_signal.json") -> None:
    data = json.loads(Path(table).read_text())
    path = Path(output)
    rows = json.loads(path.read_text()) if path.exists() else record_signals(data)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(rows, indent=1))
    ladder, images = data["ladder"], data["images"]
    psnr = np.array([image["psnr"] for image in images])
    gain = psnr[:, ladder.index(0.75)] - psnr[:, ladder.index(0.7)]
    two = np.array([" and " in image["prompt"] for image in images])
    print(f"Spearman rho with PSNR(75%) - PSNR(70%), {len(images)} images ({two.sum()} two-object)")
    for name in rows[0]:
        signal = np.array([row[name] for row in rows])
        groups = {"all": slice(None), "one-object": ~two, "two-object": two}
        print(f"{name:14s} " + "  ".join(f"{group} {spearmanr(signal[m], gain[m])[0]:+.2f}"
                                         for group, m in groups.items()))


if __name__ == "__main__":
    CLI(main, as_positional=False)
