"""Locations of the assets shipped inside the package: the embedded model, its router and its adaptive rules."""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"

# Classifier-free guidance the embedded model is evaluated and its router trained at: the scale with the best
# concept accuracy in `experiments/evaluate_embedded_model.py --guidance_scales` (provenance.json has the sweep).
EMBEDDED_GUIDANCE_SCALE = 2.0


def _existing(path: Path, what: str, how_to_build: str) -> str:
    if not path.exists():
        raise FileNotFoundError(f"The {what} is missing at {path}. Build it with: {how_to_build}")
    return str(path)


def embedded_model_path() -> str:
    """Folder of the small text-to-image PixArt model trained on synthetic scenes (diffusers format)."""
    return _existing(
        ASSETS / "embedded_model",
        "embedded model",
        "dit-cache-train-embedded --config training/configs/embedded_model.yaml",
    )


def embedded_router_path() -> str:
    """The router searched for the embedded model at its default step count (``embedded_search.yaml``): one file
    for every FLOP budget up to 80% (``accelerate(pipe, router=..., skip_flops=...)``)."""
    return _existing(
        ASSETS / "embedded_router.safetensors",
        "embedded router",
        "dit-cache-train fit --config training/configs/embedded_search.yaml",
    )


def embedded_harmonica_router_path() -> str:
    """The HarmoniCa router (SDT + IEPO, ``embedded_flops.yaml``) shipped before the searched one; kept for
    comparisons."""
    return _existing(
        ASSETS / "embedded_router_harmonica.safetensors",
        "HarmoniCa router",
        "dit-cache-train fit --config training/configs/embedded_flops.yaml",
    )


# The budgets where the adaptive router is the default (docs/adaptive_router.md), each on held-out images: at 50%
# and 55% it beats the static plan at matched FLOPs, in PSNR and MSE and beyond the same plans handed out at random;
# at 52.5% and 72.5%, between two of the static router's whole-step levels, it skips what was asked on average
# where the static router falls back to the level below (50%, 70%), at as good an image (52.5%: +1.3 dB) or within
# the noise of it (72.5%: -0.25 dB [-1.25, +0.71]), and beyond the same two plans handed out at random.
EMBEDDED_ADAPTIVE_BUDGETS = (0.5, 0.525, 0.55, 0.725)


def embedded_adaptive_rule_path(skip_flops: float | None) -> str | None:
    """The embedded router's adaptive rule (signal ``prompt_tokens``) for the budget ``skip_flops``, or None where
    the static plan is the better default."""
    from .flops import percent

    for budget in EMBEDDED_ADAPTIVE_BUDGETS:
        if skip_flops is not None and abs(skip_flops - budget) < 1e-9:
            return _existing(ASSETS / "adaptive_rules" / f"prompt_tokens_{percent(budget, sign=False)}.safetensors",
                             "embedded adaptive rule",
                             "python experiments/adaptive_router.py evaluate --signal prompt_tokens --objective mse "
                             "(docs/adaptive_router.md)")
    return None


def resolve_model(model: str) -> str:
    """``"embedded"`` names the embedded model; anything else is a diffusers folder or hub id, returned as is."""
    return embedded_model_path() if model == "embedded" else model
