"""What the context-parallel test and its torchrun worker share: the tiny models, the plans, the LINEAR template."""

from __future__ import annotations

from pathlib import Path

import torch

from dit_cache import Action, CachePlan, CacheRouter, cache_units
from dit_cache.testing import run_steps, tiny_flux, tiny_qwen_image, tiny_wan

NUM_STEPS = 5
FAMILIES = {"flux": tiny_flux, "qwen_image": tiny_qwen_image, "wan": tiny_wan}


def router_path(folder: Path, model) -> Path:
    return Path(folder) / f"router_{type(model).__name__}.safetensors"


def make_router(model, seed: int = 0) -> CacheRouter:
    """A random router whose plan mixes COMPUTE, REUSE, FORECAST1 and FORECAST2 (a searched router's actions)."""
    units = len(cache_units(model))
    generator = torch.Generator().manual_seed(seed)
    cheap = torch.tensor([int(Action.REUSE), int(Action.FORECAST1), int(Action.FORECAST2)])
    cheap_actions = cheap[torch.randint(0, 3, (NUM_STEPS, units), generator=generator)]
    return CacheRouter(NUM_STEPS, units, generator=generator, cheap_actions=cheap_actions, threshold=0.5)


def plans(model, folder: Path) -> dict[str, CachePlan]:
    """The plans every rank runs: the router's from the file the test wrote (one file, so one plan on every rank),
    the training-free FORECAST preset, and CFG_SHARE on the batch of 2."""
    units = len(cache_units(model))
    return {
        "router": CacheRouter.load(router_path(folder, model)).plan(),
        "taylor": CachePlan.taylor(NUM_STEPS, units, interval=2, order=1),
        "cfg_share": CachePlan.cfg_share(NUM_STEPS, units, interval=2),
    }


def linear_template(model, order: int = 2) -> CachePlan:
    """LINEAR at steps 2 and 4 of every unit (from the computed steps 0, 1 and 3), weights to be fitted."""
    units = len(cache_units(model))
    codes = torch.full((NUM_STEPS, units), int(Action.COMPUTE), dtype=torch.int8)
    codes[[2, 4]] = int(Action.LINEAR)
    return CachePlan(codes, torch.zeros(NUM_STEPS, units, order))


def flux_pipeline_call(pipe) -> tuple[torch.Tensor, int]:
    """The accelerated FLUX.1 pipeline with a FORECAST plan: its final latents and the cache bytes it held."""
    import dit_cache

    dit_cache.accelerate(pipe, plan=CachePlan.taylor(4, len(cache_units(pipe.transformer)), interval=2))
    pipe.set_progress_bar_config(disable=True)
    latents = pipe("a red circle", num_inference_steps=4, height=64, width=64, output_type="latent",
                   generator=torch.Generator().manual_seed(0)).images
    return latents, pipe.cache_stats.cache_bytes


class StepsPipeline:
    """The least of a pipeline ``fit_linear_forecaster`` needs: one uncached ``run_steps`` trajectory per call."""

    def __init__(self, transformer):
        self.transformer = transformer

    def __call__(self, class_labels, num_inference_steps, generator, output_type):
        return run_steps(self.transformer, num_inference_steps)


def install_cpu_ring_attention() -> None:
    """Let diffusers' ring attention run on the CPU: it merges the KV chunks' results by their log-sum-exp, which
    the native backend does not return ("Native attention does not support return_lse=True") and every backend
    that does is CUDA-only. Substitutes torch's CPU flash-attention kernel, which returns it, for the native
    backend's forward op; the ring algorithm itself is diffusers' own."""
    from diffusers.models import attention_dispatch

    native = attention_dispatch._native_attention_forward_op

    def forward_op(ctx, query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None,
                   enable_gqa=False, return_lse=False, _save_ctx=True, _parallel_config=None):
        if not return_lse:
            return native(ctx, query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, return_lse,
                          _save_ctx=_save_ctx, _parallel_config=_parallel_config)
        if attn_mask is not None:  # Qwen-Image passes its text mask, all True for the test's unpadded prompts
            if attn_mask.dtype != torch.bool or not bool(attn_mask.all()):
                raise ValueError("The CPU ring-attention substitute takes no attention mask but an all-True one.")
            attn_mask = None
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            *(x.transpose(1, 2) for x in (query, key, value)), dropout_p=dropout_p, is_causal=is_causal, scale=scale)
        return out.transpose(1, 2), lse.transpose(1, 2)  # the (B, S, H, D) and (B, S, H) layout the ring expects

    attention_dispatch._native_attention_forward_op = forward_op
