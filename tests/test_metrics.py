"""dit_cache.metrics: one implementation of the image errors, which --compare, bench and the experiments share."""

import numpy as np
import pytest
import torch

from dit_cache import metrics
from dit_cache.toy.evaluation import GenerationRun, image_error
from dit_cache.metrics import paired_difference


def _run(arrays):
    return GenerationRun(images=[], arrays=np.asarray(arrays, dtype=np.float32), seconds=0.0)


def test_image_error_reports_each_images_mse_and_their_mean():
    reference = _run(np.zeros((3, 4, 4, 3)))
    offsets = np.array([0.0, 0.1, 0.5])
    run = _run(np.zeros((3, 4, 4, 3)) + offsets[:, None, None, None])
    error = image_error(run, reference)
    np.testing.assert_allclose(error["per_image_mse"], offsets**2, rtol=1e-6)
    assert error["mse"] == pytest.approx(np.mean(offsets**2), rel=1e-6)
    # each image's PSNR (an identical image counts as MAX_PSNR), then their mean: not the PSNR of the mean MSE
    expected = np.mean([metrics.MAX_PSNR, -10 * np.log10(0.01), -10 * np.log10(0.25)])
    assert error["mean_psnr"] == pytest.approx(expected, rel=1e-5)
    assert error["mean_psnr"] > error["psnr"]


def test_paired_difference_separates_a_consistent_gap_from_noise():
    rng = np.random.default_rng(0)
    baseline = rng.uniform(0.0, 1.0, 200)
    worse = paired_difference(baseline + 0.1, baseline)
    assert worse["mean"] == pytest.approx(0.1)
    assert 0.0 < worse["low"] <= worse["mean"] <= worse["high"]
    assert worse["lower_share"] == 0.0

    noise = rng.normal(0.0, 0.1, 200)
    mixed = paired_difference(baseline + noise - noise.mean(), baseline)
    assert mixed["low"] < 0.0 < mixed["high"]
    assert 0.3 < mixed["lower_share"] < 0.7


def test_paired_difference_refuses_unpaired_lists():
    with pytest.raises(ValueError, match="equally long"):
        paired_difference([0.1, 0.2], [0.1])
    with pytest.raises(ValueError, match="non-empty"):
        paired_difference([], [])


def test_psnr_of_a_known_error_and_of_identical_images():
    assert float(metrics.psnr(torch.tensor(0.01))) == pytest.approx(20.0)
    assert float(metrics.psnr(torch.tensor(0.0))) == metrics.MAX_PSNR
    images = np.random.default_rng(0).uniform(size=(2, 8, 8, 3)).astype(np.float32)
    errors = metrics.image_errors(images, images)
    assert errors["psnr"].tolist() == [metrics.MAX_PSNR] * 2 and errors["ssim"].tolist() == pytest.approx([1.0, 1.0])


def test_generate_compare_and_bench_give_the_same_psnr_for_the_same_images():
    """``dit-cache generate --compare`` scores its image as ``dit-cache bench`` scores the same image."""
    import dit_cache
    from dit_cache import cli
    from dit_cache.bench import peer_bench as benchmark
    from dit_cache.testing import tiny_pixart_pipeline

    pipe = tiny_pixart_pipeline()
    pipe.set_progress_bar_config(disable=True)
    call = dict(prompt="a red circle", num_inference_steps=4, clean_caption=False)
    dit_cache.accelerate(pipe, plan=dit_cache.CachePlan.uniform(4, len(dit_cache.cache_units(pipe.transformer)), 2))
    cached = pipe(**call, generator=torch.Generator().manual_seed(3), output_type="np").images
    compared = cli._compare(pipe, call, 3, cached, cached_seconds=1.0)
    reference = pipe(**call, generator=torch.Generator().manual_seed(3), cache=False, output_type="np").images
    row = {"per_image": [{}]}
    family = dit_cache.families.family_of_pipeline(pipe)
    benchmark._score_quality(row, list(cached), list(reference), [{"prompt": call["prompt"]}], family,
                             benchmark.BenchConfig(resamples=10))
    assert 10 < compared["psnr"] < metrics.MAX_PSNR  # a real, finite error
    assert compared["psnr"] == round(row["per_image"][0]["psnr"], 3)
    assert compared["ssim"] == pytest.approx(row["per_image"][0]["ssim"])
