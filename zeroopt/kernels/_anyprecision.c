/* AnyPrecisionAdamW (zeroopt/algorithms/anyprecision.py): the step in one pass per piece,
 * with each state computed in its dtype (float32 or bfloat16; stored as fp32 either way).
 *
 * Each element's arithmetic is anyprecision.py's torch path (torchdistx's operations), op for
 * op, with ATen's roundings: every op on a bf16 state computes in float and rounds the result
 * to bf16 (round to nearest even), as ATen does for a bf16 tensor:
 *
 *   x <- x (1 - lr wd)                         (1 without decay: exact)
 *   m <- R_m(m b1);  m <- R_m(m + (1 - b1) g)          (mul_, add_ with alpha: an FMA)
 *   v <- R_v(v b2);  v <- R_v(v + (1 - b2) g g)        (mul_, addcmul_: an FMA)
 *   d <- R_v(sqrt(v));  d <- R_v(d / c2);  d <- R_v(d + eps)
 *   x <- x + (-step_size) m / d                        (addcdiv: in float)
 *
 * R is the identity for a float32 state. The square root is torch's own (_torch_sqrt.h); for
 * a bf16 v that is the same as the correctly rounded one: a float root within an ulp of the
 * true one never crosses a bf16 rounding boundary (the root of a bf16 value is at least 2^-19
 * relative away from every bf16 midpoint).
 */
#include <string.h>

#include "kernels.h"
#include "_torch_sqrt.h"

/* Elements per block: every stream's block and the buffers stay in L1 (GrokAdamW's five
 * streams: 256 measured 1.5x AdamW's fused step, 512 1.9x, 1024 2.4x). */
#define BLOCK 256

/* Round to the nearest bfloat16 (ties to even), kept as a float; NaN stays NaN. */
static inline float bf16(float x) {
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    uint32_t r = (u + 0x7FFFu + ((u >> 16) & 1u)) & 0xFFFF0000u;
    r = x != x ? 0x7FC00000u : r;
    float y;
    memcpy(&y, &r, sizeof y);
    return y;
}

typedef struct { float decay, b1, omb1, b2, omb2, c2, eps, neg_step; } any_hyper;

#define R(BF, x) ((BF) ? bf16(x) : (x))

/* One block; M_BF16 and V_BF16 are constants at each call site. */
static inline __attribute__((always_inline)) void any_block(
        const any_hyper *k, const int M_BF16, const int V_BF16, int64_t n, float *p,
        const float *g, float *m, float *v, zk_vml_sqrt root) {
    float den[BLOCK];
    for (int64_t i = 0; i < n; i++) {
        const float x = g[i];
        /* R(m): the state cast to its dtype (exact where it holds a value of it) */
        m[i] = R(M_BF16, fmaf(k->omb1, x, R(M_BF16, R(M_BF16, m[i]) * k->b1)));
        const float vi = R(V_BF16, fmaf(k->omb2 * x, x, R(V_BF16, R(V_BF16, v[i]) * k->b2)));
        v[i] = vi;
        den[i] = vi;
    }
    zk_sqrt_block(n, den, root);
    for (int64_t i = 0; i < n; i++) {
        const float d = R(V_BF16, R(V_BF16, R(V_BF16, den[i]) / k->c2) + k->eps);
        p[i] = p[i] * k->decay + k->neg_step * m[i] / d;
    }
}

#define BLOCKS(MB, VB)                                                                     \
    ZK_PARALLEL_FOR \
    for (int64_t b = 0; b < n; b += BLOCK)                                                 \
        any_block(&k, MB, VB, n - b < BLOCK ? n - b : BLOCK, t[0] + b, t[1] + b, t[2] + b, \
                  t[3] + b, root);

/* t = [params, grads, exp_avg, exp_avg_sq]; h = [1 - lr wd (or 1), b1, 1 - b1, b2, 1 - b2,
 * sqrt(1 - b2^t) (torchdistx's float32 value), eps, -step_size (float32 value), m in bf16,
 * v in bf16]. */
void zk_anyprecision_step(int64_t n, float *const *t, const double *h, double *out,
                          int threads) {
    const any_hyper k = {(float)h[0], (float)h[1], (float)h[2], (float)h[3], (float)h[4],
                         (float)h[5], (float)h[6], (float)h[7]};
    zk_vml_sqrt root = zk_torch_sqrt_function();
    (void)out;
    switch ((h[8] != 0 ? 2 : 0) | (h[9] != 0 ? 1 : 0)) {
    case 0: BLOCKS(0, 0) break;
    case 1: BLOCKS(0, 1) break;
    case 2: BLOCKS(1, 0) break;
    default: BLOCKS(1, 1) break;
    }
}
