"""What skipping the whole block stack would give the router: on every step the router's plan skips, the blocks
are not run and the stack's residual (last block's output minus the first block's input) of the last computed step
is reused (or extrapolated, "forecast"), as FirstBlockCache / MagCache / SeaCache do, instead of each unit's
cached output being fed through the block's norms and modulation. Quality on tuning seeds (70000+), and speed,
interleaved, against the router's own per-unit plan at the same computed steps. An experiment, not an engine
feature (docs/benchmark.md, "Where the front falls short"):

    OMP_NUM_THREADS=1 python experiments/stack_reuse.py --budgets '[0.45,0.55,0.65,0.75,0.8]'
"""

from __future__ import annotations

import time

import numpy as np
import torch
from diffusers import PixArtAlphaPipeline
from jsonargparse import CLI

import dit_cache
from dit_cache.actions import Action
from dit_cache.toy.evaluation import generate, image_error, prompt_set


class StackSkip:
    """Block forwards wrapped: on a step outside ``computed`` block 0 returns its input plus the residual of the last
    computed step(s) and the other blocks pass their input through."""

    def __init__(self, transformer, computed: set[int], forecast: bool = False):
        self.computed, self.forecast, self.step, self.history = computed, forecast, -1, []
        self.transformer, self.blocks = transformer, transformer.transformer_blocks
        self.originals = [block.forward for block in self.blocks]
        for index, block in enumerate(self.blocks):
            block.forward = self._wrapped(index, block.forward)
        forward = transformer.forward

        def counting(*args, **kwargs):
            self.step += 1
            self.time = float(kwargs["timestep"].reshape(-1)[0])
            return forward(*args, **kwargs)

        transformer.forward = counting

    def _wrapped(self, index: int, forward):
        last = len(self.blocks) - 1

        def run(hidden_states, *args, **kwargs):
            if self.step in self.computed:
                if index == 0:
                    self.stack_input = hidden_states
                output = forward(hidden_states, *args, **kwargs)
                if index == last:
                    self.history = (self.history + [(self.time, output - self.stack_input)])[-2:]
                return output
            if index != 0:
                return hidden_states
            newest_time, newest = self.history[-1]
            if not self.forecast or len(self.history) < 2:
                return hidden_states + newest
            older_time, older = self.history[-2]
            return hidden_states + newest + (newest - older) * (self.time - newest_time) / (newest_time - older_time)

        return run

    def remove(self) -> None:
        for block, forward in zip(self.blocks, self.originals):
            block.forward = forward
        del self.transformer.forward


def _computed_steps(pipe, budget: float) -> set[int]:
    pipe = dit_cache.accelerate(pipe, router=dit_cache.embedded_router_path(), skip_flops=budget)
    actions = pipe._dit_cache_plan.actions
    dit_cache.decelerate(pipe)
    if bool(((actions != Action.COMPUTE).any(1) & (actions == Action.COMPUTE).any(1)).any()):
        raise ValueError(f"the {budget:.0%} plan has half-computed steps: stack skipping needs whole steps")
    return {step for step in range(actions.shape[0]) if bool((actions[step] == Action.COMPUTE).all())}


def main(budgets: list[float] = (0.45, 0.55, 0.65, 0.75, 0.8), count: int = 8, seed: int = 70_000,
         repeats: int = 4) -> None:
    torch.set_num_threads(1)
    pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    prompts = prompt_set(2, count // 2, seed) + prompt_set(1, count - count // 2, seed)
    seeds = list(range(seed, seed + count))
    call = dict(num_inference_steps=20, guidance_scale=2.0)
    reference = generate(pipe, prompts, seeds, batch_size=count, **call)
    for budget in budgets:
        computed = _computed_steps(pipe, budget)
        cached = dit_cache.accelerate(pipe, router=dit_cache.embedded_router_path(), skip_flops=budget)
        per_unit = image_error(generate(cached, prompts, seeds, batch_size=count, **call), reference)
        dit_cache.decelerate(cached)
        line = f"{budget:.0%} (computed steps {sorted(computed)}): per-unit {per_unit['psnr']:.2f} dB"
        for forecast in (False, True):
            skip = StackSkip(pipe.transformer, computed, forecast)
            stack = image_error(generate(pipe, prompts, seeds, batch_size=count, **call), reference)
            skip.remove()
            better = int((np.array(stack["per_image_mse"]) < np.array(per_unit["per_image_mse"])).sum())
            line += f" | stack {'forecast' if forecast else 'reuse'} {stack['psnr']:.2f} dB (better on {better}/{count})"
        one = dict(prompt=prompts[0], output_type="np", **call)
        seconds = {"stock": [], "per-unit": [], "stack": []}
        for _ in range(repeats):  # interleaved
            start = time.perf_counter(); pipe(**one); seconds["stock"].append(time.perf_counter() - start)
            cached = dit_cache.accelerate(pipe, router=dit_cache.embedded_router_path(), skip_flops=budget)
            start = time.perf_counter(); cached(**one); seconds["per-unit"].append(time.perf_counter() - start)
            dit_cache.decelerate(cached)
            skip = StackSkip(pipe.transformer, computed)
            start = time.perf_counter(); pipe(**one); seconds["stack"].append(time.perf_counter() - start)
            skip.remove()
        median = {name: float(np.median(values)) for name, values in seconds.items()}
        line += (f" | speedup: per-unit {median['stock'] / median['per-unit']:.2f}x, "
                 f"stack reuse {median['stock'] / median['stack']:.2f}x")
        print(line, flush=True)


if __name__ == "__main__":
    CLI(main, as_positional=False)
