"""What an exact reuse is worth on the embedded model: the step-invariant work (``--reuse step_invariant``,
dit_cache.step_invariant: the caption projection and the cross-attention keys and values, computed once per
generation) or the timestep embedding kept across generations (``--reuse timestep_memo``,
dit_cache.timestep_memo). The shipped router's plans with it and without it, against the stock pipeline,
interleaved in one run (whole pipeline calls: text encoder, 20 steps, VAE decode), and a check that both give the
same images bitwise.

    OMP_NUM_THREADS=1 python experiments/step_invariant_speed.py --rounds 3 \
        --out docs/results/step_invariant_speed_cpu.txt
    OMP_NUM_THREADS=1 python experiments/step_invariant_speed.py --reuse timestep_memo --budgets '[0.0,0.7,0.75]' \
        --rounds 3 --out docs/results/timestep_memo_speed_cpu.txt
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from jsonargparse import CLI
from tqdm.auto import tqdm


def main(budgets: tuple[float, ...] = (0.0, 0.5, 0.75), prompts: int = 4, rounds: int = 3, seed: int = 70_000,
         reuse: str = "step_invariant", out: str = "outputs/step_invariant_speed_cpu.txt") -> None:
    from diffusers import PixArtAlphaPipeline

    import dit_cache
    from dit_cache.cache import get_cache_handle
    from dit_cache.flops import percent
    from dit_cache.step_invariant import STEP_INVARIANT_HOOK
    from dit_cache.timestep_memo import TIMESTEP_MEMO_HOOK

    hooks = {"step_invariant": (STEP_INVARIANT_HOOK, "step-invariant reuse"),
             "timestep_memo": (TIMESTEP_MEMO_HOOK, "timestep memo")}
    if reuse not in hooks:
        raise ValueError(f"--reuse must be one of {', '.join(hooks)}, got {reuse!r}.")
    hook, reuse_name = hooks[reuse]
    from dit_cache.toy.evaluation import prompt_set

    torch.set_num_threads(1)
    pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    texts = prompt_set(1, prompts // 2, seed) + prompt_set(2, prompts - prompts // 2, seed + 1)

    def generate(text: str, index: int):
        return pipe(text, num_inference_steps=20, guidance_scale=dit_cache.EMBEDDED_GUIDANCE_SCALE,
                    generator=torch.Generator().manual_seed(seed + index), output_type="np",
                    clean_caption=False).images

    configurations = [("stock", None, False)] + [
        (f"router {percent(b)} {'with' if kept else 'without'} {reuse_name}", b, kept)
        for b in budgets for kept in (True, False)]
    seconds = {name: 0.0 for name, _, _ in configurations}
    images: dict[str, list] = {}
    for _ in tqdm(range(rounds), desc="rounds"):
        for name, budget, kept in configurations:
            if budget is not None:
                cache = ({"plan": dit_cache.CachePlan.full(20, len(dit_cache.cache_units(pipe.transformer)))}
                         if budget == 0 else {"router": dit_cache.embedded_router_path(), "skip_flops": budget})
                dit_cache.accelerate(pipe, **cache)
                if not kept:
                    get_cache_handle(pipe.transformer)._unregister(hook)
            try:
                generate(texts[0], 0)  # untimed warm-up of this configuration
                start = time.perf_counter()
                outputs = [generate(text, i) for i, text in enumerate(texts)]
                seconds[name] += time.perf_counter() - start
            finally:
                if budget is not None:
                    dit_cache.decelerate(pipe)
            images.setdefault(name, outputs)
    lines = [f"embedded model, 20 steps, {len(texts)} prompts x {rounds} interleaved rounds, one torch thread; "
             "speedup = stock total seconds / total seconds", "",
             "| configuration | seconds | speedup | images bitwise those without the reuse |", "|---|---|---|---|"]
    for name, budget, kept in configurations:
        twin = name.replace(" with ", " without ") if kept else None
        same = "" if twin is None else str(all((a == b).all() for a, b in zip(images[name], images[twin])))
        lines.append(f"| {name} | {seconds[name]:.2f} | {seconds['stock'] / seconds[name]:.3f}x | {same} |")
    text = "\n".join(lines) + "\n"
    print(text)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text(text)


if __name__ == "__main__":
    CLI(main)
