"""``CacheSchedule``: which unit computes at which denoising step."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

from .file_checks import FileChecker

SCHEDULE_FORMAT = "dit-cache/schedule"


def check_shape(decisions, kind: str, num_steps: int | None, num_units: int | None) -> None:
    """Raise a ValueError naming both shapes if ``decisions`` (a schedule or a plan: ``kind``) does not fit the
    given steps / units."""
    if num_units is not None and num_units != decisions.num_units:
        raise ValueError(
            f"The {kind} has {decisions.num_units} units per step but the transformer has {num_units} "
            f"cacheable units: it was built for another model. Build one with num_units="
            f"len(dit_cache.cache_units(transformer)) = {num_units}."
        )
    if num_steps is not None and num_steps != decisions.num_steps:
        raise ValueError(
            f"The {kind} has {decisions.num_steps} steps but {num_steps} denoising steps were requested. "
            f"Use num_inference_steps={decisions.num_steps}, or build a {kind} for {num_steps} steps."
        )


def check_unit_weights(unit_weights, num_units: int) -> torch.Tensor:
    """``unit_weights`` as a float64 CPU vector of ``num_units`` positive numbers (``None``: all ones)."""
    if unit_weights is None:
        return torch.ones(num_units, dtype=torch.float64)
    weights = torch.as_tensor(unit_weights, dtype=torch.float64).cpu()
    if weights.shape != (num_units,) or not bool((weights > 0).all()):
        raise ValueError(f"unit_weights must be {num_units} positive numbers, one per unit; got {weights.tolist()}")
    return weights


class CacheSchedule:
    """A boolean mask ``[num_steps, num_units]``: True computes the unit at that step, False reuses its cache.

    The first step must compute every unit, because the cache is empty before it.

    Example::

        schedule = CacheSchedule.uniform(num_steps=20, num_units=len(cache_units(transformer)), interval=2)
        schedule.cache_ratio   # 0.5: half of all unit evaluations are reused
    """

    def __init__(self, mask: torch.Tensor):
        mask = torch.as_tensor(mask)
        if mask.ndim != 2 or mask.shape[0] == 0 or mask.shape[1] == 0:
            raise ValueError(f"A schedule mask must be 2-D [num_steps, num_units], got shape {tuple(mask.shape)}.")
        if mask.dtype != torch.bool:
            if not torch.all((mask == 0) | (mask == 1)):
                raise ValueError("A schedule mask must be boolean (or 0/1): True = compute, False = reuse.")
            mask = mask.bool()
        if not bool(mask[0].all()):
            raise ValueError(
                "The first step must compute every unit (the cache is still empty). Set mask[0] = True."
            )
        self.mask = mask.detach().cpu().clone()

    @classmethod
    def full(cls, num_steps: int, num_units: int) -> "CacheSchedule":
        """No caching: every unit computes at every step."""
        return cls(torch.ones(num_steps, num_units, dtype=torch.bool))

    @classmethod
    def uniform(cls, num_steps: int, num_units: int, interval: int) -> "CacheSchedule":
        """FORA-style: every unit computes every ``interval`` steps and is reused in between."""
        if interval < 1:
            raise ValueError(f"interval must be >= 1, got {interval}.")
        computes = torch.arange(num_steps) % interval == 0
        return cls(computes[:, None].expand(num_steps, num_units))

    @property
    def num_steps(self) -> int:
        return self.mask.shape[0]

    @property
    def num_units(self) -> int:
        return self.mask.shape[1]

    @property
    def cache_ratio(self) -> float:
        """CUR: the fraction of (step, unit) evaluations that reuse the cache."""
        return 1.0 - self.mask.float().mean().item()

    def cached_share(self, unit_weights: torch.Tensor) -> float:
        """Like :attr:`cache_ratio`, but each unit counts by its weight (e.g. its FLOPs): the share of the
        units' work that the cache skips."""
        weights = check_unit_weights(unit_weights, self.num_units)
        return ((~self.mask).double() * weights).sum().item() / (weights.sum().item() * self.num_steps)

    def theoretical_speedup(self, unit_flops: torch.Tensor, total_flops: float) -> float:
        """FLOP-weighted speedup of the transformer over a whole generation.

        ``unit_flops`` and ``total_flops`` come from :func:`dit_cache.flops.unit_flops`; everything outside the
        units (embeddings, norms, final layer) always runs and is counted in ``total_flops``.
        """
        unit_flops = torch.as_tensor(unit_flops, dtype=torch.float64)
        if unit_flops.shape != (self.num_units,):
            raise ValueError(f"unit_flops has shape {tuple(unit_flops.shape)}, expected ({self.num_units},).")
        saved = ((~self.mask).double() * unit_flops).sum().item()
        full = float(total_flops) * self.num_steps
        return full / (full - saved)

    def check_compatible(self, num_steps: int | None = None, num_units: int | None = None) -> None:
        """Raise a ValueError naming both shapes if this schedule does not fit the given steps / units."""
        check_shape(self, "schedule", num_steps, num_units)

    def save(self, path: str | Path) -> None:
        metadata = {"format": SCHEDULE_FORMAT, "cache_ratio": f"{self.cache_ratio:.6f}"}
        save_file({"mask": self.mask.to(torch.uint8).contiguous()}, str(path), metadata=metadata)

    @classmethod
    def load(cls, path: str | Path) -> "CacheSchedule":
        """A schedule file, checked as a whole (dtype, rank, shape of the mask; the metadata)."""
        check = FileChecker(path, "schedule", "re-save it with CacheSchedule.save")
        _, header, tensors = check.read((SCHEDULE_FORMAT,))
        check.number(check.json_fields(header), "cache_ratio", 0.0, 1.0)
        check.only(tensors, {"mask"})
        mask = check.tensor(tensors, "mask", "flag", (None, None))
        try:
            return cls(mask)
        except ValueError as error:
            raise ValueError(f"{path} is a damaged schedule: {error}") from None

    def __eq__(self, other) -> bool:
        return isinstance(other, CacheSchedule) and torch.equal(self.mask, other.mask)

    def __repr__(self) -> str:
        return f"CacheSchedule(num_steps={self.num_steps}, num_units={self.num_units}, cache_ratio={self.cache_ratio:.3f})"

    def describe(self) -> str:
        """One line per step: '#' computes, '.' reuses."""
        return "\n".join(f"{step:3d} " + "".join("#" if c else "." for c in row) for step, row in enumerate(self.mask.tolist()))
