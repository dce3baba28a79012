"""Multi-Concept T2I-Zero for PixArt-style DiTs that cross-attend to T5 tokens.

* :func:`correct_by_similarities` - Correction by Similarities (CbS) on the text-encoder output.
* :func:`concept_token_groups` - concept words or phrases -> token positions.
* :class:`CrossTokenNMSProcessor` / :func:`apply_cross_token_nms` - Cross-Token NMS inside ``attn2``.
"""

from __future__ import annotations

import re
from typing import Sequence

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from .kernels import cross_token_nms
from .kernels.cross_token_nms import Concepts, check_fraction, concept_groups

__all__ = [
    "correct_by_similarities",
    "concept_token_groups",
    "CrossTokenNMSProcessor",
    "cross_attention_probs",
    "apply_cross_token_nms",
    "remove_cross_token_nms",
]


# --------------------------------------------------------------------------- CbS
def _per_row_indices(concept_indices, batch: int) -> list[list[int]]:
    if len(concept_indices) and all(isinstance(c, (list, tuple)) for c in concept_indices):
        if len(concept_indices) != batch:
            raise ValueError(f"concept_indices has {len(concept_indices)} lists but the batch has {batch} rows; "
                             "pass one list per batch row, or a flat list of ints shared by all rows")
        return [[int(c) for c in row] for row in concept_indices]
    if any(isinstance(c, (list, tuple)) for c in concept_indices):
        raise ValueError("concept_indices mixes ints and lists; pass a flat list of ints or one list per row")
    return [[int(c) for c in concept_indices] for _ in range(batch)]


def correct_by_similarities(prompt_embeds: torch.Tensor, attention_mask: torch.Tensor,
                            concept_indices: Sequence[int] | Sequence[Sequence[int]],
                            tau: float = 0.5, gamma: int = 2, alpha: float = 0.25) -> torch.Tensor:
    """Correction by Similarities on text-encoder output ``prompt_embeds`` (batch, n, d).

    For a concept token ``c`` with embedding ``f_c`` and the content tokens ``i`` of its prompt
    (``attention_mask == 1``, minus the last attended token, which is the T5 ``</s>``):

    * ``S_ij = f_cj * f_ij`` and ``S_bar = S / max(S)`` where the max runs over **all entries of S
      for that concept** (every content token ``i``, every dimension ``j``);
    * ``S_tilde = S_bar`` where ``S_bar >= tau``, else 0, and only for rows ``|i - c| <= gamma``
      (the window **includes the concept row itself**);
    * ``f_tilde_c = sum_i S_tilde_i * f_i`` (element-wise), rescaled to the norm ``||f_c||``;
    * ``f'_c = (1 - alpha) f_c + alpha f_tilde_c``.

    Defaults ``tau=0.5, gamma=2, alpha=0.25``. Every concept is corrected from the *original*
    embeddings. A concept row is left unchanged when ``max(S) <= 0`` (i.e. ``f_c == 0``) or when
    nothing in its window survives the threshold. Non-concept rows are copied bitwise. Arithmetic
    runs in float32; corrected rows are cast back to the input dtype. Returns a new tensor.
    """
    if prompt_embeds.ndim != 3:
        raise ValueError(f"prompt_embeds must be (batch, n_tokens, dim), got {tuple(prompt_embeds.shape)}")
    batch, n, _ = prompt_embeds.shape
    if attention_mask is None or tuple(attention_mask.shape) != (batch, n):
        got = None if attention_mask is None else tuple(attention_mask.shape)
        raise ValueError(f"attention_mask must be (batch, n_tokens) = {(batch, n)}, got {got}; "
                         "pass the text encoder's attention mask")
    check_fraction("alpha", alpha)
    if gamma < 0:
        raise ValueError(f"gamma (window half-width) must be >= 0, got {gamma}")
    rows = _per_row_indices(concept_indices, batch)
    out = prompt_embeds.clone()
    for b, concepts in enumerate(rows):
        valid = attention_mask[b].bool().clone()
        if not valid.any():
            raise ValueError(f"attention_mask row {b} has no attended token")
        valid[valid.nonzero().max()] = False  # the final </s>
        f = prompt_embeds[b].float()
        for c in concepts:
            if not 0 <= c < n or not valid[c]:
                raise ValueError(f"concept index {c} of batch row {b} is out of range or points at padding/</s>; "
                                 f"valid content positions are {valid.nonzero().flatten().tolist()}")
            sim = f[c] * f[valid]  # (n_valid, d)
            top = sim.max()
            if top <= 0:
                continue
            sim_bar = sim / top
            pos = valid.nonzero().flatten()
            keep = (sim_bar >= tau) & ((pos - c).abs() <= gamma)[:, None]
            f_tilde = (torch.where(keep, sim_bar, torch.zeros_like(sim_bar)) * f[valid]).sum(dim=0)
            norm = f_tilde.norm()
            if norm == 0:
                continue
            f_tilde = f_tilde * (f[c].norm() / norm)
            out[b, c] = ((1 - alpha) * f[c] + alpha * f_tilde).to(out.dtype)
    return out


# --------------------------------------------------------------------------- tokens
def concept_token_groups(tokenizer, prompt: str, concepts: Sequence[str]) -> list[list[int]]:
    """Token positions of each concept of ``prompt``: one list per concept, for Cross-Token NMS.

    A concept is a word ("circle") or a phrase ("red circle"); it matches whole words,
    case-insensitively, with any whitespace between the words of a phrase. Every occurrence counts,
    and a word split into several pieces contributes all of them (including a bare ``"▁"`` piece the
    tokenizer attributes to the word). Positions are ascending within a concept. Two concepts may not
    share a token (e.g. "red" and "red circle").
    """
    enc = tokenizer(prompt, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    groups: list[list[int]] = []
    for concept in concepts:
        words = concept.split()
        pattern = r"\s+".join(re.escape(word) for word in words)
        spans = [m.span() for m in re.finditer(rf"(?<!\w){pattern}(?!\w)", prompt, re.IGNORECASE)] if words else []
        hits = [t for t, (s, e) in enumerate(offsets) if e > s and any(s < we and e > ws for ws, we in spans)]
        if not hits:
            tokens = tokenizer.convert_ids_to_tokens(enc["input_ids"])
            raise ValueError(f"concept {concept!r} is not a whole word or phrase of the prompt {prompt!r}; "
                             f"prompt tokens: {tokens}")
        shared = sorted({t for group in groups for t in group} & set(hits))
        if shared:
            raise ValueError(f"concepts {list(concepts)} overlap in the prompt {prompt!r} (tokens {shared}); "
                             "give each concept its own words")
        groups.append(hits)
    return groups


# --------------------------------------------------------------------------- Cross-Token NMS
def cross_attention_probs(attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
    """The probabilities (batch*heads, image tokens, text tokens) and values that ``AttnProcessor2_0`` computes
    inside SDPA, made explicit so they can be changed (Cross-Token NMS) or inspected."""
    if hidden_states.ndim != 3:
        raise ValueError(f"cross-attention expects (batch, tokens, dim) hidden states, "
                         f"got {tuple(hidden_states.shape)}")
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    batch, seq_len = context.shape[:2]
    if attention_mask is not None and attention_mask.dtype == torch.bool:
        attention_mask = torch.zeros_like(attention_mask, dtype=hidden_states.dtype).masked_fill(
            ~attention_mask, float("-inf"))
    attention_mask = attn.prepare_attention_mask(attention_mask, seq_len, batch)
    if attn.norm_cross and encoder_hidden_states is not None:
        context = attn.norm_encoder_hidden_states(context)
    query = attn.head_to_batch_dim(attn.to_q(hidden_states))
    key = attn.head_to_batch_dim(attn.to_k(context))
    value = attn.head_to_batch_dim(attn.to_v(context))
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return attn.get_attention_scores(query, key, attention_mask), value


class CrossTokenNMSProcessor:
    """Attention processor for PixArt ``attn2`` that applies Cross-Token NMS to the probabilities.

    With ``cfg_batch=True`` the batch is ``[uncond, cond]`` (diffusers PixArt pipelines put the
    negative prompt first) and NMS only touches the second half. ``concepts`` are text-token
    positions shared by all conditional rows, one int or list of ints per concept (see
    :func:`~dit_cache.kernels.cross_token_nms`); with ``per_sample=True`` it is one such list per
    conditional sample instead (prompts whose concept words sit at different positions).
    ``height`` x ``width`` is the image-token grid.
    Padded text tokens get probability 0 from the softmax (PixArt passes a -10000 bias) and NMS only
    scales entries, so they stay 0. ``active`` starts True; :meth:`set_step` switches it per step.
    While inactive the call is delegated to the stock :class:`AttnProcessor2_0`, bitwise.
    """

    def __init__(self, concepts: Concepts | Sequence[Concepts], height: int, width: int, suppression: float = 0.0,
                 renormalize: bool = True, step_fraction: float = 0.5, cfg_batch: bool = True,
                 per_sample: bool = False):
        self.per_sample = bool(per_sample)
        if self.per_sample and not concepts:
            raise ValueError("per_sample=True needs one concept list per conditional sample; got none")
        self.concepts = [concept_groups(c) for c in concepts] if self.per_sample else concept_groups(concepts)
        check_fraction("suppression", suppression)
        check_fraction("step_fraction", step_fraction)
        self.height, self.width = int(height), int(width)
        self.suppression, self.renormalize = float(suppression), bool(renormalize)
        self.step_fraction, self.cfg_batch = float(step_fraction), bool(cfg_batch)
        self.active = True
        self._stock = AttnProcessor2_0()

    def set_step(self, step_index: int, num_steps: int) -> None:
        self.active = step_index < round(self.step_fraction * num_steps)

    def attention_probs(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
        """Post-NMS probabilities (batch*heads, image tokens, text tokens) and the value tensor."""
        probs, value = cross_attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask)
        batch = probs.shape[0] // attn.heads
        if self.cfg_batch and batch % 2:
            raise ValueError(f"cfg_batch=True needs an even batch [uncond, cond], got {batch}; "
                             "pass cfg_batch=False when running without classifier-free guidance")
        start = (batch // 2) * attn.heads if self.cfg_batch else 0
        options = dict(suppression=self.suppression, renormalize=self.renormalize)
        if not self.per_sample:
            nms = cross_token_nms(probs[start:], self.concepts, self.height, self.width, **options)
            return torch.cat([probs[:start], nms]), value
        samples = (probs.shape[0] - start) // attn.heads  # rows are sample-major, heads inner
        if samples != len(self.concepts):
            raise ValueError(f"per-sample concepts are given for {len(self.concepts)} samples but the conditional "
                             f"batch has {samples}; pass one concept list per image")
        rows = [probs[start + i * attn.heads: start + (i + 1) * attn.heads] for i in range(samples)]
        nms = [cross_token_nms(row, groups, self.height, self.width, **options)
               for row, groups in zip(rows, self.concepts)]
        return torch.cat([probs[:start], *nms]), value

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None,
                 *args, **kwargs):
        if not self.active:
            return self._stock(attn, hidden_states, encoder_hidden_states, attention_mask, temb, *args, **kwargs)
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        probs, value = self.attention_probs(attn, hidden_states, encoder_hidden_states, attention_mask)
        hidden_states = attn.batch_to_head_dim(torch.bmm(probs, value))
        hidden_states = attn.to_out[1](attn.to_out[0](hidden_states))
        if attn.residual_connection:
            hidden_states = hidden_states + residual
        return hidden_states / attn.rescale_output_factor


def apply_cross_token_nms(transformer, concepts: Concepts, height: int, width: int,
                          blocks: Sequence[int] | None = None, **kwargs) -> list[CrossTokenNMSProcessor]:
    """Install a :class:`CrossTokenNMSProcessor` on ``transformer.transformer_blocks[i].attn2`` for every block
    ``i`` in ``blocks`` (default: all blocks)."""
    all_blocks = transformer.transformer_blocks
    chosen = range(len(all_blocks)) if blocks is None else list(blocks)
    invalid = [i for i in chosen if not isinstance(i, int) or not 0 <= i < len(all_blocks)]
    if invalid or (blocks is not None and not chosen):
        raise ValueError(f"NMS blocks must be a non-empty list of block indices in [0, {len(all_blocks) - 1}]; "
                         f"got {list(blocks)}.")
    processors = []
    for block in (all_blocks[i] for i in chosen):
        proc = CrossTokenNMSProcessor(concepts, height, width, **kwargs)
        proc.previous = block.attn2.processor  # restored by remove_cross_token_nms
        block.attn2.set_processor(proc)
        processors.append(proc)
    return processors


def remove_cross_token_nms(transformer) -> None:
    """Put back the processor each ``attn2`` had before Cross-Token NMS was applied."""
    for block in transformer.transformer_blocks:
        if isinstance(block.attn2.processor, CrossTokenNMSProcessor):
            block.attn2.set_processor(getattr(block.attn2.processor, "previous", None) or AttnProcessor2_0())
