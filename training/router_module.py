"""``RouterModule``: trains a ``CacheRouter`` on a frozen transformer (HarmoniCa SDT + IEPO, L2C, or a plan search).

One batch is one trajectory; one optimizer step is taken per denoising step (manual optimization).
The teacher is the same transformer with the cache bypassed, under ``no_grad``: there is no second copy.
What a batch trains is the objective's (``objectives.py``); the callbacks export the router and measure memory.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch

from dit_cache import CacheRouter, CacheSchedule, apply_cache, cache_units
from dit_cache.flops import step_flops

from .denoising import (Conditioning, GuidedDenoiser, latent_noise, latent_tokens, load_denoising_components,
                        static_shift, step_conditioning)
from .objectives import objective_named
from .plan_search import SearchSettings


_FROZEN_MODULES = ("transformer",)


def _check_settings(*, num_steps, proxy_interval, guidance_scale, learning_rate, beta, beta_rate, threshold, cost,
                    target_cache_ratio, latent_size=None, latent_frames=1, **_other_settings) -> None:
    """Refuse values that would train nothing or nonsense, naming the setting and the fix."""
    from dit_cache.router import check_threshold

    if isinstance(latent_size, (list, tuple)):
        sides = list(latent_size) if len(latent_size) == 2 else [None]
    else:
        sides = [] if latent_size is None else [latent_size]
    if not all(isinstance(side, int) and not isinstance(side, bool) and side >= 1 for side in sides):
        raise ValueError(f"latent_size must be a whole number >= 1 (the latent side) or [height, width], "
                         f"got {latent_size!r}.")
    if isinstance(latent_frames, bool) or not isinstance(latent_frames, int) or latent_frames < 1:
        raise ValueError(f"latent_frames must be a whole number >= 1 (a video family's latent frames), "
                         f"got {latent_frames!r}.")

    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 2:
        raise ValueError(f"num_steps must be a whole number >= 2 (step 0 only fills the cache, so a router needs "
                         f"a later step to learn), got {num_steps!r}.")
    if isinstance(proxy_interval, bool) or not isinstance(proxy_interval, int) or proxy_interval < 1:
        raise ValueError(f"proxy_interval must be a whole number >= 1 (trajectories between proxy refreshes), "
                         f"got {proxy_interval!r}.")
    if not (math.isfinite(guidance_scale) and guidance_scale >= 0):
        raise ValueError(f"guidance_scale must be a finite number >= 0 (as at inference), got {guidance_scale}.")
    if not (math.isfinite(learning_rate) and learning_rate > 0):
        raise ValueError(f"learning_rate must be a finite number > 0, got {learning_rate}.")
    if not (math.isfinite(beta_rate) and beta_rate >= 0):
        raise ValueError(f"beta_rate must be a finite number >= 0, got {beta_rate}.")
    check_threshold(threshold)
    if target_cache_ratio is not None and not 0.0 <= target_cache_ratio < 1.0:
        raise ValueError(f"target_cache_ratio must be in [0, 1), got {target_cache_ratio}.")
    if cost not in ("units", "flops"):
        raise ValueError(f"cost must be 'units' or 'flops', got {cost!r}.")
    if beta < 0 or (beta == 0 and target_cache_ratio is not None):
        raise ValueError(f"beta must be >= 0, and > 0 with target_cache_ratio (its start value); got {beta}.")


class RouterModule(L.LightningModule):
    """Learned cache router training.

    Args:
        model: diffusers pipeline folder or hub id (the transformer and scheduler are loaded from it), or
            ``embedded`` for the embedded model.
        scheduler: sample with this diffusers scheduler class instead of the pipeline's (e.g. ``DDIMScheduler``);
            use the same one at inference.
        num_steps: denoising steps of the router (= ``num_inference_steps`` at generation time).
        guidance_scale: classifier-free guidance used along the training trajectories, as at inference.
        objective: ``harmonica`` (SDT + image-error proxy), ``sdt`` (SDT, plain MSE), ``l2c`` (Learning-to-Cache
            baseline: x0 = samples of the uncached model, noised to an even step; every other step computes),
            ``search`` (greedy search of a plan on the final-latent error, one move per training step; the move
            order is the router, which then serves any budget up to ``search.max_flops``: see ``plan_search``).
        proxy: ``paper`` (final-latent error with caching disabled at step t only), ``cumulative`` (official code)
            or ``sensitivity`` (ours: final-latent change between step t fully computed and fully cached).
        proxy_interval: trajectories between proxy refreshes (C).
        proxy_average: weight the steps by the mean of all refreshes so far (ours) instead of the latest one.
            Every proxy is measured under the router's current schedule, so one refresh alone makes the router
            cache the steps it just protected: on the embedded model the weights flipped between the early
            and the late steps from one refresh to the next.
        beta: weight of the sparsity term (sum of scores); the start value when ``target_cache_ratio`` is set.
        cost: what computing a unit costs in the sparsity term and in ``target_cache_ratio``: ``units``, every
            unit alike (the papers; the target is CUR), or ``flops``, each unit by its FLOPs (normalized to mean 1;
            the target is the share of the units' FLOPs skipped), so the router pays for what it computes.
        target_cache_ratio: adapt beta by dual ascent so the hard schedule's cached share (see ``cost``) reaches
            this value.
        beta_rate: dual-ascent step on log(beta) per trajectory, per unit of error in the cached share.
        threshold: hard-gate threshold tau used for cache writes in training and for the exported schedule.
        learning_rate: AdamW learning rate of the router logits (weight decay 0).
        seed: router initialisation.
        search: settings of ``objective: search`` (:class:`~dit_cache.training.plan_search.SearchSettings`).
        latent_size: side of the transformer's input latents, or ``[height, width]`` (default: its config's
            ``sample_size``; FLUX, which has none: the side of its packed token grid, 64 = 1024 px).
        latent_frames: latent frames of a video family's inputs (default 1; Wan 2.1 at 81 frames: 21).
    """

    def __init__(self, model: str, scheduler: str | None = None, num_steps: int = 20, guidance_scale: float = 4.5,
                 objective: Literal["harmonica", "sdt", "l2c", "search"] = "harmonica",
                 proxy: Literal["paper", "cumulative", "sensitivity"] = "paper", proxy_interval: int = 50,
                 proxy_average: bool = False, beta: float = 1e-4, cost: Literal["units", "flops"] = "units",
                 target_cache_ratio: float | None = None,
                 beta_rate: float = 0.5, threshold: float = 0.1, learning_rate: float = 0.01, seed: int = 0,
                 latent_size: int | list[int] | None = None, latent_frames: int = 1,
                 search: SearchSettings | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        _check_settings(**self.hparams)
        self.objective = objective_named(objective, search)
        transformer, self.inference_scheduler = load_denoising_components(model, scheduler)
        # FLUX's scheduler shifts by resolution: fix the shift its pipeline uses at the resolution trained at.
        self.inference_scheduler = static_shift(self.inference_scheduler, latent_tokens(latent_size))
        self.transformer = transformer.requires_grad_(False).eval()
        self.units = cache_units(self.transformer)
        self.router = CacheRouter(num_steps, len(self.units), threshold=threshold,
                                  fixed_rows=self.objective.fixed_rows(num_steps),
                                  generator=torch.Generator().manual_seed(seed))
        costs = torch.ones(len(self.units))
        if cost == "flops":  # each unit by its FLOPs, normalized to mean 1
            flops, _ = step_flops(self.transformer)
            costs = (flops / flops.mean()).float()
        self.register_buffer("unit_costs", costs, persistent=False)  # derived from the model
        self.handle = apply_cache(self.transformer, CacheSchedule.full(num_steps, len(self.units)))
        self.denoiser = GuidedDenoiser(self.transformer, guidance_scale)
        # Dual ascent works on log(beta) so beta can move across orders of magnitude; beta = 0 is log 0 = -inf.
        self.register_buffer("log_beta", torch.tensor(math.log(beta) if beta > 0 else -math.inf))
        self.register_buffer("step_weights", torch.ones(num_steps))
        self.register_buffer("proxy_refreshes", torch.zeros((), dtype=torch.long))
        self.search = None  # objective "search": its GreedyPlanSearch (see PlanSearch.attach)
        self.objective.attach(self)

    # ---- checkpoints --------------------------------------------------------------------------------------
    # The transformer is frozen and reloaded from `model` on resume: a checkpoint keeps only what training
    # changes (router logits, beta, proxy weights), the optimizer state and Lightning's bookkeeping.
    def on_save_checkpoint(self, checkpoint: dict) -> None:
        frozen = tuple(f"{name}." for name in _FROZEN_MODULES)
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if not k.startswith(frozen)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        loaded = checkpoint["state_dict"]
        for name in _FROZEN_MODULES:
            for key, value in getattr(self, name).state_dict(prefix=f"{name}.").items():
                loaded.setdefault(key, value)  # older checkpoints still carry the transformer: theirs is the same

    # ---- model inputs -------------------------------------------------------------------------------------
    def conditioning(self, rows: dict) -> Conditioning:
        """Forward kwargs of conditioning rows (a batch's, see ``RouterDataModule``) on this module's device."""
        return step_conditioning(rows, self.transformer).to(self.device)

    def noise(self, batch_size: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return latent_noise(self.transformer, batch_size, generator, self.hparams.latent_size,
                            self.hparams.latent_frames).to(self.device)

    def trajectory_inputs(self, batch) -> tuple[Conditioning, torch.Tensor]:
        """The forward kwargs and the initial noise of a batch ``(conditioning rows, seed)``."""
        rows, seed = batch
        conditioning = self.conditioning(rows)
        return conditioning, self.noise(conditioning.batch_size, int(seed))

    # ---- training -----------------------------------------------------------------------------------------
    @property
    def beta(self) -> float:
        return float(self.log_beta.exp())

    def sparsity(self, step_scores: torch.Tensor) -> torch.Tensor:
        """The sparsity term of one step: beta x the scores (compute probabilities), each unit by its cost."""
        return self.beta * (step_scores * self.unit_costs).sum()

    def cached_share(self) -> float:
        """What ``target_cache_ratio`` steers: the hard schedule's cached share, units counted by ``cost``."""
        return self.router.schedule().cached_share(self.unit_costs)

    def training_step(self, batch, batch_index):
        self.objective.training_step(self, batch, batch_index)

    def configure_optimizers(self):
        return torch.optim.AdamW([self.router.logits], lr=self.hparams.learning_rate, weight_decay=0.0)
