/* Lion (zeroopt/algorithms/lion.py), one pass over memory. Each kernel repeats the arithmetic
 * of lion.py's torch._foreach_* path op for op, so the two agree bit for bit (and with Lion's
 * eager reference, which rounds the same way): a sign taken of a momentum that rounded
 * differently could flip a whole lr step. ATen's ops on the CPU, as measured:
 *
 *   mul_(x, s)              x * (float)s
 *   add_(a, b, alpha=s)     fmaf((float)s, b, a)
 *   sign_(x)                (x > 0) - (x < 0): 0 for zeros and NaN
 *   neg_(x)                 -x (the sign bit flipped, NaN too)
 *
 * Hyperparameters arrive as the doubles lion.py computes and are cast to float here, where
 * ATen casts its scalars.
 */
#include "kernels.h"

typedef struct {
    float b1, omb1, b2, omb2, decay, neg_lr;
    int maximize;
} lion_hyper;

/* h: beta1, 1 - beta1, beta2, 1 - beta2, decay (1 - lr wd), -lr, maximize (0 or 1) */
static lion_hyper read_hyper(const double *h) {
    lion_hyper a = {(float)h[0], (float)h[1], (float)h[2], (float)h[3], (float)h[4],
                    (float)h[5], h[6] != 0};
    return a;
}

static inline float sign(float x) { return (float)(x > 0.0f) - (float)(x < 0.0f); }

/* u = sign(b1 m + (1 - b1) g) with g negated under maximize; m <- b2 m + (1 - b2) g. */
static inline float lion_update(const lion_hyper *a, float g, float *m) {
    const float gi = a->maximize ? -g : g;
    const float u = sign(fmaf(a->omb1, gi, *m * a->b1));
    *m = fmaf(a->omb2, gi, *m * a->b2);
    return u;
}

/* The plain step: t = [params, grads, exp_avg].
 *   u = sign(b1 m + (1 - b1) g);  m <- b2 m + (1 - b2) g;  x <- x decay + (-lr) u
 * (decay is 1 without weight decay: x * 1 is x exactly, as skipping the multiply is). */
void zk_lion_step(int64_t n, float *const *t, const double *h, double *out, int threads) {
    float *p = t[0], *m = t[2];
    const float *g = t[1];
    const lion_hyper a = read_hyper(h);
    (void)out;
    ZK_PARALLEL_FOR
    for (int64_t i = 0; i < n; i++) p[i] = fmaf(a.neg_lr, lion_update(&a, g[i], m + i),
                                                p[i] * a.decay);
}

/* Cautious Lion, phase 1 (lion._statistics): t = [grads, exp_avg]. The signed update, kept
 * where it agrees in sign with the gradient (u g > 0, as variants.keep_agreeing: u * 1, or
 * u * 0, a signed zero), written over the gradients; m moves on. The kept elements are then
 * exactly the nonzero ones, which variants.keep_agreeing counts. */
void zk_lion_cautious(int64_t n, float *const *t, const double *h, double *out, int threads) {
    float *g = t[0], *m = t[1];
    const lion_hyper a = read_hyper(h);
    (void)out;
    ZK_PARALLEL_FOR
    for (int64_t i = 0; i < n; i++) {
        const float gi = a.maximize ? -g[i] : g[i];
        const float u = lion_update(&a, g[i], m + i);
        g[i] = u * (float)(u * gi > 0.0f);
    }
}
