"""Full-size PixArt-alpha 256 and DiT-XL-2-256 pipeline folders with random weights, for smoke-running the
full-size router configs on a machine without the hub checkpoints (nothing is downloaded).

The transformers have the real models' shapes (28 blocks, 16 heads x 72, 256x256 images = 32x32 latents, patch 2,
learned sigma); the text encoder is a one-block T5 as wide as T5-XXL (4096, what PixArt's caption projection
takes) and the VAE is tiny (scale factor 8, as the real ones). Images made with them are noise: the folders are
for timing and memory, and for finding what breaks.

    OMP_NUM_THREADS=1 python experiments/full_size_smoke.py --out /tmp/full_size_smoke
    OMP_NUM_THREADS=2 /usr/bin/time -v dit-cache-train fit --config training/configs/pixart_alpha_256.yaml \
        --model.model /tmp/full_size_smoke/pixart_alpha_256 --model.num_steps 2 --data.num_trajectories 1 \
        --data.batch_size 1 --trainer.accelerator cpu --trainer.default_root_dir /tmp/full_size_smoke/runs/pixart

(the commands for both configs are printed at the end; results in docs/router.md, "Full-size configs: CPU smoke
runs").
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
from diffusers import (DDIMScheduler, DiTPipeline, DiTTransformer2DModel, DPMSolverMultistepScheduler,
                       PixArtAlphaPipeline)

from dit_cache.testing import _tiny_t5, pixart_alpha_shapes, tiny_tokenizer, tiny_vae

T5_XXL_WIDTH = 4096  # PixArt-alpha's caption_channels


def pixart_alpha_256_pipeline() -> PixArtAlphaPipeline:
    """PixArt-XL-2-256x256's transformer shapes (random weights), a one-block 4096-wide T5 and a tiny VAE."""
    return PixArtAlphaPipeline(
        transformer=pixart_alpha_shapes(num_layers=28, sample_size=32), text_encoder=_tiny_t5(d_model=T5_XXL_WIDTH),
        tokenizer=tiny_tokenizer(), vae=tiny_vae(), scheduler=DPMSolverMultistepScheduler(),
    )


def dit_xl_256_pipeline() -> DiTPipeline:
    """DiT-XL-2-256's transformer shapes (random weights) and a tiny VAE; labels as ImageNet's class ids."""
    torch.manual_seed(0)
    transformer = DiTTransformer2DModel(
        num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8, num_layers=28,
        sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
    ).eval()
    return DiTPipeline(transformer=transformer, vae=tiny_vae(), scheduler=DDIMScheduler(),
                       id2label={index: f"class {index}" for index in range(1000)})


BUILDERS = {"pixart_alpha_256": pixart_alpha_256_pipeline, "dit_xl_256": dit_xl_256_pipeline}


def smoke_command(config: str, folder: Path, run_dir: Path) -> str:
    """One short trajectory of ``config`` on the CPU, its outputs in ``run_dir``."""
    return (f"OMP_NUM_THREADS=2 /usr/bin/time -v dit-cache-train fit --config training/configs/{config}.yaml "
            f"--model.model {folder} --model.num_steps 2 --data.num_trajectories 1 --data.batch_size 1 "
            f"--trainer.accelerator cpu --trainer.default_root_dir {run_dir}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/full_size_smoke"),
                        help="folder for the pipeline folders (one per config) and the runs' outputs")
    parser.add_argument("--only", choices=sorted(BUILDERS), help="build one folder only")
    args = parser.parse_args()
    for name, build in BUILDERS.items():
        if args.only not in (None, name):
            continue
        folder = args.out / name
        pipe = build()
        parameters = sum(p.numel() for p in pipe.transformer.parameters())
        pipe.save_pretrained(folder)
        print(f"{folder}: {type(pipe.transformer).__name__}, {parameters / 1e6:.1f}M parameters")
        print(f"  {smoke_command(name, folder, args.out / 'runs' / name)}")


if __name__ == "__main__":
    main()
