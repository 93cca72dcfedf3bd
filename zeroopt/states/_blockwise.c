/* 8-bit blockwise quantization on the CPU: the native path of zeroopt/states/blockwise.py.
 *
 * Plain C on raw pointers, loaded with ctypes (native.py compiles it). The block functions
 * (blockwise.h, shared with _adam8bit.c) say how the results stay bit-identical to
 * blockwise.py's torch reference.
 */
#include "blockwise.h"

/* With OpenMP (native.py adds -fopenmp where torch's runtime is libgomp), blocks are split
 * over `threads` threads (torch.get_num_threads()) for windows this long or longer: below,
 * waking the threads costs more than it saves. Results do not depend on the thread count. */
#define PARALLEL_MIN 32768

/* x: n fp32 values, n a multiple of 256. Writes n codes and n / 256 absmax. */
void zq_quantize(const float *x, int64_t n, const uint32_t *table, uint8_t *codes,
                 float *absmax, int threads) {
    (void)threads;
#pragma omp parallel for num_threads(threads) if (threads > 1 && n >= PARALLEL_MIN)
    for (int64_t b = 0; b < n / BLOCK; b++)
        absmax[b] = quantize_block(x + b * BLOCK, table, codes + b * BLOCK);
}

/* out[i] = code_map[codes[i]] * absmax[i / 256]: the one product torch computes. */
void zq_dequantize(const uint8_t *codes, const float *absmax, int64_t n, const float *code_map,
                   float *out, int threads) {
    code_map_t map;
    prepare_map(code_map, &map);
    (void)threads;
#pragma omp parallel for num_threads(threads) if (threads > 1 && n >= PARALLEL_MIN)
    for (int64_t b = 0; b < n / BLOCK; b++)
        dequantize_block(codes + b * BLOCK, absmax[b], &map, out + b * BLOCK);
}
