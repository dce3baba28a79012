"""Cross-Token Non-Maximum Suppression (Multi-Concept T2I-Zero) on cross-attention probabilities.

``probs`` has shape ``(batch*heads, height*width, n_text)`` (post-softmax, rows indexed by the
row-major token grid). For the concept columns ``C``:

1. each concept column is reshaped to an ``(height, width)`` map and smoothed with a normalized
   3x3 Gaussian (sigma 1) using **zero padding** (border pixels see fewer neighbours);
2. every pixel picks the winning concept ``argmax_k smoothed_k(p)`` (ties: the first concept in
   ``concept_indices``);
3. the losing concept columns of that pixel are multiplied by ``suppression`` (0 = the paper's
   hard NMS, values in (0, 1] give a soft variant); non-concept columns are untouched;
4. with ``renormalize=True`` every row is rescaled to sum 1 (a row summing to 0 stays 0).

Entries are only ever scaled, so a probability that is 0 (e.g. a padded text token) stays 0.
Smoothing, argmax and renormalization run in float32; the result has the dtype of ``probs``.
"""

from __future__ import annotations

import math
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


def _check(probs: torch.Tensor, concept_indices: Sequence[int], height: int, width: int,
           suppression: float) -> list[int]:
    if probs.ndim != 3:
        raise ValueError(f"probs must have shape (batch*heads, height*width, n_text), got {tuple(probs.shape)}")
    if probs.shape[1] != height * width:
        raise ValueError(f"probs has {probs.shape[1]} image tokens but height*width = {height}*{width} = "
                         f"{height * width}; pass the token-grid size (latent size / patch size)")
    idx = [int(c) for c in concept_indices]
    n_text = probs.shape[2]
    if not idx:
        raise ValueError("concept_indices is empty; pass at least one text-token index")
    if any(c < 0 or c >= n_text for c in idx):
        raise ValueError(f"concept_indices {idx} out of range for {n_text} text tokens; use 0 <= index < {n_text}")
    if len(set(idx)) != len(idx):
        raise ValueError(f"concept_indices {idx} contains duplicates; list each text token once")
    if not 0.0 <= suppression <= 1.0:
        raise ValueError(f"suppression must be in [0, 1] (0 = hard NMS), got {suppression}")
    return idx


def _smooth(maps: torch.Tensor) -> torch.Tensor:
    """3x3 Gaussian over the last two dims, zero padding, fixed summation order (dy, then dx)."""
    h, w = maps.shape[-2:]
    padded = torch.nn.functional.pad(maps, (1, 1, 1, 1))
    out = torch.zeros_like(maps)
    for dy in range(3):
        for dx in range(3):
            out = out + GAUSSIAN_3X3[dy][dx] * padded[..., dy:dy + h, dx:dx + w]
    return out


def cross_token_nms_reference(probs: torch.Tensor, concept_indices: Sequence[int], height: int, width: int,
                              suppression: float = 0.0, renormalize: bool = False) -> torch.Tensor:
    """Plain-torch Cross-Token NMS; returns a new tensor shaped like ``probs``."""
    idx = _check(probs, concept_indices, height, width, suppression)
    bh, hw, _ = probs.shape
    p32 = probs.float()
    cols = torch.tensor(idx, device=probs.device)
    concept = p32[:, :, cols]  # (bh, hw, k)
    smoothed = _smooth(concept.permute(0, 2, 1).reshape(bh, len(idx), height, width))
    winner = smoothed.reshape(bh, len(idx), hw).argmax(dim=1)  # (bh, hw)
    is_winner = torch.nn.functional.one_hot(winner, len(idx)).bool()
    factor = torch.where(is_winner, torch.ones_like(concept), torch.full_like(concept, suppression))
    out = p32.clone()
    out[:, :, cols] = concept * factor
    if renormalize:
        total = out.sum(dim=-1, keepdim=True)
        out = out / torch.where(total > 0, total, torch.ones_like(total))
    return out.to(probs.dtype)


if triton is not None:

    @triton.jit
    def _cross_token_nms_kernel(
        in_ptr, out_ptr, cidx_ptr, slot_ptr, gauss_ptr,  # concept columns (K,), column -> slot (N,), 3x3 weights
        HW, N, K, H, W, suppression,
        RENORMALIZE: tl.constexpr, BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
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

        # 2) winning concept slot per pixel (padding slots can never win)
        smooth = tl.where(k_ok[None, :], smooth, -float("inf"))
        winner = tl.argmax(smooth, axis=1)  # (BLOCK_P,)

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


def cross_token_nms_triton(probs: torch.Tensor, concept_indices: Sequence[int], height: int, width: int,
                           suppression: float = 0.0, renormalize: bool = False) -> torch.Tensor:
    """Fused Triton Cross-Token NMS (same semantics as :func:`cross_token_nms_reference`)."""
    if triton is None:
        raise RuntimeError("triton is not installed; use cross_token_nms_reference or `pip install triton`")
    idx = _check(probs, concept_indices, height, width, suppression)
    probs = probs.contiguous()
    bh, hw, n = probs.shape
    out = torch.empty_like(probs)
    cidx = torch.tensor(idx, dtype=torch.int32, device=probs.device)
    slot = torch.full((n,), -1, dtype=torch.int32)
    slot[idx] = torch.arange(len(idx), dtype=torch.int32)
    slot = slot.to(probs.device)
    block_n = triton.next_power_of_2(n)
    block_p = max(1, min(64, 4096 // block_n))
    gauss = torch.tensor(GAUSSIAN_3X3, dtype=torch.float32, device=probs.device)
    grid = (bh, triton.cdiv(hw, block_p))
    _kernel()[grid](probs, out, cidx, slot, gauss, hw, n, len(idx), height, width, float(suppression),
                    RENORMALIZE=bool(renormalize), BLOCK_P=block_p,
                    BLOCK_N=block_n, BLOCK_K=max(2, triton.next_power_of_2(len(idx))))
    return out


def cross_token_nms(probs: torch.Tensor, concept_indices: Sequence[int], height: int, width: int,
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
    return fn(probs, concept_indices, height, width, suppression=suppression, renormalize=renormalize)
