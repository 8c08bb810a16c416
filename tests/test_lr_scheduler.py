"""bpkernels.lr_scheduler against torch.optim.lr_scheduler (a test-only reference): the rate
(and one-cycle's momentum) of every step, bit for bit; saved and restored mid-schedule; and
each bad argument refused with one clear error."""
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest

from bpkernels import lr_scheduler as S

torch = pytest.importorskip("torch")
T = torch.optim.lr_scheduler

# (name, PyTorch scheduler from an optimizer, ours): argument sets that reach every branch of
# PyTorch's recursive forms (milestones given twice, T_max of 1, restarts past 2*T_max, three
# phases, a warm-up handing over at a milestone to a closed form)
CASES = [
    ("step", lambda o: T.StepLR(o, 7, 0.5), lambda: S.StepLR(7, 0.5)),
    ("step-1", lambda o: T.StepLR(o, 1), lambda: S.StepLR(1)),
    ("multistep", lambda o: T.MultiStepLR(o, [3, 3, 10, 40], 0.3),
     lambda: S.MultiStepLR([3, 3, 10, 40], 0.3)),
    ("exponential", lambda o: T.ExponentialLR(o, 0.97), lambda: S.ExponentialLR(0.97)),
    ("cosine", lambda o: T.CosineAnnealingLR(o, 13, 0.001), lambda: S.CosineAnnealingLR(13, 0.001)),
    ("cosine-1", lambda o: T.CosineAnnealingLR(o, 1), lambda: S.CosineAnnealingLR(1)),
    ("linear", lambda o: T.LinearLR(o), lambda: S.LinearLR()),
    ("linear-down", lambda o: T.LinearLR(o, 1.0, 0.05, 17), lambda: S.LinearLR(1.0, 0.05, 17)),
    ("onecycle", lambda o: T.OneCycleLR(o, 0.5, total_steps=120),
     lambda: S.OneCycleLR(0.5, total_steps=120)),
    ("onecycle-3", lambda o: T.OneCycleLR(o, 0.5, epochs=10, steps_per_epoch=12, pct_start=0.25,
                                          anneal_strategy="linear", three_phase=True,
                                          div_factor=10.0, final_div_factor=100.0,
                                          base_momentum=0.8, max_momentum=0.9),
     lambda: S.OneCycleLR(0.5, epochs=10, steps_per_epoch=12, pct_start=0.25,
                          anneal_strategy="linear", three_phase=True, div_factor=10.0,
                          final_div_factor=100.0, base_momentum=0.8, max_momentum=0.9)),
    ("onecycle-nomom", lambda o: T.OneCycleLR(o, 0.2, total_steps=120, cycle_momentum=False),
     lambda: S.OneCycleLR(0.2, total_steps=120, cycle_momentum=False)),
    ("warmup-cosine", lambda o: T.SequentialLR(o, [T.LinearLR(o, 0.1, total_iters=5),
                                                   T.CosineAnnealingLR(o, 20)], [5]),
     lambda: S.SequentialLR([S.LinearLR(0.1, total_iters=5), S.CosineAnnealingLR(20)], [5])),
    ("sequential-3", lambda o: T.SequentialLR(o, [T.ExponentialLR(o, 0.9), T.StepLR(o, 3),
                                                  T.MultiStepLR(o, [2, 9])], [4, 11]),
     lambda: S.SequentialLR([S.ExponentialLR(0.9), S.StepLR(3), S.MultiStepLR([2, 9])],
                            [4, 11])),
]
STEPS = 120


def _torch_run(make, optimizer, steps, lr=0.1):
    p = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64))
    o = (torch.optim.SGD([p], lr=lr, momentum=0.9) if optimizer == "sgd"
         else torch.optim.Adam([p], lr=lr))
    sched = make(o)
    lrs, moms = [], []
    for _ in range(steps):
        group = o.param_groups[0]
        lrs.append(group["lr"])
        moms.append(group["momentum"] if optimizer == "sgd" else group["betas"][0])
        o.step()
        sched.step()
    return np.array(lrs), np.array(moms)


def _our_optimizer(optimizer, lr=0.1):
    return (SimpleNamespace(lr=lr, momentum=0.9) if optimizer == "sgd"
            else SimpleNamespace(lr=lr, beta1=0.9))


@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
@pytest.mark.parametrize("name,make_torch,make_ours", CASES, ids=[c[0] for c in CASES])
def test_every_step_has_pytorchs_rate_and_momentum_to_the_bit(name, make_torch, make_ours,
                                                               optimizer):
    want_lr, want_mom = _torch_run(make_torch, optimizer, STEPS)
    sched = make_ours()
    sched.start(_our_optimizer(optimizer))
    lrs, moms = sched.rates(STEPS)
    np.testing.assert_array_equal(lrs, want_lr)
    if moms is None:
        assert not getattr(sched, "cycle_momentum", False)
    else:
        np.testing.assert_array_equal(moms, want_mom)


@pytest.mark.parametrize("name,make_torch,make_ours", CASES, ids=[c[0] for c in CASES])
def test_a_schedule_saved_mid_way_continues_exactly(name, make_torch, make_ours):
    want, _ = _torch_run(make_torch, "sgd", STEPS)
    first = make_ours()
    first.start(_our_optimizer("sgd"))
    head, _ = first.rates(47)
    saved = json.loads(json.dumps({"config": first.config(), "state": first.state_dict()}))
    second = S.scheduler_from_config(saved["config"])
    second.load_state_dict(saved["state"])
    second.start(_our_optimizer("sgd", lr=123.0))  # started already: the base rate is kept
    tail, _ = second.rates(STEPS - 47)
    np.testing.assert_array_equal(np.concatenate([head, tail]), want)


METRICS = [1.0, 0.9, 0.95, 0.95, 0.95, 0.89, 0.9, 0.9, 0.9, 0.9, 0.9, 0.5, 0.6, 0.7, 0.8, 0.9,
           0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]


@pytest.mark.parametrize("kwargs", [
    {}, {"patience": 2}, {"patience": 1, "cooldown": 2, "factor": 0.5},
    {"mode": "max", "patience": 1}, {"threshold_mode": "abs", "threshold": 0.05, "patience": 0},
    {"patience": 0, "min_lr": 0.02}, {"mode": "max", "threshold_mode": "abs", "patience": 1},
])
def test_reduce_on_plateau_follows_pytorch_epoch_by_epoch(kwargs):
    p = torch.nn.Parameter(torch.zeros(1))
    o = torch.optim.SGD([p], lr=0.1)
    theirs = T.ReduceLROnPlateau(o, **kwargs)
    ours = S.ReduceLROnPlateau(**kwargs)
    ours.start(_our_optimizer("sgd"))
    for i, metric in enumerate(METRICS * 2):
        assert ours.lr == o.param_groups[0]["lr"], f"epoch {i}"
        theirs.step(metric)
        ours.step(metric)
        if i == 20:  # a checkpoint in the middle
            again = S.scheduler_from_config(ours.config())
            again.load_state_dict(json.loads(json.dumps(ours.state_dict())))
            ours = again
    assert ours.lr == o.param_groups[0]["lr"]


def test_numpy_scalars_are_numbers_and_bools_are_not():
    s = S.CosineAnnealingLR(np.int64(10), np.float32(0.5))
    assert (s.T_max, s.eta_min) == (10, 0.5)
    assert S.OneCycleLR(np.float64(0.1), total_steps=np.int32(5)).total_steps == 5
    with pytest.raises(TypeError, match="T_max must be an integer, got a bool"):
        S.CosineAnnealingLR(True)
    with pytest.raises(TypeError, match="gamma must be a number, got str"):
        S.ExponentialLR("0.9")


@pytest.mark.parametrize("make,error,match", [
    (lambda: S.StepLR(0), ValueError, "step_size must be >= 1, got 0"),
    (lambda: S.StepLR(2.5), TypeError, "step_size must be an integer, got float"),
    (lambda: S.ExponentialLR(math.nan), ValueError, "gamma must be finite"),
    (lambda: S.MultiStepLR({3, 1}), TypeError, "milestones must be a sequence"),
    (lambda: S.MultiStepLR([1, -2]), ValueError, r"milestones\[\] must be >= 0"),
    (lambda: S.LinearLR(start_factor=0), ValueError, r"start_factor must lie in \(0"),
    (lambda: S.LinearLR(end_factor=1.5), ValueError, r"end_factor must lie in \[0.0, 1.0\]"),
    (lambda: S.OneCycleLR(0.1), ValueError, "needs total_steps, or epochs and steps_per_epoch"),
    (lambda: S.OneCycleLR(0.1, 10, anneal_strategy="cosine"), ValueError,
     "anneal_strategy must be one of 'cos', 'linear', got 'cosine'"),
    (lambda: S.OneCycleLR(0.0, 10), ValueError, "max_lr must lie in"),
    (lambda: S.SequentialLR([S.StepLR(2)], [3]), ValueError, "one milestone fewer than"),
    (lambda: S.SequentialLR([S.StepLR(2), S.ReduceLROnPlateau()], [3]), TypeError,
     r"schedulers\[1\] must be a scheduler other than ReduceLROnPlateau"),
    (lambda: S.SequentialLR([S.StepLR(2), S.StepLR(3), S.StepLR(4)], [5, 3]), ValueError,
     "milestones must increase"),
    (lambda: S.ReduceLROnPlateau(mode="minimum"), ValueError, "mode must be one of 'min', 'max'"),
    (lambda: S.ReduceLROnPlateau(factor=1.0), ValueError, r"factor must lie in \[0.0, 1.0\)"),
    (lambda: S.scheduler_from_config({"name": "CosineLR"}), ValueError, "unknown scheduler"),
])
def test_each_bad_argument_is_one_clear_error(make, error, match):
    with pytest.raises(error, match=match):
        make()


def test_misuse_is_named():
    with pytest.raises(RuntimeError, match="has not started"):
        S.StepLR(3).lr
    sgd = SimpleNamespace(lr=0.1, momentum=0.0)
    with pytest.raises(ValueError, match="momentum=0; give it a momentum > 0"):
        S.OneCycleLR(0.1, 10).start(sgd)
    S.OneCycleLR(0.1, 10, cycle_momentum=False).start(sgd)
    one = S.OneCycleLR(0.1, 10, cycle_momentum=False)
    one.start(sgd)
    one.rates(10)
    with pytest.raises(ValueError, match="past its total_steps=10"):
        one.step()
    plateau = S.ReduceLROnPlateau()
    plateau.start(sgd)
    with pytest.raises(TypeError, match="per-step rates"):
        plateau.rates(3)
    with pytest.raises(TypeError, match="needs the value of 'val_loss'"):
        plateau.step()
