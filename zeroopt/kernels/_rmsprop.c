/* RMSprop (zeroopt/algorithms/rmsprop.py, torch.optim.RMSprop's semantics), one pass over
 * memory. The kernel repeats the arithmetic of rmsprop.py's torch._foreach_* path op for op,
 * so the two agree bit for bit. ATen's ops on the CPU, as measured:
 *
 *   mul_(x, s)                   x * (float)s
 *   add_(a, b, alpha=s)          fmaf((float)s, b, a)
 *   add_(x, s)                   x + (float)s
 *   addcmul_(a, b, c, value=s)   fmaf((float)s * b, c, a)
 *   addcdiv_(a, b, c, value=s)   a + ((float)s * b) / c
 *   lerp_(a, b, w)               |w| < 0.5 ? fmaf(w, b - a, a) : fmaf(w - 1, b - a, b)
 *   sqrt                         torch's own (_torch_sqrt.h)
 *
 * Tensors are worked through in blocks of ZK_SQRT_BLOCK elements: the loop before the root,
 * the root, the loop after it, while the block is in L1.
 *
 * Hyperparameters arrive as the doubles rmsprop.py computes and are cast to float here, where
 * ATen casts its scalars.
 */
#include "kernels.h"
#include "_torch_sqrt.h"

#define BLOCK ZK_SQRT_BLOCK

typedef struct {
    float alpha, one_minus_alpha, wd, eps, momentum, neg_lr;
    float lerp_coef;  /* lerp's FMA coefficient: w, or w - 1 for |w| >= 0.5 (then from g) */
    int lerp_from_avg, maximize, has_wd;
} rms_hyper;

/* h: alpha, 1 - alpha, weight_decay, eps, momentum, -lr, maximize, centered, has momentum */
static rms_hyper read_hyper(const double *h) {
    rms_hyper a;
    a.alpha = (float)h[0]; a.one_minus_alpha = (float)h[1]; a.wd = (float)h[2];
    a.eps = (float)h[3]; a.momentum = (float)h[4]; a.neg_lr = (float)h[5];
    a.maximize = h[6] != 0; a.has_wd = h[2] != 0;
    a.lerp_from_avg = fabsf(a.one_minus_alpha) < 0.5f;
    a.lerp_coef = a.lerp_from_avg ? a.one_minus_alpha : a.one_minus_alpha - 1.0f;
    return a;
}

/* One block of n <= BLOCK elements; CENTERED and MOMENTUM are constants at each call site, so
 * each combination compiles to its own vector loops. */
static inline __attribute__((always_inline)) void rms_block(
        const rms_hyper *a, const int CENTERED, const int MOMENTUM, int64_t n, float *p,
        const float *g, float *sq, float *buf, float *ga, zk_vml_sqrt root) {
    float x[BLOCK], avg[BLOCK];
    for (int64_t i = 0; i < n; i++) {
        float gi = a->maximize ? -g[i] : g[i];
        if (a->has_wd) gi = fmaf(a->wd, p[i], gi);
        x[i] = gi;
        const float s = fmaf(a->one_minus_alpha * gi, gi, sq[i] * a->alpha);
        sq[i] = s;
        if (CENTERED) {
            const float m = fmaf(a->lerp_coef, gi - ga[i], a->lerp_from_avg ? ga[i] : gi);
            ga[i] = m;
            avg[i] = fmaf(-m, m, s);  /* addcmul(s, m, m, value=-1) */
        } else {
            avg[i] = s;
        }
    }
    zk_sqrt_block(n, avg, root);
    for (int64_t i = 0; i < n; i++) {
        const float d = avg[i] + a->eps;
        if (MOMENTUM) {
            const float b = buf[i] * a->momentum + x[i] / d;
            buf[i] = b;
            p[i] = fmaf(a->neg_lr, b, p[i]);
        } else {
            p[i] = p[i] + (a->neg_lr * x[i]) / d;
        }
    }
}

#define BLOCKS(CENTERED, MOMENTUM)                                                         \
    ZK_PARALLEL_FOR                                                                        \
    for (int64_t b = 0; b < n; b += BLOCK)                                                 \
        rms_block(&a, CENTERED, MOMENTUM, n - b < BLOCK ? n - b : BLOCK, p + b, g + b,     \
                  sq + b, buf ? buf + b : 0, ga ? ga + b : 0, root);

/* t = [params, grads, square_avg, then momentum_buffer (with momentum), then grad_avg
 * (centered)]; the gradients are left as they are. */
void zk_rmsprop_step(int64_t n, float *const *t, const double *h, double *out, int threads) {
    const rms_hyper a = read_hyper(h);
    const int centered = h[7] != 0, momentum = h[8] != 0;
    float *p = t[0], *sq = t[2];
    const float *g = t[1];
    float *buf = momentum ? t[3] : 0, *ga = centered ? t[3 + momentum] : 0;
    const zk_vml_sqrt root = zk_torch_sqrt_function();
    (void)out;
    switch (centered * 2 + momentum) {
    case 0: BLOCKS(0, 0) break;
    case 1: BLOCKS(0, 1) break;
    case 2: BLOCKS(1, 0) break;
    default: BLOCKS(1, 1) break;
    }
}
