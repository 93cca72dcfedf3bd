/* spd (with or without cautious) of AdamW's fine-tuning options (zeroopt/algorithms/
 * adamw_options.py): phase 1 (moments, direction, cautious mask and the sums) and phase 2
 * (x <- x + step u, then the pull toward x0), each one pass over memory per piece. The
 * arithmetic and the sums' order are _adamw_options.c's (see its notes). */
#include "_adamw_options.h"

/* --- spd (and cautious) ----------------------------------------------------------------- */

enum { P_KEPT, P_GD, P_DD, P_UD, P_UU, P_ROWS };

/* projection_chunk without ADOPT: per block, one loop to the root (moments), one after it
 * (direction, cautious mask), then the sums, ZK_LANES lanes at a time in registers (in
 * memory they were a chain through the stack: half the kernel's time). The same lanes and
 * additions as the general path. CAUTIOUS and GRAMS are constants (one function each way,
 * projection_chunk_plain): without cautious neither the mask nor the kept count (0) is
 * computed. The scalars are locals, so that GCC vectorizes. */
static inline __attribute__((always_inline)) void projection_chunk_t(
        const adam_hyper a, const float sign, int64_t n, const float *restrict x,
        const float *restrict x0, float *restrict g, float *restrict m, float *restrict v,
        double *partial, zk_vml_sqrt root, const int CAUTIOUS, const int GRAMS) {
    lanes8 acc[P_ROWS][2] = {{{0}}};
    float gs[BLOCK], den[BLOCK], keep[BLOCK];
    int64_t e = 0, b = 0;
    for (; b < n; b += BLOCK) {
        e = min64(BLOCK, n - b);
        float *restrict gb = g + b, *restrict mb = m + b, *restrict vb = v + b;
        for (int64_t i = 0; i < e; i++) {
            const float gi = gb[i] * sign, mi = mb[i];
            gs[i] = gi;
            mb[i] = fmaf(a.lerp_coef, gi - mi, a.lerp_from_m ? mi : gi);
            const float vi = fmaf(a.omb2 * gi, gi, vb[i] * a.b2);
            vb[i] = vi;
            den[i] = vi;
        }
        options_roots(e, den, root);
        for (int64_t i = 0; i < e; i++) {  /* the direction, over the root */
            const float gi = gs[i];
            float u = (1.0f / (den[i] / a.c2 + a.eps)) * mb[i] * a.bc1;
            if (GRAMS) u = fabsf(u) * ((float)(gi > 0.0f) - (float)(gi < 0.0f));
            if (CAUTIOUS) {  /* keep_agreeing: u * (u g > 0) */
                const float kept = (float)(u * gi > 0.0f);
                keep[i] = kept;
                u = u * kept;
            }
            den[i] = u;
            gb[i] = u;
        }
        const float *restrict xb = x + b, *restrict x0b = x0 + b;
        for (int64_t i = 0; i + ZK_LANES <= e; i += ZK_LANES)
            for (int h = 0; h < 2; h++) {
                const int64_t k = i + 8 * h;
                const lanes8 dd = widen8(load8(xb + k) - load8(x0b + k));
                const lanes8 ud = widen8(load8(den + k));
                if (CAUTIOUS) acc[P_KEPT][h] += widen8(load8(keep + k));
                acc[P_GD][h] = fma8(widen8(load8(gs + k)), dd,
                                    acc[P_GD][h]);
                acc[P_DD][h] = fma8(dd, dd, acc[P_DD][h]);
                acc[P_UD][h] = fma8(ud, dd, acc[P_UD][h]);
                acc[P_UU][h] = fma8(ud, ud, acc[P_UU][h]);
            }
    }
    double l[P_ROWS][ZK_LANES];
    for (int r = 0; r < P_ROWS; r++) memcpy(l[r], acc[r], sizeof l[r]);
    if (n > 0) {  /* the last block's partial group of lanes */
        const float *xb = x + b - BLOCK, *x0b = x0 + b - BLOCK;
        for (int64_t i = e - e % ZK_LANES, j = 0; i < e; i++, j++) {
            const double dd = xb[i] - x0b[i], ud = den[i];
            if (CAUTIOUS) l[P_KEPT][j] += keep[i];
            l[P_GD][j] += (double)gs[i] * dd;
            l[P_DD][j] += dd * dd;
            l[P_UD][j] += ud * dd;
            l[P_UU][j] += ud * ud;
        }
    }
    for (int r = 0; r < P_ROWS; r++) partial[r] = zk_sum_lanes(l[r]);
}

static void projection_chunk_plain(const adam_hyper a, const float sign, const int cautious,
                                   int64_t n, const float *x, const float *x0, float *g,
                                   float *m, float *v, double *partial, zk_vml_sqrt root) {
    if (cautious && a.grams)
        projection_chunk_t(a, sign, n, x, x0, g, m, v, partial, root, 1, 1);
    else if (cautious)
        projection_chunk_t(a, sign, n, x, x0, g, m, v, partial, root, 1, 0);
    else if (a.grams)
        projection_chunk_t(a, sign, n, x, x0, g, m, v, partial, root, 0, 1);
    else
        projection_chunk_t(a, sign, n, x, x0, g, m, v, partial, root, 0, 0);
}

static void projection_chunk(int64_t lo, int64_t hi, float *const *t, const double *h,
                             double *partial, zk_vml_sqrt root) {
    const float *restrict x = t[0], *restrict x0 = t[4];
    float *restrict g = t[1], *restrict m = t[2], *restrict v = t[3];
    const adam_hyper a = read_adam(h);
    const float sign = (float)h[12];
    const int cautious = h[13] != 0;
    if (!a.adopt) {
        projection_chunk_plain(a, sign, cautious, hi - lo, x + lo, x0 + lo, g + lo, m + lo,
                               v + lo, partial, root);
        return;
    }
    double l[P_ROWS][ZK_LANES] = {{0}};
    for (int64_t b = lo; b < hi; b += BLOCK) {
        const int64_t e = min64(BLOCK, hi - b);
        float gs[BLOCK], d[BLOCK], u[BLOCK], keep[BLOCK];
        for (int64_t i = 0; i < e; i++) gs[i] = g[b + i] * sign;
        for (int64_t i = 0; i < e; i++) d[i] = x[b + i] - x0[b + i];
        adam_direction(&a, e, gs, 0, m + b, v + b, u, root);
        if (cautious)  /* keep_agreeing: u * (u g > 0) */
            for (int64_t i = 0; i < e; i++) {
                keep[i] = (float)(u[i] * gs[i] > 0.0f);
                u[i] = u[i] * keep[i];
            }
        for (int64_t i = 0; i < e; i += ZK_LANES) {  /* BLOCK is a multiple of ZK_LANES */
            const int64_t k = min64(ZK_LANES, e - i);
            for (int64_t j = 0; j < k; j++) {
                const double dd = d[i + j], ud = u[i + j];
                if (cautious) l[P_KEPT][j] += keep[i + j];
                l[P_GD][j] += (double)gs[i + j] * dd;
                l[P_DD][j] += dd * dd;
                l[P_UD][j] += ud * dd;
                l[P_UU][j] += ud * ud;
            }
        }
        for (int64_t i = 0; i < e; i++) g[b + i] = u[i];
    }
    for (int r = 0; r < P_ROWS; r++) partial[r] = zk_sum_lanes(l[r]);
}

/* Phase 1 of spd and cautious: t = [params, grads, exp_avg, exp_avg_sq, initial_param];
 * h[0..12) Adam's (no decay: 1), 12 sign (-1 with maximize), 13 cautious. Updates the moments and writes the direction (masked, with cautious)
 * over the gradients. out: kept count, <g,d>, <d,d>, <u,d>, <u,u> (d = x - x0),
 * adamw_options._projection_sums' rows. */
void zk_options_projection_sums(int64_t n, float *const *t, const double *h, double *out,
                                int threads) {
    const int64_t chunks = zk_chunks(n);
    const zk_vml_sqrt root = zk_torch_sqrt_function();
    double *partial = malloc((size_t)(chunks > 0 ? chunks : 1) * P_ROWS * sizeof(double));
    if (!partial) {
        double one[P_ROWS];
        for (int r = 0; r < P_ROWS; r++) out[r] = 0.0;
        for (int64_t c = 0; c < chunks; c++) {
            projection_chunk(c * ZK_CHUNK, min64(n, (c + 1) * ZK_CHUNK), t, h, one, root);
            for (int r = 0; r < P_ROWS; r++) out[r] += one[r];
        }
        return;
    }
    ZK_PARALLEL_FOR
    for (int64_t c = 0; c < chunks; c++)
        projection_chunk(c * ZK_CHUNK, min64(n, (c + 1) * ZK_CHUNK), t, h,
                         partial + c * P_ROWS, root);
    zk_add_partials(partial, chunks, P_ROWS, out);
    free(partial);
}

/* Phase 2: t = [params, direction (the gradients), initial_param (with a pull)];
 * h = [-lr scale, pull, k]: x <- x + u (-lr scale) (grads.mul_, params.add_), then
 * x.lerp_(x0, k) where pull. */
void zk_options_projection_apply(int64_t n, float *const *t, const double *h, double *out,
                                 int threads) {
    float *restrict p = t[0];
    const float *restrict u = t[1];
    const float step = (float)h[0], w = (float)h[2];
    (void)out;
    if (h[1] == 0) {
        ZK_PARALLEL_FOR
        for (int64_t i = 0; i < n; i++) p[i] = p[i] + u[i] * step;
        return;
    }
    const float *restrict x0 = t[2];
    const int from_x = w < 0.5f;
    const float coef = from_x ? w : w - 1.0f;
    ZK_PARALLEL_FOR
    for (int64_t i = 0; i < n; i++) {
        float xi = p[i] + u[i] * step;
        p[i] = fmaf(coef, x0[i] - xi, from_x ? xi : x0[i]);
    }
}
