"""``dit-cache generate``: images from the command line, cached by a learned router.

    dit-cache generate "a red circle and a blue square"                 # embedded model + its router
    dit-cache generate "a cat" --model PixArt-alpha/PixArt-XL-2-512x512 --router router.safetensors
    dit-cache generate 207 360 --model facebook/DiT-XL-2-256 --router dit.safetensors   # DiT class labels
    accelerate launch -m dit_cache.cli generate ...                     # prompts split across GPUs
"""

from __future__ import annotations

import argparse
import errno
import hashlib
import json
import math
import os
import secrets
import sys
import time
import typing
from dataclasses import asdict, fields
from pathlib import Path

from . import embedded
from .flops import percent
from .families.prompts import can_clean_captions


def _parser() -> argparse.ArgumentParser:
    parser = _OneLineErrors(prog="dit-cache", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    generate = commands.add_parser("generate", help="generate images")
    generate.add_argument("prompts", nargs="+", help="prompts (or class labels / names for DiT models)")
    generate.add_argument("--model", default="embedded", help="diffusers folder or hub id (default: embedded)")
    generate.add_argument("--router", default=None, help="router.safetensors (default: the embedded model's)")
    generate.add_argument("--no-cache", action="store_true", help="generate without caching")
    generate.add_argument("--threshold", type=_threshold, default=None,
                          help="override the router's threshold, in (0, 1)")
    generate.add_argument("--skip-flops", "--flops", dest="flops", type=_share, default=None,
                          help="share of the units' FLOPs to skip, e.g. 0.55, for routers that serve a range of "
                               "budgets (the embedded one does; out-of-range budgets are refused); --flops is its "
                               "old name")
    generate.add_argument("--plan", default=None, metavar="PLAN",
                          help="a training-free plan instead of a router: uniform:INTERVAL, taylor:INTERVAL:ORDER "
                               "(forecast between computed steps; e.g. taylor:3:1), cfg:INTERVAL, or a plan "
                               ".safetensors file")
    generate.add_argument("--adaptive", default="auto", metavar="RULE",
                          help="an adaptive rule file (dit_cache.adaptive), 'none' for the static plan, or 'auto' "
                          "(default): the embedded router's shipped rule where it beats the static plan (--skip-flops "
                          "0.5 or 0.55), else the static plan")
    generate.add_argument("--steps", type=_positive_int, default=None, help="denoising steps (default: the router's)")
    generate.add_argument("--guidance", type=_guidance, default=None,
                          help="guidance scale; <= 1 turns classifier-free guidance off (default: the router's)")
    generate.add_argument("--seed", type=_seed, default=0, help="seed of the first image; image i uses seed + i")
    generate.add_argument("--num-images", type=_positive_int, default=1, help="images per prompt")
    generate.add_argument("--concepts", nargs="+", default=None,
                          help='concept words or quoted phrases ("red circle") for the multi-concept fixes')
    generate.add_argument("--compare", action="store_true", help="also run uncached; print speedup, PSNR, SSIM")
    generate.add_argument("--out", default="outputs", help="output folder for PNGs and JSON sidecars")
    generate.add_argument("--overwrite", action="store_true",
                          help="replace images an earlier run wrote under the same names (default: refuse, before "
                               "the model loads)")
    generate.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    _add_concept_options(generate)
    from .bench.peer_bench import add_bench_parser

    add_bench_parser(commands)
    return parser


class _OneLineErrors(argparse.ArgumentParser):
    """Bad flags end in one line naming the fix, like every other error of the command (no usage dump)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message.rstrip('.')} (see {self.prog} --help)\n")


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a whole number >= 1, got {value}")
    return value


def _guidance(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and 0 <= value <= GUIDANCE_LIMIT):
        raise argparse.ArgumentTypeError(f"expected a finite number in [0, {GUIDANCE_LIMIT:.3g}] (the model's float32 "
                                         f"holds no more; <= 1 means no classifier-free guidance), got {text!r}")
    return value


GUIDANCE_LIMIT = 3.4028234663852886e38  # float32's largest number: the models run in float32 here


def _share(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0.0 <= value < 1.0:  # also refuses NaN
        raise argparse.ArgumentTypeError(f"expected a share of FLOPs in [0, 1), e.g. 0.55, got {text!r}")
    return value


def _threshold(text: str) -> float:
    from .router import check_threshold

    try:
        return check_threshold(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


SEED_LIMIT = 2**64  # torch generators take seeds in [0, 2**64)


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"expected a whole number in [0, 2**64), got {text!r}")
    return value


def _check_arguments(args) -> None:
    """Flags that contradict each other, and a device that does not exist: refused before the model loads."""
    if args.plan is not None:
        clashing = [flag for flag, given in (("--router", args.router is not None),
                                             ("--threshold", args.threshold is not None),
                                             ("--skip-flops", args.flops is not None)) if given]
        if clashing:
            raise ValueError(f"--plan conflicts with {', '.join(clashing)} (they set up a router): pass --plan or "
                             "the router flags")
    if args.plan is not None and not args.plan.endswith(".safetensors"):
        from .plan import CachePlan

        CachePlan.parse(args.plan, 20 if args.steps is None else args.steps, 1)  # the syntax, before loading
    if args.no_cache:
        ignored = [flag for flag, given in (("--router", args.router is not None),
                                            ("--plan", args.plan is not None),
                                            ("--threshold", args.threshold is not None),
                                            ("--skip-flops", args.flops is not None),
                                            ("--compare", args.compare)) if given]
        if ignored:
            raise ValueError(f"--no-cache conflicts with {', '.join(ignored)} (they only apply with the cache): "
                             f"drop --no-cache, or drop {', '.join(ignored)}")
    if args.adaptive not in ("auto", "none"):
        clashing = [flag for flag, given in (("--plan", args.plan is not None), ("--no-cache", args.no_cache),
                                             ("--threshold", args.threshold is not None)) if given]
        if clashing:
            raise ValueError(f"--adaptive {args.adaptive} conflicts with {', '.join(clashing)}: an adaptive rule "
                             "picks among the router's plans by --skip-flops (or the rule's own budget)")
        if not Path(args.adaptive).is_file():
            raise ValueError(f"--adaptive {args.adaptive}: no such rule file; pass a rule file, 'auto' or 'none'")
    args.adaptive_rule = _adaptive_rule(args)  # a damaged rule file or a budget it was not fitted for: refused here
    if args.threshold is not None and args.flops is not None:
        raise ValueError("--threshold conflicts with --skip-flops (--skip-flops chooses the threshold): pass one of "
                         "them")
    last_seed = args.seed + args.num_images - 1
    if last_seed >= SEED_LIMIT:
        raise ValueError(f"--seed {args.seed} with --num-images {args.num_images} reaches seed {last_seed}; "
                         "torch seeds must be below 2**64: use a smaller --seed")
    if args.device is not None:
        _check_device(args.device)
    _check_output_folder(args)


def _check_output_folder(args) -> None:
    """--out checked before the model loads: a folder (or a path one can be made at) that is writable, and no
    file of this run's names left by an earlier run unless --overwrite."""
    out = Path(args.out)
    existing = next((parent for parent in (out, *out.parents) if parent.exists()), Path("."))
    if existing != out and not existing.is_dir():
        raise ValueError(f"--out {out}: {existing} is a file, so no folder can be made there; pass another --out")
    if existing == out and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a folder; pass a folder (it is made if missing)")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"--out {out}: {existing} is not writable by this user; pass a folder you can write to")
    if args.overwrite or existing != out:
        return
    taken = [stem for prompt in args.prompts for i in range(args.num_images)
             for stem in [output_stem(prompt, args.seed + i)]
             if (out / f"{stem}.png").exists() or (out / f"{stem}.json").exists()]
    if taken:
        raise ValueError(f"--out {out} already holds {len(taken)} of this run's images ({taken[0]}.png ...) from an "
                         "earlier run; pass --overwrite to replace them, or another --out")


def _check_device(name: str) -> None:
    import torch

    try:
        try:
            device = torch.device(name)
        except RuntimeError:
            raise RuntimeError("not a torch device type") from None
        if device.type == "meta":
            raise RuntimeError("meta tensors hold no data")
        torch.empty(1, device=device)  # what the pipeline will need: a tensor on that device
    except (RuntimeError, AssertionError, ValueError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        available = "cpu" + (", cuda" if torch.cuda.is_available() else "") + (
            ", mps" if torch.backends.mps.is_available() else "")
        raise ValueError(f"--device {name} is not usable here ({reason}); use one of: {available} "
                         "(or leave --device out)") from None


def _add_concept_options(generate: argparse.ArgumentParser) -> None:
    """One flag per ``MultiConceptConfig`` field (``--correction-alpha``, ``--no-nms``, ...), from the field's type
    and its help metadata."""
    from .pipelines import MultiConceptConfig

    types = typing.get_type_hints(MultiConceptConfig)
    group = generate.add_argument_group("multi-concept fixes", "with --concepts; unset flags keep the defaults")
    for field in fields(MultiConceptConfig):
        options = {"dest": f"concept_{field.name}", "default": None,
                   "help": f"{field.metadata['help']} (default: {field.default})"}
        kind = types[field.name]
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction
        elif kind in (int, float):
            options.update(type=kind, metavar=kind.__name__.upper())
        else:  # a tuple of ints, or None
            item = typing.get_args(next(a for a in typing.get_args(kind) if a is not type(None)))[0]
            options.update(nargs="+", type=item, metavar=field.name.split("_")[-1].rstrip("s").upper())
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
    from accelerate import PartialState
    from diffusers import DiffusionPipeline

    from .pipelines import accelerate
    from .router import CacheRouter
    from .units import cache_units

    model = embedded.resolve_model(args.model)
    router = None
    if not args.no_cache and args.plan is None:
        router_path = args.router
        if router_path is None:
            if args.model != "embedded":
                raise ValueError("--router is required for models other than the embedded one (or pass --no-cache).")
            router_path = embedded.embedded_router_path()
        router = CacheRouter.load(router_path)
    pipe = DiffusionPipeline.from_pretrained(model)
    # Under `accelerate launch` / `torchrun` each process has a device of its own (cuda:0, cuda:1, ...). On the
    # CPU accelerate forms the process group only when told so: otherwise every process would make every image.
    on_cpu = torch.device(args.device).type == "cpu" if args.device is not None else not torch.cuda.is_available()
    state = PartialState(cpu=on_cpu)
    pipe = pipe.to(args.device if args.device is not None else state.device)
    pipe.set_progress_bar_config(disable=True)
    rule = getattr(args, "adaptive_rule", None) if router is not None else None
    if rule is not None:
        from .adaptive import apply_adaptive

        apply_adaptive(pipe, router, rule)
        print(f"adaptive router ({rule.signal}): {percent(rule.budget)} of the FLOPs skipped on average")
    elif router is not None:
        accelerate(pipe, router=router, threshold=args.threshold, skip_flops=args.flops)
    elif args.plan is not None:
        plan = _plan(args.plan, 20 if args.steps is None else args.steps, len(cache_units(pipe.transformer)))
        if args.steps is None:
            args.steps = plan.num_steps
        accelerate(pipe, plan=plan)
    return pipe, router


def _adaptive_rule(args):
    """--adaptive: the rule to switch plans by, or None (the static plan)."""
    from .adaptive import AdaptiveRule

    if args.adaptive == "none" or args.threshold is not None or args.no_cache or args.plan is not None:
        return None
    if args.adaptive == "auto":
        if args.router is not None or args.model != "embedded":
            return None
        path = embedded.embedded_adaptive_rule_path(args.flops)
        return None if path is None else AdaptiveRule.load(path)
    rule = AdaptiveRule.load(args.adaptive)
    if args.flops is not None and abs(args.flops - rule.budget) > 1e-9:
        raise ValueError(f"--adaptive {args.adaptive} was fitted for {percent(rule.budget)} of the FLOPs skipped on "
                         f"average, not --skip-flops {args.flops}: drop --skip-flops or fit a rule for it")
    return rule


def _plan(spec: str, steps: int, num_units: int):
    """``--plan``: a preset (``taylor:3:1``) or a plan file."""
    from .plan import CachePlan

    if spec.endswith(".safetensors"):
        return CachePlan.load(spec)
    return CachePlan.parse(spec, steps, num_units)


def _call_arguments(pipe, args, router, prompt: str) -> dict:
    steps = args.steps if args.steps is not None else (router.num_steps if router else 20)
    guidance = args.guidance
    if guidance is None and router is not None:
        guidance = router.metadata.get("guidance_scale")
    if guidance is None:  # 4.5: PixArt's own default
        guidance = embedded.EMBEDDED_GUIDANCE_SCALE if args.model == "embedded" else 4.5
    call = {"num_inference_steps": steps, "guidance_scale": guidance}
    if hasattr(pipe, "tokenizer"):
        call.update(prompt=prompt, clean_caption=can_clean_captions())
        if args.concepts:
            call.update(concepts=args.concepts, concept_config=args.concept_config)
    else:  # class-conditional DiT: an integer label or a label name
        call["class_labels"] = [_class_label(pipe, prompt)]
    return call


def _class_label(pipe, prompt: str) -> int:
    # num_embeds_ada_norm classes; the embedding table has one more row, the null class of guidance.
    num_classes = pipe.transformer.config.num_embeds_ada_norm
    labels = getattr(pipe, "labels", None) or {}
    label = int(prompt) if prompt.isdigit() else labels.get(prompt)
    if label is None or not 0 <= label < num_classes:
        names = f", or a label name such as {next(iter(labels))!r}" if labels else ""
        raise ValueError(f"{prompt!r} is not a class of this model: give a class id in [0, {num_classes}){names}")
    return label


def _compare(pipe, call, seed: int, cached_image, cached_seconds: float) -> dict:
    import torch

    from .metrics import image_errors

    start = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    reference = pipe(**call, generator=generator, cache=False, output_type="np").images
    seconds = time.perf_counter() - start
    errors = image_errors(cached_image, reference)
    return {
        "uncached_seconds": round(seconds, 3),
        "speedup": round(seconds / cached_seconds, 3),
        "psnr": round(float(errors["psnr"][0]), 3),  # identical images: metrics.MAX_PSNR
        "ssim": float(errors["ssim"][0]),
    }


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "bench":
        from .bench.peer_bench import run_bench

        return run_bench(args)
    try:
        _check_arguments(args)
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
    from tqdm.auto import tqdm

    from .metrics import to_uint8
    from .numerics import check_finite_result
    from .pipelines import concept_positions

    state = PartialState()
    jobs = [(prompt, args.seed + i) for prompt in args.prompts for i in range(args.num_images)]
    if args.concepts and not hasattr(pipe, "tokenizer"):
        raise ValueError(f"--concepts needs a text-to-image pipeline with cross-attention (PixArt); "
                         f"{type(pipe).__name__} is class-conditional: drop --concepts")
    if args.concepts:  # a concept missing from any prompt fails before any image
        concept_positions(pipe, list(args.prompts), args.concepts, clean_caption=can_clean_captions())
    calls = {prompt: _call_arguments(pipe, args, router, prompt) for prompt in args.prompts}  # bad labels fail here
    _check_steps(pipe, calls[args.prompts[0]]["num_inference_steps"])
    out = Path(args.out)
    with state.split_between_processes(jobs) as my_jobs:
        for prompt, seed in tqdm(my_jobs, desc="generating", disable=not state.is_local_main_process):
            call = calls[prompt]
            start = time.perf_counter()
            image = pipe(**call, generator=torch.Generator().manual_seed(seed), output_type="np").images
            seconds = time.perf_counter() - start
            stem = output_stem(prompt, seed)
            stats = getattr(pipe, "cache_stats", None)
            sidecar = {
                "prompt": prompt, "seed": seed, "model": args.model, "router": None if router is None else
                (args.router or "embedded"), "plan": args.plan, "cache_ratio": None if stats is None else round(stats.cache_ratio, 4),
                "seconds": round(seconds, 3), "steps": call["num_inference_steps"],
                "guidance_scale": call["guidance_scale"], "concepts": args.concepts,
                "concept_config": asdict(args.concept_config) if args.concept_config else None,
                "process": state.process_index,  # which process of a multi-process run made it
            }
            if args.compare:  # refused with --no-cache, so this call was cached
                sidecar.update(_compare(pipe, call, seed, image, seconds))
                print(f"{stem}: speedup {sidecar['speedup']:.2f}x, PSNR {sidecar['psnr']} dB, "
                      f"SSIM {sidecar['ssim']:.4f}")
            check_finite_result(image, f"Image {stem}")  # a NaN image would be saved black
            pixels = to_uint8(image[0])
            _save(out, stem, pixels, sidecar, overwrite=args.overwrite)  # only once an image exists
    return 0


def _check_steps(pipe, steps: int) -> None:
    """A scheduler has ``num_train_timesteps`` distinct timesteps: more steps repeat some, a run many times slower
    for the same image, and some schedulers then fail midway."""
    trained = getattr(pipe.scheduler.config, "num_train_timesteps", None)
    if trained is not None and steps > trained:
        raise ValueError(f"--steps {steps} is more than the {trained} timesteps the model's scheduler has; use "
                         f"--steps {trained} or fewer")


def output_stem(prompt: str, seed: int) -> str:
    """``a-red-circle-5c1a3e7f-0``: readable slug, then a hash of the exact prompt, so prompts that slug alike
    ("a red circle", "A red circle!") never overwrite each other."""
    digest = hashlib.sha256(prompt.encode()).hexdigest()[:8]
    return f"{_slug(prompt)}-{digest}-{seed}"


def _save(out: Path, stem: str, pixels, sidecar: dict, overwrite: bool = False) -> None:
    """PNG and JSON sidecar, each written to a temporary file and moved into place: a failure (a full disk) leaves
    no half-written file and a reader never sees a partial image. Files get the mode ``open()`` would give (0666
    less the umask). Without ``overwrite`` a file that appeared since the check before loading (another run) is
    not replaced: the move is a hard link, which refuses an existing name."""
    from PIL import Image

    writers = {".png": lambda file: Image.fromarray(pixels).save(file, format="PNG"),
               ".json": lambda file: file.write(json.dumps(sidecar, indent=2).encode())}
    out.mkdir(parents=True, exist_ok=True)
    temporaries, placed = [], []
    try:
        for suffix, write in writers.items():
            temporary = _new_file(out, stem, suffix)
            temporaries.append((temporary, out / f"{stem}{suffix}"))
            with open(temporary, "wb") as file:
                write(file)
        for temporary, final in temporaries:
            if overwrite:
                os.replace(temporary, final)
            else:
                _place_new(temporary, final)
            placed.append(final)
    except BaseException:
        if not overwrite:
            for final in placed:  # nothing half-applied: the PNG without its sidecar goes too
                final.unlink(missing_ok=True)
        raise
    finally:
        for temporary, _ in temporaries:
            temporary.unlink(missing_ok=True)


def _place_new(temporary: Path, final: Path) -> None:
    try:
        os.link(temporary, final)  # atomic, and fails if the name exists
    except FileExistsError:
        raise FileExistsError(f"{final} appeared while this run was generating (another run?); it is kept: pass "
                              "--overwrite to replace it, or another --out") from None
    except OSError as error:
        if error.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV):
            raise
        if final.exists():  # a filesystem without hard links: the same refusal, checked just before the move
            raise FileExistsError(f"{final} appeared while this run was generating; pass --overwrite") from None
        os.replace(temporary, final)


def _new_file(out: Path, stem: str, suffix: str) -> Path:
    """A new empty file in ``out`` made as ``open(path, "x")`` would (mode 0666 less the umask), unlike
    ``tempfile``'s 0600, which a rename would carry over to the final file."""
    while True:
        path = out / f".{stem}.{secrets.token_hex(4)}{suffix}.tmp"
        try:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
            return path
        except FileExistsError:
            continue




def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in text.lower()).strip("-")[:60] or "image"


if __name__ == "__main__":
    sys.exit(main())
