"""Predicting a skipped unit's output from its computed history, on the hot path: Taylor-style extrapolation in
the timestep (FORECAST) and learned linear weights (LINEAR; fitted by :mod:`dit_cache.linear_fit`)."""

from __future__ import annotations

import torch


def lagrange_weights(times: list[float], at: float) -> list[float]:
    """Weights ``w`` with ``sum(w[i] * f(times[i])) == p(at)``, ``p`` the polynomial through the points.

    With ``n + 1`` points this is the order-``n`` Taylor (Newton finite-difference) extrapolation over the actual
    timesteps, so uneven spacing is handled and polynomials of degree ``n`` are reproduced exactly.
    """
    if len(set(times)) != len(times):
        raise ValueError(f"Cannot extrapolate from repeated timesteps {times}.")
    weights = []
    for i, t_i in enumerate(times):
        w = 1.0
        for j, t_j in enumerate(times):
            if j != i:
                w *= (at - t_j) / (t_i - t_j)
        weights.append(w)
    return weights


def weighted_sum(weights, outputs):
    """``sum(w * o)`` over outputs that are tensors or tuples of tensors (joint attention), element by element."""
    first = outputs[0]
    if first is None:
        return None
    if not torch.is_tensor(first):
        return type(first)(weighted_sum(weights, [o[i] for o in outputs]) for i in range(len(first)))
    total = first * weights[0]
    for weight, output in zip(weights[1:], outputs[1:]):
        total = total.add(output, alpha=weight)
    return total


def extrapolate(weights, outputs):
    """:func:`weighted_sum` for Lagrange weights (they sum to 1): two points as one ``lerp`` pass over memory
    instead of a multiply and an add, the cost that makes a forecast slower than a reuse."""
    if len(outputs) != 2:
        return weighted_sum(weights, outputs)
    newer, older = outputs[1], outputs[0]
    if newer is None:
        return None
    if not torch.is_tensor(newer):
        return type(newer)(extrapolate(weights, [o[i] for o in outputs]) for i in range(len(newer)))
    return torch.lerp(newer, older, weights[0])
