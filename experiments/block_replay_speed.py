"""What block replays (dit_cache/families/replays.py) and step folds (dit_cache/fold.py) buy on the embedded model:
the shipped router's plans as shipped (folded), with replays but no folds, and with neither (every block runs its
forward, units hooked), timed interleaved against uncached calls in the same run; the replayed images checked
bitwise equal to the hooked ones, the folded ones for their largest difference; and the median time of one
transformer call on a skipped step of each variant (and on a computed one, with replays and folds):

    OMP_NUM_THREADS=1 python experiments/block_replay_speed.py --budgets '[0.5,0.6,0.7,0.75,0.8]' --repeats 6
"""

from __future__ import annotations

import time
from contextlib import contextmanager, nullcontext

import numpy as np
import torch
from diffusers import PixArtAlphaPipeline
from jsonargparse import CLI

import dit_cache
from dit_cache.families.record import ModelFamily
from dit_cache.plan import Action


@contextmanager
def _patched(owner, name: str, value):
    original = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, original)


VARIANTS = {
    "folded": nullcontext,
    "replayed": lambda: _patched(dit_cache.cache, "step_fold", lambda *args: None),
    "hooked": lambda: _patched(ModelFamily, "replay_of", lambda self, block: None),
}


class StepClock:
    """Seconds of every transformer call (one denoising step), by torch forward pre- and post-hooks."""

    def __init__(self, transformer):
        self.seconds: list[float] = []
        self._handles = [transformer.register_forward_pre_hook(lambda *_: self.seconds.append(time.perf_counter())),
                         transformer.register_forward_hook(self._stop)]

    def _stop(self, *_):
        self.seconds[-1] = time.perf_counter() - self.seconds[-1]

    def by_kind(self, plan) -> tuple[list[float], list[float]]:
        """This call's step seconds split into (computed steps, skipped steps) by ``plan``; then cleared."""
        computed = [bool((row == Action.COMPUTE).any()) for row in plan.actions]
        seconds, self.seconds = self.seconds, []
        return ([t for t, c in zip(seconds, computed) if c], [t for t, c in zip(seconds, computed) if not c])


def _timed(pipe, call) -> tuple[float, np.ndarray]:
    start = time.perf_counter()
    images = pipe(generator=torch.Generator().manual_seed(0), **call).images
    return time.perf_counter() - start, images


def main(budgets: list[float] = (0.5, 0.6, 0.7, 0.75, 0.8), repeats: int = 6,
         prompt: str = "a red circle and a blue square") -> None:
    torch.set_num_threads(1)
    pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt=prompt, num_inference_steps=20, guidance_scale=2.0, output_type="np")
    router = dit_cache.embedded_router_path()
    _timed(pipe, call)  # warm-up
    clock = StepClock(pipe.transformer)
    print("budget | speedup folded [IQR] | replayed | hooked | folded / hooked | replayed == hooked | "
          "folded - hooked, largest pixel difference | skipped step ms folded / replayed / hooked | computed step ms")
    names = ["stock", *VARIANTS]
    for budget in budgets:
        seconds = {name: [] for name in names}
        step_ms = {name: ([], []) for name in VARIANTS}  # (computed, skipped) step milliseconds
        images = {}
        for repeat in range(repeats):
            for name in names[repeat % len(names):] + names[:repeat % len(names)]:  # rotated per repeat
                if name == "stock":
                    seconds[name].append(_timed(pipe, call)[0])
                    clock.seconds.clear()
                    continue
                with VARIANTS[name]():
                    cached = dit_cache.accelerate(pipe, router=router, skip_flops=budget)
                    took, images[name] = _timed(cached, call)
                    for kind, steps in zip(step_ms[name], clock.by_kind(cached._dit_cache_plan)):
                        kind.extend(1000 * t for t in steps)
                    dit_cache.decelerate(cached)
                seconds[name].append(took)
        stock = np.median(seconds["stock"])
        speedup = {name: stock / np.array(values) for name, values in seconds.items()}
        median = {name: float(np.median(values)) for name, values in speedup.items()}
        low, high = np.percentile(speedup["folded"], [25, 75])
        print(f"{budget:.0%} | {median['folded']:.2f}x [{low:.2f}, {high:.2f}] | {median['replayed']:.2f}x | "
              f"{median['hooked']:.2f}x | {median['folded'] / median['hooked']:.3f} | "
              f"{np.array_equal(images['replayed'], images['hooked'])} | "
              f"{np.abs(images['folded'] - images['hooked']).max():.1e} | "
              f"{' / '.join(f'{np.median(step_ms[n][1]):.1f}' for n in VARIANTS)} | "
              f"{np.median(step_ms['folded'][0]):.1f}", flush=True)


if __name__ == "__main__":
    CLI(main, as_positional=False)
