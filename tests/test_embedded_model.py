"""The embedded default loads through stock diffusers and runs end to end through the CLI."""

import json
import time
from pathlib import Path

import torch
from diffusers import PixArtAlphaPipeline

import dit_cache
from dit_cache import EMBEDDED_GUIDANCE_SCALE, CacheRouter, cache_units
from dit_cache.toy import shapes
from dit_cache.cli import main
from dit_cache.units import unit_layout


def test_stock_pipeline_generates_from_the_embedded_model():
    pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
    pipe.set_progress_bar_config(disable=True)
    start = time.perf_counter()
    image = pipe("a red circle", num_inference_steps=20, generator=torch.Generator().manual_seed(0)).images[0]
    assert time.perf_counter() - start < 60
    assert image.size == (256, 256) and image.mode == "RGB"
    assert len(shapes.detect_objects(image)) >= 1  # a trained model draws something, not noise


def test_embedded_model_is_small_and_documented():
    folder = Path(dit_cache.embedded_model_path())
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size <= 25_000_000
    provenance = json.loads((folder / "provenance.json").read_text())
    assert provenance["evaluation"]["results_by_guidance_scale"]
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))


def test_shipped_router_fits_the_embedded_model():
    pipe = PixArtAlphaPipeline.from_pretrained(dit_cache.embedded_model_path())
    router = CacheRouter.load(dit_cache.embedded_router_path())
    assert router.metadata["unit_layout"] == unit_layout(pipe.transformer)
    assert router.num_units == len(cache_units(pipe.transformer))
    assert 0.3 <= router.schedule().cache_ratio <= 0.7


def test_cli_default_runs_on_the_embedded_model(tmp_path):
    assert main(["generate", "a blue square", "--out", str(tmp_path)]) == 0
    record = json.loads(next(tmp_path.glob("*.json")).read_text())
    assert record["model"] == "embedded" and record["router"] == "embedded"
    assert record["cache_ratio"] > 0.3 and record["steps"] == 20
    assert record["guidance_scale"] == EMBEDDED_GUIDANCE_SCALE
