"""fit() and the EpochLoop it drives: batches, shuffling, epochs, validation, callbacks and
the per-epoch history.

The hot loop only launches kernels on buffers allocated before the first epoch: the step's
loss and hit count go to per-step device slots, divergence is latched on the device, and the
host reads them once per epoch.
"""
from __future__ import annotations

import functools
import math
import signal
import threading
import time
from typing import TYPE_CHECKING, Any, Callable, Iterable

import numpy as np

from . import interop, memory
from .interop import ArrayLike
from .model import CHUNK_ROWS, NORM_EPS
from .backends.base import BOUNDS, CLIP_SLOTS, OPTIMIZER_RULES, RATE_MOMENTUM, EpochPlan
from .history import History
from .progress import Progress
from .lr_scheduler import LRScheduler
from .losses import check_loss, has_accuracy
from .optim import Adam, Optimizer, make_optimizer
from .threads import limit_threads
from .validation import check_bool, check_ordered, check_positive_int, check_real
from .metrics import MetricPlan, check_metrics
from .metrics import values as metric_values
from .weights import DeviceWeights, row_weights, step_totals

if TYPE_CHECKING:
    from .distributed import DataParallel
    from .model import MLP


class TrainingDiverged(FloatingPointError):
    """The loss, a gradient or a step's update (a new weight or optimizer state value) became NaN
    or inf; the model keeps the last finite step's weights and optimizer state."""

    # Under MPI the divergence latch is agreed: every rank halts at the same step and raises
    # this alike, so distributed.abort_job_on_failure lets it through instead of aborting.
    raised_on_every_rank = True

    def __init__(self, epoch: int, step: int, global_step: int) -> None:
        self.epoch, self.step, self.global_step = epoch, step, global_step
        super().__init__(f"training diverged at epoch {epoch}, step {step} (optimizer step "
                         f"{global_step}): the loss, a gradient or the update is not finite; the "
                         f"weights of the last finite step are kept (try a lower learning rate)")


def _abort_job_on_failure(fit: Callable) -> Callable:
    """With ``comm=``, fit runs under distributed.abort_job_on_failure (a failure on one rank
    ends the job instead of leaving the others waiting); without it, MPI is never imported."""

    @functools.wraps(fit)
    def run(*args, **kwargs):
        if kwargs.get("comm") is None:
            return fit(*args, **kwargs)
        from . import distributed
        return distributed.abort_job_on_failure(fit)(*args, **kwargs)
    return run


@_abort_job_on_failure
def fit(model: "MLP", X: ArrayLike, y: ArrayLike, *, loss: str = "cross_entropy", optimizer: str | Optimizer | None = None,
        epochs: int = 10, batch_size: int = 32, shuffle: bool = True, seed: int = 0,
        validation_data: tuple[Any, ...] | None = None,
        callbacks: Iterable[Callable[[int, dict], Any]] | None = None,
        progress: bool = False, comm: Any = None, threads: int | None = None,
        lr_scheduler: LRScheduler | None = None,
        lr_scheduler_interval: str | None = None,
        clip_grad_norm: float | None = None, sample_weight: ArrayLike | None = None,
        class_weight: Any = None, metrics: Iterable[str] | None = None) -> History:
    """Train ``model`` on X, y; returns the History of the epochs run.

    ``optimizer``: an Optimizer, a name ("sgd", "adam", "adamw", "rmsprop") or None for the
    model's own (restored from a checkpoint) or else Adam(). Batch order of epoch ``e`` is drawn
    from ``(seed, e)``, counting the epochs the model has already trained, so a resumed run
    sees the batches an uninterrupted one would. A final partial batch is trained, not dropped.
    Epochs and steps are counted from 1 in records and errors. Each callback is called as
    ``callback(epoch, record)`` after every epoch; one that returns True stops training.
    ``comm``: an mpi4py communicator (``MPI.COMM_WORLD``) to train data-parallel across its
    ranks, each calling fit() alike (see bpkernels.distributed); only rank 0 shows progress.
    ``threads``: train on at most this many threads (BLAS and Numba), restoring the counts
    found afterwards (bpkernels.threads.limit_threads); None keeps the process's count.
    ``lr_scheduler``: a schedule of bpkernels.lr_scheduler; it reads the optimizer's ``lr`` as
    its base rate when it starts (the first fit it serves) and steps after every epoch
    (``lr_scheduler_interval="epoch"``, the default) or every optimizer step (``"step"``), as
    PyTorch's ``scheduler.step()`` would; ReduceLROnPlateau steps on its ``monitor`` record once
    per epoch. The rate of each epoch is recorded as ``lr`` (per step: the epoch's last step's).
    The model keeps the schedule (``model.lr_scheduler``, saved in checkpoints): None continues
    the model's own, with its interval; set ``model.lr_scheduler = None`` to drop it.
    ``clip_grad_norm``: before each update, scale the gradient down to this L2 norm (over all
    parameters at once) where it is longer, as ``torch.nn.utils.clip_grad_norm_`` (a finite
    number > 0; None: no clipping); under MPI, the norm of the all-reduced gradient. A
    gradient whose norm is not finite (its sum of squares overflows) is divergence.
    A callback object may have ``on_fit_start(model, optimizer)`` and
    ``on_fit_end(model, history)`` hooks (see bpkernels.callbacks, EarlyStopping).
    ``sample_weight`` (one number >= 0 per row) and ``class_weight`` (a mapping class ->
    weight, or ``"balanced"``) weigh the rows (bpkernels.weights): each batch's loss is then
    ``sum(w_i l_i) / sum(w_i)``, and the History's ``loss`` and ``accuracy`` are weighted means
    over the epoch (each step's weighted mean weighed by its batch's total weight).
    ``metrics``: names of bpkernels.metrics (``"f1_macro"``, ``"top5"``, ``"r2"``, ...) added
    to every record, over the epoch's batches as trained (statistics summed on the device, read
    once per epoch), and as ``val_`` ones over ``validation_data``; weighted like the loss.
    ``validation_data``: ``(X_val, y_val)`` or ``(X_val, y_val, sample_weight_val)``, evaluated
    after every epoch into the ``val_`` records. The triple's weights (checked once, as
    ``sample_weight``, and sent to the device once) weigh ``val_loss`` and every ``val_``
    metric as ``model.evaluate(X_val, y_val, loss, sample_weight=sample_weight_val)`` does.
    ``class_weight`` weighs the training rows only (as in Keras): the validation rows are
    never class-weighted.

    X, y and validation_data may be arrays of any library (see bpkernels.interop): X already in
    the model's memory as a C-contiguous array of its dtype is trained on in place, never
    copied; any other X is converted once.

    fit() is a loop over :class:`EpochLoop`; use that directly to drive epochs one by one.
    """
    check_loss(loss)
    epochs = check_positive_int(epochs, "epochs", 0)
    batch_size = check_positive_int(batch_size, "batch_size", 1)
    seed = check_positive_int(seed, "seed", 0)
    shuffle, progress = check_bool(shuffle, "shuffle"), check_bool(progress, "progress")
    if threads is not None:
        threads = check_positive_int(threads, "threads", 1)
    clip_grad_norm = check_clip(clip_grad_norm)
    # Taken before the inputs are prepared, atomically: a check here and a mark set later
    # let two fits started together both train.
    claim = _FitClaim()
    _take(model, claim)
    try:
        X, T = model.prepare(X, y, loss)
        if sample_weight is not None:  # from any library, as y (bpkernels.interop)
            sample_weight = interop.targets(sample_weight, model.backend, "sample_weight")
        weights = row_weights(sample_weight, class_weight, T, loss, model.sizes[-1], model.storage)
        plan = check_metrics(metrics, loss, model.sizes[-1])
        if comm is not None and X.device:
            raise ValueError("fit(comm=...) takes X as a host array (each rank reads its shard of "
                             "the batches from it); device arrays are for single-process fit()")
        if validation_data is not None:
            validation_data = _check_validation(model, validation_data, loss)
        callbacks = [] if callbacks is None else check_ordered(
            callbacks, "callbacks", "a list of callables (epoch, record), called in its order")
        for cb in callbacks:
            if not callable(cb):
                raise TypeError(f"callbacks must be callables (epoch, record), "
                                f"got {type(cb).__name__}")
        if lr_scheduler is None and model.lr_scheduler is not None:  # restored: it goes on
            lr_scheduler = model.lr_scheduler
            if lr_scheduler_interval is None:
                lr_scheduler_interval = model.lr_scheduler_interval
        schedule = _Schedule.of(lr_scheduler, lr_scheduler_interval or "epoch")
        opt = _resolve_optimizer(model, optimizer)
        check_memory(model, X, T, opt, batch_size, validation_data)
        opt.bind(model)  # allocates the optimizer's state; the model takes it once training starts
        if schedule is not None:
            schedule.start(opt)
            model.lr_scheduler = schedule.scheduler
            model.lr_scheduler_interval = "step" if schedule.per_step else "epoch"

        parallel = None
        if comm is not None:
            from .distributed import DataParallel
            parallel = DataParallel(comm, model, X.data, T, loss=loss, optimizer=opt,
                                    batch_size=batch_size, epochs=epochs, shuffle=shuffle,
                                    seed=seed, row_weights=weights, metrics=plan)
        loop = EpochLoop(model, X, T, loss=loss, optimizer=opt, batch_size=batch_size,
                         parallel=parallel, clip_grad_norm=clip_grad_norm, weights=weights,
                         metrics=plan)
        model._trainer = loop  # handed over: its ``with`` needs no second claim
        model.loss = loss
        history = History()
        bar = Progress(progress and (parallel is None or parallel.rank == 0), epochs, X.rows)
        for cb in callbacks:
            if hasattr(cb, "on_fit_start"):
                cb.on_fit_start(model, opt)
        with limit_threads(threads), loop:  # threads first: a fit that cannot start changes nothing
            try:
                for _ in range(epochs):
                    if schedule is None:
                        record = loop.epoch(shuffle, seed, validation_data, bar.start())
                    else:
                        record = schedule.epoch(loop, shuffle, seed, validation_data, bar.start())
                    history.epochs.append(record)
                    bar.end(record)
                    if loop.interrupted and parallel is None:
                        raise KeyboardInterrupt
                    # every callback sees every epoch, also after one asks to stop
                    stop = any([cb(int(record["epoch"]), dict(record)) is True for cb in callbacks])
                    if parallel is not None:  # every rank stops (or acts on a Ctrl-C) alike
                        stop = parallel.agree_to_stop(stop, loop.interrupted)
                    if stop:
                        break
            finally:
                bar.close()
        for cb in callbacks:
            if hasattr(cb, "on_fit_end"):
                cb.on_fit_end(model, history)
    finally:
        _give_back(model)
    return history


class _FitClaim:
    """Who holds a model while fit() prepares its run, before its EpochLoop exists."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()


def _refuse() -> None:
    raise RuntimeError("fit() is already training this model (called from a callback, or "
                       "from another thread?); call it again once that fit() has returned")


def _check_not_training(model) -> None:
    # fit()'s own loop is made while fit holds the model; anyone else is refused. (A
    # callback cannot pass for fit: by then fit has handed the model to its loop.)
    trainer = model._trainer
    if model.training and not (isinstance(trainer, _FitClaim)
                               and trainer.thread == threading.get_ident()):
        _refuse()


def _take(model, holder) -> None:
    """Claim ``model`` for ``holder`` without waiting, or refuse: the one check that counts."""
    if not model._training_lock.acquire(blocking=False):
        _refuse()
    model._trainer = holder


def _give_back(model) -> None:
    model._trainer = None
    model._training_lock.release()


class EpochLoop:
    """The epochs of one training run of a model, one call each. fit() is a loop over it; the
    benchmark times its epochs one by one; data-parallel training plugs into it.

    It owns the run's device-side state, allocated once on construction: the training data on
    the device (or read in place where it already lives there), the workspaces of the full and
    of the last partial batch, per-step slots for the loss and the hit count, and the latch that
    halts the steps when the loss, a gradient or an update stops being finite. The host reads these once
    per epoch. The optimizer is bound to the model on construction (its state allocated).

    Drive it so::

        X, T = model.prepare(X, y, loss)   # checked features and host targets
        loop = EpochLoop(model, X, T, loss=loss, optimizer=Adam(), batch_size=32)
        with loop:                         # the model trains: a second fit() is refused
            record = loop.epoch(shuffle=True, seed=0)   # one epoch: its History record

    ``with loop`` makes ``optimizer`` the model's, marks the model as training (``model.to()``
    and another fit() wait), reports overflow on the way to divergence once as TrainingDiverged
    rather than as warnings, and takes Ctrl-C between steps (see ``interrupted``); it may be
    entered again for later epochs. ``parallel`` is the data-parallel side of a run
    (bpkernels.distributed.DataParallel, which fit(comm=...) makes): the steps then train this
    rank's shard of each batch and all-reduce the gradients. ``clip_grad_norm``: as fit's.
    ``weights``: each row's weight (bpkernels.weights.row_weights), or None for the unweighted
    mean. ``metrics``: a bpkernels.metrics.MetricPlan (check_metrics) whose metrics each record
    adds, or None.
    """

    def __init__(self, model: "MLP", X: interop.Array, T: np.ndarray, *, loss: str,
                 optimizer: Optimizer, batch_size: int,
                 parallel: "DataParallel | None" = None,
                 clip_grad_norm: float | None = None, weights: np.ndarray | None = None,
                 metrics: MetricPlan | None = None) -> None:
        check_loss(loss)
        _check_not_training(model)
        be = self.backend = model.backend
        self.model, self.loss, self.optimizer, self.parallel = model, loss, optimizer, parallel
        check_memory(model, X, T, optimizer, batch_size)
        optimizer.bind(model)
        self.n = X.rows
        self.batch = min(check_positive_int(batch_size, "batch_size", 1), self.n)
        self.steps = math.ceil(self.n / self.batch)
        # Data in the model's memory is trained on in place: the kernels only read it.
        self.X = X.data if X.resident else be.asarray(X.data, model.storage)
        self.T = T if interop.host_backend(be) else be.asarray(T)
        rows = np.full(self.steps, self.batch, dtype=np.float64)
        rows[-1] = self.n - (self.steps - 1) * self.batch
        self.batch_rows = rows
        # The rows this process trains per step: under MPI its shard of each batch.
        self.rows = rows if parallel is None else parallel.shard_rows(rows)
        full, last = int(self.rows[0]), int(self.rows[-1])
        self.full = model.workspace(full, T.shape[1:], T.dtype)
        self.last = self.full if last == full else model.workspace(last, T.shape[1:], T.dtype)
        self.step_loss = be.zeros((self.steps,), model.storage)
        self.step_correct = be.zeros((self.steps,), model.storage)
        self.loss_slots = [self.step_loss[s:s + 1] for s in range(self.steps)]
        self.correct_slots = [self.step_correct[s:s + 1] for s in range(self.steps)]
        self.halted = be.zeros((1,), np.int64)
        # check_step's sum of squares and the max norm, read by the updates on the device
        self.clip = None
        if check_clip(clip_grad_norm) is not None:
            clip = np.zeros(2 + CLIP_SLOTS, np.float64)
            clip[1] = clip_grad_norm
            self.clip = be.asarray_resident(clip)
        # The updates' bounds (backends/base.py), where the backend keeps them: unknown (inf)
        # at the start of every epoch, since a callback may have changed the weights.
        self.bounds = self._unknown = None
        if be.keeps_bounds:
            self._unknown = be.asarray(np.full(BOUNDS, np.inf))
            self.bounds = be.zeros((BOUNDS,), np.float64)
        self.metric = has_accuracy(loss, model.sizes[-1])
        # Row weights on the device, and the batch's, gathered per step like the targets
        self.weights, self.W, self.batch_W = weights, None, (None, None)
        if weights is not None:
            if weights.shape != (self.n,):
                raise ValueError(f"weights must have shape ({self.n},), got {weights.shape}")
            self.W = be.asarray(weights, model.storage)
            full_W = be.empty((full,), model.storage)
            self.batch_W = (full_W, full_W if last == full else be.empty((last,), model.storage))
        self.grad_weights = self.rows / rows  # under MPI: what each rank's gradient weighs
        # The metrics' statistics: summed on the device over the epoch's steps, read once
        self.metrics, self.stats = metrics, None
        if metrics is not None:
            # (float64 whatever the model's dtype: float32 counts stop at 2**24 rows)
            self.stats = be.zeros((metrics.size(model.sizes[-1]),), np.float64)
            self.no_stats = be.zeros((metrics.size(model.sizes[-1]),), np.float64)
        self.backend_cache: dict = {}  # the backend's own, for the fit (see EpochPlan.cache)
        # (rates, momenta or None) of each step of the next epoch, for a per-step schedule
        self.step_rates: tuple[np.ndarray, np.ndarray | None] | None = None
        self._interrupt = _StepBoundaryInterrupt()
        self._errstate: Any = None
        self._inside = self._took = False

    @property
    def interrupted(self) -> bool:
        """Ctrl-C was pressed inside ``with loop``: the epoch stopped between two steps (or,
        under MPI, at the epoch's end, for every rank to agree on)."""
        return self._interrupt.requested

    def __enter__(self) -> "EpochLoop":
        # fit() hands its loop a model it already holds; a loop driven by hand takes it here.
        self._took = self.model._trainer is not self
        if self._took:
            _take(self.model, self)
        self._lock = self.model.backend.training_lock  # (base.py: shared scratch)
        try:
            if self._lock is not None:
                self._lock.acquire()
            try:
                self._enter()
            except BaseException:
                if self._lock is not None:
                    self._lock.release()
                raise
        except BaseException:
            if self._took:
                _give_back(self.model)
            raise
        self._inside = True
        return self

    def _enter(self) -> None:
        self._errstate = np.errstate(over="ignore", invalid="ignore", divide="ignore")
        self._errstate.__enter__()
        self._interrupt.__enter__()
        self.model.optimizer = self.optimizer  # from here on steps are taken

    def __exit__(self, *exc) -> None:
        self._inside = False
        try:
            self._interrupt.__exit__(*exc)
        finally:
            try:
                self._errstate.__exit__(*exc)
            finally:
                if self._lock is not None:
                    self._lock.release()
                if self._took:
                    _give_back(self.model)

    def epoch(self, shuffle: bool = True, seed: int = 0,
              validation_data: tuple[Any, ...] | None = None,
              on_step: Callable[[int], Any] | None = None) -> dict[str, float]:
        """Train the model's next epoch (its rows in the order drawn from ``(seed, epoch)``
        when ``shuffle``), timed, then validate on ``validation_data`` (as
        ``model.prepare`` returns it, or with a third item, the rows' weights as
        ``model.evaluate_prepared`` takes them) if given; returns the epoch's History record.
        ``on_step(rows)`` is called after each step (or once for a fused epoch)."""
        if not self._inside:
            raise RuntimeError("EpochLoop.epoch() runs inside 'with loop:'")
        shuffle, seed = check_bool(shuffle, "shuffle"), check_positive_int(seed, "seed", 0)
        model, epoch = self.model, self.model.epochs_trained
        order = np.random.default_rng([seed, epoch]).permutation(self.n) if shuffle \
            else np.arange(self.n)
        start = time.perf_counter()
        record = self._run(order, epoch, on_step)
        record["seconds"] = time.perf_counter() - start
        record["samples_per_sec"] = self.n / max(record["seconds"], 1e-12)
        if validation_data is not None:
            X_val, T_val, *weights = validation_data
            val = model.evaluate_prepared(X_val, T_val, loss=self.loss,
                                          weights=weights[0] if weights else None,
                                          metrics=self.metrics)
            record.update({f"val_{k}": v for k, v in val.items()})
        model.epochs_trained += 1
        return record

    def _run(self, order: np.ndarray, epoch: int,
             on_step: Callable[[int], Any] | None = None) -> dict[str, float]:
        """The steps of one epoch in the given row order."""
        be, opt, parallel = self.backend, self.optimizer, self.parallel
        totals = None
        if self.weights is not None:  # each step's weight, from the host copy: no device read
            totals = step_totals(self.weights, order, self.batch_rows)
        if parallel is not None:
            order = parallel.local_order(order, self.batch_rows)
            if totals is not None:  # a rank's gradient weighs its shard's share of the weight
                mine = step_totals(self.weights, order, self.rows)
                self.grad_weights = np.divide(mine, totals, out=np.zeros_like(mine),
                                              where=totals > 0)
                totals = mine
        index = be.asarray(order.astype(np.int64))
        first_step = opt.step_count + 1
        if self.stats is not None:
            be.copy(self.no_stats, self.stats)
        rates = self._upload_rates()
        if self.bounds is not None:
            be.copy(self._unknown, self.bounds)
        # The whole epoch in one call, where the backend can (not under MPI: the gradient is
        # all-reduced between backward and update).
        if parallel is None and be.train_epoch(self._plan(index, first_step, rates)):
            opt.step_count += self.steps
            if on_step is not None:
                on_step(self.n)
        else:
            self._run_steps(index, on_step, rates)
        if self.step_rates is not None:  # the optimizer ends on its last step's rate
            self._set_step_rate(self.steps - 1)
        # The one host read of the epoch.
        halted = int(be.to_host(self.halted)[0])
        if halted:
            opt.step_count = halted - 1  # the halted steps changed nothing
            raise TrainingDiverged(epoch + 1, halted - first_step + 1, halted)
        losses = be.to_host(self.step_loss).astype(np.float64)
        # Weighted: sum over steps of (step's weighted mean x step's weight) / total weight
        loss_sum = float(losses @ (self.rows if totals is None else totals))
        correct = float(be.to_host(self.step_correct).sum()) if self.metric else 0.0
        if parallel is not None:
            loss_sum, correct = parallel.end_epoch(loss_sum, correct)
        count = self.n if totals is None else float(self.weights.sum(dtype=np.float64))
        record = {"epoch": epoch + 1, "loss": loss_sum / count}
        if self.metric:
            record["accuracy"] = correct / count
        if self.metrics is not None:
            stats = be.to_host(self.stats).astype(np.float64)
            if parallel is not None:
                stats = parallel.sum_stats(stats)
            found = metric_values(self.metrics, stats, self.model.sizes[-1])
            record.update((k, v) for k, v in found.items() if k not in record)
        return record

    def _upload_rates(self) -> Any:
        """A per-step schedule's table of the epoch (EpochPlan.rates), on the device: one
        upload per epoch, read there by every step."""
        if self.step_rates is None:
            return None
        lrs, momenta = self.step_rates
        table = np.empty((self.steps, 2), np.float64)
        table[:, 0] = lrs
        opt = self.optimizer
        table[:, 1] = momenta if momenta is not None else \
            getattr(opt, RATE_MOMENTUM[OPTIMIZER_RULES[opt.name]])
        return self.backend.asarray_resident(table)

    def _set_step_rate(self, s: int) -> None:
        lrs, momenta = self.step_rates  # type: ignore[misc]
        set_rate(self.optimizer, lrs[s], None if momenta is None else momenta[s])

    def _run_steps(self, index, on_step: Callable[[int], Any] | None, rates: Any = None) -> None:
        """The steps of one epoch, kernel by kernel (``rates``: the epoch's schedule table or
        None; each step's update reads its row on the device)."""
        be, model, opt, parallel = self.backend, self.model, self.optimizer, self.parallel
        rate_rows = [None] * self.steps if rates is None else \
            [rates[s] for s in range(self.steps)]
        # check_step's clip and bounds, only where given (the contract's older signature)
        extra = {name: value for name, value in (("clip", self.clip), ("bounds", self.bounds))
                 if value is not None}
        for s in range(self.steps):
            ws = self.full if s < self.steps - 1 else self.last
            W = self.batch_W[0 if s < self.steps - 1 else 1]
            if ws.rows:  # under MPI, a short last batch can leave this rank no rows
                rows = index[s * self.full.rows:s * self.full.rows + ws.rows]
                be.take_rows(self.X, rows, ws.X)
                be.take_rows(self.T, rows, ws.T)
                if W is not None:
                    be.take_rows(self.W, rows, W)
                model.forward_backward(ws, self.loss, self.loss_slots[s], W,
                                       model.dropouts(rows, opt.step_count + 1))
                if self.metric:
                    be.count_correct(ws.A[-1], ws.T, self.correct_slots[s], W)
                if self.metrics is not None:
                    be.accumulate_stats(self.metrics.kind, ws.A[-1], ws.T, W, self.metrics.ks,
                                        self.stats)
            if parallel is not None:
                parallel.all_reduce(model.grads, self.loss_slots[s], float(self.grad_weights[s]))
            be.check_step(self.loss_slots[s], model.grads, opt.step_count + 1, self.halted,
                          **extra)
            opt.step(model, self.halted, self.clip, rate_rows[s], self.bounds)
            if on_step is not None:
                on_step(int(self.batch_rows[s]))
            if self.interrupted and parallel is None:  # under MPI: at the epoch's end
                if self.step_rates is not None:
                    self._set_step_rate(s)
                raise KeyboardInterrupt  # between steps: weights and optimizer state agree

    def _plan(self, index, first_step: int, rates: Any = None) -> EpochPlan:
        """The epoch as Backend.train_epoch sees it (the same buffers as _run_steps)."""
        model, opt = self.model, self.optimizer
        return EpochPlan(
            sizes=model.sizes, activations=model.layer_activations, params=model.params,
            grads=model.grads, X=self.X, T=self.T, order=index, batch=self.batch,
            steps=self.steps, workspaces=(self.full, self.last), loss=self.loss,
            metric=self.metric, step_loss=self.step_loss, step_correct=self.step_correct,
            halted=self.halted, optimizer=opt.name, hp=opt, state=opt.state,
            first_step=first_step, cache=self.backend_cache, W=self.W, stats=self.stats,
            metrics=None if self.metrics is None else (self.metrics.kind, self.metrics.ks),
            clip=self.clip, rates=rates,
            dropout=(model.seed, model.dropout) if any(model.dropout) else None,
            norm=None if model.norm is None else NORM_EPS, bf16=model.dtype == "bf16")


class _StepBoundaryInterrupt:
    """Ctrl-C during fit() takes effect between steps, never inside an optimizer update, so an
    interrupted run leaves weights, optimizer state and step count consistent (and a checkpoint
    saved then resumes cleanly). A second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def _handler(self, signum, frame) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def __enter__(self) -> "_StepBoundaryInterrupt":
        self.requested, self._previous = False, None
        # Signal handlers can only be set from the main thread, and only the default one is
        # replaced: an application's own SIGINT handling is left alone.
        if threading.current_thread() is threading.main_thread() and \
                signal.getsignal(signal.SIGINT) is signal.default_int_handler:
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        if self.requested and exc[0] is None:
            raise KeyboardInterrupt  # asked for during the last step or the epoch's end


def set_rate(opt: Optimizer, lr: float, momentum: float | None) -> None:
    """Give ``opt`` a schedule's learning rate (and cycled momentum: Adam's beta1)."""
    opt.lr = float(lr)
    if momentum is not None:
        if hasattr(opt, "beta1"):
            opt.beta1 = float(momentum)
        else:
            opt.momentum = float(momentum)  # type: ignore[attr-defined]


class _Schedule:
    """fit()'s side of a learning-rate schedule: the rate of each epoch, or of each step of
    the epoch ahead (computed before it, so that no step waits on the host), and the
    schedule's own step after each epoch."""

    def __init__(self, scheduler: LRScheduler, per_step: bool) -> None:
        self.scheduler, self.per_step = scheduler, per_step

    @classmethod
    def of(cls, scheduler: Any, interval: Any) -> "_Schedule | None":
        if interval not in ("epoch", "step"):
            raise ValueError(f"lr_scheduler_interval must be 'epoch' or 'step', got {interval!r}")
        if scheduler is None:
            return None
        if not isinstance(scheduler, LRScheduler):
            raise TypeError(f"lr_scheduler must be a scheduler of bpkernels.lr_scheduler, got "
                            f"{type(scheduler).__name__}")
        if interval == "step" and scheduler.per_epoch_only:
            raise ValueError(f"{type(scheduler).__name__} steps once per epoch on a record; use "
                             f"lr_scheduler_interval='epoch'")
        return cls(scheduler, interval == "step")

    def start(self, opt: Optimizer) -> None:
        self.scheduler.start(opt)

    def epoch(self, loop: "EpochLoop", shuffle: bool, seed: int, validation_data: Any,
              on_step: Any) -> dict[str, float]:
        sched, opt = self.scheduler, loop.optimizer
        if not self.per_step:
            set_rate(opt, sched.lr, sched.momentum)
            record = loop.epoch(shuffle, seed, validation_data, on_step)
            record["lr"] = opt.lr
            if sched.per_epoch_only:
                monitor = getattr(sched, "monitor")
                if monitor not in record:
                    raise KeyError(f"{type(sched).__name__} monitors {monitor!r}, which the "
                                   f"History does not record (it has {', '.join(record)}); "
                                   f"pass validation_data for val_ records")
                sched.step(record[monitor])  # type: ignore[call-arg]
            else:
                sched.step()
            return record
        before, first = sched.state_dict(), opt.step_count
        loop.step_rates = sched.rates(loop.steps)
        try:
            record = loop.epoch(shuffle, seed, validation_data, on_step)
        except BaseException:
            # The steps not taken are not scheduled: a resumed run goes on from the last one.
            sched.load_state_dict(before)
            sched.rates(opt.step_count - first)
            raise
        finally:
            loop.step_rates = None
        record["lr"] = opt.lr
        return record


def check_memory(model: "MLP", X: interop.Array, T: np.ndarray, optimizer: Optimizer,
                 batch_size: int, validation: tuple[Any, ...] | None = None) -> None:
    """InsufficientMemory, before anything is allocated, when training ``model`` on X, T cannot
    fit: the optimizer's state (unless bound already), the workspaces of the full and the last
    batch and of evaluation's chunks, the batch order, and on a host backend the training data
    in the model's dtype (a GPU backend keeps on the device only the data that fits)."""
    itemsize, n = model.storage.itemsize, X.rows
    target = T[:1].nbytes
    rows = min(batch_size, n)
    states = 0 if optimizer.bound_to(model) else len(optimizer.needed_states())
    batches = model.workspace_bytes(rows, target)
    if n % rows:
        batches += model.workspace_bytes(n % rows, target)
    device = {f"{optimizer.name} state": states * model.n_params * itemsize,
              f"workspaces for batches of {rows} rows": batches}
    if validation is not None:
        chunk = min(validation[0].rows, CHUNK_ROWS)
        device[f"evaluation workspaces of {chunk} rows"] = model.workspace_bytes(chunk, target)
    if interop.host_backend(model.backend):
        device["the batch order"] = 16 * n
        if not X.resident:
            device["the training data"] = n * model.sizes[0] * itemsize
    memory.check_on(model.backend, f"training {memory.describe(model)}", {}, device)


def check_clip(value: Any) -> float | None:
    """fit's ``clip_grad_norm``: None, or a finite number > 0."""
    if value is None:
        return None
    return check_real(value, "clip_grad_norm", 0.0, low_open=True)


def _resolve_optimizer(model, optimizer) -> Optimizer:
    if optimizer is None:
        return model.optimizer if model.optimizer is not None else Adam()
    return make_optimizer(optimizer)


def _check_validation(model, data, loss) -> tuple[Any, ...]:
    """The checked validation inputs and their host targets, prepared once for every epoch,
    and the rows' weights, where a triple gives them, sent to the device once for all epochs."""
    if not isinstance(data, (tuple, list)) or len(data) not in (2, 3):
        got = f"{len(data)} items" if isinstance(data, (tuple, list)) else type(data).__name__
        raise ValueError("validation_data must be a pair (X_val, y_val) or a triple "
                         f"(X_val, y_val, sample_weight_val), got {got}")
    X, T = model.prepare(data[0], data[1], loss)
    if len(data) == 2 or data[2] is None:  # Keras takes a None weight as unweighted too
        return X, T
    name, be = "validation_data[2]", model.backend
    w = row_weights(interop.targets(data[2], be, name), None, T, loss, model.sizes[-1],
                    model.storage, name=name, rows="validation_data")
    return X, T, DeviceWeights(w, w if interop.host_backend(be) else be.asarray(w))
