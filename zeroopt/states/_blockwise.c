/* 8-bit blockwise quantization on the CPU: the native path of zeroopt/states/blockwise.py.
 *
 * Plain C on raw pointers, loaded with ctypes (native.py compiles it). The results are
 * bit-identical to blockwise.py's torch reference: the same absmax, the same x / divisor (a
 * division: a multiply by the reciprocal can round differently), the same clamp to [-1, 1],
 * and the same tie rule: the code is the number of midpoints strictly below the value, NaN's
 * code is torch.bucketize's (all of them).
 *
 * The code without a binary search. A float maps to a 32-bit key whose unsigned order is the
 * float order (key_of). The key's top 16 bits (sign, exponent, 7 mantissa bits) pick an entry
 * of a 65536-entry table that native.py builds from the torch reference:
 *   entry = below << 16 | (0xffff - split)
 * below: the midpoints under the smallest float with that prefix; split: the low 16 key bits
 * of the next midpoint if it has that prefix too, else 0xffff. No prefix holds two midpoints
 * (native.py checks), so the code is below + (low > split), and the add in
 * (entry + low) >> 16 carries exactly that comparison into bit 16. Prefixes of floats outside
 * [-1, 1], which only NaN reaches after the clamp, hold NaN's code. So every float gets its
 * exact code; the data only changes which table lines are hot (a few KB).
 */
#include <stdint.h>
#include <string.h>
#ifdef __AVX2__
#include <immintrin.h>
#endif

#define BLOCK 256
/* With OpenMP (native.py adds -fopenmp where torch's runtime is libgomp), blocks are split
 * over `threads` threads (torch.get_num_threads()) for windows this long or longer: below,
 * waking the threads costs more than it saves. Results do not depend on the thread count. */
#define PARALLEL_MIN 32768

static inline uint32_t bits_of(float v) { uint32_t b; memcpy(&b, &v, 4); return b; }
static inline float float_of(uint32_t b) { float v; memcpy(&v, &b, 4); return v; }

/* Flips the sign bit of a non-negative float, every bit of a negative one. */
static inline uint32_t key_of(float v) {
    uint32_t b = bits_of(v);
    return b ^ ((uint32_t)((int32_t)b >> 31) | 0x80000000u);
}

static inline uint8_t code_of(uint32_t key, const uint32_t *table) {
    return (uint8_t)((table[key >> 16] + (key & 0xffff)) >> 16);
}

#ifdef __AVX2__
/* A block whose absmax is finite: then |x / divisor| <= 1 (a correctly rounded quotient of
 * |x| <= divisor), so no clamp and no NaN. 32 values a round: 4 x 8 keys, looked up, packed.
 * The table entries are loaded one by one into the vector: on Zen 3 this beats vpgatherdd
 * slightly, and on Intel parts with the gather-data-sampling microcode gathers are slow. */
static void block_avx2(const float *x, float divisor, const uint32_t *table, uint8_t *codes) {
    const __m256 d = _mm256_set1_ps(divisor);
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u), low16 = _mm256_set1_epi32(0xffff),
                  order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    uint32_t at[8] __attribute__((aligned(32)));
    for (int i = 0; i < BLOCK; i += 32) {
        __m256i c[4];
        for (int j = 0; j < 4; j++) {
            __m256i b = _mm256_castps_si256(_mm256_div_ps(_mm256_loadu_ps(x + i + 8 * j), d));
            __m256i key = _mm256_xor_si256(b, _mm256_or_si256(_mm256_srai_epi32(b, 31), sign));
            _mm256_store_si256((__m256i *)at, _mm256_srli_epi32(key, 16));
            __m256i entry = _mm256_setr_epi32(table[at[0]], table[at[1]], table[at[2]],
                                              table[at[3]], table[at[4]], table[at[5]],
                                              table[at[6]], table[at[7]]);
            c[j] = _mm256_srli_epi32(_mm256_add_epi32(entry, _mm256_and_si256(key, low16)), 16);
        }
        /* 32-bit lanes to bytes; the packs work within 128-bit halves, the permute reorders */
        __m256i packed = _mm256_packus_epi16(_mm256_packus_epi32(c[0], c[1]),
                                             _mm256_packus_epi32(c[2], c[3]));
        _mm256_storeu_si256((__m256i *)(codes + i), _mm256_permutevar8x32_epi32(packed, order));
    }
}
#endif

/* x: n fp32 values, n a multiple of 256. Writes n codes and n / 256 absmax. */
void zq_quantize(const float *x, int64_t n, const uint32_t *table, uint8_t *codes,
                 float *absmax, int threads) {
    (void)threads;
#pragma omp parallel for num_threads(threads) if (threads > 1 && n >= PARALLEL_MIN)
    for (int64_t b = 0; b < n / BLOCK; b++) {
        const float *xb = x + b * BLOCK;
        uint8_t *cb = codes + b * BLOCK;
        /* max |x| on the bits (it vectorizes): unsigned order of |x|'s bits is float order,
         * and a NaN wins, as in torch.amax */
        uint32_t m = 0;
        for (int i = 0; i < BLOCK; i++) {
            uint32_t a = bits_of(xb[i]) & 0x7fffffffu;
            m = a > m ? a : m;
        }
        /* torch.amax returns the default NaN whatever the payload, and under
         * torch.set_flush_denormal(True) flushes a subnormal maximum to 0: so does + 0.0f
         * (which the compiler may not drop: it turns -0 into +0) */
        float amax = float_of(m > 0x7f800000u ? 0x7fc00000u : m) + 0.0f;
        absmax[b] = amax;
        float divisor = amax > 0.0f ? amax : 1.0f; /* all-zero (or NaN) block: divide by 1 */
#ifdef __AVX2__
        if (m < 0x7f800000u) {
            block_avx2(xb, divisor, table, cb);
            continue;
        }
#endif
        for (int i = 0; i < BLOCK; i++) {
            float v = xb[i] / divisor;
            v = v < -1.0f ? -1.0f : v; /* NaN stays NaN, as in torch.clamp */
            v = v > 1.0f ? 1.0f : v;
            cb[i] = code_of(key_of(v), table);
        }
    }
}

/* out[i] = code_map[codes[i]] * absmax[i / 256]: the one product torch computes. */
void zq_dequantize(const uint8_t *codes, const float *absmax, int64_t n, const float *code_map,
                   float *out, int threads) {
    (void)threads;
#pragma omp parallel for num_threads(threads) if (threads > 1 && n >= PARALLEL_MIN)
    for (int64_t b = 0; b < n / BLOCK; b++) {
        const uint8_t *cb = codes + b * BLOCK;
        float *ob = out + b * BLOCK;
#ifdef __AVX2__
        /* eight codes in one 64-bit load, their values loaded one by one: faster than
         * vpgatherdd on Zen 3 (0.25 against 0.6 ns a value) */
        const __m256 a = _mm256_set1_ps(absmax[b]);
        for (int i = 0; i < BLOCK; i += 8) {
            uint64_t w;
            memcpy(&w, cb + i, 8);
            __m256 v = _mm256_setr_ps(code_map[w & 255], code_map[w >> 8 & 255],
                                      code_map[w >> 16 & 255], code_map[w >> 24 & 255],
                                      code_map[w >> 32 & 255], code_map[w >> 40 & 255],
                                      code_map[w >> 48 & 255], code_map[w >> 56]);
            _mm256_storeu_ps(ob + i, _mm256_mul_ps(v, a));
        }
#else
        const float a = absmax[b];
        for (int i = 0; i < BLOCK; i++) ob[i] = code_map[cb[i]] * a;
#endif
    }
}
