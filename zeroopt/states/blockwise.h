/* 8-bit blockwise quantization of one 256-element block: what _blockwise.c (quantize and
 * dequantize a tensor) and _adam8bit.c (decode, step and encode in one call) share.
 *
 * The results are bit-identical to blockwise.py's torch reference: the same absmax, the same
 * x / divisor (a division: a multiply by the reciprocal can round differently), the same
 * clamp to [-1, 1], and the same tie rule: the code is the number of midpoints strictly below
 * the value, NaN's code is torch.bucketize's (all of them).
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
 * exact code; the data only changes which table lines are hot (up to 24 KB of the signed
 * table).
 *
 * Each function has a plain-C body and, where the compiler targets them, AVX2 or AVX-512
 * bodies with the same results (every operation is exact or correctly rounded alike).
 */
#ifndef ZEROOPT_BLOCKWISE_H
#define ZEROOPT_BLOCKWISE_H

#include <stdint.h>
#include <string.h>
#if defined(__AVX2__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

#define BLOCK 256

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

#if defined(__AVX2__)
/* The codes of 32 values x[0..32) / d of a block whose absmax is finite: then |x / d| <= 1
 * (a correctly rounded quotient of |x| <= d), so no clamp and no NaN. 4 x 8 keys, looked up,
 * packed. The table indices go to general registers two at a time (vmovq, vpextrq) and the
 * entries are loaded one by one into the vector: on Zen 3 this beats vpgatherdd slightly, on
 * Zen 4 it beats both vpgatherdd and a store and reload of the indices, and on Intel parts with
 * the gather-data-sampling microcode gathers are slow. */
static inline void codes32(const float *x, __m256 d, const uint32_t *table, uint8_t *codes) {
    const __m256i sign = _mm256_set1_epi32((int)0x80000000u), low16 = _mm256_set1_epi32(0xffff),
                  order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);
    __m256i c[4];
    for (int j = 0; j < 4; j++) {
        __m256i b = _mm256_castps_si256(_mm256_div_ps(_mm256_loadu_ps(x + 8 * j), d));
        __m256i key = _mm256_xor_si256(b, _mm256_or_si256(_mm256_srai_epi32(b, 31), sign));
        __m256i at = _mm256_srli_epi32(key, 16);
        __m128i low = _mm256_castsi256_si128(at), high = _mm256_extracti128_si256(at, 1);
        uint64_t a0 = (uint64_t)_mm_cvtsi128_si64(low), a1 = (uint64_t)_mm_extract_epi64(low, 1),
                 a2 = (uint64_t)_mm_cvtsi128_si64(high), a3 = (uint64_t)_mm_extract_epi64(high, 1);
        __m256i entry = _mm256_setr_epi32(
            (int)table[(uint32_t)a0], (int)table[a0 >> 32], (int)table[(uint32_t)a1],
            (int)table[a1 >> 32], (int)table[(uint32_t)a2], (int)table[a2 >> 32],
            (int)table[(uint32_t)a3], (int)table[a3 >> 32]);
        c[j] = _mm256_srli_epi32(_mm256_add_epi32(entry, _mm256_and_si256(key, low16)), 16);
    }
    /* 32-bit lanes to bytes; the packs work within 128-bit halves, the permute reorders */
    __m256i packed = _mm256_packus_epi16(_mm256_packus_epi32(c[0], c[1]),
                                         _mm256_packus_epi32(c[2], c[3]));
    _mm256_storeu_si256((__m256i *)codes, _mm256_permutevar8x32_epi32(packed, order));
}
#define HAVE_CODES32 1
#endif

/* max |x| of a block on the bits (it vectorizes): unsigned order of |x|'s bits is float
 * order, and a NaN wins, as in torch.amax */
static inline uint32_t block_max_bits(const float *xb) {
    uint32_t m = 0;
    for (int i = 0; i < BLOCK; i++) {
        uint32_t a = bits_of(xb[i]) & 0x7fffffffu;
        m = a > m ? a : m;
    }
    return m;
}

/* The absmax of a block whose block_max_bits are m. torch.amax returns the default NaN
 * whatever the payload, and under torch.set_flush_denormal(True) flushes a subnormal maximum
 * to 0: so does + 0.0f (which the compiler may not drop: it turns -0 into +0). */
static inline float absmax_of(uint32_t m) {
    return float_of(m > 0x7f800000u ? 0x7fc00000u : m) + 0.0f;
}

/* The divisor of a block of that absmax: an all-zero (or NaN) block divides by 1. */
static inline float divisor_of(float amax) { return amax > 0.0f ? amax : 1.0f; }

/* The 256 codes of block xb, whose block_max_bits are m, into cb; returns its absmax. */
static inline float quantize_bits(const float *xb, uint32_t m, const uint32_t *table,
                                  uint8_t *cb) {
    float amax = absmax_of(m), divisor = divisor_of(amax);
#ifdef HAVE_CODES32
    if (m < 0x7f800000u) {
        const __m256 d = _mm256_set1_ps(divisor);
        for (int i = 0; i < BLOCK; i += 32) codes32(xb + i, d, table, cb + i);
        return amax;
    }
#endif
    for (int i = 0; i < BLOCK; i++) {
        float v = xb[i] / divisor;
        v = v < -1.0f ? -1.0f : v; /* NaN stays NaN, as in torch.clamp */
        v = v > 1.0f ? 1.0f : v;
        cb[i] = code_of(key_of(v), table);
    }
    return amax;
}

/* The 256 codes of block xb into cb; returns its absmax (what torch.amax(|x|) gives). */
static inline float quantize_block(const float *xb, const uint32_t *table, uint8_t *cb) {
    return quantize_bits(xb, block_max_bits(xb), table, cb);
}

/* A code map prepared for dequantize_block: with AVX-512 VBMI, its 256 floats as four byte
 * planes (byte k of every value) of four 64-byte registers each, looked up with vpermi2b. */
typedef struct {
    const float *values;
#if defined(__AVX512VBMI__) && !defined(ZQ_NO_AVX512)
    __m512i planes[4][4];
    __m512i order;
#endif
} code_map_t;

static inline void prepare_map(const float *code_map, code_map_t *map) {
    map->values = code_map;
#if defined(__AVX512VBMI__) && !defined(ZQ_NO_AVX512)
    uint8_t plane[4][256], order[64];
    for (int c = 0; c < 256; c++)
        for (int k = 0; k < 4; k++) plane[k][c] = (uint8_t)(bits_of(code_map[c]) >> 8 * k);
    for (int k = 0; k < 4; k++)
        for (int j = 0; j < 4; j++) map->planes[k][j] = _mm512_loadu_si512(plane[k] + 64 * j);
    /* the unpacks below interleave within 128-bit lanes: byte 16 l + 4 s + j of the
     * reordered codes must be code 16 s + 4 l + j for the floats to come out in order */
    for (int l = 0; l < 4; l++)
        for (int q = 0; q < 4; q++)
            for (int j = 0; j < 4; j++) order[16 * l + 4 * q + j] = (uint8_t)(16 * q + 4 * l + j);
    map->order = _mm512_loadu_si512(order);
#endif
}

/* ob[i] = code_map[cb[i]] * a: the one product torch computes. */
static inline void dequantize_block(const uint8_t *cb, float a, const code_map_t *map,
                                    float *ob) {
#if defined(__AVX512VBMI__) && !defined(ZQ_NO_AVX512)
    /* 64 values a round: each byte of the 64 floats by two vpermi2b (codes below and from
     * 128) and a blend, then the bytes interleaved into floats (0.08 against 0.25 ns a value
     * on Zen 4 for the loads below) */
    const __m512 av = _mm512_set1_ps(a);
    for (int i = 0; i < BLOCK; i += 64) {
        __m512i c = _mm512_permutexvar_epi8(map->order, _mm512_loadu_si512(cb + i));
        __mmask64 high = _mm512_movepi8_mask(c);
        __m512i byte[4];
        for (int k = 0; k < 4; k++)
            byte[k] = _mm512_mask_blend_epi8(
                high, _mm512_permutex2var_epi8(map->planes[k][0], c, map->planes[k][1]),
                _mm512_permutex2var_epi8(map->planes[k][2], c, map->planes[k][3]));
        __m512i low01 = _mm512_unpacklo_epi8(byte[0], byte[1]),
                high01 = _mm512_unpackhi_epi8(byte[0], byte[1]),
                low23 = _mm512_unpacklo_epi8(byte[2], byte[3]),
                high23 = _mm512_unpackhi_epi8(byte[2], byte[3]);
        __m512i f[4] = {_mm512_unpacklo_epi16(low01, low23), _mm512_unpackhi_epi16(low01, low23),
                        _mm512_unpacklo_epi16(high01, high23),
                        _mm512_unpackhi_epi16(high01, high23)};
        for (int q = 0; q < 4; q++)
            _mm512_storeu_ps(ob + i + 16 * q, _mm512_mul_ps(_mm512_castsi512_ps(f[q]), av));
    }
#elif defined(__AVX2__)
    /* eight codes in one 64-bit load, their values loaded one by one: faster than
     * vpgatherdd on Zen 3 (0.25 against 0.6 ns a value) */
    const float *code_map = map->values;
    const __m256 av = _mm256_set1_ps(a);
    for (int i = 0; i < BLOCK; i += 8) {
        uint64_t w;
        memcpy(&w, cb + i, 8);
        __m256 v = _mm256_setr_ps(code_map[w & 255], code_map[w >> 8 & 255],
                                  code_map[w >> 16 & 255], code_map[w >> 24 & 255],
                                  code_map[w >> 32 & 255], code_map[w >> 40 & 255],
                                  code_map[w >> 48 & 255], code_map[w >> 56]);
        _mm256_storeu_ps(ob + i, _mm256_mul_ps(v, av));
    }
#else
    for (int i = 0; i < BLOCK; i++) ob[i] = map->values[cb[i]] * a;
#endif
}

#endif
