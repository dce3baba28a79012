"""Issue 31: numbers checked for what the math needs, no non-finite result returned or saved, output files that
behave (mode, no silent replacement, checks before the model loads), from_pipe siblings that run in parallel."""

import json
import os
import stat

import numpy as np
import pytest
import torch

from dit_cache import CachePlan, CacheRouter, cache_units
from dit_cache.cli import _save, main, output_stem
from dit_cache.pipelines import AcceleratedPixArtAlphaPipeline, MultiConceptConfig
from dit_cache.testing import tiny_pixart_pipeline
from dit_cache.units import unit_layout

STEPS = 4


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("reliability")
    pipe = tiny_pixart_pipeline()
    pipe.save_pretrained(folder / "model")
    router = CacheRouter(STEPS, len(cache_units(pipe.transformer)),
                         metadata={"unit_layout": unit_layout(pipe.transformer), "guidance_scale": 3.0})
    router.save(folder / "router.safetensors")
    return folder


def _generate(folder, out, *flags):
    return main(["generate", "a red circle", "--model", str(folder / "model"), "--out", str(out), *flags])


def _error(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture()
def model_never_loads(monkeypatch):
    """Proves a refusal came before the model loaded: loading it fails the test."""
    from diffusers import DiffusionPipeline

    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", refuse)


# ---- numbers checked for what the math needs --------------------------------------------------------------
@pytest.fixture(scope="module")
def pipe():
    pipe = tiny_pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_nan_guidance_with_cfg_share_and_two_prompts_is_refused(pipe):
    # before: accepted, and the two prompts were taken as the two CFG halves
    cached = AcceleratedPixArtAlphaPipeline.from_pipe(
        pipe, plan=CachePlan.cfg_share(STEPS, len(cache_units(pipe.transformer)), interval=2))
    with pytest.raises(ValueError, match=r"guidance_scale=nan is not a finite torch.float32 number"):
        cached(["a red circle", "a blue square"], num_inference_steps=STEPS, guidance_scale=float("nan"),
               output_type="latent")


@pytest.mark.parametrize("guidance", [1e308, float("inf")])
def test_a_guidance_scale_float32_cannot_hold_is_refused_before_the_call(pipe, guidance):
    cached = AcceleratedPixArtAlphaPipeline.from_pipe(
        pipe, plan=CachePlan.uniform(STEPS, len(cache_units(pipe.transformer)), interval=2))
    with pytest.raises(ValueError, match="is not a finite torch.float32 number"):
        cached("a red circle", num_inference_steps=STEPS, guidance_scale=guidance, output_type="latent")


@pytest.mark.parametrize("cache", [True, False])
@pytest.mark.parametrize("output_type", ["np", "pt", "latent"])
def test_a_call_whose_result_overflows_raises_instead_of_returning_nan(pipe, cache, output_type):
    cached = AcceleratedPixArtAlphaPipeline.from_pipe(
        pipe, plan=CachePlan.uniform(STEPS, len(cache_units(pipe.transformer)), interval=2))
    # 1e30 is a float32 number, but 1e30 times the prediction difference is not: all NaN (before: returned)
    with pytest.raises(ValueError, match=r"produced non-finite values \(NaN or inf in 100% of the output\)"):
        cached("a red circle", num_inference_steps=STEPS, guidance_scale=1e30, output_type=output_type,
               cache=cache)


def test_the_cli_refuses_guidance_float32_cannot_hold_in_one_line(folder, tmp_path, capsys):
    # before: exit 0 with an all-black PNG
    with pytest.raises(SystemExit) as exit_:
        _generate(folder, tmp_path / "out", "--guidance", "1e308")
    assert exit_.value.code == 2 and "argument --guidance: expected a finite number in [0, 3.4e+38]" in _error(capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flags", [["--no-cache"], ["--router", "ROUTER"]])
def test_the_cli_saves_no_image_of_a_non_finite_result(folder, tmp_path, capsys, flags):
    flags = [str(folder / "router.safetensors") if flag == "ROUTER" else flag for flag in flags]
    code = _generate(folder, tmp_path / "out", "--guidance", "1e30", "--steps", str(STEPS), *flags)
    assert code == 2 and "produced non-finite values" in _error(capsys)
    assert not (tmp_path / "out").exists()  # before: a black PNG and its sidecar, exit 0


def test_more_steps_than_the_scheduler_has_timesteps_are_refused_before_generating(folder, tmp_path, capsys):
    # before: ran (slowly), repeating timesteps, exit 0
    assert _generate(folder, tmp_path / "out", "--no-cache", "--steps", "1001") == 2
    assert "--steps 1001 is more than the 1000 timesteps" in _error(capsys)
    assert not (tmp_path / "out").exists()


def test_a_nan_correction_threshold_is_refused():
    with pytest.raises(ValueError, match="correction_threshold .* must be a finite number"):
        MultiConceptConfig(correction_threshold=float("nan"))  # before: accepted, nothing corrected


# ---- output files -----------------------------------------------------------------------------------------
@pytest.fixture()
def umask_022():
    previous = os.umask(0o022)
    yield
    os.umask(previous)


def test_output_files_get_the_mode_open_would_give(folder, tmp_path, umask_022):
    assert _generate(folder, tmp_path / "out", "--no-cache", "--steps", "2") == 0
    files = sorted((tmp_path / "out").iterdir())
    assert [f.suffix for f in files] == [".json", ".png"]
    assert [stat.S_IMODE(f.stat().st_mode) for f in files] == [0o644, 0o644]  # before: 0o600


def test_a_second_run_with_the_same_names_is_refused_before_the_model_loads(folder, tmp_path, capsys,
                                                                             monkeypatch):
    out = tmp_path / "out"
    assert _generate(folder, out, "--no-cache", "--steps", "2") == 0
    before = {path.name: path.read_bytes() for path in out.iterdir()}
    from diffusers import DiffusionPipeline

    load = DiffusionPipeline.from_pretrained
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", lambda *a, **k: pytest.fail("model loaded"))
    code = _generate(folder, out, "--router", str(folder / "router.safetensors"), "--steps", str(STEPS))
    line = _error(capsys)
    assert code == 2 and "already holds 1 of this run's images" in line and "--overwrite" in line
    assert {path.name: path.read_bytes() for path in out.iterdir()} == before  # before: silently replaced
    monkeypatch.setattr(DiffusionPipeline, "from_pretrained", load)
    assert _generate(folder, out, "--router", str(folder / "router.safetensors"), "--overwrite") == 0
    sidecar = json.loads((out / f"{output_stem('a red circle', 0)}.json").read_text())
    assert sidecar["router"] == str(folder / "router.safetensors") and sidecar["steps"] == STEPS


def test_the_refusal_names_the_file_and_the_fix(folder, tmp_path, capsys, model_never_loads):
    out = tmp_path / "out"
    out.mkdir()
    (out / f"{output_stem('a red circle', 1)}.json").write_text("{}")
    assert _generate(folder, out, "--no-cache", "--seed", "0", "--num-images", "2") == 2
    line = _error(capsys)
    assert f"already holds 1 of this run's images ({output_stem('a red circle', 1)}.png" in line
    assert "pass --overwrite to replace them, or another --out" in line


@pytest.mark.parametrize("setup, expected", [
    ("file", "is a file, not a folder"),
    ("under_a_file", "is a file, so no folder can be made there"),
])
def test_an_unusable_out_is_refused_before_the_model_loads(folder, tmp_path, capsys, model_never_loads, setup,
                                                            expected):
    (tmp_path / "taken").write_text("not a folder")
    out = tmp_path / "taken" if setup == "file" else tmp_path / "taken" / "images"
    assert _generate(folder, out, "--no-cache") == 2  # before: failed only after the images were computed
    assert expected in _error(capsys)


def test_a_file_that_appears_during_the_run_is_kept_and_nothing_is_half_written(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "img.json").write_text("another run's sidecar")
    with pytest.raises(FileExistsError, match="img.json appeared while this run was generating"):
        _save(out, "img", np.zeros((4, 4, 3), dtype=np.uint8), {"prompt": "a"})
    assert sorted(path.name for path in out.iterdir()) == ["img.json"]  # no PNG without its sidecar, no temporary
    assert (out / "img.json").read_text() == "another run's sidecar"
    _save(out, "img", np.zeros((4, 4, 3), dtype=np.uint8), {"prompt": "a"}, overwrite=True)
    assert json.loads((out / "img.json").read_text()) == {"prompt": "a"}


# ---- from_pipe siblings run in parallel -------------------------------------------------------------------
def test_from_pipe_siblings_get_their_own_scheduler_and_generate_from_two_threads(pipe):
    from dit_cache.testing import run_in_lockstep

    units = len(cache_units(pipe.transformer))
    a = AcceleratedPixArtAlphaPipeline.from_pipe(pipe, plan=CachePlan.uniform(STEPS, units, interval=2))
    b = AcceleratedPixArtAlphaPipeline.from_pipe(pipe, plan=CachePlan.taylor(STEPS, units, interval=2))
    assert a.scheduler is not pipe.scheduler and a.scheduler is not b.scheduler and a.tokenizer is not b.tokenizer
    assert a.transformer is pipe.transformer is b.transformer  # the weights stay shared
    call = dict(num_inference_steps=STEPS, guidance_scale=3.0, output_type="np")

    def job(sibling, prompt, seed):
        return lambda: sibling(prompt, generator=torch.Generator().manual_seed(seed), **call).images

    sequential = [job(a, "a red circle", 1)(), job(b, "a blue square", 2)()]
    concurrent = run_in_lockstep(pipe.transformer, [job(a, "a red circle", 1), job(b, "a blue square", 2)])
    assert all(np.array_equal(x, y) for x, y in zip(sequential, concurrent))  # before: IndexError


def test_a_scheduler_passed_to_from_pipe_is_used_as_given(pipe):
    scheduler = type(pipe.scheduler).from_config(pipe.scheduler.config)
    sibling = AcceleratedPixArtAlphaPipeline.from_pipe(pipe, scheduler=scheduler)
    assert sibling.scheduler is scheduler
