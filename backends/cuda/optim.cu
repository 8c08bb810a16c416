// The divergence latch, the optimizer updates and the weighting of a data-parallel gradient, each
// one launch over the whole flat buffer.
//
// The latch covers the update: each rule is one __device__ function of an element (its new values,
// written only when asked), run by two kernels launched in turn. <rule>_check writes nothing and
// sets halted to the step if any new value (weight or state) would not be finite; <rule>_step
// then writes them, unless halted. The same arithmetic both times, so they cannot disagree; the
// cost is one more read of the buffers per step, no host round trip.
//
// Everything that changes from step to step is read on the device, so that one captured graph
// replays every step: the step number (from step_dev when given, for Adam's bias corrections
// and SGD's first momentum step), the latch `halted` (an update is a no-op once it is set) and
// the hyper-parameters (`hp`, a small device array: a new learning rate needs no re-capture).
// Element updates follow torch.optim and round as the NumPy backend does: each scalar
// hyper-parameter is rounded to the element type before use, bias corrections are formed in
// double.
#include "common.cuh"

// halted[0] = step if it is 0 and the loss (loss[slot]) or any gradient is not finite. One
// atomicCAS per bad element: the first step to find one wins, later steps never clear it.
// With clip (gradient clipping, backends/base.py: {sum of squares, max norm, then scratch}),
// the grid is CLIP_THREADS threads, and thread t also writes the sum, in double, of the squares
// of its gradients (k = t mod CLIP_THREADS) to clip[2 + t]; norm_groups and norm_total then add
// those up. Deterministic: each sum in a fixed order, no atomic adds (and no shared memory or
// warp shuffles: the CPU stand-in runs a grid serially).
extern "C" __global__ void check_step(const real* loss, const i64* slot, const real* grads,
                                      i64 size, i64 step, const i64* step_dev,
                                      unsigned long long* halted, double* clip) {
    if (*halted) return;
    unsigned long long now = (unsigned long long)step_of(step, step_dev);
    if (blockIdx.x == 0 && threadIdx.x == 0 && !isfinite(loss[at_slot(slot)]))
        atomicCAS(halted, 0ULL, now);
    double squares = 0;
    GRID_STRIDE(k, size) {
        if (!isfinite(grads[k])) {
            atomicCAS(halted, 0ULL, now);
            return;  // (its partial sum is stale: the latched step reads none)
        }
        const double g = (double)grads[k];
        squares += g * g;
    }
    if (clip) clip[2 + (i64)blockIdx.x * blockDim.x + threadIdx.x] = squares;
}

// Under clipping, after check_step: CLIP_GROUPS threads, thread t adding CLIP_THREADS /
// CLIP_GROUPS of its partial sums, in order, into clip[2 + CLIP_THREADS + t].
extern "C" __global__ void norm_groups(double* clip) {
    const i64 per = CLIP_THREADS / CLIP_GROUPS;
    GRID_STRIDE(t, CLIP_GROUPS) {
        double total = 0;
        for (i64 i = t * per; i < (t + 1) * per; ++i) total += clip[2 + i];
        clip[2 + CLIP_THREADS + t] = total;
    }
}

// Then one thread: clip[0] = the sum of the groups (inf where it overflows; stale after a
// latched check_step, whose updates are skipped). The updates' checks latch an inf.
extern "C" __global__ void norm_total(double* clip) {
    if (blockIdx.x != 0 || threadIdx.x != 0) return;
    double total = 0;
    for (int t = 0; t < CLIP_GROUPS; ++t) total += clip[2 + CLIP_THREADS + t];
    clip[0] = total;
}

// torch.nn.utils.clip_grad_norm_'s factor of every gradient, rounded to the element type; 1
// without clipping (an exact multiply).
__device__ __forceinline__ real clip_coefficient(const double* clip) {
    if (!clip) return (real)1;
    return (real)fmin(1.0, clip[1] / (sqrt(clip[0]) + CLIP_EPS));
}

// Before a data-parallel step's gradient all-reduce (bpkernels.distributed, NCCL): grads *= weight,
// this rank's rows over the batch's, so that the sum over the ranks is the whole batch's gradient.
// A non-finite loss on this rank (loss[0]) makes the factor NaN: the sum is then NaN on every rank
// and every rank's check_step halts at this step, although only this rank saw the bad loss.
// weight 0 (a rank without rows this step) writes zeros, whatever stale values grads holds. The
// factor is rounded to the element type before use, as NumPy's grads *= factor does.
extern "C" __global__ void weigh_grads(real* grads, i64 size, const real* loss, double weight) {
    const bool none = weight == 0;
    const real factor = (real)(weight + 0.0 * (double)loss[0]);  // 0 * inf and 0 * NaN are NaN
    GRID_STRIDE(k, size) {
        grads[k] = none ? (real)0 : grads[k] * factor;
    }
}

// The device step counter of a captured epoch: {step within the epoch, optimizer step}, both
// advanced at the end of every step.
extern "C" __global__ void advance_step(i64* counter) {
    if (blockIdx.x == 0 && threadIdx.x == 0) {
        counter[0] += 1;
        counter[1] += 1;
    }
}

// Marks the step in halted when a new value is not finite: the first step to find one wins.
#define LATCH_UNLESS(ok)                                                                    \
    if (!(ok)) {                                                                            \
        atomicCAS(halted, 0ULL, (unsigned long long)step_of(step, step_dev));               \
        return;                                                                             \
    }

// A per-step schedule's rate row (backends/base.py): rates + 2 * (*rate_slot) (the step's row
// of the epoch's table, when the graph reads the step from the device counter) or rates itself
// (the per-kernel path's row); null without a schedule. {learning rate, the rule's momentum}
// replace hp's, so a new rate each step needs no upload.
__device__ __forceinline__ const double* rate_of(const double* rates, const i64* rate_slot) {
    return rates ? rates + 2 * at_slot(rate_slot) : rates;
}

// A norm that is not finite (its sum of squares overflowed) latches the step in every
// <rule>_check: max_norm / inf would silently scale the gradient to 0.
#define LATCH_UNLESS_FINITE_NORM(clip) LATCH_UNLESS(!(clip) || isfinite((clip)[0]))

// hp = {lr, momentum, dampening, nesterov, weight_decay}, slots HP_SGD_* (base.RULES["sgd"]).
// buf is null without momentum.
struct Sgd {
    real lr, momentum, keep, weight_decay, coef;
    bool dampened, nesterov, decay, first;
};

__device__ __forceinline__ Sgd sgd_rule(const double* hp, i64 t, const double* clip,
                                        const double* rate) {
    const double dampening = hp[HP_SGD_DAMPENING], wd = hp[HP_SGD_WEIGHT_DECAY];
    Sgd r;
    r.lr = (real)(rate ? rate[0] : hp[HP_SGD_LR]);
    r.momentum = (real)(rate ? rate[1] : hp[HP_SGD_MOMENTUM]);
    r.keep = (real)(1.0 - dampening);
    r.weight_decay = (real)wd;
    r.dampened = dampening != 0;
    r.nesterov = hp[HP_SGD_NESTEROV] != 0;
    r.decay = wd != 0;
    r.first = t == 1;
    r.coef = clip_coefficient(clip);
    return r;
}

// Element k's update; writes it when `write`; returns whether every new value is finite.
__device__ __forceinline__ bool sgd_at(const Sgd& r, real* p, const real* g, real* buf, i64 k,
                                       bool write) {
    const real gk = g[k] * r.coef;
    real d = r.decay ? p[k] * r.weight_decay + gk : gk;  // torch: decay before momentum
    real b = 0;
    if (buf) {
        b = r.first ? d : buf[k] * r.momentum + (r.dampened ? d * r.keep : d);
        d = r.nesterov ? d + b * r.momentum : b;
    }
    const real w = p[k] - d * r.lr;
    if (write) {
        if (buf) buf[k] = b;
        p[k] = w;
    }
    return isfinite(w) && isfinite(b);
}

extern "C" __global__ void sgd_check(real* p, const real* g, real* buf, i64 size,
                                     const double* hp, const double* clip, const double* rates,
                                     const i64* rate_slot, i64 step, const i64* step_dev,
                                     unsigned long long* halted) {
    if (*halted) return;
    LATCH_UNLESS_FINITE_NORM(clip);
    const Sgd r = sgd_rule(hp, step_of(step, step_dev), clip, rate_of(rates, rate_slot));
    GRID_STRIDE(k, size) { LATCH_UNLESS(sgd_at(r, p, g, buf, k, false)); }
}

extern "C" __global__ void sgd_step(real* p, const real* g, real* buf, i64 size,
                                    const double* hp, const double* clip, const double* rates,
                                    const i64* rate_slot, i64 step, const i64* step_dev,
                                    const i64* halted) {
    if (*halted) return;
    const Sgd r = sgd_rule(hp, step_of(step, step_dev), clip, rate_of(rates, rate_slot));
    GRID_STRIDE(k, size) { sgd_at(r, p, g, buf, k, true); }
}

// hp = {lr, beta1, beta2, eps, weight_decay, decoupled}, slots HP_ADAM_*: Adam (L2 added to the
// gradient) or AdamW (decoupled = 1: the weights decay directly).
struct Adam {
    real shrink, weight_decay, b1, b2, eps, one_minus_b1, one_minus_b2, step_size,
        root_correction, coef;
    bool decoupled, l2;
};

__device__ __forceinline__ Adam adam_rule(const double* hp, i64 step, const double* clip,
                                          const double* rate) {
    const double t = (double)step;
    const double lr = rate ? rate[0] : hp[HP_ADAM_LR];
    const double beta1 = rate ? rate[1] : hp[HP_ADAM_BETA1], beta2 = hp[HP_ADAM_BETA2];
    const double weight_decay = hp[HP_ADAM_WEIGHT_DECAY];
    Adam r;
    r.decoupled = hp[HP_ADAM_DECOUPLED] != 0 && weight_decay != 0;
    r.l2 = weight_decay != 0 && hp[HP_ADAM_DECOUPLED] == 0;
    r.shrink = (real)(1.0 - lr * weight_decay);
    r.weight_decay = (real)weight_decay;
    r.b1 = (real)beta1;
    r.b2 = (real)beta2;
    r.eps = (real)hp[HP_ADAM_EPS];
    r.one_minus_b1 = (real)(1.0 - beta1);
    r.one_minus_b2 = (real)(1.0 - beta2);
    r.step_size = (real)(lr / (1.0 - pow(beta1, t)));
    r.root_correction = (real)sqrt(1.0 - pow(beta2, t));
    r.coef = clip_coefficient(clip);
    return r;
}

__device__ __forceinline__ bool adam_at(const Adam& r, real* p, const real* g, real* m, real* v,
                                        i64 k, bool write) {
    real w = p[k];
    if (r.decoupled) w *= r.shrink;
    const real gk = g[k] * r.coef;
    const real grad = r.l2 ? w * r.weight_decay + gk : gk;
    const real mk = m[k] * r.b1 + grad * r.one_minus_b1;
    const real vk = v[k] * r.b2 + grad * grad * r.one_minus_b2;
    // torch divides sqrt(v) by sqrt(bias correction) before adding eps: kept for parity.
    const real denom = sqrt(vk) / r.root_correction + r.eps;
    w = w - mk / denom * r.step_size;
    if (write) {
        m[k] = mk;
        v[k] = vk;
        p[k] = w;
    }
    return isfinite(w) && isfinite(mk) && isfinite(vk);
}

extern "C" __global__ void adam_check(real* p, const real* g, real* m, real* v, i64 size,
                                      const double* hp, const double* clip, const double* rates,
                                      const i64* rate_slot, i64 step, const i64* step_dev,
                                      unsigned long long* halted) {
    if (*halted) return;
    LATCH_UNLESS_FINITE_NORM(clip);
    const Adam r = adam_rule(hp, step_of(step, step_dev), clip, rate_of(rates, rate_slot));
    GRID_STRIDE(k, size) { LATCH_UNLESS(adam_at(r, p, g, m, v, k, false)); }
}

extern "C" __global__ void adam_step(real* p, const real* g, real* m, real* v, i64 size,
                                     const double* hp, const double* clip, const double* rates,
                                     const i64* rate_slot, i64 step, const i64* step_dev,
                                     const i64* halted) {
    if (*halted) return;
    const Adam r = adam_rule(hp, step_of(step, step_dev), clip, rate_of(rates, rate_slot));
    GRID_STRIDE(k, size) { adam_at(r, p, g, m, v, k, true); }
}

// hp = {lr, alpha, eps, weight_decay, momentum, centered}, slots HP_RMSPROP_*. buf is null
// without momentum, grad_avg null unless centered. (RMSprop reads no step number: rmsprop_check
// takes one only to latch it.)
struct RmsProp {
    real lr, alpha, one_minus_alpha, eps, weight_decay, momentum, coef;
    bool decay;
};

__device__ __forceinline__ RmsProp rmsprop_rule(const double* hp, const double* clip,
                                                const double* rate) {
    const double a = hp[HP_RMSPROP_ALPHA], wd = hp[HP_RMSPROP_WEIGHT_DECAY];
    RmsProp r;
    r.lr = (real)(rate ? rate[0] : hp[HP_RMSPROP_LR]);
    r.alpha = (real)a;
    r.one_minus_alpha = (real)(1.0 - a);
    r.eps = (real)hp[HP_RMSPROP_EPS];
    r.weight_decay = (real)wd;
    r.momentum = (real)(rate ? rate[1] : hp[HP_RMSPROP_MOMENTUM]);
    r.decay = wd != 0;
    r.coef = clip_coefficient(clip);
    return r;
}

__device__ __forceinline__ bool rmsprop_at(const RmsProp& r, real* p, const real* g,
                                           real* square_avg, real* buf, real* grad_avg, i64 k,
                                           bool write) {
    const real gk = g[k] * r.coef;
    const real grad = r.decay ? p[k] * r.weight_decay + gk : gk;
    const real sq = square_avg[k] * r.alpha + grad * grad * r.one_minus_alpha;
    real avg, ga = 0;
    if (grad_avg) {
        ga = grad_avg[k] * r.alpha + grad * r.one_minus_alpha;
        avg = sqrt(sq - ga * ga);
    } else {
        avg = sqrt(sq);
    }
    real update = grad / (avg + r.eps);
    if (buf) update = buf[k] * r.momentum + update;
    const real w = p[k] - update * r.lr;
    if (write) {
        square_avg[k] = sq;
        if (grad_avg) grad_avg[k] = ga;
        if (buf) buf[k] = update;
        p[k] = w;
    }
    return isfinite(w) && isfinite(sq) && isfinite(ga) && isfinite(update);
}

extern "C" __global__ void rmsprop_check(real* p, const real* g, real* square_avg, real* buf,
                                         real* grad_avg, i64 size, const double* hp,
                                         const double* clip, const double* rates,
                                         const i64* rate_slot, i64 step, const i64* step_dev,
                                         unsigned long long* halted) {
    if (*halted) return;
    LATCH_UNLESS_FINITE_NORM(clip);
    const RmsProp r = rmsprop_rule(hp, clip, rate_of(rates, rate_slot));
    GRID_STRIDE(k, size) { LATCH_UNLESS(rmsprop_at(r, p, g, square_avg, buf, grad_avg, k, false)); }
}

extern "C" __global__ void rmsprop_step(real* p, const real* g, real* square_avg, real* buf,
                                        real* grad_avg, i64 size, const double* hp,
                                        const double* clip, const double* rates,
                                        const i64* rate_slot, const i64* halted) {
    if (*halted) return;
    const RmsProp r = rmsprop_rule(hp, clip, rate_of(rates, rate_slot));
    GRID_STRIDE(k, size) { rmsprop_at(r, p, g, square_avg, buf, grad_avg, k, true); }
}
