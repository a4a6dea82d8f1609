// Op `fused_sgd_sketch` (and `sketch`, the same pass with the update switched off).
//
// For each matrix W (m x n) of a batch, in one pass over W:
//     (optional) torch.optim.SGD update of W and of its momentum buffer, in fp32 (fp64) arithmetic
//     Y = W V   (m x k)    Z = W^T U   (n x k)    row_sq = sums of squares of rows    fro2 = sum
// of the *updated* W as stored (rounded to its dtype), exactly what the torch reference sketches.
//
// Work decomposition (grid = row bands x column chunks x batch, 256 threads per block):
//   a block owns BM = 64 rows and a chunk of columns, and sweeps that chunk in tiles of BN = 32
//   columns. Each tile is updated, written back and staged in shared memory as acc_t, then
//     Y_band (64 x k)  += W_tile (64 x 32) @ V_tile (32 x k)   accumulated in shared memory over
//                                                               the sweep, one atomicAdd per
//                                                               element at the end (plain store
//                                                               when there is a single chunk)
//     Z_tile (32 x k)   = W_tile^T @ U_band (64 x k)           atomicAdd into Z: the cross-band
//                                                               reduction happens in L2
//   U_band is loaded once per block.
// Register tiling: the products are bound by shared-memory reads, not by FMAs, unless each read
// feeds several FMAs. k is processed in chunks of KC (8, 16 or 32, a template parameter: the
// smallest that covers k, so a small k does not leave lanes idle), and each thread computes a
// 4 x 2 block of outputs (4 rows of Y or 4 columns of Z, 2 sketch columns) from one 4-wide read
// of the staged tile and 2-wide reads of V or U: 8 FMAs per 2 shared reads (the first version,
// one output per thread, did one read per FMA and ran at about a quarter of the HBM bandwidth
// at every k <= 32). Where a chunk has fewer outputs than 8 per thread (KC < 32, and Z), the
// reduction dimension is split across the low lanes of a warp and summed with shuffles.
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
#define FS_LDW (FS_BN + 4)  // row of the staged tile: 16-byte aligned for the 4-wide reads
// Rows of U, V and Y in shared memory have ldk = kp + pad elements (kp: k rounded up to KC):
// even, so 2-wide reads are aligned, and padded so that the V rows that one warp reads (4 apart,
// one per split) start KC banks apart and do not conflict: pad 4 for KC = 16, else 2.

// Shared-memory reads of 4 and 2 consecutive elements in one instruction (16-byte alignment is
// the most the dynamic shared memory guarantees, so the 4-wide read of doubles is two 16-byte
// reads).
template <class A> struct __align__(16) Quad { A v[4]; };
template <class A> struct __align__(2 * sizeof(A)) Pair { A v[2]; };

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

template <class D, int KC>
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
    // Thread layout of one chunk of KC sketch columns (t = split + S * (kq + KC/2 * q)):
    //   Y: rows 4 qy .. 4 qy + 3, sketch columns 2 kq, 2 kq + 1, tile columns 4 g .. 4 g + 3
    //      for the column groups g = sy, sy + SY, ... (SY = 32 / KC splits of the 8 groups)
    //   Z: tile columns 4 qz .. 4 qz + 3, sketch columns 2 kq, 2 kq + 1, rows sz, sz + SZ, ...
    //      (SZ = 64 / KC splits of the 64 rows)
    constexpr int KH = KC / 2;
    constexpr int SY = 32 / KC;
    constexpr int SZ = 64 / KC;
    static_assert(KC == 8 || KC == 16 || KC == 32, "KC is 8, 16 or 32");
    static_assert(SY * KH * (FS_BM / 4) == FS_THREADS && SZ * KH * (FS_BN / 4) == FS_THREADS,
                  "every thread owns one 4 x 2 block of Y and one of Z");

    const int kp = (k + KC - 1) / KC * KC;  // k rounded up to whole chunks (zero-padded)
    const int ldk = kp + (KC == 16 ? 4 : 2);  // see the note on ldk above; as chunk_layout()
    extern __shared__ __align__(16) unsigned char smem_raw[];
    A* Ws = reinterpret_cast<A*>(smem_raw);  // FS_BM x FS_LDW  staged updated tile
    A* Us = Ws + FS_BM * FS_LDW;             // FS_BM x ldk     U rows of this band
    A* Vs = Us + FS_BM * ldk;                // FS_BN x ldk     V rows of this tile
    A* Ys = Vs + FS_BN * ldk;                // FS_BM x ldk     Y accumulator of this band

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

    for (int e = t; e < FS_BM * kp; e += FS_THREADS) {
        const int r = e / kp, j = e - r * kp;
        const i64 gr = r0 + r;
        Us[r * ldk + j] = (gr < m && j < k) ? Ub[gr * k + j] : A(0);
        Ys[r * ldk + j] = A(0);
    }

    const int sy = t % SY, qy = t / (SY * KH), ky = t / SY - qy * KH;
    const int sz = t % SZ, qz = t / (SZ * KH), kz = t / SZ - qz * KH;

    double rs[FS_BM / 8];  // this thread's partial sums of squares of rows ty + 8 i
#pragma unroll
    for (int i = 0; i < FS_BM / 8; ++i) rs[i] = 0.0;

    for (i64 c0 = c_begin; c0 < c_end; c0 += FS_BN) {
        __syncthreads();  // the previous tile's readers are done with Ws / Vs (and Us is ready)
        const i64 gc = c0 + tx;
        // Every load of the tile is issued before the first store: a store to W may alias a
        // later load for all the compiler knows, so loading element by element would wait one
        // memory latency per element (8 a tile).
        A wv[FS_BM / 8], gv[FS_BM / 8], bv[FS_BM / 8];
#pragma unroll
        for (int i = 0; i < FS_BM / 8; ++i) {
            const i64 gr = r0 + ty + 8 * i;
            wv[i] = gv[i] = bv[i] = A(0);
            if (gr < m && gc < c_end) {
                wv[i] = D::load(Wb, gr * sWm + gc * sWn);
                if (update) {
                    gv[i] = D::load(Gb, gr * sGm + gc * sGn);
                    if (has_momentum && !init_buf) bv[i] = D::load(Bb, gr * sBm + gc * sBn);
                }
            }
        }
        // V rows c0 .. c0+31 are one contiguous block of 32 k elements: coalesced (and read
        // before the stores below, for the same reason).
        for (int e = t; e < FS_BN * kp; e += FS_THREADS) {
            const int c = e / kp, j = e - c * kp;
            Vs[c * ldk + j] = ((c0 + c) < c_end && j < k) ? Vb[(c0 + c) * k + j] : A(0);
        }
#pragma unroll
        for (int i = 0; i < FS_BM / 8; ++i) {
            const int r = ty + 8 * i;
            const i64 gr = r0 + r;
            A wf = A(0);
            if (gr < m && gc < c_end) {
                A w = wv[i];
                if (update) {
                    A b_new = A(0);
                    w = sgd_element<D, A>(w, gv[i], bv[i], lr_v, weight_decay, momentum, keep,
                                          has_momentum, nesterov, maximize, init_buf, b_new);
                    if (has_momentum) D::store(Bb, gr * sBm + gc * sBn, b_new);
                    D::store(Wb, gr * sWm + gc * sWn, w);
                    w = D::round(w);  // sketch the weight as stored
                }
                wf = w;
            }
            Ws[r * FS_LDW + tx] = wf;
            rs[i] += (double)wf * (double)wf;  // exact square in fp64 (fro2 must not overflow)
        }
        __syncthreads();

        for (int kc = 0; kc < kp; kc += KC) {
            // Y block: 4 rows x 2 sketch columns over this thread's column groups.
            A y[4][2];
#pragma unroll
            for (int i = 0; i < 4; ++i) y[i][0] = y[i][1] = A(0);
#pragma unroll
            for (int gi = 0; gi < FS_BN / 4 / SY; ++gi) {
                const int g = sy + gi * SY;
                Quad<A> w[4];
#pragma unroll
                for (int i = 0; i < 4; ++i)
                    w[i] = *reinterpret_cast<const Quad<A>*>(&Ws[(4 * qy + i) * FS_LDW + 4 * g]);
#pragma unroll
                for (int c = 0; c < 4; ++c) {
                    const Pair<A> v = *reinterpret_cast<const Pair<A>*>(
                        &Vs[(4 * g + c) * ldk + kc + 2 * ky]);
#pragma unroll
                    for (int i = 0; i < 4; ++i) {
                        y[i][0] += w[i].v[c] * v.v[0];
                        y[i][1] += w[i].v[c] * v.v[1];
                    }
                }
            }
            // Z block: 4 tile columns x 2 sketch columns over this thread's rows.
            A z[4][2];
#pragma unroll
            for (int i = 0; i < 4; ++i) z[i][0] = z[i][1] = A(0);
#pragma unroll 4
            for (int ri = 0; ri < FS_BM / SZ; ++ri) {
                const int r = sz + ri * SZ;
                const Quad<A> w = *reinterpret_cast<const Quad<A>*>(&Ws[r * FS_LDW + 4 * qz]);
                const Pair<A> u = *reinterpret_cast<const Pair<A>*>(&Us[r * ldk + kc + 2 * kz]);
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    z[i][0] += w.v[i] * u.v[0];
                    z[i][1] += w.v[i] * u.v[1];
                }
            }
            // Sum the splits (lanes that differ in their low bits), then one lane writes.
#pragma unroll
            for (int off = 1; off < SY; off <<= 1)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    y[i][0] += __shfl_xor_sync(0xffffffffu, y[i][0], off);
                    y[i][1] += __shfl_xor_sync(0xffffffffu, y[i][1], off);
                }
#pragma unroll
            for (int off = 1; off < SZ; off <<= 1)
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    z[i][0] += __shfl_xor_sync(0xffffffffu, z[i][0], off);
                    z[i][1] += __shfl_xor_sync(0xffffffffu, z[i][1], off);
                }
            if (sy == 0) {  // each Ys element has one owner: no race, no barrier needed
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    A* ys = &Ys[(4 * qy + i) * ldk + kc + 2 * ky];
                    ys[0] += y[i][0];
                    ys[1] += y[i][1];
                }
            }
            if (sz == 0) {
                const int j = kc + 2 * kz;
#pragma unroll
                for (int i = 0; i < 4; ++i) {
                    const i64 zc = c0 + 4 * qz + i;
                    if (zc < c_end) {
                        if (j < k) atomicAdd(&Zb[zc * k + j], z[i][0]);
                        if (j + 1 < k) atomicAdd(&Zb[zc * k + j + 1], z[i][1]);
                    }
                }
            }
        }
    }
    __syncthreads();

    const bool single_chunk = gridDim.y == 1;
    for (int e = t; e < FS_BM * k; e += FS_THREADS) {
        const int r = e / k, j = e - r * k;
        if (r0 + r < m) {
            if (single_chunk) Yb[r0 * k + e] = Ys[r * ldk + j];
            else atomicAdd(&Yb[r0 * k + e], Ys[r * ldk + j]);
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

// One entry point per weight dtype and sketch chunk KC (extern "C": stable names for
// RawModule.get_function); the launcher picks KC from k (fused_sgd_sketch.py: chunk_layout).
// MINB: blocks per SM the register allocation must allow. 3 for the 32-bit accumulators
// (<= 85 registers; at 8192^2 this took the k = 8 pass from 1.01 to 0.75 ms, and did not slow
// any other width); 1 for float64, whose 128 registers would spill under that cap.
#define FS_ENTRY(NAME, D, KC, MINB)                                                               \
    extern "C" __global__ void __launch_bounds__(FS_THREADS, MINB) NAME(                         \
        D::store_t* W, const D::store_t* G, D::store_t* buf, const D::acc_t* U,                   \
        const D::acc_t* V, D::acc_t* Y, D::acc_t* Z, double* fro2, double* row_sq, i64 m, i64 n, \
        int k, i64 sUb, i64 sVb, i64 sWb, i64 sWm, i64 sWn, i64 sGb, i64 sGm, i64 sGn, i64 sBb,  \
        i64 sBm, i64 sBn, i64 cols_per_chunk, int update, const D::acc_t* lr_ptr, D::acc_t lr,  \
        D::acc_t weight_decay, D::acc_t momentum, D::acc_t keep, int nesterov,                   \
        int maximize, int init_buf, const i64* table) {                                           \
        fused_body<D, KC>(W, G, buf, U, V, Y, Z, fro2, row_sq, m, n, k, sUb, sVb, sWb, sWm, sWn, \
                          sGb, sGm, sGn, sBb, sBm, sBn, cols_per_chunk, update, lr_ptr, lr,       \
                          weight_decay, momentum, keep, nesterov, maximize, init_buf, table);     \
    }

#define FS_ENTRIES(SUFFIX, D, MINB)                        \
    FS_ENTRY(fused_sgd_sketch_##SUFFIX##_k8, D, 8, MINB)   \
    FS_ENTRY(fused_sgd_sketch_##SUFFIX##_k16, D, 16, MINB) \
    FS_ENTRY(fused_sgd_sketch_##SUFFIX##_k32, D, 32, MINB)

FS_ENTRIES(f32, F32, 3)
FS_ENTRIES(bf16, BF16, 3)
FS_ENTRIES(f16, F16, 3)
FS_ENTRIES(f64, F64, 1)

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
