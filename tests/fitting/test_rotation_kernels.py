"""The fused rotation kernels (``base/rotation.cu``) against their NumPy twins.

Runs the real launch code of :mod:`p3dmm.fitting.base.rotation` on the CuPy emulation
(the ``.cu`` file compiled for the host, :mod:`tests.host_cuda`), on rotations that
exercise every branch: zero and Taylor-range angles, generic ones, angles near pi (each
of Shepperd's four quaternion candidates), float32 and float64.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from p3dmm.fitting.base.rotation import rodrigues, rodrigues_jvp, rodrigues_vjp, rotation_to_axis_angle

from ..device_emulation import emulated_cuda


def _rvecs(dtype: type = np.float64) -> np.ndarray:
    rng = np.random.default_rng(0)
    axes = rng.normal(size=(40, 3))
    axes /= np.linalg.norm(axes, axis=1, keepdims=True)
    angles = np.concatenate(
        [[0.0, 1e-9, 1e-4, 9.9e-3, 1e-2, 1.01e-2], rng.uniform(0.02, 3.0, 24), np.pi - np.logspace(-7, -1, 10)]
    )
    r = axes * angles[:, None]
    r = np.concatenate([r, [[np.pi, 0, 0], [0, np.pi, 0], [0, 0, np.pi]]])  # Shepperd's x, y, z candidates
    return r.astype(dtype)


def _on_device(tmp_path: Path, fn, *arrays: np.ndarray):  # type: ignore[no-untyped-def]
    with emulated_cuda(tmp_path) as rec:
        import cupy as cp

        n0 = len(rec.host.launches)
        out = fn(*(cp.asarray(a) for a in arrays))
        launched = rec.host.launches[n0:]
        return cp.asnumpy(out), launched


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rodrigues_kernel_matches_numpy(tmp_path: Path, dtype: type) -> None:
    r = _rvecs(dtype)
    got, launched = _on_device(tmp_path, rodrigues, r)
    assert launched == [f"rot_rodrigues_{'f32' if dtype == np.float32 else 'f64'}"]
    want = rodrigues(r)
    assert got.dtype == want.dtype == dtype
    if dtype == np.float64:
        assert_allclose(got, want, rtol=0, atol=1e-15)
    else:
        assert_allclose(got, want, rtol=0, atol=1e-7)  # both round the same float64 values to float32
    # and it is a rotation (the kernel computes, it does not copy a reference)
    assert_allclose(got.astype(np.float64) @ np.swapaxes(got, 1, 2), np.broadcast_to(np.eye(3), got.shape), atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_rodrigues_vjp_kernel_matches_numpy(tmp_path: Path, dtype: type) -> None:
    r = _rvecs(dtype)
    G = np.random.default_rng(1).normal(size=(r.shape[0], 3, 3)).astype(dtype)
    got, launched = _on_device(tmp_path, rodrigues_vjp, r, G)
    assert len(launched) == 1
    want = rodrigues_vjp(r, G)
    tol = 1e-13 if dtype == np.float64 else 1e-5
    assert_allclose(got, want, rtol=tol, atol=tol)
    # against finite differences of the forward map (float64)
    r64, G64 = r.astype(np.float64)[6:12], G.astype(np.float64)[6:12]
    h = 1e-6
    fd = np.stack(
        [((rodrigues(r64 + h * e) - rodrigues(r64 - h * e)) * G64).sum((1, 2)) / (2 * h) for e in np.eye(3)], 1
    )
    assert_allclose(got[6:12], fd, rtol=1e-4, atol=1e-5)


def test_rodrigues_jvp_kernel_matches_numpy(tmp_path: Path) -> None:
    r = _rvecs()
    dirs = np.random.default_rng(2).normal(size=(4, r.shape[0], 3))
    got, launched = _on_device(tmp_path, rodrigues_jvp, r, dirs)
    assert len(launched) == 1
    want = rodrigues_jvp(r, dirs)
    assert got.shape == (4, r.shape[0], 3, 3)
    assert_allclose(got, want, rtol=1e-13, atol=1e-14)
    # a direction-specific check: the kernel must index (direction, rotation) right
    h = 1e-6
    fd = (rodrigues(r + h * dirs[2]) - rodrigues(r - h * dirs[2])) / (2 * h)
    assert_allclose(got[2], fd, atol=1e-6)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_axis_angle_kernel_matches_numpy_and_inverts_rodrigues(tmp_path: Path, dtype: type) -> None:
    r = _rvecs()
    R = rodrigues(r).astype(dtype)
    got, launched = _on_device(tmp_path, rotation_to_axis_angle, R)
    assert len(launched) == 1
    want = rotation_to_axis_angle(R)
    tol = 1e-12 if dtype == np.float64 else 1e-6
    assert_allclose(got, want, rtol=tol, atol=tol)
    # the inverse: same rotation back (axis-angle is ambiguous only at pi, where r and -r agree)
    assert_allclose(rodrigues(got.astype(np.float64)), R.astype(np.float64), atol=10 * tol)


def test_axis_angle_batched_equals_one_at_a_time() -> None:
    R = rodrigues(_rvecs())[:42]
    batched = rotation_to_axis_angle(R.reshape(6, 7, 3, 3))
    assert batched.shape == (6, 7, 3)
    assert_array_equal(batched.reshape(-1, 3), np.stack([rotation_to_axis_angle(m) for m in R]))
    assert rotation_to_axis_angle(R[0]).shape == (3,)


def test_fused_rotations_launch_fewer_ops_than_the_op_chains(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    r = _rvecs()
    counts, outs = {}, {}
    for fused in ("1", "0"):
        monkeypatch.setenv("P3DMM_FUSED_KERNELS", fused)
        with emulated_cuda(tmp_path / fused) as rec:
            import cupy as cp

            rd = cp.asarray(r)
            n0 = rec.ops
            out = rotation_to_axis_angle(rodrigues(rd))
            counts[fused] = rec.ops - n0
            outs[fused] = cp.asnumpy(out)
    assert counts["1"] <= 6 < 40 < counts["0"], counts
    assert_allclose(outs["1"], outs["0"], atol=1e-12)
