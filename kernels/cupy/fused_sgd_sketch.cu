// Op `fused_sgd_sketch` (and `sketch`, the same pass with the update switched off).
//
// For each matrix W (m x n) of a batch, in one pass over W:
//     (optional) torch.optim.SGD update of W and of its momentum buffer, in fp32 (fp64) arithmetic
//     Y = W V   (m x k)    Z = W^T U   (n x k)    row_sq = sums of squares of rows    fro2 = sum
// of the *updated* W as stored (rounded to its dtype), exactly what the torch reference sketches.
//
// Work decomposition (grid = row bands x column chunks x batch, 256 threads per block):
//   a block owns BM = 64 rows and a chunk of columns, and sweeps that chunk in tiles of BN = 32
//   columns. Each tile is updated, written back, staged in shared memory as acc_t, then
//     Y_band (64 x k)  += W_tile (64 x 32) @ V_tile (32 x k)   accumulated in shared memory over
//                                                               the sweep, one atomicAdd per
//                                                               element at the end (plain store
//                                                               when there is a single chunk)
//     Z_tile (32 x k)   = W_tile^T @ U_band (64 x k)           atomicAdd into Z: the cross-band
//                                                               reduction happens in L2
//   U_band is loaded once per block. k is processed in chunks of 32 (one warp lane per column
//   of the sketch), so any k works; shared memory grows as (64*33 + 160 k) elements.
// Plain fp32 FMA, no tensor cores: every product is exact-fp32 like the torch reference
// (TF32 off). The number of Z atomics is n * k * m / 64; it is the price of one pass over W.
// Atomics make Y, Z (and the float64 fro2/row_sq) depend on the order blocks finish: results
// are reproducible to rounding, not bit for bit. The update itself (W, buf) is elementwise and
// bitwise deterministic.
// All offsets are 64-bit (i64), so matrices beyond 2^31 elements are fine.
#include "common.cuh"

#define FS_BM 64
#define FS_BN 32
#define FS_THREADS 256
#define FS_KC 32
#define FS_LD (FS_BN + 1)  // padded row of the staged tile: conflict-free column reads

// torch.optim.SGD (_single_tensor_sgd) on one element, in its operation order and in the
// arithmetic type A: returns the new weight (before rounding to its dtype) and sets b_new, the
// new momentum buffer value, when there is momentum. keep = 1 - dampening, formed in double on
// the host as torch forms its alpha. One copy serves the fused pass and the plain update.
// Not pinned bit for bit: NVRTC may contract b_old * momentum + keep * g into one FMA either
// way, where torch rounds buf * momentum in a kernel of its own; the GPU tests hold the result
// to torch's own rounding error (an ulp or so), not to equality.
template <class D, class A>
__device__ __forceinline__ A sgd_element(A w, A g, A b_old, A lr_v, A weight_decay, A momentum,
                                         A keep, bool has_momentum, int nesterov, int maximize,
                                         int init_buf, A& b_new)
{
    if (maximize) g = -g;
    if (weight_decay != A(0)) g = g + weight_decay * w;
    if (has_momentum) {
        b_new = init_buf ? g : b_old * momentum + keep * g;
        const A bv = D::round(b_new);  // later uses see the buffer as stored, like torch
        g = nesterov ? g + momentum * bv : bv;
    }
    return w - lr_v * g;
}

template <class D>
__device__ __forceinline__ void fused_body(
    typename D::store_t* __restrict__ W,        // (b, m, n) weights, strides sW*; updated in place
    const typename D::store_t* __restrict__ G,  // (b, m, n) gradient (ignored when update == 0)
    typename D::store_t* __restrict__ buf,      // (b, m, n) momentum buffer or null
    const typename D::acc_t* __restrict__ U,    // (b, m, k) contiguous rows; batch stride sUb (0: shared)
    const typename D::acc_t* __restrict__ V,    // (b, n, k) contiguous rows; batch stride sVb
    typename D::acc_t* __restrict__ Y,          // (b, m, k) zero-initialised output
    typename D::acc_t* __restrict__ Z,          // (b, n, k) zero-initialised output
    double* __restrict__ fro2,                  // (b,) zero-initialised output
    double* __restrict__ row_sq,                // (b, m) zero-initialised output
    i64 m, i64 n, int k, i64 sUb, i64 sVb,
    i64 sWb, i64 sWm, i64 sWn, i64 sGb, i64 sGm, i64 sGn, i64 sBb, i64 sBm, i64 sBn,
    i64 cols_per_chunk,                         // multiple of FS_BN
    int update,                                 // 0: sketch only; 1: SGD update first
    const typename D::acc_t* lr_ptr,            // 0-d device lr or null (then lr is used)
    typename D::acc_t lr, typename D::acc_t weight_decay, typename D::acc_t momentum,
    typename D::acc_t keep,                     // 1 - dampening, formed in double on the host
    int nesterov, int maximize,
    int init_buf,                               // 1: first step, buf = g (torch clones g)
    const i64* __restrict__ table)              // null, or per matrix of the batch the addresses
                                                // of its W, G and buf (0: none): separate
                                                // tensors of one shape, one launch for all
{
    typedef typename D::acc_t A;
    extern __shared__ __align__(16) unsigned char smem_raw[];
    A* Ws = reinterpret_cast<A*>(smem_raw);  // FS_BM x FS_LD  staged updated tile
    A* Us = Ws + FS_BM * FS_LD;              // FS_BM x k      U rows of this band
    A* Vs = Us + FS_BM * k;                  // FS_BN x k      V rows of this tile
    A* Ys = Vs + FS_BN * k;                  // FS_BM x k      Y accumulator of this band

    const int t = threadIdx.x, tx = t & 31, ty = t >> 5;  // 8 warps; a warp shares ty
    const i64 bi = blockIdx.z;
    const i64 r0 = (i64)blockIdx.x * FS_BM;
    const i64 c_begin = (i64)blockIdx.y * cols_per_chunk;
    const i64 c_end = min(n, c_begin + cols_per_chunk);

    typedef typename D::store_t S;
    S* Wb = table ? reinterpret_cast<S*>(table[3 * bi]) : W + bi * sWb;
    const S* Gb = !update ? nullptr
                : table   ? reinterpret_cast<const S*>(table[3 * bi + 1]) : G + bi * sGb;
    S* Bb = table ? reinterpret_cast<S*>(table[3 * bi + 2]) : (buf ? buf + bi * sBb : nullptr);
    const A* Ub = U + bi * sUb;
    const A* Vb = V + bi * sVb;
    A* Yb = Y + bi * m * (i64)k;
    A* Zb = Z + bi * n * (i64)k;
    const bool has_momentum = update && momentum != A(0);
    const A lr_v = (update && lr_ptr) ? *lr_ptr : lr;

    for (int e = t; e < FS_BM * k; e += FS_THREADS) {
        const int r = e / k;
        const i64 gr = r0 + r;
        Us[e] = gr < m ? Ub[r0 * k + e] : A(0);
        Ys[e] = A(0);
    }

    double rs[FS_BM / 8];  // this thread's partial sums of squares of rows ty + 8 i
#pragma unroll
    for (int i = 0; i < FS_BM / 8; ++i) rs[i] = 0.0;

    for (i64 c0 = c_begin; c0 < c_end; c0 += FS_BN) {
        __syncthreads();  // the previous tile's readers are done with Ws / Vs (and Us is ready)
        const i64 gc = c0 + tx;
#pragma unroll
        for (int i = 0; i < FS_BM / 8; ++i) {
            const int r = ty + 8 * i;
            const i64 gr = r0 + r;
            A wf = A(0);
            if (gr < m && gc < c_end) {
                const i64 iw = gr * sWm + gc * sWn;
                A w = D::load(Wb, iw);
                if (update) {
                    const A g = D::load(Gb, gr * sGm + gc * sGn);
                    const i64 ib = gr * sBm + gc * sBn;
                    A b_new = A(0);
                    const A b_old = (has_momentum && !init_buf) ? D::load(Bb, ib) : A(0);
                    w = sgd_element<D, A>(w, g, b_old, lr_v, weight_decay, momentum, keep,
                                          has_momentum, nesterov, maximize, init_buf, b_new);
                    if (has_momentum) D::store(Bb, ib, b_new);
                    D::store(Wb, iw, w);
                    w = D::round(w);  // sketch the weight as stored
                }
                wf = w;
            }
            Ws[r * FS_LD + tx] = wf;
            rs[i] += (double)wf * (double)wf;  // exact square in fp64 (fro2 must not overflow)
        }
        // V rows c0 .. c0+31 are one contiguous block of 32 k elements: coalesced.
        for (int e = t; e < FS_BN * k; e += FS_THREADS) {
            const int c = e / k;
            Vs[e] = (c0 + c) < c_end ? Vb[c0 * k + e] : A(0);
        }
        __syncthreads();

        for (int kc = 0; kc < k; kc += FS_KC) {
            const int j = kc + tx;
            if (j < k) {  // only the last chunk of a k that is not a multiple of 32 diverges
                // Y: this thread owns rows ty*8 .. ty*8+7 of column j. Ws reads are warp broadcasts.
                A acc[8];
#pragma unroll
                for (int i = 0; i < 8; ++i) acc[i] = A(0);
#pragma unroll 8
                for (int c = 0; c < FS_BN; ++c) {
                    const A v = Vs[c * k + j];
#pragma unroll
                    for (int i = 0; i < 8; ++i) acc[i] += Ws[(ty * 8 + i) * FS_LD + c] * v;
                }
#pragma unroll
                for (int i = 0; i < 8; ++i) Ys[(ty * 8 + i) * k + j] += acc[i];
                // Z: this thread owns columns ty*4 .. ty*4+3 of the tile, sketch column j.
                A z[4];
#pragma unroll
                for (int i = 0; i < 4; ++i) z[i] = A(0);
#pragma unroll 8
                for (int r = 0; r < FS_BM; ++r) {
                    const A u = Us[r * k + j];
#pragma unroll
                    for (int i = 0; i < 4; ++i) z[i] += Ws[r * FS_LD + ty * 4 + i] * u;
                }
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const i64 zc = c0 + ty * 4 + i;
                    if (zc < c_end) atomicAdd(&Zb[zc * k + j], z[i]);  // a warp hits 32 consecutive floats
                }
            }
        }
    }
    __syncthreads();

    const bool single_chunk = gridDim.y == 1;
    for (int e = t; e < FS_BM * k; e += FS_THREADS) {
        const int r = e / k;
        if (r0 + r < m) {
            if (single_chunk) Yb[r0 * k + e] = Ys[e];
            else atomicAdd(&Yb[r0 * k + e], Ys[e]);
        }
    }
    double total = 0.0;
#pragma unroll
    for (int i = 0; i < FS_BM / 8; ++i) {
        const double v = warp_sum(rs[i]);  // the 32 lanes of a warp hold the same row
        const i64 gr = r0 + ty + 8 * i;
        if (tx == 0 && gr < m) {
            atomicAdd(&row_sq[bi * m + gr], v);
            total += v;
        }
    }
    if (tx == 0) atomicAdd(&fro2[bi], total);
}

// One entry point per weight dtype (extern "C": stable names for RawModule.get_function).
#define FS_ENTRY(NAME, D)                                                                         \
    extern "C" __global__ void __launch_bounds__(FS_THREADS) NAME(                               \
        D::store_t* W, const D::store_t* G, D::store_t* buf, const D::acc_t* U,                   \
        const D::acc_t* V, D::acc_t* Y, D::acc_t* Z, double* fro2, double* row_sq, i64 m, i64 n, \
        int k, i64 sUb, i64 sVb, i64 sWb, i64 sWm, i64 sWn, i64 sGb, i64 sGm, i64 sGn, i64 sBb,  \
        i64 sBm, i64 sBn, i64 cols_per_chunk, int update, const D::acc_t* lr_ptr, D::acc_t lr,  \
        D::acc_t weight_decay, D::acc_t momentum, D::acc_t keep, int nesterov,                   \
        int maximize, int init_buf, const i64* table) {                                           \
        fused_body<D>(W, G, buf, U, V, Y, Z, fro2, row_sq, m, n, k, sUb, sVb, sWb, sWm, sWn, sGb, \
                      sGm, sGn, sBb, sBm, sBn, cols_per_chunk, update, lr_ptr, lr, weight_decay,  \
                      momentum, keep, nesterov, maximize, init_buf, table);                       \
    }

FS_ENTRY(fused_sgd_sketch_f32, F32)
FS_ENTRY(fused_sgd_sketch_bf16, BF16)
FS_ENTRY(fused_sgd_sketch_f16, F16)
FS_ENTRY(fused_sgd_sketch_f64, F64)

// The plain SGD step (tracking off): elementwise, no shared memory, no barrier, no atomics.
// Block (UP_THREADS) x UP_PER_THREAD consecutive-in-warp columns of one row; the grid's y walks
// the b * m rows (strided past the 65535 grid limit). Loads of a thread's elements are issued
// before any store, so each thread keeps UP_PER_THREAD x (2 or 3) loads in flight.
#define UP_THREADS 256
#define UP_PER_THREAD 4

template <class D>
__device__ __forceinline__ void update_body(
    typename D::store_t* __restrict__ W, const typename D::store_t* __restrict__ G,
    typename D::store_t* __restrict__ buf, i64 m, i64 n, i64 rows,
    i64 sWb, i64 sWm, i64 sWn, i64 sGb, i64 sGm, i64 sGn, i64 sBb, i64 sBm, i64 sBn,
    const typename D::acc_t* lr_ptr, typename D::acc_t lr, typename D::acc_t weight_decay,
    typename D::acc_t momentum, typename D::acc_t keep, int nesterov, int maximize, int init_buf)
{
    typedef typename D::acc_t A;
    const A lr_v = lr_ptr ? *lr_ptr : lr;
    const bool has_momentum = momentum != A(0);
    const i64 c0 = (i64)blockIdx.x * (UP_THREADS * UP_PER_THREAD) + threadIdx.x;
    for (i64 row = blockIdx.y; row < rows; row += gridDim.y) {
        const i64 bi = row / m, r = row - bi * m;
        A w[UP_PER_THREAD], g[UP_PER_THREAD], b[UP_PER_THREAD];
#pragma unroll
        for (int j = 0; j < UP_PER_THREAD; ++j) {
            const i64 c = c0 + j * UP_THREADS;
            w[j] = g[j] = b[j] = A(0);
            if (c < n) {
                w[j] = D::load(W, bi * sWb + r * sWm + c * sWn);
                g[j] = D::load(G, bi * sGb + r * sGm + c * sGn);
                if (has_momentum && !init_buf) b[j] = D::load(buf, bi * sBb + r * sBm + c * sBn);
            }
        }
#pragma unroll
        for (int j = 0; j < UP_PER_THREAD; ++j) {
            const i64 c = c0 + j * UP_THREADS;
            if (c < n) {
                A b_new = A(0);
                const A w_new = sgd_element<D, A>(w[j], g[j], b[j], lr_v, weight_decay, momentum,
                                                  keep, has_momentum, nesterov, maximize,
                                                  init_buf, b_new);
                if (has_momentum) D::store(buf, bi * sBb + r * sBm + c * sBn, b_new);
                D::store(W, bi * sWb + r * sWm + c * sWn, w_new);
            }
        }
    }
}

#define UP_ENTRY(NAME, D)                                                                         \
    extern "C" __global__ void __launch_bounds__(UP_THREADS) NAME(                               \
        D::store_t* W, const D::store_t* G, D::store_t* buf, i64 m, i64 n, i64 rows, i64 sWb,     \
        i64 sWm, i64 sWn, i64 sGb, i64 sGm, i64 sGn, i64 sBb, i64 sBm, i64 sBn,                   \
        const D::acc_t* lr_ptr, D::acc_t lr, D::acc_t weight_decay, D::acc_t momentum,           \
        D::acc_t keep, int nesterov, int maximize, int init_buf) {                                \
        update_body<D>(W, G, buf, m, n, rows, sWb, sWm, sWn, sGb, sGm, sGn, sBb, sBm, sBn,        \
                       lr_ptr, lr, weight_decay, momentum, keep, nesterov, maximize, init_buf);   \
    }

UP_ENTRY(sgd_update_f32, F32)
UP_ENTRY(sgd_update_bf16, BF16)
UP_ENTRY(sgd_update_f16, F16)
UP_ENTRY(sgd_update_f64, F64)
