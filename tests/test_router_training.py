"""Router training (RouterModule, proxies, the CLI, export and resuming) on tiny random pipelines saved locally."""

import json
import math
from types import SimpleNamespace

import lightning as L
import pytest
import torch
from safetensors import safe_open

from dit_cache import CacheRouter, CacheSchedule
from dit_cache.flops import unit_flops
from dit_cache.testing import step_inputs, tiny_dit_pipeline, tiny_pixart_pipeline
from dit_cache.training.callbacks import ExportRouter
from conftest import KillAt, train_cli
from dit_cache.training.data import RouterDataModule, TrajectorySeeds
from dit_cache.training.objectives import update_beta
from dit_cache.training.proxies import cumulative_proxy, image_error_proxy, paper_proxy, sensitivity_proxy
from dit_cache.training.router_module import RouterModule

PROMPTS = ["a red circle", "a blue square and a cat"]
QUIET = ["--trainer.accelerator", "cpu", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
         "--trainer.enable_model_summary", "false"]


@pytest.fixture(scope="module")
def pixart_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "pixart"
    tiny_pixart_pipeline().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="module")
def dit_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("models") / "dit"
    tiny_dit_pipeline().save_pretrained(folder)
    return str(folder)


def _fit(module, model, num_trajectories, callbacks=()):
    data = RouterDataModule(model, prompts=PROMPTS, num_classes=2, batch_size=2, num_trajectories=num_trajectories)
    trainer = L.Trainer(accelerator="cpu", max_epochs=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, callbacks=list(callbacks))
    trainer.fit(module, data)
    return trainer


class RecordTrajectories(L.Callback):
    """Writes, per trajectory, beta and the hard schedule's CUR (and at train start, the resumed state)."""

    def __init__(self, path: str):
        self.path = path

    def _write(self, record):
        with open(self.path, "a") as file:
            file.write(json.dumps(record) + "\n")

    def on_train_start(self, trainer, module):
        self._write({"event": "start", "global_step": trainer.global_step, "log_beta": float(module.log_beta),
                     "cache_ratio": module.router.schedule().cache_ratio,
                     "logits": module.router.logits.detach().tolist()})

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_index):
        self._write({"event": "batch", "batch": batch_index, "seed": int(batch[1]), "global_step": trainer.global_step,
                     "log_beta": float(module.log_beta), "cache_ratio": module.router.schedule().cache_ratio,
                     "step_weights": module.step_weights.tolist()})


def _records(path):
    with open(path) as file:
        return [json.loads(line) for line in file]


def _header(path):
    with safe_open(str(path), framework="pt") as file:
        return {key: json.loads(value) for key, value in file.metadata().items() if key != "format"}


# ---- what is trained ---------------------------------------------------------------------------------------
def test_only_the_router_logits_are_trained(pixart_folder):
    module = RouterModule(pixart_folder, num_steps=6, learning_rate=0.05, proxy_interval=2)
    weights = {name: value.clone() for name, value in module.transformer.state_dict().items()}
    initial_logits = module.router.logits.detach().clone()
    trainer = _fit(module, pixart_folder, num_trajectories=3)
    (optimizer,) = trainer.optimizers
    trained = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(trained) == 1 and trained[0] is module.router.logits
    assert [name for name, p in module.named_parameters() if p.requires_grad] == ["router.logits"]
    assert all(p.grad is None for p in module.transformer.parameters())
    assert module.router.logits.grad is not None
    assert not torch.equal(module.router.logits.detach(), initial_logits)
    assert all(torch.equal(value, weights[name]) for name, value in module.transformer.state_dict().items())
    assert trainer.global_step == 3 * 5  # one optimizer step per trained denoising step


@pytest.mark.parametrize("beta", [1e-12, 1e3], ids=["beta-tiny", "beta-huge"])
def test_beta_sets_the_cache_ratio(pixart_folder, beta):
    # threshold 0.5 starts the router near CUR 1/3, so both directions are visible.
    module = RouterModule(pixart_folder, num_steps=6, beta=beta, learning_rate=0.3, threshold=0.5,
                          objective="sdt")
    initial = module.router.schedule().cache_ratio
    assert 0.15 < initial < 0.6
    _fit(module, pixart_folder, num_trajectories=6)
    final = module.router.schedule().cache_ratio
    if beta < 1:
        assert final < initial
    else:
        assert final == pytest.approx(5 / 6)  # every unit of every step but the first reuses


def test_flops_cost_weights_the_sparsity_term_and_the_target_by_unit_flops(pixart_folder):
    by_units = RouterModule(pixart_folder, num_steps=6, beta=0.5, target_cache_ratio=0.3, beta_rate=0.5)
    by_flops = RouterModule(pixart_folder, num_steps=6, beta=0.5, target_cache_ratio=0.3, beta_rate=0.5,
                            cost="flops")
    flops, _ = unit_flops(by_flops.transformer, **step_inputs(by_flops.transformer, text_tokens=120))
    assert torch.allclose(by_flops.unit_costs.double(), flops / flops.mean(), rtol=1e-6)
    assert by_flops.unit_costs.std() > 0.1  # the units' costs differ, so the two options differ
    scores = by_flops.router.scores()[1].detach()
    assert by_units.sparsity(scores) == pytest.approx(0.5 * float(scores.sum()), rel=1e-6)
    assert by_flops.sparsity(scores) == pytest.approx(0.5 * float((scores * by_flops.unit_costs).sum()), rel=1e-6)
    # Dual ascent steers the FLOP share: cache the most expensive unit at every step but the first.
    for module in (by_units, by_flops):
        with torch.no_grad():
            module.router.logits.fill_(5.0)
            module.router.logits[1:, int(flops.argmax())] = -5.0
    assert by_flops.cached_share() > by_units.cached_share() == pytest.approx(5 / (6 * len(flops)))
    for module in (by_units, by_flops):
        before = float(module.log_beta)
        update_beta(module)
        assert float(module.log_beta) - before == pytest.approx(0.5 * (0.3 - module.cached_share()), rel=1e-5)
    assert "unit_costs" not in by_flops.state_dict()  # derived from the model, so old checkpoints still load
    with pytest.raises(ValueError, match="cost must be"):
        RouterModule(pixart_folder, num_steps=6, cost="seconds")


def test_beta_zero_is_accepted(pixart_folder):
    module = RouterModule(pixart_folder, num_steps=6, beta=0.0)
    assert module.beta == 0.0


def test_an_unknown_objective_or_proxy_is_refused_before_training_naming_the_choices(pixart_folder):
    with pytest.raises(ValueError, match="'sdtt'.*'harmonica', 'l2c', 'sdt', 'search'"):
        RouterModule(pixart_folder, num_steps=6, objective="sdtt")
    with pytest.raises(ValueError, match="'paperz'.*'cumulative', 'paper', 'sensitivity'"):
        RouterModule(pixart_folder, num_steps=6, proxy="paperz")
    assert RouterModule(pixart_folder, num_steps=6, objective="sdt", proxy="paperz").hparams.objective == "sdt"


# ---- batches and callbacks ---------------------------------------------------------------------------------
def test_a_batch_carries_the_conditioning_rows_of_its_prompts(pixart_folder):
    data = RouterDataModule(pixart_folder, prompts=PROMPTS, batch_size=3, num_trajectories=2)
    data.setup()
    encoded = data.conditioning
    trajectories = TrajectorySeeds(num_prompts=len(PROMPTS), batch_size=3, num_trajectories=2, seed=0)
    batches = list(data.train_dataloader())
    assert len(batches) == 2
    for (rows, seed), (indices, expected_seed) in zip(batches, trajectories):
        assert int(seed) == int(expected_seed)
        assert torch.equal(rows["prompt_embeds"], encoded["prompt_embeds"][indices])
        assert torch.equal(rows["prompt_mask"], encoded["prompt_mask"][indices])
        assert torch.equal(rows["negative_embeds"], encoded["negative_embeds"])  # one row every prompt shares
    # The search's calibration batch: the first prompts, repeated when there are fewer.
    calibration = data.calibration_conditioning(3)
    assert torch.equal(calibration["prompt_embeds"], encoded["prompt_embeds"][torch.tensor([0, 1, 0])])


def test_peak_memory_measures_a_training_step_above_an_inference_step_and_leaves_the_router(pixart_folder):
    from dit_cache.training.callbacks import PeakMemory, step_memory

    module = RouterModule(pixart_folder, num_steps=4, objective="sdt")
    data = RouterDataModule(pixart_folder, prompts=PROMPTS, batch_size=2, num_trajectories=1)
    data.setup()
    logits = module.router.logits.detach().clone()
    report = step_memory(module, next(iter(data.train_dataloader())))
    weights = sum(t.numel() * t.element_size() for t in module.transformer.state_dict().values())
    assert weights < report["inference"] < report["train"]  # + the cache; + what autograd saves for backward
    assert torch.equal(module.router.logits, logits) and module.router.logits.grad is None
    trainer = _fit(module, pixart_folder, num_trajectories=1, callbacks=[PeakMemory()])
    for name in ("train", "inference"):  # the CPU estimate depends on the shapes only
        assert float(trainer.callback_metrics[f"memory/{name}_mib"]) == pytest.approx(report[name] / 2**20)


def test_a_search_step_prints_the_summary_the_search_gives(pixart_folder, monkeypatch, capsys):
    from dit_cache.training.plan_search import GreedyPlanSearch, SearchSettings

    monkeypatch.setattr(GreedyPlanSearch, "move", lambda self, runner, validation=None: {"moved": False, "summary": "refined step 2"})
    module = RouterModule(pixart_folder, num_steps=4, objective="search", search=SearchSettings(max_flops=0.5))
    _fit(module, pixart_folder, num_trajectories=2)
    assert capsys.readouterr().out.count("refined step 2") == 2


# ---- image error proxies ------------------------------------------------------------------------------------
def _toy_trajectory():
    """A schedule, and final latents that are a known nonlinear function of the reused (step, unit) weights."""
    steps, units = 5, 3
    mask = torch.ones(steps, units, dtype=torch.bool)
    mask[1, 0] = mask[2, 1] = mask[2, 2] = mask[4, 0] = mask[4, 1] = mask[4, 2] = False  # step 3 computes all
    unit_weights = torch.arange(1.0, 1.0 + steps * units).view(steps, units) / 10
    noise = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(0))
    calls = []

    def reused_sum(mask):
        return float((unit_weights * (~mask).float()).sum())

    def latent(total):  # x0 as a function of the reused weight sum
        return noise * total + noise.pow(2) * total**2

    def final_latents(schedule, conditioning, latent_noise):
        assert isinstance(schedule, CacheSchedule) and conditioning == "cond" and latent_noise is noise
        calls.append(schedule.mask.clone())
        return latent(reused_sum(schedule.mask))

    return CacheSchedule(mask), unit_weights, noise, latent, final_latents, calls


def test_paper_proxy_matches_its_definition():
    schedule, unit_weights, noise, latent, final_latents, calls = _toy_trajectory()
    weights = paper_proxy(schedule, final_latents, "cond", noise)
    reused = unit_weights * (~schedule.mask).float()
    x0 = latent(float(reused.sum()))
    expected = torch.zeros(5)
    for step in range(1, 5):
        # caching disabled at this step only: its reused weights drop out of the sum
        other = latent(float(reused.sum() - reused[step].sum()))
        expected[step] = (x0 - other).pow(2).flatten(1).sum(dim=1).mean()  # ||.||_F^2 per sample, batch mean
    assert torch.allclose(weights, expected, rtol=1e-5)
    assert weights[0] == 0 and weights[3] == 0 and bool((weights[[1, 2, 4]] > 0).all())
    assert len(calls) == 1 + 3  # the router's own run, then one per step that reuses anything
    assert torch.equal(calls[0], schedule.mask)


def test_cumulative_proxy_matches_its_definition():
    schedule, unit_weights, noise, latent, final_latents, calls = _toy_trajectory()
    weights = cumulative_proxy(schedule, final_latents, "cond", noise)
    reused = unit_weights * (~schedule.mask).float()
    expected = torch.zeros(5)
    for step in range(1, 5):
        # the router enabled for steps 1..step, versus 1..step-1 (noisiest steps first); element-wise mean
        before, after = latent(float(reused[:step].sum())), latent(float(reused[: step + 1].sum()))
        expected[step] = (after - before).pow(2).mean()
    assert torch.allclose(weights, expected, rtol=1e-5)
    assert weights[0] == 0 and weights[3] == 0 and bool((weights[[1, 2, 4]] > 0).all())
    assert torch.equal(calls[0], torch.ones(5, 3, dtype=torch.bool)) and torch.equal(calls[-1], schedule.mask)
    # The variants differ: with a nonlinear x0 the cumulative weights are not a rescaling of the paper ones.
    paper = paper_proxy(schedule, final_latents, "cond", noise)
    ratios = weights[[1, 2, 4]] / paper[[1, 2, 4]]
    assert not torch.allclose(ratios, ratios[0].expand(3), rtol=1e-3)


def test_sensitivity_proxy_matches_its_definition():
    schedule, unit_weights, noise, latent, final_latents, calls = _toy_trajectory()
    weights = sensitivity_proxy(schedule, final_latents, "cond", noise)
    reused = unit_weights * (~schedule.mask).float()
    expected = torch.zeros(5)
    for step in range(1, 5):
        # step t fully computed (its reused weights drop out) versus fully cached (all of its units reused)
        others = float(reused.sum() - reused[step].sum())
        computed, cached = latent(others), latent(others + float(unit_weights[step].sum()))
        expected[step] = (computed - cached).pow(2).flatten(1).sum(dim=1).mean()
    assert torch.allclose(weights, expected, rtol=1e-5)
    # Rows that are all-compute (3) or all-cache (4) reuse the router's own run: 1 + 2 + 2 + 1 + 1 runs.
    assert len(calls) == 1 + 6
    # Unlike the paper proxy, a step the router computes in full (step 3) still gets its weight.
    assert bool((weights[1:] > 0).all()) and paper_proxy(schedule, final_latents, "cond", noise)[3] == 0


@pytest.mark.parametrize("kind", ["paper", "cumulative", "sensitivity"])
def test_image_error_proxy_floors_small_weights(kind):
    schedule, unit_weights, noise, latent, final_latents, calls = _toy_trajectory()
    raw = {"paper": paper_proxy, "cumulative": cumulative_proxy,
           "sensitivity": sensitivity_proxy}[kind](schedule, final_latents, "cond", noise)
    floor = 1.5 * float(raw[1:].min() / raw[1:].mean())  # puts the smallest weight below the floor
    floored = image_error_proxy(kind, schedule, final_latents, "cond", noise, floor=floor)
    lowest = floor * float(raw[1:].mean()) + 1e-12
    assert floored[0] == 0
    assert bool((floored[1:] >= lowest * (1 - 1e-6)).all())
    small = raw[1:] < lowest
    assert bool(small.any()) and bool((~small).any())  # the toy has weights on both sides of the floor
    assert torch.allclose(floored[1:][small], torch.tensor(lowest).expand(int(small.sum())))
    assert torch.equal(floored[1:][~small], raw[1:][~small])


@pytest.mark.parametrize("average", [False, True])
def test_step_weights_follow_the_latest_proxy_or_the_mean_of_all(pixart_folder, monkeypatch, average):
    # Alternating proxies, as the real ones do when the router flips between caching early and late steps.
    proxies = [torch.tensor([0.0, 4.0, 1.0, 1.0]), torch.tensor([0.0, 1.0, 1.0, 10.0]),
               torch.tensor([0.0, 2.0, 2.0, 2.0])]
    served = iter(proxies)
    monkeypatch.setattr("dit_cache.training.objectives.image_error_proxy", lambda *args: next(served))
    module = RouterModule(pixart_folder, num_steps=4, proxy_interval=1, proxy_average=average)
    _fit(module, pixart_folder, num_trajectories=3)
    normalized = [w / w[1:].mean() for w in proxies]
    expected = torch.stack(normalized).mean(0) if average else normalized[-1]
    assert int(module.proxy_refreshes) == 3
    assert torch.allclose(module.step_weights, expected)


def test_image_error_proxy_rejects_an_unknown_kind():
    schedule, unit_weights, noise, latent, final_latents, calls = _toy_trajectory()
    with pytest.raises(ValueError, match="'paperz'.*cumulative.*paper.*sensitivity"):
        image_error_proxy("paperz", schedule, final_latents, "cond", noise)
    assert not calls


def _export(module, path):
    ExportRouter(str(path)).on_fit_end(SimpleNamespace(is_global_zero=True), module)
    return CacheRouter.load(path)


def test_export_checks_a_flops_target_against_the_flop_share_not_the_unit_count(pixart_folder, tmp_path):
    module = RouterModule(pixart_folder, num_steps=6, cost="flops", target_cache_ratio=0.5)
    costs = module.unit_costs
    with torch.no_grad():  # cache the most expensive unit after the first step: its FLOP share exceeds its CUR
        module.router.logits.fill_(5.0)
        module.router.logits[1:, int(costs.argmax())] = -5.0
    reached, cur = module.cached_share(), module.router.schedule().cache_ratio
    assert reached - cur > 0.05
    module.hparams.target_cache_ratio = reached  # dual ascent landed on the target exactly
    router = _export(module, tmp_path / "landed.safetensors")
    assert router.threshold == 0.1 and "calibrated_from_threshold" not in router.metadata
    assert router.metadata["cached_share_at_training_threshold"] == pytest.approx(reached)
    assert router.metadata["cache_ratio_at_training_threshold"] == pytest.approx(cur)


def test_export_calibrates_a_missed_flops_target_in_flops(pixart_folder, tmp_path):
    module = RouterModule(pixart_folder, num_steps=6, cost="flops", target_cache_ratio=0.5)
    with torch.no_grad():
        module.router.logits.copy_(torch.randn(module.router.logits.shape, generator=torch.Generator().manual_seed(0)))
        # The expensive units score lowest, so a threshold calibrated on the unit count skips too many FLOPs.
        module.router.logits[:, module.unit_costs > module.unit_costs.mean()] -= 3.0
        module.router.logits[0] = 5.0
    router = _export(module, tmp_path / "calibrated.safetensors")
    assert router.metadata["calibrated_from_threshold"] == 0.1 and router.threshold != 0.1
    # As close as one unit allows, in FLOPs: no single unit weighs more than the largest cost's share.
    largest = float(module.unit_costs.max() / module.unit_costs.sum()) / 6
    assert abs(router.schedule().cached_share(module.unit_costs) - 0.5) <= largest


# ---- the CLI: target CUR, export metadata, L2C, resuming --------------------------------------------------
TARGET, BETA, BETA_RATE = 0.4, 1e-4, 0.5


@pytest.fixture(scope="module")
def target_run(pixart_folder, tmp_path_factory):
    folder = tmp_path_factory.mktemp("target")
    train_cli(["fit", "--model.model", pixart_folder, "--model.num_steps", "10",
               "--model.target_cache_ratio", str(TARGET), "--model.beta", str(BETA),
               "--model.beta_rate", str(BETA_RATE), "--model.learning_rate", "0.2",
               "--model.proxy_interval", "10", "--data.batch_size", "2",
               "--data.num_trajectories", "40", "--data.prompts", json.dumps(PROMPTS), "--trainer.max_epochs", "1",
               "--trainer.enable_checkpointing", "false", "--trainer.default_root_dir", str(folder / "run"), *QUIET,
               "--trainer.callbacks+=dit_cache.training.callbacks.ExportRouter",
               "--trainer.callbacks.path", str(folder / "router.safetensors"),
               f"--trainer.callbacks+={__name__}.RecordTrajectories",
               "--trainer.callbacks.path", str(folder / "log.jsonl")])
    return folder


def test_target_cache_ratio_is_reached(target_run):
    router = CacheRouter.load(target_run / "router.safetensors")
    assert abs(router.schedule().cache_ratio - TARGET) <= 0.02
    metadata = router.metadata
    # Either dual ascent landed within the tolerance at the training threshold, or the export calibrated.
    reached = metadata["cache_ratio_at_training_threshold"]
    if "calibrated_from_threshold" in metadata:
        assert metadata["calibrated_from_threshold"] == 0.1 and abs(reached - TARGET) > 0.02
        assert router.threshold != 0.1
    else:
        assert router.threshold == 0.1 and abs(reached - TARGET) <= 0.02


def test_export_records_the_proxy_weights_of_the_last_refresh(target_run):
    router = CacheRouter.load(target_run / "router.safetensors")
    batches = [r for r in _records(target_run / "log.jsonl") if r["event"] == "batch"]
    refreshed = [r["step_weights"] for r in batches]
    assert refreshed[0] != refreshed[-1]  # the proxy was refreshed during the run (every 10 trajectories)
    assert router.metadata["proxy_weights"] == pytest.approx(refreshed[-1])


def test_dual_ascent_moves_beta_toward_the_target(target_run):
    records = _records(target_run / "log.jsonl")
    start, batches = records[0], records[1:]
    assert start["event"] == "start" and start["log_beta"] == pytest.approx(math.log(BETA))
    assert start["cache_ratio"] < TARGET and len(batches) == 40
    previous = start["log_beta"]
    for record in batches:  # log(beta) += beta_rate * (target - CUR), once per trajectory
        assert record["log_beta"] - previous == pytest.approx(BETA_RATE * (TARGET - record["cache_ratio"]), abs=1e-5)
        previous = record["log_beta"]
    assert batches[0]["log_beta"] > start["log_beta"]  # below the target: beta grows
    assert any(r["cache_ratio"] > TARGET for r in batches)  # beta grew until the router cached enough


def test_exported_metadata(target_run):
    header = _header(target_run / "router.safetensors")
    assert header["transformer_class"] == "PixArtTransformer2DModel"
    assert header["unit_layout"] == "PixArtTransformer2DModel:2xattn1+attn2+ff"
    assert header["num_steps"] == 10
    assert header["scheduler_class"] == "DPMSolverMultistepScheduler"
    assert header["scheduler_config"]["num_train_timesteps"] == 1000
    assert header["guidance_scale"] == 4.5
    assert header["objective"] == "harmonica" and header["proxy"] == "paper"
    router = CacheRouter.load(target_run / "router.safetensors")
    assert header["threshold"] == router.threshold
    assert header["cache_ratio"] == pytest.approx(router.schedule().cache_ratio)
    router.check_compatible("PixArtTransformer2DModel:2xattn1+attn2+ff", 10)


def test_l2c_on_dit_fixes_the_even_steps(dit_folder, tmp_path):
    train_cli(["fit", "--model.model", dit_folder, "--model.num_steps", "8", "--model.objective", "l2c",
               "--model.learning_rate", "0.3", "--model.beta", "1.0", "--data.num_classes", "2",
               "--data.batch_size", "2", "--data.num_trajectories", "4", "--trainer.max_epochs", "1",
               "--trainer.enable_checkpointing", "false",
               "--trainer.default_root_dir", str(tmp_path / "run"), *QUIET,
               "--trainer.callbacks+=dit_cache.training.callbacks.ExportRouter",
               "--trainer.callbacks.path", str(tmp_path / "router.safetensors")])
    router = CacheRouter.load(tmp_path / "router.safetensors")
    even = torch.arange(8) % 2 == 0
    assert torch.equal(router.fixed_rows, even)
    assert bool((router.logits[even] == 5.0).all())
    schedule = router.schedule()
    assert bool(schedule.mask[even].all())
    assert not bool(schedule.mask[~even].all())  # the odd steps learned to reuse something (beta = 1)
    header = _header(tmp_path / "router.safetensors")
    assert header["objective"] == "l2c" and header["proxy"] is None
    assert header["transformer_class"] == "DiTTransformer2DModel" and header["scheduler_class"] == "DDIMScheduler"
    assert header["unit_layout"] == "DiTTransformer2DModel:2xattn1+ff"
    # No target: the export keeps the training threshold.
    assert router.threshold == 0.1 and "calibrated_from_threshold" not in header
    assert header["cache_ratio_at_training_threshold"] == pytest.approx(schedule.cache_ratio)


@pytest.fixture(scope="module")
def resumed_run(pixart_folder, tmp_path_factory):
    """A 6-trajectory run killed at the start of trajectory 3 (checkpoint every trajectory), then resumed."""
    folder = tmp_path_factory.mktemp("resume")
    common = ["fit", "--model.model", pixart_folder, "--model.num_steps", "6", "--model.target_cache_ratio", "0.5",
              "--model.beta", str(BETA), "--model.learning_rate", "0.2", "--model.proxy_interval", "3",
              "--data.batch_size", "2", "--data.num_trajectories", "6", "--data.prompts", json.dumps(PROMPTS), "--trainer.max_epochs", "1",
              "--trainer.default_root_dir", str(folder), *QUIET,  # the CLI checkpoints and exports in there
              "--checkpoint.save_top_k", "0",
              "--checkpoint.every_n_train_steps", "5",  # one trajectory = num_steps - 1 optimizer steps
              f"--trainer.callbacks+={__name__}.RecordTrajectories"]
    with pytest.raises(RuntimeError, match="simulated crash"):
        train_cli([*common, "--trainer.callbacks.path", str(folder / "first.jsonl"),
                   f"--trainer.callbacks+={KillAt.__module__}.KillAt", "--trainer.callbacks.batch", "3"])
    checkpoint = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    train_cli([*common, "--trainer.callbacks.path", str(folder / "second.jsonl"), "--ckpt_path", "last"])
    final = torch.load(folder / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    return folder, _records(folder / "first.jsonl"), checkpoint, _records(folder / "second.jsonl"), final


def test_a_killed_run_resumes_from_the_last_checkpoint(resumed_run):
    folder, first, checkpoint, second, final = resumed_run
    assert [r["batch"] for r in first[1:]] == [0, 1, 2]
    assert checkpoint["global_step"] == 3 * 5 == first[-1]["global_step"]
    assert checkpoint["state_dict"]["log_beta"] == pytest.approx(first[-1]["log_beta"])
    start = second[0]
    assert start["global_step"] == 15
    assert torch.equal(torch.tensor(start["logits"]), checkpoint["state_dict"]["router.logits"])
    assert start["log_beta"] == pytest.approx(float(checkpoint["state_dict"]["log_beta"]))
    assert start["log_beta"] != pytest.approx(math.log(BETA))  # the dual variable was restored, not reset
    # It finishes the epoch (batches 3..5) rather than starting over, and exports.
    assert [r["batch"] for r in second[1:]] == [3, 4, 5]
    assert second[-1]["global_step"] == final["global_step"] == 6 * 5
    assert CacheRouter.load(folder / "router.safetensors").num_steps == 6


def test_a_run_resumed_with_nothing_left_to_train_still_exports(resumed_run, pixart_folder):
    folder = resumed_run[0]
    exported = CacheRouter.load(folder / "router.safetensors")
    (folder / "router.safetensors").unlink()
    train_cli(["fit", "--model.model", pixart_folder, "--model.num_steps", "6", "--model.target_cache_ratio", "0.5",
               "--model.beta", str(BETA), "--data.batch_size", "2", "--data.num_trajectories", "6",
               "--data.prompts", json.dumps(PROMPTS), "--trainer.max_epochs", "1",
               "--trainer.max_steps", str(6 * 5), "--trainer.default_root_dir", str(folder), *QUIET,
               "--checkpoint.save_top_k", "0", "--ckpt_path", "last"])  # the checkpoint is at max_steps already
    again = CacheRouter.load(folder / "router.safetensors")
    assert torch.equal(again.logits, exported.logits)


def test_a_resumed_run_trains_the_trajectories_it_had_not_seen(resumed_run):
    folder, first, checkpoint, second, final = resumed_run
    seeds = TrajectorySeeds(num_prompts=len(PROMPTS), batch_size=2, num_trajectories=6, seed=0)
    assert [r["seed"] for r in first[1:]] == [int(seeds[i][1]) for i in range(3)]
    assert [r["seed"] for r in second[1:]] == [int(seeds[i][1]) for i in range(3, 6)]


def test_sample_latents_reports_every_model_call_without_changing_the_run():
    from diffusers import DDIMScheduler

    from dit_cache.training.denoising import sample_latents

    def denoiser(latents, t, conditioning):  # any deterministic model output
        return 0.1 * latents + t.float() / 1000

    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = sample_latents(denoiser, DDIMScheduler(), noise, None, 5)
    seen = []
    watched = sample_latents(denoiser, DDIMScheduler(), noise, None, 5,
                             on_step=lambda index, model_input, t, output: seen.append((index, model_input, t, output)))
    assert torch.equal(watched, plain)
    assert [index for index, *_ in seen] == list(range(5))
    timesteps = [int(t) for _, _, t, _ in seen]
    assert timesteps == sorted(timesteps, reverse=True) and len(set(timesteps)) == 5  # noisiest step first
    assert all(torch.equal(output, denoiser(model_input, t, None)) for _, model_input, t, output in seen)


def test_a_checkpoint_holds_the_router_not_the_frozen_transformer(resumed_run, pixart_folder):
    folder, first, checkpoint, second, final = resumed_run
    assert set(checkpoint["state_dict"]) == {"router.logits", "router.fixed_rows", "log_beta", "step_weights",
                                             "proxy_refreshes"}
    (state,) = checkpoint["optimizer_states"]
    assert len(state["state"]) == 1  # AdamW moments of the logits only
    transformer = RouterModule(pixart_folder, num_steps=6).transformer
    weights = sum(t.numel() * t.element_size() for t in transformer.state_dict().values())
    size = (folder / "checkpoints" / "last.ckpt").stat().st_size
    assert size < 40_000 < weights  # hparams, loops and optimizer state: a few KB; the weights alone are more


def test_a_checkpoint_that_still_holds_the_transformer_loads(pixart_folder, tmp_path):
    module = RouterModule(pixart_folder, num_steps=6)
    full = {"state_dict": dict(module.state_dict())}  # as written before checkpoints were slimmed
    module.on_save_checkpoint(full)
    slim = dict(full["state_dict"])
    for checkpoint in ({"state_dict": dict(module.state_dict())}, {"state_dict": slim}):
        fresh = RouterModule(pixart_folder, num_steps=6, seed=1)
        fresh.on_load_checkpoint(checkpoint)
        fresh.load_state_dict(checkpoint["state_dict"])  # strict: every key present
        assert torch.equal(fresh.router.logits, module.router.logits)


# ---- bad settings: one line from the CLI (issue 18) ---------------------------------------------------------
@pytest.mark.parametrize("flags, expected", [
    (["--model.num_steps", "0"], "num_steps must be a whole number >= 2"),
    (["--model.num_steps", "1"], "num_steps must be a whole number >= 2"),
    (["--data.batch_size", "0"], "batch_size must be a whole number >= 1, got 0"),
    (["--data.num_trajectories", "0"], "num_trajectories must be a whole number >= 1, got 0"),
    (["--model.proxy_interval", "0"], "proxy_interval must be a whole number >= 1"),
    (["--model.target_cache_ratio", "1.5"], "target_cache_ratio must be in [0, 1), got 1.5"),
    (["--model.threshold", "2"], "threshold must be in (0, 1)"),
    (["--model.learning_rate", "0"], "learning_rate must be a finite number > 0"),
    (["--data.prompt_file", "MISSING"], "No prompt file at"),
    (["--data.prompt_file", "EMPTY"], "holds no prompts"),
])
def test_bad_training_settings_are_one_line_without_a_traceback(pixart_folder, tmp_path, capsys, flags, expected):
    (tmp_path / "empty.txt").write_text("\n   \n")
    flags = [{"MISSING": str(tmp_path / "nope.txt"), "EMPTY": str(tmp_path / "empty.txt")}.get(f, f) for f in flags]
    with pytest.raises(SystemExit) as exit_:
        train_cli(["fit", "--model.model", pixart_folder, "--trainer.default_root_dir", str(tmp_path / "run"),
                   *QUIET, *flags])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    (line,) = [line for line in err.splitlines() if line.startswith("dit-cache-train: error:")]
    assert expected in line
    assert not (tmp_path / "run").exists()
