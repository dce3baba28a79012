"""Snapshots of one sampling trajectory, so the search restarts a candidate plan from where it departs.

A snapshot at step ``s`` is what sampling needs to go on from there: the latents, a copy of the scheduler and the
cache's state (``CacheHandle.snapshot()``: each unit's last computed outputs, per cache context: a pipeline that
makes a conditional and an unconditional call has one state for each). The unit outputs are nearly all of its
size (``units x history x batch x tokens x width``), so where they live and how many snapshots a trajectory keeps
decide the search's memory:

- ``limit``: at most this many snapshots, spread evenly over the steps (None: one before every step after the first,
  the fastest). A candidate departing at step ``s`` restarts from the latest snapshot at or before ``s`` and
  recomputes the steps in between, which the current plan and the candidate share, so its result is the same to the
  bit; it only costs those steps.
- ``location``: ``memory`` (the tensors as computed, on the model's device), ``cpu`` (copied to the CPU: a GPU
  search keeps only the live cache on the GPU) or ``disk`` (safetensors files in a temporary folder, read back
  when a candidate restarts: RAM holds only the snapshot in use).

Consecutive snapshots share the outputs computed before both; every location keeps each output once.
"""

from __future__ import annotations

import copy
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from dit_cache.state import CacheSnapshot

LOCATIONS = ("memory", "cpu", "disk")


def snapshot_steps(num_steps: int, limit: int | None) -> list[int]:
    """The steps snapshotted: every step after the first, or (``limit``) at most ``limit`` of them, evenly spaced
    so a restart recomputes fewer than ``ceil(num_steps / (limit + 1))`` steps (step 0 restarts from the noise)."""
    if limit is None or limit >= num_steps - 1:
        return list(range(1, num_steps))
    if limit == 0:
        return []
    spacing = -(-num_steps // (limit + 1))
    return list(range(spacing, num_steps, spacing))[:limit]


def check_snapshot_settings(limit, location: str, directory) -> None:
    """Refuse settings the store cannot follow, naming the setting and what it takes."""
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 0):
        raise ValueError(f"search.snapshot_limit must be a whole number >= 0 (snapshots a trajectory keeps; 0: every "
                         f"candidate restarts from the noise) or null for one per step, got {limit!r}.")
    if location not in LOCATIONS:
        raise ValueError(f"search.snapshot_location must be one of {', '.join(LOCATIONS)}, got {location!r}.")
    if directory is not None:
        if location != "disk":
            raise ValueError(f"search.snapshot_dir is where snapshot_location 'disk' writes; with "
                             f"{location!r} nothing is written there: drop it, or set snapshot_location: disk.")
        if not Path(directory).is_dir():
            raise ValueError(f"search.snapshot_dir {str(directory)!r} is not a folder: create it first.")


@dataclass
class TrajectorySnapshot:
    """The state of a trajectory at the start of ``step``."""

    step: int
    latents: torch.Tensor
    scheduler: object
    cache: dict[str | None, CacheSnapshot]  # by cache context (None: the calls not in one)

    @property
    def nbytes(self) -> int:
        """Bytes of the unit outputs this snapshot holds."""
        return sum(snapshot.nbytes for snapshot in self.cache.values())


class TrajectorySnapshots:
    """The snapshots of one recorded trajectory, at ``steps``, their unit outputs kept at ``location``.

    ``held_bytes`` (RAM or device memory) and ``disk_bytes`` count the unit outputs kept, each once; ``close()``
    frees them (and deletes the files). A ``with`` block closes it too.
    """

    def __init__(self, steps, location: str = "memory", directory=None):
        check_snapshot_settings(None, location, directory)
        self.steps = frozenset(steps)
        self.location = location
        self._snapshots: dict[int, TrajectorySnapshot] = {}
        self._kept: dict[tuple, object] = {}  # (context, unit, step computed) -> output, or its file (disk)
        self._folder = Path(tempfile.mkdtemp(prefix="dit-cache-snapshots-", dir=directory)) if location == "disk" \
            else None
        self.held_bytes = self.disk_bytes = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __len__(self) -> int:
        return len(self._snapshots)

    def add(self, step: int, latents: torch.Tensor, scheduler, cache: dict[str | None, CacheSnapshot]) -> None:
        """Keep the state at the start of ``step`` (the scheduler is copied, the rest kept as given); ``cache``:
        ``CacheHandle.snapshot()``, one cache snapshot per context."""
        fresh = {key: output for key, output in _outputs(cache) if key not in self._kept}
        if self.location == "disk":
            if fresh:
                self._write(step, fresh)
        else:
            self._kept.update((key, self._keep(output)) for key, output in fresh.items())
        kept = {context: snapshot.with_outputs([[(computed, self._kept[(context, unit, computed)])
                                                 for computed, _ in history]
                                                for unit, history in enumerate(snapshot.outputs)])
                for context, snapshot in cache.items()}
        self._snapshots[step] = TrajectorySnapshot(step, latents, copy.deepcopy(scheduler), kept)

    def latest(self, step: int, device=None) -> TrajectorySnapshot | None:
        """The snapshot at the latest step at or before ``step`` (None: none; restart from the noise), its unit
        outputs on ``device`` (default: where they were computed), the scheduler a fresh copy."""
        found = [s for s in self._snapshots if s <= step]
        if not found:
            return None
        snapshot = self._snapshots[max(found)]
        cache = snapshot.cache
        if self.location != "memory":
            cache = {context: kept.with_outputs([[(computed, self._load(output, device)) for computed, output in history]
                                                 for history in kept.outputs])
                     for context, kept in cache.items()}
        return TrajectorySnapshot(snapshot.step, snapshot.latents, copy.deepcopy(snapshot.scheduler), cache)

    def truncate(self, last: int) -> None:
        """Keep only the snapshots at steps up to ``last`` (and the outputs they hold): what a plan that departs
        from this trajectory at step ``last`` shares with it, so recording that plan can start there."""
        self._snapshots = {step: kept for step, kept in self._snapshots.items() if step <= last}
        referenced = {key for kept in self._snapshots.values() for key, _ in _outputs(kept.cache)}
        dropped = [key for key in self._kept if key not in referenced]
        if self._folder is not None:
            # An output is written with the first snapshot that holds it, so the kept ones are in kept files.
            for path in {self._kept[key].path for key in dropped}:
                self.disk_bytes -= path.stat().st_size
                path.unlink()
        else:
            self.held_bytes -= sum(_nbytes(self._kept[key]) for key in dropped)
        for key in dropped:
            del self._kept[key]

    def close(self) -> None:
        self._snapshots.clear()
        self._kept.clear()
        self.held_bytes = 0
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    # ---- where the outputs live ------------------------------------------------------------------------------
    def _keep(self, output):
        if self.location == "cpu":
            output = _map(output, lambda t: t.to("cpu", copy=True))
        self.held_bytes += _nbytes(output)
        return output

    def _write(self, step: int, fresh: dict) -> None:
        path = self._folder / f"step_{step:04d}.safetensors"
        tensors = {}
        for (context, unit, computed), output in fresh.items():
            name = f"{'' if context is None else context}/{unit}.{computed}"
            for index, tensor in enumerate(_leaves(output)):
                tensors[f"{name}.{index}"] = tensor.detach().contiguous()
            self._kept[(context, unit, computed)] = _OnDisk(path, name, _structure(output))
        save_file(tensors, str(path))
        self.disk_bytes += path.stat().st_size

    def _load(self, kept, device):
        if not isinstance(kept, _OnDisk):
            return kept if device is None else _map(kept, lambda t: t.to(device))
        with safe_open(str(kept.path), framework="pt", device="cpu" if device is None else str(device)) as file:
            leaves = [file.get_tensor(f"{kept.name}.{index}") for index in range(kept.structure.count)]
        return kept.structure.rebuild(leaves)


@dataclass(frozen=True)
class _Structure:
    """Where the tensors of a unit output go: a tensor, or a tuple of tensors and Nones (joint attention)."""

    kind: type | None  # None: a plain tensor
    present: tuple[bool, ...] = ()

    @property
    def count(self) -> int:
        return 1 if self.kind is None else sum(self.present)

    def rebuild(self, leaves: list):
        if self.kind is None:
            return leaves[0]
        leaves = iter(leaves)
        return self.kind(next(leaves) if present else None for present in self.present)


@dataclass(frozen=True)
class _OnDisk:
    path: Path
    name: str
    structure: _Structure


def _outputs(cache: dict[str | None, CacheSnapshot]):
    """``((context, unit, step computed), output)`` of every output the cache snapshots hold."""
    for context, snapshot in cache.items():
        for unit, history in enumerate(snapshot.outputs):
            for computed, output in history:
                yield (context, unit, computed), output


def _structure(output) -> _Structure:
    if torch.is_tensor(output):
        return _Structure(None)
    return _Structure(type(output), tuple(o is not None for o in output))


def _leaves(output) -> list[torch.Tensor]:
    return [output] if torch.is_tensor(output) else [o for o in output if o is not None]


def _map(output, fn):
    if torch.is_tensor(output):
        return fn(output)
    return type(output)(None if o is None else fn(o) for o in output)


def _nbytes(output) -> int:
    return sum(t.numel() * t.element_size() for t in _leaves(output))
