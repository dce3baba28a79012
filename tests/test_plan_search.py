"""The search objective: routers that serve a range of FLOP budgets, nested plans with cheap actions, the greedy
search on a synthetic error, and the Lightning run (export, resume) on a tiny random PixArt."""

import json
import math
from pathlib import Path

import pytest
import torch

from dit_cache import Action, CachePlan, CacheRouter, embedded_router_path
from dit_cache.router import plan_with_fallbacks
from dit_cache.testing import tiny_pixart_pipeline
from conftest import KillAt, train_cli
from dit_cache.training.plan_search import GreedyPlanSearch, SearchSettings, unit_groups
from dit_cache.training.trajectory_snapshots import TrajectorySnapshots
from dit_cache.units import CacheUnit

F, R, C = int(Action.FORECAST1), int(Action.REUSE), int(Action.COMPUTE)
BRANCHES = ("attn1", "attn2", "ff")


def _units(blocks=2):
    return [CacheUnit(index=3 * b + i, block=b, branch=name, path=f"transformer_blocks.{b}.{name}")
            for b in range(blocks) for i, name in enumerate(BRANCHES)]


class SyntheticRunner:
    """Stands in for sampling: the 'final latent' error of a plan is the sum of fixed costs of its cached
    entries (unit-level), so the best move per FLOP is known."""

    def __init__(self, cost):
        self.cost = cost  # [steps, units]
        self.runs = 0

    @staticmethod
    def error(final, reference):
        return float((final.double() - reference.double()).pow(2).mean())

    def _final(self, plan):
        self.runs += 1
        cached = (plan.actions != Action.COMPUTE).double()
        forecast_bonus = 1 - 0.5 * (plan.actions == Action.FORECAST1).double()  # forecasts err less here
        return torch.tensor([math.sqrt(float((cached * forecast_bonus * self.cost).sum()))])

    def final_latents(self, plan, start=0, snapshots=None):
        if plan.num_units == len(self.cost[0]) and plan.actions.sum() == C * plan.actions.numel():
            return torch.zeros(1)
        return self._final(plan)

    def recorded(self, plan, snapshots=None, start=0):
        return self.final_latents(plan), snapshots or TrajectorySnapshots([])


def _search(cost, **settings):
    steps, units = cost.shape
    search = GreedyPlanSearch(SearchSettings(**settings), _units(units // 3), torch.ones(units), steps)
    return search


def _run(search, runner, moves=100):
    outcomes = []
    for _ in range(moves):
        outcome = search.move(runner)
        if not outcome.get("moved"):
            break
        outcomes.append(outcome)
    return outcomes


# ---- routers with cheap actions and a budget range ---------------------------------------------------------
def _budget_router(num_steps=10, num_units=6):
    cost = torch.rand(num_steps, num_units, generator=torch.Generator().manual_seed(0))
    search = _search(cost, max_flops=0.8, lazy_candidates=2)
    _run(search, SyntheticRunner(cost))
    return search.router()


def test_old_router_files_load_and_give_the_same_plan_as_before(tmp_path):
    from dit_cache.embedded import ASSETS

    kept = ASSETS / "embedded_router_harmonica.safetensors"  # once the searched router is shipped
    old = CacheRouter.load(kept if kept.exists() else embedded_router_path())
    assert old.cheap_actions is None and old.flops_range is None
    assert old.plan() == CachePlan.from_schedule(old.schedule())
    assert old.plan(0.3) == CachePlan.from_schedule(old.schedule(0.3))
    router = CacheRouter(6, 4, generator=torch.Generator().manual_seed(1))
    router.save(tmp_path / "r.safetensors")
    loaded = CacheRouter.load(tmp_path / "r.safetensors")
    assert loaded.plan() == CachePlan.from_schedule(router.schedule())
    with pytest.raises(ValueError, match="serves one budget"):
        loaded.plan(flops=0.5)


@pytest.mark.parametrize("request_share", [0.1, 0.25, 0.4, 0.55, 0.7])
def test_a_budget_in_range_gives_a_plan_within_two_points(request_share, tmp_path):
    router = _budget_router(20, 24)
    router.save(tmp_path / "r.safetensors")
    router = CacheRouter.load(tmp_path / "r.safetensors")
    low, high = router.flops_range
    assert low == 0.0 and high >= 0.79
    plan = router.plan(flops=request_share)
    assert abs(plan.cached_share(router.unit_flops) - request_share) <= 0.02
    assert plan.uses(Action.FORECAST1)  # cheap actions other than REUSE survive the file


def test_plans_are_nested_across_budgets():
    router = _budget_router()
    cheaper = router.plan(flops=0.6).actions != Action.COMPUTE
    dearer = router.plan(flops=0.3).actions != Action.COMPUTE
    assert bool((cheaper | ~dearer).all()) and cheaper.sum() > dearer.sum()


@pytest.mark.parametrize("bad", [0.95, -0.1, float("nan"), "lots"])
def test_out_of_range_budgets_are_refused(bad):
    router = _budget_router()
    with pytest.raises(ValueError, match="flops"):
        router.plan(flops=bad)


def test_threshold_and_flops_together_are_refused():
    with pytest.raises(ValueError, match="not both"):
        _budget_router().plan(0.5, flops=0.4)


def test_forecasts_without_history_fall_back_to_reuse():
    codes = torch.tensor([[C, C], [F, C], [F, F], [int(Action.FORECAST2), F]])
    plan = plan_with_fallbacks(codes)
    assert plan.actions.tolist() == [[C, C], [R, C], [R, F], [R, F]]


def test_bad_cheap_actions_are_refused():
    with pytest.raises(ValueError, match="cheap_actions"):
        CacheRouter(3, 2, cheap_actions=torch.full((3, 2), C))
    with pytest.raises(ValueError, match="shape"):
        CacheRouter(3, 2, cheap_actions=torch.full((2, 2), R))


# ---- the greedy search -----------------------------------------------------------------------------------------
def test_groups_are_branch_types_across_blocks_or_whole_steps():
    assert unit_groups(_units(2), "branch") == [[0, 3], [1, 4], [2, 5]]
    assert unit_groups(_units(2), "step") == [[0, 1, 2, 3, 4, 5]]


def test_the_search_removes_the_worst_entry_last_and_each_move_is_the_cheapest():
    cost = torch.full((5, 3), 1.0)
    cost[3, 2] = 50.0  # the obviously worst entry: ff at step 3
    search = _search(cost, max_flops=0.99, whole_steps=False, actions=["REUSE"], lazy_candidates=20)
    outcomes = _run(search, SyntheticRunner(cost))
    assert len(outcomes) == 4 * 3  # every entry after step 0
    assert (outcomes[-1]["step"], outcomes[-1]["move"]) == (3, 2)
    errors = [o["error"] for o in outcomes]
    assert errors == sorted(errors)  # each move adds the least error it could, so the error only grows
    assert search.trace[len(outcomes), 1] == pytest.approx(float(cost[1:].sum()))


def test_the_search_prefers_the_cheaper_action():
    cost = torch.ones(4, 3)
    cost[1] = 100.0  # step 1 stays computed, so steps 2 and 3 have the 2 outputs a forecast needs
    search = _search(cost, max_flops=0.5, whole_steps=False, lazy_candidates=40)
    _run(search, SyntheticRunner(cost))
    assert bool((search.plan().actions[:2] == Action.COMPUTE).all())
    assert bool((search.plan().actions[2:] == Action.FORECAST1).all())


def test_the_search_stops_at_max_flops_and_the_router_replays_its_plans():
    cost = torch.rand(8, 6, generator=torch.Generator().manual_seed(3))
    search = _search(cost, max_flops=0.5)
    runner = SyntheticRunner(cost)
    outcomes = _run(search, runner)
    assert search.done and outcomes[-1]["share"] >= 0.5 and outcomes[-2]["share"] < 0.5
    router = search.router()
    for outcome in outcomes:  # every point of the search is a budget of the router, with the same plan error
        plan = router.plan(flops=outcome["share"])
        assert plan.cached_share(router.unit_flops) == pytest.approx(outcome["share"])
        assert runner.error(runner.final_latents(plan), torch.zeros(1)) == pytest.approx(outcome["error"])


def test_search_state_round_trips_through_a_state_dict():
    cost = torch.rand(8, 6, generator=torch.Generator().manual_seed(4))
    straight = _search(cost, max_flops=0.6)
    _run(straight, SyntheticRunner(cost))
    first = _search(cost, max_flops=0.6)
    _run(first, SyntheticRunner(cost), moves=3)
    resumed = _search(cost, max_flops=0.6)
    resumed.load_state_dict(first.state_dict())
    _run(resumed, SyntheticRunner(cost))
    assert torch.equal(resumed.rank, straight.rank) and torch.equal(resumed.action, straight.action)


@pytest.mark.parametrize("settings, message", [({"groups": "block"}, "groups"), ({"actions": ["LINEAR"]}, "actions"),
                                               ({"max_flops": 1.0}, "max_flops"),
                                               ({"lazy_candidates": 0}, "lazy_candidates"),
                                               ({"error": "psnr"}, "search.error must be one of mse, log_mse"),
                                               ({"error": "log_mse", "error_floor": 0.0}, "error_floor")])
def test_bad_search_settings_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        SearchSettings(**settings)


def test_log_mse_scores_each_image_alike_where_the_batch_mse_follows_the_worst_one():
    reference = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(5))
    one_image_ruined = reference + torch.tensor([1.0, 0.0, 0.0]).view(3, 1, 1, 1)  # per-image MSE 1, 0, 0
    all_images_worse = reference + torch.full((3, 1, 1, 1), 0.2 ** 0.5)  # 0.2 each
    mse, log_mse = SearchSettings(error="mse"), SearchSettings(error="log_mse", error_floor=1e-6)
    assert mse.final_error(all_images_worse, reference) < mse.final_error(one_image_ruined, reference)
    assert log_mse.final_error(one_image_ruined, reference) < log_mse.final_error(all_images_worse, reference)
    per_image = (one_image_ruined - reference).pow(2).flatten(1).mean(1).double()
    assert log_mse.final_error(one_image_ruined, reference) == pytest.approx(
        float(torch.log10(per_image + 1e-6).mean()))
    assert log_mse.final_error(reference, reference) == pytest.approx(-6.0)


# ---- the Lightning run on a tiny model ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def pixart_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "pixart"
    tiny_pixart_pipeline().save_pretrained(folder)
    return str(folder)


def _search_args(model, folder, moves):
    """The shipped search config with the tiny model, run in a folder of its own (router, checkpoints)."""
    config = Path(__file__).parents[1] / "training" / "configs" / "embedded_search.yaml"
    return ["fit", "--config", str(config), "--model.model", model, "--model.num_steps", "5",
            "--model.search.max_flops", "0.6", "--model.search.refine_from", "0.5", "--data.prompts", '["a red circle", "a cat"]',
            "--data.num_trajectories", str(moves), "--trainer.logger", "false", "--trainer.enable_progress_bar",
            "false", "--trainer.enable_model_summary", "false", "--trainer.default_root_dir", str(folder)]


def test_the_search_run_exports_a_router_and_resumes(pixart_folder, tmp_path):
    train_cli(_search_args(pixart_folder, tmp_path / "straight", 40))
    straight = CacheRouter.load(tmp_path / "straight" / "router.safetensors")
    assert straight.metadata["objective"] == "search" and straight.flops_range[1] >= 0.6
    # Killed at the start of move 3 (a checkpoint after every move), then resumed: the same moves as straight.
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_cli(_search_args(pixart_folder, tmp_path / "split", 40)
                  + [f"--trainer.callbacks+={KillAt.__module__}.KillAt", "--trainer.callbacks.batch", "2"])
    checkpoint = torch.load(tmp_path / "split" / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert int(checkpoint["state_dict"]["search.moves"]) == 2
    assert not any(key.startswith("transformer.") for key in checkpoint["state_dict"])
    train_cli(_search_args(pixart_folder, tmp_path / "split", 40)
              + ["--ckpt_path", "last"])  # <run dir>/checkpoints/last.ckpt
    resumed = CacheRouter.load(tmp_path / "split" / "router.safetensors")
    assert torch.equal(resumed.logits, straight.logits)
    assert torch.equal(resumed.cheap_actions, straight.cheap_actions)
    assert resumed.threshold == straight.threshold
    assert json.dumps(resumed.metadata["search_trace"]) == json.dumps(straight.metadata["search_trace"])
    # the shipped config refines its coarse budgets after the order: the refined plans resume too
    assert straight.refined_plans is not None and torch.equal(resumed.refined_plans, straight.refined_plans)


def test_a_search_run_can_refine_an_earlier_routers_order(pixart_folder, tmp_path):
    train_cli(_search_args(pixart_folder, tmp_path / "first", 40))  # refines its 60% plan (5 steps: 20% each)
    first = CacheRouter.load(tmp_path / "first" / "router.safetensors")
    train_cli(_search_args(pixart_folder, tmp_path / "second", 40)
              + ["--model.search.order_from", str(tmp_path / "first" / "router.safetensors"),
                 "--model.search.refine_from", "0.3"])
    second = CacheRouter.load(tmp_path / "second" / "router.safetensors")
    assert torch.equal(second.logits, first.logits) and torch.equal(second.cheap_actions, first.cheap_actions)
    assert second.metadata["search"]["order_from"].endswith("router.safetensors")
    assert len(second.refined_shares) > len(first.refined_shares)  # the 40% plan refined on top
    assert torch.equal(second.refined_plans[-len(first.refined_shares):], first.refined_plans)


def test_the_search_scores_plans_by_mean_log_mse_when_asked(pixart_folder, tmp_path):
    train_cli(_search_args(pixart_folder, tmp_path, 40)
              + ["--model.search.error", "log_mse", "--model.search.error_floor", "1e-5"])
    trace = CacheRouter.load(tmp_path / "router.safetensors").metadata["search_trace"]
    assert trace[0][1] == pytest.approx(-5.0)  # the uncached plan: log10(0 + error_floor) on every image
    assert all(error > -5.0 for _, error in trace[1:])  # every cached plan errs somewhere


# ---- pipelines ---------------------------------------------------------------------------------------------------
def test_accelerate_with_flops_follows_the_routers_plan_for_that_budget():
    from dit_cache import accelerate, cache_units

    pipe = tiny_pixart_pipeline()
    units = len(cache_units(pipe.transformer))
    router = _budget_router(num_steps=6, num_units=units)
    with pytest.raises(ValueError, match="outside the budgets"):
        accelerate(pipe, router=router, flops=0.95)
    assert not hasattr(pipe, "_dit_cache_plan")  # a refused budget leaves the pipeline stock
    with pytest.raises(ValueError, match="pass router="):
        accelerate(pipe, plan=CachePlan.full(6, units), flops=0.5)
    accelerate(pipe, router=router, flops=0.5)
    assert pipe._dit_cache_plan == router.plan(flops=0.5)
    pipe("a red circle", num_inference_steps=6, guidance_scale=2.0, output_type="latent",
         generator=torch.Generator().manual_seed(0))
    assert pipe.cache_stats.forecast + pipe.cache_stats.reused > 0


def test_cli_generate_with_flops_uses_that_budget_and_refuses_conflicts(tmp_path, capsys):
    from dit_cache import cache_units
    from dit_cache.cli import main as generate_main

    pipe = tiny_pixart_pipeline()
    pipe.save_pretrained(tmp_path / "model")
    router = _budget_router(num_steps=6, num_units=len(cache_units(pipe.transformer)))
    router.save(tmp_path / "router.safetensors")
    common = ["generate", "a red circle", "--model", str(tmp_path / "model"), "--router",
              str(tmp_path / "router.safetensors"), "--steps", "6"]
    assert generate_main([*common, "--flops", "0.5", "--out", str(tmp_path / "ok")]) == 0
    record = json.loads(next((tmp_path / "ok").glob("*.json")).read_text())
    assert record["cache_ratio"] == pytest.approx(router.plan(flops=0.5).cache_ratio, abs=1e-4)
    capsys.readouterr()
    assert generate_main([*common, "--flops", "0.5", "--threshold", "0.2", "--out", str(tmp_path / "a")]) == 2
    assert "--threshold conflicts with --skip-flops" in capsys.readouterr().err
    assert generate_main([*common, "--flops", "0.95", "--out", str(tmp_path / "b")]) == 2
    assert "outside the budgets" in capsys.readouterr().err
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()
    with pytest.raises(SystemExit):
        generate_main([*common, "--flops", "1.5"])
