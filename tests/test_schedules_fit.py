"""fit() with a learning-rate schedule, per epoch and per step, against a PyTorch training loop
(a test-only reference) in float64: the same network, weights, batches, optimizer and
scheduler give the same weights to 1e-9 on every backend; and a run interrupted by divergence
leaves the schedule where its last step left it."""
import numpy as np
import pytest

import bpkernels as bpk
import reference as ref
from bpkernels import lr_scheduler as S

torch = pytest.importorskip("torch")
T = torch.optim.lr_scheduler

SIZES = (5, 7, 3)
N, BATCH, EPOCHS = 50, 16, 4   # 4 steps per epoch, the last one short
STEPS = EPOCHS * -(-N // BATCH)


def _data():
    rng = np.random.default_rng(7)
    return rng.normal(size=(N, SIZES[0])), rng.integers(0, SIZES[-1], N)


def _torch_fit(weights, X, y, make_opt, make_sched, per_step, plateau=None):
    net = ref.torch_mlp(weights, "relu")
    opt = make_opt(net.parameters())
    sched = make_sched(opt)
    Xt, yt = torch.tensor(X), torch.tensor(y)
    lrs = []
    for epoch in range(EPOCHS):
        for start in range(0, N, BATCH):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(net(Xt[start:start + BATCH]),
                                                     yt[start:start + BATCH])
            loss.backward()
            opt.step()
            if per_step:
                sched.step()
        lrs.append(opt.param_groups[0]["lr"])
        if plateau is not None:
            sched.step(plateau[epoch])
        elif not per_step:
            sched.step()
    return ref.torch_mlp_weights(net)


CASES = [
    ("sgd-onecycle-step", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
     lambda: bpk.SGD(lr=0.1, momentum=0.9),
     lambda o: T.OneCycleLR(o, 0.3, total_steps=STEPS), lambda: S.OneCycleLR(0.3, STEPS), True),
    ("adamw-onecycle-step", lambda p: torch.optim.AdamW(p, lr=0.01),
     lambda: bpk.AdamW(lr=0.01),
     lambda o: T.OneCycleLR(o, 0.05, total_steps=STEPS, three_phase=True),
     lambda: S.OneCycleLR(0.05, STEPS, three_phase=True), True),
    ("sgd-warmup-cosine-step", lambda p: torch.optim.SGD(p, lr=0.2, nesterov=True, momentum=0.5),
     lambda: bpk.SGD(lr=0.2, nesterov=True, momentum=0.5),
     lambda o: T.SequentialLR(o, [T.LinearLR(o, 0.1, total_iters=3),
                                  T.CosineAnnealingLR(o, STEPS - 3)], [3]),
     lambda: S.SequentialLR([S.LinearLR(0.1, total_iters=3), S.CosineAnnealingLR(STEPS - 3)],
                            [3]), True),
    ("adam-cosine-epoch", lambda p: torch.optim.Adam(p, lr=0.02),
     lambda: bpk.Adam(lr=0.02),
     lambda o: T.CosineAnnealingLR(o, 3, 0.001), lambda: S.CosineAnnealingLR(3, 0.001), False),
    ("rmsprop-step-epoch", lambda p: torch.optim.RMSprop(p, lr=0.01, centered=True),
     lambda: bpk.RMSprop(lr=0.01, centered=True),
     lambda o: T.StepLR(o, 2, 0.5), lambda: S.StepLR(2, 0.5), False),
    ("sgd-multistep-step", lambda p: torch.optim.SGD(p, lr=0.1),
     lambda: bpk.SGD(lr=0.1),
     lambda o: T.MultiStepLR(o, [2, 5, 5, 11], 0.5), lambda: S.MultiStepLR([2, 5, 5, 11], 0.5),
     True),
]


class _Spy:
    """Wraps a backend's train_epoch: records what it answered; ``decline`` makes it decline,
    so that fit runs kernel by kernel."""

    def __init__(self, monkeypatch, backend, decline):
        self.answers, original = [], backend.train_epoch

        def train_epoch(plan):
            answer = False if decline else original(plan)
            self.answers.append(answer)
            return answer
        monkeypatch.setattr(backend, "train_epoch", train_epoch)


@pytest.mark.parametrize("path", ["fused", "kernels"])
@pytest.mark.parametrize("name,torch_opt,our_opt,torch_sched,our_sched,per_step", CASES,
                         ids=[c[0] for c in CASES])
def test_fit_with_a_schedule_trains_as_pytorch(monkeypatch, backend_name, path, name, torch_opt,
                                               our_opt, torch_sched, our_sched, per_step):
    """Through the backend's fused epoch (the Numba epoch kernel, the CUDA graphs: a per-step
    schedule's rates read on the device) and kernel by kernel."""
    X, y = _data()
    model = bpk.MLP(SIZES, backend=backend_name, dtype="float64", seed=3)
    want = _torch_fit(model.get_weights(), X, y, torch_opt, torch_sched, per_step)
    sched = our_sched()
    spy = _Spy(monkeypatch, model.backend, decline=path == "kernels")
    history = bpk.fit(model, X, y, optimizer=our_opt(), epochs=EPOCHS, batch_size=BATCH,
                      shuffle=False, lr_scheduler=sched,
                      lr_scheduler_interval="step" if per_step else "epoch")
    fused = path == "fused" and backend_name != "numpy"  # (NumPy has no fused epoch)
    assert spy.answers == [fused] * EPOCHS
    for (W, b), (Wt, bt) in zip(model.get_weights(), want):
        np.testing.assert_allclose(W, Wt, rtol=1e-9, atol=1e-12)
        np.testing.assert_allclose(b, bt, rtol=1e-9, atol=1e-12)
    assert len(history["lr"]) == EPOCHS


def test_plateau_steps_on_the_validation_record(backend_name):
    X, y = _data()
    model = bpk.MLP(SIZES, backend=backend_name, dtype="float64", seed=3)
    sched = S.ReduceLROnPlateau(patience=0, factor=0.5, monitor="val_loss", threshold=0.5)
    history = bpk.fit(model, X, y, optimizer=bpk.SGD(lr=0.1), epochs=EPOCHS, batch_size=BATCH,
                      shuffle=False, validation_data=(X, y), lr_scheduler=sched)
    want = _torch_fit(bpk.MLP(SIZES, dtype="float64", seed=3).get_weights(), X, y,
                      lambda p: torch.optim.SGD(p, lr=0.1),
                      lambda o: T.ReduceLROnPlateau(o, patience=0, factor=0.5, threshold=0.5),
                      False, plateau=history["val_loss"])
    np.testing.assert_allclose(model.get_weights()[0][0], want[0][0], rtol=1e-9, atol=1e-12)
    assert history["lr"] == [0.1, 0.1, 0.05, 0.025]  # after the first, no epoch gains 50%


def test_a_diverged_per_step_run_leaves_the_schedule_at_its_last_step():
    X, y = _data()
    X[30:] *= 1e200  # the third step's batch overflows the loss
    model = bpk.MLP(SIZES, dtype="float64", seed=3)
    sched = S.ExponentialLR(0.5)
    with pytest.raises(bpk.TrainingDiverged) as err:
        bpk.fit(model, X, y, optimizer=bpk.SGD(lr=0.1), epochs=2, batch_size=BATCH,
                shuffle=False, lr_scheduler=sched, lr_scheduler_interval="step")
    taken = err.value.global_step - 1
    assert 0 < taken < 3  # inside the first epoch, whose rates were drawn ahead
    assert model.optimizer.step_count == taken
    assert sched.last_epoch == taken and sched.lr == 0.1 * 0.5 ** taken


def test_schedule_arguments_are_checked():
    model = bpk.MLP(SIZES, dtype="float64")
    X, y = _data()
    with pytest.raises(ValueError, match="lr_scheduler_interval must be 'epoch' or 'step'"):
        bpk.fit(model, X, y, lr_scheduler=S.StepLR(2), lr_scheduler_interval="batch")
    with pytest.raises(TypeError, match="lr_scheduler must be a scheduler of"):
        bpk.fit(model, X, y, lr_scheduler=lambda e: 0.1)
    with pytest.raises(ValueError, match="steps once per epoch on a record"):
        bpk.fit(model, X, y, lr_scheduler=S.ReduceLROnPlateau(), lr_scheduler_interval="step")
    with pytest.raises(KeyError, match="pass validation_data"):
        bpk.fit(model, X, y, epochs=1, lr_scheduler=S.ReduceLROnPlateau())


@pytest.mark.parametrize("per_step", [False, True])
def test_a_checkpoint_resumes_the_schedule_exactly(tmp_path, per_step):
    X, y = _data()
    interval = "step" if per_step else "epoch"

    def schedule():
        return S.SequentialLR([S.LinearLR(0.2, total_iters=3), S.CosineAnnealingLR(9)], [3])

    whole = bpk.MLP(SIZES, dtype="float64", seed=3)
    want = bpk.fit(whole, X, y, optimizer=bpk.SGD(lr=0.1, momentum=0.9), epochs=EPOCHS,
                   batch_size=BATCH, lr_scheduler=schedule(), lr_scheduler_interval=interval)
    half = bpk.MLP(SIZES, dtype="float64", seed=3)
    first = bpk.fit(half, X, y, optimizer=bpk.SGD(lr=0.1, momentum=0.9), epochs=EPOCHS // 2,
                    batch_size=BATCH, lr_scheduler=schedule(), lr_scheduler_interval=interval)
    half.save(tmp_path / "half.npz")
    resumed = bpk.load(tmp_path / "half.npz")
    assert resumed.lr_scheduler_interval == interval
    second = bpk.fit(resumed, X, y, epochs=EPOCHS - EPOCHS // 2, batch_size=BATCH)
    for (W, b), (W2, b2) in zip(whole.get_weights(), resumed.get_weights()):
        np.testing.assert_array_equal(W, W2)
        np.testing.assert_array_equal(b, b2)
    assert first["lr"] + second["lr"] == want["lr"]
    assert resumed.lr_scheduler.state_dict() == whole.lr_scheduler.state_dict()


@pytest.mark.parametrize("graphs", [False, True], ids=["kernels", "graphs"])
def test_a_per_step_schedule_uploads_and_waits_once_per_epoch_on_the_cuda_stand_in(graphs):
    """One-cycle (rate and Adam's beta1 both change every step), with clipping: an epoch of 20
    steps after the first uploads its row order and rate table, allocates those two, and waits
    for the host only for the epoch's three reads (loss, hits, latch), through the graphs and
    kernel by kernel alike: nothing per step (cudasim's STATS count what the device did)."""
    import collections

    import cudasim
    from cudasim import shim
    if cudasim.unavailable_reason() is not None:
        pytest.skip(cudasim.unavailable_reason())
    backend = cudasim.make_backend(graphs=graphs)
    model = bpk.MLP(SIZES, backend=backend, dtype="float64", seed=3)
    X, y = _data()
    seen = []
    bpk.fit(model, X[:40], y[:40], optimizer=bpk.Adam(lr=0.01), epochs=3, batch_size=2,
            lr_scheduler=S.OneCycleLR(0.05, 60), lr_scheduler_interval="step",
            clip_grad_norm=1.0, callbacks=[lambda e, r: seen.append(collections.Counter(
                shim.STATS))])
    epoch = seen[2] - seen[1]
    assert epoch["graph_launches"] == (20 if graphs else 0)
    assert epoch["h2d"] + epoch["h2d_async"] <= 3
    assert epoch["allocations"] <= 2
    assert epoch["host_waits"] <= 3
