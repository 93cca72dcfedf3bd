/* AdEMAMix (zeroopt/algorithms/ademamix.py), one pass over memory. The kernel repeats the
 * arithmetic of ademamix.py's torch._foreach_* path op for op, so the two agree bit for bit.
 * ATen's ops on the CPU, as measured:
 *
 *   mul_(x, s)                   x * (float)s
 *   div_(x, s)                   x / (float)s (a true division, not by the reciprocal)
 *   add_(a, b, alpha=s)          fmaf((float)s, b, a)
 *   add_(x, s)                   x + (float)s
 *   addcmul_(a, b, c, value=s)   fmaf((float)s * b, c, a)
 *   sqrt                         torch's own (_torch_sqrt.h)
 *
 * Tensors are worked through in blocks of ZK_SQRT_BLOCK elements: the moments, the root of
 * the block's second moments, then the step, while the block is in L1.
 *
 * Hyperparameters arrive as the doubles ademamix.py computes and are cast to float here,
 * where ATen casts its scalars.
 */
#include "kernels.h"
#include "_torch_sqrt.h"

#define BLOCK ZK_SQRT_BLOCK

typedef struct {
    float b1, omb1, b2, omb2, b3, omb3, c2, eps, bc1, alpha, decay, neg_lr;
} ademamix_hyper;

/* One block of n <= BLOCK elements: t = params, grads, m1 (fast), m2 (slow), nu. */
static inline void ademamix_block(const ademamix_hyper *a, int64_t n, float *p,
                                  const float *g, float *m1, float *m2, float *nu,
                                  zk_vml_sqrt root) {
    float den[BLOCK];
    for (int64_t i = 0; i < n; i++) {
        const float gi = g[i];
        m1[i] = fmaf(a->omb1, gi, m1[i] * a->b1);
        nu[i] = den[i] = fmaf(a->omb2 * gi, gi, nu[i] * a->b2);
        m2[i] = fmaf(a->omb3, gi, m2[i] * a->b3);
    }
    zk_sqrt_block(n, den, root);
    for (int64_t i = 0; i < n; i++) {
        const float d = den[i] / a->c2 + a->eps;
        const float mix = fmaf(a->alpha, m2[i], m1[i] * a->bc1) / d;
        p[i] = fmaf(a->neg_lr, mix, p[i] * a->decay);
    }
}

/* t = [params, grads, exp_avg_fast, exp_avg_slow, exp_avg_sq];
 * h = beta1, 1 - beta1, beta2, 1 - beta2, beta3_t, 1 - beta3_t, sqrt(1 - beta2^t), eps,
 *     1 / (1 - beta1^t), alpha_t, decay (1 - lr wd; 1 without weight decay: x * 1 is x
 *     exactly, as skipping the multiply is), -lr. The gradients are left as they are. */
void zk_ademamix_step(int64_t n, float *const *t, const double *h, double *out, int threads) {
    const ademamix_hyper a = {(float)h[0], (float)h[1], (float)h[2], (float)h[3],
                              (float)h[4], (float)h[5], (float)h[6], (float)h[7],
                              (float)h[8], (float)h[9], (float)h[10], (float)h[11]};
    float *p = t[0], *m1 = t[2], *m2 = t[3], *nu = t[4];
    const float *g = t[1];
    const zk_vml_sqrt root = zk_torch_sqrt_function();
    (void)out;
    ZK_PARALLEL_FOR
    for (int64_t b = 0; b < n; b += BLOCK)
        ademamix_block(&a, n - b < BLOCK ? n - b : BLOCK, p + b, g + b, m1 + b, m2 + b, nu + b,
                       root);
}
