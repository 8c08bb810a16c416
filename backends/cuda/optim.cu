// The divergence latch, the optimizer updates and the weighting of a data-parallel gradient, each
// one launch over the whole flat buffer.
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
extern "C" __global__ void check_step(const real* loss, const i64* slot, const real* grads,
                                      i64 size, i64 step, const i64* step_dev,
                                      unsigned long long* halted) {
    if (*halted) return;
    unsigned long long now = (unsigned long long)step_of(step, step_dev);
    if (blockIdx.x == 0 && threadIdx.x == 0 && !isfinite(loss[at_slot(slot)]))
        atomicCAS(halted, 0ULL, now);
    GRID_STRIDE(k, size) {
        if (!isfinite(grads[k])) {
            atomicCAS(halted, 0ULL, now);
            return;
        }
    }
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

// hp = {lr, momentum, dampening, nesterov, weight_decay}, slots HP_SGD_* (base.RULES["sgd"]).
// buf is null without momentum.
extern "C" __global__ void sgd_step(real* p, const real* g, real* buf, i64 size,
                                    const double* hp, i64 step, const i64* step_dev,
                                    const i64* halted) {
    if (*halted) return;
    const double dampening = hp[HP_SGD_DAMPENING], wd = hp[HP_SGD_WEIGHT_DECAY];
    const real lr = (real)hp[HP_SGD_LR], momentum = (real)hp[HP_SGD_MOMENTUM];
    const real keep = (real)(1.0 - dampening);
    const bool dampened = dampening != 0, nesterov = hp[HP_SGD_NESTEROV] != 0, decay = wd != 0;
    const real weight_decay = (real)wd;
    const bool first = step_of(step, step_dev) == 1;
    GRID_STRIDE(k, size) {
        real d = decay ? p[k] * weight_decay + g[k] : g[k];  // torch: decay before momentum
        if (buf) {
            real b = first ? d : buf[k] * momentum + (dampened ? d * keep : d);
            buf[k] = b;
            d = nesterov ? d + b * momentum : b;
        }
        p[k] -= d * lr;
    }
}

// hp = {lr, beta1, beta2, eps, weight_decay, decoupled}, slots HP_ADAM_*: Adam (L2 added to the
// gradient) or AdamW (decoupled = 1: the weights decay directly).
extern "C" __global__ void adam_step(real* p, const real* g, real* m, real* v, i64 size,
                                     const double* hp, i64 step, const i64* step_dev,
                                     const i64* halted) {
    if (*halted) return;
    const double t = (double)step_of(step, step_dev);
    const double lr = hp[HP_ADAM_LR], beta1 = hp[HP_ADAM_BETA1], beta2 = hp[HP_ADAM_BETA2];
    const double weight_decay = hp[HP_ADAM_WEIGHT_DECAY];
    const bool decoupled = hp[HP_ADAM_DECOUPLED] != 0, l2 = weight_decay != 0 && !decoupled;
    const real shrink = (real)(1.0 - lr * weight_decay);
    const real b1 = (real)beta1, b2 = (real)beta2, eps = (real)hp[HP_ADAM_EPS];
    const real one_minus_b1 = (real)(1.0 - beta1), one_minus_b2 = (real)(1.0 - beta2);
    const real step_size = (real)(lr / (1.0 - pow(beta1, t)));
    const real root_correction = (real)sqrt(1.0 - pow(beta2, t));
    GRID_STRIDE(k, size) {
        real w = p[k];
        if (decoupled && weight_decay != 0) w *= shrink;
        real grad = l2 ? w * (real)weight_decay + g[k] : g[k];
        real mk = m[k] * b1 + grad * one_minus_b1;
        real vk = v[k] * b2 + grad * grad * one_minus_b2;
        m[k] = mk;
        v[k] = vk;
        // torch divides sqrt(v) by sqrt(bias correction) before adding eps: kept for parity.
        real denom = sqrt(vk) / root_correction + eps;
        p[k] = w - mk / denom * step_size;
    }
}

// hp = {lr, alpha, eps, weight_decay, momentum, centered}, slots HP_RMSPROP_*. buf is null
// without momentum, grad_avg null unless centered.
extern "C" __global__ void rmsprop_step(real* p, const real* g, real* square_avg, real* buf,
                                        real* grad_avg, i64 size, const double* hp,
                                        const i64* halted) {
    if (*halted) return;
    const double a = hp[HP_RMSPROP_ALPHA], wd = hp[HP_RMSPROP_WEIGHT_DECAY];
    const real lr = (real)hp[HP_RMSPROP_LR], alpha = (real)a, one_minus_alpha = (real)(1.0 - a);
    const real eps = (real)hp[HP_RMSPROP_EPS], weight_decay = (real)wd;
    const real momentum = (real)hp[HP_RMSPROP_MOMENTUM];
    const bool decay = wd != 0;
    GRID_STRIDE(k, size) {
        real grad = decay ? p[k] * weight_decay + g[k] : g[k];
        real sq = square_avg[k] * alpha + grad * grad * one_minus_alpha;
        square_avg[k] = sq;
        real avg;
        if (grad_avg) {
            real ga = grad_avg[k] * alpha + grad * one_minus_alpha;
            grad_avg[k] = ga;
            avg = sqrt(sq - ga * ga);
        } else {
            avg = sqrt(sq);
        }
        real update = grad / (avg + eps);
        if (buf) {
            update = buf[k] * momentum + update;
            buf[k] = update;
        }
        p[k] -= update * lr;
    }
}
