"""Fitting LINEAR forecasts: the least-squares weights over each unit's last K computed outputs, from uncached
trajectories of a pipeline (this runs whole generations; the hot-path maths is :mod:`dit_cache.forecast`)."""

from __future__ import annotations

import torch
from tqdm.auto import tqdm

from .cache import get_cache_handle
from .parallel import all_reduce_sum
from .plan import Action, CachePlan
from .units import _unwrap, cache_units


def linear_sources(plan) -> dict[tuple[int, int], list[int]]:
    """For each LINEAR entry ``(step, unit)``: the steps of the K outputs it combines, newest first."""

    order = plan.linear_weights.shape[2] if plan.linear_weights is not None else 0
    computed: list[list[int]] = [[] for _ in range(plan.num_units)]
    sources = {}
    for step, row in enumerate(plan.actions.tolist()):
        for unit, code in enumerate(row):
            if code == Action.COMPUTE:
                computed[unit].append(step)
            elif code == Action.LINEAR:
                sources[(step, unit)] = computed[unit][-order:][::-1]
    return sources


@torch.no_grad()
def fit_linear_forecaster(pipe, plan, prompts, *, order: int | None = None, seed: int = 0, ridge: float = 1e-6,
                          progress: bool = True, **call_kwargs):
    """Fit the weights of every LINEAR entry of ``plan`` by least squares on uncached trajectories of ``pipe``.

    Each LINEAR entry ``(step, unit)`` predicts the unit's output at ``step`` as a weighted sum of its last
    ``order`` computed outputs (L2P-style, one weight per source; default: the plan's K, else 2). The uncached model runs once per prompt
    (``prompts``: text prompts, or DiT class labels), recording every unit's output; the normal equations of all
    entries are accumulated on the fly. Returns a new plan with ``linear_weights``; ``plan.save`` stores them.

    Example::

        plan = CachePlan(codes_with_linear_entries, linear_weights=torch.zeros(steps, units, 2))
        plan = dit_cache.fit_linear_forecaster(pipe, plan, ["a red circle", "a blue square"], order=2)
    """

    if order is None:
        order = plan.linear_weights.shape[2] if plan.linear_weights is not None else 2
    if order < 1:
        raise ValueError(f"order must be >= 1, got {order}.")
    if not prompts:
        raise ValueError("fit_linear_forecaster needs at least one calibration prompt.")
    placeholder = torch.zeros(plan.num_steps, plan.num_units, order)
    template = CachePlan(plan.actions, placeholder)  # validates that every LINEAR entry has `order` sources
    sources = linear_sources(template)
    if not sources:
        raise ValueError("The plan has no LINEAR entries to fit.")
    units = cache_units(pipe.transformer)
    template.check_compatible(num_units=len(units))
    needed = set(sources) | {(source, unit) for (_, unit), steps in sources.items() for source in steps}
    gram = torch.zeros(len(sources), order, order, dtype=torch.float64)
    target = torch.zeros(len(sources), order, dtype=torch.float64)
    index = {entry: i for i, entry in enumerate(sources)}

    cache_handle = get_cache_handle(pipe.transformer)
    call = {"num_inference_steps": plan.num_steps, **call_kwargs}
    if getattr(pipe, "_dit_cache_plan", None) is not None:
        call["cache"] = False  # an accelerated pipeline (a decelerated one keeps the attribute, as None)
    elif cache_handle is not None and cache_handle.engine_level:
        raise RuntimeError("The transformer has an engine-level cache applied; fit on the uncached model: "
                           "dit_cache.remove_cache(pipe.transformer) first.")
    recorded: dict[tuple[int, int], torch.Tensor] = {}
    step = {"now": 0}
    root = _unwrap(pipe.transformer)

    def record(unit_index):
        def hook(module, args, output):
            if (step["now"], unit_index) in needed:
                recorded[(step["now"], unit_index)] = _flatten(output)
        return hook

    handles = [root.get_submodule(u.path).register_forward_hook(record(u.index)) for u in units]
    handles.append(root.register_forward_hook(lambda *_: step.__setitem__("now", step["now"] + 1)))
    try:
        for i, prompt in enumerate(tqdm(prompts, desc="fitting LINEAR weights", disable=not progress)):
            step["now"] = 0
            recorded.clear()
            generator = torch.Generator().manual_seed(seed + i)
            is_text = hasattr(pipe, "tokenizer")
            inputs = {"prompt": prompt} if is_text else {"class_labels": [prompt]}
            pipe(**inputs, **call, generator=generator, output_type="latent")
            for entry, steps in sources.items():
                x = torch.stack([recorded[(source, entry[1])] for source in steps], dim=1)  # [elements, order]
                y = recorded[entry]
                gram[index[entry]] += x.T @ x
                target[index[entry]] += x.T @ y
    finally:
        for h in handles:
            h.remove()
    # Under context parallelism each rank recorded its own token shard: the normal equations are sums over tokens,
    # so their sum over the ranks is the single-process fit, the same weights on every rank.
    all_reduce_sum(pipe.transformer, gram, target)
    eye = torch.eye(order, dtype=torch.float64)
    scale = gram.diagonal(dim1=1, dim2=2).mean(dim=1).clamp_min(1e-12)[:, None, None]
    solved = torch.linalg.solve(gram + ridge * scale * eye, target[..., None])[..., 0]
    weights = torch.zeros(plan.num_steps, plan.num_units, order)
    for entry, i in index.items():
        weights[entry] = solved[i].float()
    return CachePlan(plan.actions, weights)


def _flatten(output) -> torch.Tensor:
    """A unit output (tensor or tuple of tensors) as one float64 vector."""
    if torch.is_tensor(output):
        return output.detach().reshape(-1).double()
    return torch.cat([_flatten(o) for o in output if o is not None])
