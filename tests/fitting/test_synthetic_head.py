"""The generated stand-in head: FLAME's exact format, a closed well-formed mesh, and
blend shapes / skinning that behave like FLAME's."""

from __future__ import annotations

import time

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from p3dmm.fitting import FlameModel, FlameParams, InputError
from p3dmm.fitting.model import synthetic_head as sh
from p3dmm.fitting.model.lbs import flame_forward

LEFT = np.arange(*sh.LEFT_EYEBALL)
RIGHT = np.arange(*sh.RIGHT_EYEBALL)
EYES = np.concatenate([LEFT, RIGHT])
HEAD = np.arange(sh.N_HEAD_VERTICES)


@pytest.fixture(scope="module")
def model() -> FlameModel:
    return FlameModel.synthetic(seed=0, dtype=np.float64)


def _posed(model: FlameModel, **kw) -> np.ndarray:
    p = FlameParams.zeros(model.n_shape, model.n_expr, dtype=model.dtype)
    for name, value in kw.items():
        getattr(p, name)[...] = value
    return flame_forward(model, p)[0]


def _directed_edges(faces: np.ndarray) -> np.ndarray:
    return np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])


def test_exact_flame_dimensions(model: FlameModel) -> None:
    assert model.v_template.shape == (5023, 3)
    assert model.faces.shape == (9976, 3) and model.faces.dtype == np.int64
    assert model.shapedirs.shape == (5023, 3, 400)
    assert model.posedirs.shape == (5023, 3, 36)
    assert model.J_regressor.shape == (5, 5023)
    assert model.lbs_weights.shape == (5023, 5)
    assert_array_equal(model.parents, [-1, 0, 1, 1, 1])
    assert (model.n_shape, model.n_expr, model.name) == (300, 100, "synthetic(seed=0)")
    assert model.faces.min() == 0 and model.faces.max() == 5022
    assert len(np.unique(model.faces)) == 5023  # every vertex is used
    # eyeballs are separate components occupying FLAME's id ranges
    f = model.faces
    head_f = f[: sh.N_HEAD_FACES]
    assert head_f.max() < sh.N_HEAD_VERTICES
    for ids, lo in ((LEFT, 0), (RIGHT, 1088)):
        ef = f[sh.N_HEAD_FACES + lo : sh.N_HEAD_FACES + lo + 1088]
        assert len(ids) == 546
        assert set(np.unique(ef)) == set(ids)
    assert model.v_template[LEFT, 0].mean() > 0 > model.v_template[RIGHT, 0].mean()  # left = +x


def test_bad_args() -> None:
    with pytest.raises(InputError, match="dtype"):
        sh.build_synthetic_flame(0, dtype=np.int32)
    with pytest.raises(InputError, match="seed"):
        sh.build_synthetic_flame(-1)


def test_mesh_is_well_formed(model: FlameModel) -> None:
    f, v = model.faces, model.v_template
    assert (f[:, 0] != f[:, 1]).all() and (f[:, 1] != f[:, 2]).all() and (f[:, 0] != f[:, 2]).all()
    assert len(np.unique(np.sort(f, 1), axis=0)) == len(f)  # no duplicate faces
    area = 0.5 * np.linalg.norm(np.cross(v[f[:, 1]] - v[f[:, 0]], v[f[:, 2]] - v[f[:, 0]]), axis=1)
    assert area.min() > 1e-9  # no degenerate triangles (m^2)
    # consistent orientation: every directed edge at most once, interior edges both ways
    e = _directed_edges(f)
    assert len(np.unique(e, axis=0)) == len(e)
    und, counts = np.unique(np.sort(e, 1), axis=0, return_counts=True)
    assert counts.max() == 2
    # boundary edges: exactly the designed openings, B = 20 + 14 + 14 + 18 and
    # F_head = 2V - 4 + 2h - B with h = 4 loops
    boundary = und[counts == 1]
    assert len(boundary) == 66
    assert sh.N_HEAD_FACES == 2 * sh.N_HEAD_VERTICES - 4 + 2 * 4 - 66
    bverts = np.unique(boundary)
    assert bverts.max() < sh.N_HEAD_VERTICES  # eyeballs are closed
    # 4 loops: union-find over boundary edges
    parent = {int(a): int(a) for a in bverts}

    def find(a: int) -> int:
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    for a, b in boundary:
        parent[find(int(a))] = find(int(b))
    loops = {find(int(a)) for a in bverts}
    assert len(loops) == 4
    # neck loop is the 'boundary' mask
    assert set(model.masks["boundary"]) <= set(bverts.tolist()) and len(model.masks["boundary"]) == 18


def test_outward_orientation_and_closed_volume(model: FlameModel) -> None:
    v, f = model.v_template, model.faces

    def signed_volume(faces: np.ndarray) -> float:
        a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
        return float(np.sum(a * np.cross(b, c)) / 6.0)

    for lo in (0, 1088):
        ef = f[sh.N_HEAD_FACES + lo : sh.N_HEAD_FACES + lo + 1088]
        vol = signed_volume(ef)
        assert_allclose(vol, 4 / 3 * np.pi * sh._EYE_RADIUS**3, rtol=0.03)
    # the head with its openings capped by fans (about the loop centroid) encloses a
    # positive volume of a plausible size (litres)
    head_f = f[: sh.N_HEAD_FACES]
    e = _directed_edges(head_f)
    und, counts = np.unique(np.sort(e, 1), axis=0, return_counts=True)
    bset = {tuple(x) for x in und[counts == 1].tolist()}
    bdir = np.array([x for x in e.tolist() if tuple(sorted(x)) in bset])
    vol = signed_volume(head_f)
    # cap each boundary edge (a -> b as used by a face) with a triangle to the origin side
    # of the same loop: the centroid of all boundary vertices of that loop
    nxt = {int(a): int(b) for a, b in bdir}
    seen: set[int] = set()
    caps = []
    for start in nxt:
        if start in seen:
            continue
        loop = [start]
        while nxt[loop[-1]] != start:
            loop.append(nxt[loop[-1]])
        seen.update(loop)
        c = v[loop].mean(0)
        for a in loop:
            b = nxt[a]
            caps.append(np.dot(c, np.cross(v[b], v[a])) / 6.0)  # reversed edge closes the hole
    vol += float(np.sum(caps))
    assert 0.002 < vol < 0.006


def test_geometry_scale_and_layout(model: FlameModel) -> None:
    v = model.v_template[HEAD]
    width = v[:, 0].max() - v[:, 0].min()
    assert 0.15 < width < 0.21
    assert v[:, 1].max() > 0.1 and v[:, 1].min() < -0.1  # crown above, neck below the origin
    nose_tip = v[np.argmax(v[:, 2])]
    assert abs(nose_tip[0]) < 1e-6 and 0.09 < nose_tip[2] < 0.13  # the nose sticks out in +z
    J = model.J_regressor @ model.v_template
    assert_allclose(J[3], model.v_template[LEFT].mean(0), atol=1e-9)
    assert_allclose(J[4], model.v_template[RIGHT].mean(0), atol=1e-9)
    assert J[3, 0] > 0.02 and J[3, 2] > 0.04  # left eye in front, on +x
    assert J[1, 1] > J[0, 1]  # neck joint above the root
    assert J[0, 1] < 0 and J[2, 1] > J[1, 1]  # jaw joint above the neck joint, below the eyes
    assert J[2, 1] < J[3, 1]
    assert np.abs(J[:3, 0]).max() < 1e-6  # midline joints


def test_mirror_symmetry(model: FlameModel) -> None:
    m = sh.mirror_vertex_map(model)
    assert m.dtype == np.int64 and m.shape == (5023,)
    assert_array_equal(m[m], np.arange(5023))
    assert_allclose(model.v_template[m], model.v_template * np.array([-1.0, 1.0, 1.0]), atol=1e-12)
    assert set(m[LEFT].tolist()) == set(RIGHT.tolist())
    # the face set maps onto itself (with reversed winding)
    f = model.faces

    def canon(a: np.ndarray) -> set[tuple[int, ...]]:
        return {tuple(np.roll(t, -int(np.argmin(t)))) for t in a.tolist()}

    assert canon(m[f][:, ::-1]) == canon(f)
    # weights are symmetric (left/right eye swapped)
    w = model.lbs_weights
    assert_allclose(w[m][:, [0, 1, 2, 4, 3]], w, atol=1e-9)
    tiny = FlameModel(
        v_template=np.zeros((4, 3)), faces=np.zeros((1, 3), np.int64), shapedirs=np.zeros((4, 3, 2)),
        posedirs=np.zeros((4, 3, 36)), J_regressor=np.zeros((5, 4)), parents=np.array([-1, 0, 1, 1, 1]),
        lbs_weights=np.zeros((4, 5)), n_shape=1, n_expr=1,
    )
    with pytest.raises(InputError, match="5023"):
        sh.mirror_vertex_map(tiny)


def test_determinism_seeds_dtype_and_time(model: FlameModel) -> None:
    t0 = time.perf_counter()
    b = sh._build_cached.__wrapped__(0, "<f8")  # uncached rebuild
    dt = time.perf_counter() - t0
    print(f"synthetic head generation: {dt:.2f} s")
    assert dt < 10.0  # ~0.7 s on one idle core; loose bound for loaded machines
    assert_array_equal(model.shapedirs, b.shapedirs)
    assert_array_equal(model.lbs_weights, b.lbs_weights)
    c = FlameModel.synthetic(seed=1)  # float32 by default
    assert c.v_template.dtype == np.float32 and c.shapedirs.dtype == np.float32
    assert c.name == "synthetic(seed=1)"
    assert_allclose(c.v_template, model.v_template, atol=1e-7)  # fixed template
    diff = np.abs(model.shapedirs - c.shapedirs).reshape(-1, 400).max(0)
    assert (diff[:15] < 1e-6).all()  # named identity components do not depend on the seed
    assert diff[20:300].min() > 1e-4 and diff[315:].min() > 1e-4  # random ones do


def test_shapedirs_orthogonal_with_sd_norms(model: FlameModel) -> None:
    S = model.shapedirs.reshape(-1, 400)
    for cols, sd in ((slice(0, 300), sh.identity_sd()), (slice(300, 400), sh.expression_sd())):
        B = S[:, cols]
        G = B.T @ B
        assert_allclose(np.sqrt(np.diag(G)), sd, rtol=1e-9)
        off = G / np.outer(sd, sd) - np.eye(len(sd))
        assert np.abs(off).max() < 1e-9
        assert (np.diff(sd) < 0).all()
    # first identity component: ~1 cm per vertex at 1 sd, later ones much smaller
    rms = lambda k: np.sqrt(np.mean(np.sum(model.shapedirs[:, :, k] ** 2, 1)))
    assert 0.002 < rms(0) < 0.02
    assert rms(299) < 0.05 * rms(0)


def test_eyeballs_rigid_under_identity(model: FlameModel) -> None:
    for ids in (LEFT, RIGHT):
        d = model.shapedirs[ids, :, :300]  # (546, 3, 300)
        assert_allclose(d, np.broadcast_to(d[:1], d.shape), atol=1e-12)  # pure translation


def test_expression_is_local(model: FlameModel) -> None:
    E = model.shapedirs[:, :, 300:]
    energy = np.sum(E**2, axis=(1, 2))
    off_face = np.concatenate(
        [model.masks[k] for k in ("scalp", "neck", "left_ear", "right_ear", "left_eyeball", "right_eyeball")]
    )
    assert energy[off_face].max() < 1e-20
    assert energy[model.masks["lips"]].mean() > 1e3 * energy[off_face].max() + 1e-8


def test_skinning_weights_and_regressor(model: FlameModel) -> None:
    w, Jr = model.lbs_weights, model.J_regressor
    assert (w >= 0).all() and (Jr >= 0).all()
    assert_allclose(w.sum(1), 1.0, atol=1e-12)
    assert_allclose(Jr.sum(1), 1.0, atol=1e-12)
    assert_allclose(w[LEFT, 3], 1.0)
    assert_allclose(w[RIGHT, 4], 1.0)
    assert w[HEAD][:, 3:].max() == 0.0
    assert w[model.masks["scalp"], 1].min() > 0.99  # head on the neck joint
    assert w[model.masks["boundary"], 0].min() > 0.99  # neck rim on the root


def _lip_rows(row: int) -> np.ndarray:
    lat = sh._template()["lat"]
    return lat.band_vid(np.arange(-3, 4), np.full(7, row))


def test_jaw_opens_the_mouth(model: FlameModel) -> None:
    v0 = _posed(model)
    v1 = _posed(model, pose=np.array([[0, 0, 0], [0, 0, 0], [0.25, 0, 0], [0, 0, 0], [0, 0, 0]]))
    lower, upper = _lip_rows(sh._MOUTH_ROWS[0]), _lip_rows(sh._MOUTH_ROWS[1])
    assert (v1[lower, 1] - v0[lower, 1]).max() < -0.005  # lower lip drops > 5 mm
    assert np.abs(v1[upper] - v0[upper]).max() < 2e-4  # upper lip stays
    assert np.abs(v1[model.masks["scalp"]] - v0[model.masks["scalp"]]).max() < 1e-9
    gap = np.linalg.norm(v1[lower] - v1[upper], axis=1)
    assert gap.min() > 0.005


def test_eye_rotation_moves_only_eyes(model: FlameModel) -> None:
    v0 = _posed(model)
    pose = np.zeros((5, 3))
    pose[3] = [0.0, 0.3, 0.0]
    v1 = _posed(model, pose=pose)
    moved = np.linalg.norm(v1 - v0, axis=1)
    assert moved[LEFT].max() > 0.003
    assert moved[RIGHT].max() == 0.0
    others = np.setdiff1d(HEAD, model.masks["left_eye_region"])
    assert moved[others].max() < 1e-12
    assert moved[model.masks["left_eye_region"]].max() < 1e-3  # tiny eyelid correctives only
    # the eyeball rotates rigidly about its centre
    c = v0[LEFT].mean(0)
    assert_allclose(np.linalg.norm(v1[LEFT] - c, axis=1), np.linalg.norm(v0[LEFT] - c, axis=1), atol=1e-12)


def test_posedirs_small_and_local(model: FlameModel) -> None:
    P = model.posedirs
    assert np.abs(P).max() < 0.05
    assert np.abs(P[EYES]).max() == 0.0
    assert np.abs(P[model.masks["forehead"]]).max() < 1e-9


def test_uv_layout(model: FlameModel) -> None:
    uv = model.uv
    assert uv is not None
    assert uv.vt.min() >= 0.0 and uv.vt.max() <= 1.0
    assert uv.ft.shape == model.faces.shape
    assert uv.vertex_uv.shape == (5023, 2)
    face = np.zeros(5023, bool)
    face[model.masks["face"]] = True
    in_face = face[model.faces].all(1)
    t = uv.vt[uv.ft[in_face]].astype(np.float64)
    e1, e2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    signed = e1[:, 0] * e2[:, 1] - e2[:, 0] * e1[:, 1]
    assert (signed > 0).all() or (signed < 0).all()  # no flipped UV triangle in the face
    assert np.abs(signed).min() > 1e-9
    # face seam-free and UV one-to-one with vertices there
    assert not np.isin(model.masks["face"], uv.seam_vertices).any()
    fu = uv.vertex_uv[model.masks["face"]]
    assert len(np.unique(np.round(fu, 7), axis=0)) == len(fu)
    # low distortion on the face: UV edge length / 3D edge length varies little
    e = _directed_edges(model.faces[in_face])
    r = np.linalg.norm(uv.vertex_uv[e[:, 0]] - uv.vertex_uv[e[:, 1]], axis=1) / np.linalg.norm(
        model.v_template[e[:, 0]] - model.v_template[e[:, 1]], axis=1
    )
    assert np.percentile(r, 95) / np.percentile(r, 5) < 4.0


def test_masks(model: FlameModel) -> None:
    names = {"face", "lips", "nose", "eye_region", "left_eye_region", "right_eye_region", "left_eyeball",
             "right_eyeball", "forehead", "scalp", "neck", "left_ear", "right_ear", "boundary"}
    assert set(model.masks) == names
    for k, ids in model.masks.items():
        assert ids.dtype == np.int64 and len(ids) > 0, k
        assert ids.min() >= 0 and ids.max() < 5023
    assert_array_equal(model.masks["left_eyeball"], LEFT)
    assert_array_equal(model.masks["right_eyeball"], RIGHT)
    v = model.v_template
    assert v[model.masks["left_ear"], 0].min() > 0.05 and v[model.masks["right_ear"], 0].max() < -0.05
    assert set(model.masks["lips"]) <= set(model.masks["face"])
    assert set(model.masks["nose"]) <= set(model.masks["face"])


def test_landmarks(model: FlameModel) -> None:
    lm = model.landmarks
    assert lm is not None and lm.static_faces.shape == (51,) and lm.static_bary.shape == (51, 3)
    assert lm.static_faces.min() >= 0 and lm.static_faces.max() < sh.N_HEAD_FACES
    assert (lm.static_bary >= 0).all()
    assert_allclose(lm.static_bary.sum(1), 1.0, atol=1e-6)
    p = np.einsum("lk,lkc->lc", lm.static_bary, model.v_template[model.faces[lm.static_faces]])
    # iBUG order: right-side points (subject's right = -x) before left-side ones
    assert p[19 - 17, 0] < 0 < p[24 - 17, 0]  # brows
    assert p[36 - 17, 0] < p[39 - 17, 0] < 0 < p[42 - 17, 0] < p[45 - 17, 0]  # eye corners
    assert p[48 - 17, 0] < 0 < p[54 - 17, 0]  # mouth corners
    assert p[30 - 17, 2] == p[:, 2].max() or p[30 - 17, 2] > p[:, 2].max() - 0.005  # nose tip in front
    assert p[27 - 17, 1] > p[30 - 17, 1] > p[33 - 17, 1] > p[51 - 17, 1] > p[57 - 17, 1]  # top to bottom
    J = model.J_regressor @ model.v_template
    assert np.linalg.norm(p[36 - 17] - J[4]) < 0.025 and np.linalg.norm(p[45 - 17] - J[3]) < 0.025
