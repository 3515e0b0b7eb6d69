from __future__ import annotations

import numpy as np
import pytest
from p3dmm.fitting import InputError
from p3dmm.fitting.base.rotation import rodrigues
from p3dmm.fitting.metrics import procrustes_align, vertex_errors


def test_procrustes_recovers_similarity():
    rng = np.random.default_rng(0)
    a = rng.normal(size=(50, 3))
    R = rodrigues(np.array([[0.3, -0.5, 0.2]]))[0]
    b = 1.7 * a @ R.T + np.array([0.1, 0.2, -0.3])
    aligned, s, R_est, t = procrustes_align(a, b)
    np.testing.assert_allclose(aligned, b, atol=1e-12)
    assert s == pytest.approx(1.7)
    np.testing.assert_allclose(R_est, R, atol=1e-12)


def test_vertex_errors_in_mm_and_alignment_modes():
    rng = np.random.default_rng(1)
    gt = rng.normal(scale=0.05, size=(100, 3))
    pred = gt + np.array([0.01, 0, 0])  # 10 mm shift
    assert vertex_errors(pred, gt, align="none")["mean_mm"] == pytest.approx(10.0)
    assert vertex_errors(pred, gt, align="rigid")["max_mm"] < 1e-9
    noisy = gt + rng.normal(scale=0.001, size=gt.shape)
    e = vertex_errors(noisy, gt, vertex_ids=np.arange(50))
    assert 0.5 < e["mean_mm"] < 2.5 and e["median_mm"] <= e["p90_mm"] <= e["max_mm"]
    with pytest.raises(InputError, match="align must be"):
        vertex_errors(pred, gt, align="affine")
