// Op `postprocess`: sketches -> singular values, next bases and overlaps, for a batch, on the
// device, with no host synchronisation (same math as lowrank.postprocess.postprocess_torch).
//
// A "problem" z in [0, 2b) is one side of one matrix: z < b is Y of matrix z (p = m rows),
// z >= b is Z of matrix z - b (p = n rows). The b matrices need not share a shape (one call
// post-processes every shape of a model that has the same k): a problem table (PP_TAB int64
// per problem, see Problem) gives each problem's p, its first row in the p x k workspaces
// (the sketches S, copied there by the caller, and R, Q, X: each stacks every problem's rows),
// the address of its old basis (the caller's tensor, read in place), and where its work items
// start in the flattened grids (below). The table holds no address that changes from step to
// step, so a training loop uploads it once, before a CUDA graph capture. Every k x k array is
// stacked as (2b, k, k).
//
// The row kernels run on flattened grids: every problem's 32-row tiles one after the other
// (refill, apply), or its Gram row chunks (gram: ceil(p / chunks) rows each, rounded up to a
// tile), and a block finds its problem by a binary search of the table's prefix columns. So a
// model's tall matrix (a vocabulary embedding: 50257 rows beside 768-row layers) gets as many
// blocks as its rows need, and a short problem launches no empty blocks in its place.
// For each problem:
//
//   pp_refill  R = Gaussian candidates (counter-based hash of seed, step, side, index)
//   pp_gram    [S^T S, S^T R]               partial sums over row chunks (deterministic order)
//   pp_eig     S^T S = E diag(l) E^T         one-block parallel Jacobi, float64, shared memory
//              sigma = sqrt(l) on good directions; C1 = E diag(good / sqrt(l)) (Ritz coefficients)
//              N1 = C1 C1^T (S^T R)          first projection of R off span(Q), in coefficients
//   pp_apply   Q = S C1 ;  R1 = R - S N1     (explicit float64 vectors)
//   pp_gram    [Q^T Q, Q^T R1, R1^T R1]      exact Grams of the explicit vectors
//   pp_mid     X = Q A + R1 B,  A = Pgood - (Q^T R1) Pbad,  B = Pbad   (second projection and
//              the refill select), Gx = X^T X from the Grams, Gx = L L^T, W1 = [A; B] L^-T
//   pp_apply   X1 = Q W1_top + R1 W1_bottom  (first Cholesky-QR round, explicit vectors)
//   pp_gram    [X1^T X1, U_old^T X1]
//   pp_fin     X1^T X1 = L2 L2^T ; T = L2^-T ; overlap = (U_old^T X1) T
//   pp_apply   U_next = X1 T                 (second Cholesky-QR round, cast to the basis dtype)
//
// Why this shape: a Gram matrix squares the condition number, so Q = S C1 can be far from
// orthonormal in poorly separated directions (error ~ eps l_1 / l_i). The reference repairs that
// with two explicit Cholesky-QR rounds; here the first round's Gram is assembled from exact
// Grams of the explicit Q and R1 (pp_gram over Q, R1), and the second round is an explicit
// Cholesky-QR of X1, so the result is orthonormal to float64 rounding for every input.
// All arithmetic after the sketches is float64. No data-dependent control flow leaves the
// device: the Jacobi sweep count and the good/bad selection are decided inside the kernels.
#include "common.cuh"

#define PP_THREADS 256
#define PP_T 32        // tile edge of the Gram and apply kernels
#define PP_LD (PP_T + 1)

// Eigenvalues below this fraction of the largest (or below the absolute floor) are rounding
// noise; their directions are refilled. Same constants as lowrank/postprocess.py.
#define GRAM_RELATIVE_FLOOR 1e-14
#define GRAM_ABSOLUTE_FLOOR 1e-280

// Columns of the problem table (int64, PP_TAB per problem; written by postprocess.py).
#define PP_TAB 9
#define TAB_P 0       // rows p
#define TAB_ROW0 1    // first row in the stacked workspaces
#define TAB_OLD 2     // address of the old basis (p x k, contiguous)
#define TAB_SEED 3    // refill seed (the bits of a uint64)
#define TAB_INDEX 4   // refill counter block: the matrix's index in its group
#define TAB_TILE0 5   // its first 32-row tile in the flattened tile grid (ceil(p / 32) tiles)
#define TAB_CHUNK0 6  // its first Gram chunk in the flattened chunk grid and the partials
#define TAB_NCHUNK 7  // its number of Gram chunks
#define TAB_CROWS 8   // rows of each of its Gram chunks (the last one may be shorter)

struct Problem {
    int side;        // 0: Y, 1: Z
    i64 i;           // matrix index in [0, b)
    i64 p;           // rows
    i64 row0;        // first row in the stacked workspaces
    const i64* row;  // its table row
};

__device__ __forceinline__ Problem problem(const i64* tab, i64 z, i64 b) {
    Problem q;
    q.side = z >= b;
    q.i = q.side ? z - b : z;
    q.row = tab + z * PP_TAB;
    q.p = q.row[TAB_P];
    q.row0 = q.row[TAB_ROW0];
    return q;
}

// The problem that owns item x of a flattened grid: the last z in [0, nz) whose first item
// (table column col, increasing in z: every problem has >= 1 tile and chunk) is <= x.
__device__ __forceinline__ i64 owner(const i64* tab, i64 nz, int col, i64 x) {
    i64 lo = 0, hi = nz - 1;
    while (lo < hi) {
        const i64 mid = (lo + hi + 1) >> 1;
        if (tab[mid * PP_TAB + col] <= x) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// The p x k array of problem q: the address in table column col (>= 0: the caller's tensor),
// else the problem's rows of the stacked workspace ws.
template <class T>
__device__ __forceinline__ T* rows_of(const Problem& q, int col, T* ws, int k) {
    if (col >= 0) return reinterpret_cast<T*>((u64)q.row[col]);
    return ws == nullptr ? nullptr : ws + q.row0 * k;
}

// The k x k-only kernels (pp_eig, pp_mid, pp_fin) need the side and matrix index only.
__device__ __forceinline__ Problem side_of(i64 z, i64 b) {
    Problem q;
    q.side = z >= b;
    q.i = q.side ? z - b : z;
    q.p = q.row0 = 0;
    q.row = nullptr;
    return q;
}

// ---------------------------------------------------------------------------------------------
// Refill candidates: standard normal numbers from a counter-based hash, so they need no
// generator state (graph capture safe) and depend only on (seed, step, side, index in the
// group, row, col); seed and index come from the problem table. step is read from step_ptr
// when it is given (a device counter that a replayed graph advances). Grid: (tiles, 1, 1),
// one 32-row tile of one problem per block.
extern "C" __global__ void __launch_bounds__(PP_THREADS) pp_refill(
    double* R,                         // stacked p x k workspace (out)
    const i64* tab, i64 b, int k,
    i64 step, const i64* step_ptr)
{
    const Problem q = problem(tab, owner(tab, 2 * b, TAB_TILE0, blockIdx.x), b);
    const i64 total = q.p * k;
    const i64 beg = ((i64)blockIdx.x - q.row[TAB_TILE0]) * PP_T * k;
    const i64 end = min(total, beg + PP_T * k);
    double* Rz = R + q.row0 * k;
    const i64 s = step_ptr ? *step_ptr : step;
    // Stream 2 step + side, as the reference seeds refill_candidates with 2 step and 2 step + 1.
    const u64 key = mix64(mix64((u64)q.row[TAB_SEED]) ^ (u64)(2 * s + q.side));
    const i64 index = q.row[TAB_INDEX];
    for (i64 e = beg + threadIdx.x; e < end; e += PP_THREADS) {
        const u64 c = (u64)(index * total + e);
        const u64 h1 = mix64(key ^ mix64(2 * c));
        const u64 h2 = mix64(key ^ mix64(2 * c + 1));
        const double u1 = (double)((h1 >> 11) + 1) * 0x1.0p-53;  // (0, 1]: log is finite
        const double u2 = (double)(h2 >> 11) * 0x1.0p-53;        // [0, 1)
        Rz[e] = sqrt(-2.0 * log(u1)) * cospi(2.0 * u2);         // Box-Muller
    }
}

// ---------------------------------------------------------------------------------------------
// Partial Gram products over row chunks: out[z, chunk, term] = A_term^T B_term (k x k) summed
// over the rows of the chunk. Operands are F (the "first" array, dtype D: with fcol < 0 the
// stacked workspace Fws (sketches, Q), else table column fcol (old bases)) or S (the "second"
// array, the stacked float64 workspace Sws); sel bit 2 t picks A of term t (0: F,
// 1: S), bit 2 t + 1 picks B. Grid: (chunks of all problems, terms * tiles^2, 1); a block
// computes one 32 x 32 tile of one term over one chunk, 4 entries per thread, in float64, and
// writes it to its chunk's slot (out: (chunks, nterms, k, k)). Entry (i, j) and (j, i) of a
// symmetric term see the same products in the same order, so the result is exactly symmetric.
// Partial sums are written, not atomically added: the consumer sums chunks in a fixed order,
// so the whole post-processing is deterministic.
template <class D>
__device__ __forceinline__ void gram_body(
    const i64* tab, int fcol, const typename D::store_t* Fws, const double* Sws,
    i64 b, int k, int nterms, int sel, double* out)
{
    __shared__ double As[PP_T][PP_LD];
    __shared__ double Bs[PP_T][PP_LD];
    const Problem q = problem(tab, owner(tab, 2 * b, TAB_CHUNK0, blockIdx.x), b);
    const int nt = (k + PP_T - 1) / PP_T;
    const int term = blockIdx.y / (nt * nt);
    const int tile = blockIdx.y - term * nt * nt;
    const int ti = tile / nt, tj = tile - (tile / nt) * nt;
    const int t = threadIdx.x, tx = t & 31, ty = t >> 5;
    const bool a_s = (sel >> (2 * term)) & 1;
    const bool b_s = (sel >> (2 * term + 1)) & 1;
    const typename D::store_t* F = rows_of(q, fcol, Fws, k);
    const double* S = rows_of(q, -1, Sws, k);
    const i64 crows = q.row[TAB_CROWS];
    const i64 rbeg = ((i64)blockIdx.x - q.row[TAB_CHUNK0]) * crows;
    const i64 rend = min(q.p, rbeg + crows);
    const int ca = ti * PP_T + tx, cb = tj * PP_T + tx;

    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    for (i64 r0 = rbeg; r0 < rend; r0 += PP_T) {
#pragma unroll
        for (int s = 0; s < 4; ++s) {
            const int r = ty + 8 * s;
            const i64 gr = r0 + r;
            double av = 0.0, bv = 0.0;
            if (gr < rend) {
                if (ca < k) av = a_s ? S[gr * k + ca] : (double)D::load(F, gr * k + ca);
                if (cb < k) bv = b_s ? S[gr * k + cb] : (double)D::load(F, gr * k + cb);
            }
            As[r][tx] = av;
            Bs[r][tx] = bv;
        }
        __syncthreads();
#pragma unroll 8
        for (int r = 0; r < PP_T; ++r) {
            const double bv = Bs[r][tx];
#pragma unroll
            for (int s = 0; s < 4; ++s) acc[s] += As[r][ty * 4 + s] * bv;  // broadcast reads
        }
        __syncthreads();
    }
    double* o = out + ((i64)blockIdx.x * nterms + term) * k * k;
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        const int gi = ti * PP_T + ty * 4 + s;
        if (gi < k && cb < k) o[gi * k + cb] = acc[s];
    }
}

#define PP_GRAM_ENTRY(NAME, D)                                                                    \
    extern "C" __global__ void __launch_bounds__(PP_THREADS) NAME(                               \
        const i64* tab, int fcol, const D::store_t* Fws, const double* Sws, i64 b, int k,        \
        int nterms, int sel, double* out) {                                                      \
        gram_body<D>(tab, fcol, Fws, Sws, b, k, nterms, sel, out);                               \
    }

PP_GRAM_ENTRY(pp_gram_f32, F32)
PP_GRAM_ENTRY(pp_gram_f64, F64)
PP_GRAM_ENTRY(pp_gram_bf16, BF16)
PP_GRAM_ENTRY(pp_gram_f16, F16)

// ---------------------------------------------------------------------------------------------
// Out = alpha * (X M + X2 M2) + D for p x k row blocks: X (dtype DX: table column xcol, or
// with xcol < 0 the stacked workspace Xws) and X2 (float64 workspace, optional) are p x k,
// M and M2 k x k (problem strides sM, sM2), D (float64 workspace, optional) p x k; Out (dtype
// DO) is a stacked workspace. Grid: (row tiles of all problems, column tiles, 1). Out may
// alias D (each element is read and then written by the same thread) but not X or X2.
template <class DX, class DO>
__device__ __forceinline__ void apply_body(
    const i64* tab, int xcol, const typename DX::store_t* Xws, const double* M, i64 sM,
    const double* X2ws, const double* M2, i64 sM2, const double* Dws, double alpha,
    typename DO::store_t* Ows, i64 b, int k)
{
    __shared__ double Xs[PP_T][PP_LD];
    __shared__ double Ms[PP_T][PP_LD];
    const i64 z = owner(tab, 2 * b, TAB_TILE0, blockIdx.x);
    const Problem q = problem(tab, z, b);
    const i64 r0 = ((i64)blockIdx.x - q.row[TAB_TILE0]) * PP_T;
    const int t = threadIdx.x, tx = t & 31, ty = t >> 5;
    const int gc = blockIdx.y * PP_T + tx;
    const typename DX::store_t* X = rows_of(q, xcol, Xws, k);
    const double* X2 = rows_of(q, -1, X2ws, k);
    const double* Mz = M + z * sM;

    double acc[4] = {0.0, 0.0, 0.0, 0.0};
    for (int term = 0; term < 2; ++term) {
        if (term == 1 && X2 == nullptr) break;
        const double* Mt = term ? M2 + z * sM2 : Mz;
        for (int kc = 0; kc < k; kc += PP_T) {
#pragma unroll
            for (int s = 0; s < 4; ++s) {
                const int r = ty + 8 * s;
                const i64 gr = r0 + r;
                double xv = 0.0;
                if (gr < q.p && kc + tx < k) {
                    const i64 idx = gr * k + kc + tx;
                    xv = term ? X2[idx] : (double)DX::load(X, idx);
                }
                Xs[r][tx] = xv;
                Ms[r][tx] = (kc + r < k && gc < k) ? Mt[(i64)(kc + r) * k + gc] : 0.0;
            }
            __syncthreads();
#pragma unroll 8
            for (int c = 0; c < PP_T; ++c) {
                const double mv = Ms[c][tx];
#pragma unroll
                for (int s = 0; s < 4; ++s) acc[s] += Xs[ty * 4 + s][c] * mv;
            }
            __syncthreads();
        }
    }
    const double* D = rows_of(q, -1, Dws, k);
    typename DO::store_t* O = rows_of(q, -1, Ows, k);
#pragma unroll
    for (int s = 0; s < 4; ++s) {
        const i64 gr = r0 + ty * 4 + s;
        if (gr < q.p && gc < k) {
            const i64 idx = gr * k + gc;
            double v = alpha * acc[s];
            if (D) v += D[idx];
            DO::store(O, idx, (typename DO::acc_t)v);
        }
    }
}

#define PP_APPLY_ENTRY(NAME, DX, DO)                                                              \
    extern "C" __global__ void __launch_bounds__(PP_THREADS) NAME(                               \
        const i64* tab, int xcol, const DX::store_t* Xws, const double* M, i64 sM,               \
        const double* X2ws, const double* M2, i64 sM2, const double* Dws, double alpha,          \
        DO::store_t* Ows, i64 b, int k) {                                                        \
        apply_body<DX, DO>(tab, xcol, Xws, M, sM, X2ws, M2, sM2, Dws, alpha, Ows, b, k);         \
    }

PP_APPLY_ENTRY(pp_apply_f32_f64, F32, F64)   // Q = S C1, R1 = R - S N1 from fp32 sketches
PP_APPLY_ENTRY(pp_apply_f64_f64, F64, F64)   // same from fp64 sketches; X1 = Q W1 + R1 W1'
PP_APPLY_ENTRY(pp_apply_f64_f32, F64, F32)   // U_next = X1 T in the basis dtype
PP_APPLY_ENTRY(pp_apply_f64_bf16, F64, BF16)
PP_APPLY_ENTRY(pp_apply_f64_f16, F64, F16)

// ---------------------------------------------------------------------------------------------
// Block-level helpers for the one-block-per-problem kernels (256 threads).
__device__ __forceinline__ double block_sum(double v, double* red) {
    const int t = threadIdx.x;
    v = warp_sum(v);
    __syncthreads();  // red may still be read from a previous call
    if ((t & 31) == 0) red[t >> 5] = v;
    __syncthreads();
    double s = 0.0;
#pragma unroll
    for (int w = 0; w < PP_THREADS / 32; ++w) s += red[w];  // fixed order: deterministic
    return s;
}

// Problem z's Gram chunks: the first one's index in the partials, and their number.
struct Chunks {
    i64 first, n;
};

__device__ __forceinline__ Chunks chunks_of(const i64* tab, i64 z) {
    return Chunks{tab[z * PP_TAB + TAB_CHUNK0], tab[z * PP_TAB + TAB_NCHUNK]};
}

// Sum the chunk partials (chunks, nterms, k, k) of one term into dst (k x k), in chunk order.
__device__ __forceinline__ void sum_chunks(const double* part, Chunks ch, int nterms, int term,
                                           int k, double* dst) {
    const i64 kk = (i64)k * k;
    for (i64 e = threadIdx.x; e < kk; e += PP_THREADS) {
        double s = 0.0;
        for (i64 c = ch.first; c < ch.first + ch.n; ++c) s += part[(c * nterms + term) * kk + e];
        dst[e] = s;
    }
}

// In-place Cholesky of the k x k matrix in shared memory (lower triangle; the strict upper
// triangle is zeroed), column by column (2 barriers per column), then Linv = L^-1 (lower) into
// Li: one column of Linv per thread by forward substitution, no barrier inside. A matrix that
// is not positive definite gives NaN, as the reference's cholesky_ex does not repair it either;
// the callers only factor Grams of full-rank, well-conditioned bases.
__device__ void cholesky_and_inverse(double* L, double* Li, int k) {
    const int t = threadIdx.x;
    for (int j = 0; j < k; ++j) {
        if (t == 0) {
            double d = L[j * k + j];
            for (int p = 0; p < j; ++p) d -= L[j * k + p] * L[j * k + p];
            L[j * k + j] = sqrt(d);
        }
        __syncthreads();
        const double djj = L[j * k + j];
        for (int i = j + 1 + t; i < k; i += PP_THREADS) {
            double s = L[i * k + j];
            for (int p = 0; p < j; ++p) s -= L[i * k + p] * L[j * k + p];
            L[i * k + j] = s / djj;
        }
        __syncthreads();
    }
    for (i64 e = t; e < (i64)k * k; e += PP_THREADS) {
        const int i = (int)(e / k), j = (int)(e - (e / k) * k);
        if (j > i) L[e] = 0.0;
    }
    __syncthreads();
    for (int c = t; c < k; c += PP_THREADS) {
        for (int i = 0; i < c; ++i) Li[i * k + c] = 0.0;
        for (int i = c; i < k; ++i) {
            double s = (i == c) ? 1.0 : 0.0;
            for (int p = c; p < i; ++p) s -= L[i * k + p] * Li[p * k + c];
            Li[i * k + c] = s / L[i * k + i];
        }
    }
    __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Symmetric eigen solver + Ritz coefficients, one block per problem.
//
// Parallel cyclic Jacobi (Brent-Luk round-robin ordering): a sweep is N-1 rounds (N = k rounded
// up to even); each round rotates k/2 disjoint pairs (p, q) at once:
//   phase 0  one thread per pair computes the rotation that zeroes a_pq (Rutishauser's stable
//            formulas: t = sign(theta) / (|theta| + hypot(1, theta)), c = 1/sqrt(1+t^2), s = t c)
//   phase 1  A <- J^T A J and V <- V J, one 2 x 2 block (row pair, column pair) per thread;
//            the 2 x 2 pivot blocks are set exactly: a_pp - t a_pq, a_qq + t a_pq, and zeros
// Disjoint pairs commute, so a round is exactly the product of its rotations. The sweep loop
// stops when the off-diagonal Frobenius norm is <= tol * ||A||_F (tol = 1e-15: eigenvalues to
// ~eps ||A||, eigenvectors to ~eps ||A|| / gap, as a backward-stable LAPACK solver; quadratic
// convergence makes that 6-10 sweeps for k <= 64) or after max_sweeps. The test is a block-wide
// reduction, so the loop is uniform across the block and never leaves the device. NaN input
// stops the loop at once (the comparison is false) and propagates NaN.
// A lives in shared memory (k^2 doubles: 128 KiB at k = 128); V too when it fits (v_shared),
// else in a global scratch slice that stays in L1/L2.
extern "C" __global__ void __launch_bounds__(PP_THREADS) pp_eig(
    const double* part,     // (chunks, 2, k, k): [S^T S, S^T R] partials
    const i64* tab, i64 b, int k,
    double* Vg,             // (2b, k, k) scratch for V when !v_shared (else unused)
    int v_shared,
    double* C1,             // (2b, k, k) out: E diag(good / sqrt(l)), columns by descending l
    double* M1,             // (2b, k, k) scratch: C1^T (S^T R)
    double* N1,             // (2b, k, k) out: C1 C1^T (S^T R)
    double* good,           // (2b, k) out: 1.0 for kept directions, 0.0 for refilled ones
    double* sig0, double* sig1,  // (b, k) out: sigma_y, sigma_z
    int max_sweeps, double tol)
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    const int t = threadIdx.x;
    const i64 z = blockIdx.x;
    const i64 kk = (i64)k * k;
    const int N = k + (k & 1);
    const int NP = N / 2;
    double* A = reinterpret_cast<double*>(smem_raw);
    double* V = v_shared ? A + kk : Vg + z * kk;
    double* lam = A + kk + (v_shared ? kk : 0);  // k: eigenvalues, then sorted and clamped
    double* scale = lam + k;                      // k
    double* rc = scale + k;                       // NP each: c, s, t, a_pp, a_qq, a_pq
    double* rs = rc + NP;
    double* rt = rs + NP;
    double* rpp = rt + NP;
    double* rqq = rpp + NP;
    double* rpq = rqq + NP;
    double* red = rpq + NP;                       // 32
    int* pidx = reinterpret_cast<int*>(red + 32);  // 2 NP
    int* perm = pidx + 2 * NP;                    // k

    const Chunks ch = chunks_of(tab, z);
    sum_chunks(part, ch, 2, 0, k, A);
    for (i64 e = t; e < kk; e += PP_THREADS) V[e] = (e / k == e - (e / k) * k) ? 1.0 : 0.0;
    __syncthreads();

    for (int sweep = 0; sweep < max_sweeps; ++sweep) {
        double off = 0.0, tot = 0.0;
        for (i64 e = t; e < kk; e += PP_THREADS) {
            const double a2 = A[e] * A[e];
            tot += a2;
            if (e / k != e - (e / k) * k) off += a2;
        }
        off = block_sum(off, red);
        tot = block_sum(tot, red);
        if (!(off > tol * tol * tot)) break;  // uniform: every thread holds the same sums
        for (int round = 0; round < N - 1; ++round) {
            for (int w = t; w < NP; w += PP_THREADS) {
                int p, qq;
                if (w == 0) { p = round % (N - 1); qq = N - 1; }
                else { p = (w + round) % (N - 1); qq = (N - 1 - w + round) % (N - 1); }
                if (p > qq) { const int tmp = p; p = qq; qq = tmp; }
                double c = 1.0, s = 0.0, tt = 0.0, app = 0.0, aqq = 0.0, apq = 0.0;
                if (qq < k) {
                    app = A[p * k + p];
                    aqq = A[qq * k + qq];
                    apq = A[p * k + qq];
                    if (apq != 0.0) {
                        const double theta = 0.5 * (aqq - app) / apq;
                        tt = 1.0 / (fabs(theta) + hypot(1.0, theta));  // |t| <= 1: the smaller angle
                        if (theta < 0.0) tt = -tt;
                        c = 1.0 / sqrt(1.0 + tt * tt);
                        s = tt * c;
                    }
                }
                pidx[2 * w] = p;
                pidx[2 * w + 1] = qq;
                rc[w] = c; rs[w] = s; rt[w] = tt; rpp[w] = app; rqq[w] = aqq; rpq[w] = apq;
            }
            __syncthreads();
            // A <- J^T A J and V <- V J, one 2 x 2 block (row pair w1, column pair w2) per
            // thread: the blocks are disjoint, so a round needs one barrier here, where rotating
            // all columns and then all rows took two.
            for (i64 e = t; e < (i64)NP * NP; e += PP_THREADS) {
                const int w1 = (int)(e / NP), w2 = (int)(e - (e / NP) * NP);
                const int p1 = pidx[2 * w1], q1 = pidx[2 * w1 + 1];
                const int p2 = pidx[2 * w2], q2 = pidx[2 * w2 + 1];
                const bool h1 = q1 < k, h2 = q2 < k;  // false: the dummy index k of an odd k
                const double c1 = rc[w1], s1 = rs[w1], c2 = rc[w2], s2 = rs[w2];
                double app = A[p1 * k + p2];
                double apq = h2 ? A[p1 * k + q2] : 0.0;
                double aqp = h1 ? A[q1 * k + p2] : 0.0;
                double aqq = (h1 && h2) ? A[q1 * k + q2] : 0.0;
                if (h2) {  // columns: A J2
                    const double npp = c2 * app - s2 * apq, npq = s2 * app + c2 * apq;
                    const double nqp = c2 * aqp - s2 * aqq, nqq = s2 * aqp + c2 * aqq;
                    app = npp; apq = npq; aqp = nqp; aqq = nqq;
                }
                if (h1) {  // rows: J1^T (A J2)
                    const double npp = c1 * app - s1 * aqp, nqp = s1 * app + c1 * aqp;
                    const double npq = c1 * apq - s1 * aqq, nqq = s1 * apq + c1 * aqq;
                    app = npp; apq = npq; aqp = nqp; aqq = nqq;
                    if (w1 == w2) {  // the pivot block, set exactly
                        app = rpp[w1] - rt[w1] * rpq[w1];
                        aqq = rqq[w1] + rt[w1] * rpq[w1];
                        apq = aqp = 0.0;
                    }
                }
                A[p1 * k + p2] = app;
                if (h2) A[p1 * k + q2] = apq;
                if (h1) A[q1 * k + p2] = aqp;
                if (h1 && h2) A[q1 * k + q2] = aqq;
                if (h2) {  // V's rows p1, q1 in the columns p2, q2: V J2
                    const double vpp = V[p1 * k + p2], vpq = V[p1 * k + q2];
                    V[p1 * k + p2] = c2 * vpp - s2 * vpq;
                    V[p1 * k + q2] = s2 * vpp + c2 * vpq;
                    if (h1) {
                        const double vqp = V[q1 * k + p2], vqq = V[q1 * k + q2];
                        V[q1 * k + p2] = c2 * vqp - s2 * vqq;
                        V[q1 * k + q2] = s2 * vqp + c2 * vqq;
                    }
                }
            }
            __syncthreads();
        }
    }

    // Descending order, stable (ties keep the index order); NaN sorts last.
    for (int i = t; i < k; i += PP_THREADS) lam[i] = A[i * k + i];
    __syncthreads();
    for (int i = t; i < k; i += PP_THREADS) {
        const double li = is_nan(lam[i]) ? __longlong_as_double(0xfff0000000000000ull) : lam[i];
        int rank = 0;
        for (int j = 0; j < k; ++j) {
            const double lj = is_nan(lam[j]) ? __longlong_as_double(0xfff0000000000000ull) : lam[j];
            rank += (lj > li) || (lj == li && j < i);
        }
        perm[rank] = i;
    }
    __syncthreads();
    for (int i = t; i < k; i += PP_THREADS) {
        const double l = lam[perm[i]];
        scale[i] = l < 0.0 ? 0.0 : l;  // clamp_min(0); NaN stays NaN as in torch
    }
    __syncthreads();
    for (int i = t; i < k; i += PP_THREADS) lam[i] = scale[i];
    __syncthreads();
    const double top = lam[0];
    const Problem q = side_of(z, b);
    double* sig = (q.side ? sig1 : sig0) + q.i * k;
    for (int i = t; i < k; i += PP_THREADS) {
        const double l = lam[i];
        const bool g = (l > GRAM_RELATIVE_FLOOR * top) && (l > GRAM_ABSOLUTE_FLOOR);
        scale[i] = g ? 1.0 / sqrt(l) : 0.0;  // bad columns of Q are zero, as in the reference
        sig[i] = g ? sqrt(l) : 0.0;
        good[z * k + i] = g ? 1.0 : 0.0;
    }
    __syncthreads();
    double* C1z = C1 + z * kk;
    for (i64 e = t; e < kk; e += PP_THREADS) {
        const int r = (int)(e / k), i = (int)(e - (e / k) * k);
        C1z[e] = V[r * k + perm[i]] * scale[i];
    }
    __syncthreads();  // V (maybe global) and A are free again; C1z is visible to the block
    sum_chunks(part, ch, 2, 1, k, A);  // A <- S^T R
    __syncthreads();
    double* M1z = M1 + z * kk;
    for (i64 e = t; e < kk; e += PP_THREADS) {  // M1 = C1^T (S^T R)  (= Q^T R)
        const int i = (int)(e / k), j = (int)(e - (e / k) * k);
        double s = 0.0;
        for (int r = 0; r < k; ++r) s += C1z[r * k + i] * A[r * k + j];
        M1z[e] = s;
    }
    __syncthreads();
    double* N1z = N1 + z * kk;
    for (i64 e = t; e < kk; e += PP_THREADS) {  // N1 = C1 M1, so that R1 = R - S N1 = R - Q Q^T R
        const int r = (int)(e / k), j = (int)(e - (e / k) * k);
        double s = 0.0;
        for (int i = 0; i < k; ++i) s += C1z[r * k + i] * M1z[i * k + j];
        N1z[e] = s;
    }
}

// ---------------------------------------------------------------------------------------------
// Second projection, refill select and first Cholesky-QR round, in k x k coefficients.
// With QQ = Q^T Q, QR = Q^T R1, RR = R1^T R1 (exact Grams of the explicit vectors) and
// X = Q A + R1 B, A = Pgood - QR Pbad, B = Pbad (the reference's R2 = R1 - Q Q^T R1 and
// where(good, Q, R2)):
//   T1 = QQ A + QR B  = good_j ? QQ[:, j] : QR[:, j] - QQ QR[:, j]
//   T2 = QR^T A + RR B = good_j ? QR[j, :]^T : -QR^T QR[:, j] + RR[:, j]
//   Gx = A^T T1 + B^T T2 = good_i ? T1[i, :] : T2[i, :] - QR[:, i]^T T1
// Gx = L L^T; W1 = [A; B] L^-T is written as (2b, 2k, k): rows 0..k-1 multiply Q, rows
// k..2k-1 multiply R1. Also sigma = max(sigma_y, sigma_z) (both written by pp_eig).
extern "C" __global__ void __launch_bounds__(PP_THREADS) pp_mid(
    double* part,           // (chunks, 3, k, k): [QQ, QR, RR] partials; a problem's first gets the sums
    const i64* tab, i64 b, int k,
    const double* good,     // (2b, k)
    double* scratch,        // (2b, 2, k, k)
    double* W1,             // (2b, 2k, k) out
    const double* sig0, const double* sig1, double* sigma)  // (b, k) each
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    double* L = reinterpret_cast<double*>(smem_raw);  // k x k: Gx, then its Cholesky factor
    const int t = threadIdx.x;
    const i64 z = blockIdx.x;
    const i64 kk = (i64)k * k;
    const Chunks ch = chunks_of(tab, z);
    double* QQ = part + ch.first * 3 * kk;
    double* QR = QQ + kk;
    double* RR = QR + kk;
    for (int term = 0; term < 3; ++term) {  // in place into the first chunk, chunk order
        for (i64 e = t; e < kk; e += PP_THREADS) {
            double s = QQ[term * kk + e];
            for (i64 c = 1; c < ch.n; ++c) s += part[((ch.first + c) * 3 + term) * kk + e];
            QQ[term * kk + e] = s;
        }
    }
    if (z < b) {
        for (int i = t; i < k; i += PP_THREADS) {
            const double y = sig0[z * k + i], zz = sig1[z * k + i];
            sigma[z * k + i] = (is_nan(y) || y > zz) ? y : zz;  // torch.maximum: NaN wins
        }
    }
    const double* gz = good + z * k;
    double* T1 = scratch + z * 2 * kk;
    double* T2 = T1 + kk;
    __syncthreads();
    for (i64 e = t; e < kk; e += PP_THREADS) {
        const int r = (int)(e / k), j = (int)(e - (e / k) * k);
        double v1, v2;
        if (gz[j] != 0.0) {
            v1 = QQ[r * k + j];
            v2 = QR[j * k + r];
        } else {
            double s1 = 0.0, s2 = 0.0;
            for (int s = 0; s < k; ++s) {
                s1 += QQ[r * k + s] * QR[s * k + j];
                s2 += QR[s * k + r] * QR[s * k + j];
            }
            v1 = QR[r * k + j] - s1;
            v2 = RR[r * k + j] - s2;
        }
        T1[e] = v1;
        T2[e] = v2;
    }
    __syncthreads();
    for (i64 e = t; e < kk; e += PP_THREADS) {
        const int i = (int)(e / k), j = (int)(e - (e / k) * k);
        double v;
        if (gz[i] != 0.0) {
            v = T1[i * k + j];
        } else {
            double s = 0.0;
            for (int r = 0; r < k; ++r) s += QR[r * k + i] * T1[r * k + j];
            v = T2[i * k + j] - s;
        }
        L[e] = v;
    }
    __syncthreads();
    double* Li = T1;  // T1 is no longer needed
    cholesky_and_inverse(L, Li, k);
    // W1_top[r, j] = sum_{i <= j} A[r, i] Linv[j, i];  W1_bottom[r, j] = bad_r Linv[j, r] (r <= j)
    double* Wz = W1 + z * 2 * kk;
    for (i64 e = t; e < kk; e += PP_THREADS) {
        const int r = (int)(e / k), j = (int)(e - (e / k) * k);
        double s = 0.0;
        for (int i = 0; i <= j; ++i) {
            const double a = gz[i] != 0.0 ? (r == i ? 1.0 : 0.0) : -QR[r * k + i];
            s += a * Li[j * k + i];
        }
        Wz[e] = s;
        Wz[kk + e] = (gz[r] == 0.0 && r <= j) ? Li[j * k + r] : 0.0;
    }
}

// ---------------------------------------------------------------------------------------------
// Second Cholesky-QR round and the overlaps: X1^T X1 = L2 L2^T, T = L2^-T (upper), written for
// the final apply; overlap = (U_old^T X1) T = U_old^T U_next.
extern "C" __global__ void __launch_bounds__(PP_THREADS) pp_fin(
    double* part,           // (chunks, 2, k, k): [X1^T X1, U_old^T X1] partials
    const i64* tab, i64 b, int k,
    double* scratch,        // (2b, 2, k, k)
    double* T,              // (2b, k, k) out
    double* ov0, double* ov1)  // (b, k, k) out: overlap_u, overlap_v
{
    extern __shared__ __align__(16) unsigned char smem_raw[];
    double* L = reinterpret_cast<double*>(smem_raw);
    const int t = threadIdx.x;
    const i64 z = blockIdx.x;
    const i64 kk = (i64)k * k;
    double* UX = scratch + z * 2 * kk;
    double* Li = UX + kk;
    const Chunks ch = chunks_of(tab, z);
    sum_chunks(part, ch, 2, 0, k, L);
    sum_chunks(part, ch, 2, 1, k, UX);
    __syncthreads();
    cholesky_and_inverse(L, Li, k);
    double* Tz = T + z * kk;
    const Problem q = side_of(z, b);
    double* ov = (q.side ? ov1 : ov0) + q.i * kk;
    for (i64 e = t; e < kk; e += PP_THREADS) {
        const int i = (int)(e / k), j = (int)(e - (e / k) * k);
        Tz[e] = (i <= j) ? Li[j * k + i] : 0.0;
        double s = 0.0;
        for (int r = 0; r <= j; ++r) s += UX[i * k + r] * Li[j * k + r];
        ov[e] = s;
    }
}
