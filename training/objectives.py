"""The training objectives of ``RouterModule``, by name (its ``objective`` argument): each trains on one batch.

An objective keeps no state a checkpoint needs: what training changes lives on the module (the router logits,
``log_beta``, ``step_weights``, the search's buffers), under the checkpoint keys it always had.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from dit_cache import CacheRouter, CacheSchedule
from dit_cache.flops import step_flops

from .denoising import fresh_scheduler, init_noise_sigma, sample_latents, scale_model_input
from .plan_search import GreedyPlanSearch, SearchSettings, TrajectoryRunner, search_history
from .proxies import check_proxy, image_error_proxy


class Objective:
    """One way of training the router. ``attach`` checks the module's settings and adds the state the objective
    trains; ``training_step`` runs one batch (one trajectory, or one search move)."""

    def fixed_rows(self, num_steps: int) -> torch.Tensor | None:
        """Steps whose router row is fixed to compute (None: every row is learned)."""
        return None

    def attach(self, module) -> None:
        pass

    def training_step(self, module, batch, batch_index: int) -> None:
        raise NotImplementedError


class StepwiseDenoising(Objective):
    """SDT: follow the student's own cached trajectory from noise; one router update per denoising step after the
    first (teacher: the same step with the cache bypassed), weighted by ``step_weights``."""

    def training_step(self, module, batch, batch_index: int) -> None:
        conditioning, noise = module.trajectory_inputs(batch)
        self.before_trajectory(module, conditioning, noise, batch_index)
        errors = self.trajectory(module, conditioning, noise)
        update_beta(module)
        schedule = module.router.schedule()
        module.log_dict({"train/mse": torch.stack(errors).mean(), "train/cache_ratio": schedule.cache_ratio,
                         "train/cached_share": schedule.cached_share(module.unit_costs), "train/beta": module.beta},
                        prog_bar=True, batch_size=conditioning.batch_size)

    def before_trajectory(self, module, conditioning, noise, batch_index: int) -> None:
        pass

    def trajectory(self, module, conditioning, noise) -> list[torch.Tensor]:
        scheduler = fresh_scheduler(module.inference_scheduler, module.hparams.num_steps, module.device)
        latents = noise * init_noise_sigma(scheduler)
        module.handle.reset()
        errors = []
        for step, t in enumerate(scheduler.timesteps):
            model_input = scale_model_input(scheduler, latents, t)
            if step == 0:
                with torch.no_grad():  # the first step computes everything and fills the cache
                    output = module.denoiser(model_input, t, conditioning)
            else:
                output, error = gated_step(module, step, model_input, t, conditioning)
                errors.append(error)
            latents = scheduler.step(output, t, latents).prev_sample.detach()
        return errors


class HarmoniCa(StepwiseDenoising):
    """SDT weighted by the Image Error Proxy (``proxy``), refreshed every ``proxy_interval`` trajectories."""

    def attach(self, module) -> None:
        check_proxy(module.hparams.proxy)

    def before_trajectory(self, module, conditioning, noise, batch_index: int) -> None:
        if batch_index % module.hparams.proxy_interval == 0:
            refresh_proxy(module, conditioning, noise)


class LearningToCache(StepwiseDenoising):
    """L2C: from x0 of the uncached model, noise to step k-1, a full step, then train step k; every other step
    (the even ones) always computes."""

    def fixed_rows(self, num_steps: int) -> torch.Tensor:
        return torch.arange(num_steps) % 2 == 0

    def attach(self, module) -> None:
        if not hasattr(module.inference_scheduler, "add_noise"):
            raise ValueError(f"objective='l2c' noises samples with scheduler.add_noise, which "
                             f"{type(module.inference_scheduler).__name__} (flow matching) lacks: use objective="
                             "'harmonica' or 'sdt'.")

    def trajectory(self, module, conditioning, noise) -> list[torch.Tensor]:
        steps = module.hparams.num_steps
        x0 = sample_latents(module.denoiser, module.inference_scheduler, noise, conditioning, steps,
                            module.handle, CacheSchedule.full(steps, len(module.units)))
        errors = []
        for step in range(1, steps, 2):
            scheduler = fresh_scheduler(module.inference_scheduler, steps, module.device)
            if hasattr(scheduler, "set_begin_index"):  # index-based solvers (DPM-Solver); DDIM is timestep-based
                scheduler.set_begin_index(step - 1)
            t_full, t_gated = scheduler.timesteps[step - 1], scheduler.timesteps[step]
            latents = scheduler.add_noise(x0, torch.randn_like(x0), t_full[None])
            module.handle.reset()  # the full step below is the cache's step 0: it computes and stores
            with torch.no_grad():
                output = module.denoiser(scale_model_input(scheduler, latents, t_full), t_full, conditioning)
            latents = scheduler.step(output, t_full, latents).prev_sample
            model_input = scale_model_input(scheduler, latents, t_gated)
            errors.append(gated_step(module, step, model_input, t_gated, conditioning)[1])
        return errors


class PlanSearch(Objective):
    """Greedy search of a plan on the final-latent error, one move per batch (``search`` settings); the move order
    is the router. It calibrates on a fixed batch: the data module's first prompts, seeds from
    ``search.calibration_seed``."""

    def __init__(self, settings: SearchSettings | None = None):
        self.settings = settings or SearchSettings()
        self._runner = self._validation = None  # the calibration (validation) batch's runs; rebuilt after a resume

    def attach(self, module) -> None:
        flops, _ = step_flops(module.transformer)
        module.search = GreedyPlanSearch(self.settings, module.units, flops, module.hparams.num_steps)
        if self.settings.order_from is not None:
            module.search.adopt(CacheRouter.load(self.settings.order_from))

    def training_step(self, module, batch, batch_index: int) -> None:
        search = module.search
        if self._runner is None:
            count, validation = self.settings.calibration_prompts, self.settings.validation_prompts
            self._runner = self._calibration_runner(module, count)
            self._validation = self._calibration_runner(module, validation, start=count) if validation else None
        outcome = search.move(self._runner, self._validation)
        # A move changes no parameter, but Lightning counts global steps (and so checkpoints) by optimizer steps:
        # an empty one (no gradients: AdamW leaves the logits alone) makes every move a step.
        module.optimizers().step()
        module.router = search.router()
        if outcome.get("moved"):
            module.print(f"search move {int(search.moves)}: step {outcome['step']}, move {outcome['move']}, "
                         f"{outcome['action']}: {outcome['share']:.1%} of the FLOPs skipped, "
                         f"{self.settings.error_label} {outcome['error']:.3g} ({outcome['measured']} plans measured)", flush=True)
            module.log_dict({"search/skipped_share": outcome["share"], f"search/final_latent_{self.settings.error}": outcome["error"],
                             "search/measured": float(outcome["measured"])}, prog_bar=True, batch_size=1)
        if "summary" in outcome:  # what a step other than a greedy move did
            module.print(outcome["summary"], flush=True)
        if search.done:
            module.trainer.should_stop = True

    def _calibration_runner(self, module, count: int, start: int = 0) -> TrajectoryRunner:
        """Runs of ``count`` prompts from the ``start``-th, noise seeds ``calibration_seed + start`` on."""
        seed = self.settings.calibration_seed + start
        conditioning = module.conditioning(module.trainer.datamodule.calibration_conditioning(count, start))
        noise = torch.cat([module.noise(1, seed + i) for i in range(count)])
        dtype = module.transformer.dtype  # bf16-true casts the transformer, not what the search makes itself
        noise = noise.to(dtype)
        conditioning.kwargs = {key: value.to(dtype) if torch.is_tensor(value) and value.is_floating_point() else value
                               for key, value in conditioning.kwargs.items()}
        return TrajectoryRunner(module.denoiser, module.inference_scheduler, module.handle, noise, conditioning,
                                module.hparams.num_steps, history=search_history(self.settings.actions),
                                settings=self.settings)


OBJECTIVES: dict[str, type[Objective]] = {"harmonica": HarmoniCa, "sdt": StepwiseDenoising,
                                          "l2c": LearningToCache, "search": PlanSearch}


def objective_named(name: str, search: SearchSettings | None = None) -> Objective:
    """A new objective ``name``. ``search`` is the one with settings of its own (``RouterModule(search=...)``);
    the others read the module's."""
    if name not in OBJECTIVES:
        raise ValueError(f"Unknown objective {name!r}; choose one of {sorted(OBJECTIVES)}.")
    return PlanSearch(search) if name == "search" else OBJECTIVES[name]()


# ---- the steps the gated objectives share -------------------------------------------------------------------
def teacher_and_student(module, step: int, latents, t, conditioning):
    """The teacher's output (the same transformer, cache bypassed, no grad), the student's (soft gates of ``step``)
    on the same latent, and the router's scores the gates came from."""
    with torch.no_grad(), module.handle.bypassed():
        teacher = module.denoiser(latents, t, conditioning)
    scores = module.router.scores()
    module.handle.set_gate(scores[step], module.hparams.threshold)
    with module.handle.gated():
        student = module.denoiser(latents, t, conditioning)
    return teacher, student, scores


def gated_step(module, step: int, latents, t, conditioning) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher and student on the same latent, then one router update; returns the student's output and error."""
    teacher, student, scores = teacher_and_student(module, step, latents, t, conditioning)
    error = F.mse_loss(student.float(), teacher.float())
    loss = module.step_weights[step] * error + module.sparsity(scores[step])
    optimizer = module.optimizers()
    optimizer.zero_grad()
    module.manual_backward(loss)
    optimizer.step()
    module.router.clamp_()
    return student.detach(), error.detach()


def update_beta(module) -> None:
    """Dual ascent on log(beta) toward ``target_cache_ratio`` (nothing without one)."""
    target = module.hparams.target_cache_ratio
    if target is not None:
        module.log_beta += module.hparams.beta_rate * (target - module.cached_share())


@torch.no_grad()
def refresh_proxy(module, conditioning, noise) -> None:
    """Set ``step_weights`` from the Image Error Proxy measured under the router's current schedule."""
    def final_latents(schedule: CacheSchedule, conditioning, noise) -> torch.Tensor:
        return sample_latents(module.denoiser, module.inference_scheduler, noise, conditioning,
                              module.hparams.num_steps, module.handle, schedule)

    weights = image_error_proxy(module.hparams.proxy, module.router.schedule(), final_latents, conditioning, noise)
    weights = module.trainer.strategy.reduce(weights.to(module.device), reduce_op="mean")
    # Normalized to mean 1 over the trained steps, so beta keeps its meaning whatever the proxy's scale.
    weights = weights / weights[1:].mean().clamp_min(1e-12)
    module.proxy_refreshes += 1
    if module.hparams.proxy_average:  # running mean; the first refresh replaces the initial ones
        weights = module.step_weights + (weights - module.step_weights) / module.proxy_refreshes
    module.step_weights.copy_(weights)
    module.log_dict({f"proxy/lambda_{step:02d}": float(w) for step, w in enumerate(module.step_weights) if step})
