// Triangle rasterizer: GPU twin of the numba kernels in p3dmm/fitting/raster.py.
//
// Three kernels, launched in order by raster.py:
//   project_vertices  one thread per vertex: pixel position (double) and its fixed-point
//                     snap (SUBPIXEL_BITS fractional bits), validity flag.
//   raster_faces      one thread per face: bounding-box scan, exact integer edge
//                     functions with the top-left fill rule, perspective-correct depth;
//                     atomicMin of the packed key (float depth bits << 32 | face id)
//                     into a uint64 z-buffer. Nearest depth wins, ties -> lowest face id,
//                     independent of thread scheduling.
//   resolve_pixels    one thread per pixel: unpack the winning key, recompute the
//                     perspective-correct barycentrics of the winning face.
//
// Floating-point operations that decide coverage depth use explicit round-to-nearest
// intrinsics (no FMA contraction) so the results match the CPU bit for bit; the module
// is also compiled with --fmad=false.
//
// Conventions (see raster.py for the full contract): pixel (row i, col j) is sampled at
// (x, y) = (j, i); camera-frame vertices, u = f*x/z + cx, v = f*y/z + cy; a face is
// front-facing when its projected signed area
//     (u1-u0)*(v2-v0) - (v1-v0)*(u2-u0)
// is negative (counter-clockwise as displayed with y down).

#ifndef SUBPIXEL_BITS
#define SUBPIXEL_BITS 8
#endif
#ifndef GUARD_BAND_PX
#define GUARD_BAND_PX 2097152.0
#endif

#define EMPTY_KEY 0xFFFFFFFFFFFFFFFFull

typedef long long i64;
typedef unsigned long long u64;

__device__ __forceinline__ double mul_rn(double a, double b) { return __dmul_rn(a, b); }
__device__ __forceinline__ double add_rn(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double sub_rn(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double div_rn(double a, double b) { return __ddiv_rn(a, b); }

// Perspective-correct weights of pixel centre (px, py) in the triangle with projected
// vertices (u_k, v_k) and camera depths z_k. Sub-triangle areas a_k are proportional to
// the screen-space barycentrics; w_k = a_k / z_k; bary_k = w_k / sum(w); depth =
// sum(a) / sum(w). Same operation order as raster.py's _perspective_weights.
__device__ __forceinline__ void perspective_weights(
    double u0, double v0, double u1, double v1, double u2, double v2,
    double z0, double z1, double z2, double px, double py,
    double* b0, double* b1, double* b2, double* depth)
{
    const double a0 = sub_rn(mul_rn(sub_rn(u1, px), sub_rn(v2, py)), mul_rn(sub_rn(v1, py), sub_rn(u2, px)));
    const double a1 = sub_rn(mul_rn(sub_rn(u2, px), sub_rn(v0, py)), mul_rn(sub_rn(v2, py), sub_rn(u0, px)));
    const double a2 = sub_rn(mul_rn(sub_rn(u0, px), sub_rn(v1, py)), mul_rn(sub_rn(v0, py), sub_rn(u1, px)));
    const double w0 = div_rn(a0, z0);
    const double w1 = div_rn(a1, z1);
    const double w2 = div_rn(a2, z2);
    const double s = add_rn(add_rn(w0, w1), w2);
    *b0 = div_rn(w0, s);
    *b1 = div_rn(w1, s);
    *b2 = div_rn(w2, s);
    *depth = div_rn(add_rn(add_rn(a0, a1), a2), s);
}

// Edge function of directed edge a -> b at p, exact in 64-bit integers.
__device__ __forceinline__ i64 edge_function(i64 ax, i64 ay, i64 bx, i64 by, i64 px, i64 py)
{
    return (bx - ax) * (py - ay) - (by - ay) * (px - ax);
}

// Top-left rule for a triangle with positive edge-function interior (y down): an edge
// owns the pixel centres exactly on it when it points up (dy < 0) or is horizontal
// pointing right (a top edge). Returns the bias added before testing ">= 0".
__device__ __forceinline__ i64 fill_bias(i64 ax, i64 ay, i64 bx, i64 by)
{
    const i64 dx = bx - ax;
    const i64 dy = by - ay;
    return (dy < 0 || (dy == 0 && dx > 0)) ? 0 : -1;
}

__device__ __forceinline__ i64 min3(i64 a, i64 b, i64 c) { return min(a, min(b, c)); }
__device__ __forceinline__ i64 max3(i64 a, i64 b, i64 c) { return max(a, max(b, c)); }

extern "C" __global__ void project_vertices(
    const double* __restrict__ verts,  // (V, 3) camera frame
    const int n_verts,
    const double* __restrict__ intr,   // (3,) focal, cx, cy
    const double near_z,
    double* __restrict__ uv,           // (V, 2) out: pixel position
    i64* __restrict__ fixed_uv,        // (V, 2) out: round(uv * 2^SUBPIXEL_BITS)
    int* __restrict__ vert_ok)         // (V,) out: 1 if usable
{
    const int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n_verts) return;
    const double x = verts[3 * i + 0];
    const double y = verts[3 * i + 1];
    const double z = verts[3 * i + 2];
    const double f = intr[0];
    const double u = add_rn(div_rn(mul_rn(f, x), z), intr[1]);
    const double v = add_rn(div_rn(mul_rn(f, y), z), intr[2]);
    const bool ok = isfinite(x) && isfinite(y) && isfinite(z) && z > near_z && isfinite(u) && isfinite(v) &&
                    fabs(u) <= GUARD_BAND_PX && fabs(v) <= GUARD_BAND_PX;
    const double scale = (double)(1ll << SUBPIXEL_BITS);
    uv[2 * i + 0] = u;
    uv[2 * i + 1] = v;
    fixed_uv[2 * i + 0] = ok ? llrint(mul_rn(u, scale)) : 0;
    fixed_uv[2 * i + 1] = ok ? llrint(mul_rn(v, scale)) : 0;
    vert_ok[i] = ok ? 1 : 0;
}

extern "C" __global__ void raster_faces(
    const int* __restrict__ faces,     // (F, 3)
    const int n_faces,
    const int n_verts,
    const double* __restrict__ verts,  // (V, 3) camera frame (z used)
    const double* __restrict__ uv,     // (V, 2)
    const i64* __restrict__ fixed_uv,  // (V, 2)
    const int* __restrict__ vert_ok,   // (V,)
    const int height,
    const int width,
    const int cull_backfaces,
    u64* __restrict__ zbuf)            // (H * W) packed keys, EMPTY_KEY initialised
{
    const int f = blockIdx.x * blockDim.x + threadIdx.x;
    if (f >= n_faces) return;
    const int i0 = faces[3 * f + 0];
    const int i1 = faces[3 * f + 1];
    const int i2 = faces[3 * f + 2];
    if (i0 < 0 || i1 < 0 || i2 < 0 || i0 >= n_verts || i1 >= n_verts || i2 >= n_verts) return;
    if (!(vert_ok[i0] && vert_ok[i1] && vert_ok[i2])) return;

    const i64 x0 = fixed_uv[2 * i0], y0 = fixed_uv[2 * i0 + 1];
    i64 x1 = fixed_uv[2 * i1], y1 = fixed_uv[2 * i1 + 1];
    i64 x2 = fixed_uv[2 * i2], y2 = fixed_uv[2 * i2 + 1];
    const i64 area = edge_function(x0, y0, x1, y1, x2, y2);
    if (area == 0) return;
    if (cull_backfaces && area > 0) return;  // clockwise as displayed: back-facing
    if (area < 0) {                          // orient so the interior is positive
        i64 t = x1; x1 = x2; x2 = t;
        t = y1; y1 = y2; y2 = t;
    }

    const i64 col_lo = max((i64)0, -((-min3(x0, x1, x2)) >> SUBPIXEL_BITS));  // ceil
    const i64 col_hi = min((i64)width - 1, max3(x0, x1, x2) >> SUBPIXEL_BITS);  // floor
    const i64 row_lo = max((i64)0, -((-min3(y0, y1, y2)) >> SUBPIXEL_BITS));
    const i64 row_hi = min((i64)height - 1, max3(y0, y1, y2) >> SUBPIXEL_BITS);
    if (col_lo > col_hi || row_lo > row_hi) return;

    const i64 bias12 = fill_bias(x1, y1, x2, y2);
    const i64 bias20 = fill_bias(x2, y2, x0, y0);
    const i64 bias01 = fill_bias(x0, y0, x1, y1);

    const double u0 = uv[2 * i0], v0 = uv[2 * i0 + 1];
    const double u1 = uv[2 * i1], v1 = uv[2 * i1 + 1];
    const double u2 = uv[2 * i2], v2 = uv[2 * i2 + 1];
    const double z0 = verts[3 * i0 + 2], z1 = verts[3 * i1 + 2], z2 = verts[3 * i2 + 2];

    for (i64 row = row_lo; row <= row_hi; ++row) {
        const i64 py = row << SUBPIXEL_BITS;
        for (i64 col = col_lo; col <= col_hi; ++col) {
            const i64 px = col << SUBPIXEL_BITS;
            if (edge_function(x1, y1, x2, y2, px, py) + bias12 < 0) continue;
            if (edge_function(x2, y2, x0, y0, px, py) + bias20 < 0) continue;
            if (edge_function(x0, y0, x1, y1, px, py) + bias01 < 0) continue;
            double b0, b1, b2, depth;
            perspective_weights(u0, v0, u1, v1, u2, v2, z0, z1, z2, (double)col, (double)row, &b0, &b1, &b2,
                                &depth);
            const float depth32 = __double2float_rn(depth);
            if (!(depth32 > 0.0f) || isinf(depth32)) continue;
            const u64 key = ((u64)__float_as_uint(depth32) << 32) | (u64)(unsigned int)f;
            atomicMin(&zbuf[row * width + col], key);
        }
    }
}

extern "C" __global__ void resolve_pixels(
    const u64* __restrict__ zbuf,      // (H * W)
    const int* __restrict__ faces,     // (F, 3)
    const double* __restrict__ verts,  // (V, 3)
    const double* __restrict__ uv,     // (V, 2)
    const int height,
    const int width,
    int* __restrict__ face_id,         // (H, W) out, -1 empty
    float* __restrict__ bary,          // (H, W, 3) out, 0 empty
    float* __restrict__ depth_out)     // (H, W) out, 0 empty
{
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= height * width) return;
    const u64 key = zbuf[p];
    if (key == EMPTY_KEY) {
        face_id[p] = -1;
        bary[3 * p + 0] = 0.0f;
        bary[3 * p + 1] = 0.0f;
        bary[3 * p + 2] = 0.0f;
        depth_out[p] = 0.0f;
        return;
    }
    const int f = (int)(unsigned int)(key & 0xFFFFFFFFull);
    const int i0 = faces[3 * f + 0];
    const int i1 = faces[3 * f + 1];
    const int i2 = faces[3 * f + 2];
    double b0, b1, b2, depth;
    perspective_weights(uv[2 * i0], uv[2 * i0 + 1], uv[2 * i1], uv[2 * i1 + 1], uv[2 * i2], uv[2 * i2 + 1],
                        verts[3 * i0 + 2], verts[3 * i1 + 2], verts[3 * i2 + 2], (double)(p % width),
                        (double)(p / width), &b0, &b1, &b2, &depth);
    face_id[p] = f;
    bary[3 * p + 0] = __double2float_rn(b0);
    bary[3 * p + 1] = __double2float_rn(b1);
    bary[3 * p + 2] = __double2float_rn(b2);
    depth_out[p] = __uint_as_float((unsigned int)(key >> 32));
}
