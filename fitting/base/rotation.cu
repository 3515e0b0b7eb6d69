// Rodrigues' formula, its derivatives and its inverse, fused: one thread per rotation
// (per (direction, rotation) for the JVP). Each kernel replaces a chain of 40-80 CuPy
// element-wise operations of p3dmm.fitting.base.rotation, whose NumPy functions are the
// CPU twins: the same formulas in the same order of operations, in double precision
// whatever the storage type T (float or double; the _f32 / _f64 wrappers), so results
// agree to float64 round-off (libm's sin/cos may differ from CUDA's by an ulp).
//
//   R = I + a K + b K^2,  K = [r]x,  t = |r|
//   a = sin t / t, b = (1 - cos t) / t^2, c = a'(t) / t, d = b'(t) / t
//   (Taylor series below ROT_TAYLOR_THETA, exact to round-off and smooth at 0)
//   VJP:  dL/dr = (c <G,K> + d <G,K^2> - 2 b tr G) r + a w(G) + b (G r + G^T r)
//   JVP:  dR = c (r.v) K + a [v]x + d (r.v) K^2 + b ([v]x K + K [v]x)
//   inverse: Shepperd's quaternion (largest of w, x, y, z; first on ties), w >= 0.
//
// Compile-time constant: ROT_TAYLOR_THETA (radians), default 1e-2 as in rotation.py.

#ifndef ROT_TAYLOR_THETA
#define ROT_TAYLOR_THETA 1e-2
#endif

struct RotCoeffs {
    double a, b, c, d;
};

// Mirrors rotation._rodrigues_coeffs term by term.
__device__ __forceinline__ RotCoeffs rot_coeffs(double theta) {
    const bool small = theta < ROT_TAYLOR_THETA;
    const double t = small ? 1.0 : theta;
    const double t2 = theta * theta;
    const double s = sin(t);
    const double co = cos(t);
    RotCoeffs k;
    if (small) {
        k.a = 1.0 - t2 / 6.0 + t2 * t2 / 120.0;
        k.b = 0.5 - t2 / 24.0 + t2 * t2 / 720.0;
        k.c = -1.0 / 3.0 + t2 / 30.0 - t2 * t2 / 840.0;
        k.d = -1.0 / 12.0 + t2 / 180.0 - t2 * t2 / 6720.0;
    } else {
        k.a = s / t;
        k.b = (1.0 - co) / (t * t);
        k.c = (t * co - s) / (t * t * t);
        k.d = (t * s - 2.0 * (1.0 - co)) / (t * t * t * t);
    }
    return k;
}

__device__ __forceinline__ void rot_skew(const double* r, double* K) {
    K[0] = 0.0;   K[1] = -r[2]; K[2] = r[1];
    K[3] = r[2];  K[4] = 0.0;   K[5] = -r[0];
    K[6] = -r[1]; K[7] = r[0];  K[8] = 0.0;
}

// C = A @ B for row-major 3x3 (sum over k in order, as NumPy's matmul loops).
__device__ __forceinline__ void rot_matmul(const double* A, const double* B, double* C) {
    for (int i = 0; i < 3; ++i)
        for (int j = 0; j < 3; ++j)
            C[3 * i + j] = A[3 * i] * B[j] + A[3 * i + 1] * B[3 + j] + A[3 * i + 2] * B[6 + j];
}

template <typename T>
__device__ __forceinline__ void rot_load3(const T* p, double* r) {
    r[0] = (double)p[0];
    r[1] = (double)p[1];
    r[2] = (double)p[2];
}

// R[n] = rodrigues(r[n]): r (n, 3), R (n, 3, 3).
template <typename T>
__device__ void rot_rodrigues(const T* __restrict__ rv, int n, T* __restrict__ R) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    double r[3], K[9], KK[9];
    rot_load3(rv + 3 * i, r);
    const double theta = sqrt(r[0] * r[0] + r[1] * r[1] + r[2] * r[2]);
    const RotCoeffs k = rot_coeffs(theta);
    rot_skew(r, K);
    rot_matmul(K, K, KK);
    for (int e = 0; e < 9; ++e) {
        const double eye = (e % 4 == 0) ? 1.0 : 0.0;
        R[9 * i + e] = (T)(eye + k.a * K[e] + k.b * KK[e]);
    }
}

// out[n] = dL/dr[n] from G[n] = dL/dR[n]: r (n, 3), G (n, 3, 3), out (n, 3).
template <typename T>
__device__ void rot_rodrigues_vjp(const T* __restrict__ rv, const T* __restrict__ Gv, int n, T* __restrict__ out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    double r[3], G[9];
    rot_load3(rv + 3 * i, r);
    for (int e = 0; e < 9; ++e) G[e] = (double)Gv[9 * i + e];
    const double theta = sqrt(r[0] * r[0] + r[1] * r[1] + r[2] * r[2]);
    const RotCoeffs k = rot_coeffs(theta);
    const double w[3] = {G[7] - G[5], G[2] - G[6], G[3] - G[1]};
    const double trG = G[0] + G[4] + G[8];
    double Gr[3], GTr[3];
    for (int a = 0; a < 3; ++a) {
        Gr[a] = G[3 * a] * r[0] + G[3 * a + 1] * r[1] + G[3 * a + 2] * r[2];
        GTr[a] = G[a] * r[0] + G[3 + a] * r[1] + G[6 + a] * r[2];
    }
    const double rGr = r[0] * Gr[0] + r[1] * Gr[1] + r[2] * Gr[2];
    const double gK = r[0] * w[0] + r[1] * w[1] + r[2] * w[2];
    const double gK2 = rGr - theta * theta * trG;
    const double s = k.c * gK + k.d * gK2 - 2.0 * k.b * trG;
    for (int a = 0; a < 3; ++a) out[3 * i + a] = (T)(s * r[a] + k.a * w[a] + k.b * (Gr[a] + GTr[a]));
}

// out[d, n] = dR[n] along dirs[d, n]: r (n, 3), dirs (D, n, 3), out (D, n, 3, 3).
template <typename T>
__device__ void rot_rodrigues_jvp(const T* __restrict__ rv, const T* __restrict__ dirs, int n, int D,
                                  T* __restrict__ out) {
    long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)n * D) return;
    const int i = (int)(idx % n);  // dirs and out are (D, n, ...): idx = d * n + i
    double r[3], v[3], K[9], Kv[9], KK[9], KvK[9], KKv[9];
    rot_load3(rv + 3 * i, r);
    rot_load3(dirs + 3 * idx, v);
    const double theta = sqrt(r[0] * r[0] + r[1] * r[1] + r[2] * r[2]);
    const RotCoeffs k = rot_coeffs(theta);
    rot_skew(r, K);
    rot_skew(v, Kv);
    rot_matmul(K, K, KK);
    rot_matmul(Kv, K, KvK);
    rot_matmul(K, Kv, KKv);
    const double rd = v[0] * r[0] + v[1] * r[1] + v[2] * r[2];
    for (int e = 0; e < 9; ++e)
        out[9 * idx + e] = (T)(k.c * rd * K[e] + k.a * Kv[e] + k.d * rd * KK[e] + k.b * (KvK[e] + KKv[e]));
}

// out[n] = axis-angle of R[n] (angle in [0, pi]): R (n, 3, 3), out (n, 3).
template <typename T>
__device__ void rot_axis_angle(const T* __restrict__ Rv, int n, T* __restrict__ out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    double r[9];
    for (int e = 0; e < 9; ++e) r[e] = (double)Rv[9 * i + e];
    const double t = r[0] + r[4] + r[8];
    // Shepperd: the candidate of the largest of (t, r00, r11, r22), the first on ties (argmax)
    int m = 0;
    double best = t;
    if (r[0] > best) { best = r[0]; m = 1; }
    if (r[4] > best) { best = r[4]; m = 2; }
    if (r[8] > best) { best = r[8]; m = 3; }
    double q[4];
    if (m == 0) {
        const double s = sqrt(fmax(1.0 + t, 1e-12)) * 2.0;
        q[0] = 0.25 * s; q[1] = (r[7] - r[5]) / s; q[2] = (r[2] - r[6]) / s; q[3] = (r[3] - r[1]) / s;
    } else if (m == 1) {
        const double s = sqrt(fmax(1.0 + r[0] - r[4] - r[8], 1e-12)) * 2.0;
        q[0] = (r[7] - r[5]) / s; q[1] = 0.25 * s; q[2] = (r[1] + r[3]) / s; q[3] = (r[2] + r[6]) / s;
    } else if (m == 2) {
        const double s = sqrt(fmax(1.0 - r[0] + r[4] - r[8], 1e-12)) * 2.0;
        q[0] = (r[2] - r[6]) / s; q[1] = (r[1] + r[3]) / s; q[2] = 0.25 * s; q[3] = (r[5] + r[7]) / s;
    } else {
        const double s = sqrt(fmax(1.0 - r[0] - r[4] + r[8], 1e-12)) * 2.0;
        q[0] = (r[3] - r[1]) / s; q[1] = (r[2] + r[6]) / s; q[2] = (r[5] + r[7]) / s; q[3] = 0.25 * s;
    }
    const double sg = q[0] < 0.0 ? -1.0 : 1.0;  // w >= 0: angle in [0, pi]
    for (int e = 0; e < 4; ++e) q[e] = q[e] * sg;
    const double nv = sqrt(q[1] * q[1] + q[2] * q[2] + q[3] * q[3]);
    const double angle = 2.0 * atan2(nv, q[0]);
    const double scale = nv > 1e-12 ? angle / fmax(nv, 1e-300) : 2.0 / fmax(q[0], 1e-300);
    for (int a = 0; a < 3; ++a) out[3 * i + a] = (T)(q[1 + a] * scale);
}

extern "C" __global__ void rot_rodrigues_f32(const float* r, int n, float* R) { rot_rodrigues<float>(r, n, R); }
extern "C" __global__ void rot_rodrigues_f64(const double* r, int n, double* R) { rot_rodrigues<double>(r, n, R); }
extern "C" __global__ void rot_rodrigues_vjp_f32(const float* r, const float* G, int n, float* out) {
    rot_rodrigues_vjp<float>(r, G, n, out);
}
extern "C" __global__ void rot_rodrigues_vjp_f64(const double* r, const double* G, int n, double* out) {
    rot_rodrigues_vjp<double>(r, G, n, out);
}
extern "C" __global__ void rot_rodrigues_jvp_f32(const float* r, const float* dirs, int n, int D, float* out) {
    rot_rodrigues_jvp<float>(r, dirs, n, D, out);
}
extern "C" __global__ void rot_rodrigues_jvp_f64(const double* r, const double* dirs, int n, int D, double* out) {
    rot_rodrigues_jvp<double>(r, dirs, n, D, out);
}
extern "C" __global__ void rot_axis_angle_f32(const float* R, int n, float* out) { rot_axis_angle<float>(R, n, out); }
extern "C" __global__ void rot_axis_angle_f64(const double* R, int n, double* out) { rot_axis_angle<double>(R, n, out); }
