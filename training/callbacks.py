"""Callbacks of router training: export the router, report memory."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F

from dit_cache.units import unit_layout

from .denoising import fresh_scheduler
from .objectives import teacher_and_student


class ExportRouter(L.Callback):
    """Writes ``router.safetensors`` (logits + metadata) when ``fit`` ends, also when it had nothing left to train
    (resumed from a checkpoint at ``max_steps``, where Lightning skips the training loop and its ``on_train_end``).

    Args:
        path: output file (relative paths are relative to the working directory); ``dit-cache-train`` sets it to
            ``<run dir>/router.safetensors`` (``training/cli.py``).
        tolerance: with ``target_cache_ratio``, the largest miss accepted before the threshold is calibrated, in
            what the target steers: the cache usage ratio, or with ``cost="flops"`` the share of FLOPs skipped.
    """

    def __init__(self, path: str = "router.safetensors", tolerance: float = 0.02):
        self.path = path
        self.tolerance = tolerance

    def on_fit_end(self, trainer, module) -> None:
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        router, target = module.router, module.hparams.target_cache_ratio
        metadata = training_metadata(module)
        metadata["cache_ratio_at_training_threshold"] = router.schedule().cache_ratio
        reached = module.cached_share()  # what the target steers: CUR, or the FLOP share with cost="flops"
        metadata["cached_share_at_training_threshold"] = reached
        if target is not None and abs(reached - target) > self.tolerance:
            # Dual ascent on beta has not settled within tolerance (short runs): land on the target by moving
            # the threshold over the learned scores, and record that this happened.
            metadata["calibrated_from_threshold"] = router.threshold
            router.calibrate_threshold(target, unit_weights=module.unit_costs)
        if trainer.is_global_zero:
            router.save(path, **metadata)
            schedule = module.router.schedule()
            print(f"router saved to {path}: cache ratio {schedule.cache_ratio:.1%}, threshold {module.router.threshold}")


class PeakMemory(L.Callback):
    """Logs the peak memory of one training step next to one plain inference step of the same batch.

    On CUDA both figures are ``torch.cuda.max_memory_allocated``. On the CPU there is no allocator counter, so
    the figures are an estimate, labelled as such: weights + cache + the tensors autograd saves for backward.
    """

    def __init__(self):
        self.reported = False

    def on_train_batch_start(self, trainer, module, batch, batch_index) -> None:
        if batch_index != 0 or self.reported:
            return
        self.reported = True
        report = step_memory(module, batch)
        kind = "cuda max_memory_allocated" if module.device.type == "cuda" else "CPU estimate"
        print(f"peak memory ({kind}): training step {report['train'] / 2**20:.1f} MiB, "
              f"inference step {report['inference'] / 2**20:.1f} MiB")
        for key, value in report.items():
            module.log(f"memory/{key}_mib", value / 2**20)


def training_metadata(module) -> dict:
    """What a router file records of how it was trained (``RouterModule``'s model, scheduler and settings)."""
    hparams, scheduler = module.hparams, module.inference_scheduler
    harmonica = hparams.objective == "harmonica"
    return {
        "transformer_class": type(module.transformer).__name__,
        "unit_layout": unit_layout(module.transformer),
        "num_steps": hparams.num_steps,
        "scheduler_class": type(scheduler).__name__,
        "scheduler_config": {k: v for k, v in dict(scheduler.config).items() if not k.startswith("_")},
        "guidance_scale": hparams.guidance_scale,
        "objective": hparams.objective,
        "beta": module.beta,
        "cost": hparams.cost,
        "proxy": hparams.proxy if harmonica else None,
        # The lambda_t the router was last trained with, so its objective can be re-evaluated later
        # (experiments/diagnose_router.py).
        "proxy_weights": module.step_weights.tolist() if harmonica else None,
        "model": hparams.model,
        "search": None if module.search is None else vars(module.search.settings),
    }


def step_memory(module, batch) -> dict[str, int]:
    """Peak bytes of one training step (teacher + gated student + backward) and one inference step of ``batch``,
    on ``RouterModule`` ``module``; the router is left as it was."""
    conditioning, noise = module.trajectory_inputs(batch)
    scheduler = fresh_scheduler(module.inference_scheduler, module.hparams.num_steps, module.device)
    first, second = scheduler.timesteps[0], scheduler.timesteps[1]
    weights = sum(t.numel() * t.element_size() for t in module.transformer.state_dict().values())
    saved = []

    def train_step():
        with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.numel() * t.element_size()) or t,
                                                      lambda t: t):
            teacher, student, _ = teacher_and_student(module, 1, noise, second, conditioning)
        F.mse_loss(student, teacher).backward()
        module.router.logits.grad = None

    def inference_step():
        with torch.no_grad():
            module.denoiser(noise, second, conditioning)

    report = {}
    for name, run in (("inference", inference_step), ("train", train_step)):
        module.handle.reset()
        with torch.no_grad():
            module.denoiser(noise, first, conditioning)  # fill the cache as a real generation would
        if module.device.type == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            run()
            report[name] = torch.cuda.max_memory_allocated()
        else:
            saved.clear()
            run()
            report[name] = weights + module.handle.cache_bytes + sum(saved)
    module.handle.reset()
    return report
