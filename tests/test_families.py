"""Family-specific checks (unit layouts, FLUX true CFG, SD3 skip-layer guidance, Correction by Similarities on T5
embeddings) and the supported-models tables; what every family must pass is tests/test_family_contract.py."""

import pytest
import torch

import dit_cache
from dit_cache import CacheSchedule, cache_units
from dit_cache.pipelines import decelerate
from dit_cache.testing import TINY_FAMILIES, tiny_flux, tiny_pixart, tiny_qwen_image, tiny_sana, tiny_sd3, tiny_wan
from dit_cache.units import unit_layout

STEPS = 4


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


def _pipeline(name):
    pipe = TINY_FAMILIES[name].pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _generate(pipe, name, steps=STEPS, **kwargs):
    return pipe("a red circle and a blue square", num_inference_steps=steps, output_type="pt",
                generator=torch.Generator().manual_seed(0), **TINY_FAMILIES[name].call, **kwargs).images


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
