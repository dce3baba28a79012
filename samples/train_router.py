"""Train a cache router with the Lightning CLI and use it: the two steps a user takes for their own model.

    python samples/train_router.py                                     # the embedded model, a short HarmoniCa run
    python samples/train_router.py --model /path/to/pixart --config training/configs/pixart_alpha_512.yaml

The same run on the command line is ``dit-cache-train fit --config CONFIG --model.model MODEL``; this script adds
the last step, loading the router into a pipeline and generating one image with it.
"""

from pathlib import Path

import torch
from diffusers import DiffusionPipeline
from jsonargparse import CLI

import dit_cache
from dit_cache.training.cli import main as train


def main(model: str = "embedded", config: str = "training/configs/embedded_flops.yaml", trajectories: int = 4,
         out: str = "outputs/train_router", prompt: str = "a red circle and a blue square"):
    """Args:
        model: a diffusers pipeline folder or hub id, or ``embedded``.
        config: the training YAML (training/configs/).
        trajectories: sampling trajectories to train on (a short run; the configs hold the full-length values).
        out: run folder: router.safetensors, checkpoints/, lightning_logs/ and the generated image.
    """
    train(["fit", "--config", config, "--model.model", model,
           "--data.num_trajectories", str(trajectories), "--trainer.default_root_dir", out])
    router = dit_cache.CacheRouter.load(Path(out) / "router.safetensors")
    path = dit_cache.embedded_model_path() if model == "embedded" else model
    pipe = dit_cache.accelerate(DiffusionPipeline.from_pretrained(path), router=router)
    image = pipe(prompt, num_inference_steps=router.num_steps, generator=torch.Generator().manual_seed(0),
                 guidance_scale=router.metadata.get("guidance_scale", 2.0)).images[0]
    image.save(Path(out) / "image.png")
    print(f"router: {Path(out) / 'router.safetensors'}; {pipe.cache_stats}; image: {Path(out) / 'image.png'}")


if __name__ == "__main__":
    CLI(main, as_positional=False)
