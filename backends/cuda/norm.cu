// LayerNorm (torch.nn.LayerNorm) between a hidden layer's product H and its activation, forward
// and backward (backends/base.py: layer_norm_forward / layer_norm_backward).
//
// common.cuh's rules (no shared memory, no barriers, no warp shuffles: the CPU stand-in runs a
// grid serially) exclude the usual block-per-row reduction, so a row's statistics take a
// launch per pass instead: ``lanes`` threads per row (thread t = r * lanes + l reads columns l,
// l + lanes, ...: adjacent threads read adjacent columns) each sum their columns in double
// into part[t]; the next launch adds the row's partial sums, in lane order, where it needs
// them. Every thread of a row adds the same values in the same order, so it gets the same
// mean, and a run gives the same bits whatever the launch configuration: the host fixes
// ``lanes`` from the row's width alone.
#include "common.cuh"

// The sum over a row's lanes of part (n * lanes), in lane order.
__device__ __forceinline__ acc row_total(const acc* part, i64 r, i64 lanes) {
    acc s = 0;
    for (i64 l = 0; l < lanes; ++l) s += part[r * lanes + l];
    return s;
}

// Forward, pass 1: sums[t] = the sum of lane t's elements of H (n, o).
extern "C" __global__ void ln_forward_sums(const real* H, i64 n, i64 o, i64 lanes, acc* sums) {
    GRID_STRIDE(t, n * lanes) {
        i64 r = t / lanes;
        acc s = 0;
        for (i64 j = t - r * lanes; j < o; j += lanes) s += (acc)H[r * o + j];
        sums[t] = s;
    }
}

// Pass 2: squares[t] = the sum of lane t's squared deviations from its row's mean. Two passes,
// not E[h^2] - mean^2, which cancels catastrophically for rows far from zero.
extern "C" __global__ void ln_forward_squares(const real* H, i64 n, i64 o, i64 lanes,
                                              const acc* sums, acc* squares) {
    GRID_STRIDE(t, n * lanes) {
        i64 r = t / lanes;
        const acc mean = row_total(sums, r, lanes) / (acc)o;
        acc s = 0;
        for (i64 j = t - r * lanes; j < o; j += lanes) {
            const acc dev = (acc)H[r * o + j] - mean;
            s += dev * dev;
        }
        squares[t] = s;
    }
}

// Pass 3: rstd[r] = 1 / sqrt(var + eps) (biased variance), H = xhat = (H - mean) * rstd in
// place and A = act(xhat * gamma + beta). rstd and xhat are formed in double and rounded once;
// N = xhat * gamma + beta in the element type, as the reference rounds it.
extern "C" __global__ void ln_forward_apply(real* H, const real* gamma, const real* beta, i64 n,
                                            i64 o, i64 lanes, const acc* sums,
                                            const acc* squares, double eps, int act,
                                            real* rstd, real* A) {
    GRID_STRIDE(t, n * lanes) {
        i64 r = t / lanes, l = t - r * lanes;
        const acc mean = row_total(sums, r, lanes) / (acc)o;
        const acc inv = 1.0 / sqrt(row_total(squares, r, lanes) / (acc)o + eps);
        if (l == 0) rstd[r] = (real)inv;
        for (i64 j = l; j < o; j += lanes) {
            const i64 k = r * o + j;
            const real xhat = (real)(((acc)H[k] - mean) * inv);
            H[k] = xhat;
            A[k] = activate(act, xhat * gamma[j] + beta[j]);
        }
    }
}

// Backward, pass 1: dA = g = dA * act'(N) in place (act' from A, or from N = xhat * gamma +
// beta recomputed for the activations whose derivative needs the input), and per lane the
// sums of d = g * gamma and of d * xhat, in double: sums[t] and sums[n * lanes + t].
extern "C" __global__ void ln_backward_sums(real* dA, const real* A, const real* H,
                                            const real* gamma, const real* beta, i64 n, i64 o,
                                            i64 lanes, int act, acc* sums) {
    GRID_STRIDE(t, n * lanes) {
        i64 r = t / lanes;
        acc sd = 0, sdx = 0;
        for (i64 j = t - r * lanes; j < o; j += lanes) {
            const i64 k = r * o + j;
            const real g = dA[k] * derivative(act, A[k], H[k] * gamma[j] + beta[j]);
            dA[k] = g;
            const real d = g * gamma[j];
            sd += (acc)d;
            sdx += (acc)d * (acc)H[k];
        }
        sums[t] = sd;
        sums[n * lanes + t] = sdx;
    }
}

// Pass 2 (after the column sums below have read g): dA = rstd * (d - mean(d) - xhat *
// mean(d * xhat)), d = g * gamma rounded as pass 1 rounded it, formed in double and rounded once.
extern "C" __global__ void ln_backward_apply(real* dA, const real* H, const real* gamma,
                                             const real* rstd, i64 n, i64 o, i64 lanes,
                                             const acc* sums) {
    GRID_STRIDE(t, n * lanes) {
        i64 r = t / lanes;
        const acc mean_d = row_total(sums, r, lanes) / (acc)o;
        const acc mean_dx = row_total(sums + n * lanes, r, lanes) / (acc)o;
        const acc scale = (acc)rstd[r];
        for (i64 j = t - r * lanes; j < o; j += lanes) {
            const i64 k = r * o + j;
            const real d = dA[k] * gamma[j];
            dA[k] = (real)(scale * ((acc)d - mean_d - (acc)H[k] * mean_dx));
        }
    }
}

// dgamma = sum over rows of g * xhat and dbeta = sum of g (G = g, H = xhat, both (n, o)), as
// dense.cu sums db: deterministic, a fixed order of additions and no atomics. Few rows: one
// thread per column over every row.
extern "C" __global__ void ln_param_grads_rows(const real* G, const real* H, i64 n, i64 o,
                                               real* dgamma, real* dbeta) {
    GRID_STRIDE(j, o) {
        acc sg = 0, sgx = 0;
        for (i64 r = 0; r < n; ++r) {
            sg += (acc)G[r * o + j];
            sgx += (acc)G[r * o + j] * (acc)H[r * o + j];
        }
        dgamma[j] = (real)sgx;
        dbeta[j] = (real)sg;
    }
}

// Many rows, in two launches: partial[c][j] and partial[chunks * o + c * o + j] sum rows
// c * SUM_CHUNK ... + SUM_CHUNK - 1 of column j of g * xhat and of g; then ln_param_grads_store
// adds each column's chunks in order.
extern "C" __global__ void ln_param_grads_chunks(const real* G, const real* H, i64 n, i64 o,
                                                 acc* partial) {
    const i64 chunks = (n + SUM_CHUNK - 1) / SUM_CHUNK;
    GRID_STRIDE(t, chunks * o) {
        i64 c = t / o, j = t - c * o;
        i64 end = (c + 1) * SUM_CHUNK < n ? (c + 1) * SUM_CHUNK : n;
        acc sg = 0, sgx = 0;
        for (i64 r = c * SUM_CHUNK; r < end; ++r) {
            sg += (acc)G[r * o + j];
            sgx += (acc)G[r * o + j] * (acc)H[r * o + j];
        }
        partial[t] = sgx;
        partial[chunks * o + t] = sg;
    }
}

extern "C" __global__ void ln_param_grads_store(const acc* partial, i64 chunks, i64 o,
                                                real* dgamma, real* dbeta) {
    GRID_STRIDE(j, o) {
        acc sgx = 0, sg = 0;
        for (i64 c = 0; c < chunks; ++c) {
            sgx += partial[c * o + j];
            sg += partial[chunks * o + c * o + j];
        }
        dgamma[j] = (real)sgx;
        dbeta[j] = (real)sg;
    }
}
