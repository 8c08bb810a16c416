// Loss value and gradient in one pass, one thread per row (rows are short: the outputs of a
// network), and the per-row hits of count_correct. Each writes a per-row value, which
// colsum_chunks / colsum_store (dense.cu) then sum into the step's slot: every row's loss is
// complete before any summing, so large terms cancel within a row, never in the totals.
#include "common.cuh"

// max of a row, NaN-propagating (NumPy's max): a NaN logit must give a NaN loss.
__device__ __forceinline__ real row_max(const real* y, i64 o) {
    real m = y[0];
    for (i64 j = 1; j < o; ++j) m = (y[j] > m || y[j] != y[j]) && m == m ? y[j] : m;
    return m;
}

// First index of the row's maximum, as NumPy's argmax (a NaN counts as the maximum).
__device__ __forceinline__ i64 row_argmax(const real* y, i64 o) {
    i64 best = 0;
    for (i64 j = 1; j < o && y[best] == y[best]; ++j)
        if (y[j] > y[best] || y[j] != y[j]) best = j;
    return best;
}

// Writes dY's row as exp(y - max) and returns log sum exp(y - max): max-subtraction keeps
// exp finite.
__device__ __forceinline__ acc softmax_numerators(const real* y, i64 o, real m, real* d,
                                                  acc* sum) {
    acc s = 0;
    for (i64 j = 0; j < o; ++j) {
        acc e = exp((acc)y[j] - (acc)m);
        d[j] = (real)e;
        s += e;
    }
    *sum = s;
    return log(s);
}

// Softmax cross-entropy with int64 labels: loss_i = max - y_label + log sum exp(y - max);
// dY = (softmax - one_hot) * grad_scale (1 / n).
extern "C" __global__ void xent_labels(const real* Y, const i64* labels, i64 n, i64 o,
                                       real grad_scale, real* dY, real* row_loss) {
    GRID_STRIDE(i, n) {
        const real* y = Y + i * o;
        real* d = dY + i * o;
        real m = row_max(y, o);
        acc s;
        acc log_norm = softmax_numerators(y, o, m, d, &s);
        i64 t = labels[i];
        for (i64 j = 0; j < o; ++j) {
            acc p = (acc)d[j] / s;
            d[j] = (real)(j == t ? p - 1 : p) * grad_scale;
        }
        row_loss[i] = t >= 0 && t < o ? (real)((acc)m - (acc)y[t] + log_norm) : (real)nan("");
    }
}

// Softmax cross-entropy with probability rows T: loss_i = -sum_j t_ij log_softmax_ij;
// dY = (softmax * sum_j t_ij - T) * grad_scale.
extern "C" __global__ void xent_probs(const real* Y, const real* T, i64 n, i64 o,
                                      real grad_scale, real* dY, real* row_loss) {
    GRID_STRIDE(i, n) {
        const real* y = Y + i * o;
        const real* t = T + i * o;
        real* d = dY + i * o;
        real m = row_max(y, o);
        acc s;
        acc log_norm = softmax_numerators(y, o, m, d, &s);
        acc t_sum = 0, loss = 0;
        for (i64 j = 0; j < o; ++j) {
            t_sum += t[j];
            loss -= (acc)t[j] * ((acc)y[j] - (acc)m - log_norm);
        }
        for (i64 j = 0; j < o; ++j)
            d[j] = (real)((acc)d[j] / s * t_sum - (acc)t[j]) * grad_scale;
        row_loss[i] = (real)loss;
    }
}

// Sigmoid BCE on logits, per element max(y, 0) - y t + log(1 + exp(-|y|)): finite for any y.
// dY = (sigmoid(y) - t) * grad_scale (1 / (n o)).
extern "C" __global__ void bce(const real* Y, const real* T, i64 n, i64 o, real grad_scale,
                               real* dY, real* row_loss) {
    GRID_STRIDE(i, n) {
        acc loss = 0;
        for (i64 k = i * o; k < (i + 1) * o; ++k) {
            acc y = Y[k], t = T[k];
            loss += (y > 0 ? y : 0) - y * t + log1p(exp(-fabs(y)));
            real sig = ((real)1 + tanh(Y[k] * (real)0.5)) * (real)0.5;
            dY[k] = (sig - T[k]) * grad_scale;
        }
        row_loss[i] = (real)loss;
    }
}

// Mean squared error: loss_i = sum_j (y - t)^2; dY = (y - t) * grad_scale (2 / (n o)).
extern "C" __global__ void mse(const real* Y, const real* T, i64 n, i64 o, real grad_scale,
                               real* dY, real* row_loss) {
    GRID_STRIDE(i, n) {
        acc loss = 0;
        for (i64 k = i * o; k < (i + 1) * o; ++k) {
            real diff = Y[k] - T[k];
            loss += (acc)diff * (acc)diff;
            dY[k] = diff * grad_scale;
        }
        row_loss[i] = (real)loss;
    }
}

// hit[i] = 1 when row i is classified right: argmax(Y_i) == label, or for one output
// (Y > 0) == (label >= 0.5).
extern "C" __global__ void correct_labels(const real* Y, const i64* labels, i64 n, i64 o,
                                          real* hit) {
    GRID_STRIDE(i, n) {
        bool right = o == 1 ? (Y[i] > 0) == (labels[i] >= 1)
                            : row_argmax(Y + i * o, o) == labels[i];
        hit[i] = right ? (real)1 : (real)0;
    }
}

// The same with target rows T (n, o): argmax against argmax, or for one output
// (Y > 0) == (T >= 0.5).
extern "C" __global__ void correct_rows(const real* Y, const real* T, i64 n, i64 o, real* hit) {
    GRID_STRIDE(i, n) {
        bool right = o == 1 ? (Y[i] > 0) == (T[i] >= (real)0.5)
                            : row_argmax(Y + i * o, o) == row_argmax(T + i * o, o);
        hit[i] = right ? (real)1 : (real)0;
    }
}

// Row weights (sample and class weights) after a loss or hit kernel: each row i of M (n, o)
// and of row (n,), when given, is multiplied by w[i] / total[0], or by w[i] alone where total
// is null (hits). The loss kernels ran with the unweighted per-row gradient scale, so dY
// becomes the gradient of sum(w_i l_i) / sum(w_i), and the colsum of row the weighted mean.
// A batch of zero total weight contributes nothing: its rows become 0 (not 0 / 0 = NaN).
extern "C" __global__ void weigh_rows(const real* w, const real* total, i64 n, i64 o, real* M,
                                      real* row) {
    GRID_STRIDE(i, n) {
        real f;
        if (!total) f = w[i];
        else f = total[0] > 0 ? w[i] / total[0] : (real)0;
        bool none = total && !(total[0] > 0);
        if (M)
            for (i64 j = i * o; j < (i + 1) * o; ++j) M[j] = none ? (real)0 : M[j] * f;
        if (row) row[i] = none ? (real)0 : row[i] * f;
    }
}

// Metric statistics (Backend.accumulate_stats) in two passes without atomics. First, per row
// (one thread each), s = rowstat + i * (2 + nks): its true class, its predicted class (the
// first maximum, or y > 0 for one output) and, per k of ks, 1 where the true class ranks among
// the k largest outputs (ties: a larger index first, as scikit-learn's top_k_accuracy_score).
__device__ __forceinline__ void class_row(const real* y, i64 o, i64 t, const i64* ks, i64 nks,
                                          real* s) {
    i64 p = o == 1 ? (y[0] > 0 ? 1 : 0) : row_argmax(y, o);
    i64 rank = 0;
    if (nks > 0)
        for (i64 j = 0; j < o; ++j) rank += y[j] > y[t] || (y[j] == y[t] && j > t);
    s[0] = (real)t;
    s[1] = (real)p;
    for (i64 k = 0; k < nks; ++k) s[2 + k] = rank < ks[k] ? (real)1 : (real)0;
}

extern "C" __global__ void class_rows_labels(const real* Y, const i64* labels, i64 n, i64 o,
                                             const i64* ks, i64 nks, real* rowstat) {
    GRID_STRIDE(i, n) {
        i64 t = o == 1 ? (labels[i] >= 1 ? 1 : 0) : labels[i];
        class_row(Y + i * o, o, t, ks, nks, rowstat + i * (2 + nks));
    }
}

extern "C" __global__ void class_rows_probs(const real* Y, const real* T, i64 n, i64 o,
                                            const i64* ks, i64 nks, real* rowstat) {
    GRID_STRIDE(i, n) {
        i64 t = o == 1 ? (T[i] >= (real)0.5 ? 1 : 0) : row_argmax(T + i * o, o);
        class_row(Y + i * o, o, t, ks, nks, rowstat + i * (2 + nks));
    }
}

// Then one thread per statistic, over every row (w null: each row weighs 1): out[t * C + p]
// += the weight of rows of true class t predicted p, out[C*C + c] += rows of true class c,
// out[C*C + C + c] += rows predicted c, out[C*C + 2C + k] += the weight of the top-k hits.
extern "C" __global__ void class_stats_add(const real* rowstat, const real* w, i64 n, i64 width,
                                           i64 C, acc* out) {
    GRID_STRIDE(s, C * C + 2 * C + width - 2) {
        acc sum = 0;
        for (i64 r = 0; r < n; ++r) {
            const real* row = rowstat + r * width;
            i64 t = (i64)row[0], p = (i64)row[1];
            acc wr = w ? (acc)w[r] : (acc)1;
            if (s < C * C) sum += t * C + p == s ? wr : 0;
            else if (s < C * C + C) sum += t == s - C * C ? 1 : 0;
            else if (s < C * C + 2 * C) sum += p == s - C * C - C ? 1 : 0;
            else sum += wr * (acc)row[2 + s - C * C - 2 * C];
        }
        out[s] += sum;
    }
}

// Regression statistics, one thread per statistic: out[0] += sum w; per output j,
// out[1 + j] += sum w |y - t|, out[1 + o + j] += sum w (y - t)^2, out[1 + 2o + j] += sum w t,
// out[1 + 3o + j] += sum w t^2.
extern "C" __global__ void regression_stats_add(const real* Y, const real* T, const real* w,
                                                i64 n, i64 o, acc* out) {
    GRID_STRIDE(s, 1 + 4 * o) {
        acc sum = 0;
        i64 part = s == 0 ? -1 : (s - 1) / o, j = s == 0 ? 0 : (s - 1) % o;
        for (i64 r = 0; r < n; ++r) {
            acc wr = w ? (acc)w[r] : (acc)1;
            acc t = T[r * o + j], e = (acc)Y[r * o + j] - t;
            acc v = part < 0 ? 1 : part == 0 ? fabs(e) : part == 1 ? e * e : part == 2 ? t : t * t;
            sum += wr * v;
        }
        out[s] += sum;
    }
}
