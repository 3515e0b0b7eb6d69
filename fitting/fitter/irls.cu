// Fused element-wise chains of the fitter's GPU path, which is launch-bound: each kernel
// replaces 7-45 CuPy launches. The NumPy code they replace is their CPU twin (it still
// runs on NumPy, and on CuPy with P3DMM_FUSED_KERNELS=0):
//
//   irls_normal_rows_*  fast._add_normal_rows: the IRLS-weighted normal rows
//     wt[r]    = (keep[r / 3] * (w_normal / n_pixels)) / maximum(|d[r]|, eps_n * eps_scale)
//     Jw[r, j] = Jn[r, j] * sqrt(wt[r])                      r over the P * 3 rows
//   irls_uv_rows_*      the dense UV rows of fast.normal_equations
//     wt[a]    = ((w_uv / maximum(n_targets, 1)) / maximum(rho[a], eps_uv * eps_scale)) * active[a]
//     Jw[r, j] = where(active[a], J[r, j], 0) * sqrt(wt[a])  r = 2 a + k
//   nrm_pixels_*        energy.rendered_normals + energy.normal_residuals, per pixel p:
//     f = max(face_id[pix], 0), corners = faces[f], b = bary[pix]
//     vn_c = m[c] / maximum(|m[c]|, 1e-12)           (m: the vertex-normal sums)
//     u = sum_k b_k vn_{corner k},  n = u / maximum(|u|, 1e-12),  n_out = R n
//     d = observed[pix] - n_out,  l1 = |d0| + |d1| + |d2|
//     keep = face_id[pix] >= 0 & mask[pix] & l1 / 3 < outlier,  explained = l1 * keep
//   nrm_pixels_grad_*   the same, plus the per-pixel chain of evaluate_energy's gradient:
//     g_nout = (-(w_normal / n_pixels) * sign(d)) * keep,  g_n = R^T g_nout
//     g_u = (g_n - n (n . g_n)) / maximum(|u|, 1e-12)    (geometry.normalize_vjp)
//     contrib[p, k] = b_k g_u                            (scattered to the corners by the caller)
//
// Exact semantics shared with the twins: the storage type T (float or double: the _f32 /
// _f64 wrappers) is the arithmetic type, as in the chains (every operand there is a T
// array, a T 0-d device array or a Python number, which NumPy/CuPy cast to T first); one
// rounding per operation and no fused multiply-add (the __*_rn intrinsics below are
// never contracted, and the separate CuPy launches cannot contract either); sums of
// three in index order ((x0 + x1) + x2); maximum propagates NaN like np.maximum; sign(0)
// is +0 and sign(NaN) NaN like np.sign. The 3 x 3 products (n_out, g_n) are cuBLAS /
// BLAS matmuls in the chains, whose order of operations is the library's: the kernels
// agree with them to round-off there. Scalars that are 0-d device arrays on the GPU
// path (n_pixels, n_targets, eps_scale) are read through pointers, so nothing is copied
// to or from the host; the Python weights and floors arrive as doubles and are cast to T.
//
// No compile-time constants.

__device__ __forceinline__ float irls_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ double irls_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ float irls_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ double irls_sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ float irls_mul(float a, float b) { return __fmul_rn(a, b); }
__device__ __forceinline__ double irls_mul(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ float irls_sqrt(float a) { return sqrtf(a); }
__device__ __forceinline__ double irls_sqrt(double a) { return sqrt(a); }

// np.maximum: NaN if either operand is NaN (the first one), else the larger.
template <typename T>
__device__ __forceinline__ T irls_maximum(T a, T b) {
    if (a != a) return a;
    if (b != b) return b;
    return a >= b ? a : b;
}

template <typename T>
__device__ __forceinline__ T irls_abs(T a) {
    return a < (T)0 ? -a : (a == (T)0 ? (T)0 : a);  // |-0| = +0, |NaN| = NaN
}

// np.sign: -1, +0 or 1; NaN stays NaN.
template <typename T>
__device__ __forceinline__ T irls_sign(T a) {
    if (a > (T)0) return (T)1;
    if (a < (T)0) return (T)-1;
    return a == (T)0 ? (T)0 : a;
}

// (x0 * y0 + x1 * y1) + x2 * y2
template <typename T>
__device__ __forceinline__ T irls_dot3(T x0, T x1, T x2, T y0, T y1, T y2) {
    return irls_add(irls_add(irls_mul(x0, y0), irls_mul(x1, y1)), irls_mul(x2, y2));
}

// x / maximum(sqrt(x . x), 1e-12), in place; returns the denominator.
template <typename T>
__device__ __forceinline__ T irls_normalize(T* x) {
    const T norm = irls_maximum(irls_sqrt(irls_dot3(x[0], x[1], x[2], x[0], x[1], x[2])), (T)1e-12);
    x[0] = x[0] / norm;
    x[1] = x[1] / norm;
    x[2] = x[2] / norm;
    return norm;
}

// ------------------------------------------------------------------ IRLS row weights
// One thread per element of Jw (rows x nf, row-major, as Jn / J); each recomputes its
// row's weight (a handful of flops) so that the writes stay coalesced.
template <typename T>
__device__ void irls_normal_rows(const T* __restrict__ Jn,           // (rows, nf)
                                 const T* __restrict__ d,            // (rows,) = (P, 3)
                                 const unsigned char* __restrict__ keep,  // (P,)
                                 double w_normal,
                                 const T* __restrict__ n_pixels,     // ()
                                 double eps_n,
                                 const T* __restrict__ eps_scale,    // ()
                                 int rows, int nf,
                                 T* __restrict__ Jw) {               // (rows, nf)
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * nf) return;
    const long long r = i / nf;
    const T scale = (T)w_normal / n_pixels[0];
    const T kept = keep[r / 3] ? (T)1 : (T)0;
    const T wt = irls_mul(kept, scale) / irls_maximum(irls_abs(d[r]), irls_mul((T)eps_n, eps_scale[0]));
    Jw[i] = irls_mul(Jn[i], irls_sqrt(wt));
}

template <typename T>
__device__ void irls_uv_rows(const T* __restrict__ J,                // (2 A, n)
                             const T* __restrict__ rho,              // (A,)
                             const unsigned char* __restrict__ active,  // (A,)
                             double w_uv,
                             const T* __restrict__ n_targets,        // ()
                             double eps_uv,
                             const T* __restrict__ eps_scale,        // ()
                             int rows, int n,
                             T* __restrict__ Jw) {                   // (2 A, n)
    const long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= (long long)rows * n) return;
    const long long a = i / n / 2;
    const bool on = active[a] != 0;
    const T coef = (T)w_uv / irls_maximum(n_targets[0], (T)1);
    T wt = coef / irls_maximum(rho[a], irls_mul((T)eps_uv, eps_scale[0]));
    wt = irls_mul(wt, on ? (T)1 : (T)0);  // inactive rows weigh nothing (unless wt is NaN, as in the chain)
    Jw[i] = irls_mul(on ? J[i] : (T)0, irls_sqrt(wt));  // J is not finite where Z <= 0
}

// ------------------------------------------------------------------ normal-loss pixels
// Per pixel: the interpolated normal and the residual; with grad, the gradient chain
// down to the per-corner contributions. Writes every output of its pixel.
template <typename T>
__device__ void nrm_pixel(long long p,
                          const T* __restrict__ m,            // (V, 3) vertex-normal sums
                          const long long* __restrict__ faces,  // (F, 3)
                          const int* __restrict__ face_id,    // (H * W,)
                          const T* __restrict__ bary,         // (H * W, 3)
                          const long long* __restrict__ pix,  // (P,)
                          const T* __restrict__ observed,     // (H * W, 3)
                          const unsigned char* __restrict__ mask,  // (H * W,)
                          const T* __restrict__ R,            // (3, 3) R_out
                          double outlier,
                          T* __restrict__ d,                  // (P, 3)
                          unsigned char* __restrict__ keep,   // (P,)
                          T* __restrict__ u,                  // (P, 3)
                          long long* __restrict__ corners,    // (P, 3)
                          T* __restrict__ explained,          // (P,)
                          bool grad, double w_normal, const T* __restrict__ n_pixels,
                          T* __restrict__ n_world,            // (P, 3)
                          T* __restrict__ g_nout,             // (P, 3)
                          T* __restrict__ contrib) {          // (P, 3, 3)
    const long long q = pix[p];
    const int fid_raw = face_id[q];
    const long long fid = fid_raw > 0 ? (long long)fid_raw : 0LL;  // empty pixels read face 0
    T b[3], uu[3] = {(T)0, (T)0, (T)0};
    for (int k = 0; k < 3; ++k) {
        const long long c = faces[3 * fid + k];
        corners[3 * p + k] = c;
        b[k] = bary[3 * q + k];
        T vn[3] = {m[3 * c], m[3 * c + 1], m[3 * c + 2]};
        irls_normalize(vn);
        for (int i = 0; i < 3; ++i) {
            const T t = irls_mul(b[k], vn[i]);
            uu[i] = k == 0 ? t : irls_add(uu[i], t);
        }
    }
    T n[3] = {uu[0], uu[1], uu[2]};
    const T unorm = irls_normalize(n);
    T dd[3];
    for (int i = 0; i < 3; ++i) {
        u[3 * p + i] = uu[i];
        const T n_out = irls_dot3(R[3 * i], R[3 * i + 1], R[3 * i + 2], n[0], n[1], n[2]);  // (n @ R^T)_i
        dd[i] = irls_sub(observed[3 * q + i], n_out);
        d[3 * p + i] = dd[i];
    }
    const T l1 = irls_add(irls_add(irls_abs(dd[0]), irls_abs(dd[1])), irls_abs(dd[2]));
    const bool kept = fid_raw >= 0 && mask[q] != 0 && l1 / (T)3 < (T)outlier;
    keep[p] = kept ? 1 : 0;
    const T kf = kept ? (T)1 : (T)0;
    explained[p] = irls_mul(l1, kf);
    if (!grad) return;
    const T s = -((T)w_normal / n_pixels[0]);
    T g[3];
    for (int i = 0; i < 3; ++i) {
        g[i] = irls_mul(irls_mul(s, irls_sign(dd[i])), kf);
        g_nout[3 * p + i] = g[i];
        n_world[3 * p + i] = n[i];
    }
    T gn[3];
    for (int j = 0; j < 3; ++j) gn[j] = irls_dot3(g[0], g[1], g[2], R[j], R[3 + j], R[6 + j]);  // (g @ R)_j
    const T ng = irls_dot3(n[0], n[1], n[2], gn[0], gn[1], gn[2]);
    for (int i = 0; i < 3; ++i) {
        const T gu = irls_sub(gn[i], irls_mul(n[i], ng)) / unorm;
        for (int k = 0; k < 3; ++k) contrib[9 * p + 3 * k + i] = irls_mul(b[k], gu);
    }
}

template <typename T>
__device__ void nrm_pixels(const T* m, const long long* faces, const int* face_id, const T* bary,
                           const long long* pix, const T* observed, const unsigned char* mask, const T* R,
                           double outlier, int P, T* d, unsigned char* keep, T* u, long long* corners,
                           T* explained) {
    const long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= P) return;
    nrm_pixel<T>(p, m, faces, face_id, bary, pix, observed, mask, R, outlier, d, keep, u, corners, explained,
                 false, 0.0, nullptr, nullptr, nullptr, nullptr);
}

template <typename T>
__device__ void nrm_pixels_grad(const T* m, const long long* faces, const int* face_id, const T* bary,
                                const long long* pix, const T* observed, const unsigned char* mask,
                                const T* R, double outlier, int P, double w_normal, const T* n_pixels, T* d,
                                unsigned char* keep, T* u, long long* corners, T* explained, T* n_world,
                                T* g_nout, T* contrib) {
    const long long p = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= P) return;
    nrm_pixel<T>(p, m, faces, face_id, bary, pix, observed, mask, R, outlier, d, keep, u, corners, explained,
                 true, w_normal, n_pixels, n_world, g_nout, contrib);
}

// ------------------------------------------------------------------ entry points
// Written out (not macro-generated) so that every kernel name appears in the source.
extern "C" __global__ void irls_normal_rows_f32(const float* Jn, const float* d, const unsigned char* keep,
                                                double w_normal, const float* n_pixels, double eps_n,
                                                const float* eps_scale, int rows, int nf, float* Jw) {
    irls_normal_rows<float>(Jn, d, keep, w_normal, n_pixels, eps_n, eps_scale, rows, nf, Jw);
}
extern "C" __global__ void irls_normal_rows_f64(const double* Jn, const double* d, const unsigned char* keep,
                                                double w_normal, const double* n_pixels, double eps_n,
                                                const double* eps_scale, int rows, int nf, double* Jw) {
    irls_normal_rows<double>(Jn, d, keep, w_normal, n_pixels, eps_n, eps_scale, rows, nf, Jw);
}
extern "C" __global__ void irls_uv_rows_f32(const float* J, const float* rho, const unsigned char* active,
                                            double w_uv, const float* n_targets, double eps_uv,
                                            const float* eps_scale, int rows, int n, float* Jw) {
    irls_uv_rows<float>(J, rho, active, w_uv, n_targets, eps_uv, eps_scale, rows, n, Jw);
}
extern "C" __global__ void irls_uv_rows_f64(const double* J, const double* rho, const unsigned char* active,
                                            double w_uv, const double* n_targets, double eps_uv,
                                            const double* eps_scale, int rows, int n, double* Jw) {
    irls_uv_rows<double>(J, rho, active, w_uv, n_targets, eps_uv, eps_scale, rows, n, Jw);
}
extern "C" __global__ void nrm_pixels_f32(const float* m, const long long* faces, const int* face_id,
                                          const float* bary, const long long* pix, const float* observed,
                                          const unsigned char* mask, const float* R, double outlier, int P,
                                          float* d, unsigned char* keep, float* u, long long* corners,
                                          float* explained) {
    nrm_pixels<float>(m, faces, face_id, bary, pix, observed, mask, R, outlier, P, d, keep, u, corners, explained);
}
extern "C" __global__ void nrm_pixels_f64(const double* m, const long long* faces, const int* face_id,
                                          const double* bary, const long long* pix, const double* observed,
                                          const unsigned char* mask, const double* R, double outlier, int P,
                                          double* d, unsigned char* keep, double* u, long long* corners,
                                          double* explained) {
    nrm_pixels<double>(m, faces, face_id, bary, pix, observed, mask, R, outlier, P, d, keep, u, corners, explained);
}
extern "C" __global__ void nrm_pixels_grad_f32(const float* m, const long long* faces, const int* face_id,
                                               const float* bary, const long long* pix, const float* observed,
                                               const unsigned char* mask, const float* R, double outlier, int P,
                                               double w_normal, const float* n_pixels, float* d,
                                               unsigned char* keep, float* u, long long* corners,
                                               float* explained, float* n_world, float* g_nout,
                                               float* contrib) {
    nrm_pixels_grad<float>(m, faces, face_id, bary, pix, observed, mask, R, outlier, P, w_normal, n_pixels, d,
                           keep, u, corners, explained, n_world, g_nout, contrib);
}
extern "C" __global__ void nrm_pixels_grad_f64(const double* m, const long long* faces, const int* face_id,
                                               const double* bary, const long long* pix, const double* observed,
                                               const unsigned char* mask, const double* R, double outlier, int P,
                                               double w_normal, const double* n_pixels, double* d,
                                               unsigned char* keep, double* u, long long* corners,
                                               double* explained, double* n_world, double* g_nout,
                                               double* contrib) {
    nrm_pixels_grad<double>(m, faces, face_id, bary, pix, observed, mask, R, outlier, P, w_normal, n_pixels, d,
                            keep, u, corners, explained, n_world, g_nout, contrib);
}
