// Compiles the production CUDA sources (backends/cuda/*.cu) as host C++ and runs a kernel's
// grid serially: every block, every thread, in order. Force-included (g++ -include) ahead of
// the source, which is compiled unchanged. Enough of CUDA for kernels that are grid-stride,
// barrier-free and settle races with atomics, which is what backends/cuda/common.cuh allows:
// a kernel that needs more (shared memory, __syncthreads, warp intrinsics) fails to compile
// here, loudly, rather than run wrongly.
#pragma once
#include <math.h>  // libstdc++'s math.h: float overloads (erf(float), ...) as CUDA provides
#include <stddef.h>
#include <string.h>
#include <type_traits>
#include <utility>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __restrict__ __restrict

struct dim3 { unsigned int x, y, z; };
struct uint3 { unsigned int x, y, z; };

// One grid runs at a time (the launcher below), so plain globals stand for the built-ins.
static uint3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;

// CUDA's bit cast of a float to its bits, as memcpy: defined behaviour
// in C++, where a pointer cast would not be.
static inline unsigned int __float_as_uint(float x) {
    unsigned int bits;
    memcpy(&bits, &x, sizeof bits);
    return bits;
}

// Serial execution: an atomic is the plain operation.
static inline unsigned long long atomicCAS(unsigned long long* address, unsigned long long compare,
                                           unsigned long long value) {
    unsigned long long old = *address;
    if (old == compare) *address = value;
    return old;
}

namespace cudasim {

// The kernel's parameters from an array of pointers to each argument, as cudaLaunchKernel
// receives them: the C++ types of the kernel decide how each is read.
template <typename... Args, size_t... I>
static void call(void (*kernel)(Args...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<typename std::remove_cv<Args>::type*>(args[I])...);
}

// dims = {grid.x, grid.y, grid.z, block.x, block.y, block.z}
template <typename... Args>
static void launch(void (*kernel)(Args...), const unsigned int* dims, void** args) {
    gridDim = {dims[0], dims[1], dims[2]};
    blockDim = {dims[3], dims[4], dims[5]};
    for (unsigned int bz = 0; bz < gridDim.z; ++bz)
        for (unsigned int by = 0; by < gridDim.y; ++by)
            for (unsigned int bx = 0; bx < gridDim.x; ++bx)
                for (unsigned int tz = 0; tz < blockDim.z; ++tz)
                    for (unsigned int ty = 0; ty < blockDim.y; ++ty)
                        for (unsigned int tx = 0; tx < blockDim.x; ++tx) {
                            blockIdx = {bx, by, bz};
                            threadIdx = {tx, ty, tz};
                            call(kernel, args, std::index_sequence_for<Args...>{});
                        }
}

template <typename T>
struct describe {  // {size, is pointer, is floating point, pointee size, pointee is float}
    typedef typename std::remove_cv<typename std::remove_pointer<T>::type>::type pointee;
    static void into(long long* out) {
        out[0] = sizeof(T);
        out[1] = std::is_pointer<T>::value;
        out[2] = std::is_floating_point<T>::value;
        out[3] = std::is_pointer<T>::value && !std::is_void<pointee>::value ? sizeof(pointee) : 0;
        out[4] = std::is_floating_point<pointee>::value;
    }
};

// The parameter list, five numbers per parameter, so the launcher in Python can check each
// argument against the kernel's own types: a wrong width or kind is caught here, where on a
// GPU it would read garbage.
template <typename... Args>
static int signature(void (*)(Args...), long long* out, int capacity) {
    const int count = sizeof...(Args);
    if (count * 5 <= capacity) {
        int i = 0;
        (void)i;
        using expand = int[];
        (void)expand{0, (describe<Args>::into(out + 5 * i++), 0)...};
    }
    return count;
}

}  // namespace cudasim

#define CUDASIM_EXPORT(name)                                                              \
    extern "C" void cudasim_launch_##name(const unsigned int* dims, void** args) {         \
        cudasim::launch(name, dims, args);                                                \
    }                                                                                     \
    extern "C" int cudasim_signature_##name(long long* out, int capacity) {               \
        return cudasim::signature(name, out, capacity);                                   \
    }
