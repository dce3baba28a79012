"""The peer benchmark on tiny random SD3, FLUX.1 and Sana pipelines (speed only): every candidate applies and is
removed leaving the model bitwise stock, the measured cache ratio of dit-cache schedules is the engine's own
count, and a diffusers cache that does not run on a family is reported with its reason, not crashed on."""

import json

import pytest
import torch

from dit_cache.bench import peers
from dit_cache.bench.peer_bench import BenchConfig, run_benchmark
from dit_cache.cli import main
from dit_cache.testing import tiny_flux_pipeline, tiny_sana_pipeline, tiny_sd3_pipeline

# Small images and prompts, as tests/test_families.py calls these pipelines.
CALLS = {
    "sd3": dict(height=64, width=64, max_sequence_length=8),
    "flux": dict(height=64, width=64, max_sequence_length=8),
    "sana": dict(height=32, width=32, max_sequence_length=8, use_resolution_binning=False),
}
PIPELINES = {"sd3": tiny_sd3_pipeline, "flux": tiny_flux_pipeline, "sana": tiny_sana_pipeline}
# What diffusers 0.42 cannot run on each family, and why (the start of the recorded reason).
LEFT_OUT = {
    "sd3": {"FirstBlockCache": "FirstBlockCache threshold 0.5 failed on StableDiffusion3Pipeline"},
    "flux": {"FasterCache": "FluxPipeline has no CFG batch"},
    "sana": {"MagCache": "calibration: MagCache failed on SanaPipeline",
             "FirstBlockCache": "FirstBlockCache threshold 0.5 failed on SanaPipeline"},
}
ALL = ("uniform", "taylor", "first_block_cache", "taylorseer", "magcache", "fastercache", "pab")


def _config(name: str, **overrides) -> BenchConfig:
    settings = dict(count=2, steps=4, settings_per_family=1, calibration_count=1, quality=False, resamples=100,
                    families=ALL, pipeline_kwargs=CALLS[name])
    return BenchConfig(**{**settings, **overrides})


def _latents(pipe, name: str) -> torch.Tensor:
    return pipe(prompt="a red circle", num_inference_steps=3, guidance_scale=2.0, output_type="latent",
                generator=torch.Generator().manual_seed(0), **CALLS[name]).images


@pytest.mark.parametrize("name", list(PIPELINES))
def test_every_candidate_runs_or_is_reported_and_the_model_stays_stock(name, tmp_path):
    pipe = PIPELINES[name]()
    pipe.set_progress_bar_config(disable=True)
    stock = _latents(pipe, name)
    signature = peers.module_signature(pipe.transformer)

    results = run_benchmark(pipe, _config(name), tmp_path / "out")

    written = json.loads((tmp_path / "out" / "bench.json").read_text())
    families = [row["family"] for row in written["rows"]]
    expected = ["uncached", "uniform", "taylor", "FirstBlockCache", "TaylorSeer", "MagCache", "FasterCache", "PAB"]
    assert families == [f for f in expected if f not in LEFT_OUT[name]]
    assert set(written["left_out"]) == set(LEFT_OUT[name])
    for family, reason in LEFT_OUT[name].items():
        assert written["left_out"][family].startswith(reason)
        assert f"* {family}: {reason}" in results["table"]
    for row in written["rows"]:
        assert row["psnr_mean"] is None and row["speedup"] > 0  # speed only: no quality figures
        if row["family"] in ("uniform", "taylor"):  # dit-cache: the meter counts what the engine reports
            assert row["cache_ratio"] > 0 and row["cache_ratio"] == pytest.approx(row["engine_cache_ratio"])
    assert "PSNR" not in (tmp_path / "out" / "bench.md").read_text()
    assert not (tmp_path / "out" / "pareto.png").exists()
    # Every candidate was applied and removed: the transformer is structurally and numerically stock.
    assert peers.module_signature(pipe.transformer) == signature
    assert all(getattr(m, "_diffusers_hook", None) is None or not m._diffusers_hook.hooks
               for m in pipe.transformer.modules())
    assert torch.equal(_latents(pipe, name), stock)


def test_flux_timesteps_reach_pab_in_the_range_its_settings_use(tmp_path):
    # FluxPipeline passes t / 1000; PAB's timestep ranges are in [0, 1000], so it would otherwise skip nothing.
    results = run_benchmark(tiny_flux_pipeline(), _config("flux", families=("pab",)), tmp_path)
    assert results["rows"][1]["family"] == "PAB" and results["rows"][1]["cache_ratio"] > 0


def _raising(group: str):
    def fail(pipe):
        raise RuntimeError("this block type is not registered")

    return peers.Candidate("Broken", "broken", apply=fail, remove=lambda pipe: None, group=group)


def test_only_a_failing_diffusers_cache_is_left_out_a_failing_dit_cache_configuration_raises(tmp_path):
    pipe = tiny_flux_pipeline()
    uniform = peers.uniform_family(_setup_for(pipe), intervals=(2,))[0]
    results = run_benchmark(pipe, _config("flux"), tmp_path / "a", candidates=[peers.UNCACHED, uniform,
                                                                             _raising("diffusers")])
    assert [row["label"] for row in results["rows"]] == ["uncached", "uniform interval 2"]
    assert "RuntimeError: this block type is not registered" in results["left_out"]["Broken"]

    with pytest.raises(ValueError, match="no configuration runs on FluxPipeline: Broken: broken failed"):
        run_benchmark(pipe, _config("flux"), tmp_path / "b", candidates=[peers.UNCACHED, _raising("diffusers")])
    with pytest.raises(RuntimeError, match="not registered"):
        run_benchmark(pipe, _config("flux"), tmp_path / "c", candidates=[peers.UNCACHED, _raising("dit-cache")])
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def _setup_for(pipe):
    meter = peers.StepMeter(pipe.transformer)
    meter.remove()  # only its unit list is needed to build a schedule
    return peers.BenchSetup(pipe, 4, torch.ones(len(meter.units)), meter, {})


@pytest.mark.parametrize("name", list(PIPELINES))
def test_the_cli_benchmarks_a_saved_tiny_pipeline_folder(name, tmp_path, capsys):
    folder = tmp_path / name
    PIPELINES[name]().save_pretrained(folder)
    arguments = [f"--pipeline-arg={key}={json.dumps(value)}" for key, value in CALLS[name].items()]
    out = tmp_path / "out"
    assert main(["bench", "--model", str(folder), "--out", str(out), "--speed-only", "--count", "1", "--steps", "3",
                 "--settings-per-family", "1", "--families", "uniform", "taylorseer", *arguments]) == 0
    written = json.loads((out / "bench.json").read_text())
    assert written["meta"]["pipeline"] == type(PIPELINES[name]()).__name__
    assert written["meta"]["pipeline_kwargs"] == CALLS[name]
    assert [row["family"] for row in written["rows"]] == ["uncached", "uniform", "TaylorSeer"]
    assert "| TaylorSeer |" in capsys.readouterr().out


@pytest.mark.parametrize("argument, message", [
    ("height", "--pipeline-arg 'height': write KEY=VALUE"),
    ("num_inference_steps=3", "num_inference_steps is set by the benchmark; use --steps"),
])
def test_bad_pipeline_arguments_give_one_line_and_write_nothing(argument, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--out", str(out), "--no-plot", "--pipeline-arg", argument]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and message in errors[0]
    assert not out.exists()


def test_per_block_figures_time_and_count_the_blocks_only():
    from dit_cache import CacheSchedule, cache_units
    from dit_cache.bench.speed import _BlockClock, compare_schedules
    from dit_cache.flops import step_inputs, unit_flops

    transformer = tiny_sd3_pipeline().transformer
    inputs = step_inputs(transformer, batch=2, text_tokens=8)
    per_unit, whole = unit_flops(transformer, **inputs)
    _, blocks = unit_flops(transformer, blocks_only=True, **inputs)
    assert float(per_unit.sum()) < blocks < whole  # blocks hold the units and their norms, not the embeddings

    clock = _BlockClock(transformer, torch.device("cpu"))
    with torch.no_grad():
        transformer(**inputs)
    clock.remove()
    assert clock.seconds > 0
    assert not any(block._forward_hooks or block._forward_pre_hooks for block in transformer.transformer_blocks)

    uniform = {"uniform 2": CacheSchedule.uniform(4, len(cache_units(transformer)), 2)}
    by_block = compare_schedules(transformer, uniform, inputs, rounds=1, warmup=0, per_block=True)
    by_model = compare_schedules(transformer, uniform, inputs, rounds=1, warmup=0)
    # the same schedule saves a larger share of the blocks' work than of the whole forward's
    assert by_block[1].theoretical_speedup > by_model[1].theoretical_speedup


def test_a_video_pipeline_is_benchmarked_on_its_frames(tmp_path):
    from dit_cache.bench.rounds import first_sample
    from dit_cache.testing import TINY_FAMILIES

    tiny = TINY_FAMILIES["wan"]
    pipe = tiny.pipeline()
    pipe.set_progress_bar_config(disable=True)
    config = BenchConfig(count=2, steps=3, settings_per_family=1, quality=False, resamples=100,
                         families=("uniform", "taylor"), guidance_scale=tiny.cfg_call.get("guidance_scale", 2.0),
                         pipeline_kwargs={k: v for k, v in {**tiny.call, **tiny.cfg_call}.items() if k != "guidance_scale"})
    run_benchmark(pipe, config, tmp_path)
    rows = json.loads((tmp_path / "bench.json").read_text())["rows"]
    assert [row["family"] for row in rows] == ["uncached", "uniform", "taylor"]
    assert all(row["speedup"] > 0 for row in rows) and rows[1]["cache_ratio"] > 0
    assert rows[1]["cache_ratio"] == pytest.approx(rows[1]["engine_cache_ratio"])
    with pytest.raises(TypeError, match="neither images nor frames"):
        first_sample(object())
