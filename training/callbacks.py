"""Callbacks of router training: export the router, report memory."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch


class ExportRouter(L.Callback):
    """Writes ``router.safetensors`` (logits + metadata) when training ends.

    Args:
        path: output file (relative paths are relative to the working directory); ``dit-cache-train`` sets it to
            ``<run dir>/router.safetensors`` (``training/cli.py``).
        tolerance: with ``target_cache_ratio``, the largest miss accepted before the threshold is calibrated, in
            what the target steers: the cache usage ratio, or with ``cost="flops"`` the share of FLOPs skipped.
    """

    def __init__(self, path: str = "router.safetensors", tolerance: float = 0.02):
        self.path = path
        self.tolerance = tolerance

    def on_train_end(self, trainer, module) -> None:
        path = Path(self.path)
        path.parent.mkdir(parents=True, exist_ok=True)
        router, target = module.router, module.hparams.target_cache_ratio
        metadata = module.router_metadata()
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

    def on_train_batch_start(self, trainer, module, batch, batch_index) -> None:
        if batch_index != 0 or getattr(module, "_memory_reported", False):
            return
        module._memory_reported = True
        report = module.measure_step_memory(batch)
        kind = "cuda max_memory_allocated" if module.device.type == "cuda" else "CPU estimate"
        print(f"peak memory ({kind}): training step {report['train'] / 2**20:.1f} MiB, "
              f"inference step {report['inference'] / 2**20:.1f} MiB")
        for key, value in report.items():
            module.log(f"memory/{key}_mib", value / 2**20)
