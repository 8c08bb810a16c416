// Shared by every kernel source: the element type, the grid-stride loop, activations.
//
// Compiled three ways from the same text: by NVRTC at run time (cupy.RawModule, the backend),
// by nvcc to PTX in CI (syntax and type check for sm_80 and sm_90), and by a host C++ compiler
// under tests/cudasim/cpu_emulation.h, which runs each grid serially on the CPU so that the
// tests execute this very code against the NumPy reference. So: no headers (NVRTC has none),
// no shared memory, no __syncthreads, no warp intrinsics: every thread's work is independent
// and a grid may run in any order, serially included. Races are settled by atomicCAS only.
#ifndef BPK_COMMON_CUH
#define BPK_COMMON_CUH

#ifndef REAL
#error "compile with -DREAL=float or -DREAL=double"
#endif

typedef REAL real;
typedef double acc;  // sums of many terms are accumulated in double for either dtype
typedef long long i64;

// Every elementwise kernel loops over its range with the grid's total thread count as the
// stride, so any launch configuration is correct (the tests launch odd ones on purpose).
#define GRID_STRIDE(i, n)                                                               \
    for (i64 i = (i64)blockIdx.x * blockDim.x + threadIdx.x; i < (i64)(n);              \
         i += (i64)blockDim.x * gridDim.x)

// Rows summed by one thread of colsum_chunks; the partial sums are then added by colsum_store.
#define SUM_CHUNK 16

// Per-step results: a kernel writes base[*slot] when given the device step counter (a captured
// graph, replayed once per step), else base[0]. The same holds for the optimizer step number.
__device__ __forceinline__ i64 at_slot(const i64* slot) { return slot ? *slot : 0; }

__device__ __forceinline__ i64 step_of(i64 step, const i64* step_dev) {
    return step_dev ? *step_dev : step;
}

// Activation codes, as cupy_backend.ACTIVATION_CODES.
#define ACT_IDENTITY 0
#define ACT_RELU 1
#define ACT_LEAKY_RELU 2
#define ACT_SIGMOID 3
#define ACT_TANH 4
#define ACT_GELU 5

#define LEAKY_SLOPE 0.01
#define SQRT_HALF 0.70710678118654752440
#define ONE_OVER_SQRT_2PI 0.39894228040143267794

// Comparisons are written so that NaN propagates as NumPy's maximum and sign do: a diverging
// step must reach check_step as NaN, not be flattened to 0 by an activation.
__device__ __forceinline__ real sign_of(real a) {
    return a > 0 ? (real)1 : (a < 0 ? (real)-1 : a);  // sign(0) = 0, sign(NaN) = NaN
}

__device__ __forceinline__ real normal_cdf(real z) {
    return ((real)1 + erf(z * (real)SQRT_HALF)) * (real)0.5;
}

__device__ __forceinline__ real activate(int act, real z) {
    switch (act) {
        case ACT_RELU: return z < 0 ? (real)0 : z;
        case ACT_LEAKY_RELU: {
            real scaled = z * (real)LEAKY_SLOPE;
            return z < scaled ? scaled : z;
        }
        // 0.5 * (1 + tanh(z / 2)) never overflows, unlike 1 / (1 + exp(-z)).
        case ACT_SIGMOID: return ((real)1 + tanh(z * (real)0.5)) * (real)0.5;
        case ACT_TANH: return tanh(z);
        case ACT_GELU: return z * normal_cdf(z);
        default: return z;
    }
}

// act'(z) from the activation's output a where that suffices; gelu needs the pre-activation z.
__device__ __forceinline__ real derivative(int act, real a, real z) {
    switch (act) {
        case ACT_RELU: return sign_of(a);  // a >= 0: the 0/1 step, 0 at z == 0 as torch
        case ACT_LEAKY_RELU: {
            real s = sign_of(a);
            s = s < 0 ? (real)0 : s;
            return s * (real)(1.0 - LEAKY_SLOPE) + (real)LEAKY_SLOPE;
        }
        case ACT_SIGMOID: return ((real)1 - a) * a;
        case ACT_TANH: return (real)1 - a * a;
        case ACT_GELU:  // d/dz z Phi(z) = Phi(z) + z phi(z)
            return normal_cdf(z) + exp(z * z * (real)-0.5) * (real)ONE_OVER_SQRT_2PI * z;
        default: return (real)1;
    }
}

#endif  // BPK_COMMON_CUH
