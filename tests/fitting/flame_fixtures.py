"""Small random models in FLAME's format for tests."""

from __future__ import annotations

import numpy as np
from p3dmm.fitting import FlameModel, FlameParams


def random_flame_model(
    seed: int = 0, V: int = 120, F: int = 200, n_shape: int = 12, n_expr: int = 6, dtype=np.float64
) -> FlameModel:
    """A tiny model with FLAME's array layout and kinematic tree, random contents."""
    rng = np.random.default_rng(seed)
    v = rng.normal(scale=0.05, size=(V, 3))
    faces = np.stack([rng.choice(V, 3, replace=False) for _ in range(F)]).astype(np.int64)
    Jr = rng.random((5, V)) ** 4
    Jr /= Jr.sum(1, keepdims=True)
    w = rng.random((V, 5)) ** 2
    w /= w.sum(1, keepdims=True)
    return FlameModel(
        v_template=v.astype(dtype),
        faces=faces,
        shapedirs=rng.normal(scale=0.01, size=(V, 3, n_shape + n_expr)).astype(dtype),
        posedirs=rng.normal(scale=0.01, size=(V, 3, 36)).astype(dtype),
        J_regressor=Jr.astype(dtype),
        parents=np.array([-1, 0, 1, 1, 1]),
        lbs_weights=w.astype(dtype),
        n_shape=n_shape,
        n_expr=n_expr,
        name=f"random(seed={seed})",
    )


def random_params(model: FlameModel, seed: int = 1, pose_scale: float = 0.4) -> FlameParams:
    rng = np.random.default_rng(seed)
    dt = model.dtype
    return FlameParams(
        shape=rng.normal(size=model.n_shape).astype(dt),
        expr=rng.normal(size=model.n_expr).astype(dt),
        pose=rng.normal(scale=pose_scale, size=(5, 3)).astype(dt),
        transl=rng.normal(scale=0.1, size=3).astype(dt),
    )


