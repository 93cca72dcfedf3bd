/* torch's fp32 square root on the CPU, element for element, for kernels that must match it.
 *
 * torch built with MKL (the x86 Linux wheels) computes Tensor.sqrt with MKL's vmsSqrt in
 * high-accuracy mode (ATen's vml.h: VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE), which is
 * not the correctly rounded root: on an AMD EPYC, 15-20% of random inputs come out one ulp
 * off, the same whatever the element's position or the call's length (and sqrt(-1) is +NaN
 * where the hardware's is -NaN). A kernel that must reproduce torch's foreach path takes its roots
 * with zk_sqrt_block, which computes them one of these ways (zk_sqrt_mode, per library):
 *
 *   ZK_SQRT_AUTO      MKL's vmsSqrt_64, found in the libtorch_cpu already loaded, called on
 *                     the block; else the hardware's root (torch without MKL). The default.
 *   ZK_SQRT_HARDWARE  sqrtf, correctly rounded.
 *   ZK_SQRT_MKL       MKL's vmsSqrt_64 (~0.7 ns an element on that EPYC: more than the
 *                     memory traffic of a whole AdamW step).
 *   ZK_SQRT_MKL_SSE   the arithmetic of the kernel MKL runs there (mkl_vml_kernel_sSqrt_
 *                     EXHAynn, its SSE code: rsqrtps, then one Goldschmidt step without
 *                     FMA), inline and vectorized; the inputs it sends to its own special
 *                     path (zero, subnormal and tiny, negative, the largest, inf, NaN) go to
 *                     vmsSqrt_64 itself, one by one, except zeros (sqrt(+-0) = +-0).
 *
 * Python picks the mode once per library (zk_torch_sqrt, zeroopt/kernels/sqrt_check.py): the
 * first of MKL_SSE, MKL, HARDWARE whose roots equal torch.sqrt's bit for bit on a probe,
 * else none (the rule keeps its torch path). rsqrtps differs between CPU makers and MKL picks
 * another kernel on other CPUs: there the check falls through to calling MKL.
 *
 * A kernel computes its roots a block of ZK_SQRT_BLOCK elements at a time in a small buffer
 * (the block stays in L1 between the passes before and after the root, so memory is still
 * read and written once).
 */
#ifndef ZEROOPT_TORCH_SQRT_H
#define ZEROOPT_TORCH_SQRT_H

#include <dlfcn.h>
#include <string.h>

#include "kernels.h"

#if defined(__x86_64__) && defined(__AVX__)
#include <immintrin.h>
#define ZK_HAVE_MKL_SSE 1
#endif

/* 256: on that EPYC, 1.4x AdamW's fused step for AdEMAMix and centered RMSprop with
 * momentum (five streams), against 1.8x at 512 and 2.4x at 4096 */
#define ZK_SQRT_BLOCK 256
/* VML_HA | VML_ERRMODE_IGNORE | VML_FTZDAZ_OFF, as ATen's vml.h passes them */
#define ZK_VML_MODE ((int64_t)(0x2 | 0x100 | 0x140000))

enum { ZK_SQRT_AUTO, ZK_SQRT_HARDWARE, ZK_SQRT_MKL, ZK_SQRT_MKL_SSE };
static int zk_sqrt_mode;  /* this library's; set by zk_torch_sqrt */

typedef void (*zk_vml_sqrt)(int64_t n, const float *a, float *r, int64_t mode);

/* MKL's vmsSqrt_64 in the process's libtorch_cpu, or NULL. Looked up once (a benign race:
 * every thread finds the same pointer). */
static zk_vml_sqrt zk_torch_sqrt_function(void) {
    static zk_vml_sqrt found;
    static int looked;
    if (!__atomic_load_n(&looked, __ATOMIC_ACQUIRE)) {
        void *lib = dlopen("libtorch_cpu.so", RTLD_NOLOAD | RTLD_LAZY);
        zk_vml_sqrt fn = lib ? (zk_vml_sqrt)dlsym(lib, "vmsSqrt_64") : NULL;
        __atomic_store_n(&found, fn, __ATOMIC_RELEASE);
        __atomic_store_n(&looked, 1, __ATOMIC_RELEASE);
    }
    return __atomic_load_n(&found, __ATOMIC_ACQUIRE);
}

/* The hardware's root; no errno, so that the loop vectorizes (the results are the same). */
__attribute__((optimize("no-math-errno")))
static void zk_sqrt_hardware(int64_t n, float *x) {
    for (int64_t i = 0; i < n; i++) x[i] = sqrtf(x[i]);
}

#ifdef ZK_HAVE_MKL_SSE
/* MKL's SSE sqrt, 8 lanes: y ~ 1/sqrt(x) (rsqrtps), g = x y, h = y / 2, r = 1/2 - g h,
 * g += g r, h += h r, root = g + (x - g g) h, each op rounded (no FMA), in its order. */
static inline __m256 zk_mkl_sse_sqrt8(__m256 x) {
    const __m256 half = _mm256_set1_ps(0.5f);
    const __m256 y = _mm256_rsqrt_ps(x);
    __m256 g = _mm256_mul_ps(x, y), h = _mm256_mul_ps(y, half);
    const __m256 r = _mm256_sub_ps(half, _mm256_mul_ps(g, h));
    g = _mm256_add_ps(_mm256_mul_ps(g, r), g);
    h = _mm256_add_ps(_mm256_mul_ps(r, h), h);
    const __m256 d = _mm256_sub_ps(x, _mm256_mul_ps(g, g));
    return _mm256_add_ps(_mm256_mul_ps(d, h), g);
}

/* 8 roots in place (x[0..8)), as MKL computes them. Lanes from 2^-102 to 0x7f7ff000 (MKL's
 * own range stops there; the low end is raised so that no intermediate is subnormal, where a
 * flush-to-zero mode would change it) take the arithmetic above; zeros are themselves; every
 * other lane is MKL's own: its input and position (x's index ``at``) are appended to
 * ``vals``/``where`` for one call of MKL per block (zk_sqrt_mkl_sse), since a state that
 * decays toward zero (v of a param without gradients) can make every lane tiny, and a call
 * per lane cost 25x the step. Returns the new count. */
static inline int zk_mkl_sse_sqrt_lanes(float *x, int at, float *vals, int *where, int count) {
    const __m256 v = _mm256_loadu_ps(x);
    const __m256 lo = _mm256_set1_ps(0x1p-102f), hi = _mm256_set1_ps(0x1.ffep127f);
    const __m256 normal = _mm256_and_ps(_mm256_cmp_ps(v, lo, _CMP_GE_OQ),
                                        _mm256_cmp_ps(v, hi, _CMP_LE_OQ));
    const __m256 zero = _mm256_cmp_ps(v, _mm256_setzero_ps(), _CMP_EQ_OQ);
    for (unsigned rest = ~(unsigned)_mm256_movemask_ps(_mm256_or_ps(normal, zero)) & 0xffu;
         rest; rest &= rest - 1) {
        const int j = __builtin_ctz(rest);
        vals[count] = x[j];
        where[count++] = at + j;
    }
    _mm256_storeu_ps(x, _mm256_blendv_ps(v, zk_mkl_sse_sqrt8(v), normal));
    return count;
}

#define ZK_MKL_BATCH 512  /* elements whose special lanes go to MKL in one call */

static void zk_sqrt_mkl_sse(int64_t n, float *x, zk_vml_sqrt fn) {
    float vals[ZK_MKL_BATCH], roots[ZK_MKL_BATCH];
    int where[ZK_MKL_BATCH];
    for (int64_t lo = 0; lo < n; lo += ZK_MKL_BATCH) {
        const int m = (int)(n - lo < ZK_MKL_BATCH ? n - lo : ZK_MKL_BATCH);
        float *xs = x + lo;
        int i = 0, count = 0;
        for (; i + 8 <= m; i += 8) count = zk_mkl_sse_sqrt_lanes(xs + i, i, vals, where, count);
        if (i < m) {  /* the tail, padded with ones (never special) */
            float pad[8] = {1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f, 1.0f};
            memcpy(pad, xs + i, (size_t)(m - i) * sizeof(float));
            count = zk_mkl_sse_sqrt_lanes(pad, i, vals, where, count);
            memcpy(xs + i, pad, (size_t)(m - i) * sizeof(float));
        }
        if (count) {
            fn(count, vals, roots, ZK_VML_MODE);
            for (int k = 0; k < count; k++) xs[where[k]] = roots[k];
        }
    }
}
#endif

/* x <- sqrt(x) in place, as torch.sqrt would (zk_sqrt_mode); fn: zk_torch_sqrt_function(). */
static inline void zk_sqrt_block(int64_t n, float *x, zk_vml_sqrt fn) {
    const int mode = __atomic_load_n(&zk_sqrt_mode, __ATOMIC_RELAXED);
#ifdef ZK_HAVE_MKL_SSE
    if (mode == ZK_SQRT_MKL_SSE && fn) {
        zk_sqrt_mkl_sse(n, x, fn);
        return;
    }
#endif
    if (fn && mode != ZK_SQRT_HARDWARE)
        fn(n, x, x, ZK_VML_MODE);
    else
        zk_sqrt_hardware(n, x);
}

/* t[0] <- sqrt(t[1]) with mode h[0] (ZK_SQRT_AUTO when no h is given), which this library's
 * kernels use from then on: sqrt_check.py compares the roots with torch.sqrt's.
 * out[0] = 1 if the mode can run here (MKL's function found, the vector code compiled). */
void zk_torch_sqrt(int64_t n, float *const *t, const double *h, double *out, int threads) {
    const zk_vml_sqrt fn = zk_torch_sqrt_function();
    const int mode = (int)h[0];
    int runs = mode == ZK_SQRT_AUTO || mode == ZK_SQRT_HARDWARE || (fn && mode == ZK_SQRT_MKL);
#ifdef ZK_HAVE_MKL_SSE
    runs = runs || (fn && mode == ZK_SQRT_MKL_SSE);
#endif
    (void)threads;
    __atomic_store_n(&zk_sqrt_mode, runs ? mode : ZK_SQRT_AUTO, __ATOMIC_RELAXED);
    if (out) out[0] = runs;
    for (int64_t i = 0; i < n; i++) t[0][i] = t[1][i];
    for (int64_t i = 0; i < n; i += ZK_SQRT_BLOCK)
        zk_sqrt_block(n - i < ZK_SQRT_BLOCK ? n - i : ZK_SQRT_BLOCK, t[0] + i, fn);
}

#endif
