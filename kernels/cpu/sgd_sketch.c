/* CPU kernel of the ops `fused_sgd_sketch` and `sketch` (float32): one pass over W that applies
 * the torch.optim.SGD update (optional) and computes, from the updated rows while they are in
 * cache, the row sums of squares (float32 partials of 4 squares, added in float64; see
 * row_squares) and the thin products of the sketch.
 *
 * Layout: W, G, buf (m, n) row-major; U, Y (m, kp); V, Z (n, kp) row-major, kp a multiple of 8
 * (the Python side pads k). W is float32, or (sketch only, no update) bfloat16 or float16 (wtype):
 * each block of rows is then widened to float32 (exactly) into a per-thread scratch first, and
 * sketched from there as float32 rows are. Modes (bit flags):
 *   MODE_Y      Y = W V
 *   MODE_Z      Z = W^T U
 *   MODE_POWER  Z = W^T Y  (= W^T W V: with MODE_Y, a full power step in one read of W; the
 *               caller turns it into W^T U_next with a k x k factor, see lowrank/tracking.py)
 * Work is split by blocks of ROWS rows over OpenMP threads (the runtime torch itself loaded, so
 * one thread pool serves both); Z is accumulated per chunk of rows and summed in a fixed order
 * at the end, so results do not depend on timing.
 *
 * Register blocking: a tile is ROWS rows x tile_cols(kp) columns of W, sized so that it and the
 * tiles of V and Z (tile_cols x kp each) fit in 24 KB of the 32 KB L1 (at k = 16: 128 columns,
 * 20 KB; 256 columns overflowed L1 and made a 2048^2 power pass 20-30% slower, A/B in one
 * process). For each column j and a chunk of 16 (or 8) sketch columns, V[j] and Z[j] are loaded
 * once and each of the ROWS entries W[r, j] feeds two FMAs, into Y[r] (held in registers across
 * the tile) and into Z[j]: 2k flops per load of W for each product, near the FMA peak when W
 * streams from cache.
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>
#include "widen.h" /* WTYPE_*, widen: 16-bit weights to float32, exactly */

#define MODE_Y 1
#define MODE_Z 2
#define MODE_POWER 4

#define ROWS 8
#define JB 128 /* the widest product tile */

/* Columns per product tile for sketch width kp: a power of two <= JB with
 * cols * (ROWS + 2 kp) * 4 bytes <= 24 KB (>= 16). */
static int64_t tile_cols(int64_t kp)
{
    int64_t cols = JB;
    while (cols > 16 && cols * (ROWS + 2 * kp) * 4 > 24 * 1024) cols /= 2;
    return cols;
}

typedef float f16v __attribute__((vector_size(64)));
typedef float f8v __attribute__((vector_size(32)));
typedef double d8v __attribute__((vector_size(64)));

/* unaligned vector loads / stores (memcpy compiles to a single move) */
#define DEFINE_LDST(T, NAME)                                                        \
    static inline T ld_##NAME(const float *p) { T x; memcpy(&x, p, sizeof x); return x; } \
    static inline void st_##NAME(float *p, T x) { memcpy(p, &x, sizeof x); }
DEFINE_LDST(f16v, 16)
DEFINE_LDST(f8v, 8)

/* Sum of squares in float64, exact up to float64 rounding: 8 floats widened per load (one
 * vcvtps2pd), four accumulators. The widening is slow on this core, and the sums of squares
 * share the FP pipes with the sketch's FMAs: as the only sum of squares it cost 4-10% of a
 * 2048^2 pass (A/B in one process), so it serves only what row_square_sum below cannot vouch
 * for. */
static double square_sum_f64(const float *w, int64_t len)
{
    d8v acc[4] = {{0}, {0}, {0}, {0}};
    int64_t j = 0;
    for (; j + 32 <= len; j += 32)
        for (int q = 0; q < 4; q++) {
            const d8v x = __builtin_convertvector(ld_8(w + j + 8 * q), d8v);
            acc[q] += x * x;
        }
    for (; j + 8 <= len; j += 8) {
        const d8v x = __builtin_convertvector(ld_8(w + j), d8v);
        acc[0] += x * x;
    }
    double s = 0.0;
    for (; j < len; j++) s += (double)w[j] * w[j];
    const d8v a = (acc[0] + acc[1]) + (acc[2] + acc[3]);
    for (int q = 0; q < 8; q++) s += a[q];
    return s;
}

/* Squares per float32 partial before it is widened: each lane of a group of 64 elements (four
 * vectors of 16) sums up to SQ_TERMS squares. */
#define SQ_TERMS 4
/* Below this a sum's float32 partials may have lost digits to underflow (squares under
 * FLT_MIN, entries under ~1e-19): it is redone in float64, as is a non-finite (overflowed) one.
 * Above it, the absolute error of len underflowed squares (< 2^-149 each) is < len * 1.5e-15
 * of it, far under the rounding bound below for any row length. (The floor of sketch_torch's
 * float32 norms in lowrank/sketch.py.) */
#define SQ_FLOOR 1e-30

/* Sums of squares of the rows of a block, gathered tile by tile: float32 partials of at most
 * SQ_TERMS squares each (the rounding of each square and of the partial sums: relative error <=
 * SQ_TERMS * 2^-24 = 2.4e-7, of the order of the float32 sketch products beside it), added into
 * float64 lanes per row; the columns of a tile past its last full vector are summed in float64.
 * The lanes are added up and checked once per row, after its last tile (row_square_sum): done
 * per row and tile (8 dependent adds and a check each), 2048^2 passes were 1-4% slower (A/B in
 * one process). All the squares together cost 4-6% of the default power pass, 15% of a Y-only
 * one. */
typedef struct {
    d8v part[ROWS];    /* float64 lanes of each row's float32 partials */
    double tail[ROWS]; /* each row's columns past a tile's last full vector, in float64 */
} row_squares;

static inline void square_part(const float *w, int64_t len, d8v *part, double *tail)
{
    d8v acc = *part;
    int64_t j = 0;
    for (; j + 16 <= len; j += 64) {
        f16v a = ld_16(w + j);
        a *= a;
        for (int q = 1; q < SQ_TERMS && j + 16 * q + 16 <= len; q++) {
            const f16v x = ld_16(w + j + 16 * q);
            a += x * x;
        }
        acc += __builtin_convertvector(__builtin_shufflevector(a, a, 0, 1, 2, 3, 4, 5, 6, 7), d8v);
        acc += __builtin_convertvector(
            __builtin_shufflevector(a, a, 8, 9, 10, 11, 12, 13, 14, 15), d8v);
    }
    *part = acc;
    if (j > len) j = len / 16 * 16; /* the last group was short */
    if (j < len) *tail += square_sum_f64(w + j, len - j);
}

/* Row r's sum of squares (row: its n elements) from all its tiles. A sum that may have
 * underflowed or overflowed is redone by square_sum_f64 (an all-zero row, a weight scaled by
 * 1e-30, entries past 1e19, NaN), exact to float64 rounding there. */
static double row_square_sum(const row_squares *sq, int r, const float *row, int64_t n)
{
    double s = 0.0;
    for (int q = 0; q < 8; q++) s += sq->part[r][q];
    if (n >= 16 && !(s >= SQ_FLOOR && s < __builtin_inf())) return square_sum_f64(row, n);
    return s + sq->tail[r];
}

/* Software prefetch, spread over a tile's columns: line ((j >> pshift) & mask) of each array of
 * the update segments that run right after the tile (see lowrank_sgd_sketch_f32), so that their
 * memory latency hides behind the tile's FMAs. (On this AMD core every prefetch hint fills L1: a
 * burst of them, or a whole block ahead, evicted the tiles and was slower.) */
#define PF(j)                                                                           \
    do {                                                                                \
        if (pw && ((j) & pskip) == 0) {                                                 \
            const int64_t q_ = (((j) >> pshift) & pmask) * 64;                          \
            __builtin_prefetch(pw + q_, 1, 3);                                          \
            if (pg) __builtin_prefetch(pg + q_, 0, 3);                                  \
            if (pb) __builtin_prefetch(pb + q_, 1, 3);                                  \
        }                                                                               \
    } while (0)
typedef struct {
    const char *w, *g, *b; /* W, G, buf of the next segments (NULL: none) */
    int64_t lines;          /* a power of two: lines prefetched per array, cycling */
} prefetch_plan;

/* The squares of each row of a tile into sq, read from L1 after its products. Not inlined:
 * inlined into the tile, it cost the register allocation of the product loops 10% of a 2048^2
 * power pass. */
static __attribute__((noinline)) void tile_square_sums(const float *Wt, int64_t ldw, int rows,
                                                       int64_t jb, row_squares *sq)
{
    for (int r = 0; r < rows; r++) square_part(Wt + r * ldw, jb, &sq->part[r], &sq->tail[r]);
}

/* Products of one tile (rows x jb of W at Wt, row stride ldw) for sketch columns [c, c + VW):
 * Yt[r] += sum_j W[r, j] Vt[j]   (doy)
 * Zt[j] += sum_r W[r, j] At[r]   (doz; At is U, or Y for the power step; doz == ZFRESH: the
 *                                 first block of a chunk, Zt[j] = the sum, not read first)
 * and, where sq is given, the squares of the tile's rows into it. */
#define ZFRESH 2
#define DEFINE_TILE(T, VW)                                                              \
static inline void tile_##VW(const float *Wt, int64_t ldw, int rows, int64_t jb,       \
                             const float *At, const float *Vt, float *Yt, float *Zt,    \
                             int64_t kp, int doy, int doz,                              \
                             const prefetch_plan *pf, row_squares *sq)                  \
{                                                                                       \
    const char *pw = pf->w, *pg = pf->g, *pb = pf->b;                                   \
    const int zfresh = doz == ZFRESH;                                                   \
    const int64_t pmask = pf->lines - 1;                                                \
    /* one prefetch per line: every 2^pshift-th column where the tile is wider than the     \
     * window (one per column, cycling twice or four times, was 7-12% slower at 2048^2) */  \
    int pshift = 0;                                                                     \
    while ((jb >> (pshift + 1)) >= pf->lines) pshift++;                                 \
    const int64_t pskip = ((int64_t)1 << pshift) - 1;                                   \
    T y[ROWS], a[ROWS];                                                                 \
    for (int r = 0; r < ROWS; r++) {                                                    \
        y[r] = (T){0};                                                                  \
        a[r] = (T){0};                                                                  \
        if (r < rows) {                                                                 \
            if (doy) y[r] = ld_##VW(Yt + r * kp);                                       \
            if (doz) a[r] = ld_##VW(At + r * kp);                                       \
        }                                                                               \
    }                                                                                   \
    if (rows == ROWS && doy && doz) {                                                   \
        for (int64_t j = 0; j < jb; j++) {                                              \
            PF(j);                                                                      \
            T v = ld_##VW(Vt + j * kp), z = zfresh ? (T){0} : ld_##VW(Zt + j * kp);    \
            _Pragma("GCC unroll 8")                                                     \
            for (int r = 0; r < ROWS; r++) {                                            \
                float w = Wt[r * ldw + j];                                              \
                y[r] += w * v;                                                          \
                z += w * a[r];                                                          \
            }                                                                           \
            st_##VW(Zt + j * kp, z);                                                    \
        }                                                                               \
    } else if (rows == ROWS && doy) {                                                   \
        for (int64_t j = 0; j < jb; j++) {                                              \
            PF(j);                                                                      \
            T v = ld_##VW(Vt + j * kp);                                                 \
            _Pragma("GCC unroll 8")                                                     \
            for (int r = 0; r < ROWS; r++) y[r] += Wt[r * ldw + j] * v;                 \
        }                                                                               \
    } else if (rows == ROWS && doz) {                                                   \
        for (int64_t j = 0; j < jb; j++) {                                              \
            PF(j);                                                                      \
            T z = zfresh ? (T){0} : ld_##VW(Zt + j * kp);                               \
            _Pragma("GCC unroll 8")                                                     \
            for (int r = 0; r < ROWS; r++) z += Wt[r * ldw + j] * a[r];                 \
            st_##VW(Zt + j * kp, z);                                                    \
        }                                                                               \
    } else {                                                                            \
        for (int64_t j = 0; j < jb; j++) {                                              \
            T v = ld_##VW(Vt + j * kp);                                                 \
            T z = doz && !zfresh ? ld_##VW(Zt + j * kp) : (T){0};                       \
            for (int r = 0; r < rows; r++) {                                            \
                float w = Wt[r * ldw + j];                                              \
                if (doy) y[r] += w * v;                                                 \
                if (doz) z += w * a[r];                                                 \
            }                                                                           \
            if (doz) st_##VW(Zt + j * kp, z);                                           \
        }                                                                               \
    }                                                                                   \
    if (doy)                                                                            \
        for (int r = 0; r < rows; r++) st_##VW(Yt + r * kp, y[r]);                      \
    if (sq) tile_square_sums(Wt, ldw, rows, jb, sq);                                    \
}
DEFINE_TILE(f16v, 16)
DEFINE_TILE(f8v, 8)

static void tile(const float *Wt, int64_t ldw, int rows, int64_t jb, const float *At,
                 const float *Vt, float *Yt, float *Zt, int64_t kp, int doy, int doz,
                 const prefetch_plan *pf, row_squares *sq)
{
    static const prefetch_plan none = {NULL, NULL, NULL, 1};
    int64_t c = 0;
    /* the prefetches and the sums of squares ride along the first chunk */
    for (; c + 16 <= kp; c += 16, pf = &none, sq = NULL)
        tile_16(Wt, ldw, rows, jb, At + c, Vt + c, Yt + c, Zt + c, kp, doy, doz, pf, sq);
    if (c < kp)
        tile_8(Wt, ldw, rows, jb, At + c, Vt + c, Yt + c, Zt + c, kp, doy, doz, pf, sq);
}

typedef struct {
    /* keep = 1 - dampening, computed by the caller in double and rounded once, as torch does
     * with its `alpha=1 - dampening` (a float 1.0f - dampening differs for dampening in
     * (0.5, 1)) */
    float lr, weight_decay, momentum, keep;
    int nesterov, maximize, buf_init; /* buf_init: first step, buf = g (torch.clone) */
} sgd_hyper;

/* The torch.optim.SGD update of one row (any length), in torch's order of operations and
 * roundings: ATen's vectorised "add with alpha" is one fused multiply-add, a.mul_(m) rounds.
 * One loop per combination of the options (each a compile-time constant below, so that the loop
 * has no branches and vectorises): W, G and buf stream once, with no temporary. */
static inline __attribute__((always_inline)) void
sgd_update_impl(float *restrict w, const float *restrict g, float *restrict buf, int64_t len,
                const sgd_hyper *h, const int maximize, const int decay, const int mom,
                const int nesterov)
{
    const float wd = h->weight_decay, m = h->momentum, keep = h->keep;
    const float nlr = -h->lr;
    for (int64_t j = 0; j < len; j++) {
        float d = maximize ? -g[j] : g[j];
        if (decay) d = __builtin_fmaf(w[j], wd, d);
        if (mom == 1) buf[j] = d; /* first step: buf = g (torch.clone) */
        if (mom == 2) buf[j] = __builtin_fmaf(d, keep, buf[j] * m);
        if (mom) d = nesterov ? __builtin_fmaf(buf[j], m, d) : buf[j];
        w[j] = __builtin_fmaf(d, nlr, w[j]);
    }
}

#define UPDATE_CASE(MAX, DEC, MOM, NES)                                                  \
    case (MAX) | (DEC) << 1 | (MOM) << 2 | (NES) << 4:                                   \
        sgd_update_impl(w, g, buf, len, h, MAX, DEC, MOM, NES);                          \
        break;
#define UPDATE_CASES_N(MAX, DEC, MOM) UPDATE_CASE(MAX, DEC, MOM, 0) UPDATE_CASE(MAX, DEC, MOM, 1)
#define UPDATE_CASES_M(MAX, DEC) \
    UPDATE_CASES_N(MAX, DEC, 0) UPDATE_CASES_N(MAX, DEC, 1) UPDATE_CASES_N(MAX, DEC, 2)
#define UPDATE_CASES_D(MAX) UPDATE_CASES_M(MAX, 0) UPDATE_CASES_M(MAX, 1)

static void sgd_update(float *w, const float *g, float *buf, int64_t len, const sgd_hyper *h)
{
    /* momentum is on where the caller passes a buffer (torch's `momentum != 0`, tested in
     * double: a momentum that rounds to 0 in float still keeps a buffer) */
    const int mom = buf == NULL ? 0 : h->buf_init ? 1 : 2;
    const int key = (h->maximize != 0) | (h->weight_decay != 0.0f) << 1 | mom << 2
                    | (mom != 0 && h->nesterov) << 4;
    switch (key) {
        UPDATE_CASES_D(0)
        UPDATE_CASES_D(1)
    }
}

/* First block of chunk c of `chunks`: chunk sizes fall linearly (chunks, chunks - 1, ..., 1
 * parts), so that the last chunks handed out are short and the threads finish together. */
static int64_t chunk_start(int64_t nblocks, int64_t c, int64_t chunks)
{
    const int64_t before = c * chunks - c * (c - 1) / 2, total = chunks * (chunks + 1) / 2;
    return nblocks * before / total;
}

/* The update works on segments of SEG columns of one row, numbered row-major within a block
 * (segment s: row s / segs_per_row); rows of a block are contiguous, so a run of segments streams
 * W, G and buf as three sequential arrays. */
#define SEG 256
/* A sketch-only pass (no update) of at least this many elements still prefetches the next
 * block's rows while the products run (2048^2 power pass 5% faster); below it, where W stays in
 * cache, the prefetches cost more than they save (256^2 10% slower). */
#define PREFETCH_MIN (1 << 19)

typedef struct {
    float *W;
    const float *G; /* NULL: sketch only, nothing to update */
    float *buf;
    const sgd_hyper *h;
    int64_t m, n, segs_per_row; /* rows, row length, segments per row */
} block_update;

/* Segments of the block starting at block index blk (its last one may have fewer rows). */
static int64_t block_segments(const block_update *u, int64_t blk)
{
    const int64_t rows = u->m - blk * ROWS < ROWS ? u->m - blk * ROWS : ROWS;
    return rows * u->segs_per_row;
}

/* Update segments [s0, s1) of the block starting at row i0. */
static void update_segments(const block_update *u, int64_t i0, int64_t s0, int64_t s1)
{
    for (int64_t s = s0; s < s1; s++) {
        const int64_t r = s / u->segs_per_row, j0 = (s % u->segs_per_row) * SEG;
        const int64_t len = u->n - j0 < SEG ? u->n - j0 : SEG;
        const int64_t off = (i0 + r) * u->n + j0;
        if (u->G) sgd_update(u->W + off, u->G + off, u->buf ? u->buf + off : NULL, len, u->h);
    }
}

/* What the tile before segments [s0, s1) of the block at row i0 prefetches for them: the
 * power-of-two number of cache lines that covers them, ending with the line of their last
 * element (so it never reaches past this chunk's rows; where it is longer it starts in rows
 * already updated, in cache). Offsets in bytes from the start of the arrays, which are
 * 64-byte aligned (torch's allocator). */
static prefetch_plan plan_for(const block_update *u, int64_t i0, int64_t s0, int64_t s1)
{
    prefetch_plan pf = {NULL, NULL, NULL, 1};
    if (s1 <= s0) return pf;
    const int64_t f = sizeof(float);
    const int64_t j_last = ((s1 - 1) % u->segs_per_row) * SEG;
    const int64_t first = ((i0 + s0 / u->segs_per_row) * u->n + (s0 % u->segs_per_row) * SEG)
                          * f / 64 * 64;
    const int64_t end = (((i0 + (s1 - 1) / u->segs_per_row) * u->n + j_last
                          + (u->n - j_last < SEG ? u->n - j_last : SEG)) * f + 63)
                        / 64 * 64;
    while (pf.lines * 64 < end - first) pf.lines *= 2;
    /* the window, at most twice their span, starts in an earlier block (i0 >= ROWS), except
     * where one step's segments are a whole block: then it is shortened to stay in the arrays */
    while (pf.lines > 1 && pf.lines * 64 > end) pf.lines /= 2;
    const int64_t start = end - pf.lines * 64;
    pf.w = (const char *)u->W + start;
    pf.g = u->G ? (const char *)u->G + start : NULL;
    pf.b = u->G && u->buf ? (const char *)u->buf + start : NULL;
    return pf;
}

/* The row chunks of an m-row pass as it runs them: at least 1, at most one per block of ROWS
 * rows (0 for m = 0). */
static int64_t pass_chunks(int64_t chunks, int64_t m)
{
    const int64_t nblocks = (m + ROWS - 1) / ROWS;
    if (chunks < 1) chunks = 1;
    return chunks > nblocks ? nblocks : chunks;
}

/* One matrix. G == NULL: sketch only (W is not written). buf may be NULL without momentum.
 * wtype: W's element type (WTYPE_*; 16-bit only with G == NULL). Returns 0, -1 without memory
 * for the 16-bit scratch, -2 for an update of 16-bit weights or an unknown wtype (nothing run
 * on either).
 *
 * Per block of ROWS rows: the update of the block's rows (memory-bound), then its products,
 * tile by tile from cache (compute-bound), the first sweep's tiles also summing the squares of
 * the updated rows. The update runs one block ahead, spread over the tiles: after each tile of
 * block b a few segments of block b + 1 are updated, which that tile prefetched while its FMAs
 * ran, so the memory stream and the FMAs overlap (2048^2 power pass 6-11% faster, momentum 11%,
 * A/B in one process; without the prefetch the same interleaving was 15-30% slower than no
 * overlap). Small matrices gain as much: with the whole update of a block before its products,
 * 256^2 and 768 x 256 passes with momentum were 10-20% slower (their W, G and buf come from L3
 * or memory in a model's step, as from L2 when one matrix repeats: 8-14% slower there).
 *
 * The rows are cut into `chunks` fixed ranges of blocks, handed to the threads dynamically (a
 * thread that wakes late takes fewer; on a 2-core VM a sleeping thread's wake-up cost 0.4 ms of
 * a 0.8 ms pass with a static split, and one vCPU ran the same work 18% slower than the other).
 * Ranges shrink along the order they are handed out (chunk_start): with equal ranges the
 * threads waited 0.4 ms of thread time per 2048^2 pass at the end, 0.08 ms with shrinking ones.
 * Each chunk has its own Z partial in zwork (chunks * n * kp floats), summed in chunk order:
 * the result does not depend on which thread ran what, only on `chunks`. */
int lowrank_sgd_sketch_f32(int64_t m, int64_t n, int64_t kp, float *W, const float *G,
                           float *buf, const sgd_hyper *h, const float *U, const float *V,
                           float *Y, float *Z, double *row_sq, int mode, float *zwork,
                           int chunks, int nthreads, int wtype)
{
    if (wtype != WTYPE_F32 && (G != NULL || (wtype != WTYPE_BF16 && wtype != WTYPE_F16)))
        return -2; /* 16-bit weights are sketched only; the caller updates them */
    const int doy = (mode & (MODE_Y | MODE_POWER)) != 0;
    const int doz = (mode & MODE_Z) != 0, power = (mode & MODE_POWER) != 0;
    const int zside = doz || power;
    const int64_t nblocks = (m + ROWS - 1) / ROWS;
    const int64_t tc = tile_cols(kp), ntiles = (n + tc - 1) / tc;
    const int64_t steps = ntiles * (power ? 2 : 1);
    /* the update, or else the prefetches alone, run a block ahead of the products */
    const int ahead = G != NULL || (wtype == WTYPE_F32 && m * n >= PREFETCH_MIN);
    const block_update upd = {W, G, buf, h, m, n, (n + SEG - 1) / SEG};
    chunks = (int)pass_chunks(chunks, m);
    if (nthreads < 1) nthreads = 1;
    if (nthreads > chunks) nthreads = chunks;
    /* 16-bit W: each thread's float32 copy of the block it sketches */
    float *wide = NULL;
    if (wtype != WTYPE_F32 && m > 0 && n > 0) {
        wide = malloc(sizeof(float) * nthreads * ROWS * n);
        if (!wide) return -1;
    }
    #pragma omp parallel num_threads(nthreads)
    {
        float *my_wide = wide ? wide + (int64_t)omp_get_thread_num() * ROWS * n : NULL;
        #pragma omp for schedule(dynamic, 1)
        for (int c = 0; c < chunks; c++) {
            float *Zl = zwork + (int64_t)c * n * kp;
            const int64_t b0 = chunk_start(nblocks, c, chunks);
            const int64_t b1 = chunk_start(nblocks, c + 1, chunks);
            /* the chunk's first block writes its Z partial (ZFRESH), an empty chunk zeroes it:
             * a memset of every partial cost 7% of a ResNet step (wide matrices: the partials
             * of 8 chunks of a 256 x 2304 weight are half its size) */
            if (zside && b0 >= b1) memset(Zl, 0, sizeof(float) * n * kp);
            if (ahead && b0 < b1) update_segments(&upd, b0 * ROWS, 0, block_segments(&upd, b0));
            for (int64_t blk = b0; blk < b1; blk++) {
                const int64_t i0 = blk * ROWS;
                const int rows = (int)(m - i0 < ROWS ? m - i0 : ROWS);
                const float *Wb = W + i0 * n;
                if (my_wide) {
                    widen((const uint16_t *)W + i0 * n, wtype, my_wide, rows * n);
                    Wb = my_wide;
                }
                row_squares sq; /* row sums of squares, from the first sweep's tiles */
                memset(&sq, 0, sizeof sq);
                const int64_t next_segs = ahead && blk + 1 < b1 ? block_segments(&upd, blk + 1) : 0;
                /* n = 0: no steps, no segments */
                const int64_t per_step = steps ? (next_segs + steps - 1) / steps : 0;
                int64_t done = 0;
                if (doy) memset(Y + i0 * kp, 0, sizeof(float) * rows * kp);
                for (int64_t step = 0; step < steps; step++) {
                    /* power: the first sweep completes Y of these rows, the second adds
                     * Z[j] += W[r, j] Y[r] from the same rows in cache */
                    const int second = step >= ntiles;
                    const int64_t j0 = (second ? step - ntiles : step) * tc;
                    const int64_t jb = n - j0 < tc ? n - j0 : tc;
                    const int64_t upto = done + per_step < next_segs ? done + per_step : next_segs;
                    const prefetch_plan pf = plan_for(&upd, i0 + ROWS, done, upto);
                    const int zwrite = blk == b0 ? ZFRESH : 1;
                    if (!second)
                        tile(Wb + j0, n, rows, jb, U + i0 * kp, V + j0 * kp, Y + i0 * kp,
                             Zl + j0 * kp, kp, doy, doz && !power ? zwrite : 0, &pf, &sq);
                    else
                        tile(Wb + j0, n, rows, jb, Y + i0 * kp, V + j0 * kp, Y + i0 * kp,
                             Zl + j0 * kp, kp, 0, zwrite, &pf, NULL);
                    update_segments(&upd, i0 + ROWS, done, upto);
                    done = upto;
                }
                for (int r = 0; r < rows; r++)
                    row_sq[i0 + r] = row_square_sum(&sq, r, Wb + r * n, n);
            }
        } /* implicit barrier: every chunk's partial is complete */
        if (zside) {
            /* 16 entries at a time (n * kp is a multiple of 8: a tail of 8 at most), each
             * summed over the chunks in order */
            const int64_t nk = n * kp;
            #pragma omp for schedule(static)
            for (int64_t q = 0; q < nk; q += 16) {
                if (q + 16 <= nk) {
                    f16v s = ld_16(zwork + q);
                    for (int c = 1; c < chunks; c++) s += ld_16(zwork + (int64_t)c * nk + q);
                    st_16(Z + q, s);
                } else
                    for (int64_t e = q; e < nk; e++) {
                        float s = zwork[e];
                        for (int c = 1; c < chunks; c++) s += zwork[(int64_t)c * nk + e];
                        Z[e] = s;
                    }
            }
        }
    }
    free(wide);
    return 0;
}

/* One matrix of lowrank_sgd_sketch_many_f32, as the caller lays it out: an array of int64
 * fields (pointers as addresses; G NULL: sketch only; buf NULL without momentum). The
 * arguments of lowrank_sgd_sketch_f32, with the hyperparameters' buf_init per matrix (a
 * momentum buffer that this step creates) and no zwork (shared, allocated here). */
typedef struct {
    int64_t m, n, kp;
    float *W;
    const float *G;
    float *buf;
    const float *U, *V;
    float *Y, *Z;
    double *row_sq;
    int64_t mode, buf_init, chunks, threads, wtype;
} sketch_entry;
_Static_assert(sizeof(sketch_entry) == 16 * sizeof(int64_t), "one int64 per field");

/* The passes of `count` matrices of any shapes, one after the other, from one call: a model's
 * step otherwise returns to Python between matrices, whose work there (checks, allocations)
 * cost more than the pass of a small matrix, and more again after a large pass evicted it from
 * the caches. Each matrix gets the bits lowrank_sgd_sketch_f32 gives it alone. Returns 0, or
 * -1 without memory (for the Z partials: nothing run), or the first matrix's error code. */
int lowrank_sgd_sketch_many_f32(int64_t count, const sketch_entry *e, const sgd_hyper *h)
{
    int64_t most = 0; /* the largest Z partials of one matrix, reused by each */
    for (int64_t i = 0; i < count; i++) {
        const int64_t chunks = pass_chunks(e[i].chunks, e[i].m);
        const int64_t need = e[i].mode & (MODE_Z | MODE_POWER) ? chunks * e[i].n * e[i].kp : 0;
        if (need > most) most = need;
    }
    float *zwork = most ? malloc(sizeof(float) * most) : NULL;
    if (most && !zwork) return -1;
    int status = 0;
    for (int64_t i = 0; i < count; i++) {
        sgd_hyper hi = *h;
        hi.buf_init = (int)e[i].buf_init;
        const int rc = lowrank_sgd_sketch_f32(e[i].m, e[i].n, e[i].kp, e[i].W, e[i].G, e[i].buf,
                                              &hi, e[i].U, e[i].V, e[i].Y, e[i].Z, e[i].row_sq,
                                              (int)e[i].mode, zwork, (int)e[i].chunks,
                                              (int)e[i].threads, (int)e[i].wtype);
        if (rc != 0 && status == 0) status = rc;
    }
    free(zwork);
    return status;
}
