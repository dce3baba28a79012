"""``RouterModule``: trains a ``CacheRouter`` on a frozen transformer (HarmoniCa SDT + IEPO, or L2C).

One batch is one trajectory; one optimizer step is taken per denoising step (manual optimization).
The teacher is the same transformer with the cache bypassed, under ``no_grad``: there is no second copy.
"""

from __future__ import annotations

import math
from typing import Literal

import lightning as L
import torch
import torch.nn.functional as F

from dit_cache import CacheRouter, CacheSchedule, apply_cache, cache_units
from dit_cache.flops import step_flops
from dit_cache.units import unit_layout

from .denoising import (GuidedDenoiser, class_conditioning, fresh_scheduler, init_noise_sigma, latent_noise,
                        load_denoising_components, prompt_conditioning, sample_latents, scale_model_input,
                        static_shift)
from .plan_search import GreedyPlanSearch, SearchSettings, TrajectoryRunner
from .proxies import image_error_proxy


_FROZEN_MODULES = ("transformer",)


def _check_settings(*, num_steps, proxy_interval, guidance_scale, learning_rate, beta_rate, threshold) -> None:
    """Refuse values that would train nothing or nonsense, naming the setting and the fix."""
    from dit_cache.router import check_threshold

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
        latent_size: side of the transformer's input latents (default: its config's ``sample_size``; FLUX, which has
            none: the side of its packed token grid, 64 = 1024 px).
    """

    def __init__(self, model: str, scheduler: str | None = None, num_steps: int = 20, guidance_scale: float = 4.5,
                 objective: Literal["harmonica", "sdt", "l2c", "search"] = "harmonica",
                 proxy: Literal["paper", "cumulative", "sensitivity"] = "paper", proxy_interval: int = 50,
                 proxy_average: bool = False, beta: float = 1e-4, cost: Literal["units", "flops"] = "units",
                 target_cache_ratio: float | None = None,
                 beta_rate: float = 0.5, threshold: float = 0.1, learning_rate: float = 0.01, seed: int = 0,
                 latent_size: int | None = None, search: SearchSettings | None = None):
        super().__init__()
        self.save_hyperparameters()
        self.automatic_optimization = False
        _check_settings(num_steps=num_steps, proxy_interval=proxy_interval, guidance_scale=guidance_scale,
                        learning_rate=learning_rate, beta_rate=beta_rate, threshold=threshold)
        if target_cache_ratio is not None and not 0.0 <= target_cache_ratio < 1.0:
            raise ValueError(f"target_cache_ratio must be in [0, 1), got {target_cache_ratio}.")
        if cost not in ("units", "flops"):
            raise ValueError(f"cost must be 'units' or 'flops', got {cost!r}.")
        if beta < 0 or (beta == 0 and target_cache_ratio is not None):
            raise ValueError(f"beta must be >= 0, and > 0 with target_cache_ratio (its start value); got {beta}.")
        transformer, self.inference_scheduler = load_denoising_components(model, scheduler)
        # FLUX's scheduler shifts by resolution: fix the shift its pipeline uses at the resolution trained at.
        self.inference_scheduler = static_shift(self.inference_scheduler, (latent_size or 64) ** 2)
        if objective == "l2c" and not hasattr(self.inference_scheduler, "add_noise"):
            raise ValueError(f"objective='l2c' noises samples with scheduler.add_noise, which "
                             f"{type(self.inference_scheduler).__name__} (flow matching) lacks: use objective="
                             "'harmonica' or 'sdt'.")
        self.transformer = transformer.requires_grad_(False).eval()
        self.units = cache_units(self.transformer)
        generator = torch.Generator().manual_seed(seed)
        fixed = torch.arange(num_steps) % 2 == 0 if objective == "l2c" else None
        self.router = CacheRouter(num_steps, len(self.units), threshold=threshold, fixed_rows=fixed,
                                  generator=generator)
        self.register_buffer("unit_costs", self._unit_costs(cost), persistent=False)  # derived from the model
        self.handle = apply_cache(self.transformer, CacheSchedule.full(num_steps, len(self.units)))
        self.denoiser = GuidedDenoiser(self.transformer, guidance_scale)
        # Dual ascent works on log(beta) so beta can move across orders of magnitude; beta = 0 is log 0 = -inf.
        self.register_buffer("log_beta", torch.tensor(math.log(beta) if beta > 0 else -math.inf))
        self.register_buffer("step_weights", torch.ones(num_steps))
        self.register_buffer("proxy_refreshes", torch.zeros((), dtype=torch.long))
        self.search = None
        if objective == "search":
            flops, _ = step_flops(self.transformer)
            self.search = GreedyPlanSearch(search or SearchSettings(), self.units, flops, num_steps)
            self._runner = None

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

    # ---- conditioning -------------------------------------------------------------------------------------
    def _conditioning(self, prompt_indices):
        data = self.trainer.datamodule.conditioning
        if "class_labels" in data:
            null_class = self.transformer.config.num_embeds_ada_norm
            return class_conditioning(data["class_labels"][prompt_indices], null_class).to(self.device)
        return prompt_conditioning(data, prompt_indices, self.transformer).to(self.device)

    def _noise(self, batch_size: int, seed: int) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return latent_noise(self.transformer, batch_size, generator, self.hparams.latent_size).to(self.device)

    # ---- training -----------------------------------------------------------------------------------------
    @property
    def beta(self) -> float:
        return float(self.log_beta.exp())

    def _unit_costs(self, cost: str) -> torch.Tensor:
        if cost == "units":
            return torch.ones(len(self.units))
        flops, _ = step_flops(self.transformer)
        return (flops / flops.mean()).float()

    def sparsity(self, step_scores: torch.Tensor) -> torch.Tensor:
        """The sparsity term of one step: beta x the scores (compute probabilities), each unit by its cost."""
        return self.beta * (step_scores * self.unit_costs).sum()

    def cached_share(self) -> float:
        """What ``target_cache_ratio`` steers: the hard schedule's cached share, units counted by ``cost``."""
        return self.router.schedule().cached_share(self.unit_costs)

    def _router_step(self, step: int, teacher: torch.Tensor, student: torch.Tensor, scores: torch.Tensor):
        optimizer = self.optimizers()
        error = F.mse_loss(student.float(), teacher.float())
        loss = self.step_weights[step] * error + self.sparsity(scores[step])
        optimizer.zero_grad()
        self.manual_backward(loss)
        optimizer.step()
        self.router.clamp_()
        return error.detach()

    def _gated_step(self, step: int, latents, t, conditioning) -> tuple[torch.Tensor, torch.Tensor]:
        """Teacher (bypassed cache, no grad) and student (soft gates) on the same latent, then one update."""
        with torch.no_grad(), self.handle.bypassed():
            teacher = self.denoiser(latents, t, conditioning)
        scores = self.router.scores()
        self.handle.set_gate(scores[step], self.hparams.threshold)
        with self.handle.gated():
            student = self.denoiser(latents, t, conditioning)
        error = self._router_step(step, teacher, student, scores)
        return student.detach(), error

    def training_step(self, batch, batch_index):
        if self.search is not None:
            return self._search_move()
        prompt_indices, seed = batch
        conditioning = self._conditioning(prompt_indices)
        noise = self._noise(len(prompt_indices), int(seed))
        if self.hparams.objective == "harmonica" and batch_index % self.hparams.proxy_interval == 0:
            self._refresh_proxy(conditioning, noise)
        errors = self._l2c_trajectory(conditioning, noise) if self.hparams.objective == "l2c" else \
            self._sdt_trajectory(conditioning, noise)
        self._update_beta()
        schedule = self.router.schedule()
        self.log_dict({"train/mse": torch.stack(errors).mean(), "train/cache_ratio": schedule.cache_ratio,
                       "train/cached_share": schedule.cached_share(self.unit_costs), "train/beta": self.beta},
                      prog_bar=True, batch_size=len(prompt_indices))

    def _search_move(self) -> None:
        """One greedy move on the calibration batch (the data module's first prompts, seeds from
        ``search.calibration_seed``); the router always holds the move order so far."""
        settings = self.search.settings
        if self._runner is None:
            count = settings.calibration_prompts
            indices = torch.arange(count) % self.trainer.datamodule.num_conditions
            noise = torch.cat([self._noise(1, settings.calibration_seed + i) for i in range(count)])
            self._runner = TrajectoryRunner(self.denoiser, self.inference_scheduler, self.handle, noise,
                                            self._conditioning(indices), self.hparams.num_steps)
        outcome = self.search.move(self._runner)
        # A move changes no parameter, but Lightning counts global steps (and so checkpoints) by optimizer steps:
        # an empty one (no gradients: AdamW leaves the logits alone) makes every move a step.
        self.optimizers().step()
        self.router = self.search.router()
        if outcome.get("moved"):
            self.print(f"search move {int(self.search.moves)}: step {outcome['step']}, move {outcome['move']}, "
                       f"{outcome['action']}: {outcome['share']:.1%} of the FLOPs skipped, final-latent MSE "
                       f"{outcome['error']:.3g} ({outcome['measured']} plans measured)", flush=True)
            self.log_dict({"search/skipped_share": outcome["share"], "search/final_latent_mse": outcome["error"],
                           "search/measured": float(outcome["measured"])}, prog_bar=True, batch_size=1)
        if self.search.done:
            self.trainer.should_stop = True

    def _sdt_trajectory(self, conditioning, noise) -> list[torch.Tensor]:
        """Step-Wise Denoising Training: follow the student's own cached trajectory from noise."""
        scheduler = fresh_scheduler(self.inference_scheduler, self.hparams.num_steps, self.device)
        latents = noise * init_noise_sigma(scheduler)
        self.handle.reset()
        errors = []
        for step, t in enumerate(scheduler.timesteps):
            model_input = scale_model_input(scheduler, latents, t)
            if step == 0:
                with torch.no_grad():  # the first step computes everything and fills the cache
                    output = self.denoiser(model_input, t, conditioning)
            else:
                output, error = self._gated_step(step, model_input, t, conditioning)
                errors.append(error)
            latents = scheduler.step(output, t, latents).prev_sample.detach()
        return errors

    def _l2c_trajectory(self, conditioning, noise) -> list[torch.Tensor]:
        """Learning-to-Cache: from x0 of the uncached model, noise to step k-1, a full step, then train step k."""
        steps = self.hparams.num_steps
        x0 = sample_latents(self.denoiser, self.inference_scheduler, noise, conditioning, steps,
                            self.handle, CacheSchedule.full(steps, len(self.units)))
        errors = []
        for step in range(1, steps, 2):
            scheduler = fresh_scheduler(self.inference_scheduler, steps, self.device)
            if hasattr(scheduler, "set_begin_index"):  # index-based solvers (DPM-Solver); DDIM is timestep-based
                scheduler.set_begin_index(step - 1)
            t_full, t_gated = scheduler.timesteps[step - 1], scheduler.timesteps[step]
            latents = scheduler.add_noise(x0, torch.randn_like(x0), t_full[None])
            self.handle.reset()  # the full step below is the cache's step 0: it computes and stores
            with torch.no_grad():
                output = self.denoiser(scale_model_input(scheduler, latents, t_full), t_full, conditioning)
            latents = scheduler.step(output, t_full, latents).prev_sample
            _, error = self._gated_step(step, scale_model_input(scheduler, latents, t_gated), t_gated, conditioning)
            errors.append(error)
        return errors

    @torch.no_grad()
    def _refresh_proxy(self, conditioning, noise) -> None:
        weights = image_error_proxy(self.hparams.proxy, self.router.schedule(), self._final_latents,
                                    conditioning, noise)
        weights = self.trainer.strategy.reduce(weights.to(self.device), reduce_op="mean")
        # Normalized to mean 1 over the trained steps, so beta keeps its meaning whatever the proxy's scale.
        weights = weights / weights[1:].mean().clamp_min(1e-12)
        self.proxy_refreshes += 1
        if self.hparams.proxy_average:  # running mean; the first refresh replaces the initial ones
            weights = self.step_weights + (weights - self.step_weights) / self.proxy_refreshes
        self.step_weights.copy_(weights)
        self.log_dict({f"proxy/lambda_{step:02d}": float(w) for step, w in enumerate(self.step_weights) if step})

    def _final_latents(self, schedule: CacheSchedule, conditioning, noise) -> torch.Tensor:
        return sample_latents(self.denoiser, self.inference_scheduler, noise, conditioning,
                              self.hparams.num_steps, self.handle, schedule)

    def _update_beta(self) -> None:
        target = self.hparams.target_cache_ratio
        if target is None:
            return
        current = self.cached_share()
        self.log_beta += self.hparams.beta_rate * (target - current)

    def configure_optimizers(self):
        return torch.optim.AdamW([self.router.logits], lr=self.hparams.learning_rate, weight_decay=0.0)

    # ---- memory -------------------------------------------------------------------------------------------
    def measure_step_memory(self, batch) -> dict[str, int]:
        """Peak bytes of one training step (teacher + gated student + backward) and one inference step."""
        prompt_indices, seed = batch
        conditioning = self._conditioning(prompt_indices)
        noise = self._noise(len(prompt_indices), int(seed))
        scheduler = fresh_scheduler(self.inference_scheduler, self.hparams.num_steps, self.device)
        first, second = scheduler.timesteps[0], scheduler.timesteps[1]
        weights = sum(t.numel() * t.element_size() for t in self.transformer.state_dict().values())
        saved = []

        def train_step():
            with torch.no_grad(), self.handle.bypassed():
                teacher = self.denoiser(noise, second, conditioning)
            scores = self.router.scores()
            self.handle.set_gate(scores[1], self.hparams.threshold)
            with self.handle.gated(), torch.autograd.graph.saved_tensors_hooks(
                lambda t: saved.append(t.numel() * t.element_size()) or t, lambda t: t
            ):
                student = self.denoiser(noise, second, conditioning)
            F.mse_loss(student, teacher).backward()
            self.router.logits.grad = None

        def inference_step():
            with torch.no_grad():
                self.denoiser(noise, second, conditioning)

        report = {}
        for name, run in (("inference", inference_step), ("train", train_step)):
            self.handle.reset()
            with torch.no_grad():
                self.denoiser(noise, first, conditioning)  # fill the cache as a real generation would
            if self.device.type == "cuda":
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                run()
                report[name] = torch.cuda.max_memory_allocated()
            else:
                saved.clear()
                run()
                report[name] = weights + self.handle.cache_bytes + sum(saved)
        self.handle.reset()
        return report

    # ---- export -------------------------------------------------------------------------------------------
    def router_metadata(self) -> dict:
        scheduler = self.inference_scheduler
        return {
            "transformer_class": type(self.transformer).__name__,
            "unit_layout": unit_layout(self.transformer),
            "num_steps": self.hparams.num_steps,
            "scheduler_class": type(scheduler).__name__,
            "scheduler_config": {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
            "guidance_scale": self.hparams.guidance_scale,
            "objective": self.hparams.objective,
            "beta": self.beta,
            "cost": self.hparams.cost,
            "proxy": self.hparams.proxy if self.hparams.objective == "harmonica" else None,
            # The lambda_t the router was last trained with, so its objective can be re-evaluated later
            # (experiments/diagnose_router.py).
            "proxy_weights": self.step_weights.tolist() if self.hparams.objective == "harmonica" else None,
            "model": self.hparams.model,
            "search": None if self.search is None else vars(self.search.settings),
        }
