"""Refinement of the searched plans at single budgets (``search.refine_from``) and the router's refined plans."""

import copy
import math

import pytest
import torch

from dit_cache import Action, CachePlan, CacheRouter
from dit_cache.training.plan_search import SearchSettings
from test_plan_search import SyntheticRunner, _search

C, R, F = int(Action.COMPUTE), int(Action.REUSE), int(Action.FORECAST1)


class GapRunner(SyntheticRunner):
    """A 'final latent' whose error grows with the square of each run of cached steps (later runs a little
    more): where a step is cached matters, not only how many are, so a greedy order is not optimal."""

    def _final(self, plan):
        self.runs += 1
        cached = (plan.actions != Action.COMPUTE).any(dim=1).tolist()
        total, run = 0.0, 0
        for step, is_cached in enumerate(cached + [False]):
            if is_cached:
                run += 1
            else:
                total, run = total + run ** 2 * (1 + 0.1 * step), 0
        return torch.tensor([math.sqrt(total)])


def _searched(refine_from=0.6, steps=10, **settings):
    search = _search(torch.ones(steps, 3), groups="step", max_flops=0.8, actions=["REUSE"],
                     refine_from=refine_from, refine_radius=2, **settings)
    runner = GapRunner(torch.ones(steps, 3))
    outcomes = []
    while not search.done:
        outcomes.append(search.move(runner))
    return search, runner, outcomes


def _error(runner, plan):
    return runner.error(runner.final_latents(plan), torch.zeros(1))


def test_refinement_improves_the_coarse_plans_and_keeps_their_share():
    search, runner, outcomes = _searched()
    refined = [o for o in outcomes if "refined" in o]
    assert [round(o["refined"], 6) for o in refined] == [0.8, 0.7, 0.6]  # coarsest first, from refine_from up
    assert all(o["error"] <= o["error_before"] for o in refined)
    assert all(o["error"] < o["error_before"] for o in refined)  # the gap cost makes every greedy plan improvable
    router = search.router()
    nested = CacheRouter(router.num_steps, router.num_units, cheap_actions=router.cheap_actions,
                         unit_flops=router.unit_flops, metadata=router.metadata)
    nested.logits.data.copy_(router.logits.data)
    for outcome in refined:
        plan, greedy = router.plan(flops=outcome["refined"]), nested.plan(flops=outcome["refined"])
        assert plan.cached_share(router.unit_flops) == pytest.approx(outcome["refined"])
        assert plan != greedy
        assert _error(runner, plan) == pytest.approx(outcome["error"])
        assert _error(runner, greedy) == pytest.approx(outcome["error_before"])
    # below refine_from the router's plans are the nested ones
    assert router.plan(flops=0.5) == nested.plan(flops=0.5)


def test_refined_plans_round_trip_through_a_router_file(tmp_path):
    router = _searched()[0].router()
    router.save(tmp_path / "router.safetensors")
    loaded = CacheRouter.load(tmp_path / "router.safetensors")
    assert torch.equal(loaded.refined_plans, router.refined_plans)
    for share in (0.3, 0.5, 0.6, 0.7, 0.8):
        assert loaded.plan(flops=share) == router.plan(flops=share)


def test_refinement_resumes_from_a_state_dict():
    straight = _searched()[0]
    first = _search(torch.ones(10, 3), groups="step", max_flops=0.8, actions=["REUSE"], refine_from=0.6,
                    refine_radius=2)
    runner = GapRunner(torch.ones(10, 3))
    while not first.ordered:
        first.move(runner)
    first.move(runner)  # one budget refined, then "killed"
    resumed = _search(torch.ones(10, 3), groups="step", max_flops=0.8, actions=["REUSE"], refine_from=0.6,
                      refine_radius=2)
    resumed.load_state_dict(first.state_dict())
    while not resumed.done:
        resumed.move(runner)
    assert torch.equal(resumed.refined, straight.refined)


def test_without_refine_from_nothing_is_refined():
    search, _, outcomes = _searched(refine_from=None)
    assert not any("refined" in o for o in outcomes)
    assert search.router().refined_plans is None


@pytest.mark.parametrize("settings, message", [({"refine_from": 0.9}, "refine_from"),
                                               ({"refine_from": 0.0}, "refine_from"),
                                               ({"refine_radius": 0}, "refine_radius"),
                                               ({"refine_moves": 0}, "refine_moves"),
                                               ({"validation_prompts": -1}, "validation_prompts")])
def test_bad_refinement_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SearchSettings(max_flops=0.8, **settings)


def test_bad_refined_plans_are_refused():
    cheap = torch.full((4, 3), R, dtype=torch.int8)
    flops = torch.ones(3)
    with pytest.raises(ValueError, match=r"shape \(K, 4, 3\)"):
        CacheRouter(4, 3, cheap_actions=cheap, unit_flops=flops, refined_plans=torch.ones(4, 3, dtype=torch.int8))
    with pytest.raises(ValueError, match="need the router's unit_flops and cheap_actions"):
        CacheRouter(4, 3, refined_plans=torch.ones(1, 4, 3, dtype=torch.int8))
    forecast_too_early = torch.full((1, 4, 3), C, dtype=torch.int8)
    forecast_too_early[0, 1] = F  # one computed output before it: a FORECAST1 needs two
    with pytest.raises(ValueError):
        CacheRouter(4, 3, cheap_actions=cheap, unit_flops=flops, refined_plans=forecast_too_early)
    assert CacheRouter(4, 3, cheap_actions=cheap, unit_flops=flops,
                       refined_plans=CachePlan.uniform(4, 3, 2).actions[None]).refined_plans is not None


class ShiftAverse(GapRunner):
    """A validation batch on which every plan but the greedy one's errs more: its error is the number of steps
    computed where the plan being refined started does not compute."""

    def __init__(self, cost, start_codes):
        super().__init__(cost)
        self.start = start_codes

    def _final(self, plan):
        computed = (plan.actions == Action.COMPUTE).all(dim=1)
        return torch.tensor([float((computed & ~self.start).sum())])


def test_a_validation_batch_stops_changes_it_does_not_confirm():
    agreeing = _search(torch.ones(10, 3), groups="step", max_flops=0.8, actions=["REUSE"], refine_from=0.8,
                       refine_radius=2)
    runner = GapRunner(torch.ones(10, 3))
    while not agreeing.ordered:
        agreeing.move(runner)
    start = (agreeing.plan(group_codes=agreeing.group_codes(removed=8)).actions == Action.COMPUTE).all(dim=1)
    confirmed = agreeing.move(runner, GapRunner(torch.ones(10, 3)))  # the same error on validation: confirmed
    assert confirmed["changes"] > 0 and confirmed["error"] < confirmed["error_before"]

    refused = _search(torch.ones(10, 3), groups="step", max_flops=0.8, actions=["REUSE"], refine_from=0.8,
                      refine_radius=2)
    while not refused.ordered:
        refused.move(runner)
    outcome = refused.move(runner, ShiftAverse(torch.ones(10, 3), start))
    assert outcome["changes"] == 0 and outcome["error"] == outcome["error_before"]
    assert torch.equal(refused.refined[8], refused.group_codes(removed=8))


def test_a_search_adopting_a_routers_order_only_refines_the_budgets_it_left_unrefined():
    coarse, _, _ = _searched(refine_from=0.8)  # the order, and its 80% plan refined
    earlier = coarse.router()
    search = _search(torch.ones(10, 3), groups="step", max_flops=0.8, actions=["REUSE"], refine_from=0.6,
                     refine_radius=2)
    search.adopt(earlier)
    assert torch.equal(search.rank, coarse.rank) and torch.equal(search.action, coarse.action)
    assert search.ordered and not search.done
    runner = GapRunner(torch.ones(10, 3))
    outcomes = []
    while not search.done:
        outcomes.append(search.move(runner))
    assert [round(o["refined"], 6) for o in outcomes] == [0.7, 0.6]  # 80% came refined with the order
    router = search.router()
    assert torch.equal(router.logits, earlier.logits) and torch.equal(router.cheap_actions, earlier.cheap_actions)
    assert router.plan(flops=0.8) == earlier.plan(flops=0.8)
    assert router.plan(flops=0.7) != earlier.plan(flops=0.7)
    assert _error(runner, router.plan(flops=0.7)) < _error(runner, earlier.plan(flops=0.7))


def test_refine_adopted_refines_the_adopted_plans_again_from_where_they_ended():
    coarse, runner, _ = _searched(refine_from=0.8, refine_moves=1, steps=16)  # one change: improvable still
    earlier = coarse.router()
    search = _search(torch.ones(16, 3), groups="step", max_flops=0.8, actions=["REUSE"], refine_from=0.8,
                     refine_radius=2, order_from="earlier.safetensors", refine_adopted=True)
    search.adopt(earlier)
    assert not search.done  # the adopted 80% plan is to refine again
    outcome = search.move(runner)
    share = outcome["refined"]
    assert share >= 0.8 and search.done
    adopted = earlier.plan(skip_flops=share)
    assert outcome["error_before"] == pytest.approx(_error(runner, adopted))  # it started from the adopted plan,
    nested = copy.deepcopy(earlier)
    nested.refined_plans = None
    assert outcome["error_before"] < _error(runner, nested.plan(skip_flops=share))
    assert outcome["error"] < outcome["error_before"]  # not from the nested one, and went on improving it
    assert _error(runner, search.router().plan(skip_flops=share)) == pytest.approx(outcome["error"])


def test_refine_adopted_needs_order_from_and_refine_from():
    with pytest.raises(ValueError, match="refine_adopted"):
        SearchSettings(refine_adopted=True, refine_from=0.6)
    with pytest.raises(ValueError, match="refine_adopted"):
        SearchSettings(refine_adopted=True, order_from="router.safetensors")


def test_refine_together_moves_two_computed_steps_in_one_change():
    """Under the gap cost, closing a gap without opening another takes two single moves; one pair move does it."""
    errors = {}
    for together in (1, 2):
        _, _, outcomes = _searched(refine_moves=1, steps=14, refine_together=together)
        errors[together] = {round(o["refined"], 3): o["error"] for o in outcomes if "refined" in o}
    assert errors[2][0.786] < errors[1][0.786]
    assert all(errors[2][share] <= errors[1][share] for share in errors[1])


def test_pair_moves_keep_the_share_and_move_two_computed_entries():
    search, _, _ = _searched(refine_from=None, refine_together=2)
    codes = search.group_codes(removed=6)
    share = search.plan(group_codes=codes).cached_share(search.unit_flops)
    computed = codes[:, 0] == C
    pairs = 0
    for start, neighbour in search._neighbours(codes):
        assert search.plan(group_codes=neighbour).cached_share(search.unit_flops) == pytest.approx(share)
        moved = int((computed & (neighbour[:, 0] != C)).sum())
        assert moved in (0, 1, 2) and int((neighbour[:, 0] == C).sum()) == int(computed.sum())
        assert start == int((neighbour != codes).any(dim=1).nonzero().min())  # the run restarts at the first change
        pairs += moved == 2
    assert pairs > 0


def test_refine_together_must_be_1_or_2():
    with pytest.raises(ValueError, match="refine_together must be 1 or 2"):
        SearchSettings(refine_together=3)


def _base_and_refined_again():
    """A router refined at 80%, and a search of its order that refined 70% and 60% too."""
    coarse, runner, _ = _searched(refine_from=0.8)
    base = coarse.router()
    search = _search(torch.ones(10, 3), groups="step", max_flops=0.8, actions=["REUSE"], refine_from=0.6,
                     refine_radius=2)
    search.adopt(base)
    while not search.done:
        search.move(runner)
    return base, search.router(), runner


def test_with_refined_plans_takes_the_named_budgets_and_keeps_the_rest(tmp_path):
    base, source, runner = _base_and_refined_again()
    merged = base.with_refined_plans(source, [0.7])
    assert merged.plan(skip_flops=0.7) == source.plan(skip_flops=0.7) != base.plan(skip_flops=0.7)
    assert merged.plan(skip_flops=0.6) == base.plan(skip_flops=0.6) != source.plan(skip_flops=0.6)
    assert merged.plan(skip_flops=0.8) == base.plan(skip_flops=0.8)
    assert [e[0] for e in merged.metadata["refined_errors"]] == pytest.approx([0.7, 0.8])
    assert merged.metadata["refined_plans_from"][0]["shares"] == [0.7]
    merged.save(tmp_path / "merged.safetensors")
    loaded = CacheRouter.load(tmp_path / "merged.safetensors")
    assert all(loaded.plan(skip_flops=f) == merged.plan(skip_flops=f) for f in (0.5, 0.6, 0.7, 0.8))
    assert base.refined_plans.shape[0] == 1  # the original is left as it was


def test_with_refined_plans_refuses_another_order_or_a_budget_the_source_did_not_refine():
    base, source, _ = _base_and_refined_again()
    with pytest.raises(ValueError, match="no refined plan at 0.5 of the FLOPs skipped; it has them at"):
        base.with_refined_plans(source, [0.5])
    other = copy.deepcopy(source)
    with torch.no_grad():
        other.logits[3] = -other.logits[3]
    with pytest.raises(ValueError, match="search.order_from"):
        base.with_refined_plans(other, [0.7])


def test_adopting_a_router_of_another_model_is_refused():
    earlier, _, _ = _searched(refine_from=0.8)
    search = _search(torch.ones(12, 3), groups="step", max_flops=0.8, actions=["REUSE"], refine_from=0.6)
    before = search.state_dict()
    with pytest.raises(ValueError, match="searched router of this model: 10 steps"):
        search.adopt(earlier.router())
    assert all(torch.equal(before[key], value, ) if not value.is_floating_point() else
               torch.equal(before[key].nan_to_num(), value.nan_to_num()) for key, value in search.state_dict().items())
