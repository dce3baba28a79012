"""An input-adaptive router: per image, the plan of one of a ladder of FLOP budgets, chosen at run time from a
signal the first denoising step already has, by a rule learned on the final-image error of calibration prompts.

A static router gives every prompt and seed the same plan. Some images survive coarse caching with little error
and others do not; given a signal that tells them apart early, spending the FLOPs where they matter beats a fixed
plan at the same *average* budget. The rule here is deliberately small:

* **signal** (end of step 0, which every plan computes in full): the relative gap between the two halves of the
  classifier-free-guidance batch of the transformer's output, ``|a - b| / (|a| + |b|)`` (mean absolute values; the
  halves' order does not matter), or, without a CFG batch (FLUX.1), the output's scale against its input
  ``|out| / |x|``;
* **rule**: the signal's calibration quantiles cut it into bins; each bin takes one plan of the ladder (the static
  router's plans at budgets 0.3, 0.35, ...). The table is fitted by exhaustive search to maximise the mean PSNR of
  the final images of the calibration prompts against their uncached images, with the mean share of FLOPs skipped
  within ``tolerance`` of the budget asked (:func:`fit_rule`).

At run time (:func:`apply_adaptive`) the pipeline follows the static plan of the asked budget (the fallback); a
torch forward hook on the transformer, after step 0, reads the signal (one host sync per image: a scalar leaves
the device once; the static plan's hot path has none besides the ``float(timestep)`` its forecasts read every
step) and switches the generation to the chosen plan. Every ladder plan computes step 0 in full, so the switch
changes nothing already done, and the cached history is kept. A rule whose ladder is the full plan alone is
bitwise the stock model. The hook works on any transformer the engine caches (it reads only the transformer's
input and output); with several images in one call, their mean signal decides for the call.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from .families import family_of
from .plan import Action, CachePlan

SIGNALS = ("cfg_gap", "output_scale", "prompt_tokens")
ADAPTIVE_HOOK_ATTRIBUTE = "_dit_cache_adaptive_hook"


def step_signal(hidden_states: torch.Tensor, output: torch.Tensor, cfg_batch: bool) -> torch.Tensor:
    """The decision signal of one transformer call, a 0-d tensor on the output's device (no host sync)."""
    output = output.float()
    if cfg_batch and output.shape[0] % 2 == 0:
        first, second = output.chunk(2)
        return (first - second).abs().mean() / (first.abs().mean() + second.abs().mean() + 1e-12)
    return output.abs().mean() / (hidden_states.float().abs().mean() + 1e-12)


def prompt_tokens(kwargs: dict, conditional_half: int | None) -> torch.Tensor:
    """The ``prompt_tokens`` signal: the mean number of attended prompt tokens (the text encoder mask the transformer
    is handed) over the images of a call, the conditional half of a CFG batch; a 0-d tensor (no host sync)."""
    mask = kwargs.get("encoder_attention_mask")
    if mask is None:
        raise ValueError("The prompt_tokens signal reads the transformer's encoder_attention_mask, which this call "
                         "does not pass: fit the rule on signal='cfg_gap' for this model.")
    mask = mask.reshape(mask.shape[0], -1).float()
    if conditional_half is not None and mask.shape[0] % 2 == 0:
        mask = mask.chunk(2)[conditional_half]
    return (mask > 0).sum(dim=1).float().mean()


@dataclass
class AdaptiveRule:
    """Bins of the step-0 signal (``edges``, increasing) and the ladder plan each bin takes (``choice``)."""

    budgets: list[float]  # the ladder: FLOP shares skipped of the static plans the rule chooses from
    edges: list[float]  # len(choice) - 1 interior bin edges
    choice: list[int]  # ladder index per bin
    budget: float  # the average share of FLOPs skipped the rule was fitted to
    signal: str = "cfg_gap"
    expected_skipped: float | None = None  # on the calibration images
    expected_psnr: float | None = None  # the objective's mean on the calibration images (PSNR, or -MSE)

    def __post_init__(self):
        if self.signal not in SIGNALS:
            raise ValueError(f"unknown signal {self.signal!r}; choose from {', '.join(SIGNALS)}.")
        if len(self.edges) != len(self.choice) - 1 or any(b <= a for a, b in zip(self.edges, self.edges[1:])):
            raise ValueError("an adaptive rule needs increasing edges, one fewer than its choices.")
        if any(not 0 <= c < len(self.budgets) for c in self.choice):
            raise ValueError(f"rule choices {self.choice} must index the ladder of {len(self.budgets)} budgets.")

    def pick(self, signal: float) -> int:
        """The ladder index for a signal value."""
        return self.choice[sum(signal >= edge for edge in self.edges)]

    @classmethod
    def compute_everything(cls) -> "AdaptiveRule":
        """The rule that always takes budget 0: the full plan (bitwise the stock model)."""
        return cls(budgets=[0.0], edges=[], choice=[0], budget=0.0)

    def save(self, path: str | Path) -> None:
        """A safetensors file (the rule is a few numbers, kept in its metadata)."""
        from safetensors.torch import save_file

        fields = {k: getattr(self, k) for k in self.__dataclass_fields__}
        save_file({"edges": torch.tensor(self.edges + [0.0], dtype=torch.float64)}, str(path),
                  metadata={"dit_cache_adaptive_rule": json.dumps(fields)})

    @classmethod
    def load(cls, path: str | Path) -> "AdaptiveRule":
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
        if "dit_cache_adaptive_rule" not in metadata:
            raise ValueError(f"{path} is not an adaptive rule file (no dit_cache_adaptive_rule metadata).")
        return cls(**json.loads(metadata["dit_cache_adaptive_rule"]))


def fit_rule(signals, psnr, skipped, budgets, budget: float, bins: int = 3, tolerance: float = 0.01,
             signal: str = "cfg_gap", objective: str = "psnr") -> AdaptiveRule:
    """The bin table that maximises the mean calibration PSNR (``objective="mse"``: minimises the mean MSE) with
    the mean FLOP share skipped within ``tolerance`` of ``budget``.

    The mean PSNR rewards mixing plans of very different cost even without a signal (PSNR is concave in the FLOPs
    skipped: half the images at a fine plan and half at a coarse one average more dB than all at the middle one);
    the mean MSE penalises that mixing, so only a signal that tells the images apart pays under it.

    ``signals[i]``: image i's step-0 signal; ``psnr[i][j]``: its final-image PSNR with ladder plan j;
    ``skipped[j]``: plan j's share of FLOPs skipped; ``budgets[j]``: the ladder. Bins are the signal's calibration
    quantiles. The search is exhaustive (``len(budgets) ** bins`` tables), so keep ``bins`` small.
    """
    signals = torch.as_tensor(signals, dtype=torch.float64)
    psnr = torch.as_tensor(psnr, dtype=torch.float64)
    skipped = torch.as_tensor(skipped, dtype=torch.float64)
    if psnr.shape != (len(signals), len(budgets)) or skipped.shape != (len(budgets),):
        raise ValueError("psnr must be [images, ladder] and skipped [ladder].")
    if len(signals) < bins:
        raise ValueError(f"{bins} bins need at least {bins} calibration images, got {len(signals)}.")
    quantiles = torch.linspace(0, 1, bins + 1, dtype=torch.float64)[1:-1]
    edges = torch.quantile(signals, quantiles).tolist() if bins > 1 else []
    members = torch.bucketize(signals, torch.tensor(edges, dtype=torch.float64), right=True)
    counts = torch.bincount(members, minlength=bins).double()
    if objective not in ("psnr", "mse"):
        raise ValueError(f"objective must be 'psnr' or 'mse', got {objective!r}.")
    # per bin and ladder plan: the summed score of the bin's images (higher is better)
    values = psnr if objective == "psnr" else -(10.0 ** (-psnr / 10))
    bin_psnr = torch.stack([values[members == b].sum(dim=0) for b in range(bins)])
    best = None
    for table in itertools.product(range(len(budgets)), repeat=bins):
        share = float(sum(counts[b] * skipped[j] for b, j in enumerate(table)) / len(signals))
        if abs(share - budget) > tolerance:
            continue
        score = float(sum(bin_psnr[b, j] for b, j in enumerate(table)) / len(signals))
        if best is None or score > best[0]:
            best = (score, share, table)
    if best is None:
        raise ValueError(f"no rule over the ladder {budgets} skips {budget:.0%} of the FLOPs on average within "
                         f"{tolerance:.0%}; widen the ladder or the tolerance.")
    score, share, table = best
    # Neighbouring bins with the same plan merge (equal edges would not be increasing).
    merged_edges, merged_choice = [], [table[0]]
    for edge, j in zip(edges, table[1:]):
        if j != merged_choice[-1]:
            merged_edges.append(float(edge))
            merged_choice.append(j)
    return AdaptiveRule(budgets=[float(b) for b in budgets], edges=merged_edges, choice=list(merged_choice),
                        budget=float(budget), signal=signal, expected_skipped=share, expected_psnr=score)


def ladder_plans(router, budgets) -> list[CachePlan]:
    """The static router's plan at each ladder budget (``CachePlan.full`` for a budget of 0)."""
    return [CachePlan.full(router.num_steps, router.num_units) if b == 0 else router.plan(skip_flops=b)
            for b in budgets]


class _AdaptiveSwitch:
    """The torch forward hook: after step 0 of each generation, reads the signal and switches the plan."""

    def __init__(self, handle, rule: AdaptiveRule, plans: list[CachePlan], conditional_half: int | None):
        from .state import PreparedPlan

        self.handle, self.rule, self.conditional_half = handle, rule, conditional_half
        self.cfg_batch = conditional_half is not None
        depth = max(max(p.history_depth) for p in plans)
        needs_time = any(p.uses(Action.FORECAST1, Action.FORECAST2) for p in plans)
        self.compiled = [PreparedPlan(p, depth) for p in plans]
        for compiled in self.compiled:
            compiled.needs_time = needs_time  # the timesteps of the steps before the switch must be recorded
        self.picks: list[int] = []  # the ladder index of every generation so far (read by the benchmarks)
        self._handle = None

    def attach(self, transformer) -> None:
        self._handle = transformer.register_forward_hook(self._after_step, with_kwargs=True)

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def _after_step(self, module, args, kwargs, output):
        state = self.handle.active_state()
        if state is None or state.step != 1 or state.mode != "schedule":
            return None
        hidden_states = args[0] if args else kwargs["hidden_states"]
        sample = output[0] if isinstance(output, (tuple, list)) else getattr(output, "sample", output)
        if self.rule.signal == "prompt_tokens":
            signal = prompt_tokens(kwargs, self.conditional_half)
        else:
            signal = step_signal(hidden_states, sample, self.cfg_batch)
        index = self.rule.pick(float(signal))  # the one host sync
        state.switch_plan(self.compiled[index])
        self.picks.append(index)
        return None


def apply_adaptive(pipe, router, rule: AdaptiveRule):
    """Accelerate ``pipe`` with the static plan at ``rule.budget`` (the fallback) and the adaptive switch on top;
    :func:`remove_adaptive` undoes both. Returns the switch (``switch.picks``: each call's ladder index).

    ``router``: a budget-range router (a ``CacheRouter`` or its file; the ladder is its plans at
    ``rule.budgets``), or a dict ``{budget: CachePlan}`` holding every ladder budget and ``rule.budget``.

    Example::

        rule = AdaptiveRule.load("rule_60.safetensors")
        apply_adaptive(pipe, dit_cache.embedded_router_path(), rule)
        image = pipe("a red circle", guidance_scale=2.0).images[0]
    """
    from .cache import get_cache_handle
    from .pipelines import accelerate
    from .router import CacheRouter

    if getattr(pipe.transformer, ADAPTIVE_HOOK_ATTRIBUTE, None) is not None:
        raise RuntimeError("this pipeline's transformer already has an adaptive router; remove_adaptive(pipe) first.")
    if isinstance(router, dict):
        missing = sorted({*rule.budgets, rule.budget} - set(router))
        if missing:
            raise ValueError(f"the plans given have no plan for the budgets {missing} the rule needs.")
        plans, fallback = [router[b] for b in rule.budgets], router[rule.budget]
    else:
        if not isinstance(router, CacheRouter):
            router = CacheRouter.load(router)
        plans = ladder_plans(router, rule.budgets)
        fallback = ladder_plans(router, [rule.budget])[0]
    if rule.signal == "prompt_tokens" and not _takes_text_mask(pipe.transformer):
        raise ValueError(f"The prompt_tokens signal reads the encoder_attention_mask a transformer is handed; "
                         f"{type(pipe.transformer).__name__} takes none: fit the rule on signal='cfg_gap'.")
    if any(int(code) != int(Action.COMPUTE) for p in plans for code in p.actions[0]):
        raise ValueError("every ladder plan must compute step 0 in full: the switch happens after it.")
    switch = _AdaptiveSwitch(None, rule, plans + [fallback], family_of(pipe.transformer).cfg.conditional_half)
    switch.compiled, fallback_compiled = switch.compiled[:-1], switch.compiled[-1]
    accelerate(pipe, plan=fallback)
    handle = get_cache_handle(pipe.transformer)
    handle.compiled = fallback_compiled  # the fallback keeps the history and timesteps any ladder plan needs
    switch.handle = handle
    switch.attach(pipe.transformer)
    setattr(pipe.transformer, ADAPTIVE_HOOK_ATTRIBUTE, switch)
    return switch


def remove_adaptive(pipe) -> None:
    """Remove the switch and the cache: the stock pipeline again."""
    from .pipelines import decelerate

    switch = pipe.transformer.__dict__.pop(ADAPTIVE_HOOK_ATTRIBUTE, None)
    if switch is not None:
        switch.remove()
    decelerate(pipe)


def _takes_text_mask(transformer) -> bool:
    import inspect

    from .units import _unwrap

    return "encoder_attention_mask" in inspect.signature(type(_unwrap(transformer)).forward).parameters
