"""Exact reuse of the timestep embedding across generations.

A scheduler set to the same number of steps hands the transformer the same timesteps in every call, and a
timestep embedder (PixArt's and Sana's adaLN-single: sinusoidal features, an MLP, the projection to every block's
modulation) computes from them and from conditions that stay fixed (the micro-conditions, the batch size, the
dtype) alone. A :class:`TimestepMemoHook` on such a module (the family record names it:
``ModelFamily.timestep_embedder``) keeps its outputs by the *values* of its inputs, and returns them when a later
step, in this generation or another, hands it the same values, and its weights are the same tensors, not written
since (their version counters), and the kept outputs were not written either. Anything else computes, so a
module named wrongly costs a comparison, never exactness: the cached model stays bitwise the model that computes
every embedding.

Only small CPU inputs are keyed (a timestep per image, a few micro-conditions): reading a GPU tensor's values
would be a host sync per step, for an embedding that costs a few kernel launches there.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from diffusers.hooks import ModelHook

from .actions import BYPASSED
from .families import family_of
from .hooks import _EAGER
from .units import _unwrap, modules_matching

TIMESTEP_MEMO_HOOK = "dit_cache.timestep_memo"
MAX_KEYED_ELEMENTS = 64  # a tensor input larger than this is not keyed by value (the module computes)
MAX_ENTRIES = 256  # outputs kept per module, least recently used dropped first (a few schedules' worth)


class _NotKeyable(Exception):
    pass


def value_key(value):
    """A hashable key equal for equal values: tensors by dtype, shape and elements (small CPU tensors only),
    containers by their items. Raises ``_NotKeyable`` for anything else."""
    if value is None or isinstance(value, (bool, int, float, str, torch.dtype)):
        return value
    if torch.is_tensor(value):
        if value.device.type != "cpu" or value.numel() > MAX_KEYED_ELEMENTS or value.requires_grad:
            raise _NotKeyable
        return ("tensor", value.dtype, tuple(value.shape), tuple(value.flatten().tolist()))
    if isinstance(value, (tuple, list)):
        return (type(value).__name__, *(value_key(item) for item in value))
    if isinstance(value, dict):
        return ("dict", *sorted((str(name), value_key(item)) for name, item in value.items()))
    raise _NotKeyable


def _tensors(output) -> list[torch.Tensor] | None:
    """The output's tensors (a tensor, or a tuple / list of tensors), or None for another kind of output."""
    items = output if isinstance(output, (tuple, list)) else (output,)
    return list(items) if all(torch.is_tensor(item) for item in items) else None


class TimestepMemoHook(ModelHook):
    """On a timestep embedder: its outputs kept by the values of its inputs, across generations."""

    def __init__(self, handle):
        super().__init__()
        self.handle = handle
        self.kept: OrderedDict = OrderedDict()  # key -> (output, its tensors' versions)

    def reset_state(self, module: torch.nn.Module) -> torch.nn.Module:
        return module  # what it keeps outlives generations: that is its point

    @_EAGER
    def new_forward(self, module: torch.nn.Module, *args, **kwargs):
        forward = self.fn_ref.original_forward
        state = self.handle.active_state()
        if state is None or state.mode == BYPASSED or torch.is_grad_enabled():
            return forward(*args, **kwargs)
        try:
            key = (value_key(args), value_key(kwargs),
                   tuple((p.data_ptr(), p._version) for p in module.parameters()))
        except _NotKeyable:
            return forward(*args, **kwargs)
        kept = self.kept.get(key)
        if kept is not None:
            output, versions = kept
            if [tensor._version for tensor in _tensors(output)] == versions:
                self.kept.move_to_end(key)
                return output
        output = forward(*args, **kwargs)
        tensors = _tensors(output)
        if tensors is not None and not any(t.is_inference() or t.requires_grad for t in tensors):
            self.kept[key] = (output, [tensor._version for tensor in tensors])
            if len(self.kept) > MAX_ENTRIES:
                self.kept.popitem(last=False)
        return output


def install_timestep_memo(handle) -> None:
    """Hook the modules the transformer's family record names (``ModelFamily.timestep_embedder``)."""
    root = _unwrap(handle.transformer)
    for module in modules_matching(root, family_of(handle.transformer).timestep_embedder):
        handle._register(module, TimestepMemoHook(handle), TIMESTEP_MEMO_HOOK)
