/* What every zeroopt element-wise kernel shares (zeroopt/kernels/library.py calls them).
 *
 * Every kernel has one signature:
 *
 *     void zk_NAME(int64_t n, float *const *t, const double *h, double *out, int threads)
 *
 *   n        elements in each tensor;
 *   t        the tensors' data (contiguous fp32, n elements each), in the order the Python
 *            caller documents (params, grads, then states);
 *   h        the hyperparameters, as doubles, in the caller's order (each kernel converts
 *            to float exactly where torch's kernel would);
 *   out      room for the kernel's partial sums (reductions), or NULL;
 *   threads  torch.get_num_threads(): OpenMP threads for long tensors.
 *
 * Arithmetic: -ffp-contract=off (build.py), so a * b + c rounds twice unless the kernel
 * writes fmaf, and every element is computed by the same code wherever it sits in the tensor
 * (the compiler's vector body and its scalar tail round alike): results do not depend on
 * where a window or a rank's shard begins.
 *
 * Reductions: sum in double over ZK_CHUNK-element chunks and add the chunks in order
 * (zk_chunks, zk_add_partials), so the result does not depend on the thread count either.
 * Within a chunk, keep ZK_LANES independent sums (element i into lane i % ZK_LANES from the
 * chunk's start) and add them with zk_sum_lanes: one running sum is a chain of dependent adds
 * the compiler may not reorder (no -ffast-math), ~4x slower than memory.
 */
#ifndef ZEROOPT_KERNELS_H
#define ZEROOPT_KERNELS_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>

/* Below this many elements, waking threads costs more than it saves. */
#define ZK_PARALLEL_MIN 32768
#define ZK_CHUNK 16384
#define ZK_LANES 16

#define ZK_PARALLEL_FOR _Pragma("omp parallel for schedule(static) num_threads(threads) if (threads > 1 && n >= ZK_PARALLEL_MIN)")

static inline int64_t zk_chunks(int64_t n) { return (n + ZK_CHUNK - 1) / ZK_CHUNK; }

/* The ZK_LANES lane sums added in a fixed order. */
static inline double zk_sum_lanes(const double *lane) {
    double sum = 0.0;
    for (int j = 0; j < ZK_LANES; j++) sum += lane[j];
    return sum;
}

/* out[0..k) += the chunk partials partial[c * k + j], added in chunk order. */
static inline void zk_add_partials(const double *partial, int64_t chunks, int k, double *out) {
    for (int j = 0; j < k; j++) out[j] = 0.0;
    for (int64_t c = 0; c < chunks; c++)
        for (int j = 0; j < k; j++) out[j] += partial[c * k + j];
}

#endif
