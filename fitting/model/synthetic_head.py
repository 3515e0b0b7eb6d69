"""A generated stand-in for FLAME with FLAME's exact dimensions and array format.

FLAME is licence-gated, so tests, the demo, the renderer and synthetic training data
use this head instead. It has 5023 vertices and 9976 triangles in FLAME's layout
(head surface 0..3930, left eyeball 3931..4476, right eyeball 4477..5022), 5 joints
with FLAME's kinematic tree, 300 identity + 100 expression blend shapes, 36 pose
correctives, a UV layout, region masks and a 51-point landmark embedding.

Construction (all counts are exact by design):

* The head surface is the surface lattice of a ``24 x 45 x 13`` box (x, y, z quads):
  ``2(pq + qr + rp) = 3954`` quads on ``3956`` lattice points. Four rectangular blocks
  of quads are removed: the mouth (8 x 2 quads, centred on the front face), two eye
  openings (5 x 2 each) and the neck opening (6 x 3 on the bottom face). Removing an
  ``a x b`` block removes ``(a-1)(b-1)`` interior vertices and ``ab`` quads, so
  ``V = 3956 - 7 - 4 - 4 - 10 = 3931`` and ``F = 2 (3954 - 16 - 10 - 10 - 18) = 7800``
  triangles. Check: for a genus-0 surface with ``h`` boundary loops of total length
  ``B``, ``F = 2V - 4 + 2h - B``; here ``h = 4`` and ``B = 20 + 14 + 14 + 18 = 66``, so
  ``B - 2h = 58``.
* Each eyeball is a UV sphere of 17 rings x 32 segments + 2 poles (546 vertices,
  1088 triangles), so ``F = 7800 + 2 * 1088 = 9976``.
* Geometry: the box lattice is mapped to directions ``(theta, phi)`` (azimuth about
  +y with 0 at the face's front, elevation) seen from a point inside the head; band
  (front, sides, back) lattice points form a latitude-longitude grid whose rows and
  columns are placed so that the holes land on the mouth and the eyes; the top face
  is a concentric-rectangle cap over the crown. Positions are ``c0 + r(theta, phi) w``
  with ``r`` a smooth union of ellipsoids and the neck cylinder plus feature bumps
  (nose, brows, eye sockets, cheeks, lips, chin, ears) and, around each eye, the
  sphere on which the eyelids rest. The bottom face (minus the neck hole) is lofted
  from the jaw line down to the planar neck rim.
* Quads are split along the shorter diagonal with a mirror-consistent tie-break, so
  the mesh is exactly left-right symmetric (see :func:`mirror_vertex_map`).

Everything is generated at call time (about 0.8 s on one core) and cached per ``(seed, dtype)``;
the returned arrays are shared between callers and must not be modified in place.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np

from ..base.errors import InputError
from .arrays import FlameArrays, FlameUV, LandmarkEmbedding
from .params import FLAME_PARENTS

__all__ = [
    "LEFT_EYEBALL",
    "N_FACES",
    "N_HEAD_VERTICES",
    "N_VERTICES",
    "RIGHT_EYEBALL",
    "build_synthetic_flame",
    "expression_sd",
    "identity_sd",
    "mirror_vertex_map",
]

N_VERTICES = 5023
N_FACES = 9976
N_HEAD_VERTICES = 3931
N_HEAD_FACES = 7800
LEFT_EYEBALL = (3931, 4477)  # [start, stop) of the subject's left (+x) eyeball
RIGHT_EYEBALL = (4477, 5023)
N_SHAPE = 300
N_EXPR = 100

# ----------------------------------------------------------------- box lattice
_P, _Q, _R = 24, 45, 13  # quads along x, y, z
_HALF = _P // 2  # front-face column of the face's midline
_CB = 2 * (_P + _R)  # columns around the band
_MOUTH_ROWS = (11, 13)  # lower lip row, corner row 12, upper lip row 13
_MOUTH_LINES = 4  # mouth spans lines -4..4 from the midline
_EYE_ROWS = (31, 33)  # lower lid row, canthus row 32, upper lid row 33
_EYE_LINES = (5, 10)  # each eye spans lines 5..10 from the midline
_NECK_HOLE_X = (9, 15)  # bottom-face quads removed (x range, z range)
_NECK_HOLE_Z = (5, 8)

# eyeballs: 17 rings x 32 segments + 2 poles
_EYE_RINGS, _EYE_SEGS = 17, 32

# ------------------------------------------------------------- template layout
_C0 = np.array([0.0, 0.010, 0.0])  # point the head is star-shaped about
_EYE_CENTRE = np.array([0.0320, 0.0300, 0.0540])  # subject's left eye (+x)
_EYE_RADIUS = 0.0122
_LID_GAP = 0.0016  # eyelids rest this far outside the eyeball
_EYE_OPEN = 0.74  # eye opening half-width as a fraction of the eyeball's angular radius
_PHI_BOTTOM_FRONT = np.deg2rad(-62.0)
_PHI_BOTTOM_BACK = np.deg2rad(-30.0)
_PHI_MOUTH = np.deg2rad(-33.0)
_PHI_TOP = np.deg2rad(52.0)
_NECK_RIM_Y = -0.140
_NECK_AXIS_Z = -0.018
_NECK_RADII = (0.056, 0.058)  # x, z


def _smoothstep(e0: float | np.ndarray, e1: float | np.ndarray, x: np.ndarray) -> np.ndarray:
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3.0 - 2.0 * t)


def _smax(a: np.ndarray, b: np.ndarray, s: float) -> np.ndarray:
    """Smooth maximum with blend width ``s`` (polynomial; exact max when ``|a-b| > s``)."""
    h = np.maximum(s - np.abs(a - b), 0.0) / s
    return np.maximum(a, b) + h * h * s / 4.0


def _directions(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """``(N, 3)`` unit vectors; theta = azimuth about +y from +z towards +x, phi = elevation."""
    cp = np.cos(phi)
    return np.stack([cp * np.sin(theta), np.sin(phi), cp * np.cos(theta)], axis=-1)


def _eye_geometry() -> tuple[float, float, float]:
    """Azimuth, elevation and angular half-width (in azimuth) of the left eye seen from c0."""
    d = _EYE_CENTRE - _C0
    n = np.linalg.norm(d)
    theta = float(np.arctan2(d[0], d[2]))
    phi = float(np.arcsin(d[1] / n))
    cone = float(np.arcsin((_EYE_RADIUS + _LID_GAP) / n))
    return theta, phi, cone / np.cos(phi)


def _front_lines() -> np.ndarray:
    """Azimuth of front-face lines 0..12 (line k is k columns left of the midline)."""
    th_e, _, half = _eye_geometry()
    e0, e1 = th_e - _EYE_OPEN * half, th_e + _EYE_OPEN * half
    lines = np.empty(_HALF + 1)
    lines[: _MOUTH_LINES + 1] = np.linspace(0.0, 0.27, _MOUTH_LINES + 1)
    lines[_EYE_LINES[0] : _EYE_LINES[1] + 1] = np.linspace(e0, e1, _EYE_LINES[1] - _EYE_LINES[0] + 1)
    lines[_EYE_LINES[1] + 1 :] = e1 + 0.13 * np.arange(1, _HALF - _EYE_LINES[1] + 1)
    return lines


def _column_theta(c: np.ndarray) -> np.ndarray:
    """Azimuth of (fractional) band column ``c`` in [0, _CB); 0 at the face's midline."""
    lines = _front_lines()
    th_f = lines[-1]
    rel = np.mod(np.asarray(c, dtype=np.float64) - _HALF + _HALF, _CB) - _HALF  # in [-12, 62)
    front = np.sign(rel) * np.interp(np.abs(rel), np.arange(_HALF + 1), lines)
    back = th_f + (rel - _HALF) * (2.0 * np.pi - 2.0 * th_f) / (_CB - 2 * _HALF)
    th = np.where(rel <= _HALF, front, back)
    return np.where(th > np.pi, th - 2.0 * np.pi, th)


def _front_rows() -> np.ndarray:
    """Elevation of band rows 0..45 on the face's front, before local warps."""
    _, phi_e, _ = _eye_geometry()
    knots_j = [0, _MOUTH_ROWS[0] + 1, _EYE_ROWS[0] + 1, _Q]
    knots_p = [_PHI_BOTTOM_FRONT, _PHI_MOUTH, phi_e, _PHI_TOP]
    return np.interp(np.arange(_Q + 1), knots_j, knots_p)


def _band_phi(theta: np.ndarray, row: np.ndarray) -> np.ndarray:
    """Elevation of band lattice points (column azimuth ``theta``, integer ``row``)."""
    rows = _front_rows()
    at = np.abs(theta)
    # mouth: squeeze the lip rows together so the opening is a slit
    eps = np.deg2rad(0.35)
    closed = rows.copy()
    m0, m1 = _MOUTH_ROWS
    lo, hi = m0 - 4, m1 + 5
    closed[lo : m0 + 1] = np.linspace(rows[lo], _PHI_MOUTH - eps, m0 - lo + 1)
    closed[m0 + 1] = _PHI_MOUTH
    closed[m1 : hi + 1] = np.linspace(_PHI_MOUTH + eps, rows[hi], hi - m1 + 1)
    th_mc = _front_lines()[_MOUTH_LINES]
    w_m = 1.0 - _smoothstep(0.8 * th_mc, th_mc + 0.3, at)
    phi = rows[row] + w_m * (closed[row] - rows[row])
    # eyes: almond-shaped opening, a little taller than one row pair
    th_e, _, half = _eye_geometry()
    hw = _EYE_OPEN * half
    sig = (at - th_e) / hw
    fall = 1.0 - _smoothstep(1.0, 2.3, np.abs(sig))
    s2 = np.minimum(sig * sig, 1.0)
    a_open, a_u, a_l = np.deg2rad(1.2), np.deg2rad(2.6), np.deg2rad(2.2)
    up = row >= _EYE_ROWS[1]
    dn = row <= _EYE_ROWS[0]
    d_up = np.where(up, (a_open - a_u * s2) * fall * 0.55 ** (row - _EYE_ROWS[1]), 0.0)
    d_dn = np.where(dn, -(a_open - a_l * s2) * fall * 0.55 ** np.maximum(_EYE_ROWS[0] - row, 0), 0.0)
    phi = phi + d_up + d_dn
    # back of the head: the band ends higher (at the occiput) than under the chin
    p0 = _PHI_BOTTOM_FRONT + (_PHI_BOTTOM_BACK - _PHI_BOTTOM_FRONT) * _smoothstep(1.2, 2.7, at)
    return p0 + (phi - _PHI_BOTTOM_FRONT) * (_PHI_TOP - p0) / (_PHI_TOP - _PHI_BOTTOM_FRONT)


def _perimeter(X: np.ndarray, Z: np.ndarray) -> np.ndarray:
    """Band column of points on the box's horizontal rectangle boundary (continuous)."""
    X = np.asarray(X, dtype=np.float64)
    Z = np.asarray(Z, dtype=np.float64)
    c = np.where(
        Z >= _R,
        X,
        np.where(X >= _P, _P + (_R - Z), np.where(Z <= 0, _P + _R + (_P - X), 2 * _P + _R + Z)),
    )
    return np.mod(c, _CB)


def _rect_param(X: np.ndarray, Z: np.ndarray, inner: tuple[float, float]) -> tuple[np.ndarray, np.ndarray]:
    """Concentric-rectangle coordinates of a top/bottom face point.

    Returns ``t`` (0 on the inner rectangle, 1 on the face's boundary) and the band column
    of the boundary point on the same "spoke".
    """
    u = X - _P / 2.0
    w = Z - _R / 2.0
    hx, hz = _P / 2.0, _R / 2.0
    ix, iz = inner
    tx = (np.abs(u) - ix) / (hx - ix)
    tz = (np.abs(w) - iz) / (hz - iz)
    t = np.clip(np.maximum(tx, tz), 0.0, 1.0)
    ax = ix + t * (hx - ix)
    az = iz + t * (hz - iz)
    on_x = tx >= tz
    with np.errstate(divide="ignore", invalid="ignore"):
        Uo = np.where(on_x, np.sign(u) * hx, np.where(ax > 0, u * hx / ax, 0.0))
        Wo = np.where(on_x, np.where(az > 0, w * hz / az, 0.0), np.sign(w) * hz)
    return t, _perimeter(Uo + hx, Wo + hz)


# ------------------------------------------------------------- radial function
def _ray_ellipsoid(o: np.ndarray, d: np.ndarray, c: np.ndarray, ax: np.ndarray) -> np.ndarray:
    """Far intersection distance of rays ``o + t d`` with an ellipsoid (0 where missed)."""
    p = (o - c) / ax
    q = d / ax
    a = np.sum(q * q, -1)
    b = 2.0 * np.sum(p * q, -1)
    cc = np.sum(p * p, -1) - 1.0
    disc = b * b - 4.0 * a * cc
    return np.where(disc > 0, (-b + np.sqrt(np.maximum(disc, 0.0))) / (2.0 * a), 0.0)


def _ray_neck(d: np.ndarray) -> np.ndarray:
    """Exit distance of rays from c0 through the neck cylinder capped above c0."""
    rx, rz = _NECK_RADII
    ox, oz = _C0[0], _C0[2] - _NECK_AXIS_Z
    a = (d[:, 0] / rx) ** 2 + (d[:, 2] / rz) ** 2
    b = 2.0 * (ox * d[:, 0] / rx**2 + oz * d[:, 2] / rz**2)
    cc = (ox / rx) ** 2 + (oz / rz) ** 2 - 1.0
    t_side = (-b + np.sqrt(b * b - 4 * a * cc)) / (2 * np.maximum(a, 1e-12))
    with np.errstate(divide="ignore"):
        t_cap = np.where(d[:, 1] > 1e-9, (0.03 - _C0[1]) / np.maximum(d[:, 1], 1e-9), np.inf)
    return np.minimum(t_side, t_cap)


def _bump(
    theta: np.ndarray, phi: np.ndarray, th0: float, ph0: float, sth: float, sph: float, symmetric: bool = True
) -> np.ndarray:
    """Gaussian bump in (theta, phi) at (+-th0, ph0) with widths (sth, sph) radians."""
    g = np.exp(-0.5 * ((phi - ph0) / sph) ** 2)
    if symmetric and th0 != 0.0:
        return g * (np.exp(-0.5 * ((theta - th0) / sth) ** 2) + np.exp(-0.5 * ((theta + th0) / sth) ** 2))
    return g * np.exp(-0.5 * ((theta - th0) / sth) ** 2)


def _radius(theta: np.ndarray, phi: np.ndarray) -> np.ndarray:
    """Distance from c0 to the head surface in direction (theta, phi), metres."""
    d = _directions(theta, phi)
    o = _C0[None, :]
    deg = np.deg2rad
    cranium = _ray_ellipsoid(o, d, np.array([0.0, 0.030, -0.014]), np.array([0.074, 0.098, 0.098]))
    face = _ray_ellipsoid(o, d, np.array([0.0, -0.030, 0.018]), np.array([0.057, 0.066, 0.072]))
    r = _smax(cranium, face, 0.012)
    r = _smax(r, _ray_neck(d), 0.010)
    th_e, ph_e, _ = _eye_geometry()
    # features
    r = r - 0.020 * _bump(theta, phi, th_e, ph_e, 0.25, 0.14)  # eye sockets
    r = r + 0.006 * _bump(theta, phi, 0.42, deg(27.0), 0.28, 0.06)  # brow ridge
    r = r + 0.004 * _bump(theta, phi, 0.0, deg(26.0), 0.25, 0.07)  # glabella
    r = r + 0.007 * _bump(theta, phi, 0.66, deg(2.0), 0.22, 0.13)  # cheekbones
    r = r + 0.004 * _bump(theta, phi, 0.52, deg(-16.0), 0.20, 0.12)  # cheeks
    r = r + 0.004 * _bump(theta, phi, 1.08, deg(-38.0), 0.15, 0.12)  # jaw angles
    # nose: ridge rising from the nasion to the tip, then under-nose back to the lip
    ph = np.rad2deg(phi)
    rise = np.clip((16.0 - ph) / 24.0, 0.0, 1.0) ** 1.25
    fall = np.where(ph < -8.0, np.clip(1.0 - (-8.0 - ph) / 10.0, 0.0, 1.0) ** 0.7, 1.0)
    width = 0.055 + 0.075 * np.clip((16.0 - ph) / 30.0, 0.0, 1.0)
    r = r + 0.026 * rise * fall * np.exp(-0.5 * (theta / width) ** 2)
    r = r + 0.007 * _bump(theta, phi, 0.15, deg(-13.0), 0.05, 0.06)  # alae
    # lips, mouth groove, chin
    r = r + 0.0065 * _bump(theta, phi, 0.0, _PHI_MOUTH + deg(3.2), 0.20, 0.035)
    r = r + 0.0075 * _bump(theta, phi, 0.0, _PHI_MOUTH - deg(3.8), 0.18, 0.04)
    r = r - 0.0025 * _bump(theta, phi, 0.0, _PHI_MOUTH, 0.24, 0.012)
    r = r - 0.003 * _bump(theta, phi, 0.0, _PHI_MOUTH - deg(10.0), 0.2, 0.04)  # labiomental fold
    r = r + 0.007 * _bump(theta, phi, 0.0, deg(-47.0), 0.2, 0.07)  # chin
    # ears: a flap behind the jaw joint with a hollow (concha) in front
    th_ear = np.pi / 2 + 0.16
    r = r + 0.026 * _bump(theta, phi, th_ear, deg(3.0), 0.10, 0.22)
    r = r - 0.009 * _bump(theta, phi, th_ear - 0.03, deg(-1.0), 0.045, 0.08)
    # eyelids rest on a sphere just outside each eyeball
    lid = np.zeros_like(r)
    for s in (1.0, -1.0):
        e = _EYE_CENTRE * np.array([s, 1.0, 1.0])
        lid = np.maximum(lid, _ray_ellipsoid(o, d, e, np.full(3, _EYE_RADIUS + _LID_GAP)))
    return _smax(r, lid, 0.004)


# --------------------------------------------------------------- head surface
class _Lattice:
    """Head-surface lattice: vertex ids, box coordinates and triangle quads."""

    def __init__(self) -> None:
        X, Y, Z = np.meshgrid(np.arange(_P + 1), np.arange(_Q + 1), np.arange(_R + 1), indexing="ij")
        on = (X == 0) | (X == _P) | (Y == 0) | (Y == _Q) | (Z == 0) | (Z == _R)
        ids = -np.ones(X.shape, dtype=np.int64)
        pts = np.stack([X[on], Y[on], Z[on]], 1)
        ids[on] = np.arange(len(pts))
        quad_parts: list[np.ndarray] = []
        for axis, (a1, a2) in ((0, (1, 2)), (1, (2, 0)), (2, (0, 1))):
            n1, n2 = (_P, _Q, _R)[a1], (_P, _Q, _R)[a2]
            gi, gj = np.meshgrid(np.arange(n1), np.arange(n2), indexing="ij")
            i, j = gi.ravel(), gj.ravel()
            for value, outward in ((0, -1), ((_P, _Q, _R)[axis], 1)):
                corners: list[np.ndarray] = []
                for di, dj in ((0, 0), (1, 0), (1, 1), (0, 1)):
                    c: list[Any] = [None, None, None]
                    c[axis] = np.full_like(i, value)
                    c[a1], c[a2] = i + di, j + dj
                    corners.append(np.stack(c, 1))
                q = np.stack(corners, 1)  # (n, 4, 3) CCW about +axis
                if outward < 0:
                    q = q[:, ::-1]
                quad_parts.append(q)
        quads = np.concatenate(quad_parts)  # (nq, 4, 3) lattice coordinates
        lo = quads.min(1)
        keep = np.ones(len(quads), dtype=bool)
        # mouth, eyes (front face z = R) and neck (bottom face y = 0)
        front = (quads[:, :, 2] == _R).all(1)
        bottom = (quads[:, :, 1] == 0).all(1)
        x0, y0, z0 = lo[:, 0], lo[:, 1], lo[:, 2]
        mouth = front & (x0 >= _HALF - _MOUTH_LINES) & (x0 < _HALF + _MOUTH_LINES)
        mouth &= (y0 >= _MOUTH_ROWS[0]) & (y0 < _MOUTH_ROWS[1])
        eye_x = ((x0 >= _HALF + _EYE_LINES[0]) & (x0 < _HALF + _EYE_LINES[1])) | (
            (x0 >= _HALF - _EYE_LINES[1]) & (x0 < _HALF - _EYE_LINES[0])
        )
        eyes = front & eye_x & (y0 >= _EYE_ROWS[0]) & (y0 < _EYE_ROWS[1])
        neck = bottom & (x0 >= _NECK_HOLE_X[0]) & (x0 < _NECK_HOLE_X[1])
        neck &= (z0 >= _NECK_HOLE_Z[0]) & (z0 < _NECK_HOLE_Z[1])
        keep &= ~(mouth | eyes | neck)
        quads = quads[keep]
        qid = ids[quads[..., 0], quads[..., 1], quads[..., 2]]  # (nq, 4)
        used = np.zeros(len(pts), dtype=bool)
        used[qid.ravel()] = True
        remap = -np.ones(len(pts), dtype=np.int64)
        remap[used] = np.arange(int(used.sum()))
        self.points = pts[used]  # (V, 3) lattice coordinates
        self.quads = remap[qid]  # (nq, 4) CCW seen from outside
        self.ids = np.where(ids >= 0, remap[np.maximum(ids, 0)], -1)  # lattice -> vertex id

    def vid(self, X: Any, Y: Any, Z: Any) -> np.ndarray:
        return self.ids[X, Y, Z]

    def band_vid(self, line: Any, row: Any) -> np.ndarray:
        """Vertex id on the front face at ``line`` columns left (+x) of the midline."""
        return self.ids[_HALF + np.asarray(line), np.asarray(row), _R]


def _head_geometry(lat: _Lattice) -> dict[str, np.ndarray]:
    """Template positions and surface coordinates of the head lattice.

    Returns a dict with ``verts (V, 3)``, ``theta``, ``phi`` (direction parameters used
    for UVs and region definitions), ``rho`` (row coordinate: band row, negative on the
    neck, > 45 on the crown), ``kind`` (0 band, 1 crown, 2 neck) and ``t`` (crown/neck
    ring coordinate).
    """
    X, Y, Z = (lat.points[:, k].astype(np.float64) for k in range(3))
    band = (X == 0) | (X == _P) | (Z == 0) | (Z == _R)
    top = ~band & (Y == _Q)
    bot = ~band & (Y == 0)
    V = len(X)
    theta = np.zeros(V)
    phi = np.zeros(V)
    rho = Y.copy()
    t = np.ones(V)
    kind = np.where(band, 0, np.where(top, 1, 2))
    # band
    c = _perimeter(X[band], Z[band])
    theta[band] = _column_theta(c)
    phi[band] = _band_phi(theta[band], Y[band].astype(np.int64))
    # crown
    tt, ct = _rect_param(X[top], Z[top], (0.0, 0.0))
    theta[top] = np.where(tt > 0, _column_theta(ct), 0.0)
    phi[top] = _PHI_TOP + (np.pi / 2 - _PHI_TOP) * (1.0 - tt)
    t[top] = tt
    rho[top] = _Q + 8.0 * (1.0 - tt)
    verts = np.zeros((V, 3))
    sel = band | top
    verts[sel] = _C0 + _radius(theta[sel], phi[sel])[:, None] * _directions(theta[sel], phi[sel])
    # neck: loft from the band's bottom ring to the planar rim
    hx0 = (_NECK_HOLE_X[1] - _NECK_HOLE_X[0]) / 2.0
    hz0 = (_NECK_HOLE_Z[1] - _NECK_HOLE_Z[0]) / 2.0
    tb, cb = _rect_param(X[bot], Z[bot], (hx0, hz0))
    cols = np.arange(_CB, dtype=np.float64)
    th_cols = _column_theta(cols)
    ring = []
    for row in (0, 1):
        ph = _band_phi(th_cols, np.full(_CB, row))
        ring.append(_C0 + _radius(th_cols, ph)[:, None] * _directions(th_cols, ph))

    def interp(a: np.ndarray, cc: np.ndarray) -> np.ndarray:
        i0 = np.floor(cc).astype(np.int64) % _CB
        f = (cc - np.floor(cc))[:, None]
        return a[i0] * (1 - f) + a[(i0 + 1) % _CB] * f

    B = interp(ring[0], cb)
    T1 = interp(ring[1], cb) - B
    T1 /= np.linalg.norm(T1, axis=1, keepdims=True)
    th_b = _column_theta(cb)
    rim_x = _NECK_RADII[0] * np.sin(th_b)
    rim_z = _NECK_AXIS_Z + _NECK_RADII[1] * np.cos(th_b)
    rim = np.stack([rim_x, np.full_like(th_b, _NECK_RIM_Y), rim_z], 1)
    L = np.linalg.norm(B - rim, axis=1, keepdims=True)
    s = tb[:, None]
    h00, h10 = 2 * s**3 - 3 * s**2 + 1, s**3 - 2 * s**2 + s
    h01, h11 = -2 * s**3 + 3 * s**2, s**3 - s**2
    T0 = np.array([0.0, 1.0, 0.0]) * L
    verts[bot] = h00 * rim + h10 * 0.8 * T0 + h01 * B + h11 * 0.8 * L * T1
    theta[bot] = th_b
    p0 = _band_phi(th_b, np.zeros(len(th_b), dtype=np.int64))
    phi[bot] = p0 - (1.0 - tb) * np.deg2rad(16.0)
    t[bot] = tb
    rho[bot] = -6.0 * (1.0 - tb)
    return {"verts": verts, "theta": theta, "phi": phi, "rho": rho, "kind": kind, "t": t}


def _triangulate(quads: np.ndarray, verts: np.ndarray) -> np.ndarray:
    """Split CCW quads along the shorter diagonal; ties broken mirror-consistently."""
    a, b, c, d = (quads[:, k] for k in range(4))
    l_ac = np.sum((verts[a] - verts[c]) ** 2, 1)
    l_bd = np.sum((verts[b] - verts[d]) ** 2, 1)
    # tie-break: the diagonal through the corner farther from the midline plane
    tie = np.isclose(l_ac, l_bd, rtol=1e-9, atol=0.0)
    ac_far = np.maximum(np.abs(verts[a, 0]), np.abs(verts[c, 0])) > np.maximum(np.abs(verts[b, 0]), np.abs(verts[d, 0]))
    use_ac = np.where(tie, ac_far, l_ac < l_bd)
    t1 = np.where(use_ac[:, None], np.stack([a, b, c], 1), np.stack([a, b, d], 1))
    t2 = np.where(use_ac[:, None], np.stack([a, c, d], 1), np.stack([b, c, d], 1))
    return np.concatenate([t1, t2])


def _head_mirror(lat: _Lattice) -> np.ndarray:
    """``(V_head,)`` vertex id of each head vertex's mirror image (x -> -x)."""
    X, Y, Z = lat.points.T
    return lat.ids[_P - X, Y, Z]


# ------------------------------------------------------------------- eyeballs
def _eyeball(centre: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """UV sphere around ``centre`` with its pole axis along +z (the gaze direction).

    Returns ``verts (546, 3)``, ``faces (1088, 3)`` (local ids, CCW from outside),
    ``alpha`` (polar angle from the front pole) and ``psi`` (segment angle) per vertex.
    """
    alpha_r = np.pi * np.arange(1, _EYE_RINGS + 1) / (_EYE_RINGS + 1)
    psi_s = 2.0 * np.pi * np.arange(_EYE_SEGS) / _EYE_SEGS
    A, S = np.meshgrid(alpha_r, psi_s, indexing="ij")
    alpha = np.concatenate([[0.0], A.ravel(), [np.pi]])
    psi = np.concatenate([[0.0], S.ravel(), [0.0]])
    local = np.stack([np.sin(alpha) * np.cos(psi), np.sin(alpha) * np.sin(psi), np.cos(alpha)], 1)
    verts = centre + _EYE_RADIUS * local
    ring = 1 + np.arange(_EYE_RINGS * _EYE_SEGS).reshape(_EYE_RINGS, _EYE_SEGS)
    nxt = np.roll(ring, -1, axis=1)
    back = 1 + _EYE_RINGS * _EYE_SEGS
    face_parts = [np.stack([np.zeros(_EYE_SEGS, np.int64), ring[0], nxt[0]], 1)]
    for k in range(_EYE_RINGS - 1):
        face_parts.append(np.stack([ring[k], ring[k + 1], nxt[k + 1]], 1))
        face_parts.append(np.stack([ring[k], nxt[k + 1], nxt[k]], 1))
    face_parts.append(np.stack([np.full(_EYE_SEGS, back), nxt[-1], ring[-1]], 1))
    faces = np.concatenate(face_parts).astype(np.int64)
    # orient outward
    tri = verts[faces]
    n = np.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0])
    flip = np.sum(n * (tri.mean(1) - centre), 1) < 0
    faces[flip] = faces[flip][:, ::-1]
    return verts, faces, alpha, psi


def _eyeball_mirror() -> np.ndarray:
    """Local eyeball vertex id of the mirror image (psi -> pi - psi) of each vertex."""
    m = np.arange(2 + _EYE_RINGS * _EYE_SEGS)
    k = np.arange(_EYE_RINGS)[:, None]
    s = np.arange(_EYE_SEGS)[None, :]
    m[1 + (k * _EYE_SEGS + s).ravel()] = 1 + (k * _EYE_SEGS + (_EYE_SEGS // 2 - s) % _EYE_SEGS).ravel()
    return m


# ------------------------------------------------------------------- template
@functools.lru_cache(maxsize=1)
def _template() -> dict[str, Any]:
    """Seed-independent part: mesh, surface coordinates, regions, weights, UVs, landmarks."""
    lat = _Lattice()
    geo = _head_geometry(lat)
    m_head = _head_mirror(lat)
    vh = geo["verts"]
    vh = 0.5 * (vh + vh[m_head] * np.array([-1.0, 1.0, 1.0]))  # exact left-right symmetry
    fh = _triangulate(lat.quads, vh)
    e_left = _EYE_CENTRE.copy()
    e_right = _EYE_CENTRE * np.array([-1.0, 1.0, 1.0])
    vl, fe, alpha, psi = _eyeball(e_left)
    vr, _, _, _ = _eyeball(e_right)
    nh = len(vh)
    verts = np.concatenate([vh, vl, vr])
    me = _eyeball_mirror()
    fe_right = me[fe][:, ::-1]  # mirror image of the left eyeball's triangulation
    faces = np.concatenate([fh, fe + LEFT_EYEBALL[0], fe_right + RIGHT_EYEBALL[0]]).astype(np.int64)
    mirror = np.concatenate([m_head, RIGHT_EYEBALL[0] + me, LEFT_EYEBALL[0] + me]).astype(np.int64)
    # surface coordinates for every vertex (eyeballs take their centre's)
    th_e, ph_e, _ = _eye_geometry()
    n_eye = LEFT_EYEBALL[1] - LEFT_EYEBALL[0]
    theta = np.concatenate([geo["theta"], np.full(n_eye, th_e), np.full(n_eye, -th_e)])
    phi = np.concatenate([geo["phi"], np.full(2 * n_eye, ph_e)])
    rho = np.concatenate([geo["rho"], np.full(2 * n_eye, float(_EYE_ROWS[0] + 1))])
    kind = np.concatenate([geo["kind"], np.full(2 * n_eye, 3)])
    tcap = np.concatenate([geo["t"], np.ones(2 * n_eye)])
    eval_pts = verts.copy()
    eval_pts[LEFT_EYEBALL[0] : LEFT_EYEBALL[1]] = e_left
    eval_pts[RIGHT_EYEBALL[0] : RIGHT_EYEBALL[1]] = e_right
    tp = {
        "lat": lat, "verts": verts, "faces": faces, "mirror": mirror, "theta": theta, "phi": phi,
        "rho": rho, "kind": kind, "t": tcap, "eval_pts": eval_pts, "n_head": nh,
        "eye_centres": (e_left, e_right), "eye_alpha": alpha, "eye_psi": psi, "eye_faces": (fe, fe_right),
    }
    tp["weights"] = _skinning_weights(tp)
    tp["J_regressor"] = _joint_regressor(tp)
    tp["masks"] = _masks(tp)
    tp["uv"] = _uv_layout(tp)
    tp["landmarks"] = _landmarks(tp)
    tp["posedirs"] = _posedirs(tp)
    return tp


def _jaw_weight(theta: np.ndarray, rho: np.ndarray, kind: np.ndarray) -> np.ndarray:
    """Skinning weight of the jaw joint from surface coordinates (before the root split)."""
    at = np.abs(theta)
    th_mc = _front_lines()[_MOUTH_LINES]
    m_row = _MOUTH_ROWS[0] + 1.0
    boundary = m_row + 13.0 * _smoothstep(th_mc, 1.35, at)
    width = 1.0 + 3.0 * _smoothstep(th_mc, th_mc + 0.4, at)
    w = 1.0 - _smoothstep(boundary - width, boundary + width, rho)
    w = w * (1.0 - _smoothstep(1.1, 1.9, at))
    w = w * _smoothstep(-4.0, 0.0, rho)
    return np.where(kind <= 2, w, 0.0)


def _skinning_weights(tp: dict[str, Any]) -> np.ndarray:
    """``(V, 5)`` weights: root on the lower neck, jaw on the lower face, eyes on eyeballs."""
    V = len(tp["verts"])
    kind, rho = tp["kind"], tp["rho"]
    w_root = np.where(kind == 2, 1.0 - _smoothstep(-6.0, -1.5, rho), 0.0)
    w_jaw = _jaw_weight(tp["theta"], rho, kind) * (1.0 - w_root)
    W = np.zeros((V, 5))
    W[:, 0] = w_root
    W[:, 2] = w_jaw
    W[:, 1] = 1.0 - w_root - w_jaw
    W[LEFT_EYEBALL[0] : LEFT_EYEBALL[1]] = [0, 0, 0, 1, 0]
    W[RIGHT_EYEBALL[0] : RIGHT_EYEBALL[1]] = [0, 0, 0, 0, 1]
    return W


def _joint_regressor(tp: dict[str, Any]) -> np.ndarray:
    """``(5, V)`` non-negative rows summing to 1."""
    V = len(tp["verts"])
    kind, rho, theta, phi = tp["kind"], tp["rho"], tp["theta"], tp["phi"]
    Jr = np.zeros((5, V))
    Jr[0] = np.where(kind == 2, np.exp(-(((rho + 3.0) / 0.8) ** 2)), 0.0)
    Jr[1] = np.where(kind != 3, np.exp(-((rho / 0.8) ** 2)), 0.0)
    tmj = np.exp(-(((np.abs(theta) - 1.33) / 0.08) ** 2) - (((phi - np.deg2rad(-7.0)) / 0.07) ** 2))
    Jr[2] = np.where(kind == 0, tmj, 0.0)
    Jr[3, LEFT_EYEBALL[0] : LEFT_EYEBALL[1]] = 1.0
    Jr[4, RIGHT_EYEBALL[0] : RIGHT_EYEBALL[1]] = 1.0
    Jr[Jr < 1e-6 * Jr.max(1, keepdims=True)] = 0.0
    return Jr / Jr.sum(1, keepdims=True)


def _posedirs(tp: dict[str, Any]) -> np.ndarray:
    """``(V, 3, 36)`` pose correctives: a fraction of each joint's extra rotation, locally.

    For joint j (1..4) with feature block ``f = (R_j - I).ravel()`` the corrective is
    ``dv = alpha * w(v) * (R_j - I) (v - J_j)``, i.e. ``posedirs[v, a, 9(j-1) + 3a + b] =
    alpha * w(v) * (v - J_j)[b]``; ``w`` is the neck ring, the jaw's blend zone or an
    upper eyelid.
    """
    v = tp["verts"]
    J = tp["J_regressor"] @ v
    kind, rho, theta, phi = tp["kind"], tp["rho"], tp["theta"], tp["phi"]
    th_e, ph_e, _ = _eye_geometry()
    w_jaw = tp["weights"][:, 2]
    upper = (kind == 0) & (rho >= _EYE_ROWS[1])
    def lid(s: float) -> np.ndarray:
        w = 1.0 - _smoothstep(0.08, 0.3, np.abs(theta - s * th_e))
        w = w * (1.0 - _smoothstep(np.deg2rad(2.0), np.deg2rad(6.0), np.abs(phi - ph_e - np.deg2rad(3.0))))
        return np.where(upper, w, 0.0)

    fields = [
        (1, 0.15 * np.where(kind != 3, 1.0 - _smoothstep(1.5, 6.0, np.abs(rho)), 0.0)),
        (2, 0.25 * 4.0 * w_jaw * (1.0 - w_jaw)),
        (3, 0.08 * lid(1.0)),
        (4, 0.08 * lid(-1.0)),
    ]
    pd = np.zeros((len(v), 3, 36))
    for j, w in fields:
        d = v - J[j]
        for a in range(3):
            pd[:, a, 9 * (j - 1) + 3 * a : 9 * (j - 1) + 3 * a + 3] = w[:, None] * d
    return pd


def _masks(tp: dict[str, Any]) -> dict[str, np.ndarray]:
    """FLAME_masks.pkl-style regions as sorted ``int64`` vertex ids."""
    theta, phi, rho, kind = tp["theta"], np.rad2deg(tp["phi"]), tp["rho"], tp["kind"]
    at = np.abs(theta)
    band = kind == 0
    th_e, ph_e, _ = _eye_geometry()
    ph_e = np.rad2deg(ph_e)
    th_mc = _front_lines()[_MOUTH_LINES]
    th_ear = np.pi / 2 + 0.16
    ids = lambda m: np.nonzero(m)[0].astype(np.int64)
    ear = lambda s: band & (np.abs(theta - s * th_ear) < 0.28) & (np.abs(phi - 3.0) < 24.0)
    left_ear, right_ear = ear(1.0), ear(-1.0)
    eye = lambda s: band & (np.abs(theta - s * th_e) < 0.33) & (np.abs(phi - ph_e) < 10.0)
    left_eye, right_eye = eye(1.0), eye(-1.0)
    scalp = (kind == 1) | (band & ((phi > 40.0) | ((at > 1.95) & (rho > 14.0))))
    scalp &= ~(left_ear | right_ear)
    return {
        "face": ids(band & (at < 1.0) & (phi > -58.0) & (phi < 38.0)),
        "lips": ids(band & (at < th_mc + 0.12) & (rho >= 8.0) & (rho <= 16.0)),
        "nose": ids(band & (at < 0.22) & (phi > -19.0) & (phi < 14.0)),
        "eye_region": ids(left_eye | right_eye),
        "left_eye_region": ids(left_eye),
        "right_eye_region": ids(right_eye),
        "left_eyeball": np.arange(*LEFT_EYEBALL, dtype=np.int64),
        "right_eyeball": np.arange(*RIGHT_EYEBALL, dtype=np.int64),
        "forehead": ids(band & (at < 0.9) & (phi >= 28.0) & (phi < 50.0)),
        "scalp": ids(scalp),
        "neck": ids(kind == 2),
        "left_ear": ids(left_ear),
        "right_ear": ids(right_ear),
        "boundary": ids((kind == 2) & (tp["t"] <= 0.0)),
    }


def _uv_layout(tp: dict[str, Any]) -> FlameUV:
    """Head: sinusoidal projection of the surface directions, cut along the back midline.

    ``u = f(theta) cos(phi)``, ``v = phi`` (f compresses the back of the head), so the
    face is an almost conformal, injective frontal-ish map. Each eyeball has its own disk
    chart (azimuthal about the pupil) in the empty top corners.
    """
    faces = tp["faces"]
    nh = tp["n_head"]
    theta, phi = tp["theta"][:nh], tp["phi"][:nh]
    pole = (tp["kind"][:nh] == 1) & (tp["t"][:nh] <= 0.0)
    fh = faces[: N_HEAD_FACES]
    th_f = theta[fh]
    valid = ~pole[fh]
    hi = np.where(valid, th_f, -np.inf).max(1)
    lo = np.where(valid, th_f, np.inf).min(1)
    wrap = ((hi - lo) > np.pi)[:, None] & (th_f > 0) & valid
    scale = 4.6

    def to_uv(th: np.ndarray, ph: np.ndarray) -> np.ndarray:
        a = np.abs(th)
        f = np.sign(th) * np.where(a <= 1.3, a, 1.3 + 0.5 * (a - 1.3))
        return np.stack([0.5 + f * np.cos(ph) / scale, 0.02 + (ph - np.deg2rad(-80.0)) / scale], -1)

    vt_head = to_uv(theta, phi)
    seam_v = np.unique(fh[wrap])
    vt_seam = to_uv(theta[seam_v] - 2.0 * np.pi, phi[seam_v])
    seam_slot = np.full(nh, -1, dtype=np.int64)
    seam_slot[seam_v] = nh + np.arange(len(seam_v))
    ft_head = np.where(wrap, seam_slot[fh], fh)
    vt = [vt_head, vt_seam]
    ft = [ft_head]
    n_vt = nh + len(seam_v)
    # eyeballs: front pole in the chart centre, back pole split per fan triangle
    alpha, psi = tp["eye_alpha"], tp["eye_psi"]
    n_eye = len(alpha)
    back = n_eye - 1
    rad = 0.14
    for centre_u, fe in zip((0.78, 0.22), tp["eye_faces"]):
        c = np.array([centre_u, 0.82])
        uv = c + rad * (alpha / np.pi)[:, None] * np.stack([np.cos(psi), np.sin(psi)], 1)
        back_faces = np.nonzero((fe == back).any(1))[0]
        others = fe[back_faces][fe[back_faces] != back].reshape(-1, 2)
        ang = np.angle(np.exp(1j * psi[others[:, 0]]) + np.exp(1j * psi[others[:, 1]]))
        uv_back = c + rad * np.stack([np.cos(ang), np.sin(ang)], 1)
        ft_e = fe + n_vt
        slot = n_vt + n_eye + np.arange(len(back_faces))
        ft_e[back_faces] = np.where(fe[back_faces] == back, slot[:, None], ft_e[back_faces])
        vt += [uv, uv_back]
        ft.append(ft_e)
        n_vt += n_eye + len(back_faces)
    return FlameUV.from_faces(np.concatenate(vt), np.concatenate(ft), faces, len(tp["verts"]))


# iBUG-68 points 17..67 as (line, row) on the front lattice; line > 0 is the subject's left
_LANDMARK_GRID = (
    [(-11.0, 35.5), (-9.5, 36.5), (-8.0, 37.0), (-6.5, 37.0), (-4.8, 36.5)]  # right brow 17-21
    + [(4.8, 36.5), (6.5, 37.0), (8.0, 37.0), (9.5, 36.5), (11.0, 35.5)]  # left brow 22-26
    + [(0.0, 30.5), (0.0, 27.0), (0.0, 24.0), (0.0, 22.0)]  # nose bridge 27-30
    + [(-1.8, 19.0), (-0.9, 18.6), (0.0, 18.4), (0.9, 18.6), (1.8, 19.0)]  # nostrils 31-35
    + [(-10.0, 32.0), (-8.2, 33.0), (-6.8, 33.0), (-5.0, 32.0), (-6.8, 31.0), (-8.2, 31.0)]  # right eye 36-41
    + [(5.0, 32.0), (6.8, 33.0), (8.2, 33.0), (10.0, 32.0), (8.2, 31.0), (6.8, 31.0)]  # left eye 42-47
    + [(-4.3, 12.0), (-2.8, 14.5), (-1.0, 15.2), (0.0, 15.0), (1.0, 15.2), (2.8, 14.5), (4.3, 12.0)]  # 48-54
    + [(2.8, 9.3), (1.2, 8.5), (0.0, 8.3), (-1.2, 8.5), (-2.8, 9.3)]  # outer lower lip 55-59
    + [(-4.0, 12.0), (-2.0, 13.0), (0.0, 13.0), (2.0, 13.0), (4.0, 12.0), (2.0, 11.0), (0.0, 11.0), (-2.0, 11.0)]
)


def _landmarks(tp: dict[str, Any]) -> LandmarkEmbedding:
    """Static 51-point embedding: lattice targets snapped to incident faces."""
    lat, v, faces = tp["lat"], tp["verts"], tp["faces"][:N_HEAD_FACES]
    grid = lat.ids[:, :, _R]  # (P+1, Q+1) front-face vertex ids, -1 in holes
    incident: dict[int, list[int]] = {}
    for fi, tri in enumerate(faces):
        for k in tri:
            incident.setdefault(int(k), []).append(fi)
    lf, lb = [], []
    for line, row in _LANDMARK_GRID:
        x, y = _HALF + line, row
        x0, y0 = int(np.floor(x)), int(np.floor(y))
        fx, fy = x - x0, y - y0
        corners = [
            (x0, y0, (1 - fx) * (1 - fy)),
            (x0 + 1, y0, fx * (1 - fy)),
            (x0, y0 + 1, (1 - fx) * fy),
            (x0 + 1, y0 + 1, fx * fy),
        ]
        target = sum(w * v[grid[i, j]] for i, j, w in corners if w > 0)
        near = max(((w, grid[i, j]) for i, j, w in corners), key=lambda p: p[0])[1]
        best: tuple[Any, int, np.ndarray] | None = None
        for fi in incident[int(near)]:
            a, b, c = v[faces[fi]]
            m = np.stack([b - a, c - a], 1)
            uv, *_ = np.linalg.lstsq(m, target - a, rcond=None)
            bary = np.clip(np.array([1 - uv.sum(), uv[0], uv[1]]), 0.0, None)
            bary /= bary.sum()
            err = np.linalg.norm(bary @ v[faces[fi]] - target)
            if best is None or err < best[0]:
                best = (err, fi, bary)
        assert best is not None  # every vertex has an incident face
        lf.append(best[1])
        lb.append(best[2])
    return LandmarkEmbedding(static_faces=np.array(lf, dtype=np.int64), static_bary=np.array(lb, dtype=np.float32))


# --------------------------------------------------------------- blend shapes
def identity_sd(n: int = N_SHAPE) -> np.ndarray:
    """``(n,)`` standard deviation (= column norm, metres) of identity component k."""
    return 0.45 * (1.0 + np.arange(n)) ** -1.1


def expression_sd(n: int = N_EXPR) -> np.ndarray:
    """``(n,)`` standard deviation (= column norm, metres) of expression component k."""
    return 0.12 * (1.0 + np.arange(n)) ** -0.75


def _orthonormal_columns(fields: np.ndarray) -> np.ndarray:
    """Gram-Schmidt (via QR) of ``(K, V, 3)`` fields in order; returns ``(V*3, K)``."""
    from scipy.linalg import solve_triangular

    q = fields.reshape(len(fields), -1).T
    # Cholesky-QR: q <- q R^-1 with R = chol(q^T q)^T keeps column k in the span of the
    # first k fields (order of importance) like Gram-Schmidt, and is much faster than
    # Householder QR here. The fields are well conditioned (cond ~ 40), so one pass is
    # orthogonal to ~1e-14; a second pass runs only if it is not.
    for _ in range(2):
        L = np.linalg.cholesky(q.T @ q)
        q = q @ solve_triangular(L, np.eye(len(L)), lower=True).T
        if np.linalg.cond(L) < 1e4:
            break
    return q


def _identity_fields(tp: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """``(300, V, 3)`` smooth identity displacement fields, named ones first, then random
    ones of decreasing length scale. Eyeballs take their centre's value (rigid)."""
    p = tp["eval_pts"]
    th, ph, rho = tp["theta"], tp["phi"], tp["rho"]
    x, y, z = p.T
    deg = np.deg2rad
    th_e, ph_e, _ = _eye_geometry()
    G = lambda *a: _bump(th, ph, *a)[:, None]
    out = (p - _C0) / np.linalg.norm(p - _C0, axis=1, keepdims=True)
    zero = np.zeros_like(x)
    vec = lambda a, b, c: np.stack([a + zero, b + zero, c + zero], 1)
    named = [
        p - np.array([0.0, -0.02, 0.0]),  # overall size
        vec(x, 0, 0),  # head width
        vec(0, 0, z + 0.01),  # head length
        vec(0, y - 0.01, 0) * G(0.0, deg(-30.0), 0.8, 0.35),  # lower-face height
        vec(0, -0.4, 1.0) * G(0.0, deg(-6.0), 0.12, 0.15),  # nose length / protrusion
        vec(x, 0, 0) * G(1.0, deg(-35.0), 0.45, 0.3),  # jaw width
        vec(np.sign(x), 0, 0) * G(th_e, ph_e, 0.22, 0.15),  # eye spacing (eyeballs follow)
        out * G(0.6, deg(-12.0), 0.25, 0.2),  # cheek fullness
        out * G(0.0, _PHI_MOUTH, 0.3, 0.08),  # lip thickness
        vec(0, -0.4, 1.0) * G(0.0, deg(-47.0), 0.25, 0.12),  # chin protrusion
        vec(0, 0, y - 0.05) * G(0.0, deg(35.0), 0.6, 0.2),  # forehead slope
        vec(x, 0, 0) * G(0.0, deg(-10.0), 0.15, 0.12),  # nose width
        out * G(np.pi / 2 + 0.16, deg(3.0), 0.15, 0.3),  # ear size
        vec(0, 1, 0) * _smoothstep(35.0, 50.0, rho)[:, None],  # crown height
        vec(0, 0, -1) * G(np.pi, deg(10.0), 0.8, 0.4),  # occiput
    ]
    named = [f / np.sqrt(np.mean(np.sum(f * f, 1))) for f in named]
    n_rand = N_SHAPE - len(named)
    head = np.arange(tp["n_head"])
    k = np.arange(n_rand)
    sigma = 0.06 * (1.0 + k) ** -0.3  # metres, decreasing
    n_b = 4
    centres = p[rng.choice(head, size=(n_rand, n_b))]  # (n_rand, n_b, 3)
    dirs = rng.normal(size=(n_rand, n_b, 3))
    # d2[k, b, v] = |p[v] - centres[k, b]|^2
    d2 = np.sum(p * p, 1)[None, None] - 2.0 * centres @ p.T + np.sum(centres**2, -1)[:, :, None]
    g = np.exp(-0.5 * np.maximum(d2, 0.0) / sigma[:, None, None] ** 2)
    # rand[k, v, c] = sum_b g[k, b, v] * dirs[k, b, c]
    rand = np.matmul(g.transpose(0, 2, 1), dirs)
    return np.concatenate([np.stack(named), rand])


def _expression_fields(tp: dict[str, Any], rng: np.random.Generator) -> np.ndarray:
    """``(100, V, 3)`` local expression fields, exactly zero off the face (scalp, neck,
    ears, eyeballs)."""
    p = tp["eval_pts"]
    th, ph, rho, kind = tp["theta"], tp["phi"], tp["rho"], tp["kind"]
    at = np.abs(th)
    x = p[:, 0]
    deg = np.deg2rad
    th_e, ph_e, _ = _eye_geometry()
    th_mc = _front_lines()[_MOUTH_LINES]
    support = (kind == 0) * (1.0 - _smoothstep(0.8, 1.15, at))
    support = support * _smoothstep(deg(-62.0), deg(-50.0), ph) * (1.0 - _smoothstep(deg(28.0), deg(38.0), ph))
    G = lambda *a: _bump(th, ph, *a)[:, None]
    def Gs(th0: float, ph0: float, sth: float, sph: float) -> np.ndarray:
        return _bump(th, ph, th0, ph0, sth, sph, symmetric=False)[:, None]

    out = (p - _C0) / np.linalg.norm(p - _C0, axis=1, keepdims=True)
    lower = _jaw_weight(th, rho, kind)[:, None]
    upper = 1.0 - lower
    zero = np.zeros_like(x)
    vec = lambda a, b, c: np.stack([a + zero, b + zero, c + zero], 1)
    sx = np.sign(x)
    up_lid = (rho >= _EYE_ROWS[1])[:, None]
    lo_lid = (rho <= _EYE_ROWS[0])[:, None]
    smile_l = vec(0.5, 1.0, -0.4) * Gs(th_mc, _PHI_MOUTH, 0.2, 0.1)
    smile_r = vec(-0.5, 1.0, -0.4) * Gs(-th_mc, _PHI_MOUTH, 0.2, 0.1)
    named = [
        smile_l + smile_r + 0.5 * vec(0, 1, 0) * G(0.5, deg(-15.0), 0.25, 0.15),  # smile
        lower * vec(0, -1.0, -0.2) * G(0.0, deg(-40.0), 0.6, 0.3),  # mouth open
        vec(-15.0 * x, 0, 1.0) * G(0.0, _PHI_MOUTH, 0.3, 0.07),  # pucker
        vec(0, 1, 0) * G(0.45, deg(26.0), 0.4, 0.08),  # brow raise
        vec(-0.7 * sx, -1.0, 0) * G(0.22, deg(25.0), 0.15, 0.07),  # brow furrow
        (up_lid * vec(0, -1.0, 0.1) + 0.3 * lo_lid * vec(0, 1, 0)) * G(th_e, ph_e, 0.2, 0.08),  # eyes close
        smile_l,  # left lip corner
        smile_r,  # right lip corner
        out * G(0.45, deg(-25.0), 0.2, 0.15),  # cheek puff
        vec(0, 1, 0) * G(0.12, deg(0.0), 0.1, 0.1),  # nose wrinkle
        upper * vec(0, 1, 0) * G(0.0, _PHI_MOUTH + deg(5.0), 0.25, 0.06),  # upper lip raise
        lower * vec(0, -1, 0) * G(0.0, _PHI_MOUTH - deg(5.0), 0.25, 0.06),  # lower lip depress
        vec(sx, 0, -0.2) * G(th_mc, _PHI_MOUTH, 0.15, 0.08),  # lip stretch
        vec(1, 0, 0) * G(0.0, _PHI_MOUTH, 0.3, 0.08),  # lips sideways
        (upper - lower) * vec(0, -1, 0) * G(0.0, _PHI_MOUTH, 0.3, 0.05),  # lips press
    ]
    n_rand = N_EXPR - len(named)
    cand = np.nonzero(support > 0.5)[0]
    k = np.arange(n_rand)
    sigma = 0.025 * (1.0 + k) ** -0.3
    n_b = 3
    centres = p[rng.choice(cand, size=(n_rand, n_b))]
    dirs = rng.normal(size=(n_rand, n_b, 3))
    # d2[k, b, v] = |p[v] - centres[k, b]|^2
    d2 = np.sum(p * p, 1)[None, None] - 2.0 * centres @ p.T + np.sum(centres**2, -1)[:, :, None]
    g = np.exp(-0.5 * np.maximum(d2, 0.0) / sigma[:, None, None] ** 2)
    # rand[k, v, c] = sum_b g[k, b, v] * dirs[k, b, c]
    rand = np.matmul(g.transpose(0, 2, 1), dirs)
    fields = np.concatenate([np.stack(named), rand]) * support[None, :, None]
    return fields


# -------------------------------------------------------------------- public
def mirror_vertex_map(model: FlameArrays | None = None) -> np.ndarray:
    """Vertex correspondence under the reflection x -> -x of the synthetic topology.

    Args:
        model: a synthetic model (only its size is checked); None for the bare topology.

    Returns:
        ``(5023,) int64`` ``m`` with ``v_template[m[i]] == v_template[i] * (-1, 1, 1)``;
        ``m[m] == arange(5023)``. The same map holds for every seed (the template is fixed).

    Raises:
        InputError: the model does not have the synthetic head's 5023 vertices.
    """
    if model is not None and model.n_vertices != N_VERTICES:
        raise InputError(f"mirror_vertex_map: model has {model.n_vertices} vertices, expected {N_VERTICES}")
    return _template()["mirror"].copy()


@functools.lru_cache(maxsize=8)
def _build_cached(seed: int, dtype_str: str) -> FlameArrays:
    dtype = np.dtype(dtype_str)
    tp = _template()
    rng_id = np.random.default_rng([seed, 0])
    rng_ex = np.random.default_rng([seed, 1])
    V = len(tp["verts"])
    sd_id = _orthonormal_columns(_identity_fields(tp, rng_id)) * identity_sd()[None, :]
    sd_ex = _orthonormal_columns(_expression_fields(tp, rng_ex)) * expression_sd()[None, :]
    shapedirs = np.concatenate([sd_id, sd_ex], 1).reshape(V, 3, N_SHAPE + N_EXPR)
    return FlameArrays(
        v_template=tp["verts"].astype(dtype),
        faces=tp["faces"].copy(),
        shapedirs=shapedirs.astype(dtype),
        posedirs=tp["posedirs"].astype(dtype),
        J_regressor=tp["J_regressor"].astype(dtype),
        parents=FLAME_PARENTS.copy(),
        lbs_weights=tp["weights"].astype(dtype),
        n_shape=N_SHAPE,
        n_expr=N_EXPR,
        uv=tp["uv"],
        landmarks=tp["landmarks"],
        masks={k: v.copy() for k, v in tp["masks"].items()},
        name=f"synthetic(seed={seed})",
    )


def build_synthetic_flame(seed: int = 0, dtype: Any = np.float32) -> FlameArrays:
    """Generate the synthetic FLAME-format head (called by :meth:`FlameModel.synthetic`).

    Args:
        seed: seeds the random identity/expression components (the template mesh,
            weights, joints, pose correctives, UVs, masks and landmarks are fixed).
        dtype: float dtype of the arrays (float32 or float64).

    Returns:
        The :class:`FlameArrays` with ``v_template (5023, 3)``, ``faces (9976, 3) int64``,
        ``shapedirs (5023, 3, 400)`` (300 identity then 100 expression components whose
        flattened columns are orthogonal with norms :func:`identity_sd` /
        :func:`expression_sd`), ``posedirs (5023, 3, 36)``, ``J_regressor (5, 5023)``,
        ``lbs_weights (5023, 5)``, UVs, masks and a 51-point landmark embedding.
        Results are cached per ``(seed, dtype)`` and shared: do not modify the arrays
        in place (copy them, or use ``dataclasses.replace``).

    Raises:
        InputError: ``dtype`` is not a floating dtype, or ``seed`` is negative.
    """
    dt = np.dtype(dtype)
    if dt.kind != "f":
        raise InputError(f"build_synthetic_flame: dtype must be a float dtype, got {dt}")
    if int(seed) < 0:
        raise InputError(f"build_synthetic_flame: seed must be >= 0, got {seed}")
    return _build_cached(int(seed), dt.str)
