/* Adam(W) with 8-bit blockwise states in one call per window: decode m and v (blockwise.h),
 * step the params as torch._fused_adam(w)_ does, encode m and v back. The native path of
 * zeroopt/states/adam8bit.py.
 *
 * The results are those of decode -> torch._fused_adam(w)_ -> encode bit for bit: the update
 * below is ATen's CPU kernel (aten/src/ATen/native/cpu/FusedAdamKernel.cpp, float) operation
 * for operation, with its roundings. That kernel runs a vector body over each tensor and a
 * scalar tail over its last size % VEC elements, and the compiler contracted different
 * multiplies and adds into FMAs in the two (v = v * beta2 + (1 - beta2) * g * g above all), so
 * an element's result depends on whether it sat in its tensor's tail. The caller names each
 * tensor of the window (a segment: params, grads, its length) and the kernel steps its last
 * len % vec elements with the tail's arithmetic. Which FMAs each part uses (`mode`) and VEC
 * are not guessed: adam8bit.py finds them by comparing zq_adam_update with torch's kernel at
 * first use, and keeps the three-pass path where none matches.
 *
 * mode bits: 0-1 the body's v (V_*), 2-3 the tail's, 4 the body's Adam weight decay as an FMA
 * (g + p * wd), 5 the tail's.
 *
 * One thing is not reproduced: the sign bit of a NaN. Which of two NaN operands an instruction
 * returns, and whether a negation survives (the compiler rewrites ATen's -g * -g as g * g),
 * depends on how ATen's build ordered and folded them. With maximize=True and NaN gradients a
 * NaN param can come out as -NaN here where torch gives +NaN (or the reverse); its state codes
 * and absmax do not depend on it (a NaN's code is NaN's code, a NaN absmax the default NaN).
 *
 * Each thread takes a run of blocks and steps it a chunk (CHUNK elements) at a time: decode the
 * chunk's m and v into fp32 scratch, step it, encode it; three phases over the chunk, not one
 * pass per 256-element block. Per block (decode, step, encode in L1) measured slower on Zen 4,
 * 24 against 20 ms on 12.6M elements: the step's streams of params and gradients and the
 * encoding's table lookups (36 KB of tables) evict each other when they alternate every
 * block; each phase alone keeps its own working set. Phases over a whole run send the scratch
 * (8 bytes an element: written, read and written, read) to memory and back once the run
 * outgrows the caches; a chunk's 64 KB stay in L2, the same scratch for every chunk. With the
 * prefetch (step_chunk), 12.6M elements on Zen 4, 1 thread: 20-22 ms in windows of 256K (the
 * default on CPU, where whole-run phases stay in cache: 1-3% slower, so runs up to WHOLE stay
 * one chunk), 1M the same, 4M 20 against 25 ms, one window of 12.6M 20 against 27.
 */
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "blockwise.h"

#define PARALLEL_MIN 32768 /* elements: below, waking threads costs more than it saves */

enum { V_PLAIN = 0, V_FMA_GRAD = 1, V_FMA_STATE = 2 };

/* The update's constants, each rounded to float where ATen rounds it. */
typedef struct {
    float decay;     /* AdamW: 1 - lr * wd */
    float wd;        /* Adam: wd */
    float w;         /* 1 - beta1, the lerp weight */
    float b2, c2;    /* beta2, 1 - beta2 */
    float bc2s;      /* sqrt(1 - beta2^t) */
    float eps;
    float nss;       /* -lr / (1 - beta1^t) */
    int maximize, decoupled, decays, small_w;
} hyper_t;

/* hyper: lr, beta1, beta2, weight_decay, eps, step, maximize, decoupled (as doubles) */
static hyper_t hyper_of(const double *h) {
    double lr = h[0], beta1 = h[1], beta2 = h[2], wd = h[3], eps = h[4];
    double step = (double)(float)h[5]; /* ATen reads state_step.item<float>() */
    double bc1 = 1 - pow(beta1, step), bc2 = 1 - pow(beta2, step);
    hyper_t k;
    k.decay = (float)(1 - lr * wd);
    k.wd = (float)wd;
    k.w = (float)(1 - beta1);
    k.b2 = (float)beta2;
    k.c2 = (float)(1 - beta2);
    k.bc2s = (float)sqrt(bc2);
    k.eps = (float)eps;
    k.nss = (float)(-(lr / bc1));
    k.maximize = h[6] != 0;
    k.decoupled = h[7] != 0;
    k.decays = wd != 0;
    k.small_w = fabsf(k.w) < 0.5f;
    return k;
}

/* n elements: p and g in the params and grads, m and v the decoded states. */
__attribute__((unused)) static void update_scalar(float *p, const float *g, float *m, float *v, int64_t n,
                          const hyper_t *k, int vmode, int wd_fma) {
    for (int64_t i = 0; i < n; i++) {
        float gi = k->maximize ? -g[i] : g[i], pi = p[i], mi = m[i], vi = v[i];
        if (k->decays) {
            if (k->decoupled) pi = pi * k->decay;
            else gi = wd_fma ? fmaf(pi, k->wd, gi) : gi + pi * k->wd;
        }
        /* exp_avg.lerp_(grad, 1 - beta1), as ATen's lerp */
        mi = k->small_w ? fmaf(k->w, gi - mi, mi) : fmaf(k->w - 1.0f, gi - mi, gi);
        if (vmode == V_FMA_GRAD) vi = fmaf(k->c2 * gi, gi, vi * k->b2);
        else if (vmode == V_FMA_STATE) vi = fmaf(vi, k->b2, k->c2 * gi * gi);
        else vi = vi * k->b2 + k->c2 * gi * gi;
        float denom = sqrtf(vi) / k->bc2s + k->eps;
        p[i] = pi + k->nss * mi / denom;
        m[i] = mi;
        v[i] = vi;
    }
}

#if defined(__AVX512F__) && !defined(ZQ_NO_AVX512)
/* update_scalar, 16 elements a round, the last round masked. */
static void update_avx512(float *p, const float *g, float *m, float *v, int64_t n,
                          const hyper_t *k, int vmode, int wd_fma) {
    const __m512 decay = _mm512_set1_ps(k->decay), wd = _mm512_set1_ps(k->wd),
                 w = _mm512_set1_ps(k->small_w ? k->w : k->w - 1.0f),
                 b2 = _mm512_set1_ps(k->b2), c2 = _mm512_set1_ps(k->c2),
                 bc2s = _mm512_set1_ps(k->bc2s), eps = _mm512_set1_ps(k->eps),
                 nss = _mm512_set1_ps(k->nss), negate = _mm512_set1_ps(-0.0f);
    const int maximize = k->maximize, decays = k->decays, decoupled = k->decoupled,
              small_w = k->small_w;
    for (int64_t i = 0; i < n; i += 16) {
        __mmask16 in = n - i >= 16 ? 0xffff : (__mmask16)((1u << (n - i)) - 1);
        __m512 gi = _mm512_maskz_loadu_ps(in, g + i), pi = _mm512_maskz_loadu_ps(in, p + i),
               mi = _mm512_maskz_loadu_ps(in, m + i), vi = _mm512_maskz_loadu_ps(in, v + i);
        if (maximize) gi = _mm512_xor_ps(gi, negate);
        if (decays) {
            if (decoupled) pi = _mm512_mul_ps(pi, decay);
            else gi = wd_fma ? _mm512_fmadd_ps(pi, wd, gi)
                             : _mm512_add_ps(gi, _mm512_mul_ps(pi, wd));
        }
        mi = _mm512_fmadd_ps(w, _mm512_sub_ps(gi, mi), small_w ? mi : gi);
        __m512 c2g = _mm512_mul_ps(c2, gi);
        if (vmode == V_FMA_GRAD) vi = _mm512_fmadd_ps(c2g, gi, _mm512_mul_ps(vi, b2));
        else if (vmode == V_FMA_STATE) vi = _mm512_fmadd_ps(vi, b2, _mm512_mul_ps(c2g, gi));
        else vi = _mm512_add_ps(_mm512_mul_ps(vi, b2), _mm512_mul_ps(c2g, gi));
        __m512 denom = _mm512_add_ps(_mm512_div_ps(_mm512_sqrt_ps(vi), bc2s), eps);
        pi = _mm512_add_ps(pi, _mm512_div_ps(_mm512_mul_ps(nss, mi), denom));
        _mm512_mask_storeu_ps(p + i, in, pi);
        _mm512_mask_storeu_ps(m + i, in, mi);
        _mm512_mask_storeu_ps(v + i, in, vi);
    }
}
#define update update_avx512
#elif defined(__AVX2__) && defined(__FMA__)
/* update_scalar, 8 elements a round, the last round masked (the compiler leaves the scalar
 * loop unvectorized: sqrtf may set errno). */
static void update_avx2(float *p, const float *g, float *m, float *v, int64_t n,
                        const hyper_t *k, int vmode, int wd_fma) {
    const __m256 decay = _mm256_set1_ps(k->decay), wd = _mm256_set1_ps(k->wd),
                 w = _mm256_set1_ps(k->small_w ? k->w : k->w - 1.0f),
                 b2 = _mm256_set1_ps(k->b2), c2 = _mm256_set1_ps(k->c2),
                 bc2s = _mm256_set1_ps(k->bc2s), eps = _mm256_set1_ps(k->eps),
                 nss = _mm256_set1_ps(k->nss), negate = _mm256_set1_ps(-0.0f);
    const __m256i lanes = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
    const int maximize = k->maximize, decays = k->decays, decoupled = k->decoupled,
              small_w = k->small_w;
    for (int64_t i = 0; i < n; i += 8) {
        const int left = n - i >= 8 ? 8 : (int)(n - i);
        const __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32(left), lanes);
        __m256 gi = _mm256_maskload_ps(g + i, in), pi = _mm256_maskload_ps(p + i, in),
               mi = _mm256_maskload_ps(m + i, in), vi = _mm256_maskload_ps(v + i, in);
        if (maximize) gi = _mm256_xor_ps(gi, negate);
        if (decays) {
            if (decoupled) pi = _mm256_mul_ps(pi, decay);
            else gi = wd_fma ? _mm256_fmadd_ps(pi, wd, gi)
                             : _mm256_add_ps(gi, _mm256_mul_ps(pi, wd));
        }
        mi = _mm256_fmadd_ps(w, _mm256_sub_ps(gi, mi), small_w ? mi : gi);
        __m256 c2g = _mm256_mul_ps(c2, gi);
        if (vmode == V_FMA_GRAD) vi = _mm256_fmadd_ps(c2g, gi, _mm256_mul_ps(vi, b2));
        else if (vmode == V_FMA_STATE) vi = _mm256_fmadd_ps(vi, b2, _mm256_mul_ps(c2g, gi));
        else vi = _mm256_add_ps(_mm256_mul_ps(vi, b2), _mm256_mul_ps(c2g, gi));
        __m256 denom = _mm256_add_ps(_mm256_div_ps(_mm256_sqrt_ps(vi), bc2s), eps);
        pi = _mm256_add_ps(pi, _mm256_div_ps(_mm256_mul_ps(nss, mi), denom));
        _mm256_maskstore_ps(p + i, in, pi);
        _mm256_maskstore_ps(m + i, in, mi);
        _mm256_maskstore_ps(v + i, in, vi);
    }
}
#define update update_avx2
#else
#define update update_scalar
#endif

/* One segment's elements [from, to) (offsets in the segment), their states at m and v. */
static inline void step_range(float *p, const float *g, float *m, float *v, int64_t from,
                              int64_t to, int64_t tail, const hyper_t *k, int mode) {
    int64_t body_end = to < tail ? to : tail;
    if (from < body_end)
        update(p + from, g + from, m, v, body_end - from, k, mode & 3, mode >> 4 & 1);
    int64_t start = from > tail ? from : tail;
    if (start < to)
        update(p + start, g + start, m + (start - from), v + (start - from), to - start, k,
               mode >> 2 & 3, mode >> 5 & 1);
}

typedef struct {
    int64_t segments;
    const int64_t *offsets;
    float *const *params;
    const float *const *grads;
    uint8_t *codes[2];
    float *absmax[2];
    float *scratch[2];
    code_map_t map[2];
    const uint32_t *table[2];
    hyper_t k;
    int mode, vec;
} job_t;

#define CHUNK 8192 /* elements (whole blocks): 2 x 32 KB of scratch, which L2 keeps */
#define WHOLE (1 << 19) /* elements: runs up to this long (4 MB of scratch) are one chunk */

/* Where the prefetch of the next chunk's params and gradients has got to: segment s, element
 * at (of the n), up to end. */
typedef struct {
    int64_t s, at, end;
} ahead_t;

/* Prefetches the params and gradients of the next count elements from a->at (not past
 * a->end), a cache line at a time, and advances a. */
static inline void prefetch_ahead(const job_t *job, ahead_t *a, int64_t count) {
    const int64_t stop = a->at + count < a->end ? a->at + count : a->end;
    while (a->at < stop) {
        while (job->offsets[a->s + 1] <= a->at) a->s++;
        const int64_t start = job->offsets[a->s];
        const int64_t end = job->offsets[a->s + 1] < stop ? job->offsets[a->s + 1] : stop;
        const float *p = job->params[a->s] + (a->at - start),
                    *g = job->grads[a->s] + (a->at - start);
        for (int64_t i = 0; i < end - a->at; i += 16) {
            __builtin_prefetch(p + i, 1, 2); /* to be written */
            __builtin_prefetch(g + i, 0, 2);
        }
        a->at = end;
    }
}

/* Elements [lo, hi) (whole blocks): decode both states into the scratch at base[0] and
 * base[1], step every segment over its part, encode. [hi, next) is the next chunk (no longer
 * than this one; empty if none). *seg: a segment that does not end before lo (the first one
 * that reaches past lo on return).
 *
 * The encoding is compute bound and the step memory bound: while it encodes, the next chunk's
 * params, gradients and codes are prefetched, so that its step finds them in cache (chunks
 * without it: 24-25 ms in every case above). */
static void step_chunk(const job_t *job, int64_t lo, int64_t hi, float *const *base,
                       int64_t *seg, int64_t next) {
    for (int j = 0; j < 2; j++)
        for (int64_t at = lo; at < hi; at += BLOCK)
            dequantize_block(job->codes[j] + at, job->absmax[j][at / BLOCK], &job->map[j],
                             base[j] + (at - lo));
    int64_t s = *seg;
    while (job->offsets[s + 1] <= lo) s++;
    *seg = s;
    for (; s < job->segments && job->offsets[s] < hi; s++) {
        int64_t start = job->offsets[s], len = job->offsets[s + 1] - start;
        int64_t from = (lo > start ? lo : start) - start;
        int64_t to = (hi < start + len ? hi : start + len) - start;
        step_range(job->params[s], job->grads[s], base[0] + (start + from - lo),
                   base[1] + (start + from - lo), from, to, len - len % job->vec, &job->k,
                   job->mode);
    }
    ahead_t ahead = {*seg, hi, next};
    for (int j = 0; j < 2; j++)
        for (int64_t at = lo; at < hi; at += BLOCK) {
            /* per block: half a block of params and gradients (the two states' loops cover
             * the next chunk), and the other state's codes of the block a chunk ahead */
            prefetch_ahead(job, &ahead, BLOCK / 2);
            if (at + (hi - lo) + BLOCK <= next)
                for (int line = 0; line < BLOCK; line += 64)
                    __builtin_prefetch(job->codes[1 - j] + at + (hi - lo) + line, 0, 2);
            job->absmax[j][at / BLOCK] = quantize_block(base[j] + (at - lo), job->table[j],
                                                        job->codes[j] + at);
        }
}

/* Elements [lo, hi) (whole blocks), a chunk at a time, in the scratch from lo on: one chunk
 * up to WHOLE elements (at the default 256K-element windows on CPU; chunks measured 1-3%
 * slower there), CHUNK elements beyond. */
static void step_run(const job_t *job, int64_t lo, int64_t hi) {
    int64_t s = 0, top = job->segments - 1;
    while (s < top) { /* the first segment reaching past lo: a binary search */
        int64_t mid = (s + top) / 2;
        if (job->offsets[mid + 1] <= lo) s = mid + 1;
        else top = mid;
    }
    float *const base[2] = {job->scratch[0] + lo, job->scratch[1] + lo};
    const int64_t chunk = hi - lo <= WHOLE ? hi - lo : CHUNK;
    for (int64_t at = lo; at < hi; at += chunk) {
        const int64_t end = hi - at < chunk ? hi : at + chunk;
        step_chunk(job, at, end, base, &s, hi - end < chunk ? hi : end + chunk);
    }
}

/* Steps n elements (n a multiple of 256) whose states are 8-bit blocks, in place.
 *
 *   segments  the tensors of the window that cover these n elements, in order: segment s is
 *             params[s], grads[s] (fp32), elements [offsets[s], offsets[s + 1]) of the n;
 *             offsets[0] = 0, offsets[segments] = n
 *   codes     m's and v's codes (n each); absmax: m's and v's (n / 256 each)
 *   scratch   room for m's and v's decoded values (n floats each; each thread uses the
 *             first CHUNK of its run's)
 *   maps      m's and v's 256 code values; tables: their quantization tables (blockwise.h)
 *   h         lr, beta1, beta2, weight_decay, eps, step, maximize, decoupled
 *   mode, vec the tail arithmetic (see the top of the file)
 *   threads   torch.get_num_threads(): each thread takes a contiguous run of blocks (the
 *             results do not depend on the split)
 */
void zq_adam8bit_step(int64_t n, int64_t segments, const int64_t *offsets, float *const *params,
                      const float *const *grads, uint8_t *m_codes, float *m_absmax,
                      uint8_t *v_codes, float *v_absmax, float *m_scratch, float *v_scratch,
                      const float *m_map, const float *v_map, const uint32_t *m_table,
                      const uint32_t *v_table, const double *h, int mode, int vec,
                      int threads) {
    job_t job = {segments, offsets, params, grads, {m_codes, v_codes}, {m_absmax, v_absmax},
                 {m_scratch, v_scratch}, {{0}}, {m_table, v_table}, hyper_of(h), mode, vec};
    prepare_map(m_map, &job.map[0]);
    prepare_map(v_map, &job.map[1]);
    const int64_t blocks = n / BLOCK;
    (void)threads;
#pragma omp parallel num_threads(threads) if (threads > 1 && n >= PARALLEL_MIN)
    {
        int64_t t = 0, count = 1;
#ifdef _OPENMP
        t = omp_get_thread_num();
        count = omp_get_num_threads();
#endif
        step_run(&job, blocks * t / count * BLOCK, blocks * (t + 1) / count * BLOCK);
    }
}

/* The update alone on fp32 states, as torch._fused_adam(w)_ on one tensor of n elements:
 * what adam8bit.py compares with torch's kernel to choose mode and vec. */
void zq_adam_update(int64_t n, float *p, const float *g, float *m, float *v, const double *h,
                    int mode, int vec) {
    const hyper_t k = hyper_of(h);
    step_range(p, g, m, v, 0, n, n - n % vec, &k, mode);
}
