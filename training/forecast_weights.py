"""Forecast weights learned on the final-image error: a plan's skipped steps as LINEAR combinations of each unit's
two newest computed outputs, with weights trained end to end through the whole denoising loop.

FORECAST1 extrapolates every unit linearly in the timestep and REUSE holds it; a router search can only choose
between the two. Here the computed steps stay as the plan has them and every skipped entry with two computed
outputs behind it gets weights ``(w_newest, w_older)``, starting at its own action (REUSE ``(1, 0)``, FORECAST1 its
Lagrange weights) and trained by Adam on the mean log10 MSE of the final latents against the uncached latents of
the same prompts and seeds (the benchmark's mean PSNR, in latent space). Gradients flow through the stock
pipeline loop and scheduler; the transformer's weights stay frozen.

``share`` sets what one weight pair serves: ``"step"`` (every unit of a step alike: such a step still folds into
one pass, :mod:`dit_cache.fold`), ``"branch"`` (per step and branch kind) or ``"unit"`` (per entry; those steps
are replayed block by block).
"""

from __future__ import annotations

import contextlib

import torch
from tqdm.auto import tqdm

from dit_cache.cache import get_cache_handle
from dit_cache.forecast import lagrange_weights
from dit_cache.plan import Action, CachePlan
from dit_cache.units import _unwrap, cache_units

SHARES = ("step", "branch", "unit")


PREDICTED = (Action.REUSE, Action.FORECAST1, Action.FORECAST2, Action.LINEAR)  # what learned weights replace


def learnable_entries(plan: CachePlan) -> torch.Tensor:
    """``[steps, units]``: the entries that predict a unit's output from its history (not CFG_SHARE, which runs
    it) with at least two computed outputs behind them."""
    computes = (plan.actions == Action.COMPUTE).long()
    stored = computes.cumsum(0) - computes
    predicted = torch.zeros_like(plan.actions, dtype=torch.bool)
    for action in PREDICTED:
        predicted |= plan.actions == action
    return predicted & (stored >= 2)


def fit_forecast_weights(pipe, plan: CachePlan, prompts, seeds, *, share: str = "step", epochs: int = 8,
                         learning_rate: float = 0.03, batch_size: int = 8, progress: bool = True,
                         **call_kwargs) -> CachePlan:
    """``plan`` with its learnable skipped entries LINEAR, their weights trained end to end (module docstring).

    ``prompts`` and ``seeds`` (one each per calibration image) set the calibration images; ``call_kwargs`` go to
    every pipeline call (``guidance_scale``, ...). Returns the trained plan, or ``plan``'s own weights as LINEAR
    if training made the calibration error worse. Example::

        plan = fit_forecast_weights(pipe, router.plan(skip_flops=0.75), prompts, seeds=range(10_000, 10_032),
                                    guidance_scale=2.0)
        plan.save("plan_75_learned.safetensors")
    """
    if share not in SHARES:
        raise ValueError(f"share must be one of {SHARES}, got {share!r}.")
    prompts, seeds = list(prompts), list(seeds)
    if not prompts or len(prompts) != len(seeds):
        raise ValueError(f"Give one seed per calibration prompt: got {len(prompts)} prompts and {len(seeds)} seeds.")
    if get_cache_handle(pipe.transformer) is not None or getattr(pipe, "_dit_cache_plan", None) is not None:
        raise RuntimeError("fit_forecast_weights runs the stock model with its own forecasts: remove the cache "
                           "first (dit_cache.decelerate(pipe) or dit_cache.remove_cache(pipe.transformer)).")
    call = getattr(type(pipe).__call__, "__wrapped__", None)  # the loop without its torch.no_grad decorator
    if call is None:
        raise TypeError(f"{type(pipe).__name__}.__call__ is not a no_grad-wrapped diffusers call; "
                        "fit_forecast_weights needs the pipeline's own loop.")
    units = cache_units(pipe.transformer)
    plan.check_compatible(num_units=len(units))
    learn = learnable_entries(plan)
    if not bool(learn.any()):
        raise ValueError("The plan has no skipped entry with two computed outputs behind it to learn weights for.")
    groups = _groups(units, share)
    pipe.scheduler.set_timesteps(plan.num_steps)
    times = [float(t) for t in pipe.scheduler.timesteps]
    start = _initial_weights(plan, learn, times, groups)
    weights = torch.nn.Parameter(start.clone())
    loop = _PatchedLoop(pipe, call, units, plan, learn, groups, weights)
    call_kwargs = {"num_inference_steps": plan.num_steps, **call_kwargs}
    batches = [(prompts[i:i + batch_size], seeds[i:i + batch_size]) for i in range(0, len(prompts), batch_size)]
    with loop:
        references = [loop.latents(p, s, call_kwargs, cached=False) for p, s in batches]
        optimizer = torch.optim.Adam([weights], lr=learning_rate)
        before = _mean_log_mse(loop, batches, references, call_kwargs)
        bar = tqdm(range(epochs), desc="learning forecast weights", disable=not progress)
        for _ in bar:
            logs = []
            for (batch_prompts, batch_seeds), reference in zip(batches, references):
                error = _log_mse(loop.latents(batch_prompts, batch_seeds, call_kwargs, cached=True), reference)
                optimizer.zero_grad()
                error.mean().backward()
                optimizer.step()
                logs.append(error.detach())
            bar.set_postfix(latent_psnr=f"{-10 * float(torch.cat(logs).mean()):.2f}")
        after = _mean_log_mse(loop, batches, references, call_kwargs)
    trained = weights.detach() if after < before else start
    return _as_plan(plan, learn, groups, trained)


def _groups(units, share: str) -> list[int]:
    if share == "step":
        return [0] * len(units)
    if share == "unit":
        return list(range(len(units)))
    kinds = sorted({unit.branch for unit in units})
    return [kinds.index(unit.branch) for unit in units]


def _initial_weights(plan, learn, times, groups) -> torch.Tensor:
    """``[steps, groups, 2]`` (newest first): each group's weights where its entries' own action puts them."""
    weights = torch.zeros(plan.num_steps, max(groups) + 1, 2)
    for step, unit in learn.nonzero().tolist():
        newest, older = [s for s in range(step) if plan.actions[s, unit] == Action.COMPUTE][-2:][::-1]
        if plan.actions[step, unit] == Action.FORECAST1:
            w_older, w_newest = lagrange_weights([times[older], times[newest]], times[step])
        else:  # REUSE and any other skipped action start as a reuse
            w_newest, w_older = 1.0, 0.0
        weights[step, groups[unit]] = torch.tensor([w_newest, w_older])
    return weights


def _as_plan(plan, learn, groups, weights) -> CachePlan:
    actions = plan.actions.clone()
    linear = torch.zeros(*actions.shape, 2)
    for step, unit in learn.nonzero().tolist():
        actions[step, unit] = Action.LINEAR
        linear[step, unit] = weights[step, groups[unit]]
    return CachePlan(actions, linear)


def _log_mse(latents, reference) -> torch.Tensor:
    return torch.log10(((latents.float() - reference) ** 2).flatten(1).mean(1))


def _mean_log_mse(loop, batches, references, call_kwargs) -> float:
    with torch.no_grad():
        return float(torch.cat([_log_mse(loop.latents(p, s, call_kwargs, cached=True), reference)
                                for (p, s), reference in zip(batches, references)]).mean())


def _pair(weights, newest, older):
    """``weights[0] * newest + weights[1] * older`` for a unit's output, a tensor or a tuple of them (joint
    attention); tensor weights, so the gradient reaches them."""
    if newest is None:
        return None
    if not torch.is_tensor(newest):
        return type(newest)(_pair(weights, n, o) for n, o in zip(newest, older))
    return weights[0] * newest + weights[1] * older


class _PatchedLoop(contextlib.AbstractContextManager):
    """The pipeline's loop with each unit's forward replaced for the fit: computed entries run and keep their
    output (with its graph), learnable ones return the weighted pair, others reuse. Restored on exit."""

    def __init__(self, pipe, call, units, plan, learn, groups, weights):
        self.pipe, self.call, self.units = pipe, call, units
        self.plan, self.learn, self.groups, self.weights = plan, learn, groups, weights
        self.cached, self.step, self.history = True, -1, []
        self.root = _unwrap(pipe.transformer)
        self.patched = []

    def __enter__(self):
        self.hook = self.root.register_forward_pre_hook(self._next_step)
        try:
            for unit in self.units:
                module = self.root.get_submodule(unit.path)
                module.forward = self._forward(unit.index, module.forward)
                self.patched.append(module)
        except Exception:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc_info):
        self.hook.remove()
        for module in self.patched:
            del module.forward  # the class's forward again
        self.patched.clear()
        return False

    def _next_step(self, module, args):
        self.step += 1

    def _forward(self, unit: int, original):
        def forward(*args, **kwargs):
            if not self.cached:  # the reference pass: the stock unit, nothing kept
                return original(*args, **kwargs)
            code = int(self.plan.actions[self.step, unit])
            if code == Action.COMPUTE:
                output = original(*args, **kwargs)
                self.history[unit].append(output)
                return output
            history = self.history[unit]
            if self.learn[self.step, unit]:
                return _pair(self.weights[self.step, self.groups[unit]], history[-1], history[-2])
            return history[-1]
        return forward

    def latents(self, prompts, seeds, call_kwargs, cached: bool) -> torch.Tensor:
        self.cached, self.step, self.history = cached, -1, [[] for _ in self.units]
        generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        inputs = {"prompt": prompts} if hasattr(self.pipe, "tokenizer") else {"class_labels": prompts}
        with torch.set_grad_enabled(cached):
            output = self.call(self.pipe, **inputs, generator=generators, output_type="latent", **call_kwargs)
        latents = output.images if hasattr(output, "images") else output[0]
        return latents.float() if cached else latents.float().detach()
