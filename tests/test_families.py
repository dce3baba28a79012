"""SD3, FLUX.1 and Sana: units, the cache engine on tiny random models, and the accelerated pipelines."""

from dataclasses import dataclass
from typing import Callable

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import dit_cache
from dit_cache import CacheRouter, CacheSchedule, apply_cache, cache_units, remove_cache
from dit_cache.pipelines import (AcceleratedFluxPipeline, AcceleratedSanaPipeline,
                                 AcceleratedStableDiffusion3Pipeline, decelerate)
from dit_cache.testing import (run_steps, tiny_flux, tiny_flux_pipeline, tiny_pixart, tiny_qwen_image, tiny_sana,
                               tiny_sana_pipeline, tiny_sd3, tiny_sd3_pipeline, tiny_wan)
from dit_cache.units import unit_layout

STEPS = 4


@dataclass
class Family:
    model: Callable
    pipeline: Callable
    accelerated: type
    call: dict


FAMILIES = {
    "sd3": Family(tiny_sd3, tiny_sd3_pipeline, AcceleratedStableDiffusion3Pipeline,
                  dict(height=64, width=64, max_sequence_length=8)),
    "flux": Family(tiny_flux, tiny_flux_pipeline, AcceleratedFluxPipeline,
                   dict(height=64, width=64, max_sequence_length=8)),
    "sana": Family(tiny_sana, tiny_sana_pipeline, AcceleratedSanaPipeline,
                   dict(height=32, width=32, max_sequence_length=8, use_resolution_binning=False)),
}
NAMES = list(FAMILIES)
# Model level only (their pipelines run classifier-free guidance as a second transformer call per step).
MODELS = {**{name: family.model for name, family in FAMILIES.items()}, "qwen-image": tiny_qwen_image,
          "wan": tiny_wan}


def test_sd3_units_skip_the_last_blocks_context_ff_and_take_sd35_dual_attention():
    units = cache_units(tiny_sd3(num_layers=3, dual_attention_layers=(0,)))
    assert [u.path for u in units] == [
        "transformer_blocks.0.attn", "transformer_blocks.0.attn2", "transformer_blocks.0.ff",
        "transformer_blocks.0.ff_context", "transformer_blocks.1.attn", "transformer_blocks.1.ff",
        "transformer_blocks.1.ff_context", "transformer_blocks.2.attn", "transformer_blocks.2.ff"]
    assert [u.outputs for u in units if u.branch == "attn"] == [2, 2, 2]  # joint attention: image and context
    assert unit_layout(tiny_sd3(num_layers=3)) == "SD3Transformer2DModel:3xattn+ff+ff_context"


def test_flux_units_run_double_blocks_then_single_blocks_before_the_shared_projection():
    units = cache_units(tiny_flux(num_layers=1, num_single_layers=2))
    assert [u.path for u in units] == [
        "transformer_blocks.0.attn", "transformer_blocks.0.ff", "transformer_blocks.0.ff_context",
        "single_transformer_blocks.0.proj_mlp", "single_transformer_blocks.0.attn",
        "single_transformer_blocks.1.proj_mlp", "single_transformer_blocks.1.attn"]
    assert [u.block for u in units] == [0, 0, 0, 1, 1, 2, 2]
    assert [u.outputs for u in units] == [2, 1, 1, 1, 1, 1, 1]
    assert unit_layout(tiny_flux(num_layers=1, num_single_layers=2)) == \
        "FluxTransformer2DModel:1xattn+ff+ff_context,2xproj_mlp+attn"


def test_qwen_image_and_wan_units():
    units = cache_units(tiny_qwen_image(num_layers=2))
    assert [u.branch for u in units] == ["attn", "img_mlp", "txt_mlp"] * 2 and units[0].outputs == 2
    assert unit_layout(tiny_wan(num_layers=3)) == "WanTransformer3DModel:3xattn1+attn2+ffn"


def test_sana_units_and_the_pixart_layout_string_are_unchanged():
    assert [u.branch for u in cache_units(tiny_sana(num_layers=2))] == ["attn1", "attn2", "ff"] * 2
    # Shipped router files store this string: it must not change for the existing families.
    assert unit_layout(tiny_pixart(num_layers=2)) == "PixArtTransformer2DModel:2xattn1+attn2+ff"


def _unit_flops_of_run(transformer, num_steps):
    """FLOPs each unit really spent over a run: a reused unit runs nothing."""
    with FlopCounterMode(display=False, depth=None) as counter:
        outputs = run_steps(transformer, num_steps)
    by_module = counter.get_flop_counts()
    prefix = type(transformer).__name__
    per_unit = [sum(by_module.get(f"{prefix}.{unit.path}", {}).values()) for unit in cache_units(transformer)]
    return outputs, per_unit


@pytest.mark.parametrize("name", MODELS)
def test_full_schedule_is_stock_uniform_skips_the_units_and_removal_restores(name):
    transformer = MODELS[name]()
    num_units = len(cache_units(transformer))
    stock, stock_flops = _unit_flops_of_run(transformer, STEPS)
    assert all(f > 0 for f in stock_flops)

    apply_cache(transformer, CacheSchedule.full(STEPS, num_units))
    assert all(torch.equal(a, b) for a, b in zip(stock, run_steps(transformer, STEPS)))
    remove_cache(transformer)

    schedule = CacheSchedule.uniform(STEPS, num_units, interval=2)
    apply_cache(transformer, schedule)
    cached, cached_flops = _unit_flops_of_run(transformer, STEPS)
    computed_steps = schedule.mask.sum(0).tolist()  # 2 of 4 steps per unit
    assert computed_steps == [STEPS // 2] * num_units
    assert [c * STEPS for c in cached_flops] == [s * n for s, n in zip(stock_flops, computed_steps)]
    assert torch.equal(stock[0], cached[0]) and not torch.equal(stock[-1], cached[-1])

    assert remove_cache(transformer)
    assert all(torch.equal(a, b) for a, b in zip(stock, run_steps(transformer, STEPS)))
    assert not any(hasattr(m, "_diffusers_hook") or "forward" in m.__dict__ for m in transformer.modules())


def _elements(output):
    return output if isinstance(output, tuple) else (output,)


@pytest.mark.parametrize("name", MODELS)
def test_reuse_returns_exactly_what_compute_stored(name):
    """No block modifies a branch output in place after it is returned (a cached tensor would change)."""
    transformer = MODELS[name]()
    units = cache_units(transformer)
    apply_cache(transformer, CacheSchedule.uniform(2, len(units), interval=2))
    returned = {unit.index: [] for unit in units}  # per step: (the objects, their values at return time)

    def record(index):
        return lambda module, args, output: returned[index].append(
            (_elements(output), [t.clone() for t in _elements(output)]))

    handles = [transformer.get_submodule(u.path).register_forward_hook(record(u.index)) for u in units]
    run_steps(transformer, 2)
    for handle in handles:
        handle.remove()
    for unit in units:
        (computed, computed_values), (reused, _) = returned[unit.index]
        assert len(computed) == unit.outputs
        assert all(a is b for a, b in zip(computed, reused)), unit.path  # REUSE returns the stored objects
        # ... and they still hold the values COMPUTE returned, after two whole forward passes used them.
        assert all(torch.equal(t, v) for t, v in zip(reused, computed_values)), unit.path


@pytest.mark.parametrize("name", MODELS)
def test_a_schedule_or_router_for_another_family_is_refused_with_the_fix(name):
    transformer = MODELS[name]()
    num_units = len(cache_units(transformer))
    with pytest.raises(ValueError, match=r"num_units=len\(dit_cache.cache_units\(transformer\)\)"):
        apply_cache(transformer, CacheSchedule.full(STEPS, num_units + 1))
    assert not any(hasattr(m, "_diffusers_hook") for m in transformer.modules())
    # A PixArt router with the same unit count is still refused: the layout names the family.
    pixart = tiny_pixart(num_layers=2)
    router = CacheRouter(STEPS, len(cache_units(pixart)), metadata={"unit_layout": unit_layout(pixart)})
    with pytest.raises(ValueError, match="trained for PixArtTransformer2DModel.*Train a router for this model"):
        router.check_compatible(unit_layout(transformer))


def _pipeline(name, **kwargs):
    pipe = FAMILIES[name].pipeline(**kwargs)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, name, steps=STEPS, **kwargs):
    return pipe("a red circle and a blue square", num_inference_steps=steps, output_type="pt",
                generator=torch.Generator().manual_seed(0), **FAMILIES[name].call, **kwargs).images


@pytest.mark.parametrize("name", NAMES)
def test_accelerated_pipeline_full_is_stock_uniform_differs_and_decelerate_restores(name):
    pipe = _pipeline(name)
    stock = _generate(pipe, name)
    num_units = len(cache_units(pipe.transformer))

    dit_cache.accelerate(pipe, schedule=CacheSchedule.full(STEPS, num_units))
    assert isinstance(pipe, FAMILIES[name].accelerated)
    assert torch.equal(_generate(pipe, name), stock)
    assert pipe.cache_stats.reused == 0 and pipe.cache_stats.computed == STEPS * num_units
    decelerate(pipe)

    dit_cache.accelerate(pipe, schedule=CacheSchedule.uniform(STEPS, num_units, interval=2))
    cached = _generate(pipe, name)
    assert not torch.equal(cached, stock)
    # The flow-matching schedulers call the transformer once per step: the step count is what the cache counted.
    assert pipe.cache_stats.steps == STEPS and pipe.cache_stats.reused == (STEPS // 2) * num_units
    with pytest.raises(ValueError, match=f"num_inference_steps={STEPS}"):
        _generate(pipe, name, steps=STEPS + 1)
    assert torch.equal(_generate(pipe, name, cache=False), stock)

    decelerate(pipe)
    assert type(pipe) is not FAMILIES[name].accelerated
    assert torch.equal(_generate(pipe, name), stock)


@pytest.mark.parametrize("name", NAMES)
def test_concepts_are_refused_with_the_reason(name):
    pipe = dit_cache.accelerate(_pipeline(name), schedule=CacheSchedule.full(2, len(cache_units(_pipeline(name).transformer))))
    reason = "Cross-Token NMS" if name in ("sd3", "flux") else "complex human instruction"
    with pytest.raises(TypeError, match=f"concepts= is not supported.*{reason}"):
        _generate(pipe, name, steps=2, concepts=["circle", "square"])


def test_flux_true_cfg_runs_its_two_calls_per_step_as_one_step_each():
    """FluxPipeline names its negative call cache_context("uncond"): each call keeps its own history."""
    pipe = _pipeline("flux")
    call = dict(steps=4, negative_prompt="blurry", true_cfg_scale=2.0)
    stock = _generate(pipe, "flux", **call)
    num_units = len(cache_units(pipe.transformer))
    dit_cache.accelerate(pipe, schedule=CacheSchedule.full(4, num_units))
    assert torch.equal(_generate(pipe, "flux", **call), stock)
    assert pipe.cache_stats.steps == 4 and pipe.cache_stats.computed == 2 * 4 * num_units
    decelerate(pipe)
    dit_cache.accelerate(pipe, schedule=CacheSchedule.uniform(4, num_units, interval=2))
    cached = _generate(pipe, "flux", **call)
    assert not torch.equal(cached, stock) and pipe.cache_stats.reused == 2 * 2 * num_units
    assert torch.equal(_generate(pipe, "flux", cache=False, **call), stock)
    # Without a negative prompt FluxPipeline makes one call per step whatever true_cfg_scale is.
    _generate(pipe, "flux", steps=4, true_cfg_scale=2.0)
    assert pipe.cache_stats.steps == 4 and pipe.cache_stats.reused == 2 * num_units


def test_sd3_skip_layer_guidance_is_refused_while_cached():
    pipe = _pipeline("sd3")
    dit_cache.accelerate(pipe, schedule=CacheSchedule.full(2, len(cache_units(pipe.transformer))))
    with pytest.raises(ValueError, match="skip_guidance_layers=\\[0\\] .*twice per denoising step"):
        _generate(pipe, "sd3", steps=2, skip_guidance_layers=[0])


@pytest.mark.parametrize("name", NAMES)
def test_a_router_trains_a_few_steps_exports_and_drives_the_pipeline(name, tmp_path):
    import lightning as L

    from dit_cache.training.callbacks import ExportRouter
    from dit_cache.training.data import RouterDataModule
    from dit_cache.training.router_module import RouterModule

    folder = tmp_path / name
    FAMILIES[name].pipeline().save_pretrained(folder)
    # FLUX's transformer reads a packed token grid with no size in its config: 8 x 8 tokens = a 128 px image.
    module = RouterModule(str(folder), num_steps=3, objective="sdt", guidance_scale=3.0, learning_rate=0.5,
                          latent_size=8 if name == "flux" else None)
    data = RouterDataModule(str(folder), prompts=["a red circle", "a blue square and a cat"], batch_size=2,
                            num_trajectories=2, max_sequence_length=8)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False,
                        callbacks=[ExportRouter(str(tmp_path / "router.safetensors"))])
    before = module.router.logits.detach().clone()
    trainer.fit(module, data)
    assert not torch.equal(module.router.logits.detach(), before)  # it learned something

    router = CacheRouter.load(tmp_path / "router.safetensors")
    assert router.metadata["unit_layout"] == unit_layout(module.transformer)
    pipe = _pipeline(name)
    dit_cache.accelerate(pipe, router=router, threshold=0.5)
    with pytest.warns(UserWarning, match="trained at guidance_scale=3.0"):  # the family's call uses its own
        _generate(pipe, name, steps=3)
    assert pipe.cache_stats.steps == 3
    # ... and refused, with the fix named, by another family's pipeline.
    other = _pipeline("sana" if name != "sana" else "sd3")
    with pytest.raises(ValueError, match=f"trained for {type(module.transformer).__name__}.*Train a router"):
        dit_cache.accelerate(other, router=router)
    assert type(other) is type(_pipeline("sana" if name != "sana" else "sd3"))


@pytest.mark.parametrize("document, heading", [("docs/models.md", "## The table"),
                                               ("README.md", "## Supported models")])
def test_the_supported_models_table_matches_the_registry(document, heading):
    """The models tables (docs/models.md, README) list every registered family once, and their "units per block"
    column is what each family's tiny model really has."""
    from pathlib import Path

    from dit_cache.families import FAMILIES
    from dit_cache.testing import TINY_FAMILIES

    table = Path(__file__).parents[1] / document
    section = table.read_text().split(heading)[1].split("\n## ")[0]
    rows = [line.split("|")[1:-1] for line in section.splitlines()
            if line.startswith("| ") and not line.startswith("| model")]
    documented = {cells[1].strip(" `"): cells[2].replace("`", "").strip() for cells in rows}
    assert sorted(documented) == sorted(family.transformer for family in FAMILIES) and len(rows) >= 16
    for family in FAMILIES:
        transformer = TINY_FAMILIES[family.name].model()
        terms = unit_layout(transformer).split(":")[1].split(",")  # one "NxA+B" per block list
        assert documented[family.transformer] == ", ".join(term.split("x", 1)[1] for term in terms), family.name


PLANS = ["taylor:2:1", "linear:2:2", "cfg:2"]


def _plan(spec: str, steps: int, num_units: int):
    from dit_cache.plan import CachePlan

    if spec.startswith("linear"):  # not a CLI preset (its weights are fitted); unfitted it is plain reuse
        return CachePlan.linear(steps, num_units, interval=2, order=2)
    return CachePlan.parse(spec, steps, num_units)


@pytest.mark.parametrize("spec", PLANS)
@pytest.mark.parametrize("name", NAMES)
def test_every_engine_action_runs_on_each_family(name, spec):
    """FORECAST / LINEAR forecast tuple outputs per element; CFG_SHARE needs a CFG batch, which FLUX.1 has not."""
    pipe = _pipeline(name)
    steps = 6
    stock = _generate(pipe, name, steps=steps)
    plan = _plan(spec, steps, len(cache_units(pipe.transformer)))
    dit_cache.accelerate(pipe, plan=plan)
    if name == "flux" and spec.startswith("cfg"):
        with pytest.raises(ValueError, match="CFG_SHARE, which needs a classifier-free-guidance batch.*"
                                             "AcceleratedFluxPipeline"):
            _generate(pipe, name, steps=steps)
        return
    cached = _generate(pipe, name, steps=steps)
    assert torch.isfinite(cached).all() and not torch.equal(cached, stock)
    decelerate(pipe)
    assert torch.equal(_generate(pipe, name, steps=steps), stock)


def test_correction_by_similarities_works_on_flux_t5_embeddings():
    """The documented route for joint-attention families: correct the T5 embeddings, pass prompt_embeds=."""
    from dit_cache.concepts import concept_token_groups, correct_by_similarities

    pipe = _pipeline("flux")
    prompt = "a red circle and a blue square"
    embeds, pooled, _ = pipe.encode_prompt(prompt, None, max_sequence_length=8)
    mask = pipe.tokenizer_2(prompt, padding="max_length", max_length=8, truncation=True,
                            return_tensors="pt").attention_mask
    concepts = [position for group in concept_token_groups(pipe.tokenizer_2, prompt, ["circle", "square"])
                for position in group]
    corrected = correct_by_similarities(embeds, mask, concepts, alpha=0.5, tau=0.0)
    assert not torch.equal(corrected[0, concepts], embeds[0, concepts])
    others = [i for i in range(8) if i not in concepts]
    assert torch.equal(corrected[0, others], embeds[0, others])
    call = dict(num_inference_steps=2, output_type="pt", height=64, width=64,
                generator=torch.Generator().manual_seed(0))
    plain = pipe(prompt_embeds=embeds, pooled_prompt_embeds=pooled, **call).images
    fixed = pipe(prompt_embeds=corrected, pooled_prompt_embeds=pooled, **call).images
    assert torch.isfinite(fixed).all() and not torch.equal(plain, fixed)
