/* What both of AdamW's option kernels share (_adamw_options.c: agr, orthograd, tam;
 * _adamw_spd.c: spd and cautious): the block size, torch's square root sixteen lanes at a
 * time, Adam's hyperparameters and direction, and the float64 sums' 8-lane vectors. See
 * _adamw_options.c for the arithmetic both repeat op for op. */
#ifndef ZK_ADAMW_OPTIONS_H
#define ZK_ADAMW_OPTIONS_H

#include "kernels.h"
#include "_torch_sqrt.h"

#include <string.h>
#ifdef __AVX512F__
#include <immintrin.h>
#endif

#define BLOCK 128  /* a multiple of ZK_LANES; ZK_CHUNK is a multiple of it. 128: 5-7% faster than
                    * 256 here (five streams and the root between two loops), 64 slower */

static inline int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

/* Square roots of a block as zk_sqrt_block takes them (torch's), with the MKL_SSE way done
 * sixteen lanes at a time where the target has AVX-512 (zk_mkl_sse_sqrt8 on each half), the
 * lanes MKL roots itself found with two
 * integer compares (for x >= 0 and NaN, the float order is the bits' unsigned order), rooted
 * in one MKL call per block as there. Other ways, other targets: zk_sqrt_block itself. */
#if defined(ZK_HAVE_MKL_SSE) && defined(__AVX512F__)
#define OPTIONS_FAST_ROOT 1
/* zk_mkl_sse_sqrt8's arithmetic sixteen lanes at a time: rsqrtps on each half (its
 * approximation is the 256-bit instruction's, which the 512-bit rsqrt14 is not), then the
 * same operations, lane for lane, on the whole vector. */
static inline __m512 options_sse_root16(__m512 x) {
    const __m256 ylo = _mm256_rsqrt_ps(_mm512_castps512_ps256(x));
    const __m256 yhi = _mm256_rsqrt_ps(
        _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)));
    const __m512 y = _mm512_castpd_ps(_mm512_insertf64x4(
        _mm512_castps_pd(_mm512_castps256_ps512(ylo)), _mm256_castps_pd(yhi), 1));
    const __m512 half = _mm512_set1_ps(0.5f);
    __m512 g = _mm512_mul_ps(x, y), h = _mm512_mul_ps(y, half);
    const __m512 r = _mm512_sub_ps(half, _mm512_mul_ps(g, h));
    g = _mm512_add_ps(_mm512_mul_ps(g, r), g);
    h = _mm512_add_ps(_mm512_mul_ps(r, h), h);
    const __m512 d = _mm512_sub_ps(x, _mm512_mul_ps(g, g));
    return _mm512_add_ps(_mm512_mul_ps(d, h), g);
}

/* x[0..n) <- roots, n <= BLOCK. */
static void options_sse_roots(int64_t n, float *x, zk_vml_sqrt fn) {
    const __m512i lo = _mm512_set1_epi32(0x0c800000);  /* 2^-102 */
    const __m512i span = _mm512_set1_epi32(0x7f7ff000 - 0x0c800000);  /* to 0x1.ffep127 */
    const __m512i magnitude = _mm512_set1_epi32(0x7fffffff);
    float vals[BLOCK], roots[BLOCK];
    int where[BLOCK], count = 0;
    for (int64_t i = 0; i < n; i += 16) {
        const __mmask16 in = n - i >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (n - i)) - 1);
        const __m512 v = _mm512_mask_loadu_ps(_mm512_set1_ps(1.0f), in, x + i);
        const __m512i bits = _mm512_castps_si512(v);
        const __mmask16 normal = _mm512_cmple_epu32_mask(_mm512_sub_epi32(bits, lo), span);
        const __mmask16 zero = _mm512_testn_epi32_mask(bits, magnitude);
        const __m512 r = _mm512_mask_mov_ps(v, normal, options_sse_root16(v));
        if (in == 0xffff)  /* a masked store is slow (Zen 4): the other lanes as they were */
            _mm512_storeu_ps(x + i, r);
        else
            _mm512_mask_storeu_ps(x + i, in, r);
        for (unsigned rest = ~(unsigned)(normal | zero) & in; rest; rest &= rest - 1) {
            const int j = __builtin_ctz(rest);
            vals[count] = x[i + j];
            where[count++] = (int)i + j;
        }
    }
    if (count) {
        fn(count, vals, roots, ZK_VML_MODE);
        for (int k = 0; k < count; k++) x[where[k]] = roots[k];
    }
}
#endif

static inline void options_roots(int64_t n, float *x, zk_vml_sqrt fn) {
#ifdef OPTIONS_FAST_ROOT
    if (fn && __atomic_load_n(&zk_sqrt_mode, __ATOMIC_RELAXED) == ZK_SQRT_MKL_SSE) {
        options_sse_roots(n, x, fn);
        return;
    }
#endif
    zk_sqrt_block(n, x, fn);
}

/* Adam's part of a step. h[0..12) in every kernel below:
 *   0 beta1   1 1 - beta1   2 beta2   3 1 - beta2   4 sqrt(1 - beta2^t)   5 eps
 *   6 1 / (1 - beta1^t)   7 ADOPT's clip (t - 1)^0.25   8 -lr   9 adopt   10 grams
 *   11 decay (1 - lr wd, AdamW's; 1: none, x * 1 is exact) */
typedef struct {
    float b1, omb1, b2, omb2, c2, eps, bc1, clip, neg_lr, decay, lerp_coef;
    int lerp_from_m, adopt, grams;
} adam_hyper;

static adam_hyper read_adam(const double *h) {
    adam_hyper a;
    a.b1 = (float)h[0]; a.omb1 = (float)h[1]; a.b2 = (float)h[2]; a.omb2 = (float)h[3];
    a.c2 = (float)h[4]; a.eps = (float)h[5]; a.bc1 = (float)h[6]; a.clip = (float)h[7];
    a.neg_lr = (float)h[8]; a.adopt = h[9] != 0; a.grams = h[10] != 0; a.decay = (float)h[11];
    a.lerp_from_m = a.omb1 < 0.5f;
    a.lerp_coef = a.lerp_from_m ? a.omb1 : a.omb1 - 1.0f;
    return a;
}

/* The direction of n <= BLOCK elements from the gradient the moments see (gs), updating m
 * and v; damp: TAM's per-element damping, or NULL (then m is lerped). Written to dir. */
static inline void adam_direction(const adam_hyper *a, int64_t n, const float *restrict gs,
                                  const float *restrict damp, float *restrict m,
                                  float *restrict v, float *restrict dir, zk_vml_sqrt root) {
    float nw[BLOCK], den[BLOCK];
    const float *in = gs;
    if (a->adopt) {  /* the previous v normalises the gradient, clipped */
        for (int64_t i = 0; i < n; i++) den[i] = v[i];
        options_roots(n, den, root);
        for (int64_t i = 0; i < n; i++) {
            float s = den[i] < a->eps ? a->eps : den[i];
            float d = gs[i] / s;
            d = d < -a->clip ? -a->clip : d;
            nw[i] = d > a->clip ? a->clip : d;
        }
        in = nw;
    }
    if (damp) {  /* m.mul_(b1).add_(damp * new, alpha=1 - b1) */
        for (int64_t i = 0; i < n; i++) m[i] = fmaf(a->omb1, damp[i] * in[i], m[i] * a->b1);
    } else if (a->lerp_from_m) {
        for (int64_t i = 0; i < n; i++) m[i] = fmaf(a->lerp_coef, in[i] - m[i], m[i]);
    } else {
        for (int64_t i = 0; i < n; i++) m[i] = fmaf(a->lerp_coef, in[i] - m[i], in[i]);
    }
    for (int64_t i = 0; i < n; i++) v[i] = fmaf(a->omb2 * gs[i], gs[i], v[i] * a->b2);
    if (a->adopt) {
        for (int64_t i = 0; i < n; i++) dir[i] = m[i];
    } else {
        for (int64_t i = 0; i < n; i++) den[i] = v[i];
        options_roots(n, den, root);
        for (int64_t i = 0; i < n; i++) dir[i] = (1.0f / (den[i] / a->c2 + a->eps)) * m[i] * a->bc1;
    }
    if (a->grams)
        for (int64_t i = 0; i < n; i++)
            dir[i] = fabsf(dir[i]) * ((float)(gs[i] > 0.0f) - (float)(gs[i] < 0.0f));
}

/* Eight lanes of a chunk's float64 sums, in registers (GCC's vector extension; a lane's
 * additions are the scalar code's, in the same order). */
typedef double lanes8 __attribute__((vector_size(64)));
typedef float floats8 __attribute__((vector_size(32)));

/* a * b + c lane by lane; the product of two floats widened to double is exact, so the fused
 * form rounds as the plain one (one op instead of two where the target has it). */
static inline lanes8 fma8(lanes8 a, lanes8 b, lanes8 c) {
#ifdef __AVX512F__
    return (lanes8)_mm512_fmadd_pd((__m512d)a, (__m512d)b, (__m512d)c);
#else
    return a * b + c;
#endif
}

static inline floats8 load8(const float *p) {
    floats8 f;
    memcpy(&f, p, sizeof f);
    return f;
}

/* Eight floats widened to double: one instruction where AVX-512 has it (GCC splits the
 * generic conversion into halves under its 256-bit preference). */
static inline lanes8 widen8(floats8 f) {
#ifdef __AVX512F__
    return (lanes8)_mm512_cvtps_pd((__m256)f);
#else
    return __builtin_convertvector(f, lanes8);
#endif
}


#endif  /* ZK_ADAMW_OPTIONS_H */
