"""Block replays: a block's output from its input and its branches' outputs, when none of its branches runs.

On a step where every unit of a block reuses or forecasts its cached output, whatever feeds the units (the norms,
the adaLN modulation of their inputs) is dead work, yet the block's forward still does it: about 9 ms of a 10 ms
skipped step on the embedded model. A replay runs only the block's residual path (the gates and the adds), with
the block's own operations in the block's own order, so a replayed block is bitwise the block run with every unit
hooked (``tests/test_block_replay.py`` checks each family that has one).

A replay is ``replay(block, outputs, args, kwargs)``: ``outputs`` are the block's units' outputs in branch order
(the units present in this block), ``args``/``kwargs`` the block's call. It returns ``NotImplemented`` for a call
it cannot reproduce (the hook then runs the block's forward, its units hooked as usual).
"""

from __future__ import annotations


def _argument(args, kwargs, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def _squeezed(hidden_states):
    return hidden_states.squeeze(1) if hidden_states.ndim == 4 else hidden_states


def basic_transformer_block(block, outputs, args, kwargs):
    """diffusers' ``BasicTransformerBlock`` (PixArt: ``ada_norm_single``; DiT: ``ada_norm_zero``): the residual
    path of its forward, after the branch calls."""
    cross_attention_kwargs = _argument(args, kwargs, "cross_attention_kwargs", 5)
    if cross_attention_kwargs and "gligen" in cross_attention_kwargs:
        return NotImplemented  # GLIGEN's fuser reads the hidden states between the branches
    hidden_states = _argument(args, kwargs, "hidden_states", 0)
    timestep = _argument(args, kwargs, "timestep", 4)
    if block.norm_type == "ada_norm_single":
        _, _, gate_msa, _, _, gate_mlp = (
            block.scale_shift_table[None] + timestep.reshape(hidden_states.shape[0], 6, -1)).chunk(6, dim=1)
    elif block.norm_type == "ada_norm_zero":
        norm = block.norm1  # AdaLayerNormZero: only its modulation, not the norm of the hidden states
        embedding = norm.emb(timestep, _argument(args, kwargs, "class_labels", 6), hidden_dtype=hidden_states.dtype)
        _, _, gate_msa, _, _, gate_mlp = norm.linear(norm.silu(embedding)).chunk(6, dim=1)
        gate_msa, gate_mlp = gate_msa.unsqueeze(1), gate_mlp.unsqueeze(1)
    elif block.norm_type in ("ada_norm", "layer_norm", "layer_norm_i2vgen", "ada_norm_continuous"):
        gate_msa = gate_mlp = None  # their branches are added ungated
    else:
        return NotImplemented
    outputs = iter(outputs)
    attention = next(outputs)
    if gate_msa is not None:
        attention = gate_msa * attention
    hidden_states = _squeezed(attention + hidden_states)
    if block.attn2 is not None:
        hidden_states = next(outputs) + hidden_states
    feed_forward = next(outputs)
    if gate_mlp is not None:
        feed_forward = gate_mlp * feed_forward
    return _squeezed(feed_forward + hidden_states)
