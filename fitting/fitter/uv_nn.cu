// UV nearest-neighbour search on a uniform grid over UV space [0, 1]^2.
//
// Exact semantics (shared with p3dmm.fitting.uv_nn and its CPU emulation
// _grid_search_reference, which follows this file line for line):
//   d(q, p) = fl(fl(dx * dx) + fl(dy * dy)), dx = fl(q.u - p.u), dy = fl(q.v - p.v),
//   all float32, one rounding per operation, NO fused multiply-add (the __f*_rn
//   intrinsics below are never contracted by nvcc). The result is the valid pixel with
//   the smallest d, ties to the lowest pixel index; -1 / +inf when there is none.
//
// Compile-time constant (prepended by load_module as a #define):
//   UVNN_GRID_SIZE  cells per axis, a power of two (so u * G and c / G are exact).

#ifndef UVNN_GRID_SIZE
#define UVNN_GRID_SIZE 64
#endif

#define UVNN_G UVNN_GRID_SIZE
#define UVNN_INF __int_as_float(0x7f800000)
#define UVNN_NUM_CELLS (UVNN_G * UVNN_G)

static_assert(UVNN_G >= 1 && UVNN_G <= 2048 && (UVNN_G & (UVNN_G - 1)) == 0,
              "UVNN_GRID_SIZE must be a power of two in [1, 2048]");

// Finite test by bits (exponent not all ones), independent of NVRTC's math headers.
__device__ __forceinline__ bool uvnn_isfinite(float x) {
    return (__float_as_uint(x) & 0x7f800000u) != 0x7f800000u;
}

// Cell coordinate of one UV component: clamp(floor(x * G), 0, G - 1). Clamping in float
// before the conversion keeps huge values defined; x is finite here.
__device__ __forceinline__ int uvnn_cell_coord(float x) {
    float t = __fmul_rn(x, (float)UVNN_G);
    if (t < 0.0f) t = 0.0f;
    if (t > (float)(UVNN_G - 1)) t = (float)(UVNN_G - 1);
    return (int)t;
}

// Bin every pixel of a stack of nb images of n pixels each (total = nb * n; nb = 1 for a
// single map): a valid pixel (mask set, both UV channels finite) of image b goes to cell
// b * (G*G + 1) + cy * G + cx, an invalid one to its image's sentinel cell
// b * (G*G + 1) + G*G. Writes per-cell counts (cell_counts has nb * (G*G + 1) entries,
// zeroed by the caller) and the sort key cell * n + pixel (pixel: the index within its
// image), whose ascending order is the stable counting-sort order of each image, the
// images one after the other.
extern "C" __global__ void uvnn_bin_pixels(const float* __restrict__ uv,             // (total, 2)
                                           const unsigned char* __restrict__ mask,   // (total,)
                                           int n,
                                           int total,
                                           int* __restrict__ cell_counts,            // (nb*(G*G+1),)
                                           long long* __restrict__ keys) {           // (total,)
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= total) return;
    int b = i / n;
    int pixel = i - b * n;
    float u = uv[2 * i];
    float v = uv[2 * i + 1];
    int cell = UVNN_NUM_CELLS;
    if (mask[i] != 0 && uvnn_isfinite(u) && uvnn_isfinite(v)) {
        cell = uvnn_cell_coord(v) * UVNN_G + uvnn_cell_coord(u);
    }
    cell += b * (UVNN_NUM_CELLS + 1);
    atomicAdd(&cell_counts[cell], 1);
    keys[i] = (long long)cell * (long long)n + (long long)pixel;
}

// Scan one cell, keeping the float32-nearest pixel with the lowest-index tie-break.
__device__ __forceinline__ void uvnn_visit_cell(int c, float qx, float qy,
                                                const float* __restrict__ uv,
                                                const int* __restrict__ cell_start,
                                                const int* __restrict__ cell_pix,
                                                float& best, int& bestp) {
    int end = cell_start[c + 1];
    for (int k = cell_start[c]; k < end; ++k) {
        int p = cell_pix[k];
        float dx = __fsub_rn(qx, uv[2 * p]);
        float dy = __fsub_rn(qy, uv[2 * p + 1]);
        float d = __fadd_rn(__fmul_rn(dx, dx), __fmul_rn(dy, dy));
        if (d < best || (d == best && p < bestp)) {
            best = d;
            bestp = p;
        }
    }
}

// One thread per query: the query's cell (clamped into the grid), then rings of cells at
// Chebyshev distance r = 1, 2, ... Before ring r, every pixel in rings >= r lies beyond
// one side of the (2r-1) x (2r-1) block of cells centred on the query's cell, so its
// |dx| or |dy| is at least that side's real gap; fl is monotone, so its d is at least
// fl(gap * gap) with gap = fl(real gap) (side positions c / G are exact). Sides with no
// cells beyond them are skipped, which keeps the rule correct for queries outside [0,1].
// Stop when that bound is strictly above the best d (an equal d may still win on index).
// The queries are shared by the nb images of the stack: thread i searches query i % nq
// in image i / nq (whose pixels start at uv + 2 * b * n and whose cells start at
// cell_start + b * (G*G + 1); cell_pix holds pixel indices within the image).
extern "C" __global__ void uvnn_search(const float* __restrict__ query,      // (nq, 2)
                                       int nq,
                                       int nb,
                                       const float* __restrict__ uv_all,     // (nb, n, 2)
                                       int n,
                                       const int* __restrict__ cell_start_all,  // (nb*(G*G+1)+1,)
                                       const int* __restrict__ cell_pix,     // (nb*n,)
                                       int* __restrict__ out_idx,            // (nb, nq)
                                       float* __restrict__ out_dist) {       // (nb, nq)
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= nq * nb) return;
    int b = t / nq;
    int i = t - b * nq;
    const float* __restrict__ uv = uv_all + 2 * (long long)b * n;
    const int* __restrict__ cell_start = cell_start_all + (long long)b * (UVNN_NUM_CELLS + 1);
    const float inv_g = 1.0f / (float)UVNN_G;  // exact: G is a power of two
    float qx = query[2 * i];
    float qy = query[2 * i + 1];
    float best = UVNN_INF;
    int bestp = -1;
    if (!(uvnn_isfinite(qx) && uvnn_isfinite(qy))) {
        out_idx[t] = bestp;
        out_dist[t] = best;
        return;
    }
    int qcx = uvnn_cell_coord(qx);
    int qcy = uvnn_cell_coord(qy);
    for (int r = 0; r < UVNN_G; ++r) {
        if (r > 0) {
            float gap = UVNN_INF;
            if (qcx + r <= UVNN_G - 1) gap = fminf(gap, __fsub_rn(__fmul_rn((float)(qcx + r), inv_g), qx));
            if (qcx - r >= 0) gap = fminf(gap, __fsub_rn(qx, __fmul_rn((float)(qcx - r + 1), inv_g)));
            if (qcy + r <= UVNN_G - 1) gap = fminf(gap, __fsub_rn(__fmul_rn((float)(qcy + r), inv_g), qy));
            if (qcy - r >= 0) gap = fminf(gap, __fsub_rn(qy, __fmul_rn((float)(qcy - r + 1), inv_g)));
            if (gap == UVNN_INF) break;             // ring wholly outside the grid: all seen
            if (__fmul_rn(gap, gap) > best) break;  // nothing further can beat or tie
        }
        int y0 = qcy - r, y1 = qcy + r, x0 = qcx - r, x1 = qcx + r;
        int ylo = y0 < 0 ? 0 : y0;
        int yhi = y1 > UVNN_G - 1 ? UVNN_G - 1 : y1;
        for (int cy = ylo; cy <= yhi; ++cy) {
            if (cy == y0 || cy == y1) {
                int xlo = x0 < 0 ? 0 : x0;
                int xhi = x1 > UVNN_G - 1 ? UVNN_G - 1 : x1;
                for (int cx = xlo; cx <= xhi; ++cx)
                    uvnn_visit_cell(cy * UVNN_G + cx, qx, qy, uv, cell_start, cell_pix, best, bestp);
            } else {
                if (x0 >= 0) uvnn_visit_cell(cy * UVNN_G + x0, qx, qy, uv, cell_start, cell_pix, best, bestp);
                if (x1 <= UVNN_G - 1) uvnn_visit_cell(cy * UVNN_G + x1, qx, qy, uv, cell_start, cell_pix, best, bestp);
            }
        }
    }
    out_idx[t] = bestp;
    out_dist[t] = best;
}
