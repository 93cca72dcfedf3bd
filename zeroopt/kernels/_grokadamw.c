/* GrokAdamW (zeroopt/algorithms/grokadamw.py): the step in one pass per piece.
 *
 * Each element's arithmetic is grokadamw.py's torch._foreach_* path, op for op, with ATen's
 * roundings (as _adam_variants.c: add_ with alpha and addcmul are FMAs, addcdiv is not,
 * scalars are cast to float, the square root is torch's own, _torch_sqrt.h):
 *
 *   g <- g coef                                (the clipping; coef 1 without: exact)
 *   e <- e a;  e <- e + (1 - a) g              (grok_ema)
 *   g <- g + e lamb                            (the amplified gradient)
 *   m <- m b1i;  m <- m + (1 - b1i) g
 *   v <- v b2;  v <- v + (1 - b2) g g
 *   x <- x (1 - lr wd)                         (1 without decay: exact)
 *   x <- x + (-step_size) m / (sqrt(v) + eps)
 *
 * The gradients are not written back (step() consumes them; nothing reads them after).
 *
 * The statistics' sum of squares (zk_grokadamw_sum_squares) is in double, exact products, in
 * ZK_CHUNK chunks added in order, each chunk's as LANES running sums (element i into lane
 * i % LANES from the chunk's start) added in lane order: the same for any thread count.
 * torch's _foreach_norm (the torch path) adds the same doubles in an order of its own, which
 * depends on the thread count, and ~15x slower than this.
 */
#include "kernels.h"
#include "_torch_sqrt.h"

/* Elements per block: every stream's block and the buffers stay in L1 (GrokAdamW's five
 * streams: 256 measured 1.5x AdamW's fused step, 512 1.9x, 1024 2.4x). */
#define BLOCK 256
#define LANES 16

typedef struct { float coef, a, oma, lamb, b1, omb1, b2, omb2, decay, eps, neg_step; } grok_hyper;

static void grok_block(const grok_hyper *k, int64_t n, float *p, const float *g, float *m,
                       float *v, float *e, zk_vml_sqrt root) {
    float den[BLOCK];
    for (int64_t i = 0; i < n; i++) {
        float x = g[i] * k->coef;
        const float ei = fmaf(k->oma, x, e[i] * k->a);
        e[i] = ei;
        x = x + ei * k->lamb;
        m[i] = fmaf(k->omb1, x, m[i] * k->b1);
        const float vi = fmaf(k->omb2 * x, x, v[i] * k->b2);
        v[i] = vi;
        den[i] = vi;
    }
    zk_sqrt_block(n, den, root);
    for (int64_t i = 0; i < n; i++)
        p[i] = p[i] * k->decay + k->neg_step * m[i] / (den[i] + k->eps);
}

/* t = [params, grads, exp_avg, exp_avg_sq, grok_ema]; h = [coef, a, 1 - a, lamb, b1i,
 * 1 - b1i, b2, 1 - b2, 1 - lr wd (or 1), eps, -step_size]. */
void zk_grokadamw_step(int64_t n, float *const *t, const double *h, double *out, int threads) {
    const grok_hyper k = {(float)h[0], (float)h[1], (float)h[2], (float)h[3], (float)h[4],
                          (float)h[5], (float)h[6], (float)h[7], (float)h[8], (float)h[9],
                          (float)h[10]};
    zk_vml_sqrt root = zk_torch_sqrt_function();
    (void)out;
    ZK_PARALLEL_FOR
    for (int64_t b = 0; b < n; b += BLOCK)
        grok_block(&k, n - b < BLOCK ? n - b : BLOCK, t[0] + b, t[1] + b, t[2] + b, t[3] + b,
                   t[4] + b, root);
}

static double sum_squares_chunk(const float *x, int64_t n) {
    double lane[LANES] = {0};
    int64_t i = 0;
    for (; i + LANES <= n; i += LANES)
        for (int j = 0; j < LANES; j++) lane[j] += (double)x[i + j] * (double)x[i + j];
    for (int j = 0; i + j < n; j++) lane[j] += (double)x[i + j] * (double)x[i + j];
    double sum = 0.0;
    for (int j = 0; j < LANES; j++) sum += lane[j];
    return sum;
}

/* The statistics: t = [grads]; out[0] = the sum of their squares. */
void zk_grokadamw_sum_squares(int64_t n, float *const *t, const double *h, double *out,
                              int threads) {
    const int64_t chunks = zk_chunks(n);
    double *partial = malloc((chunks ? chunks : 1) * sizeof(double));
    (void)h;
    if (!partial) {  /* no memory for the partials: one thread, the same order */
        out[0] = 0.0;
        for (int64_t c = 0; c < chunks; c++)
            out[0] += sum_squares_chunk(t[0] + c * ZK_CHUNK,
                                        n - c * ZK_CHUNK < ZK_CHUNK ? n - c * ZK_CHUNK : ZK_CHUNK);
        return;
    }
    ZK_PARALLEL_FOR
    for (int64_t c = 0; c < chunks; c++)
        partial[c] = sum_squares_chunk(t[0] + c * ZK_CHUNK,
                                       n - c * ZK_CHUNK < ZK_CHUNK ? n - c * ZK_CHUNK : ZK_CHUNK);
    zk_add_partials(partial, chunks, 1, out);
    free(partial);
}
