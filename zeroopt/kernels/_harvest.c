/* The gradient harvest in one pass: a reduced (or staged) gradient written into the shard,
 * scaled by 1/W, with its sum of squares (the global norm's partial) taken on the way, so
 * neither the averaging nor the inf/NaN check costs a pass of its own (grad_sync.py).
 *
 * t[0] is the destination, t[1] the source; out[0] the sum of squares of what the
 * destination holds afterwards (double, chunked: kernels.h). The element-wise arithmetic is
 * torch's: torch.mul(src, s, out=dst) is one rounding of src * s; dst.add_(src, alpha=s) is
 * fmaf(s, src, dst) (checked bit for bit in tests/test_harvest.py).
 */
#include "kernels.h"

#define SUMSQ_KERNEL(NAME, EXPR)                                                        \
void NAME(int64_t n, float *const *t, const double *h, double *out, int threads) {      \
    float *dst = t[0];                                                                  \
    const float *src = t[1];                                                            \
    const float s = (float)h[0];                                                        \
    (void)s;                                                                            \
    int64_t chunks = zk_chunks(n);                                                      \
    double *partial = malloc(sizeof(double) * (chunks ? chunks : 1));                   \
    ZK_PARALLEL_FOR                                                                     \
    for (int64_t c = 0; c < chunks; c++) {                                              \
        int64_t lo = c * ZK_CHUNK, hi = lo + ZK_CHUNK < n ? lo + ZK_CHUNK : n;          \
        double lane[ZK_LANES] = {0};                                                    \
        int64_t i = lo;                                                                 \
        for (; i + ZK_LANES <= hi; i += ZK_LANES)                                       \
            for (int j = 0; j < ZK_LANES; j++) {                                        \
                float v = EXPR(i + j);                                                  \
                dst[i + j] = v;                                                         \
                lane[j] += (double)v * (double)v;                                       \
            }                                                                           \
        for (int j = 0; i < hi; i++, j++) {                                             \
            float v = EXPR(i);                                                          \
            dst[i] = v;                                                                 \
            lane[j] += (double)v * (double)v;                                           \
        }                                                                               \
        partial[c] = zk_sum_lanes(lane);                                                \
    }                                                                                   \
    zk_add_partials(partial, chunks, 1, out);                                           \
    free(partial);                                                                      \
}

/* dst = src * s */
#define SCALE(i) (src[i] * s)
SUMSQ_KERNEL(zk_scale_sumsq, SCALE)
/* dst += s * src (an accumulating backward into the shard) */
#define SCALE_ADD(i) fmaf(s, src[i], dst[i])
SUMSQ_KERNEL(zk_scale_add_sumsq, SCALE_ADD)
/* dst = src (a gradient staged where the shard is: one rank) */
#define COPY(i) (src[i])
SUMSQ_KERNEL(zk_copy_sumsq, COPY)
/* dst += src (a micro-step's gradient added to the staged sum) */
#define ADD(i) (dst[i] + src[i])
SUMSQ_KERNEL(zk_add_sumsq, ADD)
/* dst unchanged (h, src unused): its sum of squares */
#define SAME(i) (dst[i])
SUMSQ_KERNEL(zk_sumsq, SAME)
