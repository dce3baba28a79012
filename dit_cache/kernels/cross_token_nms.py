"""Cross-Token Non-Maximum Suppression (Multi-Concept T2I-Zero) on cross-attention probabilities.

``probs`` has shape ``(batch*heads, height*width, n_text)`` (post-softmax, rows indexed by the
row-major token grid). ``concepts`` lists the concepts; each is one text-token column (an int) or
several (a list of ints: a word split into pieces, or a phrase such as "red circle").

1. a concept's map is the mean of its columns, reshaped to ``(height, width)`` and smoothed with a
   normalized 3x3 Gaussian (sigma 1) using **zero padding** (border pixels see fewer neighbours);
2. every pixel picks the winning concept ``argmax_k smoothed_k(p)`` (ties: the first concept);
3. the columns of the losing concepts at that pixel are multiplied by ``suppression`` (0 = the
   paper's hard NMS, values in (0, 1] give a soft variant); non-concept columns are untouched;
4. with ``renormalize=True`` every row is rescaled to sum 1 (a row summing to 0 stays 0).

With one column per concept this is the paper's NMS. Averaging a multi-column concept keeps its
pieces from suppressing one another, and keeps a long phrase from winning by its length alone.
Entries are only ever scaled, so a probability that is 0 (e.g. a padded text token) stays 0.
Smoothing, argmax and renormalization run in float32; the result has the dtype of ``probs``.
"""

from __future__ import annotations

import math
import operator
import os
from typing import Sequence

import torch

try:  # triton is optional: the package must import on machines without it
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover - exercised only where triton is missing
    triton = None
    tl = None

__all__ = ["cross_token_nms", "cross_token_nms_reference", "cross_token_nms_triton"]

_G1 = math.exp(-0.5)  # Gaussian weight of the 4 edge neighbours (sigma 1), centre weight 1
_G2 = math.exp(-1.0)  # weight of the 4 corner neighbours
_GSUM = 1.0 + 4.0 * _G1 + 4.0 * _G2
GAUSSIAN_3X3 = [[_G2 / _GSUM, _G1 / _GSUM, _G2 / _GSUM],
                [_G1 / _GSUM, 1.0 / _GSUM, _G1 / _GSUM],
                [_G2 / _GSUM, _G1 / _GSUM, _G2 / _GSUM]]


Concepts = Sequence[int | Sequence[int]]



def check_fraction(name: str, value: float) -> None:
    """Strengths, suppression scales and step fractions all live in [0, 1]."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")

def _columns(concept) -> list[int]:
    try:  # operator.index takes ints, numpy integers and one-element integer tensors, and refuses floats
        return [operator.index(concept)]
    except TypeError:
        pass
    try:
        return [operator.index(column) for column in concept]
    except TypeError:
        raise ValueError(f"a concept must be a text-token index or a list of them, got {concept!r}") from None


def concept_groups(concepts: Concepts) -> list[list[int]]:
    """``concepts`` as one list of text-token columns per concept."""
    groups = [_columns(concept) for concept in concepts]
    if not groups or not all(groups):
        raise ValueError(f"concepts {list(concepts)} is empty or has an empty concept; pass at least one "
                         "text-token index per concept")
    return groups


def _check(probs: torch.Tensor, concepts: Concepts, height: int, width: int,
           suppression: float) -> tuple[list[list[int]], list[int], list[int]]:
    """The concepts' groups, their columns in one flat list, and the concept that owns each column."""
    if probs.ndim != 3:
        raise ValueError(f"probs must have shape (batch*heads, height*width, n_text), got {tuple(probs.shape)}")
    if probs.shape[1] != height * width:
        raise ValueError(f"probs has {probs.shape[1]} image tokens but height*width = {height}*{width} = "
                         f"{height * width}; pass the token-grid size (latent size / patch size)")
    groups = concept_groups(concepts)
    columns = [c for group in groups for c in group]
    owner = [k for k, group in enumerate(groups) for _ in group]
    n_text = probs.shape[2]
    if any(c < 0 or c >= n_text for c in columns):
        raise ValueError(f"concept columns {groups} out of range for {n_text} text tokens; "
                         f"use 0 <= index < {n_text}")
    if len(set(columns)) != len(columns):
        raise ValueError(f"concepts {groups} list a text token twice; each token may belong to one concept only")
    check_fraction("suppression", suppression)
    return groups, columns, owner


def _smooth(maps: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian over the last two dims, zero padding, fixed summation order (dy, then dx)."""
    h, w = maps.shape[-2:]
    padded = torch.nn.functional.pad(maps, (1, 1, 1, 1))
    out = torch.zeros_like(maps)
    for dy in range(3):
        for dx in range(3):
            out = out + GAUSSIAN_3X3[dy][dx] * padded[..., dy:dy + h, dx:dx + w]
    return out


def cross_token_nms_reference(probs: torch.Tensor, concepts: Concepts, height: int, width: int,
                              suppression: float = 0.0, renormalize: bool = False) -> torch.Tensor:
    """Plain-torch Cross-Token NMS; returns a new tensor shaped like ``probs``."""
    groups, columns, owner = _check(probs, concepts, height, width, suppression)
    bh, hw, _ = probs.shape
    p32 = probs.float()
    cols = torch.tensor(columns, device=probs.device)
    owner = torch.tensor(owner, device=probs.device)
    # (columns, concepts) matrix of 1/len(group) entries: column maps -> mean map of each concept
    mean = torch.nn.functional.one_hot(owner, len(groups)).float()
    mean = mean / mean.sum(dim=0)
    maps = (_smooth(p32[:, :, cols].permute(0, 2, 1).reshape(bh, len(cols), height, width))
            .reshape(bh, len(cols), hw).transpose(1, 2) @ mean)  # (bh, hw, concepts)
    winner = maps.argmax(dim=-1)  # (bh, hw)
    keep = winner[..., None] == owner  # (bh, hw, columns)
    out = p32.clone()
    out[:, :, cols] = torch.where(keep, p32[:, :, cols], p32[:, :, cols] * suppression)
    if renormalize:
        total = out.sum(dim=-1, keepdim=True)
        out = out / torch.where(total > 0, total, torch.ones_like(total))
    return out.to(probs.dtype)


if triton is not None:

    @triton.jit
    def _cross_token_nms_kernel(
        in_ptr, out_ptr, cidx_ptr, owner_ptr, weight_ptr, slot_ptr, gauss_ptr,
        HW, N, K, G, H, W, suppression,
        RENORMALIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
        BLOCK_G: tl.constexpr,
    ):
        # K concept columns cidx (K,), each owned by concept owner (K,) with weight 1/len(concept);
        # slot (N,) maps every text column to its concept or -1; G concepts; 3x3 Gaussian weights.
        bh = tl.program_id(0)
        pix = tl.program_id(1) * BLOCK_P + tl.arange(0, BLOCK_P)
        pix_ok = pix < HW
        py = pix // W
        px = pix % W
        ks = tl.arange(0, BLOCK_K)
        k_ok = ks < K
        cidx = tl.load(cidx_ptr + ks, mask=k_ok, other=0)
        base = in_ptr + bh.to(tl.int64) * HW * N

        # 1) smoothed concept maps at this block's pixels: (BLOCK_P, BLOCK_K), zero padding
        smooth = tl.zeros((BLOCK_P, BLOCK_K), dtype=tl.float32)
        for dy in tl.static_range(3):
            for dx in tl.static_range(3):
                qy = py + (dy - 1)
                qx = px + (dx - 1)
                q_ok = pix_ok & (qy >= 0) & (qy < H) & (qx >= 0) & (qx < W)
                ptrs = base + (qy * W + qx)[:, None] * N + cidx[None, :]
                v = tl.load(ptrs, mask=q_ok[:, None] & k_ok[None, :], other=0.0).to(tl.float32)
                smooth += tl.load(gauss_ptr + dy * 3 + dx) * v

        # 2) mean map of each concept, winning concept per pixel (padding concepts can never win)
        owner = tl.load(owner_ptr + ks, mask=k_ok, other=-1)
        weight = tl.load(weight_ptr + ks, mask=k_ok, other=0.0)
        gs = tl.arange(0, BLOCK_G)
        member = (owner[:, None] == gs[None, :]).to(tl.float32) * weight[:, None]  # (BLOCK_K, BLOCK_G)
        score = tl.sum(smooth[:, :, None] * member[None, :, :], axis=1)  # (BLOCK_P, BLOCK_G)
        score = tl.where((gs < G)[None, :], score, -float("inf"))
        winner = tl.argmax(score, axis=1)  # (BLOCK_P,)

        # 3) scale the losing concept columns of the full rows, 4) optional renormalization
        cols = tl.arange(0, BLOCK_N)
        n_ok = cols < N
        slot = tl.load(slot_ptr + cols, mask=n_ok, other=-1)
        row_ptrs = (pix * N)[:, None] + cols[None, :]
        row_mask = pix_ok[:, None] & n_ok[None, :]
        x = tl.load(base + row_ptrs, mask=row_mask, other=0.0).to(tl.float32)
        lose = (slot[None, :] >= 0) & (slot[None, :] != winner[:, None])
        x = tl.where(lose, x * suppression, x)
        if RENORMALIZE:
            total = tl.sum(x, axis=1)
            x = x / tl.where(total > 0, total, 1.0)[:, None]
        out_base = out_ptr + bh.to(tl.int64) * HW * N
        tl.store(out_base + row_ptrs, x.to(out_ptr.dtype.element_ty), mask=row_mask)


def _kernel():
    """The jitted kernel in the mode (compiled / interpreted) that TRITON_INTERPRET asks for now.

    ``triton.jit`` fixes the mode when the function is decorated, so re-wrap the source function
    when the environment changed after this module was imported.
    """
    global _cross_token_nms_kernel
    from triton.runtime.interpreter import InterpretedFunction

    want_interp = os.environ.get("TRITON_INTERPRET", "0") == "1"
    if isinstance(_cross_token_nms_kernel, InterpretedFunction) != want_interp:
        _cross_token_nms_kernel = triton.jit(_cross_token_nms_kernel.fn)
    return _cross_token_nms_kernel


def cross_token_nms_triton(probs: torch.Tensor, concepts: Concepts, height: int, width: int,
                           suppression: float = 0.0, renormalize: bool = False) -> torch.Tensor:
    """Fused Triton Cross-Token NMS (same semantics as :func:`cross_token_nms_reference`)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use cross_token_nms_reference or `pip install triton`")
    groups, idx, owner = _check(probs, concepts, height, width, suppression)
    probs = probs.contiguous()
    bh, hw, n = probs.shape
    out = torch.empty_like(probs)
    cidx = torch.tensor(idx, dtype=torch.int32, device=probs.device)
    owner_t = torch.tensor(owner, dtype=torch.int32, device=probs.device)
    weight = torch.tensor([1.0 / len(groups[k]) for k in owner], dtype=torch.float32, device=probs.device)
    slot = torch.full((n,), -1, dtype=torch.int32)
    slot[idx] = torch.tensor(owner, dtype=torch.int32)
    slot = slot.to(probs.device)
    block_n = triton.next_power_of_2(n)
    block_p = max(1, min(64, 4096 // block_n))
    gauss = torch.tensor(GAUSSIAN_3X3, dtype=torch.float32, device=probs.device)
    grid = (bh, triton.cdiv(hw, block_p))
    _kernel()[grid](probs, out, cidx, owner_t, weight, slot, gauss, hw, n, len(idx), len(groups), height, width,
                    float(suppression), RENORMALIZE=bool(renormalize), BLOCK_P=block_p, BLOCK_N=block_n,
                    BLOCK_K=max(2, triton.next_power_of_2(len(idx))),
                    BLOCK_G=max(2, triton.next_power_of_2(len(groups))))
    return out


def cross_token_nms(probs: torch.Tensor, concepts: Concepts, height: int, width: int,
                    suppression: float = 0.0, renormalize: bool = False, force_triton: bool = False) -> torch.Tensor:
    """Cross-Token NMS: the Triton kernel for CUDA tensors, the torch reference otherwise.

    ``force_triton=True`` runs the kernel on CPU tensors too, which needs ``TRITON_INTERPRET=1``.
    """
    use_triton = triton is not None and probs.is_cuda
    if force_triton and not use_triton:
        if triton is None or os.environ.get("TRITON_INTERPRET", "0") != "1":
            raise RuntimeError("force_triton=True needs triton and either a CUDA tensor or the environment "
                               "variable TRITON_INTERPRET=1 (to run the kernel on the CPU)")
        use_triton = True
    fn = cross_token_nms_triton if use_triton else cross_token_nms_reference
    return fn(probs, concepts, height, width, suppression=suppression, renormalize=renormalize)
