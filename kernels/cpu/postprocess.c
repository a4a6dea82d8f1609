/* CPU kernel of the post-processing of one side (the fast path of lowrank/postprocess.py's
 * _fast_side), float64 throughout, for a batch of b sketches S (p x k) against old bases B:
 *
 *   G = S^T S,  C = B^T S            k x k (k <= KMAX), from one read of S and B (row chunks)
 *   G = E diag(l) E^T                cyclic Jacobi, eigenvalues descending
 *   M = E diag(l)^-1/2               Ritz coefficients: S M is orthonormal
 *   overlap = C M, signs s = sign(diag(overlap)), T = M diag(s), overlap <- overlap diag(s)
 *   Q = S T (float32 basis),  sigma = sqrt(l),  optionally PT = P T (P: n x k float32)
 *
 * Entries: lowrank_postprocess_side (one side, a batch of same-shape sketches) and
 * lowrank_postprocess_sequential_many (both sides of a sequential step, Y then Z = P T_y, for
 * every matrix of a training step, whatever its shape, in one parallel region).
 *
 * Status per matrix: 0 done; 1 S is not finite; 2 the fast path does not apply (a direction
 * below the floors, or lambda_k / lambda_1 under `well_above`: the Ritz vectors would need a
 * Cholesky-QR round). The caller runs the torch reference for a batch with any nonzero status,
 * so this file holds no refill logic. Q, overlap, T, PT of such a matrix are left unwritten.
 *
 * Determinism: the Grams are summed over fixed chunks of CHUNK rows, partials added in chunk
 * order, so results do not depend on the number of threads.
 *
 * Why Jacobi: the k x k eigenproblems are tiny (k <= KMAX) and, once tracking has converged,
 * nearly diagonal in the tracked basis (G = V^T W^T W V with V close to the singular vectors),
 * where cyclic Jacobi converges in a sweep or two. Rotations are skipped when
 * |g_pq| <= eps sqrt(g_pp g_qq) (Demmel-Veselic), which keeps small eigenvalues of a positive
 * definite Gram to high relative accuracy.
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <omp.h>

/* Widest sketch taken. Jacobi costs O(k^3) per sweep against LAPACK's single reduction, and the
 * products run on one thread per chunk of rows: at k = 64 the torch path (threaded MKL) was
 * faster (1024^2 step 6.3 ms against 5.9 ms on the torch backend), at k = 32 this one (2.2 ms
 * against 3.6 ms). */
#define KMAX 32
/* Rows per task. 256 keeps both threads busy from 512 rows on: a 512^2 step 0.55 -> 0.49 ms,
 * 1024^2 1.01 -> 0.96 ms against 1024-row chunks (2048^2 unchanged; A/B in one process). */
#define CHUNK 256
#define JACOBI_MAX_SWEEPS 60
/* same constants as lowrank/postprocess.py */
#define GRAM_RELATIVE_FLOOR 1e-14
#define GRAM_ABSOLUTE_FLOOR 1e-280

enum { PP_OK = 0, PP_NONFINITE = 1, PP_GENERAL = 2 };

typedef double d8v __attribute__((vector_size(64)));
#define ALWAYS_INLINE static inline __attribute__((always_inline))

/* Rows [r, r + nr) of a float32 or float64 array (row stride ld) as doubles, padded with zeros
 * to kp columns, into buf (nr x kp). */
ALWAYS_INLINE void load_rows(const void *A, int a_f64, int64_t ld, int64_t r, int64_t nr,
                             int64_t k, double *buf, const int kp)
{
    for (int64_t i = 0; i < nr; i++) {
        double *o = buf + i * kp;
        if (a_f64) {
            const double *x = (const double *)A + (r + i) * ld;
            for (int64_t j = 0; j < k; j++) o[j] = x[j];
        } else {
            const float *x = (const float *)A + (r + i) * ld;
            for (int64_t j = 0; j < k; j++) o[j] = x[j];
        }
        for (int64_t j = k; j < kp; j++) o[j] = 0.0;
    }
}

#define RB 64 /* rows converted to float64 at a time (an L1-sized panel) */

/* Partial G = S^T S and C = B^T S over rows [r0, r1), written as k x k. Register blocking:
 * IB rows of G and of C (IB * kp / 8 vectors each) stay in registers while a panel of rows
 * streams past; each loaded row vector of S feeds 2 IB FMAs. kp is a compile-time constant in
 * each specialisation. */
ALWAYS_INLINE void partial_grams_kp(const void *S, int s_f64, int64_t lds, const float *B,
                                    int64_t r0, int64_t r1, int64_t k, double *G, double *C,
                                    const int kp)
{
    enum { IB = 4 };
    const int nv = kp / 8;
    double sbuf[RB * KMAX] __attribute__((aligned(64)));
    double bbuf[RB * KMAX] __attribute__((aligned(64)));
    d8v g[KMAX][KMAX / 8], c[KMAX][KMAX / 8];
    for (int i = 0; i < kp; i++)
        for (int v = 0; v < nv; v++) g[i][v] = c[i][v] = (d8v){0};
    for (int64_t rb = r0; rb < r1; rb += RB) {
        const int64_t nr = r1 - rb < RB ? r1 - rb : RB;
        load_rows(S, s_f64, lds, rb, nr, k, sbuf, kp);
        load_rows(B, 0, k, rb, nr, k, bbuf, kp);
        for (int i0 = 0; i0 < kp; i0 += IB) {
            d8v ga[IB][KMAX / 8], ca[IB][KMAX / 8];
            for (int ii = 0; ii < IB; ii++)
                for (int v = 0; v < nv; v++) {
                    ga[ii][v] = g[i0 + ii][v];
                    ca[ii][v] = c[i0 + ii][v];
                }
            for (int64_t r = 0; r < nr; r++) {
                const double *srow = sbuf + r * kp, *brow = bbuf + r * kp;
                d8v sv[KMAX / 8];
                for (int v = 0; v < nv; v++) memcpy(&sv[v], srow + 8 * v, sizeof(d8v));
                for (int ii = 0; ii < IB; ii++) {
                    const double si = srow[i0 + ii], bi = brow[i0 + ii];
                    for (int v = 0; v < nv; v++) {
                        ga[ii][v] += si * sv[v];
                        ca[ii][v] += bi * sv[v];
                    }
                }
            }
            for (int ii = 0; ii < IB; ii++)
                for (int v = 0; v < nv; v++) {
                    g[i0 + ii][v] = ga[ii][v];
                    c[i0 + ii][v] = ca[ii][v];
                }
        }
    }
    for (int64_t i = 0; i < k; i++)
        for (int64_t j = 0; j < k; j++) {
            G[i * k + j] = g[i][j / 8][j % 8];
            C[i * k + j] = c[i][j / 8][j % 8];
        }
}

/* out rows [r0, r1) = A rows times T (k x k); A float32 or float64 (row stride lda), out
 * float32 (out_f64 = 0) or float64, contiguous (p, k). RQ rows at a time (8 up to kp = 16,
 * RQ * kp / 8 accumulators), so that each vector of T loaded feeds RQ FMAs; T stays in L1
 * (its kp * kp doubles do not fit in registers). Each output element is the sum over i in
 * order, whatever RQ. */
ALWAYS_INLINE void apply_factor_kp(const void *A, int a_f64, int64_t lda, const double *T,
                                   int64_t k, int64_t r0, int64_t r1, void *out, int out_f64,
                                   const int kp)
{
    enum { RQ_MAX = 8 };
    const int nv = kp / 8, RQ = kp <= 16 ? 8 : 4;
    d8v t[KMAX][KMAX / 8];
    for (int i = 0; i < kp; i++)
        for (int v = 0; v < nv; v++)
            for (int j = 0; j < 8; j++) {
                const int64_t col = 8 * v + j;
                t[i][v][j] = i < k && col < k ? T[i * k + col] : 0.0;
            }
    double abuf[(RB + RQ_MAX) * KMAX] __attribute__((aligned(64)));
    for (int64_t rb = r0; rb < r1; rb += RB) {
        const int64_t nr = r1 - rb < RB ? r1 - rb : RB;
        load_rows(A, a_f64, lda, rb, nr, k, abuf, kp);
        /* zero rows up to a multiple of RQ: the last block reads them, writes none */
        memset(abuf + nr * kp, 0, sizeof(double) * kp * ((RQ - nr % RQ) % RQ));
        for (int64_t r = 0; r < nr; r += RQ) {
            const int rows = nr - r < RQ ? (int)(nr - r) : RQ;
            d8v acc[RQ_MAX][KMAX / 8];
            for (int q = 0; q < RQ; q++)
                for (int v = 0; v < nv; v++) acc[q][v] = (d8v){0};
            const double *a = abuf + r * kp;
            for (int i = 0; i < kp; i++)
                for (int q = 0; q < RQ; q++)
                    for (int v = 0; v < nv; v++) acc[q][v] += a[q * kp + i] * t[i][v];
            for (int q = 0; q < rows; q++) {
                const int64_t row = rb + r + q;
                /* a copy of kp elements compiles to vector moves, of k to a call */
                if (out_f64 && k == kp) {
                    memcpy((double *)out + row * k, acc[q], sizeof(double) * kp);
                } else if (out_f64) {
                    memcpy((double *)out + row * k, acc[q], sizeof(double) * k);
                } else {
                    float o[KMAX];
                    for (int v = 0; v < nv; v++)
                        for (int j = 0; j < 8; j++) o[8 * v + j] = (float)acc[q][v][j];
                    if (k == kp)
                        memcpy((float *)out + row * k, o, sizeof(float) * kp);
                    else
                        memcpy((float *)out + row * k, o, sizeof(float) * k);
                }
            }
        }
    }
}

/* One specialisation per padded width kp = 8, 16, ..., KMAX. */
#define SPECIALISE(KP)                                                                          \
    static void partial_grams_##KP(const void *S, int s_f64, int64_t lds, const float *B,      \
                                   int64_t r0, int64_t r1, int64_t k, double *G, double *C)     \
    { partial_grams_kp(S, s_f64, lds, B, r0, r1, k, G, C, KP); }                               \
    static void apply_factor_##KP(const void *A, int a_f64, int64_t lda, const double *T,      \
                                  int64_t k, int64_t r0, int64_t r1, void *out, int out_f64)    \
    { apply_factor_kp(A, a_f64, lda, T, k, r0, r1, out, out_f64, KP); }
SPECIALISE(8) SPECIALISE(16) SPECIALISE(24) SPECIALISE(32)

typedef void (*grams_fn)(const void *, int, int64_t, const float *, int64_t, int64_t, int64_t,
                         double *, double *);
typedef void (*apply_fn)(const void *, int, int64_t, const double *, int64_t, int64_t, int64_t,
                         void *, int);
static const grams_fn GRAMS[KMAX / 8] = {partial_grams_8, partial_grams_16, partial_grams_24,
                                         partial_grams_32};
static const apply_fn APPLY[KMAX / 8] = {apply_factor_8, apply_factor_16, apply_factor_24,
                                         apply_factor_32};

/* Eigendecomposition of the symmetric k x k matrix A (row-major, destroyed) by cyclic Jacobi:
 * evals descending, E's columns the eigenvectors (row-major k x k). Returns 0, or -1 when it
 * did not converge in JACOBI_MAX_SWEEPS sweeps (never seen; the caller then takes the
 * reference path). A rotation in the (p, q) plane changes rows and columns p and q only; the
 * rows are updated (contiguous) and mirrored into the columns, and the eigenvectors are kept
 * as rows of Vt, so every update runs along contiguous memory. */
static int jacobi_eigh(double *A, int64_t k, double *evals, double *E)
{
    double Vt[KMAX * KMAX];
    memset(Vt, 0, sizeof(double) * k * k);
    for (int64_t i = 0; i < k; i++) Vt[i * k + i] = 1.0;
    const double eps = 0x1.0p-53;
    int converged = 0;
    for (int sweep = 0; sweep < JACOBI_MAX_SWEEPS && !converged; sweep++) {
        int rotated = 0;
        for (int64_t p = 0; p < k - 1; p++)
            for (int64_t q = p + 1; q < k; q++) {
                double *Ap = A + p * k, *Aq = A + q * k;
                const double apq = Ap[q], app = Ap[p], aqq = Aq[q];
                if (apq == 0.0)
                    continue;
                if (fabs(apq) <= eps * sqrt(fabs(app * aqq))) {
                    Ap[q] = Aq[p] = 0.0;
                    continue;
                }
                rotated = 1;
                /* tan of the rotation angle, the smaller root (|t| <= 1), stable form */
                const double theta = (aqq - app) / (2.0 * apq);
                const double t = (theta >= 0 ? 1.0 : -1.0)
                                 / (fabs(theta) + sqrt(theta * theta + 1.0));
                const double c = 1.0 / sqrt(t * t + 1.0), s = t * c;
                for (int64_t r = 0; r < k; r++) {
                    const double apr = Ap[r], aqr = Aq[r];
                    Ap[r] = c * apr - s * aqr;
                    Aq[r] = s * apr + c * aqr;
                }
                Ap[p] = app - t * apq; /* exact forms of the 2 x 2 block */
                Aq[q] = aqq + t * apq;
                Ap[q] = Aq[p] = 0.0;
                for (int64_t r = 0; r < k; r++) { /* symmetry: columns p, q mirror the rows */
                    A[r * k + p] = Ap[r];
                    A[r * k + q] = Aq[r];
                }
                double *Vp = Vt + p * k, *Vq = Vt + q * k;
                for (int64_t r = 0; r < k; r++) {
                    const double vp = Vp[r], vq = Vq[r];
                    Vp[r] = c * vp - s * vq;
                    Vq[r] = s * vp + c * vq;
                }
            }
        converged = !rotated;
    }
    if (!converged)
        return -1;
    /* sort descending (selection sort over k <= KMAX entries) */
    int64_t order[KMAX];
    for (int64_t i = 0; i < k; i++) order[i] = i;
    for (int64_t i = 0; i < k; i++) {
        int64_t best = i;
        for (int64_t j = i + 1; j < k; j++)
            if (A[order[j] * k + order[j]] > A[order[best] * k + order[best]]) best = j;
        const int64_t tmp = order[i]; order[i] = order[best]; order[best] = tmp;
    }
    for (int64_t i = 0; i < k; i++) {
        evals[i] = A[order[i] * k + order[i]];
        for (int64_t r = 0; r < k; r++) E[r * k + i] = Vt[order[i] * k + r];
    }
    return 0;
}

static int all_finite(const void *S, int s_f64, int64_t ld, int64_t p, int64_t k)
{
    for (int64_t r = 0; r < p; r++)
        for (int64_t j = 0; j < k; j++) {
            const double x = s_f64 ? ((const double *)S)[r * ld + j]
                                   : ((const float *)S)[r * ld + j];
            if (!isfinite(x)) return 0;
        }
    return 1;
}

/* From the summed Grams of one matrix: status, sigma (k), T (k x k), overlap (k x k). */
static int factor(double *G, const double *C, int64_t k, double well_above, double *sigma,
                  double *T, double *overlap)
{
    double evals[KMAX], E[KMAX * KMAX];
    for (int64_t i = 0; i < k; i++)
        if (!isfinite(G[i * k + i])) return PP_NONFINITE; /* confirmed by the caller */
    if (jacobi_eigh(G, k, evals, E) != 0) return PP_GENERAL;
    const double top = evals[0], low = evals[k - 1];
    if (!(low > GRAM_RELATIVE_FLOOR * top && low > GRAM_ABSOLUTE_FLOOR && low > well_above * top))
        return PP_GENERAL;
    for (int64_t i = 0; i < k; i++) {
        sigma[i] = sqrt(evals[i]);
        const double inv = 1.0 / sigma[i];
        for (int64_t r = 0; r < k; r++) T[r * k + i] = E[r * k + i] * inv; /* M */
    }
    for (int64_t i = 0; i < k; i++) /* overlap = C M */
        for (int64_t j = 0; j < k; j++) {
            double acc = 0.0;
            for (int64_t l = 0; l < k; l++) acc += C[i * k + l] * T[l * k + j];
            overlap[i * k + j] = acc;
        }
    for (int64_t j = 0; j < k; j++)
        if (overlap[j * k + j] < 0)
            for (int64_t r = 0; r < k; r++) {
                T[r * k + j] = -T[r * k + j];
                overlap[r * k + j] = -overlap[r * k + j];
            }
    return PP_OK;
}

/* One side of a batch, as the stages below see it: sketches S (b, p, k) (float32 or float64,
 * row stride lds, matrix stride p * lds) against bases B (b, p, k) float32 contiguous; outputs
 * Q (b, p, k) float32, sigma (b, k), overlap and T (b, k, k) float64; optionally P (b, n, k)
 * float32 (row stride ldp) gives PT (b, n, k) float64. status (b) is shared by the sides of a
 * sequential step: a matrix whose status is not PP_OK is skipped by every later stage. */
typedef struct {
    int64_t b, p, k;
    const void *S;
    int s_f64;
    int64_t lds;
    const float *B;
    float *Q;
    double *sigma, *overlap, *T;
    const float *P;
    int64_t n, ldp;
    double *PT;
    double well_above;
    int *status;
    double *partial; /* 2 k^2 per chunk of rows per matrix */
} side_job;

static int64_t row_chunks(int64_t rows) { return (rows + CHUNK - 1) / CHUNK; }

#define S_ROWS(j, i) ((const char *)(j)->S + (size_t)(i) * (j)->p * (j)->lds \
                      * ((j)->s_f64 ? sizeof(double) : sizeof(float)))

/* A stage's work on one task: matrix i of job j, and for the row stages one chunk c of rows. */
static void grams_task(const side_job *j, int64_t i, int64_t c)
{
    const int64_t chunks = row_chunks(j->p), k = j->k;
    if (j->status[i] != PP_OK) return;
    const int64_t r0 = c * CHUNK, r1 = r0 + CHUNK < j->p ? r0 + CHUNK : j->p;
    double *G = j->partial + (i * chunks + c) * 2 * k * k;
    GRAMS[(k - 1) / 8](S_ROWS(j, i), j->s_f64, j->lds, j->B + i * j->p * k, r0, r1, k, G,
                       G + k * k);
}

static void factor_task(const side_job *j, int64_t i)
{
    const int64_t chunks = row_chunks(j->p), k = j->k;
    if (j->status[i] != PP_OK) return;
    double *G = j->partial + i * chunks * 2 * k * k, *C = G + k * k;
    for (int64_t c = 1; c < chunks; c++) { /* fixed order: deterministic */
        const double *Gc = G + c * 2 * k * k;
        for (int64_t e = 0; e < 2 * k * k; e++) G[e] += Gc[e];
    }
    int st = factor(G, C, k, j->well_above, j->sigma + i * k, j->T + i * k * k,
                    j->overlap + i * k * k);
    if (st == PP_NONFINITE && all_finite(S_ROWS(j, i), j->s_f64, j->lds, j->p, k))
        st = PP_GENERAL; /* finite entries whose squares overflow */
    j->status[i] = st;
}

/* Chunks c < row_chunks(p) write Q = S T, the next row_chunks(n) ones PT = P T. */
static int64_t apply_chunks(const side_job *j)
{
    return row_chunks(j->p) + (j->P ? row_chunks(j->n) : 0);
}

static void apply_task(const side_job *j, int64_t i, int64_t c)
{
    const int64_t k = j->k, qchunks = row_chunks(j->p);
    const apply_fn apply = APPLY[(k - 1) / 8];
    if (j->status[i] != PP_OK) return;
    if (c < qchunks) {
        const int64_t r0 = c * CHUNK, r1 = r0 + CHUNK < j->p ? r0 + CHUNK : j->p;
        apply(S_ROWS(j, i), j->s_f64, j->lds, j->T + i * k * k, k, r0, r1, j->Q + i * j->p * k,
              0);
    } else {
        const int64_t r0 = (c - qchunks) * CHUNK, r1 = r0 + CHUNK < j->n ? r0 + CHUNK : j->n;
        apply(j->P + i * j->n * j->ldp, 0, j->ldp, j->T + i * k * k, k, r0, r1,
              j->PT + i * j->n * k, 1);
    }
}

/* The stages over the matrices of one batch hold orphaned `omp for` loops: called inside a
 * parallel region they share its threads (each ends at a barrier), outside one they run on the
 * calling thread. */
static void side_grams(const side_job *j)
{
    const int64_t chunks = row_chunks(j->p);
    #pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < j->b * chunks; t++) grams_task(j, t / chunks, t % chunks);
}

static void side_factor(const side_job *j)
{
    #pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < j->b; i++) factor_task(j, i);
}

static void side_apply(const side_job *j)
{
    const int64_t chunks = apply_chunks(j);
    #pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < j->b * chunks; t++) apply_task(j, t / chunks, t % chunks);
}

static int count_failed(int64_t b, const int *status)
{
    int failed = 0;
    for (int64_t i = 0; i < b; i++) failed += status[i] != PP_OK;
    return failed;
}

/* One side for a batch (see side_job for the operands). Returns the number of matrices whose
 * status is not 0, or -1 for k > KMAX or no memory (nothing written). */
int lowrank_postprocess_side(int64_t b, int64_t p, int64_t k, const void *S, int s_f64,
                             int64_t lds, const float *B, float *Q, double *sigma,
                             double *overlap, double *T, const float *P, int64_t n, int64_t ldp,
                             double *PT, double well_above, int *status, int nthreads)
{
    if (k < 1 || k > KMAX) return -1;
    double *partial = malloc(sizeof(double) * 2 * k * k * row_chunks(p) * b);
    if (!partial) return -1;
    const side_job job = {b, p, k, S, s_f64, lds, B, Q, sigma, overlap, T, P, n, ldp, PT,
                          well_above, status, partial};
    for (int64_t i = 0; i < b; i++) status[i] = PP_OK;
    if (nthreads < 1) nthreads = 1;
    #pragma omp parallel num_threads(nthreads)
    {
        side_grams(&job);
        side_factor(&job);
        side_apply(&job);
    }
    free(partial);
    return count_failed(b, status);
}

/* One matrix of a sequential step (m x n, sketch width k), as the caller lays it out: an array
 * of int64 fields (pointers as addresses; NULL fro2: not checked).
 *   Y (m, k) float32, row stride ldy: Y = W V;  U_old (m, k) float32 contiguous;
 *   P (n, k) float32, row stride ldp: P = W^T Y;  V_old (n, k) float32 contiguous;
 *   fro2: ||W||_F^2 (float64), a matrix whose value is not finite has status 1;
 *   outputs U_next (m, k), V_next (n, k) float32; sigma, sigma_y, sigma_z (k) and overlap_u,
 *   overlap_v (k x k) float64. */
typedef struct {
    int64_t m, n, k;
    const float *Y;
    int64_t ldy;
    const float *U_old;
    const float *P;
    int64_t ldp;
    const float *V_old;
    const double *fro2;
    float *U_next, *V_next;
    double *sigma, *sigma_y, *sigma_z, *overlap_u, *overlap_v;
} sequential_entry;
_Static_assert(sizeof(sequential_entry) == 17 * sizeof(int64_t), "one int64 per field");

/* The job of the task t of a stage whose jobs have prefix[i] .. prefix[i + 1] - 1 (binary
 * search; a step has tens of matrices). */
static int64_t job_of(const int64_t *prefix, int64_t count, int64_t t)
{
    int64_t lo = 0, hi = count - 1;
    while (lo < hi) {
        const int64_t mid = (lo + hi + 1) / 2;
        if (prefix[mid] <= t) lo = mid; else hi = mid - 1;
    }
    return lo;
}

/* The three stages of one side for every matrix of the step: each stage's tasks (row chunks, or
 * one eigenproblem per matrix) over all matrices are shared by the threads, so that the small
 * matrices of a model (one row chunk each) run side by side instead of one at a time. */
static void sides_all(const side_job *jobs, int64_t count, const int64_t *grams_prefix,
                      const int64_t *apply_prefix)
{
    #pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < grams_prefix[count]; t++) {
        const int64_t i = job_of(grams_prefix, count, t);
        grams_task(&jobs[i], 0, t - grams_prefix[i]);
    }
    #pragma omp for schedule(dynamic, 1)
    for (int64_t i = 0; i < count; i++) factor_task(&jobs[i], 0);
    #pragma omp for schedule(dynamic, 1)
    for (int64_t t = 0; t < apply_prefix[count]; t++) {
        const int64_t i = job_of(apply_prefix, count, t);
        apply_task(&jobs[i], 0, t - apply_prefix[i]);
    }
}

/* Both sides of a step of the sequential schedule for `count` matrices of any shapes, in one
 * parallel region (one wake-up of the threads, no return to Python in between):
 *   Y side: Y against U_old -> U_next = Y T_y, sigma_y, overlap_u, and Z = P T_y (float64;
 *           = W^T U_next up to U_next's float32 rounding);
 *   Z side: Z against V_old -> V_next, sigma_z, overlap_v;
 *   sigma = max(sigma_y, sigma_z).
 * A matrix's results do not depend on the others, nor on the number of threads. status
 * (count): 0 done, else the matrix's outputs are not all written (the caller runs the
 * reference for it). Returns the number of nonzero statuses, or -1 for a k outside 1..KMAX or
 * no memory (nothing written). */
int lowrank_postprocess_sequential_many(int64_t count, const sequential_entry *e,
                                        double well_above, int *status, int nthreads)
{
    int64_t scratch = 0;
    for (int64_t i = 0; i < count; i++) {
        const int64_t k = e[i].k, rows = e[i].m > e[i].n ? e[i].m : e[i].n;
        if (k < 1 || k > KMAX) return -1;
        scratch += 2 * k * k * row_chunks(rows) + e[i].n * k + 2 * k * k;
    }
    double *work = malloc(sizeof(double) * (scratch > 0 ? scratch : 1));
    side_job *jobs = malloc(sizeof(side_job) * 2 * (count > 0 ? count : 1));
    int64_t *prefix = malloc(sizeof(int64_t) * 4 * (count + 1));
    if (!work || !jobs || !prefix) {
        free(work); free(jobs); free(prefix);
        return -1;
    }
    side_job *ys = jobs, *zs = jobs + count;
    int64_t *gy = prefix, *ay = gy + count + 1, *gz = ay + count + 1, *az = gz + count + 1;
    gy[0] = ay[0] = gz[0] = az[0] = 0;
    double *next = work;
    for (int64_t i = 0; i < count; i++) {
        const sequential_entry *x = &e[i];
        const int64_t k = x->k, rows = x->m > x->n ? x->m : x->n;
        double *partial = next, *Z = partial + 2 * k * k * row_chunks(rows), *T = Z + x->n * k;
        next = T + 2 * k * k;
        status[i] = x->fro2 && !isfinite(*x->fro2) ? PP_NONFINITE : PP_OK;
        ys[i] = (side_job){1, x->m, k, x->Y, 0, x->ldy, x->U_old, x->U_next, x->sigma_y,
                           x->overlap_u, T, x->P, x->n, x->ldp, Z, well_above, status + i,
                           partial};
        zs[i] = (side_job){1, x->n, k, Z, 1, k, x->V_old, x->V_next, x->sigma_z, x->overlap_v,
                           T + k * k, NULL, 0, 0, NULL, well_above, status + i, partial};
        gy[i + 1] = gy[i] + row_chunks(x->m);
        ay[i + 1] = ay[i] + apply_chunks(&ys[i]);
        gz[i + 1] = gz[i] + row_chunks(x->n);
        az[i + 1] = az[i] + apply_chunks(&zs[i]);
    }
    if (nthreads < 1) nthreads = 1;
    #pragma omp parallel num_threads(nthreads)
    {
        sides_all(ys, count, gy, ay);
        sides_all(zs, count, gz, az);
    }
    for (int64_t i = 0; i < count; i++)
        if (status[i] == PP_OK)
            for (int64_t j = 0; j < e[i].k; j++)
                e[i].sigma[j] = e[i].sigma_y[j] > e[i].sigma_z[j] ? e[i].sigma_y[j]
                                                                  : e[i].sigma_z[j];
    free(work); free(jobs); free(prefix);
    return count_failed(count, status);
}

/* Where lowrank_postprocess_sequential_commit writes one matrix's new state: its tracker's own
 * tensors (lowrank/tracking.py's MatrixTracker, static state), overwritten in place. Fields in
 * the order of the caller's int64 table. */
typedef struct {
    const double *row_sq_new; /* (m) the pass's row sums of squares */
    double *fro2_new;         /* scratch (1): their sum; the matrix's sequential_entry reads it */
    float *U, *V;             /* (m, k), (n, k) */
    double *sigma, *sigma_prev, *sigma_y, *sigma_z, *overlap_u, *fro2, *row_sq;
    uint8_t *nonfinite;       /* torch.bool (1) */
} state_entry;
_Static_assert(sizeof(state_entry) == 12 * sizeof(int64_t), "one int64 per field");

/* lowrank_postprocess_sequential_many for a step's matrices, then the commit of each matrix
 * whose status is 0 into its state: bases, sigma (the old one into sigma_prev), the two sides'
 * estimates, overlap_u, fro2 and row_sq, nonfinite cleared. A matrix with another status keeps
 * its whole state (the caller runs the reference for it, from the outputs of the pass). fro2 is
 * the sum of the row sums in row order (the finiteness check of the post-processing reads it:
 * an overflowed or NaN row makes the status 1). Returns what lowrank_postprocess_sequential_many
 * returns (-1: nothing written). */
int lowrank_postprocess_sequential_commit(int64_t count, const sequential_entry *e,
                                          const state_entry *s, double well_above,
                                          int *status, int nthreads)
{
    for (int64_t i = 0; i < count; i++) {
        double sum = 0.0;
        for (int64_t r = 0; r < e[i].m; r++) sum += s[i].row_sq_new[r];
        *s[i].fro2_new = sum;
    }
    const int rc = lowrank_postprocess_sequential_many(count, e, well_above, status, nthreads);
    if (rc < 0) return rc;
    for (int64_t i = 0; i < count; i++) {
        if (status[i] != PP_OK) continue;
        const sequential_entry *x = &e[i];
        const state_entry *y = &s[i];
        const int64_t k = x->k;
        memcpy(y->U, x->U_next, sizeof(float) * x->m * k);
        memcpy(y->V, x->V_next, sizeof(float) * x->n * k);
        memcpy(y->sigma_prev, y->sigma, sizeof(double) * k);
        memcpy(y->sigma, x->sigma, sizeof(double) * k);
        memcpy(y->sigma_y, x->sigma_y, sizeof(double) * k);
        memcpy(y->sigma_z, x->sigma_z, sizeof(double) * k);
        memcpy(y->overlap_u, x->overlap_u, sizeof(double) * k * k);
        *y->fro2 = *y->fro2_new;
        memcpy(y->row_sq, y->row_sq_new, sizeof(double) * x->m);
        *y->nonfinite = 0;
    }
    return rc;
}
