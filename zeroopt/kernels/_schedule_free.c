/* Schedule-free AdamW and RAdam (zeroopt/algorithms/schedule_free.py,
 * schedule_free_radam.py), one pass over memory. The kernel repeats the arithmetic of
 * schedule_free.py's torch._foreach_* path (second_moment_, adam_normalise_, step_y_and_z)
 * op for op, so the two agree bit for bit. ATen's ops on the CPU, as measured:
 *
 *   mul_(x, s)                   x * (float)s
 *   div(x, s)                    x / (float)s (a true division, not by the reciprocal)
 *   add_(a, b, alpha=s)          fmaf((float)s, b, a); sub_(a, b, alpha=s): fmaf(-(float)s, b, a)
 *   add_(x, s)                   x + (float)s
 *   addcmul_(a, b, c, value=s)   fmaf((float)s * b, c, a)
 *   lerp_(a, b, w)               |w| < 0.5 ? fmaf(w, b - a, a) : fmaf(w - 1, b - a, b)
 *   sqrt                         torch's own (_torch_sqrt.h)
 *
 * Tensors are worked through in blocks of ZK_SQRT_BLOCK elements: the second moment, the root
 * of the block's, then the direction and the steps of y and z, while the block is in L1.
 *
 * Hyperparameters arrive as the doubles schedule_free.py computes and are cast to float here,
 * where ATen casts its scalars.
 */
#include "kernels.h"
#include "_torch_sqrt.h"

#define BLOCK ZK_SQRT_BLOCK

typedef struct {
    float b2, omb2, bc2, eps, wd, lerp_coef, y_step, neg_lr;
    int lerp_from_y, normalise, has_wd;
} sf_hyper;

/* h: beta2, 1 - beta2, 1 - beta2^k, eps, weight_decay, c (ckp1, y's lerp weight toward z),
 *    lr (beta (1 - c) - 1), -lr, normalise (0: RAdam's SGD phase, the raw gradient) */
static sf_hyper read_hyper(const double *h) {
    sf_hyper a;
    const float c = (float)h[5];
    a.b2 = (float)h[0]; a.omb2 = (float)h[1]; a.bc2 = (float)h[2]; a.eps = (float)h[3];
    a.wd = (float)h[4]; a.y_step = (float)h[6]; a.neg_lr = (float)h[7];
    a.normalise = h[8] != 0; a.has_wd = h[4] != 0;
    a.lerp_from_y = fabsf(c) < 0.5f;
    a.lerp_coef = a.lerp_from_y ? c : c - 1.0f;
    return a;
}

/* One block of n <= BLOCK elements; NORMALISE is a constant at each call site. */
static inline __attribute__((always_inline)) void sf_block(
        const sf_hyper *a, const int NORMALISE, int64_t n, float *y, const float *g, float *z,
        float *v, zk_vml_sqrt root) {
    float den[BLOCK];
    for (int64_t i = 0; i < n; i++) {
        const float vi = fmaf(a->omb2 * g[i], g[i], v[i] * a->b2);
        v[i] = vi;
        if (NORMALISE) den[i] = vi / a->bc2;
    }
    if (NORMALISE) zk_sqrt_block(n, den, root);
    for (int64_t i = 0; i < n; i++) {
        float d = NORMALISE ? g[i] / (den[i] + a->eps) : g[i];
        const float yi = y[i], zi = z[i];
        if (a->has_wd) d = fmaf(a->wd, yi, d);
        const float lerped = fmaf(a->lerp_coef, zi - yi, a->lerp_from_y ? yi : zi);
        y[i] = fmaf(a->y_step, d, lerped);
        z[i] = fmaf(a->neg_lr, d, zi);
    }
}

/* t = [params (y), grads, z, exp_avg_sq]; the gradients are left as they are. */
void zk_schedule_free_step(int64_t n, float *const *t, const double *h, double *out,
                           int threads) {
    const sf_hyper a = read_hyper(h);
    float *y = t[0], *z = t[2], *v = t[3];
    const float *g = t[1];
    const zk_vml_sqrt root = zk_torch_sqrt_function();
    (void)out;
    if (a.normalise) {
        ZK_PARALLEL_FOR
        for (int64_t b = 0; b < n; b += BLOCK)
            sf_block(&a, 1, n - b < BLOCK ? n - b : BLOCK, y + b, g + b, z + b, v + b, root);
    } else {
        ZK_PARALLEL_FOR
        for (int64_t b = 0; b < n; b += BLOCK)
            sf_block(&a, 0, n - b < BLOCK ? n - b : BLOCK, y + b, g + b, z + b, v + b, root);
    }
}
