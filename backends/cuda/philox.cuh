// Dropout's random bits: Philox4x32-10 (Salmon et al., SC'11), bit for bit Random123's
// philox4x32_R(10, ctr, key) (which cuRAND's Philox4_32_10 is built on), and the keep test
// of a dropout mask.
// bpkernels/philox.py is the reference; docs/dropout.md explains the counter's layout.
//
// Included by dropout.cu; tests/test_philox.py also compiles it with test kernels (nvcc, and
// the CPU emulation) and compares it with the reference. Integer operations on 32-bit
// words only, so every backend draws the same bits, whatever the element type. The constants
// (PHILOX_*, DROPOUT_*) come as the -D defines generated from backends/base.py.
#ifndef BPK_PHILOX_CUH
#define BPK_PHILOX_CUH

#if !defined(PHILOX_M0) || !defined(PHILOX_ROUNDS) || !defined(DROPOUT_LAYER_BITS)
#error "compile with the generated defines of backends/cuda_sources.py options()"
#endif

struct philox4 {
    unsigned int v[4];
};

// The low half of a * b, and its high half in *hi. nvcc makes mul.lo and mul.hi of the 64-bit
// product (what __umulhi is); the CPU emulation, which has no __umulhi, compiles it as written.
__device__ __forceinline__ unsigned int philox_mulhilo(unsigned int a, unsigned int b,
                                                       unsigned int* hi) {
    unsigned long long product = (unsigned long long)a * b;
    *hi = (unsigned int)(product >> 32);
    return (unsigned int)product;
}

// Random123's round, with the key bumped after it (the last bump goes unused): the same as
// bumping it before every round but the first. The loop has a constant trip count: nvcc
// unrolls it (no #pragma unroll: the host compiler would warn about an unknown pragma).
__device__ __forceinline__ philox4 philox4x32(philox4 ctr, unsigned int k0, unsigned int k1) {
    for (int r = 0; r < PHILOX_ROUNDS; ++r) {
        unsigned int hi0, hi1;
        unsigned int lo0 = philox_mulhilo(PHILOX_M0, ctr.v[0], &hi0);
        unsigned int lo1 = philox_mulhilo(PHILOX_M1, ctr.v[2], &hi1);
        philox4 next = {{hi1 ^ ctr.v[1] ^ k0, lo1, hi0 ^ ctr.v[3] ^ k1, lo0}};
        ctr = next;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    return ctr;
}

// The words of units 4 * block .. 4 * block + 3 of data-set row ``row`` in hidden layer
// ``layer`` at optimizer step ``step``, under the key (k0, k1) of the model's seed. One field
// each (block, the row's low 32 bits, step, layer with the row's high bits above it), so no two
// (step, layer, row, unit) share a counter within the limits the host checks
// (bpkernels/philox.py: row < 2^48, layer < 2^DROPOUT_LAYER_BITS, block < 2^32).
__device__ __forceinline__ philox4 dropout_bits(unsigned int k0, unsigned int k1,
                                                unsigned int step, unsigned int layer,
                                                long long row, long long block) {
    unsigned long long r = (unsigned long long)row;
    philox4 ctr = {{(unsigned int)block, (unsigned int)r, step,
                    layer | ((unsigned int)(r >> 32) << DROPOUT_LAYER_BITS)}};
    return philox4x32(ctr, k0, k1);
}

// Whether the unit whose word is ``bits`` is kept: its uniform, the top DROPOUT_UNIFORM_BITS
// bits times 2^-24, is >= p. Decided in integers against threshold = ceil(p * 2^24)
// (bpkernels/philox.py keep_threshold), which is the same test without rounding p to the
// element type: float32 and float64 kernels keep the same units.
__device__ __forceinline__ bool dropout_keeps(unsigned int bits, unsigned int threshold) {
    return (bits >> (32 - DROPOUT_UNIFORM_BITS)) >= threshold;
}

#endif  // BPK_PHILOX_CUH
