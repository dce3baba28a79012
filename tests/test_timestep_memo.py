"""The timestep embedding kept by value across generations (dit_cache.timestep_memo): bitwise the recomputed model,
and recomputed whenever its weights, its kept output or its inputs may differ."""

import pytest
import torch

from dit_cache import CachePlan, apply_cache, cache_units, remove_cache
from dit_cache.testing import run_steps, tiny_pixart, tiny_sana
from dit_cache.timestep_memo import MAX_KEYED_ELEMENTS, TIMESTEP_MEMO_HOOK, _NotKeyable, value_key

STEPS = 5


def _embedder(transformer):
    return transformer.adaln_single if hasattr(transformer, "adaln_single") else transformer.time_embed


class _Computations:
    """Counts how often the embedder really computes (a forward hook on its last projection, inside it)."""

    def __init__(self, transformer):
        self.calls = 0
        self._handle = _embedder(transformer).linear.register_forward_hook(self._count)

    def _count(self, *_):
        self.calls += 1

    def close(self):
        self._handle.remove()


@pytest.mark.parametrize("build", [tiny_pixart, tiny_sana])
def test_a_second_generation_reuses_every_embedding_and_stays_bitwise(build):
    transformer = build()
    stock = run_steps(transformer, STEPS, seed=3)
    handle = apply_cache(transformer, CachePlan.full(STEPS, len(cache_units(transformer))))
    assert [name for _, name, _ in handle._hooked].count(TIMESTEP_MEMO_HOOK) == 1
    counts = _Computations(transformer)
    first = run_steps(transformer, STEPS, seed=3)
    assert counts.calls == STEPS
    second = run_steps(transformer, STEPS, seed=4)  # other latents and prompt, the same timesteps
    assert counts.calls == STEPS  # nothing computed again
    counts.close()
    assert all(torch.equal(a, b) for a, b in zip(first, stock))
    remove_cache(transformer)
    assert all(torch.equal(a, b) for a, b in zip(second, run_steps(transformer, STEPS, seed=4)))
    assert "_diffusers_hook" not in _embedder(transformer).__dict__


def test_weights_written_since_are_recomputed_bitwise():
    transformer = tiny_pixart()
    apply_cache(transformer, CachePlan.full(STEPS, len(cache_units(transformer))))
    run_steps(transformer, STEPS, seed=3)
    with torch.no_grad():
        _embedder(transformer).linear.weight.mul_(0.5)  # e.g. a training step between two generations
    counts = _Computations(transformer)
    cached = run_steps(transformer, STEPS, seed=3)
    assert counts.calls == STEPS
    counts.close()
    remove_cache(transformer)
    assert all(torch.equal(a, b) for a, b in zip(cached, run_steps(transformer, STEPS, seed=3)))


def test_a_kept_output_written_in_place_or_a_call_with_gradients_computes():
    transformer = tiny_pixart()
    handle = apply_cache(transformer, CachePlan.full(STEPS, len(cache_units(transformer))))
    embedder = _embedder(transformer)
    call = dict(added_cond_kwargs={"resolution": None, "aspect_ratio": None}, batch_size=2,
                hidden_dtype=torch.float32)
    timestep = torch.tensor([900, 900])
    with handle.generation() as states, torch.no_grad():
        states.current().begin_step(timestep)
        first = embedder(timestep, **call)
        assert embedder(timestep, **call) is first  # kept
        first[0].add_(1.0)  # someone writes the kept output
        again = embedder(timestep, **call)
        assert again is not first and torch.equal(again[0], embedder.linear(embedder.silu(again[1])))
    with handle.generation() as states:
        states.current().begin_step(timestep)
        assert embedder(timestep, **call) is not embedder(timestep, **call)  # a graph to train through: not kept
    remove_cache(transformer)


def test_only_small_cpu_values_are_keyed():
    assert value_key((torch.tensor([1, 2]), {"b": None, "a": 2.0})) == value_key((torch.tensor([1, 2]),
                                                                                   {"a": 2.0, "b": None}))
    assert value_key(torch.tensor([1, 2])) != value_key(torch.tensor([1.0, 2.0]))  # dtypes differ
    for unkeyable in (torch.zeros(MAX_KEYED_ELEMENTS + 1), torch.zeros(2, device="meta"),
                      torch.zeros(2, requires_grad=True), object()):
        with pytest.raises(_NotKeyable):
            value_key(unkeyable)
