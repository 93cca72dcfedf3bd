/* Adam(W) with the options cautious, adopt and grams (zeroopt/algorithms/variants.py), one
 * pass over memory per tensor. Each kernel repeats the arithmetic of variants.py's
 * torch._foreach_* path, op for op and rounding for rounding (measured against ATen on the
 * CPU, tests/test_native_rules_b.py):
 *
 *   lerp_(m, x, w)              w < 0.5 ? fmaf(w, x - m, m) : fmaf(w - 1, x - m, x)
 *   addcmul_(v, a, b, value=s)  fmaf(s * a, b, v)
 *   add_(a, b, alpha=s)         fmaf(s, b, a)
 *   mul_ / div_ by a scalar     one rounding, by the scalar cast to float
 *   clamp_min / clamp_max       x < lo ? lo : x (NaN passes through, as ATen's)
 *   sqrt                        zk_sqrt_block (MKL's where ATen's is: _torch_sqrt.h)
 *
 * Tensors are worked through in blocks of BLOCK elements, small enough to stay in L1 between
 * the element-wise loops and the square root.
 *
 * Every hyperparameter arrives as the double Python computed (variants.py, the same
 * expressions as its torch path) and is cast to float here, where ATen casts its scalars:
 *   h[0]  sign: -1 with maximize, else 1 (g * -1 is torch's negation, bit for bit)
 *   h[1]  l2: Adam's coupled weight decay (used where h[11] is set)
 *   h[2]  decay: 1 - lr wd, AdamW's decoupled factor (1: none)
 *   h[3]  1 - beta1 (lerp weight)      h[4]  beta2      h[5]  1 - beta2
 *   h[6]  sqrt(1 - beta2^t)            h[7]  eps        h[8]  1 / (1 - beta1^t)
 *   h[9]  ADOPT's clip (t - 1)^0.25    h[10] -lr
 *   h[11] has_l2   h[12] adopt   h[13] grams   h[14] has_decay (decoupled, wd != 0)
 *   h[15] zk_adopt_init only: write the gradient the moments saw over the gradients
 */
#include "kernels.h"
#include "_torch_sqrt.h"

/* Elements per block: every stream's block and the buffers stay in L1 (GrokAdamW's five
 * streams: 256 measured 1.5x AdamW's fused step, 512 1.9x, 1024 2.4x). */
#define BLOCK 256

/* ZK_PARALLEL_FOR, summing the integer kept counts (exact in any order). */
#define PARALLEL_KEPT \
    _Pragma("omp parallel for schedule(static) num_threads(threads) reduction(+:kept) if (threads > 1 && n >= ZK_PARALLEL_MIN)")

typedef struct {
    float sign, l2, decay, b2, omb2, c2, eps, bc1, clip, neg_lr;
    float lerp_coef;  /* lerp's FMA coefficient: w, or w - 1 for w >= 0.5 (then from x) */
    int lerp_from_m, has_l2, adopt, grams, has_decay;
} adam_hyper;

static adam_hyper read_hyper(const double *h) {
    adam_hyper a;
    const float w1 = (float)h[3];
    a.sign = (float)h[0]; a.l2 = (float)h[1]; a.decay = (float)h[2];
    a.b2 = (float)h[4]; a.omb2 = (float)h[5]; a.c2 = (float)h[6]; a.eps = (float)h[7];
    a.bc1 = (float)h[8]; a.clip = (float)h[9]; a.neg_lr = (float)h[10];
    a.lerp_from_m = w1 < 0.5f;
    a.lerp_coef = a.lerp_from_m ? w1 : w1 - 1.0f;
    a.has_l2 = h[11] != 0; a.adopt = h[12] != 0; a.grams = h[13] != 0;
    a.has_decay = h[14] != 0;
    return a;
}

static inline float lerp_w(const adam_hyper *a, float m, float x) {
    return fmaf(a->lerp_coef, x - m, a->lerp_from_m ? m : x);
}

enum { STEP, CAUTIOUS, DIRECTION };

/* One block of n <= BLOCK elements. MODE, HAS_L2, ADOPT and GRAMS are constants at every
 * call site (SPECIALIZE), so each combination compiles to branch-free vector loops.
 *   STEP:      x <- x decay + (-lr) d                                  (t: p, g, m, v)
 *   CAUTIOUS:  g <- d where d g1 > 0, else 0; returns the kept count (AdamW's decay is left
 *              to phase 2, zk_cautious_apply: x decay rounds the same there, and phase 1
 *              then neither reads nor writes the params)
 *   DIRECTION: x <- x decay; dir <- d; g <- g1 where maximize or l2 changed it
 * where g1 is the gradient the moments see and d the update direction. */
static inline __attribute__((always_inline)) int64_t adam_block(
        const adam_hyper *a, const int MODE, const int HAS_L2, const int ADOPT, const int GRAMS,
        int64_t n, float *p, float *g, float *m, float *v, float *dir, zk_vml_sqrt root) {
    float x[BLOCK], den[BLOCK];
    int64_t kept = 0;
    if (ADOPT) {  /* the previous v normalises the gradient */
        for (int64_t i = 0; i < n; i++) den[i] = v[i];
        zk_sqrt_block(n, den, root);
    }
    for (int64_t i = 0; i < n; i++) {
        float xi = g[i] * a->sign;
        if (HAS_L2) xi = fmaf(a->l2, p[i], xi);
        x[i] = xi;
        if (ADOPT) {
            float s = den[i] < a->eps ? a->eps : den[i];
            float d = xi / s;
            d = d < -a->clip ? -a->clip : d;
            d = d > a->clip ? a->clip : d;
            m[i] = lerp_w(a, m[i], d);
        } else {
            m[i] = lerp_w(a, m[i], xi);
        }
        v[i] = fmaf(a->omb2 * xi, xi, v[i] * a->b2);
        den[i] = v[i];
    }
    if (!ADOPT) zk_sqrt_block(n, den, root);
    const int write_g = HAS_L2 || a->sign != 1.0f;
    for (int64_t i = 0; i < n; i++) {
        float d;
        if (ADOPT) {
            d = m[i];
        } else {
            d = 1.0f / (den[i] / a->c2 + a->eps);
            d = d * m[i];
            d = d * a->bc1;
        }
        if (GRAMS) d = fabsf(d) * ((float)(x[i] > 0.0f) - (float)(x[i] < 0.0f));  /* sign */
        if (MODE == STEP) {
            p[i] = fmaf(a->neg_lr, d, p[i] * a->decay);
        } else if (MODE == CAUTIOUS) {
            int keep = d * x[i] > 0.0f;
            kept += keep;
            g[i] = d * (float)keep;
        } else {
            if (a->has_decay) p[i] = p[i] * a->decay;
            dir[i] = d;
            if (write_g) g[i] = x[i];
        }
    }
    return kept;
}

/* Blocks in parallel (the kept counts are integers: their sum is exact in any order). */
#define BLOCKS(MODE, L2, ADOPT, GRAMS)                                                     \
    PARALLEL_KEPT                                                                          \
    for (int64_t b = 0; b < n; b += BLOCK) {                                               \
        int64_t k = n - b < BLOCK ? n - b : BLOCK;                                         \
        kept += adam_block(&a, MODE, L2, ADOPT, GRAMS, k, p + b, g + b, m + b, v + b,      \
                           dir ? dir + b : 0, root);                                       \
    }

#define SPECIALIZE(MODE)                                                                   \
    switch ((a.has_l2 ? 4 : 0) | (a.adopt ? 2 : 0) | (a.grams ? 1 : 0)) {                 \
    case 0: BLOCKS(MODE, 0, 0, 0) break; case 1: BLOCKS(MODE, 0, 0, 1) break;              \
    case 2: BLOCKS(MODE, 0, 1, 0) break; case 3: BLOCKS(MODE, 0, 1, 1) break;              \
    case 4: BLOCKS(MODE, 1, 0, 0) break; case 5: BLOCKS(MODE, 1, 0, 1) break;              \
    case 6: BLOCKS(MODE, 1, 1, 0) break; default: BLOCKS(MODE, 1, 1, 1) break;             \
    }

/* The whole step (no cautious): t = [params, grads, exp_avg, exp_avg_sq]. */
void zk_adam_variant_step(int64_t n, float *const *t, const double *h, double *out,
                          int threads) {
    float *p = t[0], *g = t[1], *m = t[2], *v = t[3], *dir = 0;
    adam_hyper a = read_hyper(h);
    zk_vml_sqrt root = zk_torch_sqrt_function();
    int64_t kept = 0;
    (void)out;
    SPECIALIZE(STEP)
}

/* Cautious, phase 1: t = [params, grads, exp_avg, exp_avg_sq]; the masked direction is
 * written over the gradients; out[0] = the elements kept. The params are read for Adam's L2
 * term only, and not decayed (zk_cautious_apply does that). */
void zk_adam_variant_cautious(int64_t n, float *const *t, const double *h, double *out,
                              int threads) {
    float *p = t[0], *g = t[1], *m = t[2], *v = t[3], *dir = 0;
    adam_hyper a = read_hyper(h);
    zk_vml_sqrt root = zk_torch_sqrt_function();
    int64_t kept = 0;
    SPECIALIZE(CAUTIOUS)
    out[0] = (double)kept;
}

/* variants.adam_direction: t = [params, grads, exp_avg, exp_avg_sq, direction]. */
void zk_adam_variant_direction(int64_t n, float *const *t, const double *h, double *out,
                               int threads) {
    float *p = t[0], *g = t[1], *m = t[2], *v = t[3], *dir = t[4];
    adam_hyper a = read_hyper(h);
    zk_vml_sqrt root = zk_torch_sqrt_function();
    int64_t kept = 0;
    (void)out;
    SPECIALIZE(DIRECTION)
}

/* ADOPT's first step: v <- v + g1 g1 (addcmul, value 1); t = [params, grads, exp_avg_sq]. */
void zk_adopt_init(int64_t n, float *const *t, const double *h, double *out, int threads) {
    float *p = t[0], *g = t[1], *v = t[2];
    adam_hyper a = read_hyper(h);
    const int write_g = h[15] != 0 && (a.has_l2 || a.sign != 1.0f);
    (void)out;
    ZK_PARALLEL_FOR
    for (int64_t i = 0; i < n; i++) {
        float x = g[i] * a.sign;
        if (a.has_l2) x = fmaf(a.l2, p[i], x);
        v[i] = fmaf(x, x, v[i]);
        if (write_g) g[i] = x;
    }
}

/* variants.keep_agreeing: t = [direction, grads]; d <- d * (d g > 0); out[0] = kept. */
void zk_keep_agreeing(int64_t n, float *const *t, const double *h, double *out, int threads) {
    float *d = t[0];
    const float *g = t[1];
    int64_t kept = 0;
    (void)h;
    PARALLEL_KEPT
    for (int64_t i = 0; i < n; i++) {
        int keep = d[i] * g[i] > 0.0f;
        kept += keep;
        d[i] = d[i] * (float)keep;
    }
    out[0] = (double)kept;
}

/* Cautious, phase 2: t = [params, direction]; h = [scale, -lr, decay (1 - lr wd, or 1)]:
 * x <- x decay + (-lr) (d scale): the torch path's decay in phase 1 and step in phase 2, with
 * the same roundings (x 1.0 is exact: no decay). */
void zk_cautious_apply(int64_t n, float *const *t, const double *h, double *out, int threads) {
    float *p = t[0];
    const float *d = t[1];
    const float scale = (float)h[0], neg_lr = (float)h[1], decay = (float)h[2];
    (void)out;
    ZK_PARALLEL_FOR
    for (int64_t i = 0; i < n; i++) p[i] = fmaf(neg_lr, d[i] * scale, p[i] * decay);
}
