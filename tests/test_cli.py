import json
import subprocess
import sys
from pathlib import Path

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


# ---- issue 18: no silent wrong results, no tracebacks ------------------------------------------------------
def _one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if "error" in line.lower()]  # loading progress bars aside
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


@pytest.mark.parametrize("flags, expected", [
    (["--steps", "0"], "argument --steps: expected a whole number >= 1, got 0"),
    (["--steps", "-3"], "argument --steps: expected a whole number >= 1, got -3"),
    (["--num-images", "0"], "argument --num-images: expected a whole number >= 1, got 0"),
    (["--num-images", "-2"], "argument --num-images: expected a whole number >= 1, got -2"),
    (["--threshold", "2"], "argument --threshold: threshold must be in (0, 1)"),
    (["--threshold", "nan"], "argument --threshold: threshold must be in (0, 1)"),
    (["--threshold", "0"], "argument --threshold: threshold must be in (0, 1)"),
    (["--guidance", "-1"], "argument --guidance: expected a finite number in [0, 3.4e+38]"),
    (["--guidance", "nan"], "argument --guidance: expected a finite number in [0, 3.4e+38]"),
    (["--seed", "1e23"], "argument --seed: expected a whole number in [0, 2**64), got '1e23'"),
    (["--seed", str(2**64)], "argument --seed: expected a whole number in [0, 2**64)"),
    (["--seed", "-1"], "argument --seed: expected a whole number in [0, 2**64)"),
])
def test_bad_numbers_are_refused_in_one_line_before_anything_runs(tmp_path, capsys, flags, expected):
    with pytest.raises(SystemExit) as exit_:
        main(["generate", "a red circle", "--out", str(tmp_path / "out"), *flags])
    assert exit_.value.code == 2
    line = _one_error_line(capsys)
    assert line.startswith("dit-cache generate: error: ") and expected in line and "--help" in line
    assert not (tmp_path / "out").exists()


def test_the_last_seed_must_fit_a_torch_generator(model_and_router, tmp_path, capsys):
    model, _, _ = model_and_router
    code = main(["generate", "a red circle", "--model", str(model), "--no-cache", "--seed", str(2**64 - 1),
                 "--num-images", "2", "--out", str(tmp_path / "out")])
    assert code == 2 and "torch seeds must be below 2**64" in _one_error_line(capsys)
    assert not (tmp_path / "out").exists()


def test_guidance_zero_is_honoured_not_replaced_by_the_default(model_and_router, tmp_path):
    from PIL import Image

    from dit_cache.pipelines import AcceleratedPixArtAlphaPipeline

    model, router_path, _ = model_and_router
    with pytest.warns(UserWarning, match="trained at guidance_scale=3.0 but the call uses 0.0"):
        assert main(["generate", "a red circle", "--model", str(model), "--router", str(router_path),
                     "--guidance", "0", "--out", str(tmp_path)]) == 0
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["guidance_scale"] == 0.0
    written = np.asarray(Image.open(next(tmp_path.glob("*.png"))))
    pipe = AcceleratedPixArtAlphaPipeline.from_pretrained(model, router=str(router_path))
    pipe.set_progress_bar_config(disable=True)
    with pytest.warns(UserWarning, match="trained at guidance_scale=3.0"):
        image = pipe("a red circle", num_inference_steps=6, guidance_scale=0.0,
                     generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    assert np.array_equal(written, (image * 255).round().clip(0, 255).astype("uint8"))


@pytest.mark.parametrize("flag", [["--compare"], ["--threshold", "0.5"], ["--router", "r.safetensors"]])
def test_no_cache_with_cache_flags_is_a_conflict_not_ignored(model_and_router, tmp_path, capsys, flag):
    model, _, _ = model_and_router
    code = main(["generate", "a red circle", "--model", str(model), "--no-cache", *flag, "--out", str(tmp_path / "o")])
    assert code == 2
    assert f"--no-cache conflicts with {flag[0]}" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("device", ["tpu", "meta", "cuda:0"])
def test_a_device_that_is_not_here_is_one_line(model_and_router, tmp_path, capsys, device):
    if device.startswith("cuda") and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.device_count()}"  # one past the last GPU
    model, _, _ = model_and_router
    code = main(["generate", "a red circle", "--model", str(model), "--no-cache", "--device", device,
                 "--out", str(tmp_path / "o")])
    assert code == 2
    line = _one_error_line(capsys)
    assert line.startswith(f"dit-cache: error: --device {device} is not usable here") and "use one of: cpu" in line
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("label", ["1000", "5000", "no-such-class"])
def test_dit_class_labels_out_of_range_are_refused_before_any_image(tmp_path, capsys, label):
    from dit_cache.testing import tiny_dit_pipeline

    tiny_dit_pipeline().save_pretrained(tmp_path / "dit")
    code = main(["generate", "3", label, "--model", str(tmp_path / "dit"), "--no-cache", "--out", str(tmp_path / "o")])
    assert code == 2
    assert f"{label!r} is not a class of this model: give a class id in [0, 1000)" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_a_router_with_nan_logits_is_refused_by_the_cli(model_and_router, tmp_path, capsys):
    model, _, router = model_and_router
    broken = CacheRouter(router.num_steps, router.num_units, metadata=router.metadata)
    with torch.no_grad():
        broken.logits[2, 0] = float("nan")
    from safetensors.torch import save_file

    save_file({"logits": broken.logits.detach(), "fixed_rows": broken.fixed_rows.to(torch.uint8)},
              str(tmp_path / "nan.safetensors"), metadata={"format": "dit-cache/router"})
    code = main(["generate", "a red circle", "--model", str(model), "--router", str(tmp_path / "nan.safetensors"),
                 "--out", str(tmp_path / "o")])
    assert code == 2 and "tensor 'logits' holds NaN or infinite values" in _one_error_line(capsys)
    assert not (tmp_path / "o").exists()


def test_prompts_with_the_same_slug_do_not_overwrite_each_other(model_and_router, tmp_path):
    model, _, _ = model_and_router
    prompts = ["a red circle", "A red circle!"]
    assert main(["generate", *prompts, "--model", str(model), "--no-cache", "--out", str(tmp_path)]) == 0
    records = [json.loads(path.read_text()) for path in sorted(tmp_path.glob("*.json"))]
    assert sorted(record["prompt"] for record in records) == sorted(prompts)
    assert len(list(tmp_path.glob("*.png"))) == 2
    assert all(path.name.startswith("a-red-circle-") for path in tmp_path.iterdir())  # still readable


def test_a_full_disk_leaves_no_half_written_file(model_and_router, tmp_path, capsys, monkeypatch):
    import errno

    from PIL import Image

    def full_disk(self, file, *args, **kwargs):
        file.write(b"\x89PNG\r\n")  # a few bytes reach the disk, then it is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    model, _, _ = model_and_router
    code = main(["generate", "a red circle", "--model", str(model), "--no-cache", "--out", str(tmp_path / "o")])
    assert code == 2 and "No space left on device" in _one_error_line(capsys)
    assert list((tmp_path / "o").iterdir()) == []  # no PNG, no sidecar, no temporary file


def test_a_plan_preset_runs_instead_of_a_router(model_and_router, tmp_path):
    from dit_cache import CachePlan

    model, _, _ = model_and_router
    assert main(["generate", "a red circle", "--model", str(model), "--plan", "taylor:2:1", "--steps", "6",
                 "--guidance", "3.0", "--compare", "--out", str(tmp_path)]) == 0
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    expected = CachePlan.taylor(6, len(cache_units(tiny_pixart_pipeline().transformer)), 2, order=1)
    assert record["plan"] == "taylor:2:1" and record["router"] is None and record["steps"] == 6
    assert record["cache_ratio"] == pytest.approx(expected.cache_ratio, abs=1e-4) and record["psnr"] != "inf"


@pytest.mark.parametrize("flags, expected", [
    (["--plan", "taylr:3"], "Unknown plan preset 'taylr'"),
    (["--plan", "taylor:3:5"], "order must be 1 or 2"),
    (["--plan", "taylor:3:1", "--router", "r.safetensors"], "--plan conflicts with --router"),
    (["--plan", "uniform:2", "--no-cache"], "--no-cache conflicts with --plan"),
])
def test_bad_plan_flags_fail_before_the_model_loads(tmp_path, capsys, flags, expected):
    code = main(["generate", "a red circle", "--model", str(tmp_path / "no-model-here"), "--out",
                 str(tmp_path / "o"), *flags])
    assert code == 2 and expected in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_the_embedded_default_is_adaptive_where_it_is_better_and_static_elsewhere(tmp_path, capsys):
    import numpy as np
    from PIL import Image

    import dit_cache
    from diffusers import PixArtAlphaPipeline

    common = ["generate", "a red circle", "--overwrite", "--seed", "3"]
    assert main([*common, "--skip-flops", "0.5", "--out", str(tmp_path / "auto")]) == 0
    assert "adaptive router (prompt_tokens): 50%" in capsys.readouterr().out
    assert main([*common, "--skip-flops", "0.5", "--adaptive", "none", "--out", str(tmp_path / "none")]) == 0
    assert main([*common, "--skip-flops", "0.6", "--out", str(tmp_path / "static")]) == 0
    assert "adaptive" not in capsys.readouterr().out
    # a one-object prompt is short: the 50% rule gives it the router's 40% plan
    pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    dit_cache.accelerate(pipe, router=dit_cache.embedded_router_path(), skip_flops=0.4)
    expected = pipe("a red circle", generator=torch.Generator().manual_seed(3), num_inference_steps=20,
                    guidance_scale=dit_cache.EMBEDDED_GUIDANCE_SCALE, clean_caption=False).images[0]
    stem = output_stem("a red circle", 3)
    image = np.asarray(Image.open(tmp_path / "auto" / f"{stem}.png"))
    assert np.array_equal(image, np.asarray(expected))
    assert not np.array_equal(image, np.asarray(Image.open(tmp_path / "none" / f"{stem}.png")))


def test_an_adaptive_rule_for_another_budget_is_refused_before_the_model_loads(tmp_path, capsys):
    rule = str(Path(__file__).parents[1] / "dit_cache/assets/adaptive_rules/prompt_tokens_55.safetensors")
    code = main(["generate", "a red circle", "--skip-flops", "0.5", "--adaptive", rule, "--out", str(tmp_path)])
    assert code == 2 and "fitted for 55%" in capsys.readouterr().err
    code = main(["generate", "a red circle", "--adaptive", str(tmp_path / "nope.safetensors"), "--out", str(tmp_path)])
    assert code == 2 and "no such rule file" in capsys.readouterr().err
    assert not list(tmp_path.glob("*.png"))
