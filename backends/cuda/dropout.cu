// Dropout (inverted, as torch.nn.Dropout) of a hidden layer's output. The keep-mask is drawn
// here from Philox (philox.cuh) for (seed, step, layer, data-set row, unit), never stored: the
// backward pass draws again what the forward pass drew (docs/dropout.md).
#include "common.cuh"
#include "philox.cuh"

// out = in * noise for a batch (n rows of ``units``), noise being ``scale`` rounded to the
// element type where a unit is kept and 0 where dropped. A product, not a select: a dropped
// inf or NaN gives NaN, as PyTorch's ``input * noise`` does, so the divergence latch sees it.
// Forward passes (A, D); backward passes (dD, dD), the same kernel in place, so its noise is
// forward's by construction.
//
// One thread per (row, block of four units): one Philox call gives the four words. The batch's
// data-set rows are index[slot * stride + r] and the step is *step_dev when given (a captured
// step, replayed with the device's step counter, as gather_rows and the updates read it);
// else index is the batch's rows and step the number. threshold 0 (p = 0) keeps every unit
// and draws nothing.
extern "C" __global__ void dropout_mul(const real* in, i64 n, i64 units, const i64* index,
                                       const i64* slot, i64 stride, unsigned int k0,
                                       unsigned int k1, i64 step, const i64* step_dev,
                                       unsigned int layer, unsigned int threshold,
                                       double scale, real* out) {
    const i64* rows = index + at_slot(slot) * stride;
    const unsigned int at_step = (unsigned int)step_of(step, step_dev);  // < 2^32: host-checked
    const real kept = (real)scale;  // rounded once, as the reference rounds it to the dtype
    const i64 blocks = (units + 3) / 4;
    GRID_STRIDE(t, n * blocks) {
        i64 r = t / blocks, block = t - r * blocks;
        philox4 bits = {{0u, 0u, 0u, 0u}};  // every word kept when threshold is 0
        if (threshold) bits = dropout_bits(k0, k1, at_step, layer, rows[r], block);
        i64 first = block * 4, end = first + 4 < units ? first + 4 : units;
        for (i64 j = first; j < end; ++j) {
            real noise = dropout_keeps(bits.v[j - first], threshold) ? kept : (real)0;
            out[r * units + j] = in[r * units + j] * noise;
        }
    }
}
