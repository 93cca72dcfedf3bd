/* StableAdamW (zeroopt/algorithms/stable_adamw.py): each phase of its step in one pass.
 *
 * Phase 1 (the rule's `statistics`) moves the moments, writes the direction m / (sqrt(v) +
 * eps) over the gradients and returns the piece's sum of g^2 / max(v, eps^2); phase 2
 * (`fused_step`) decays the params and steps them along the direction by the param's lr_t.
 * Each element's arithmetic is stable_adamw.py's torch._foreach_* path, op for op, with
 * ATen's roundings (as _adam_variants.c: lerp and addcmul are FMAs, scalars are cast to
 * float, the square root is torch's own, _torch_sqrt.h).
 *
 * The sum is in double over ZK_CHUNK chunks added in order, each chunk's as LANES running
 * sums (element i into lane i % LANES from the chunk's start) added in lane order: the same
 * for any thread count. torch's _foreach_norm adds the same doubles in its own order, so the
 * sums may differ in the last bits (relative 1e-16); lr_t = lr / max(1, rms) is the same
 * float unless rms > 1 and the double lands within that of a float's rounding boundary.
 */
#include "kernels.h"
#include "_torch_sqrt.h"

#define LANES 16
/* Elements per block: every stream's block and the buffers stay in L1 (GrokAdamW's five
 * streams: 256 measured 1.5x AdamW's fused step, 512 1.9x, 1024 2.4x). */
#define BLOCK 256

/* h: 1 - b1 (lerp weight), b2, 1 - b2, eps^2, eps (b1, b2 the debiased betas). */
typedef struct { float coef, b2, omb2, eps2, eps; int from_m; } stable_hyper;

/* Phase 1 on the elements [0, n) of one chunk; returns the chunk's sum. */
static double stable_chunk(const stable_hyper *k, int64_t n, float *g, float *m, float *v,
                           zk_vml_sqrt root) {
    double lane[LANES] = {0};
    float ratio[BLOCK], den[BLOCK];
    for (int64_t b = 0; b < n; b += BLOCK) {
        const int64_t c = n - b < BLOCK ? n - b : BLOCK;
        float *gb = g + b, *mb = m + b, *vb = v + b;
        for (int64_t i = 0; i < c; i++) {
            const float x = gb[i];
            mb[i] = fmaf(k->coef, x - mb[i], k->from_m ? mb[i] : x);   /* lerp */
            const float vi = fmaf(k->omb2 * x, x, vb[i] * k->b2);        /* mul, addcmul */
            vb[i] = vi;
            const float floor = vi < k->eps2 ? k->eps2 : vi;             /* clamp_min */
            ratio[i] = x * x / floor;
            den[i] = vi;
        }
        int64_t i = 0;  /* BLOCK is a multiple of LANES: lane i % LANES from the chunk */
        for (; i + LANES <= c; i += LANES)
            for (int j = 0; j < LANES; j++) lane[j] += fabs((double)ratio[i + j]);
        for (int j = 0; i + j < c; j++) lane[j] += fabs((double)ratio[i + j]);
        zk_sqrt_block(c, den, root);
        for (int64_t i = 0; i < c; i++) gb[i] = mb[i] / (den[i] + k->eps);
    }
    double sum = 0.0;
    for (int j = 0; j < LANES; j++) sum += lane[j];
    return sum;
}

/* Phase 1: t = [grads, exp_avg, exp_avg_sq]; h as stable_hyper; out[0] = the sum. */
void zk_stable_adamw_statistics(int64_t n, float *const *t, const double *h, double *out,
                                int threads) {
    const float w = (float)h[0];
    const stable_hyper k = {w < 0.5f ? w : w - 1.0f, (float)h[1], (float)h[2], (float)h[3],
                            (float)h[4], w < 0.5f};
    zk_vml_sqrt root = zk_torch_sqrt_function();
    const int64_t chunks = zk_chunks(n);
    double one, *partial = chunks > 1 ? malloc(chunks * sizeof(double)) : &one;
    if (!partial) {  /* no memory for the partials: one thread, same order */
        out[0] = 0.0;
        for (int64_t c = 0; c < chunks; c++) {
            const int64_t lo = c * ZK_CHUNK, len = n - lo < ZK_CHUNK ? n - lo : ZK_CHUNK;
            out[0] += stable_chunk(&k, len, t[0] + lo, t[1] + lo, t[2] + lo, root);
        }
        return;
    }
    ZK_PARALLEL_FOR
    for (int64_t c = 0; c < chunks; c++) {
        const int64_t lo = c * ZK_CHUNK, len = n - lo < ZK_CHUNK ? n - lo : ZK_CHUNK;
        partial[c] = stable_chunk(&k, len, t[0] + lo, t[1] + lo, t[2] + lo, root);
    }
    zk_add_partials(partial, chunks, 1, out);
    if (partial != &one) free(partial);
}

/* Phase 2: t = [params, direction]; h = [decay factor 1 - s wd, has decay, -lr_t]:
 * x <- x decay; x <- x + d (-lr_t). */
void zk_stable_adamw_step(int64_t n, float *const *t, const double *h, double *out,
                          int threads) {
    float *p = t[0];
    const float *d = t[1];
    const float decay = (float)h[0], neg_lr = (float)h[2];
    (void)out;
    if (h[1] != 0) {
        ZK_PARALLEL_FOR
        for (int64_t i = 0; i < n; i++) p[i] = p[i] * decay + d[i] * neg_lr;
    } else {
        ZK_PARALLEL_FOR
        for (int64_t i = 0; i < n; i++) p[i] = p[i] + d[i] * neg_lr;
    }
}
