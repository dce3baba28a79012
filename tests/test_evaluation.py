import numpy as np
import pytest

from dit_cache.evaluation import GenerationRun, image_error, paired_difference


def _run(arrays):
    return GenerationRun(images=[], arrays=np.asarray(arrays, dtype=np.float32), seconds=0.0)


def test_image_error_reports_each_images_mse_and_their_mean():
    reference = _run(np.zeros((3, 4, 4, 3)))
    offsets = np.array([0.0, 0.1, 0.5])
    run = _run(np.zeros((3, 4, 4, 3)) + offsets[:, None, None, None])
    error = image_error(run, reference)
    np.testing.assert_allclose(error["per_image_mse"], offsets**2, rtol=1e-6)
    assert error["mse"] == pytest.approx(np.mean(offsets**2), rel=1e-6)


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
