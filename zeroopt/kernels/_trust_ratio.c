/* LAMB and LARS (zeroopt/algorithms/lamb.py, lars.py): each phase of a step in one pass.
 *
 * Phase 1 (the rule's `statistics`) updates what it must and returns the piece's sums of
 * squares of the two norms' tensors; phase 2 (`fused_step`) applies the all-reduced trust
 * ratio. Each element's arithmetic is the rule's torch._foreach_ path, op for op, with the
 * roundings ATen makes (measured with torch 2.13 on an AVX-512 CPU, torch.equal over 1M
 * values and odd tails):
 *
 *   t.mul_(s)            t * (float)s
 *   t.add_(b, alpha=s)   fmaf((float)s, b, t)          (alpha 1: t + b; sub_: t - b)
 *   t.addcmul_(a, b, value=s)   fmaf((float)s * a, b, t)
 *   t.div_(s), reciprocal_, mul_(b), add_(s)   one IEEE division, product or sum each
 *
 * and the square root is torch's own (_torch_sqrt.h: MKL's vsSqrt where torch is built with
 * MKL, within 1 ulp but not correctly rounded), so phase 1 is bit for bit the torch path.
 *
 * The sums of squares are in double, in ZK_CHUNK chunks added in order, each
 * chunk's as LANES running sums (element i into lane i % LANES from the chunk's start) added
 * in lane order: independent of the thread count, and as fast as memory. A float's square is
 * exact in double, so fma(x, x, sum) is sum + x * x with one op instead of two.
 */
#include "kernels.h"
#include "_torch_sqrt.h"

#ifdef ZK_LANES
#define LANES ZK_LANES
#else
#define LANES 16
#endif
/* Elements updated before their squares are summed, while they are still in L1. */
#define BLOCK 512

#if defined(__AVX512F__) || defined(__AVX__) || defined(__SSE2__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <arm_neon.h>
#endif

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

static inline double sum_lanes(const double *lane) {
    double sum = 0.0;
    for (int j = 0; j < LANES; j++) sum += lane[j];
    return sum;
}

/* A chunk's update and sums: elements [lo, hi), its k sums into partial[0..k). */
typedef void (*chunk_fn)(int64_t lo, int64_t hi, float *const *t, const double *h,
                         double *partial);

/* out[0..k) = the sums of every chunk of n elements, added in chunk order. */
static void chunked(int64_t n, int k, chunk_fn fn, float *const *t, const double *h,
                    double *out, int threads) {
    int64_t chunks = zk_chunks(n);
    double *partial = malloc((size_t)(chunks > 0 ? chunks : 1) * k * sizeof(double));
    if (partial == NULL) {  /* one chunk at a time, the same additions in the same order */
        double one[8];
        for (int j = 0; j < k; j++) out[j] = 0.0;
        for (int64_t c = 0; c < chunks; c++) {
            fn(c * ZK_CHUNK, min64(n, (c + 1) * ZK_CHUNK), t, h, one);
            for (int j = 0; j < k; j++) out[j] += one[j];
        }
        return;
    }
    ZK_PARALLEL_FOR
    for (int64_t c = 0; c < chunks; c++)
        fn(c * ZK_CHUNK, min64(n, (c + 1) * ZK_CHUNK), t, h, partial + c * k);
    zk_add_partials(partial, chunks, k, out);
    free(partial);
}

/* --- LAMB ------------------------------------------------------------------------------- */

/* h: beta1, 1 - beta1, beta2, 1 - beta2, sqrt(1 - beta2^t), eps, 1 / (1 - beta1^t), then
 * the kernel's own (weight decay, or -lr). */
typedef struct { float b1, ob1, b2, ob2, bc2, eps, c1; } lamb_hyper;

static inline lamb_hyper lamb_read(const double *h) {
    lamb_hyper k = {(float)h[0], (float)h[1], (float)h[2], (float)h[3], (float)h[4],
                    (float)h[5], (float)h[6]};
    return k;
}

/* The moments of elements [0, n) (n <= BLOCK), as update_moments_ computes them, and
 * s = sqrt(v) into s[]. */
static inline void lamb_moments(int64_t n, const float *restrict g, float *restrict m,
                                float *restrict v, lamb_hyper k, float *restrict s,
                                zk_vml_sqrt root) {
    for (int64_t i = 0; i < n; i++) {
        float mm = fmaf(k.ob1, g[i], m[i] * k.b1);
        float vv = fmaf(k.ob2 * g[i], g[i], v[i] * k.b2);
        m[i] = mm;
        v[i] = vv;
        s[i] = vv;
    }
    zk_sqrt_block(n, s, root);
}

/* r = m_hat / (sqrt(v_hat) + eps) from s = sqrt(v), as lamb.py's _direction computes it:
 * adam_denominator (/ sqrt(1 - beta2^t), + eps), reciprocal, * m, * 1 / (1 - beta1^t). */
static inline float lamb_r(float s, float m, lamb_hyper k) {
    return (1.0f / (s / k.bc2 + k.eps)) * m * k.c1;
}

/* u = r + wd x (decay), else r: _direction's params add. */
static inline float lamb_u(float s, float m, float x, float wd, int decay, lamb_hyper k) {
    float r = lamb_r(s, m, k);
    return decay ? fmaf(wd, x, r) : r;
}

static void lamb_direction_chunk(int64_t lo, int64_t hi, float *const *t, const double *h,
                                 double *partial) {
    const float *restrict p = t[0];
    float *restrict g = t[1], *restrict m = t[2], *restrict v = t[3];
    lamb_hyper k = lamb_read(h);
    float wd = (float)h[7], s[BLOCK];
    int decay = h[7] != 0.0;
    double lp[LANES] = {0}, lu[LANES] = {0};
    for (int64_t b = lo; b < hi; b += BLOCK) {  /* BLOCK is a multiple of LANES */
        int64_t e = min64(hi, b + BLOCK), i = b;
        lamb_moments(e - b, g + b, m + b, v + b, k, s, zk_torch_sqrt_function());
        for (; i + LANES <= e; i += LANES)
            for (int j = 0; j < LANES; j++) {
                float x = p[i + j], u = lamb_u(s[i - b + j], m[i + j], x, wd, decay, k);
                g[i + j] = u;
                lp[j] = fma(x, x, lp[j]);
                lu[j] = fma(u, u, lu[j]);
            }
        for (int j = 0; i < e; i++, j++) {
            float x = p[i], u = lamb_u(s[i - b], m[i], x, wd, decay, k);
            g[i] = u;
            lp[j] = fma(x, x, lp[j]);
            lu[j] = fma(u, u, lu[j]);
        }
    }
    partial[0] = sum_lanes(lp);
    partial[1] = sum_lanes(lu);
}

/* LAMB phase 1. t: params, grads, exp_avg, exp_avg_sq; h: as lamb_hyper, then the weight
 * decay (0: u = r). Updates the moments, writes u = r + wd x over the grads.
 * out[0] = sum x^2, out[1] = sum u^2. */
void zk_lamb_direction(int64_t n, float *const *t, const double *h, double *out, int threads) {
    chunked(n, 2, lamb_direction_chunk, t, h, out, threads);
}

/* LAMB without weight decay (trust ratio 1): moments, then x <- x - lr r (the grads are not
 * written). t: params, grads, exp_avg, exp_avg_sq; h: as lamb_hyper, then -lr. */
void zk_lamb_step(int64_t n, float *const *t, const double *h, double *out, int threads) {
    float *restrict p = t[0];
    const float *restrict g = t[1];
    float *restrict m = t[2], *restrict v = t[3];
    lamb_hyper k = lamb_read(h);
    float step = (float)h[7];
    int64_t blocks = (n + BLOCK - 1) / BLOCK;
    (void)out;
    ZK_PARALLEL_FOR
    for (int64_t c = 0; c < blocks; c++) {
        int64_t b = c * BLOCK, e = min64(n, b + BLOCK);
        float s[BLOCK];
        lamb_moments(e - b, g + b, m + b, v + b, k, s, zk_torch_sqrt_function());
        for (int64_t i = b; i < e; i++) p[i] = fmaf(step, lamb_r(s[i - b], m[i], k), p[i]);
    }
}

/* LAMB phase 2: x <- x + (float)(-lr * ratio) * u, rounded as grads.mul_(s), params.add_(grads).
 * t: params, u (phase 1's grads); h: -lr * ratio. */
void zk_lamb_apply(int64_t n, float *const *t, const double *h, double *out, int threads) {
    float *restrict p = t[0];
    const float *restrict u = t[1];
    float s = (float)h[0];
    (void)out;
    ZK_PARALLEL_FOR
    for (int64_t i = 0; i < n; i++) p[i] = p[i] + u[i] * s;
}

/* --- LARS ------------------------------------------------------------------------------- */

static void lars_squares_chunk(int64_t lo, int64_t hi, float *const *t, const double *h,
                               double *partial) {
    const float *restrict p = t[0], *restrict g = t[1];
    float wd = (float)h[0];
    double lp[LANES] = {0}, ld[LANES] = {0};
    int64_t i = lo;
    for (; i + LANES <= hi; i += LANES)
        for (int j = 0; j < LANES; j++) {
            double x = p[i + j], d = fmaf(wd, p[i + j], g[i + j]);
            lp[j] = fma(x, x, lp[j]);
            ld[j] = fma(d, d, ld[j]);
        }
    for (int j = 0; i < hi; i++, j++) {
        double x = p[i], d = fmaf(wd, p[i], g[i]);
        lp[j] = fma(x, x, lp[j]);
        ld[j] = fma(d, d, ld[j]);
    }
    partial[0] = sum_lanes(lp);
    partial[1] = sum_lanes(ld);
}

/* LARS phase 1: t: params, grads; h: weight decay. out[0] = sum x^2, out[1] = sum d^2 for
 * d = g + wd x (grads.add_(params, alpha=wd)). Writes nothing: zk_lars_step recomputes d,
 * which costs no memory traffic (it reads x and g anyway). */
void zk_lars_squares(int64_t n, float *const *t, const double *h, double *out, int threads) {
    chunked(n, 2, lars_squares_chunk, t, h, out, threads);
}

/* LARS phase 2 (or the whole step without weight decay): d = g + wd x (wd != 0),
 * v <- momentum v + (float)(lr * trust) d, x <- x - v, rounded as lars.py's _foreach_ ops.
 * t: params, grads, momentum_buffer; h: weight decay, lr * trust, momentum. */
void zk_lars_step(int64_t n, float *const *t, const double *h, double *out, int threads) {
    float *restrict p = t[0];
    const float *restrict g = t[1];
    float *restrict v = t[2];
    float wd = (float)h[0], s = (float)h[1], momentum = (float)h[2];
    (void)out;
    if (h[0] != 0.0) {
        ZK_PARALLEL_FOR
        for (int64_t i = 0; i < n; i++) {
            float vv = v[i] * momentum + fmaf(wd, p[i], g[i]) * s;
            v[i] = vv;
            p[i] = p[i] - vv;
        }
    } else {
        ZK_PARALLEL_FOR
        for (int64_t i = 0; i < n; i++) {
            float vv = v[i] * momentum + g[i] * s;
            v[i] = vv;
            p[i] = p[i] - vv;
        }
    }
}
