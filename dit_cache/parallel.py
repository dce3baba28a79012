"""The cache under diffusers' context parallelism (``enable_parallelism(config=ContextParallelConfig(...))``).

Why the engine needs almost nothing for it: diffusers splits the sequence at the transformer's (or its first
block's) input and gathers it at ``proj_out``, so every unit in between runs on the rank's own shard of the tokens
and its output is that shard. The cache stores what the unit returned, so each rank caches its own shard, and
REUSE, FORECAST, LINEAR and CFG_SHARE are elementwise along the sequence (CFG_SHARE splits the batch, which is not
sharded): a rank's cached result is the single-process result's shard. The timestep the step hook reads is the
unsplit one (plain torch pre-hooks run before diffusers' split hook, whatever the order they were installed in).

What can go wrong is the ranks disagreeing. A unit that REUSEs skips its attention and with it the attention's
all-to-all (Ulysses) or all-gather (ring); if one rank computes a unit that another skips, the ranks' collectives
pair up wrongly: a hang, or, where the shapes happen to match, silently mixed tokens. So before every cached step
the ranks compare a digest of what they are about to do (plan, step, mode, CFG half), one 8-byte all-gather per
step (next to a step's dozens of attention collectives), and stop with an error naming the fix if they differ.
What cannot be made right is refused there too: router training (GATED mode: each rank would get the gradient of
its own shard only), tensor parallelism (not verified), and a ``cp_plan`` that splits or gathers at a unit itself
(the unit's output would not be the rank's shard).
"""

from __future__ import annotations

import hashlib
import weakref

import torch

from .actions import BYPASSED, GATED
from .units import _unwrap

# diffusers' hook names (diffusers/hooks/context_parallel.py): a unit carrying one is split or gathered itself.
_CP_HOOK_PREFIXES = ("cp_input---", "cp_output---")

_DIGESTS: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()  # CompiledPlan -> digest of its rows


def parallel_config(transformer: torch.nn.Module):
    """diffusers' ``ParallelConfig`` recorded on ``transformer`` by ``enable_parallelism``, or None."""
    return getattr(_unwrap(transformer), "_parallel_config", None)


def context_parallel_group(transformer: torch.nn.Module):
    """The process group the transformer's context parallelism shards over, or None without it."""
    config = parallel_config(transformer)
    cp = getattr(config, "context_parallel_config", None)
    if cp is None or getattr(cp, "_flattened_mesh", None) is None:
        return None
    return cp._flattened_mesh.get_group()


def check_step(transformer: torch.nn.Module, handle, state) -> None:
    """Before a cached step: refuse what cannot be right under parallelism, and check that every rank of the
    context-parallel group is about to do the same. Does nothing on an unparallelised transformer."""
    config = parallel_config(transformer)
    if config is None:
        return
    if getattr(config, "tensor_parallel_config", None) is not None:
        raise NotImplementedError(
            "dit-cache has not been verified under diffusers' tensor parallelism (TensorParallelConfig). Use "
            "context parallelism (ContextParallelConfig) to shard a generation across devices, or remove the cache.")
    group = context_parallel_group(transformer)
    if group is None:
        return
    if state.mode == GATED:
        raise RuntimeError(
            "Router training (gated mode) does not work under context parallelism: each rank would get the gradient "
            "of its own token shard only, and the ranks' routers would drift apart. Train the router on the "
            "unsharded model (data parallel: --trainer.strategy ddp); the router file then serves context-parallel "
            "inference unchanged.")
    _refuse_sharding_at_units(transformer, handle)
    digests = _all_gather_int(_digest(state), group)
    if len(set(digests)) > 1:
        raise RuntimeError(
            "The ranks of the context-parallel group follow different cache plans (plan digests "
            f"{digests}); their attention collectives would pair up wrongly. Give every rank the same plan or router "
            "file, budget (flops=), guidance and step count, and bypass the cache (handle.bypassed(), cache=False) "
            "on all ranks or none.")


def all_reduce_sum(transformer: torch.nn.Module, *tensors: torch.Tensor) -> None:
    """Sum ``tensors`` in place over the context-parallel group (sums over tokens: each rank holds a shard)."""
    group = context_parallel_group(transformer)
    if group is None:
        return
    import torch.distributed as dist

    device = _collective_device(group)
    for tensor in tensors:
        on_device = tensor.to(device)
        dist.all_reduce(on_device, op=dist.ReduceOp.SUM, group=group)
        tensor.copy_(on_device)


def _collective_device(group) -> torch.device:
    """Where a collective's tensors must live: the CPU for gloo, the accelerator for NCCL and the like."""
    import torch.distributed as dist

    backend = str(dist.get_backend(group))
    if "cpu" in backend or backend == "gloo" or torch.accelerator.current_accelerator() is None:
        return torch.device("cpu")
    return torch.accelerator.current_accelerator()


def _all_gather_int(value: int, group) -> list[int]:
    import torch.distributed as dist

    mine = torch.tensor([value], dtype=torch.int64, device=_collective_device(group))
    gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size(group))]
    dist.all_gather(gathered, mine, group=group)
    return [int(tensor.item()) for tensor in gathered]


def _refuse_sharding_at_units(transformer: torch.nn.Module, handle) -> None:
    root = _unwrap(transformer)
    for unit in handle.units:
        registry = getattr(root.get_submodule(unit.path), "_diffusers_hook", None)
        names = [] if registry is None else list(registry.hooks)
        if any(name.startswith(_CP_HOOK_PREFIXES) for name in names):
            raise NotImplementedError(
                f"The context-parallel plan splits or gathers at the cache unit {unit.path} itself, so that unit's "
                "output is not the rank's shard and the cache cannot be checked right. Shard at the blocks' inputs "
                "and gather at proj_out (the transformer's own _cp_plan does), or remove the cache.")


def _digest(state) -> int:
    """A 63-bit digest of everything that decides the ranks' actions at this step."""
    compiled = state.compiled
    rows = _DIGESTS.get(compiled)
    if rows is None:
        hasher = hashlib.blake2b(digest_size=8)
        hasher.update(repr((compiled.rows, compiled.linear, compiled.history)).encode())
        rows = hasher.digest()
        _DIGESTS[compiled] = rows
    step = None if state.mode == BYPASSED else state.step  # bypassed, every rank computes everything
    hasher = hashlib.blake2b(rows + repr((state.mode, state.computed_half, step)).encode(), digest_size=8)
    return int.from_bytes(hasher.digest(), "little") >> 1  # fits an int64
