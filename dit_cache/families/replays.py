"""Block replays: a block's output from its input and its branches' outputs, when none of its branches runs.

On a step where every unit of a block reuses or forecasts its cached output, whatever feeds the units (the norms,
the adaLN modulation of their inputs) is dead work, yet the block's forward still does it: about half of a skipped
step on the embedded model (11-13 ms with the forward, 6-9 ms replayed; experiments/block_replay_speed.py). A replay runs only the block's residual path (the gates and the adds), with
the block's own operations in the block's own order, so a replayed block is bitwise the block run with every unit
hooked (``tests/test_block_replay.py`` checks each family that has one).

A replay is ``replay(block, outputs, args, kwargs)``: ``outputs`` are the block's units' outputs in branch order
(the units present in this block), ``args``/``kwargs`` the block's call. It returns ``NotImplemented`` for a call
it cannot reproduce (the hook then runs the block's forward, its units hooked as usual).
"""

from __future__ import annotations

import torch


def _argument(args, kwargs, name: str, position: int):
    if name in kwargs:
        return kwargs[name]
    return args[position] if len(args) > position else None


def _squeezed(hidden_states):
    return hidden_states.squeeze(1) if hidden_states.ndim == 4 else hidden_states


def _table_gates(block, timestep, batch: int):
    """The attention and MLP gates of a PixArt-style block (its learned table plus the shared timestep
    embedding), as the block computes them."""
    modulation = (block.scale_shift_table[None] + timestep.reshape(batch, 6, -1)).chunk(6, dim=1)
    return modulation[2], modulation[5]


def _zero_modulation(norm, emb, chunks: int, **embedding_inputs):
    """The modulation chunks of an ``AdaLayerNormZero``-style norm (``linear(silu(emb))``), without normalising
    the hidden states; ``embedding_inputs`` feed the norm's own embedding where it has one (DiT)."""
    if getattr(norm, "emb", None) is not None:
        emb = norm.emb(**embedding_inputs)
    return norm.linear(norm.silu(emb)).chunk(chunks, dim=1)


def _clipped(hidden_states):
    return hidden_states.clip(-65504, 65504) if hidden_states.dtype == torch.float16 else hidden_states


def basic_transformer_block(block, outputs, args, kwargs):
    """diffusers' ``BasicTransformerBlock`` (PixArt: ``ada_norm_single``; DiT: ``ada_norm_zero``): the residual
    path of its forward, after the branch calls."""
    cross_attention_kwargs = _argument(args, kwargs, "cross_attention_kwargs", 5)
    if cross_attention_kwargs and "gligen" in cross_attention_kwargs:
        return NotImplemented  # GLIGEN's fuser reads the hidden states between the branches
    hidden_states = _argument(args, kwargs, "hidden_states", 0)
    timestep = _argument(args, kwargs, "timestep", 4)
    if block.norm_type == "ada_norm_single":
        gate_msa, gate_mlp = _table_gates(block, timestep, hidden_states.shape[0])
    elif block.norm_type == "ada_norm_zero":
        modulation = _zero_modulation(block.norm1, None, 6, timestep=timestep, hidden_dtype=hidden_states.dtype,
                                      class_labels=_argument(args, kwargs, "class_labels", 6))
        gate_msa, gate_mlp = modulation[2].unsqueeze(1), modulation[5].unsqueeze(1)
    elif block.norm_type in ("ada_norm", "layer_norm", "layer_norm_i2vgen", "ada_norm_continuous"):
        gate_msa = gate_mlp = None  # their branches are added ungated
    else:
        return NotImplemented
    return _gated_residual(block, outputs, hidden_states, gate_msa, gate_mlp)


def _gated_residual(block, outputs, hidden_states, gate_msa, gate_mlp):
    """The residual path of a self-attention / optional cross-attention / MLP block in diffusers' PixArt order
    (``gate * output + hidden_states``, squeezing a 4-D result as the blocks do)."""
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


def allegro_block(block, outputs, args, kwargs):
    """diffusers' ``AllegroTransformerBlock``: PixArt's gating and residual order."""
    hidden_states = _argument(args, kwargs, "hidden_states", 0)
    gate_msa, gate_mlp = _table_gates(block, _argument(args, kwargs, "temb", 2), hidden_states.shape[0])
    return _gated_residual(block, outputs, hidden_states, gate_msa, gate_mlp)


def sana_block(block, outputs, args, kwargs):
    """diffusers' ``SanaTransformerBlock``: PixArt's gating; its feed-forward works on the latent grid, so its
    output is flattened back to tokens, as the block does (``h + g * a`` there is bitwise ``g * a + h``)."""
    hidden_states = _argument(args, kwargs, "hidden_states", 0)
    gate_msa, gate_mlp = _table_gates(block, _argument(args, kwargs, "timestep", 4), hidden_states.shape[0])
    *branches, feed_forward = outputs
    return _gated_residual(block, [*branches, grid_to_tokens(feed_forward)], hidden_states, gate_msa, gate_mlp)


def grid_to_tokens(output):
    """A Sana feed-forward output ``[B, C, H, W]`` as the block adds it: tokens ``[B, H*W, C]``."""
    return output.flatten(2, 3).permute(0, 2, 1)


def joint_transformer_block(block, outputs, args, kwargs):
    """diffusers' ``JointTransformerBlock`` (SD3, SD3.5: dual attention, a context-pre-only last block)."""
    hidden_states = _argument(args, kwargs, "hidden_states", 0)
    encoder_hidden_states = _argument(args, kwargs, "encoder_hidden_states", 1)
    temb = _argument(args, kwargs, "temb", 2)
    modulation = _zero_modulation(block.norm1, temb, 9 if block.use_dual_attention else 6)
    outputs = iter(outputs)
    attention, context_attention = next(outputs)
    hidden_states = hidden_states + modulation[2].unsqueeze(1) * attention
    if block.use_dual_attention:
        hidden_states = hidden_states + modulation[8].unsqueeze(1) * next(outputs)
    hidden_states = hidden_states + modulation[5].unsqueeze(1) * next(outputs)
    if block.context_pre_only:
        return None, hidden_states
    context = _zero_modulation(block.norm1_context, temb, 6)
    encoder_hidden_states = encoder_hidden_states + context[2].unsqueeze(1) * context_attention
    encoder_hidden_states = encoder_hidden_states + context[5].unsqueeze(1) * next(outputs)
    return encoder_hidden_states, hidden_states


def flux_block(block, outputs, args, kwargs):
    """diffusers' ``FluxTransformerBlock`` (the double-stream blocks; IP-Adapter's third attention output too)."""
    temb = _argument(args, kwargs, "temb", 2)
    return _dual_stream(outputs, args, kwargs, _zero_modulation(block.norm1, temb, 6),
                        _zero_modulation(block.norm1_context, temb, 6))


def chroma_block(block, outputs, args, kwargs):
    """diffusers' ``ChromaTransformerBlock``: FLUX.1's block with its modulation precomputed outside it."""
    if block.norm1.emb is not None or block.norm1_context.emb is not None:
        return NotImplemented
    temb = _argument(args, kwargs, "temb", 2)
    return _dual_stream(outputs, args, kwargs, temb[:, :6].flatten(1, 2).chunk(6, dim=1),
                        temb[:, 6:].flatten(1, 2).chunk(6, dim=1))


def _dual_stream(outputs, args, kwargs, modulation, context):
    """The residual path of FLUX.1-style double-stream blocks, from their (shift, scale, gate) x 2 modulations."""
    hidden_states = _argument(args, kwargs, "hidden_states", 0)
    encoder_hidden_states = _argument(args, kwargs, "encoder_hidden_states", 1)
    attention, feed_forward, context_feed_forward = outputs
    hidden_states = hidden_states + modulation[2].unsqueeze(1) * attention[0]
    hidden_states = hidden_states + modulation[5].unsqueeze(1) * feed_forward
    if len(attention) == 3:
        hidden_states = hidden_states + attention[2]
    encoder_hidden_states = encoder_hidden_states + context[2].unsqueeze(1) * attention[1]
    encoder_hidden_states = encoder_hidden_states + context[5].unsqueeze(1) * context_feed_forward
    return _clipped(encoder_hidden_states), _clipped(hidden_states)


def flux_single_block(block, outputs, args, kwargs):
    """diffusers' ``FluxSingleTransformerBlock``: its output projection runs on the branches' concatenation, so a
    replay saves only the norm and modulation of its input."""
    mlp, attention = outputs
    return _joined_single_stream(block, args, kwargs, attention, block.act_mlp(mlp))


def ovis_image_single_block(block, outputs, args, kwargs):
    """diffusers' ``OvisImageSingleTransformerBlock``: FLUX.1's single block with a SwiGLU MLP (its ``proj_mlp``
    output is split into the value and the gate)."""
    mlp, attention = outputs
    value, mlp_gate = torch.split(mlp, [block.mlp_hidden_dim, block.mlp_hidden_dim], dim=-1)
    return _joined_single_stream(block, args, kwargs, attention, block.act_mlp(mlp_gate) * value)


def _joined_single_stream(block, args, kwargs, attention, mlp_hidden_states):
    """FLUX.1-style single blocks called with both streams: join them, add the gated projection, split again."""
    encoder_hidden_states = _argument(args, kwargs, "encoder_hidden_states", 1)
    text_tokens = encoder_hidden_states.shape[1]
    residual = torch.cat([encoder_hidden_states, _argument(args, kwargs, "hidden_states", 0)], dim=1)
    gate = _zero_modulation(block.norm, _argument(args, kwargs, "temb", 2), 3)[2]
    hidden_states = _projected_residual(block, residual, gate, attention, mlp_hidden_states)
    return hidden_states[:, :text_tokens], hidden_states[:, text_tokens:]


def chroma_single_block(block, outputs, args, kwargs):
    """diffusers' ``ChromaSingleTransformerBlock``: FLUX.1's single block on the joined tokens, modulation
    precomputed."""
    gate = _argument(args, kwargs, "temb", 1).flatten(1, 2).chunk(3, dim=1)[2]
    mlp, attention = outputs
    return _projected_residual(block, _argument(args, kwargs, "hidden_states", 0), gate, attention,
                               block.act_mlp(mlp))


def _projected_residual(block, residual, gate, attention, mlp_hidden_states):
    projected = block.proj_out(torch.cat([attention, mlp_hidden_states], dim=2))
    return _clipped(residual + gate.unsqueeze(1) * projected)


def lumina2_block(block, outputs, args, kwargs):
    """diffusers' ``Lumina2TransformerBlock``: its branches' outputs are normalised before the tanh-gated adds, so a
    replay runs those two output norms and saves the input norms and modulation (the context refiner's blocks are
    unmodulated)."""
    hidden_states = _argument(args, kwargs, "hidden_states", 0)
    attention, feed_forward = outputs
    if not block.modulation:
        return _post_normed_residual(block.norm2, block.ffn_norm2, hidden_states, attention, feed_forward)
    _, gate_msa, _, gate_mlp = _zero_modulation(block.norm1, _argument(args, kwargs, "temb", 3), 4)
    return _post_normed_residual(block.norm2, block.ffn_norm2, hidden_states, attention, feed_forward,
                                 gate_msa.unsqueeze(1).tanh(), gate_mlp.unsqueeze(1).tanh())


def z_image_block(block, outputs, args, kwargs):
    """diffusers' ``ZImageTransformerBlock``: Lumina2's residual path, its modulation from ``adaLN_modulation``
    (the context refiner's blocks are unmodulated). The per-token modulation of a ``noise_mask`` call is not
    replayed."""
    hidden_states = _argument(args, kwargs, "x", 0)
    attention, feed_forward = outputs
    if not block.modulation:
        return _post_normed_residual(block.attention_norm2, block.ffn_norm2, hidden_states, attention, feed_forward)
    if _argument(args, kwargs, "noise_mask", 4) is not None:
        return NotImplemented
    modulation = block.adaLN_modulation(_argument(args, kwargs, "adaln_input", 3))
    _, gate_msa, _, gate_mlp = modulation.unsqueeze(1).chunk(4, dim=2)
    return _post_normed_residual(block.attention_norm2, block.ffn_norm2, hidden_states, attention, feed_forward,
                                 gate_msa.tanh(), gate_mlp.tanh())


def _post_normed_residual(attention_norm, feed_forward_norm, hidden_states, attention, feed_forward,
                          gate_msa=None, gate_mlp=None):
    """``x + gate * norm(output)`` for the attention, then the feed-forward (ungated without gates)."""
    attention, feed_forward = attention_norm(attention), feed_forward_norm(feed_forward)
    if gate_msa is not None:
        attention, feed_forward = gate_msa * attention, gate_mlp * feed_forward
    return hidden_states + attention + feed_forward


def hunyuan_block(block, outputs, args, kwargs):
    """The double-stream blocks of diffusers' HunyuanVideo, HunyuanVideo 1.5 and HunyuanImage 2.1 (one forward):
    FLUX.1's residual path with the streams returned (image, text) and no float16 clipping."""
    hidden_states = _argument(args, kwargs, "hidden_states", 0)
    encoder_hidden_states = _argument(args, kwargs, "encoder_hidden_states", 1)
    temb = _argument(args, kwargs, "temb", 2)
    modulation, context = _zero_modulation(block.norm1, temb, 6), _zero_modulation(block.norm1_context, temb, 6)
    (attention, context_attention), feed_forward, context_feed_forward = outputs
    hidden_states = hidden_states + attention * modulation[2].unsqueeze(1)
    encoder_hidden_states = encoder_hidden_states + context_attention * context[2].unsqueeze(1)
    hidden_states = hidden_states + modulation[5].unsqueeze(1) * feed_forward
    encoder_hidden_states = encoder_hidden_states + context[5].unsqueeze(1) * context_feed_forward
    return hidden_states, encoder_hidden_states


def hunyuan_single_block(block, outputs, args, kwargs):
    """The single-stream blocks of HunyuanVideo and HunyuanImage 2.1: the tokens joined (image, text), their
    output projection on the branches' concatenation, so a replay saves the norm and modulation of the input."""
    hidden_states = _argument(args, kwargs, "hidden_states", 0)
    encoder_hidden_states = _argument(args, kwargs, "encoder_hidden_states", 1)
    text_tokens = encoder_hidden_states.shape[1]
    residual = torch.cat([hidden_states, encoder_hidden_states], dim=1)
    gate = _zero_modulation(block.norm, _argument(args, kwargs, "temb", 2), 3)[2]
    mlp, (attention, context_attention) = outputs
    joined = torch.cat([torch.cat([attention, context_attention], dim=1), block.act_mlp(mlp)], dim=2)
    hidden_states = gate.unsqueeze(1) * block.proj_out(joined) + residual
    return hidden_states[:, :-text_tokens], hidden_states[:, -text_tokens:]


def wan_block(block, outputs, args, kwargs):
    """diffusers' ``WanTransformerBlock`` (Wan 2.1 / 2.2; a per-token timestep embedding for the TI2V-5B): its
    gated adds run in float32, as the block runs them."""
    hidden_states = _argument(args, kwargs, "hidden_states", 0)
    temb = _argument(args, kwargs, "temb", 2)
    if temb.ndim == 4:  # [batch, tokens, 6, dim]
        modulation = (block.scale_shift_table.unsqueeze(0) + temb.float()).chunk(6, dim=2)
        gate_msa, c_gate_msa = modulation[2].squeeze(2), modulation[5].squeeze(2)
    else:
        modulation = (block.scale_shift_table + temb.float()).chunk(6, dim=1)
        gate_msa, c_gate_msa = modulation[2], modulation[5]
    attention, cross_attention, feed_forward = outputs
    hidden_states = (hidden_states.float() + attention * gate_msa).type_as(hidden_states)
    hidden_states = hidden_states + cross_attention
    return (hidden_states.float() + feed_forward.float() * c_gate_msa).type_as(hidden_states)


def qwen_image_block(block, outputs, args, kwargs):
    """diffusers' ``QwenImageTransformerBlock`` (not with a ``modulate_index``, Qwen-Image-Edit's per-token
    choice of modulation)."""
    if _argument(args, kwargs, "modulate_index", 6) is not None:
        return NotImplemented
    hidden_states = _argument(args, kwargs, "hidden_states", 0)
    encoder_hidden_states = _argument(args, kwargs, "encoder_hidden_states", 1)
    temb = _argument(args, kwargs, "temb", 3)
    image_attention, image_mlp = block.img_mod(temb).chunk(2, dim=-1)
    text_attention, text_mlp = block.txt_mod(temb.chunk(2, dim=0)[0] if block.zero_cond_t else temb).chunk(2, dim=-1)
    (attention, text_attention_output), mlp, text_mlp_output = outputs
    hidden_states = hidden_states + _third(image_attention) * attention
    encoder_hidden_states = encoder_hidden_states + _third(text_attention) * text_attention_output
    hidden_states = hidden_states + _third(image_mlp) * mlp
    encoder_hidden_states = encoder_hidden_states + _third(text_mlp) * text_mlp_output
    return _clipped(encoder_hidden_states), _clipped(hidden_states)


def _third(modulation):
    """The gate of a Qwen-Image (shift, scale, gate) modulation, over the tokens."""
    return modulation.chunk(3, dim=-1)[2].unsqueeze(1)


def ltx_video_block(block, outputs, args, kwargs):
    """diffusers' ``LTXVideoTransformerBlock``: per-token gates from its table and the timestep embedding."""
    hidden_states = _argument(args, kwargs, "hidden_states", 0)
    temb = _argument(args, kwargs, "temb", 2)
    table = block.scale_shift_table
    modulation = (table[None, None].to(temb.device) + temb.reshape(hidden_states.size(0), temb.size(1),
                                                                   table.shape[0], -1)).unbind(dim=2)
    attention, cross_attention, feed_forward = outputs
    hidden_states = hidden_states + attention * modulation[2]
    hidden_states = hidden_states + cross_attention
    return hidden_states + feed_forward * modulation[5]


def cogvideox_block(block, outputs, args, kwargs):
    """diffusers' ``CogVideoXBlock``: one feed-forward over the text and video tokens together, split back."""
    hidden_states = _argument(args, kwargs, "hidden_states", 0)
    encoder_hidden_states = _argument(args, kwargs, "encoder_hidden_states", 1)
    temb = _argument(args, kwargs, "temb", 2)
    text_tokens = encoder_hidden_states.size(1)
    (attention, text_attention), feed_forward = outputs
    first = _zero_modulation(block.norm1, temb, 6)
    hidden_states = hidden_states + first[2][:, None, :] * attention
    encoder_hidden_states = encoder_hidden_states + first[5][:, None, :] * text_attention
    second = _zero_modulation(block.norm2, temb, 6)
    hidden_states = hidden_states + second[2][:, None, :] * feed_forward[:, text_tokens:]
    encoder_hidden_states = encoder_hidden_states + second[5][:, None, :] * feed_forward[:, :text_tokens]
    return hidden_states, encoder_hidden_states


def flux2_block(block, outputs, args, kwargs):
    """diffusers' ``Flux2TransformerBlock``: its modulation comes precomputed, one per stream."""
    from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

    hidden_states = _argument(args, kwargs, "hidden_states", 0)
    encoder_hidden_states = _argument(args, kwargs, "encoder_hidden_states", 1)
    (_, _, gate_msa), (_, _, gate_mlp) = Flux2Modulation.split(_argument(args, kwargs, "temb_mod_img", 2), 2)
    (_, _, c_gate_msa), (_, _, c_gate_mlp) = Flux2Modulation.split(_argument(args, kwargs, "temb_mod_txt", 3), 2)
    (attention, text_attention), feed_forward, text_feed_forward = outputs
    hidden_states = hidden_states + gate_msa * attention
    hidden_states = hidden_states + gate_mlp * feed_forward
    encoder_hidden_states = encoder_hidden_states + c_gate_msa * text_attention
    encoder_hidden_states = encoder_hidden_states + c_gate_mlp * text_feed_forward
    return _clipped(encoder_hidden_states), hidden_states


def flux2_single_block(block, outputs, args, kwargs):
    """diffusers' ``Flux2SingleTransformerBlock``: one fused attention-and-MLP unit over text and image tokens."""
    from diffusers.models.transformers.transformer_flux2 import Flux2Modulation

    hidden_states = _argument(args, kwargs, "hidden_states", 0)
    encoder_hidden_states = _argument(args, kwargs, "encoder_hidden_states", 1)
    text_tokens = _argument(args, kwargs, "text_seq_len", 6)
    if encoder_hidden_states is not None:
        text_tokens = encoder_hidden_states.shape[1]
        hidden_states = torch.cat([encoder_hidden_states, hidden_states], dim=1)
    _, _, gate = Flux2Modulation.split(_argument(args, kwargs, "temb_mod", 2), 1)[0]
    hidden_states = _clipped(hidden_states + gate * outputs[0])
    if _argument(args, kwargs, "split_hidden_states", 5):
        return hidden_states[:, :text_tokens], hidden_states[:, text_tokens:]
    return hidden_states


class TableGatedFold:
    """The step fold (:mod:`dit_cache.fold`) of PixArt's blocks (``ada_norm_single``): a block's gates are its
    table plus the timestep embedding every block is handed, so the stack adds ``sum_b (T_b,attn * a_b + c_b +
    T_b,mlp * f_b) + e_attn * sum_b a_b + e_mlp * sum_b f_b``."""

    @staticmethod
    def applies(blocks) -> bool:
        return all(getattr(block, "norm_type", None) == "ada_norm_single" for block in blocks)

    @staticmethod
    def feed_forward_tokens(output):
        return output

    def sums(self, blocks, outputs):
        # In place, into fresh tensors (never into a stored output): five passes per block instead of seven, and no
        # allocation per block, on the first folded step after every computed one.
        constant = attention = feed_forward = None
        for block, block_outputs in zip(blocks, outputs):
            table = block.scale_shift_table
            units = iter(block_outputs)
            self_attention = next(units)
            cross_attention = next(units) if block.attn2 is not None else None
            mlp = self.feed_forward_tokens(next(units))
            if constant is None:
                constant = torch.mul(self_attention, table[2])
                attention, feed_forward = self_attention.clone(), mlp.clone()
            else:
                constant.addcmul_(self_attention, table[2])
                attention.add_(self_attention)
                feed_forward.add_(mlp)
            if cross_attention is not None:
                constant.add_(cross_attention)
            constant.addcmul_(mlp, table[5])
        return constant, attention, feed_forward

    def output(self, block, sums, args, kwargs):
        if self.declines(args, kwargs):
            return NotImplemented
        hidden_states = _argument(args, kwargs, "hidden_states", 0)
        embedding = _argument(args, kwargs, "timestep", 4).reshape(hidden_states.shape[0], 6, -1)
        constant, attention, feed_forward = sums
        return (hidden_states + constant).addcmul_(embedding[:, 2:3], attention).addcmul_(embedding[:, 5:6],
                                                                                          feed_forward)

    @staticmethod
    def declines(args, kwargs) -> bool:
        cross_attention_kwargs = _argument(args, kwargs, "cross_attention_kwargs", 5)
        return bool(cross_attention_kwargs) and "gligen" in cross_attention_kwargs

    @staticmethod
    def passthrough(args, kwargs):
        return _argument(args, kwargs, "hidden_states", 0)


class SanaFold(TableGatedFold):
    """Sana's blocks gate as PixArt's do; their feed-forward works on the latent grid (flattened back here)."""

    @staticmethod
    def applies(blocks) -> bool:
        return all(type(block).__name__ == "SanaTransformerBlock" for block in blocks)

    feed_forward_tokens = staticmethod(grid_to_tokens)

    @staticmethod
    def declines(args, kwargs) -> bool:
        return False
