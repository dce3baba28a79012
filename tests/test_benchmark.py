"""``run_benchmark`` / ``dit-cache bench`` end to end on a tiny pipeline, its refusal to report a run whose
configurations do not restore the stock model, and its one-line errors."""

import contextlib
import gc
import json
from types import SimpleNamespace

import pytest
import torch

from dit_cache.bench import peers
from dit_cache.bench.peer_bench import BenchConfig, RestorationError, pareto_front, run_benchmark
from dit_cache.bench.speed import collector_paused
from dit_cache.cli import main
from dit_cache.testing import tiny_pixart_pipeline

SMALL = dict(count=2, steps=4, settings_per_family=1, resamples=200)


def test_a_small_run_writes_json_table_and_plot_with_a_measured_cache_ratio(tmp_path):
    pytest.importorskip("matplotlib")
    results = run_benchmark(tiny_pixart_pipeline(), BenchConfig(families=("uniform", "taylorseer"), **SMALL),
                            tmp_path / "out")
    written = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert [row["family"] for row in written["rows"]] == ["uncached", "uniform", "TaylorSeer"]
    uniform = written["rows"][1]
    assert uniform["cache_ratio"] > 0 and uniform["cache_ratio"] == pytest.approx(uniform["engine_cache_ratio"])
    assert len(uniform["per_image"]) == 2 and written["rows"][0]["psnr_mean"] == 100.0
    assert "| TaylorSeer |" in (tmp_path / "out" / "bench.md").read_text()
    assert (tmp_path / "out" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert results["rows"][2]["vs_nearest_rival"]["label"] == uniform["label"]


def _leaky(pipe):
    """A candidate whose removal leaves a forward hook behind."""
    handles = []
    return peers.Candidate("leaky", "leaky", lambda p: handles.append(
        p.transformer.register_forward_hook(lambda *args: None)), lambda p: None)


def _changes_weights(pipe):
    """A candidate that alters a weight and never restores it: structurally stock, numerically not."""
    weight = pipe.transformer.proj_out.weight
    return peers.Candidate("sloppy", "sloppy", lambda p: weight.data.mul_(1.01), lambda p: None)


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("broken", [_leaky, _changes_weights], ids=["hook left", "weights changed"])
def test_a_configuration_that_does_not_restore_the_stock_model_is_not_reported(broken, workers, tmp_path):
    pipe = tiny_pixart_pipeline()
    with pytest.raises(RestorationError):
        run_benchmark(pipe, BenchConfig(plot=False, workers=workers, **SMALL), tmp_path / "out",
                      candidates=[peers.UNCACHED, broken(pipe)])
    assert not (tmp_path / "out").exists()


def test_a_selection_with_no_candidate_for_the_model_is_refused(tmp_path):
    from dit_cache.testing import tiny_dit_pipeline

    with pytest.raises(ValueError, match="no candidate"):
        run_benchmark(tiny_dit_pipeline(), BenchConfig(families=("fastercache",), plot=False, **SMALL), tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("arguments, message", [
    (["--families", "uniform", "teacache"], "unknown candidate family 'teacache'"),
    (["--families"], "name at least one"),
    (["--count", "0"], "--count must be at least 1"),
    (["--workers", "0"], "--workers must be at least 1"),
    (["--router", "missing.safetensors"], "no such file"),
])
def test_bad_arguments_give_one_line_and_write_nothing(arguments, message, tmp_path, capsys):
    out = tmp_path / "out"
    assert main(["bench", "--out", str(out), *arguments]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and message in errors[0]
    assert not out.exists()


def test_missing_matplotlib_gives_one_line_naming_the_extra(tmp_path, capsys, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    out = tmp_path / "out"
    assert main(["bench", "--out", str(out), "--count", "2"]) == 2
    errors = capsys.readouterr().err.strip().splitlines()
    assert len(errors) == 1 and 'pip install "dit-cache[bench]"' in errors[0]
    assert not out.exists()


def test_pareto_front_keeps_the_rows_nothing_beats_on_both_axes():
    rows = [{"speedup": 1.2, "psnr_mean": 30.0}, {"speedup": 1.5, "psnr_mean": 25.0},
            {"speedup": 1.3, "psnr_mean": 24.0}, {"speedup": 2.0, "psnr_mean": 18.0}]
    assert pareto_front(rows) == [rows[0], rows[1], rows[3]]


def _probe(check):
    """A candidate that runs ``check(pipe)`` where it is applied: in the process that times it."""
    return peers.Candidate("probe", "probe", check, lambda pipe: None)


@pytest.mark.parametrize("workers", [1, 2])
def test_the_run_times_on_one_torch_thread_and_restores_the_callers_setting(workers, tmp_path):
    def on_one_thread(pipe):
        if torch.get_num_threads() != 1:
            raise RuntimeError(f"timed on {torch.get_num_threads()} torch threads")

    torch.set_num_threads(2)
    try:
        results = run_benchmark(tiny_pixart_pipeline(), BenchConfig(plot=False, workers=workers, **SMALL), tmp_path,
                                candidates=[peers.UNCACHED, _probe(on_one_thread)])
        assert results["meta"]["workers"] == workers and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


def test_calls_are_timed_with_the_garbage_collector_paused_and_it_is_restored(tmp_path):
    seen = []

    def call_context(pipe):
        handle = pipe.transformer.register_forward_pre_hook(lambda module, args: seen.append(gc.isenabled()))
        return contextlib.closing(SimpleNamespace(close=handle.remove))

    probe = peers.Candidate("probe", "probe", lambda pipe: None, lambda pipe: None, call_context=call_context)
    assert gc.isenabled()
    run_benchmark(tiny_pixart_pipeline(), BenchConfig(plot=False, workers=1, **SMALL), tmp_path,
                  candidates=[peers.UNCACHED, probe])
    assert len(seen) == (1 + SMALL["count"]) * SMALL["steps"] and not any(seen)  # warm-up and timed calls
    assert gc.isenabled()


def test_the_collector_pause_keeps_a_collector_the_caller_turned_off_off():
    gc.disable()
    try:
        with pytest.raises(RuntimeError), collector_paused():
            assert not gc.isenabled()
            raise RuntimeError("inside the timed region")
        assert not gc.isenabled()
    finally:
        gc.enable()
    with collector_paused():
        assert not gc.isenabled()
    assert gc.isenabled()


def test_two_workers_measure_the_same_images_and_cache_ratios_as_one(tmp_path):
    config = {**SMALL, "count": 3, "families": ("uniform", "pab"), "plot": False}  # shares of 2 and 1 inputs
    one = run_benchmark(tiny_pixart_pipeline(), BenchConfig(workers=1, **config), tmp_path / "one")
    two = run_benchmark(tiny_pixart_pipeline(), BenchConfig(workers=2, **config), tmp_path / "two")
    assert two["meta"]["workers"] == 2 and [r["label"] for r in one["rows"]] == [r["label"] for r in two["rows"]]
    for serial, parallel in zip(one["rows"], two["rows"]):
        for key in ("mse", "cache_ratio", "seed"):
            assert [i[key] for i in serial["per_image"]] == [i[key] for i in parallel["per_image"]], key
    assert any(image["mse"] > 0 for row in two["rows"] for image in row["per_image"])


def test_a_worker_that_dies_is_an_error_naming_the_fallback(tmp_path):
    import os

    with pytest.raises(RuntimeError, match=r"worker \d exited \(code 3\).*--workers 1"):
        run_benchmark(tiny_pixart_pipeline(), BenchConfig(plot=False, workers=2, **SMALL), tmp_path / "out",
                      candidates=[peers.UNCACHED, _probe(lambda pipe: os._exit(3))])
    assert not (tmp_path / "out").exists()


def test_more_than_one_worker_needs_fork(monkeypatch):
    from dit_cache.bench import peer_bench as benchmark

    monkeypatch.setattr(benchmark, "can_fork", lambda: False)
    with pytest.raises(ValueError, match="use --workers 1"):
        BenchConfig(workers=2).check()
    BenchConfig(workers=1, plot=False).check()


def test_fronts_are_compared_level_by_level_on_the_fastest_configuration_reaching_each():
    from dit_cache.bench.peer_bench import front_by_level

    rows = [{"group": "dit-cache", "label": "a", "speedup": 2.0, "psnr_mean": 25.0},
            {"group": "dit-cache", "label": "b", "speedup": 3.0, "psnr_mean": 21.0},
            {"group": "diffusers", "label": "p", "speedup": 2.5, "psnr_mean": 23.0},
            {"group": "reference", "label": "uncached", "speedup": 1.0, "psnr_mean": 100.0}]
    table = {row["level"]: row for row in front_by_level(rows, levels=(21, 23, 25, 26))}
    assert table[21]["dit-cache"] == "b" and table[21]["ratio"] == pytest.approx(3.0 / 2.5)
    assert table[23]["dit-cache"] == "a" and table[23]["ratio"] == pytest.approx(2.0 / 2.5)
    assert table[25]["diffusers"] is None and table[25]["ratio"] is None
    assert table[26]["dit-cache"] is None


def test_the_speedup_is_the_total_time_ratio_so_a_mix_of_plans_is_not_flattered():
    from dit_cache.bench.peer_bench import score

    # half the images at 1.25x, half at 2.5x: the median per-image ratio (1.875x) lies between the two speeds
    mixed = peers.Candidate("router adaptive", "mix", apply=None, remove=None)
    counts = [{"cache_ratio": 0.5, "skipped_flop_share": 0.5, "engine_cache_ratio": None}] * 4
    records = {"uncached": {"seconds": [2.0] * 4}, "mix": {"seconds": [1.6, 1.6, 0.8, 0.8], "counts": counts}}
    row = score([mixed], records, [{"prompt": "p"}] * 4, [0, 1, 2, 3], None, BenchConfig(quality=False))["rows"][0]
    assert row["speedup"] == pytest.approx(8.0 / 4.8) and row["speedup_median"] == pytest.approx(1.875)
