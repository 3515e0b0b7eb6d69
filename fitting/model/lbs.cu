// FLAME's kinematic chain, its VJP and the vertex Jacobian assembly, fused.
//
// CPU twins: rigid_transforms, rigid_transforms_vjp and flame_jacobian in
// p3dmm.fitting.model.lbs (NumPy), same formulas; here every sum runs in double whatever
// the storage type T (float or double: the _f32 / _f64 wrappers), so results agree with
// the twin to the twin's own round-off (float32 matrix products there, float64 here).
// On CuPy the chain over the joints (a Python loop of small matrix products there) is
// one launch instead of 20-90, and the Jacobian's columns are written in place instead of
// through (M, 15, 3, 3) temporaries, transposes and a concatenation.
//
// Layouts (row-major, C-contiguous):
//   R, GR (n, 3, 3); J, Gt, At (n, 3); parents (n,) int32 with parents[0] = -1 and
//   parents[i] < i; dJ (n, 3, K); dR, dGR (D, n, 3, 3); dAtp (D, n, 3); W (V, n);
//   TR (V, 3, 3); vp (V, 3); shapedirs (V, 3, K); dvp (V, 3, D); out (M, 3, K + D).
//
// Compile-time constant: LBS_MAX_JOINTS, the largest n (local arrays), default 16.

#ifndef LBS_MAX_JOINTS
#define LBS_MAX_JOINTS 16
#endif

// C = A @ B (3x3), C = A^T @ B, y = A @ x, y = A^T @ x; all row-major, double.
__device__ __forceinline__ void lbs_mm(const double* A, const double* B, double* C) {
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j)
            C[3 * i + j] = A[3 * i] * B[j] + A[3 * i + 1] * B[3 + j] + A[3 * i + 2] * B[6 + j];
}
__device__ __forceinline__ void lbs_mtm(const double* A, const double* B, double* C) {
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j) C[3 * i + j] = A[i] * B[j] + A[3 + i] * B[3 + j] + A[6 + i] * B[6 + j];
}
__device__ __forceinline__ void lbs_mv(const double* A, const double* x, double* y) {
    for (int i = 0; i < 3; ++i) y[i] = A[3 * i] * x[0] + A[3 * i + 1] * x[1] + A[3 * i + 2] * x[2];
}
__device__ __forceinline__ void lbs_mtv(const double* A, const double* x, double* y) {
    for (int i = 0; i < 3; ++i) y[i] = A[i] * x[0] + A[3 + i] * x[1] + A[6 + i] * x[2];
}

template <typename T>
__device__ __forceinline__ void lbs_load(const T* p, int k, double* out) {
    for (int e = 0; e < k; ++e) out[e] = (double)p[e];
}

// rigid_transforms: one thread (the chain is sequential over n <= LBS_MAX_JOINTS joints).
template <typename T>
__device__ void lbs_chain(const T* __restrict__ R, const T* __restrict__ J, const int* __restrict__ parents, int n,
                          T* __restrict__ GR, T* __restrict__ Gt, T* __restrict__ At) {
    if (blockIdx.x * blockDim.x + threadIdx.x != 0) return;
    double gr[LBS_MAX_JOINTS][9], gt[LBS_MAX_JOINTS][3];
    for (int i = 0; i < n; ++i) {
        double Ri[9], Ji[3];
        lbs_load(R + 9 * i, 9, Ri);
        lbs_load(J + 3 * i, 3, Ji);
        if (i == 0) {
            for (int e = 0; e < 9; ++e) gr[0][e] = Ri[e];
            for (int e = 0; e < 3; ++e) gt[0][e] = Ji[e];
        } else {
            const int p = parents[i];
            double Jp[3], rel[3], y[3];
            lbs_load(J + 3 * p, 3, Jp);
            for (int e = 0; e < 3; ++e) rel[e] = Ji[e] - Jp[e];
            lbs_mm(gr[p], Ri, gr[i]);
            lbs_mv(gr[p], rel, y);
            for (int e = 0; e < 3; ++e) gt[i][e] = y[e] + gt[p][e];
        }
        double gj[3];
        lbs_mv(gr[i], Ji, gj);
        for (int e = 0; e < 9; ++e) GR[9 * i + e] = (T)gr[i][e];
        for (int e = 0; e < 3; ++e) {
            Gt[3 * i + e] = (T)gt[i][e];
            At[3 * i + e] = (T)(gt[i][e] - gj[e]);
        }
    }
}

// rigid_transforms_vjp (without a posed-joint gradient): one thread.
template <typename T>
__device__ void lbs_chain_vjp(const T* __restrict__ R, const T* __restrict__ J, const int* __restrict__ parents,
                              const T* __restrict__ GR, const T* __restrict__ gAR, const T* __restrict__ gAt, int n,
                              T* __restrict__ gR_out, T* __restrict__ gJ_out) {
    if (blockIdx.x * blockDim.x + threadIdx.x != 0) return;
    double gGt[LBS_MAX_JOINTS][3], gGR[LBS_MAX_JOINTS][9], gJ[LBS_MAX_JOINTS][3], gR[LBS_MAX_JOINTS][9];
    for (int j = 0; j < n; ++j) {
        double a[3], Jj[3], G[9], y[3];
        lbs_load(gAt + 3 * j, 3, a);
        lbs_load(J + 3 * j, 3, Jj);
        lbs_load(GR + 9 * j, 9, G);
        for (int e = 0; e < 3; ++e) gGt[j][e] = a[e];
        for (int r = 0; r < 3; ++r)
            for (int c = 0; c < 3; ++c) gGR[j][3 * r + c] = (double)gAR[9 * j + 3 * r + c] - a[r] * Jj[c];
        lbs_mtv(G, a, y);
        for (int e = 0; e < 3; ++e) gJ[j][e] = -y[e];
    }
    for (int i = n - 1; i > 0; --i) {
        const int p = parents[i];
        double Gp[9], Ri[9], Ji[3], Jp[3], rel[3], trel[3], tmp[9];
        lbs_load(GR + 9 * p, 9, Gp);
        lbs_load(R + 9 * i, 9, Ri);
        lbs_load(J + 3 * i, 3, Ji);
        lbs_load(J + 3 * p, 3, Jp);
        for (int e = 0; e < 3; ++e) rel[e] = Ji[e] - Jp[e];
        lbs_mtm(Gp, gGR[i], gR[i]);
        lbs_mtv(Gp, gGt[i], trel);
        // gGR[p] += gGR[i] @ R[i]^T + outer(gGt[i], rel)
        for (int r = 0; r < 3; ++r)
            for (int c = 0; c < 3; ++c)
                tmp[3 * r + c] = gGR[i][3 * r] * Ri[3 * c] + gGR[i][3 * r + 1] * Ri[3 * c + 1] + gGR[i][3 * r + 2] * Ri[3 * c + 2];
        for (int r = 0; r < 3; ++r)
            for (int c = 0; c < 3; ++c) gGR[p][3 * r + c] = gGR[p][3 * r + c] + tmp[3 * r + c] + gGt[i][r] * rel[c];
        for (int e = 0; e < 3; ++e) {
            gGt[p][e] = gGt[p][e] + gGt[i][e];
            gJ[i][e] = gJ[i][e] + trel[e];
            gJ[p][e] = gJ[p][e] - trel[e];
        }
    }
    for (int e = 0; e < 9; ++e) gR[0][e] = gGR[0][e];
    for (int e = 0; e < 3; ++e) gJ[0][e] = gJ[0][e] + gGt[0][e];
    for (int j = 0; j < n; ++j) {
        for (int e = 0; e < 9; ++e) gR_out[9 * j + e] = (T)gR[j][e];
        for (int e = 0; e < 3; ++e) gJ_out[3 * j + e] = (T)gJ[j][e];
    }
}

// The chain of flame_jacobian, one thread per column c of [K blend-shape coefficients, D
// pose directions]: dAt[:, :, c] (c < K), or dGR[d] and dAtp[d] (d = c - K).
template <typename T>
__device__ void lbs_jacobian_chain(const T* __restrict__ R, const T* __restrict__ J, const T* __restrict__ GR,
                                   const T* __restrict__ dJ, const T* __restrict__ dR, const int* __restrict__ parents,
                                   int n, int K, int D, T* __restrict__ dAt, T* __restrict__ dGR,
                                   T* __restrict__ dAtp) {
    const int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= K + D) return;
    if (c < K) {
        double dgt[LBS_MAX_JOINTS][3];
        for (int i = 0; i < n; ++i) {
            double di[3];
            for (int e = 0; e < 3; ++e) di[e] = (double)dJ[(3 * i + e) * K + c];
            if (i == 0) {
                for (int e = 0; e < 3; ++e) dgt[0][e] = di[e];
            } else {
                const int p = parents[i];
                double Gp[9], rel[3], y[3];
                lbs_load(GR + 9 * p, 9, Gp);
                for (int e = 0; e < 3; ++e) rel[e] = di[e] - (double)dJ[(3 * p + e) * K + c];
                lbs_mv(Gp, rel, y);
                for (int e = 0; e < 3; ++e) dgt[i][e] = y[e] + dgt[p][e];
            }
            double Gi[9], y[3];
            lbs_load(GR + 9 * i, 9, Gi);
            lbs_mv(Gi, di, y);
            for (int e = 0; e < 3; ++e) dAt[(3 * i + e) * K + c] = (T)(dgt[i][e] - y[e]);
        }
        return;
    }
    const int d = c - K;
    double dgr[LBS_MAX_JOINTS][9], dgt[LBS_MAX_JOINTS][3];
    for (int i = 0; i < n; ++i) {
        double dRi[9], Ji[3];
        lbs_load(dR + 9 * ((long long)d * n + i), 9, dRi);
        lbs_load(J + 3 * i, 3, Ji);
        if (i == 0) {
            for (int e = 0; e < 9; ++e) dgr[0][e] = dRi[e];
            for (int e = 0; e < 3; ++e) dgt[0][e] = 0.0;
        } else {
            const int p = parents[i];
            double Ri[9], Gp[9], Jp[3], rel[3], a[9], b[9], y[3];
            lbs_load(R + 9 * i, 9, Ri);
            lbs_load(GR + 9 * p, 9, Gp);
            lbs_load(J + 3 * p, 3, Jp);
            lbs_mm(dgr[p], Ri, a);
            lbs_mm(Gp, dRi, b);
            for (int e = 0; e < 9; ++e) dgr[i][e] = a[e] + b[e];
            for (int e = 0; e < 3; ++e) rel[e] = Ji[e] - Jp[e];
            lbs_mv(dgr[p], rel, y);
            for (int e = 0; e < 3; ++e) dgt[i][e] = y[e] + dgt[p][e];
        }
        double y[3];
        lbs_mv(dgr[i], Ji, y);
        for (int e = 0; e < 9; ++e) dGR[9 * ((long long)d * n + i) + e] = (T)dgr[i][e];
        for (int e = 0; e < 3; ++e) dAtp[3 * ((long long)d * n + i) + e] = (T)(dgt[i][e] - y[e]);
    }
}

// flame_jacobian's rows: one thread per (row m, coordinate i, column c); vertex v = vids[m].
//   c < K:  sum_l TR[v,i,l] S[v,l,c] + sum_j W[v,j] dAt[j,i,c]
//   c >= K (d = c - K):  sum_l (sum_j W[v,j] dGR[d,j,i,l]) vp[v,l] + sum_j W[v,j] dAtp[d,j,i]
//                        + sum_l TR[v,i,l] dvp[v,l,d]
template <typename T>
__device__ void lbs_vertex_jacobian(const long long* __restrict__ vids, int M, int n, int K, int D,
                                    const T* __restrict__ W, const T* __restrict__ TR, const T* __restrict__ vp,
                                    const T* __restrict__ S, const T* __restrict__ dAt, const T* __restrict__ dGR,
                                    const T* __restrict__ dAtp, const T* __restrict__ dvp, T* __restrict__ out) {
    const long long nc = (long long)K + D;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)M * 3 * nc) return;
    const long long c = idx % nc;
    const int i = (int)((idx / nc) % 3);
    const long long m = idx / (3 * nc);
    const long long v = vids[m];
    const T* w = W + v * n;
    const T* tr = TR + 9 * v + 3 * i;
    double acc = 0.0;
    if (c < K) {
        for (int l = 0; l < 3; ++l) acc += (double)tr[l] * (double)S[(v * 3 + l) * K + c];
        for (int j = 0; j < n; ++j) acc += (double)w[j] * (double)dAt[(3 * j + i) * (long long)K + c];
    } else {
        const long long d = c - K;
        for (int l = 0; l < 3; ++l) {
            double t = 0.0;
            for (int j = 0; j < n; ++j) t += (double)w[j] * (double)dGR[9 * (d * n + j) + 3 * i + l];
            acc += t * (double)vp[3 * v + l];
        }
        for (int j = 0; j < n; ++j) acc += (double)w[j] * (double)dAtp[3 * (d * n + j) + i];
        for (int l = 0; l < 3; ++l) acc += (double)tr[l] * (double)dvp[(v * 3 + l) * D + d];
    }
    out[idx] = (T)acc;
}

extern "C" __global__ void lbs_chain_f32(const float* R, const float* J, const int* parents, int n, float* GR,
                                           float* Gt, float* At) {
    lbs_chain<float>(R, J, parents, n, GR, Gt, At);
}
extern "C" __global__ void lbs_chain_vjp_f32(const float* R, const float* J, const int* parents, const float* GR,
                                               const float* gAR, const float* gAt, int n, float* gR, float* gJ) {
    lbs_chain_vjp<float>(R, J, parents, GR, gAR, gAt, n, gR, gJ);
}
extern "C" __global__ void lbs_jacobian_chain_f32(const float* R, const float* J, const float* GR, const float* dJ,
                                                    const float* dR, const int* parents, int n, int K, int D,
                                                    float* dAt, float* dGR, float* dAtp) {
    lbs_jacobian_chain<float>(R, J, GR, dJ, dR, parents, n, K, D, dAt, dGR, dAtp);
}
extern "C" __global__ void lbs_vertex_jacobian_f32(const long long* vids, int M, int n, int K, int D,
                                                     const float* W, const float* TR, const float* vp, const float* S,
                                                     const float* dAt, const float* dGR, const float* dAtp,
                                                     const float* dvp, float* out) {
    lbs_vertex_jacobian<float>(vids, M, n, K, D, W, TR, vp, S, dAt, dGR, dAtp, dvp, out);
}

extern "C" __global__ void lbs_chain_f64(const double* R, const double* J, const int* parents, int n, double* GR,
                                           double* Gt, double* At) {
    lbs_chain<double>(R, J, parents, n, GR, Gt, At);
}
extern "C" __global__ void lbs_chain_vjp_f64(const double* R, const double* J, const int* parents, const double* GR,
                                               const double* gAR, const double* gAt, int n, double* gR, double* gJ) {
    lbs_chain_vjp<double>(R, J, parents, GR, gAR, gAt, n, gR, gJ);
}
extern "C" __global__ void lbs_jacobian_chain_f64(const double* R, const double* J, const double* GR, const double* dJ,
                                                    const double* dR, const int* parents, int n, int K, int D,
                                                    double* dAt, double* dGR, double* dAtp) {
    lbs_jacobian_chain<double>(R, J, GR, dJ, dR, parents, n, K, D, dAt, dGR, dAtp);
}
extern "C" __global__ void lbs_vertex_jacobian_f64(const long long* vids, int M, int n, int K, int D,
                                                     const double* W, const double* TR, const double* vp, const double* S,
                                                     const double* dAt, const double* dGR, const double* dAtp,
                                                     const double* dvp, double* out) {
    lbs_vertex_jacobian<double>(vids, M, n, K, D, W, TR, vp, S, dAt, dGR, dAtp, dvp, out);
}
