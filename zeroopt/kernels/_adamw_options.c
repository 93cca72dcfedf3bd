/* AdamW's fine-tuning options with whole-param statistics (zeroopt/algorithms/
 * adamw_options.py): agr, orthograd, tam (one round of sums) here, spd (with or without
 * cautious) in _adamw_spd.c, what both share in _adamw_options.h; each phase of a flat step
 * in one pass over memory per piece.
 *
 * Phase 1 returns a piece's float64 sums, taken in ZK_CHUNK chunks added in chunk order, each
 * chunk as ZK_LANES running sums (element i into lane i % ZK_LANES from the chunk's start):
 * independent of the thread count. They are not the torch path's float64 sums bit for bit
 * (torch.dot and .sum add in their own order); every product of two fp32 numbers is exact in
 * double (the kernels fuse it into its add: the same), so the two differ in the order of the
 * float64 additions (and the rounding of the few products with g|g|, 72 bits): relative
 * ~n 2^-53 at worst, far below the fp32 ulp the scalars made of them are cast to.
 *
 * Everything element-wise repeats the arithmetic of the module's torch._foreach_ path, op for
 * op and rounding for rounding (ATen on the CPU; tests/test_native_rules_d.py):
 *
 *   lerp_(m, x, w)              w < 0.5 ? fmaf(w, x - m, m) : fmaf(w - 1, x - m, x)
 *   addcmul_(v, a, b, value=s)  fmaf(s * a, b, v)
 *   add_(a, b, alpha=s)         fmaf(s, b, a)       (no alpha: a + b)
 *   mul_ / add_ of a scalar     one rounding, by the scalar cast to float
 *   sqrt                        zk_sqrt_block's (MKL's where ATen's is: _torch_sqrt.h), its
 *                               MKL_SSE way 16 lanes at a time here (options_roots)
 *
 * Tensors go through in blocks of BLOCK elements: each option is one short loop over the
 * block (vectorized, the block in L1), so memory is still read and written once. The options
 * are compile-time constants of the loops (one function per combination), so an option that
 * is off costs nothing; the float64 sums are explicit 8-lane vectors in registers. The
 * transform step runs three blocks at once, each in another stage (first half, roots, second
 * half: transform_span3_t), so that its multiplications and divisions overlap; the
 * *_pieces kernels take a whole window's pieces in one call.
 */
#include "_adamw_options.h"

/* --- agr, orthograd, tam ---------------------------------------------------------------- */

enum { T_ABS, T_XG, T_XGA, T_XX, T_GG, T_A3, T_G4, T_MG, T_MGA, T_MX, T_MM, T_ROWS };

/* One element's 11 sums into lane j. A product of two floats is exact in double, so fma is
 * the product then the add; the products with g|g| (exact itself) round once, in the fma. */
#define TRANSFORM_TERMS(j, gf, xf, mf)                                                     \
    do {                                                                                   \
        const double gd = (gf), xd = (xf), md = (mf), a = fabs(gd), ga = gd * a;           \
        l[T_ABS][j] += a;                                                                  \
        l[T_XG][j] = fma(xd, gd, l[T_XG][j]);                                              \
        l[T_XGA][j] = fma(xd, ga, l[T_XGA][j]);                                            \
        l[T_XX][j] = fma(xd, xd, l[T_XX][j]);                                              \
        l[T_GG][j] = fma(gd, gd, l[T_GG][j]);                                              \
        l[T_A3][j] = fma(ga, gd, l[T_A3][j]);                                              \
        l[T_G4][j] = fma(ga, ga, l[T_G4][j]);                                              \
        l[T_MG][j] = fma(md, gd, l[T_MG][j]);                                              \
        l[T_MGA][j] = fma(md, ga, l[T_MGA][j]);                                            \
        l[T_MX][j] = fma(md, xd, l[T_MX][j]);                                              \
        l[T_MM][j] = fma(md, md, l[T_MM][j]);                                              \
    } while (0)

/* NEG (a constant at each call): maximize, the gradient negated (g * -1 is torch's neg).
 * Sixteen elements at a time, the sums in registers (two lanes8 a row: lanes 0-7, 8-15),
 * then the chunk's tail element by element into the same lanes: each lane's operations
 * are TRANSFORM_TERMS's, in the same order. */
static inline __attribute__((always_inline)) void transform_sums_body(
        int64_t lo, int64_t hi, float *const *t, const int NEG, double *partial) {
    float *restrict g = t[0];
    const float *restrict x = t[1], *restrict m = t[2];
    typedef int64_t bits8 __attribute__((vector_size(64)));
    const bits8 magnitude = (bits8){0} + INT64_MAX;
    lanes8 acc[T_ROWS][2] = {{{0}}};
    int64_t i = lo;
    for (; i + ZK_LANES <= hi; i += ZK_LANES)
        for (int h = 0; h < 2; h++) {
            const int64_t k = i + 8 * h;
            floats8 gf = load8(g + k);
            if (NEG) {
                gf = gf * -1.0f;
                memcpy(g + k, &gf, sizeof gf);
            }
            const lanes8 gd = widen8(gf);
            const lanes8 xd = widen8(load8(x + k));
            const lanes8 md = widen8(load8(m + k));
            const lanes8 a = (lanes8)((bits8)gd & magnitude), ga = gd * a;
            lanes8 *l = acc[0] + h;  /* row r: l[2 r] */
            l[2 * T_ABS] += a;
            l[2 * T_XG] = fma8(xd, gd, l[2 * T_XG]);
            l[2 * T_XGA] = fma8(xd, ga, l[2 * T_XGA]);
            l[2 * T_XX] = fma8(xd, xd, l[2 * T_XX]);
            l[2 * T_GG] = fma8(gd, gd, l[2 * T_GG]);
            l[2 * T_A3] = fma8(ga, gd, l[2 * T_A3]);
            l[2 * T_G4] = fma8(ga, ga, l[2 * T_G4]);
            l[2 * T_MG] = fma8(md, gd, l[2 * T_MG]);
            l[2 * T_MGA] = fma8(md, ga, l[2 * T_MGA]);
            l[2 * T_MX] = fma8(md, xd, l[2 * T_MX]);
            l[2 * T_MM] = fma8(md, md, l[2 * T_MM]);
        }
    double l[T_ROWS][ZK_LANES];
    for (int r = 0; r < T_ROWS; r++) memcpy(l[r], acc[r], sizeof l[r]);
    for (int j = 0; i < hi; i++, j++) {
        const float gf = NEG ? g[i] * -1.0f : g[i];
        if (NEG) g[i] = gf;
        TRANSFORM_TERMS(j, gf, x[i], m[i]);
    }
    for (int r = 0; r < T_ROWS; r++) partial[r] = zk_sum_lanes(l[r]);
}

static void transform_sums_chunk(int64_t lo, int64_t hi, float *const *t, float sign,
                                 double *partial) {
    if (sign != 1.0f)
        transform_sums_body(lo, hi, t, 1, partial);
    else
        transform_sums_body(lo, hi, t, 0, partial);
}

/* Phase 1: t = [grads, params, m (exp_avg; the params where tam is off)], h[0] = sign (-1
 * with maximize: the gradients are negated in place, as the torch path's _foreach_neg_).
 * out[0..11): sum|g|, <x,g>, <x,g|g|>, <x,x>, <g,g>, sum|g|^3, sum g^4, <m,g>, <m,g|g|>,
 * <m,x>, <m,m> (adamw_options._transform_sums' rows). */
void zk_options_transform_sums(int64_t n, float *const *t, const double *h, double *out,
                               int threads) {
    const int64_t chunks = zk_chunks(n);
    const float sign = (float)h[0];
    double *partial = malloc((size_t)(chunks > 0 ? chunks : 1) * T_ROWS * sizeof(double));
    if (!partial) {  /* out of memory: the same additions, one chunk at a time */
        double one[T_ROWS];
        for (int r = 0; r < T_ROWS; r++) out[r] = 0.0;
        for (int64_t c = 0; c < chunks; c++) {
            transform_sums_chunk(c * ZK_CHUNK, min64(n, (c + 1) * ZK_CHUNK), t, sign, one);
            for (int r = 0; r < T_ROWS; r++) out[r] += one[r];
        }
        return;
    }
    ZK_PARALLEL_FOR
    for (int64_t c = 0; c < chunks; c++)
        transform_sums_chunk(c * ZK_CHUNK, min64(n, (c + 1) * ZK_CHUNK), t, sign,
                             partial + c * T_ROWS);
    zk_add_partials(partial, chunks, T_ROWS, out);
    free(partial);
}

/* The step of e <= BLOCK elements without ADOPT: one loop to the root, one after it. The
 * options are constants (transform_block_t is inlined into one function per combination,
 * TRANSFORM_BLOCKS): an option that is off costs nothing, and a select (not a branch:
 * -ftrapping-math forbids converting one) is not computed on both sides. The scalars are
 * locals: in the OpenMP region GCC reloads them each iteration (they might alias the
 * stores) and does not vectorize. */
typedef struct {
    adam_hyper a;
    float S, inv_s, neg_p, c, gamma, k, wd;
} transform_hyper;

/* The step's two halves of one element, the options constants: first, the gradient's
 * transforms, the decay, s, m and v (dir[i] <- v, gs[i] <- the gradient the moments saw,
 * with grams); second, after the root of dir[i], the direction and x's update. */
#define TRANSFORM_LOCALS(th)                                                               \
    const adam_hyper a = (th)->a;                                                          \
    const float S = (th)->S, inv_s = (th)->inv_s, neg_p = (th)->neg_p, c = (th)->c;       \
    const float gamma = (th)->gamma, k = (th)->k, wd = (th)->wd;                           \
    (void)S; (void)inv_s; (void)neg_p; (void)c; (void)gamma; (void)k; (void)wd

#define TRANSFORM_FIRST(i, x, gb, mb, vb, sb, dir, gs)                                     \
    do {                                                                                   \
        float gi = gb[i], mi = mb[i];                                                      \
        const float xi = x[i];                                                             \
        if (AGR) gi = gi * ((-fabsf(gi) + S) * inv_s);  /* g.mul_(g.abs().neg_().add_(S).mul_(1 / S)) */ \
        if (ORTHO) gi = fmaf(neg_p, xi, gi) * c;        /* g.add_(x, alpha=-p).mul_(c) */  \
        if (L2) gi = fmaf(wd, xi, gi);                                                     \
        if (GRAMS) gs[i] = gi;                                                             \
        x[i] = xi * a.decay;  /* 1 without decay: exact */                                 \
        if (TAM) {  /* s <- gamma s + (1 - gamma) cos; damping (s + 1) / 2 + eps */        \
            const float si = sb[i] * gamma + k;                                            \
            sb[i] = si;                                                                    \
            mi = fmaf(a.omb1, (((si + 1.0f) * 0.5f) + a.eps) * gi, mi * a.b1);             \
        } else {                                                                           \
            mi = fmaf(a.lerp_coef, gi - mi, a.lerp_from_m ? mi : gi);                      \
        }                                                                                  \
        mb[i] = mi;                                                                        \
        const float vi = fmaf(a.omb2 * gi, gi, vb[i] * a.b2);                              \
        vb[i] = vi;                                                                        \
        dir[i] = vi;                                                                       \
    } while (0)

#define TRANSFORM_SECOND(i, x, mb, dir, gs)                                                \
    do {                                                                                   \
        float d = (1.0f / (dir[i] / a.c2 + a.eps)) * mb[i] * a.bc1;                        \
        if (GRAMS) d = fabsf(d) * ((float)(gs[i] > 0.0f) - (float)(gs[i] < 0.0f));         \
        x[i] = fmaf(a.neg_lr, d, x[i]);                                                    \
    } while (0)

/* A whole block's first half and the previous block's second half in one loop: the first is
 * multiplications, the second two divisions an element, and the core runs them side by side
 * (in two loops the divider waited through the first). */
static inline __attribute__((always_inline)) void transform_pair_t(
        const transform_hyper *th, float *restrict x, const float *restrict gb,
        float *restrict mb, float *restrict vb, float *restrict sb, float *restrict dir,
        float *restrict gs, float *restrict xp, const float *restrict mp,
        const float *restrict dp, const float *restrict gp,
        const int AGR, const int ORTHO, const int L2, const int TAM, const int GRAMS) {
    TRANSFORM_LOCALS(th);
    for (int64_t i = 0; i < BLOCK; i++) {
        TRANSFORM_FIRST(i, x, gb, mb, vb, sb, dir, gs);
        TRANSFORM_SECOND(i, xp, mp, dp, gp);
    }
}

static inline __attribute__((always_inline)) void transform_first_t(
        const transform_hyper *th, int64_t e, float *restrict x, const float *restrict gb,
        float *restrict mb, float *restrict vb, float *restrict sb, float *restrict dir,
        float *restrict gs, const int AGR, const int ORTHO, const int L2, const int TAM,
        const int GRAMS) {
    TRANSFORM_LOCALS(th);
    for (int64_t i = 0; i < e; i++) TRANSFORM_FIRST(i, x, gb, mb, vb, sb, dir, gs);
}

static inline __attribute__((always_inline)) void transform_second_t(
        const transform_hyper *th, int64_t e, float *restrict x, const float *restrict mb,
        const float *restrict dir, const float *restrict gs, const int GRAMS) {
    TRANSFORM_LOCALS(th);
    for (int64_t i = 0; i < e; i++) TRANSFORM_SECOND(i, x, mb, dir, gs);
}

#ifdef OPTIONS_FAST_ROOT
/* options_sse_roots on one whole group of sixteen: roots in place, the lanes MKL roots itself
 * appended to vals / where (their index: at + lane), for one MKL call per block. */
static inline void options_root_group(float *x, int at, float *vals, int *where, int *count) {
    const __m512i lo = _mm512_set1_epi32(0x0c800000);
    const __m512i span = _mm512_set1_epi32(0x7f7ff000 - 0x0c800000);
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    const __m512 v = _mm512_loadu_ps(x);
    const __m512i bits = _mm512_castps_si512(v);
    const __mmask16 normal = _mm512_cmple_epu32_mask(_mm512_sub_epi32(bits, lo), span);
    const __mmask16 zero = _mm512_testn_epi32_mask(bits, magnitude);
    _mm512_storeu_ps(x, _mm512_mask_mov_ps(v, normal, options_sse_root16(v)));
    for (unsigned rest = ~(unsigned)(normal | zero) & 0xffffu; rest; rest &= rest - 1) {
        const int j = __builtin_ctz(rest);
        vals[*count] = x[j];
        where[(*count)++] = at + j;
    }
}

/* Three whole blocks, each in another stage, sixteen elements at a time: block t's first
 * half (x, ...), block t - 1's roots (rdir, MKL_SSE's way), block t - 2's second half (xp,
 * ...). The stages' operations are independent, so the core overlaps the first's
 * multiplications, the roots' and the second's divisions. */
static inline __attribute__((always_inline)) void transform_triple_t(
        const transform_hyper *th, float *restrict x, const float *restrict gb,
        float *restrict mb, float *restrict vb, float *restrict sb, float *restrict dir,
        float *restrict gs, float *restrict rdir, float *restrict xp, const float *restrict mp,
        const float *restrict dp, const float *restrict gp, zk_vml_sqrt root,
        const int AGR, const int ORTHO, const int L2, const int TAM, const int GRAMS) {
    TRANSFORM_LOCALS(th);
    float vals[BLOCK];
    int where[BLOCK], count = 0;
    for (int64_t j = 0; j < BLOCK; j += 16) {
        for (int64_t i = j; i < j + 16; i++) TRANSFORM_FIRST(i, x, gb, mb, vb, sb, dir, gs);
        options_root_group(rdir + j, (int)j, vals, where, &count);
        for (int64_t i = j; i < j + 16; i++) TRANSFORM_SECOND(i, xp, mp, dp, gp);
    }
    if (count) {
        float roots[BLOCK];
        root(count, vals, roots, ZK_VML_MODE);
        for (int q = 0; q < count; q++) rdir[where[q]] = roots[q];
    }
}

static inline __attribute__((always_inline)) void transform_span3_t(
        const transform_hyper *th, int64_t n, float *restrict x, const float *restrict g,
        float *restrict m, float *restrict v, float *restrict s, zk_vml_sqrt root,
        const int AGR, const int ORTHO, const int L2, const int TAM, const int GRAMS) {
    float dir[3][BLOCK], gs[3][BLOCK];
    const int64_t blocks = (n + BLOCK - 1) / BLOCK;
    for (int64_t t = 0; t < blocks + 2; t++) {
        const int64_t b = t * BLOCK, e = t < blocks ? min64(BLOCK, n - b) : 0;
        const int q0 = (int)(t % 3), q1 = (int)((t + 2) % 3), q2 = (int)((t + 1) % 3);
        float *sb = TAM ? s + b : 0;
        if (t >= 2 && e == BLOCK) {  /* blocks t - 1 and t - 2 are whole: not the last */
            const int64_t bp = b - 2 * BLOCK;
            transform_triple_t(th, x + b, g + b, m + b, v + b, sb, dir[q0], gs[q0], dir[q1],
                               x + bp, m + bp, dir[q2], gs[q2], root, AGR, ORTHO, L2, TAM,
                               GRAMS);
            continue;
        }
        if (t >= 2) {
            const int64_t bp = b - 2 * BLOCK;
            transform_second_t(th, min64(BLOCK, n - bp), x + bp, m + bp, dir[q2], gs[q2],
                               GRAMS);
        }
        if (t >= 1 && t - 1 < blocks)
            options_roots(min64(BLOCK, n - (b - BLOCK)), dir[q1], root);
        if (t < blocks)
            transform_first_t(th, e, x + b, g + b, m + b, v + b, sb, dir[q0], gs[q0], AGR,
                              ORTHO, L2, TAM, GRAMS);
    }
}
#endif

/* The step of n elements without ADOPT, BLOCK at a time, pipelined: block b's first half,
 * with block b - 1's second half (transform_pair_t), then block b's roots. The options are
 * constants (inlined into one function per combination, TRANSFORM_BLOCKS): an option that is
 * off costs nothing, and a select (not a branch: -ftrapping-math forbids converting one) is
 * not computed on both sides. The scalars are locals: in the OpenMP region GCC reloads them
 * each iteration (they might alias the stores) and does not vectorize. */
static inline __attribute__((always_inline)) void transform_span_t(
        const transform_hyper *th, int64_t n, float *restrict x, const float *restrict g,
        float *restrict m, float *restrict v, float *restrict s, zk_vml_sqrt root,
        const int AGR, const int ORTHO, const int L2, const int TAM, const int GRAMS) {
#ifdef OPTIONS_FAST_ROOT
    if (root && __atomic_load_n(&zk_sqrt_mode, __ATOMIC_RELAXED) == ZK_SQRT_MKL_SSE) {
        transform_span3_t(th, n, x, g, m, v, s, root, AGR, ORTHO, L2, TAM, GRAMS);
        return;
    }
#endif
    float dir[2][BLOCK], gs[2][BLOCK];
    int64_t prev = -1, prev_e = 0;
    for (int64_t b = 0, q = 0; b < n; b += BLOCK, q ^= 1) {
        const int64_t e = min64(BLOCK, n - b);
        float *sb = TAM ? s + b : 0;
        if (prev >= 0 && e == BLOCK) {
            transform_pair_t(th, x + b, g + b, m + b, v + b, sb, dir[q], gs[q], x + prev,
                             m + prev, dir[q ^ 1], gs[q ^ 1], AGR, ORTHO, L2, TAM, GRAMS);
        } else {
            if (prev >= 0)
                transform_second_t(th, prev_e, x + prev, m + prev, dir[q ^ 1], gs[q ^ 1],
                                   GRAMS);
            transform_first_t(th, e, x + b, g + b, m + b, v + b, sb, dir[q], gs[q], AGR,
                              ORTHO, L2, TAM, GRAMS);
        }
        options_roots(e, dir[q], root);
        prev = b;
        prev_e = e;
    }
    if (prev >= 0)
        transform_second_t(th, prev_e, x + prev, m + prev, dir[(n - 1) / BLOCK & 1],
                           gs[(n - 1) / BLOCK & 1], GRAMS);
}

typedef void (*transform_block_fn)(const transform_hyper *, int64_t, float *, const float *,
                                   float *, float *, float *, zk_vml_sqrt);

#define TRANSFORM_BLOCK(A, O, L, T, G)                                                      \
    static void transform_block_##A##O##L##T##G(                                           \
            const transform_hyper *th, int64_t e, float *restrict x, const float *restrict gb, \
            float *restrict mb, float *restrict vb, float *restrict sb, zk_vml_sqrt root) { \
        transform_span_t(th, e, x, gb, mb, vb, sb, root, A, O, L, T, G);                    \
    }
#define TRANSFORM_BLOCKS_G(A, O, L, T) TRANSFORM_BLOCK(A, O, L, T, 0) TRANSFORM_BLOCK(A, O, L, T, 1)
#define TRANSFORM_BLOCKS_T(A, O, L) TRANSFORM_BLOCKS_G(A, O, L, 0) TRANSFORM_BLOCKS_G(A, O, L, 1)
#define TRANSFORM_BLOCKS_L(A, O) TRANSFORM_BLOCKS_T(A, O, 0) TRANSFORM_BLOCKS_T(A, O, 1)
#define TRANSFORM_BLOCKS_O(A) TRANSFORM_BLOCKS_L(A, 0) TRANSFORM_BLOCKS_L(A, 1)
TRANSFORM_BLOCKS_O(0)
TRANSFORM_BLOCKS_O(1)

/* Indexed by agr | ortho << 1 | l2 << 2 | tam << 3 | grams << 4. */
static const transform_block_fn TRANSFORM_BLOCKS[32] = {
    transform_block_00000, transform_block_10000, transform_block_01000, transform_block_11000,
    transform_block_00100, transform_block_10100, transform_block_01100, transform_block_11100,
    transform_block_00010, transform_block_10010, transform_block_01010, transform_block_11010,
    transform_block_00110, transform_block_10110, transform_block_01110, transform_block_11110,
    transform_block_00001, transform_block_10001, transform_block_01001, transform_block_11001,
    transform_block_00101, transform_block_10101, transform_block_01101, transform_block_11101,
    transform_block_00011, transform_block_10011, transform_block_01011, transform_block_11011,
    transform_block_00111, transform_block_10111, transform_block_01111, transform_block_11111,
};

/* Phase 2: t = [params, grads, exp_avg, exp_avg_sq, tam_s (with tam)]; h[0..12) Adam's (see
 * read_adam), then 12 agr (and S > 0), 13 S = sum|g|, 14 1/S, 15 orthograd, 16 -p, 17 c,
 * 18 tam, 19 gamma, 20 (1 - gamma) cos, 21 l2 (Adam's coupled decay), 22 wd, 23 ADOPT's first
 * step (v += g g only). The gradients are read, not written (the torch path leaves them
 * transformed; nothing reads them after the step). */
void zk_options_transform_step(int64_t n, float *const *t, const double *h, double *out,
                               int threads) {
    float *p = t[0], *g = t[1], *m = t[2], *v = t[3], *s = h[18] != 0 ? t[4] : 0;
    const adam_hyper a = read_adam(h);
    const int agr = h[12] != 0, ortho = h[15] != 0, l2 = h[21] != 0, first = h[23] != 0;
    const float S = (float)h[13], inv_s = (float)h[14], neg_p = (float)h[16], c = (float)h[17];
    const float gamma = (float)h[19], k = (float)h[20], wd = (float)h[22];
    const zk_vml_sqrt root = zk_torch_sqrt_function();
    (void)out;
    if (!a.adopt && !first) {
        const transform_hyper th = {a, S, inv_s, neg_p, c, gamma, k, wd};
        const transform_block_fn block =
            TRANSFORM_BLOCKS[agr | ortho << 1 | l2 << 2 | (s != 0) << 3 | a.grams << 4];
        const int64_t chunks = zk_chunks(n);  /* ZK_CHUNK: a multiple of BLOCK */
        ZK_PARALLEL_FOR
        for (int64_t q = 0; q < chunks; q++) {
            const int64_t b = q * ZK_CHUNK;
            block(&th, min64(ZK_CHUNK, n - b), p + b, g + b, m + b, v + b, s ? s + b : 0, root);
        }
        return;
    }
    ZK_PARALLEL_FOR
    for (int64_t b = 0; b < n; b += BLOCK) {
        const int64_t e = min64(BLOCK, n - b);
        float *restrict x = p + b, *restrict mb = m + b, *restrict vb = v + b;
        float gs[BLOCK], damp[BLOCK], dir[BLOCK];
        for (int64_t i = 0; i < e; i++) gs[i] = g[b + i];
        if (agr)  /* g.mul_(g.abs().neg_().add_(S).mul_(1 / S)) */
            for (int64_t i = 0; i < e; i++) gs[i] = gs[i] * ((-fabsf(gs[i]) + S) * inv_s);
        if (ortho)  /* g.add_(x, alpha=-p).mul_(c) */
            for (int64_t i = 0; i < e; i++) gs[i] = fmaf(neg_p, x[i], gs[i]) * c;
        if (l2)
            for (int64_t i = 0; i < e; i++) gs[i] = fmaf(wd, x[i], gs[i]);
        if (first) {  /* ADOPT's first step: addcmul_(v, g, g, value=1) */
            for (int64_t i = 0; i < e; i++) vb[i] = fmaf(gs[i], gs[i], vb[i]);
            continue;
        }
        for (int64_t i = 0; i < e; i++) x[i] = x[i] * a.decay;
        if (s) {  /* s <- gamma s + (1 - gamma) cos; damping (s + 1) / 2 + eps */
            float *restrict sb = s + b;
            for (int64_t i = 0; i < e; i++) {
                float si = sb[i] * gamma + k;
                sb[i] = si;
                damp[i] = (si + 1.0f) * 0.5f + a.eps;
            }
        }
        adam_direction(&a, e, gs, s ? damp : 0, mb, vb, dir, root);
        for (int64_t i = 0; i < e; i++) x[i] = fmaf(a.neg_lr, dir[i], x[i]);
    }
}

/* Both phases over a window's pieces lying end to end in every buffer, in one call (a call
 * from Python costs ~6 us; a window has a piece per param): t as the one-piece kernels' t,
 * each pointer at the first piece. Each piece is computed by the one-piece kernel on it alone
 * (its own chunks and blocks), so the results are those of a call per piece.
 *
 * Phase 1: h[0] sign, h[1] P (pieces), h[2..2+P) their lengths; out: 11 sums a piece, piece
 * after piece. */
void zk_options_transform_sums_pieces(int64_t n, float *const *t, const double *h,
                                      double *out, int threads) {
    const int64_t pieces = (int64_t)h[1];
    int64_t at = 0;
    for (int64_t q = 0; q < pieces; q++) {
        const int64_t len = (int64_t)h[2 + q];
        if (len < 0 || at + len > n) return;  /* not the caller's tensors: touch nothing */
        float *const tq[3] = {t[0] + at, t[1] + at, t[2] + at};
        zk_options_transform_sums(len, tq, h, out + q * T_ROWS, threads);
        at += len;
    }
}

/* Phase 2: h[0] P, then per piece TRANSFORM_PIECE values: its length and
 * zk_options_transform_step's 24 hyperparameters. */
#define TRANSFORM_PIECE 25
void zk_options_transform_step_pieces(int64_t n, float *const *t, const double *h,
                                      double *out, int threads) {
    const int64_t pieces = (int64_t)h[0];
    int64_t at = 0;
    for (int64_t q = 0; q < pieces; q++) {
        const double *hq = h + 1 + q * TRANSFORM_PIECE;
        const int64_t len = (int64_t)hq[0];
        if (len < 0 || at + len > n) return;
        float *const tq[5] = {t[0] + at, t[1] + at, t[2] + at, t[3] + at, t[4] + at};
        zk_options_transform_step(len, tq, hq + 1, out, threads);
        at += len;
    }
}
