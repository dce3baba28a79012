"""Block replays (dit_cache/families/replays.py): on a step where none of a block's units runs, the block's output
comes from its input and its units' outputs alone. It must be bitwise the block run with every unit hooked, skip
the block's own work (its norms), and step aside for a call it cannot reproduce."""

import pytest
import torch

import dit_cache
from dit_cache import CachePlan, apply_cache, cache_units, remove_cache
from diffusers.models.normalization import RMSNorm

from dit_cache.families import FAMILIES, family_of
from dit_cache.families.record import ModelFamily
from dit_cache.plan import Action
from dit_cache.testing import TINY_FAMILIES, run_steps
from dit_cache.units import replayable_blocks, transformer_blocks

STEPS = 6
WITH_REPLAYS = [family.name for family in FAMILIES if family.replays]


def _plans(num_units: int) -> dict[str, CachePlan]:
    mixed = CachePlan.uniform(STEPS, num_units, 2).actions.clone()
    mixed[3, : num_units // 2] = Action.COMPUTE  # a step where only some blocks can be replayed
    return {"reuse": CachePlan.uniform(STEPS, num_units, 3),
            "forecast": CachePlan.taylor(STEPS, num_units, interval=2),
            "partly computed": CachePlan(mixed)}


def _without_replays(monkeypatch):
    monkeypatch.setattr(ModelFamily, "replay_of", lambda self, block: None)


@pytest.fixture(autouse=True)
def _without_step_folds(monkeypatch):
    """Block by block: a step fold (tests/test_step_fold.py) is exact only to float rounding."""
    monkeypatch.setattr(dit_cache.cache, "step_fold", lambda *args: None)


_NORMS = (torch.nn.LayerNorm, torch.nn.GroupNorm, torch.nn.RMSNorm, RMSNorm)
# Norms a replayed block still runs: these blocks normalise their branches' outputs before the gated adds.
OUTPUT_NORMS = {"lumina2": 2, "z-image": 2}


def _norm_calls(transformer, units) -> dict[int, int]:
    """Counts, per block, the calls of its norms outside its units: a replayed block makes none."""
    calls: dict[int, int] = {}
    unit_paths = [unit.path for unit in units]
    by_path = {f"{a}.{i}": n for n, (a, i) in enumerate(
        (attribute, index) for attribute in family_of(transformer).block_lists
        for index in range(len(getattr(transformer, attribute))))}
    for block_path, number in by_path.items():
        for name, module in transformer.get_submodule(block_path).named_modules():
            path = f"{block_path}.{name}"
            if isinstance(module, _NORMS) and not any(path.startswith(u + ".") or path == u for u in unit_paths):
                calls.setdefault(number, 0)
                module.register_forward_hook(lambda *_, n=number: calls.__setitem__(n, calls[n] + 1))
    return calls


def test_every_record_replays_only_blocks_it_caches():
    assert WITH_REPLAYS, "no family has a block replay"
    for family in FAMILIES:
        assert set(family.replays) <= set(family.branches), family.name


@pytest.mark.parametrize("name", WITH_REPLAYS)
@pytest.mark.parametrize("kind", ["reuse", "forecast", "partly computed"])
def test_replayed_blocks_are_bitwise_the_hooked_blocks_and_skip_their_norms(name, kind, monkeypatch):
    transformer = TINY_FAMILIES[name].model()
    units = cache_units(transformer)
    plan = _plans(len(units))[kind]
    assert len(replayable_blocks(transformer, units)) == len(transformer_blocks(transformer))
    calls = _norm_calls(transformer, units)
    assert calls, "no norm to count"

    apply_cache(transformer, plan)
    replayed = run_steps(transformer, STEPS)
    remove_cache(transformer)
    replayed_norms = dict(calls)

    calls.update(dict.fromkeys(calls, 0))
    with monkeypatch.context() as patch:
        _without_replays(patch)
        apply_cache(transformer, plan)
        hooked = run_steps(transformer, STEPS)
        remove_cache(transformer)
    assert all(torch.equal(a, b) for a, b in zip(replayed, hooked))
    # A block runs its norms on every step it is not replayed, and it is replayed where none of its units computes.
    members: dict[int, list[int]] = {}
    for unit in units:
        members.setdefault(unit.block, []).append(unit.index)
    for block, count in calls.items():
        computed_steps = sum(step == 0 or any(int(plan.actions[step, u]) == Action.COMPUTE for u in members[block])
                             for step in range(STEPS))
        replayed_steps = STEPS - computed_steps
        assert count % STEPS == 0, block
        assert replayed_norms[block] == count // STEPS * computed_steps + OUTPUT_NORMS.get(name, 0) * replayed_steps, block
    assert sum(replayed_norms.values()) < sum(calls.values())


@pytest.mark.parametrize("name", WITH_REPLAYS)
def test_a_call_the_replay_cannot_reproduce_runs_the_block(name, monkeypatch):
    transformer = TINY_FAMILIES[name].model()
    plan = CachePlan.uniform(STEPS, len(cache_units(transformer)), 2)
    apply_cache(transformer, plan)
    expected = run_steps(transformer, STEPS)
    remove_cache(transformer)

    declined = []

    def decline(self, block):
        return lambda *args: declined.append(type(block).__name__) or NotImplemented

    monkeypatch.setattr(ModelFamily, "replay_of", decline)
    apply_cache(transformer, plan)
    assert all(torch.equal(a, b) for a, b in zip(expected, run_steps(transformer, STEPS)))
    remove_cache(transformer)
    assert declined  # the replays were asked, and their refusal fell back to the hooked block


def test_gligen_calls_are_not_replayed():
    from dit_cache.families.replays import basic_transformer_block

    block = TINY_FAMILIES["pixart"].model().transformer_blocks[0]
    gligen = dict(cross_attention_kwargs={"gligen": {"objs": None}})
    assert basic_transformer_block(block, [], (torch.zeros(1, 4, 16),), gligen) is NotImplemented


def test_a_block_with_a_norm_type_it_does_not_know_is_not_replayed():
    from dit_cache.families.replays import basic_transformer_block

    block = TINY_FAMILIES["pixart"].model().transformer_blocks[0]
    block.norm_type = "some_future_norm"
    assert basic_transformer_block(block, [], (torch.zeros(1, 4, 16),), {}) is NotImplemented


def test_z_image_calls_with_per_token_modulation_are_not_replayed():
    from dit_cache.families.replays import z_image_block

    block = next(b for b in TINY_FAMILIES["z-image"].model().layers if b.modulation)
    x = torch.zeros(1, 4, 32)  # refused before any arithmetic
    noise_mask = torch.ones(1, 4, dtype=torch.long)
    assert z_image_block(block, [x, x], (x, None, None, None, noise_mask), {}) is NotImplemented


def test_wan_replay_with_a_per_token_timestep_embedding_is_the_block():
    """Wan 2.2 TI2V-5B hands its blocks a per-token embedding [batch, tokens, 6, dim]: the replay of a block is
    the block run with its units returning the same outputs."""
    from dit_cache.families.replays import wan_block

    transformer = TINY_FAMILIES["wan"].model()
    block = transformer.blocks[0]
    seen = {}
    block.register_forward_pre_hook(lambda module, args, kwargs: seen.update(args=args, kwargs=kwargs),
                                    with_kwargs=True)
    run_steps(transformer, 1)
    hidden_states, encoder_hidden_states, temb, rotary = seen["args"]
    temb = temb[:, None].expand(-1, hidden_states.shape[1], -1, -1) * torch.rand(1, hidden_states.shape[1], 1, 1)
    outputs = [torch.randn_like(hidden_states) for _ in range(3)]
    for unit, output in zip((block.attn1, block.attn2, block.ffn), outputs):
        unit.forward = lambda *args, output=output, **kwargs: output
    args = (hidden_states, encoder_hidden_states, temb, rotary)
    with torch.no_grad():
        assert torch.equal(wan_block(block, outputs, args, {}), block(*args))


def test_a_block_someone_else_hooks_runs_its_forward():
    """diffusers' context parallelism splits and gathers the sequence with hooks on blocks: a replay would skip
    them, so a step where any block carries another hook runs every block's forward."""
    from diffusers.hooks import HookRegistry, ModelHook

    transformer = TINY_FAMILIES["pixart"].model()
    units = cache_units(transformer)
    calls = _norm_calls(transformer, units)
    apply_cache(transformer, CachePlan.uniform(STEPS, len(units), 2))
    HookRegistry.check_if_exists_or_initialize(transformer.transformer_blocks[-1]).register_hook(ModelHook(), "other")
    run_steps(transformer, STEPS)
    every_step = dict(calls)  # every block ran its norms on every step
    transformer.transformer_blocks[-1]._diffusers_hook.remove_hook("other", recurse=False)
    calls.update(dict.fromkeys(calls, 0))
    run_steps(transformer, STEPS)
    assert all(count > 0 and 2 * calls[block] == count for block, count in every_step.items())  # replayed half
    remove_cache(transformer)
