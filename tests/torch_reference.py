"""Torch expressions of p3dmm's math, for tests and benchmark baselines only.

Written independently of the NumPy code (Rodrigues through ``torch.linalg.matrix_exp``,
homogeneous 4x4 chains) so that agreement means something.
"""

from __future__ import annotations

import numpy as np
import torch


def torch_flame(model, shape, expr, pose, transl):
    """Independent torch expression of FLAME (smplx semantics), Rodrigues via matrix_exp."""
    T = lambda a: torch.as_tensor(np.asarray(a))  # noqa: E731
    v_t, sd, pd = T(model.v_template), T(model.shapedirs), T(model.posedirs)
    Jr, W = T(model.J_regressor), T(model.lbs_weights)
    coeffs = torch.cat([shape, expr])
    v_shaped = v_t + torch.einsum("vik,k->vi", sd, coeffs)
    J = Jr @ v_shaped
    z = torch.zeros_like(pose[:, 0])
    K = torch.stack(
        [
            torch.stack([z, -pose[:, 2], pose[:, 1]], -1),
            torch.stack([pose[:, 2], z, -pose[:, 0]], -1),
            torch.stack([-pose[:, 1], pose[:, 0], z], -1),
        ],
        -2,
    )
    R = torch.linalg.matrix_exp(K)
    eye = torch.eye(3, dtype=R.dtype)
    pf = (R[1:] - eye).reshape(-1)
    v_posed = v_shaped + torch.einsum("vip,p->vi", pd, pf)
    parents = model.parents
    G = [None] * 5
    bottom = torch.tensor([[0, 0, 0, 1]], dtype=R.dtype)
    for i in range(5):
        t = J[i] if i == 0 else J[i] - J[parents[i]]
        Ti = torch.cat([torch.cat([R[i], t[:, None]], 1), bottom], 0)
        G[i] = Ti if i == 0 else G[parents[i]] @ Ti
    G = torch.stack(G)
    A = G.clone()
    A[:, :3, 3] = G[:, :3, 3] - torch.einsum("jik,jk->ji", G[:, :3, :3], J)
    Tv = torch.einsum("vj,jab->vab", W, A)
    vh = torch.cat([v_posed, torch.ones_like(v_posed[:, :1])], 1)
    return torch.einsum("vab,vb->va", Tv[:, :3], vh) + transl


def _skew(r):
    z = torch.zeros_like(r[..., 0])
    return torch.stack(
        [
            torch.stack([z, -r[..., 2], r[..., 1]], -1),
            torch.stack([r[..., 2], z, -r[..., 0]], -1),
            torch.stack([-r[..., 1], r[..., 0], z], -1),
        ],
        -2,
    )


def valid_rows(uv):  # -> torch bool (N,)
    """Rows of ``uv`` (UVTargets) that have a correspondence."""
    n = np.asarray(uv.vertex_ids).shape[0]
    return torch.as_tensor(np.ones(n, bool) if uv.valid is None else np.asarray(uv.valid))


def torch_energy(model, shape, expr, pose, t, log_f, pp, uv, normals, frame, weights, size, shape_prior=None,
                 focal_prior=0.0, pp_prior=None):
    """The fitting energy of ``p3dmm.fitting.fitter.energy`` written with torch autograd.

    Fragments (face ids, barycentrics) and visibility come from ``frame`` and are
    constants, as in the NumPy implementation. Returns a scalar tensor.
    """
    T = lambda a: torch.as_tensor(np.asarray(a))  # noqa: E731
    H, W = size
    S = float(max(H, W))
    R0 = torch.tensor([[1.0, 0, 0], [0, -1.0, 0], [0, 0, -1.0]], dtype=shape.dtype)
    verts = torch_flame(model, shape, expr, pose, torch.zeros(3, dtype=shape.dtype))
    f = torch.exp(log_f)
    # UV term
    ids = T(uv.vertex_ids).long()
    Xc = verts[ids] @ R0.T + t
    proj = f * Xc[:, :2] / Xc[:, 2:3] + pp
    r = (proj - T(uv.pixels)) / S
    rho = torch.sqrt((r * r).sum(-1))
    cap = weights.uv_cap_px / 512.0  # truncated: an inactive target costs the cap
    active = T(frame.visible) & (rho.detach() < cap) & (Xc[:, 2].detach() > 0)
    if uv.valid is not None:
        active = active & T(uv.valid)
    e = weights.uv * torch.where(active, rho, torch.full_like(rho, cap))[valid_rows(uv)].sum() / max(int(uv.n_targets), 1)
    # normal term
    if normals is not None and weights.normal > 0:
        faces = T(model.faces).long()
        cover = (T(frame.face_id) >= 0) & T(normals.mask)
        pix = torch.nonzero(cover.reshape(-1))[:, 0]
        if pix.numel():
            fn = torch.linalg.cross(verts[faces[:, 1]] - verts[faces[:, 0]], verts[faces[:, 2]] - verts[faces[:, 0]])
            m = torch.zeros_like(verts).index_add(0, faces[:, 0], fn).index_add(0, faces[:, 1], fn).index_add(0, faces[:, 2], fn)
            vn = m / m.norm(dim=1, keepdim=True).clamp_min(1e-12)
            fid = T(frame.face_id).reshape(-1)[pix].long()
            b = T(frame.bary).reshape(-1, 3)[pix].to(shape.dtype)
            u = (b[:, :, None] * vn[faces[fid]]).sum(1)
            n = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
            if normals.space == "head":
                Rg = torch.linalg.matrix_exp(_skew(pose[0]))
                n_out = n @ Rg
            else:
                n_out = n @ R0.T
            d = T(normals.normals).reshape(-1, 3)[pix].to(shape.dtype) - n_out
            keep = d.detach().abs().mean(-1) < weights.normal_outlier
            # truncated: uncovered mask pixels and outliers cost 3 * normal_outlier
            n_lost = int(np.asarray(normals.mask).sum()) - int(keep.sum())
            e = e + weights.normal * ((d.abs().sum(-1) * keep).sum() + 3 * weights.normal_outlier * n_lost) / normals.n_pixels
        else:
            e = e + weights.normal * 3 * weights.normal_outlier * int(np.asarray(normals.mask).sum()) / normals.n_pixels
    prior = T(shape_prior).to(shape.dtype) if shape_prior is not None else torch.zeros_like(shape)
    c0 = T(pp_prior).to(shape.dtype) if pp_prior is not None else pp.detach()
    e = e + weights.identity * ((shape - prior) ** 2).sum() + weights.expression * (expr**2).sum()
    e = e + weights.neck * (pose[1] ** 2).sum() + weights.jaw * (pose[2] ** 2).sum() + weights.eyes * (pose[3:] ** 2).sum()
    e = e + weights.principal * (((pp - c0) / S) ** 2).sum() + weights.focal * (log_f - focal_prior) ** 2
    return e
