"""What dit_cache.parallel refuses before any collective, in one process (tests/test_context_parallel.py runs the
rest under torchrun): tensor parallelism, and a context-parallel plan that splits or gathers at a unit itself."""

import pytest
import torch
from diffusers import ContextParallelConfig
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.models._modeling_parallel import ParallelConfig, TensorParallelConfig

import dit_cache.parallel
from dit_cache import CachePlan, apply_cache, cache_units, remove_cache
from dit_cache.testing import run_steps, tiny_flux


def test_tensor_parallelism_is_refused_at_the_first_step_and_removal_leaves_the_model_stock():
    model, reference = tiny_flux(), tiny_flux()
    model._parallel_config = ParallelConfig(tensor_parallel_config=TensorParallelConfig(tp_degree=2))
    apply_cache(model, CachePlan.uniform(3, len(cache_units(model)), 2))
    with pytest.raises(NotImplementedError, match="tensor parallelism .*Use context parallelism"):
        run_steps(model, 3)
    remove_cache(model)
    del model._parallel_config
    for got, want in zip(run_steps(model, 3), run_steps(reference, 3)):
        assert torch.equal(got, want)


def test_a_context_parallel_hook_on_a_unit_is_refused_naming_the_unit(monkeypatch):
    model = tiny_flux()
    model._parallel_config = ParallelConfig(context_parallel_config=ContextParallelConfig(ulysses_degree=2))
    # As diffusers names the gather hook of a cp_plan entry "single_transformer_blocks.0.attn" (Helios-style plans
    # gather at the attention itself); no process group is needed: the refusal comes before any collective.
    HookRegistry.check_if_exists_or_initialize(model.single_transformer_blocks[0].attn).register_hook(
        ModelHook(), "cp_output---single_transformer_blocks.0.attn")
    monkeypatch.setattr(dit_cache.parallel, "context_parallel_group", lambda transformer: object())
    apply_cache(model, CachePlan.uniform(3, len(cache_units(model)), 2))
    with pytest.raises(NotImplementedError, match=r"cache unit single_transformer_blocks\.0\.attn itself"):
        run_steps(model, 3)
    remove_cache(model)
    # Ours went, diffusers' stayed: the registry is not ours to delete.
    assert list(model.single_transformer_blocks[0].attn._diffusers_hook.hooks) == [
        "cp_output---single_transformer_blocks.0.attn"]


def test_without_parallelism_the_check_reads_one_attribute_and_joins_no_collective(monkeypatch):
    def no_collective(*args, **kwargs):
        raise AssertionError("a collective without parallelism")

    monkeypatch.setattr(dit_cache.parallel, "_all_gather_int", no_collective)
    model = tiny_flux()
    apply_cache(model, CachePlan.taylor(4, len(cache_units(model)), 2))
    run_steps(model, 4)
    remove_cache(model)
