// The dense layer around cuBLAS's products: bias + activation forward, the fused activation
// gradient, bias-gradient column sums, and the row gather that forms a batch on the device.
#include "common.cuh"

// Z = pre + b and A = act(Z), with pre = X @ W from cuBLAS. pre may be A or Z itself; Z is
// null when the activation's gradient needs only A.
extern "C" __global__ void bias_act_forward(const real* pre, const real* b, i64 n, i64 o,
                                            int act, real* Z, real* A) {
    GRID_STRIDE(k, n * o) {
        real z = pre[k] + b[k % o];
        if (Z) Z[k] = z;
        A[k] = activate(act, z);
    }
}

// dA *= act'(A or Z), in place: dA becomes dZ.
extern "C" __global__ void act_grad(const real* A, const real* Z, i64 size, int act,
                                    real* dA) {
    GRID_STRIDE(k, size) {
        dA[k] *= derivative(act, A[k], Z ? Z[k] : (real)0);
    }
}

// Column sums of M (n, o) in two passes without shared memory: partial[c][j] sums rows
// c * SUM_CHUNK ... + SUM_CHUNK - 1 of column j (adjacent threads read adjacent columns), then
// colsum_store adds the chunks of each column. Deterministic: a fixed order of additions.
extern "C" __global__ void colsum_chunks(const real* M, i64 n, i64 o, acc* partial) {
    i64 chunks = (n + SUM_CHUNK - 1) / SUM_CHUNK;
    GRID_STRIDE(t, chunks * o) {
        i64 c = t / o, j = t % o;
        i64 end = (c + 1) * SUM_CHUNK < n ? (c + 1) * SUM_CHUNK : n;
        acc s = 0;
        for (i64 r = c * SUM_CHUNK; r < end; ++r) s += (acc)M[r * o + j];
        partial[t] = s;
    }
}

// out[slot + j] = scale * (sum over c of partial[c][j]).
extern "C" __global__ void colsum_store(const acc* partial, i64 chunks, i64 o, double scale,
                                        real* out, const i64* slot) {
    i64 base = at_slot(slot) * o;
    GRID_STRIDE(j, o) {
        acc s = 0;
        for (i64 c = 0; c < chunks; ++c) s += partial[c * o + j];
        out[base + j] = (real)(s * scale);
    }
}

// The one-pass form for few rows (one thread per column over every row): a batch of up to a
// few dozen rows needs one launch instead of two.
extern "C" __global__ void colsum_rows(const real* M, i64 n, i64 o, double scale, real* out,
                                       const i64* slot) {
    i64 base = at_slot(slot) * o;
    GRID_STRIDE(j, o) {
        acc s = 0;
        for (i64 r = 0; r < n; ++r) s += (acc)M[r * o + j];
        out[base + j] = (real)(s * scale);
    }
}

// out (n, k) = rows index[slot * stride + r] of src (N, k): a batch of the epoch's permutation,
// the step's offset read on the device when slot is given (else index is the batch itself).
template <typename T>
__device__ __forceinline__ void gather(const T* src, i64 k, const i64* index, const i64* slot,
                                       i64 stride, i64 n, T* out) {
    const i64* rows = index + at_slot(slot) * stride;
    GRID_STRIDE(t, n * k) {
        i64 r = t / k;
        out[t] = src[rows[r] * k + (t - r * k)];
    }
}

extern "C" __global__ void gather_rows(const real* src, i64 k, const i64* index,
                                       const i64* slot, i64 stride, i64 n, real* out) {
    gather(src, k, index, slot, stride, n, out);
}

extern "C" __global__ void gather_rows_i64(const i64* src, i64 k, const i64* index,
                                           const i64* slot, i64 stride, i64 n, i64* out) {
    gather(src, k, index, slot, stride, n, out);
}

// dtype="bf16": out = the bfloat16 bits (round to nearest, ties to even) of float32 x, the
// inputs of cuBLAS's bf16 products; equal bit for bit to backends/bf16.py's to_bf16_bits.
// Adding 0x7FFF plus the lowest kept bit carries into the exponent where IEEE wants it (the
// largest floats round to infinity). NaN is kept apart: the carry would turn a payload in the
// low half into infinity, so it becomes the quiet NaN with its sign. Float in, whatever REAL
// is: the float64 module has the kernel too, unused.
__device__ __forceinline__ unsigned short bf16_bits(float x) {
    unsigned int bits = __float_as_uint(x);
    unsigned int sign = (bits >> 16) & 0x8000u;
    if ((bits & 0x7FFFFFFFu) > 0x7F800000u) return (unsigned short)(sign | BF16_QUIET_NAN);
    return (unsigned short)((bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16);
}

extern "C" __global__ void round_bf16(const float* x, i64 size, unsigned short* out) {
    GRID_STRIDE(k, size) { out[k] = bf16_bits(x[k]); }
}
