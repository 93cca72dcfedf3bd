/* torch's fp32 square root on the CPU, element for element, for kernels that must match it.
 *
 * torch built with MKL (the x86 Linux wheels) computes Tensor.sqrt with MKL's vmsSqrt in
 * high-accuracy mode (ATen's vml.h: VML_HA | VML_FTZDAZ_OFF | VML_ERRMODE_IGNORE), which is
 * not the correctly rounded root: on an AMD EPYC (AVX-512), 15% of random inputs come out one
 * ulp off, the same whatever the element's position or the call's length (and sqrt(-1) is
 * +NaN where the hardware's is -NaN). So a kernel that must reproduce torch's foreach path
 * calls that same function, found in the libtorch_cpu already loaded; without it (a torch
 * without MKL) the root is the hardware's, correctly rounded, which is what torch's
 * vectorized sqrt computes there.
 *
 * A kernel computes its roots a block of ZK_SQRT_BLOCK elements at a time in a small buffer
 * (the block stays in L1 between the passes before and after the root, so memory is still
 * read and written once). Python checks once that zk_torch_sqrt agrees with torch.sqrt
 * (zeroopt/kernels/sqrt_check.py) before a rule uses these kernels.
 */
#ifndef ZEROOPT_TORCH_SQRT_H
#define ZEROOPT_TORCH_SQRT_H

#include <dlfcn.h>

#include "kernels.h"

#define ZK_SQRT_BLOCK 512
/* VML_HA | VML_ERRMODE_IGNORE | VML_FTZDAZ_OFF, as ATen's vml.h passes them */
#define ZK_VML_MODE ((int64_t)(0x2 | 0x100 | 0x140000))

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

/* x <- sqrt(x) in place, as torch.sqrt would; fn: zk_torch_sqrt_function(). */
static inline void zk_sqrt_block(int64_t n, float *x, zk_vml_sqrt fn) {
    if (fn)
        fn(n, x, x, ZK_VML_MODE);
    else
        zk_sqrt_hardware(n, x);
}

/* t[0] <- sqrt(t[1]): what the kernels' roots are, for the check against torch.sqrt. */
void zk_torch_sqrt(int64_t n, float *const *t, const double *h, double *out, int threads) {
    (void)h, (void)out, (void)threads;
    zk_vml_sqrt fn = zk_torch_sqrt_function();
    for (int64_t i = 0; i < n; i++) t[0][i] = t[1][i];
    for (int64_t i = 0; i < n; i += ZK_SQRT_BLOCK)
        zk_sqrt_block(n - i < ZK_SQRT_BLOCK ? n - i : ZK_SQRT_BLOCK, t[0] + i, fn);
}

#endif
