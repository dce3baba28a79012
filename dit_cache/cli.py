"""``dit-cache generate``: images from the command line, cached by a learned router.

    dit-cache generate "a red circle and a blue square"                 # embedded model + its router
    dit-cache generate "a cat" --model PixArt-alpha/PixArt-XL-2-512x512 --router router.safetensors
    dit-cache generate 207 360 --model facebook/DiT-XL-2-256 --router dit.safetensors   # DiT class labels
    accelerate launch -m dit_cache.cli generate ...                     # prompts split across GPUs
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import asdict, fields
from pathlib import Path

from . import embedded


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dit-cache", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate images")
    generate.add_argument("prompts", nargs="+", help="prompts (or class labels / names for DiT models)")
    generate.add_argument("--model", default="embedded", help="diffusers folder or hub id (default: embedded)")
    generate.add_argument("--router", default=None, help="router.safetensors (default: the embedded model's)")
    generate.add_argument("--no-cache", action="store_true", help="generate without caching")
    generate.add_argument("--threshold", type=float, default=None, help="override the router's threshold")
    generate.add_argument("--steps", type=int, default=None, help="denoising steps (default: the router's)")
    generate.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the router's)")
    generate.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    generate.add_argument("--num-images", type=int, default=1, help="images per prompt")
    generate.add_argument("--concepts", nargs="+", default=None,
                          help='concept words or quoted phrases ("red circle") for the multi-concept fixes')
    generate.add_argument("--compare", action="store_true", help="also run uncached; print speedup, PSNR, SSIM")
    generate.add_argument("--out", default="outputs", help="output folder for PNGs and JSON sidecars")
    generate.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    _add_concept_options(generate)
    return parser


def _add_concept_options(generate: argparse.ArgumentParser) -> None:
    """One flag per ``MultiConceptConfig`` field (``--correction-alpha``, ``--no-nms``, ...), help from its docstring."""
    from .pipelines import MultiConceptConfig

    documented = dict(re.findall(r"^\s+(\w+): (.+)$", MultiConceptConfig.__doc__, re.MULTILINE))
    group = generate.add_argument_group("multi-concept fixes", "with --concepts; unset flags keep the defaults")
    for field in fields(MultiConceptConfig):
        options = {"dest": f"concept_{field.name}", "default": None,
                   "help": f"{documented[field.name].rstrip('.')} (default: {field.default})"}
        if isinstance(field.default, bool):
            options["action"] = argparse.BooleanOptionalAction
        elif field.name == "nms_blocks":
            options.update(nargs="+", type=int, metavar="BLOCK")
        else:
            options.update(type=type(field.default), metavar=type(field.default).__name__.upper())
        group.add_argument("--" + field.name.replace("_", "-"), **options)


def _concept_config(args):
    """The ``MultiConceptConfig`` of the concept flags; checked before the model loads, so bad values cost nothing."""
    from .pipelines import MultiConceptConfig

    given = {field.name: getattr(args, f"concept_{field.name}") for field in fields(MultiConceptConfig)}
    given = {name: value for name, value in given.items() if value is not None}
    if given and not args.concepts:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise ValueError(f"{flags}: used only with --concepts; add --concepts with the prompt's concept words, "
                         "e.g. --concepts circle square")
    return MultiConceptConfig(**given) if args.concepts else None


def _load(args):
    import torch
    from diffusers import DiffusionPipeline

    from .pipelines import accelerate
    from .router import CacheRouter

    model = embedded.resolve_model(args.model)
    router = None
    if not args.no_cache:
        router_path = args.router
        if router_path is None:
            if args.model != "embedded":
                raise ValueError("--router is required for models other than the embedded one (or pass --no-cache).")
            router_path = embedded.embedded_router_path()
        router = CacheRouter.load(router_path)
    pipe = DiffusionPipeline.from_pretrained(model)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    if router is not None:
        accelerate(pipe, router=router, threshold=args.threshold)
    return pipe, router


def _call_arguments(pipe, args, router, prompt: str) -> dict:
    steps = args.steps or (router.num_steps if router else 20)
    default = embedded.EMBEDDED_GUIDANCE_SCALE if args.model == "embedded" else 4.5  # 4.5: PixArt's own default
    guidance = args.guidance or (router.metadata.get("guidance_scale") if router else None) or default
    call = {"num_inference_steps": steps, "guidance_scale": guidance}
    if hasattr(pipe, "tokenizer"):
        call.update(prompt=prompt, clean_caption=_can_clean_captions())
        if args.concepts:
            call.update(concepts=args.concepts, concept_config=args.concept_config)
    else:  # class-conditional DiT: an integer label or a label name
        call["class_labels"] = [int(prompt)] if prompt.isdigit() else pipe.get_label_ids([prompt])
    return call


def _can_clean_captions() -> bool:
    """PixArt cleans captions only with beautifulsoup4 and ftfy installed, and otherwise warns on every call and
    lowercases; asking for what will happen anyway keeps the output free of those warnings."""
    from diffusers.utils import is_bs4_available, is_ftfy_available

    return is_bs4_available() and is_ftfy_available()


def _compare(pipe, call, seed: int, cached_image, cached_seconds: float) -> dict:
    import torch
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    reference = _as_tensor(pipe(**call, generator=generator, cache=False, output_type="np").images)
    seconds = time.perf_counter() - start
    cached = _as_tensor(cached_image)
    return {
        "uncached_seconds": round(seconds, 3),
        "speedup": round(seconds / cached_seconds, 3),
        "psnr": _finite(float(peak_signal_noise_ratio(cached, reference, data_range=1.0))),
        "ssim": float(structural_similarity_index_measure(cached, reference, data_range=1.0)),
    }


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    try:
        args.concept_config = _concept_config(args)
        pipe, router = _load(args)
        return _generate(pipe, router, args)
    except (FileNotFoundError, ValueError, TypeError, KeyError, OSError) as error:
        # Bad paths, routers, prompts or step counts: one readable line, no traceback.
        print(f"dit-cache: error: {error}", file=sys.stderr)
        return 2


def _generate(pipe, router, args) -> int:
    import torch
    from accelerate import PartialState
    from PIL import Image
    from tqdm.auto import tqdm

    from .pipelines import concept_positions

    state = PartialState()
    jobs = [(prompt, args.seed + i) for prompt in args.prompts for i in range(args.num_images)]
    if args.concepts and not hasattr(pipe, "tokenizer"):
        raise ValueError(f"--concepts needs a text-to-image pipeline with cross-attention (PixArt); "
                         f"{type(pipe).__name__} is class-conditional: drop --concepts")
    if args.concepts:  # a concept missing from any prompt fails before any image
        concept_positions(pipe, list(args.prompts), args.concepts, clean_caption=_can_clean_captions())
    out = Path(args.out)
    with state.split_between_processes(jobs) as my_jobs:
        for prompt, seed in tqdm(my_jobs, desc="generating", disable=not state.is_local_main_process):
            call = _call_arguments(pipe, args, router, prompt)
            start = time.perf_counter()
            image = pipe(**call, generator=torch.Generator().manual_seed(seed), output_type="np").images
            seconds = time.perf_counter() - start
            stem = f"{_slug(prompt)}-{seed}"
            out.mkdir(parents=True, exist_ok=True)  # only once an image exists: a failed run leaves no folder
            Image.fromarray((image[0] * 255).round().clip(0, 255).astype("uint8")).save(out / f"{stem}.png")
            stats = getattr(pipe, "cache_stats", None)
            sidecar = {
                "prompt": prompt, "seed": seed, "model": args.model, "router": None if router is None else
                (args.router or "embedded"), "cache_ratio": None if stats is None else round(stats.cache_ratio, 4),
                "seconds": round(seconds, 3), "steps": call["num_inference_steps"],
                "guidance_scale": call["guidance_scale"], "concepts": args.concepts,
                "concept_config": asdict(args.concept_config) if args.concept_config else None,
            }
            if args.compare and router is not None:
                sidecar.update(_compare(pipe, call, seed, image, seconds))
                print(f"{stem}: speedup {sidecar['speedup']:.2f}x, PSNR {sidecar['psnr']} dB, "
                      f"SSIM {sidecar['ssim']:.4f}")
            (out / f"{stem}.json").write_text(json.dumps(sidecar, indent=2))
    return 0


def _finite(value: float):
    """JSON has no infinity: identical images (PSNR = inf) are written as the string "inf"."""
    return round(value, 3) if value != float("inf") else "inf"


def _as_tensor(images):
    """Pipelines' numpy output (batch, height, width, 3) in [0, 1] -> a torch batch for torchmetrics."""
    import torch

    return torch.from_numpy(images).permute(0, 3, 1, 2).float()


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60] or "image"


if __name__ == "__main__":
    sys.exit(main())
