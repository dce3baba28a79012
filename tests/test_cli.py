import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from dit_cache import CacheRouter, cache_units
from dit_cache.cli import main, output_stem
from dit_cache.testing import tiny_pixart_pipeline
from dit_cache.units import unit_layout


@pytest.fixture(scope="module")
def model_and_router(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    pipe = tiny_pixart_pipeline()
    pipe.save_pretrained(folder / "model")
    router = CacheRouter(6, len(cache_units(pipe.transformer)),
                         metadata={"unit_layout": unit_layout(pipe.transformer), "guidance_scale": 3.0})
    with torch.no_grad():
        router.logits[3:] = -5.0
    router.save(folder / "router.safetensors")
    return folder / "model", folder / "router.safetensors", router


def test_generate_writes_images_and_sidecars(model_and_router, tmp_path, capsys):
    model, router_path, router = model_and_router
    code = main(["generate", "a red circle", "a blue square", "--model", str(model), "--router", str(router_path),
                 "--num-images", "2", "--seed", "7", "--out", str(tmp_path), "--compare"])
    assert code == 0
    sidecars = sorted(tmp_path.glob("*.json"))
    assert len(sidecars) == 4 and len(list(tmp_path.glob("*.png"))) == 4
    record = json.loads((tmp_path / f"{output_stem('a blue square', 8)}.json").read_text())
    assert record["prompt"] == "a blue square" and record["seed"] == 8
    assert record["steps"] == 6 and record["guidance_scale"] == 3.0  # defaults come from the router
    assert record["cache_ratio"] == pytest.approx(router.schedule().cache_ratio, abs=1e-4)
    assert record["speedup"] > 0 and 0 < record["ssim"] <= 1
    assert "speedup" in capsys.readouterr().out


def test_no_cache_runs_without_a_router(model_and_router, tmp_path):
    model, _, _ = model_and_router
    assert main(["generate", "a red circle", "--model", str(model), "--no-cache", "--out", str(tmp_path)]) == 0
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["router"] is None and record["cache_ratio"] is None


@pytest.mark.parametrize("problem", ["missing", "not-a-router", "wrong-steps", "unknown-concept"])
def test_bad_input_exits_non_zero_with_one_readable_line(model_and_router, tmp_path, capsys, problem):
    model, router_path, _ = model_and_router
    (tmp_path / "text.safetensors").write_text("hello")
    router = {"missing": tmp_path / "nope.safetensors", "not-a-router": tmp_path / "text.safetensors"}.get(
        problem, router_path)
    extra = {"wrong-steps": ["--steps", "5"], "unknown-concept": ["--concepts", "dog"]}.get(problem, [])
    code = main(["generate", "a red circle", "--model", str(model), "--router", str(router),
                 "--out", str(tmp_path / "out"), *extra])
    assert code == 2
    errors = capsys.readouterr().err.splitlines()
    errors = [line for line in errors if line.startswith("dit-cache: error:")]
    expected = {"missing": "No router file", "not-a-router": "not a dit-cache router",
                "wrong-steps": "num_inference_steps=6", "unknown-concept": "'dog'"}[problem]
    assert len(errors) == 1 and expected in errors[0]
    assert not (tmp_path / "out").exists()  # nothing written


def test_a_concept_missing_from_a_later_prompt_fails_before_any_image(model_and_router, tmp_path, capsys):
    model, router_path, _ = model_and_router
    code = main(["generate", "a red circle", "a blue square", "--concepts", "circle", "--model", str(model),
                 "--router", str(router_path), "--out", str(tmp_path / "out")])
    assert code == 2 and "'circle'" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_the_installed_command_prints_no_traceback(model_and_router, tmp_path):
    model, _, _ = model_and_router
    result = subprocess.run(
        [sys.executable, "-m", "dit_cache.cli", "generate", "a red circle", "--model", str(model),
         "--router", str(tmp_path / "nope.safetensors")],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("dit-cache: error: No router file")


def test_other_models_need_a_router_or_no_cache(model_and_router, tmp_path, capsys):
    model, _, _ = model_and_router
    assert main(["generate", "a red circle", "--model", str(model), "--out", str(tmp_path)]) == 2
    assert "--router is required" in capsys.readouterr().err


def test_concept_flags_set_the_fixes_as_the_pipeline_would(model_and_router, tmp_path):
    from PIL import Image

    from dit_cache.pipelines import AcceleratedPixArtAlphaPipeline, MultiConceptConfig

    model, router_path, _ = model_and_router
    flags = ["--concepts", "red circle", "blue square", "--correction-alpha", "0.5", "--no-nms"]
    assert main(["generate", "a red circle and a blue square", "--model", str(model), "--router", str(router_path),
                 "--out", str(tmp_path), *flags]) == 0
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["concept_config"]["correction_alpha"] == 0.5 and record["concept_config"]["nms"] is False
    written = np.asarray(Image.open(next(tmp_path.glob("*.png"))))

    pipe = AcceleratedPixArtAlphaPipeline.from_pretrained(model, router=str(router_path))
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a red circle and a blue square", num_inference_steps=6, guidance_scale=3.0,
                 generator=torch.Generator().manual_seed(0), output_type="np", concepts=["red circle", "blue square"],
                 concept_config=MultiConceptConfig(correction_alpha=0.5, nms=False)).images[0]
    assert np.array_equal(written, (image * 255).round().clip(0, 255).astype("uint8"))


@pytest.mark.parametrize("flags, expected", [
    (["--correction-alpha", "0.5"], "--correction-alpha: used only with --concepts; add --concepts"),
    (["--concepts", "circle", "--nms-step-fraction", "1.5"], "nms_step_fraction must be in [0, 1], got 1.5"),
])
def test_bad_concept_flags_fail_before_the_model_loads(model_and_router, tmp_path, capsys, flags, expected):
    code = main(["generate", "a red circle", "--model", str(tmp_path / "no-model-here"), "--out",
                 str(tmp_path / "out"), *flags])  # the model is checked later: this error must come first
    assert code == 2 and expected in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_concepts_on_a_class_conditional_model_are_refused(tmp_path, capsys):
    from dit_cache.testing import tiny_dit_pipeline

    tiny_dit_pipeline().save_pretrained(tmp_path / "dit")
    code = main(["generate", "cat", "--model", str(tmp_path / "dit"), "--no-cache", "--concepts", "cat",
                 "--out", str(tmp_path / "out")])
    assert code == 2 and "DiTPipeline is class-conditional: drop --concepts" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
