"""Cross-Token NMS: reference semantics, Triton kernel (interpreted on the CPU) and dispatch."""

import importlib
import math
import os

os.environ["TRITON_INTERPRET"] = "1"  # before triton is imported: run kernels on the CPU

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dit_cache.kernels import cross_token_nms, cross_token_nms_reference

# the package exports a function with the module's name, so fetch the module itself explicitly
nms_mod = importlib.import_module("dit_cache.kernels.cross_token_nms")

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:
    HAVE_TRITON = False


def _probs(bh, h, w, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(bh, h * w, n, generator=g)).softmax(-1)


def _smoothed_argmax(probs, concepts, h, w):
    """Independent smoothing: conv2d with a normalized 3x3 Gaussian (sigma 1), zero padding, of each
    concept's mean map (a concept is a column index or a list of them)."""
    d = torch.tensor([-1.0, 0.0, 1.0])
    k = torch.exp(-(d[:, None] ** 2 + d[None, :] ** 2) / 2)
    k = (k / k.sum())[None, None]
    groups = [[c] if isinstance(c, int) else c for c in concepts]
    maps = torch.stack([probs[:, :, g].mean(-1) for g in groups], 1).reshape(-1, 1, h, w)
    sm = F.conv2d(maps, k, padding=1).reshape(probs.shape[0], len(groups), h * w)
    return sm.argmax(dim=1)  # (bh, hw)


def test_hard_mode_keeps_only_the_smoothed_winner():
    h, w, idx = 5, 7, [1, 4, 6]
    p = _probs(4, h, w, 9)
    out = cross_token_nms_reference(p, idx, h, w)
    concept = out[:, :, idx]
    assert ((concept != 0).sum(-1) == 1).all()  # probs are positive, so the winner stays non-zero
    winner = _smoothed_argmax(p, idx, h, w)
    assert torch.equal(concept.argmax(-1), winner)
    assert torch.equal(concept.gather(-1, winner[..., None]), p[:, :, idx].gather(-1, winner[..., None]))
    rest = [j for j in range(9) if j not in idx]
    assert torch.equal(out[:, :, rest], p[:, :, rest])


def test_smoothing_decides_the_winner():
    # concept 0 peaks alone at the centre pixel; concept 1 is slightly lower there but high around it
    h = w = 3
    a = torch.zeros(h, w)
    a[1, 1] = 1.0
    b = torch.full((h, w), 0.9)
    p = torch.stack([a.flatten(), b.flatten(), torch.ones(h * w)], -1)[None]
    out = cross_token_nms_reference(p, [0, 1], h, w)
    assert out[0, 4, 0] == 0 and out[0, 4, 1] == 0.9  # raw argmax would keep concept 0


def test_soft_mode_scales_losers_by_lambda():
    h, w, idx, lam = 4, 5, [0, 2], 0.3
    p = _probs(2, h, w, 6, seed=1)
    out = cross_token_nms_reference(p, idx, h, w, suppression=lam)
    winner = _smoothed_argmax(p, idx, h, w)
    expected = p[:, :, idx] * torch.where(F.one_hot(winner, 2).bool(), 1.0, lam)
    torch.testing.assert_close(out[:, :, idx], expected, rtol=0, atol=1e-7)
    assert torch.equal(out[:, :, [1, 3, 4, 5]], p[:, :, [1, 3, 4, 5]])


def test_renormalized_rows_sum_to_one_and_zeros_stay_zero():
    h, w, idx = 3, 5, [0, 1, 3]
    p = _probs(2, h, w, 7, seed=2)
    p[:, :, 5:] = 0  # padded text tokens
    p = p / p.sum(-1, keepdim=True)
    out = cross_token_nms_reference(p, idx, h, w, suppression=0.2, renormalize=True)
    torch.testing.assert_close(out.sum(-1), torch.ones(2, h * w))
    assert (out[:, :, 5:] == 0).all()
    assert not torch.allclose(out, p)


def test_multi_token_concepts_win_or_lose_together():
    # concept 0 spans columns 1, 2 and 5 (a phrase or a word in pieces), concept 1 is column 4
    h, w, concepts = 6, 5, [[1, 2, 5], 4]
    p = _probs(3, h, w, 8, seed=3)
    out = cross_token_nms_reference(p, concepts, h, w)
    winner = _smoothed_argmax(p, concepts, h, w)
    first_wins = (winner == 0)[..., None]
    assert torch.equal(out[:, :, [1, 2, 5]], torch.where(first_wins, p[:, :, [1, 2, 5]], 0.0))
    assert torch.equal(out[:, :, [4]], torch.where(first_wins, 0.0, p[:, :, [4]]))
    assert 0 < first_wins.float().mean() < 1  # both outcomes occur, so both branches were checked
    assert torch.equal(out[:, :, [0, 3, 6, 7]], p[:, :, [0, 3, 6, 7]])
    # one column per concept is the paper's NMS: the pieces no longer compete with each other
    assert torch.equal(cross_token_nms_reference(p, [[1], [4]], h, w), cross_token_nms_reference(p, [1, 4], h, w))
    # indices may come as numpy integers or integer tensors, e.g. from a tokenizer's output
    assert torch.equal(cross_token_nms_reference(p, [np.array([1, 2, 5]), torch.tensor(4)], h, w), out)


@pytest.mark.parametrize("kwargs, match", [
    (dict(concepts=[0, 9]), "out of range"),
    (dict(concepts=[1, 1]), "twice"),
    (dict(concepts=[[0, 1], [1, 2]]), "twice"),
    (dict(concepts=[]), "empty"),
    (dict(concepts=[[0], []]), "empty"),
    (dict(concepts=[0.5, 1]), "text-token index"),
    (dict(concepts=[[0, 1.0]]), "text-token index"),
    (dict(height=4), "height\\*width"),
    (dict(suppression=1.5), "suppression"),
])
def test_bad_arguments_raise(kwargs, match):
    args = dict(probs=_probs(1, 3, 3, 9), concepts=[0, 1], height=3, width=3) | kwargs
    with pytest.raises(ValueError, match=match):
        cross_token_nms_reference(**args)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not importable; the kernel comparison needs it")
@pytest.mark.parametrize("bh, h, w, n, idx, lam, renorm", [
    (3, 5, 7, 10, [1, 4], 0.0, False),
    (2, 7, 5, 13, [0, 3, 12], 0.3, True),
    (4, 9, 3, 20, [2, 19], 0.3, False),
    (1, 3, 11, 5, [4, 0, 2], 0.0, True),
    (2, 6, 5, 12, [[1, 2, 5], 7, [10, 0]], 0.0, True),
    (3, 4, 4, 9, [[3, 4], [6, 7, 8]], 0.2, False),
])
def test_triton_kernel_matches_reference(bh, h, w, n, idx, lam, renorm):
    p = _probs(bh, h, w, n, seed=h * w + n)
    ref = cross_token_nms_reference(p, idx, h, w, suppression=lam, renormalize=renorm)
    out = cross_token_nms(p, idx, h, w, suppression=lam, renormalize=renorm, force_triton=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    half = cross_token_nms(p.half(), idx, h, w, suppression=lam, renormalize=renorm, force_triton=True)
    assert half.dtype == torch.float16


def test_dispatcher_uses_reference_on_cpu(monkeypatch):
    def boom(*a, **k):
        raise AssertionError("the Triton path must not run for CPU tensors")

    monkeypatch.setattr(nms_mod, "cross_token_nms_triton", boom)
    p = _probs(2, 3, 3, 5)
    assert torch.equal(cross_token_nms(p, [0, 2], 3, 3, 0.1, True), cross_token_nms_reference(p, [0, 2], 3, 3, 0.1, True))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        cross_token_nms(p, [0, 2], 3, 3, force_triton=True)


def test_gaussian_weights_are_normalized():
    g = torch.tensor(nms_mod.GAUSSIAN_3X3)
    assert math.isclose(g.sum().item(), 1.0, rel_tol=1e-6) and torch.equal(g, g.T)
