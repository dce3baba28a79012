"""One image from a cached pipeline whose tokens are sharded over several processes (diffusers' context parallelism).

    torchrun --nproc_per_node 4 samples/context_parallel.py --model black-forest-labs/FLUX.1-dev \\
        --prompt "a cat holding a sign" --plan taylor:3:1 --ulysses 4
    torchrun --nproc_per_node 2 samples/context_parallel.py --model black-forest-labs/FLUX.1-dev \\
        --router flux_router.safetensors --flops 0.5 --ring 2 --attention_backend _native_cudnn

Every process loads the pipeline, shards the transformer with ``enable_parallelism`` and applies the same cache;
every process must then make the same call with the same seed (the latents are drawn on each process). Each
process caches its own shard of the tokens; rank 0 writes the image. Ring attention needs a backend that returns
the log-sum-exp (``_native_cudnn``, ``flash``, ``_native_flash``; not ``native``). See docs/multi_gpu.md.
"""

from __future__ import annotations

import os
from pathlib import Path
from unittest import mock

import torch
import torch.distributed as dist
from diffusers import ContextParallelConfig, DiffusionPipeline
from jsonargparse import CLI

import dit_cache
from dit_cache import CachePlan, CacheRouter, cache_units


def enable_context_parallelism(transformer, ulysses: int, ring: int) -> None:
    config = ContextParallelConfig(ulysses_degree=ulysses, ring_degree=ring)
    if torch.accelerator.current_accelerator() is None:
        # diffusers 0.42 computes `rank % torch.accelerator.device_count()`: a division by zero without an
        # accelerator. On the CPU (gloo) every process is device cpu:0, so a count of 1 is the truth.
        with mock.patch("torch.accelerator.device_count", return_value=1):
            transformer.enable_parallelism(config=config)
    else:
        transformer.enable_parallelism(config=config)


def main(prompt: str = "a red circle and a blue square", model: str = "black-forest-labs/FLUX.1-dev",
         plan: str | None = "taylor:3:1", router: str | None = None, flops: float | None = None, ulysses: int = 1,
         ring: int = 1, steps: int = 28, guidance_scale: float = 3.5, height: int | None = None,
         width: int | None = None, seed: int = 0, attention_backend: str | None = None, dtype: str = "bfloat16",
         out: str = "outputs/context_parallel.png"):
    """Args:
        model: a diffusers pipeline folder or hub id whose transformer has a ``_cp_plan`` (FLUX.1, Qwen-Image, Wan).
        plan: a preset (``taylor:3:1``, ``uniform:3``) or a plan file; ignored when ``router`` is given.
        router: a router file; ``flops`` picks its budget (the share of the units' FLOPs to skip).
        ulysses, ring: the degrees; their product is the number of processes.
        attention_backend: ``transformer.set_attention_backend(...)`` before sharding (ring needs one with LSE).
    """
    on_gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if on_gpu else torch.device("cpu")
    if on_gpu:
        torch.cuda.set_device(device)
    pipe = DiffusionPipeline.from_pretrained(model, torch_dtype=getattr(torch, dtype)).to(device)
    pipe.set_progress_bar_config(disable=rank != 0)
    if attention_backend is not None:
        pipe.transformer.set_attention_backend(attention_backend)
    enable_context_parallelism(pipe.transformer, ulysses, ring)
    if router is not None:  # the same file on every rank: the same plan on every rank
        dit_cache.accelerate(pipe, router=CacheRouter.load(router), flops=flops)
    elif plan is not None:
        units = len(cache_units(pipe.transformer))
        cache_plan = CachePlan.load(plan) if plan.endswith(".safetensors") else CachePlan.parse(plan, steps, units)
        dit_cache.accelerate(pipe, plan=cache_plan)
    size = {key: value for key, value in (("height", height), ("width", width)) if value is not None}
    generator = torch.Generator(device).manual_seed(seed)  # the same seed on every rank: the same latents
    image = pipe(prompt, num_inference_steps=steps, guidance_scale=guidance_scale, generator=generator,
                 **size).images[0]
    stats = getattr(pipe, "cache_stats", None)
    if stats is not None:
        print(f"rank {rank}: {stats} ({stats.cache_bytes / 2**20:.1f} MiB of cache on this rank)", flush=True)
    if rank == 0:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        image.save(out)
        print(f"saved {out}")
    dist.destroy_process_group()


if __name__ == "__main__":
    CLI(main, as_positional=False)
