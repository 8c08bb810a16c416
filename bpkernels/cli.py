"""``bpk``: the command line of bpkernels.

``bpk train`` trains an MLP on a data set (a built-in name, a .npz/.csv file or an MNIST
folder) and prints a summary; ``bpk bench`` times every backend and peer against the GEMM
floor; ``bpk info`` describes the installation and the machine.

Every user mistake ends in one line ``bpk: error: <message>`` on stderr and exit code 2 (a
model, batch or data set too large for the memory available too);
divergence of training in exit code 3; Ctrl-C in exit code 130, SIGTERM and SIGHUP in 128 + their
number (see signals.py). Set ``BPK_DEBUG=1`` to get
the traceback of a handled error instead (for bug reports).
"""
from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Sequence

import numpy as np

import bpkernels
from . import atomic, checkpoint, cli_metrics, cli_schedule, datasets, memory
from . import distributed
from .activations import ACTIVATIONS, get_activation
from .backends import backend_names, get_backend
from .backends.base import LOSSES
from .cli_args import as_option, count, lr_schedule, positive_real, probabilities
# cmd_bench: still reached as cli.cmd_bench since the bench parser moved to cli_bench
from .cli_bench import add_bench_parser, cmd_bench, cmd_info  # noqa: F401
from .losses import check_loss, has_accuracy
from .memory import InsufficientMemory
from .model import PRECISIONS, MLP, check_dropout, resolve_dtype
from .optim import OPTIMIZERS, make_optimizer
from .signals import StopSignals
from .train import TrainingDiverged, fit

EXIT_USAGE = 2
EXIT_DIVERGED = 3
EXIT_INTERRUPTED = 130  # 128 + SIGINT, what shells report for Ctrl-C

# Defaults of `bpk train`, tuned so that the bare command reaches >= 97% test accuracy on the
# digits data in about a second of training on 2 CPU cores: 0.978..0.989 for seeds 0..4, and
# >= 0.97 for 59 of the seeds 0..59 (the odd one: 0.967, a hard test split). One wide hidden
# layer beat deeper or narrower ones and tanh; small batches give Adam, at its own default lr,
# enough steps per epoch.
DEFAULT_DATA = "digits"
DEFAULT_LAYERS = (512,)
DEFAULT_ACTIVATION = "relu"
DEFAULT_OPTIMIZER = "adam"
DEFAULT_EPOCHS = 40
DEFAULT_BATCH_SIZE = 16
DEFAULT_BACKEND = "auto"
DEFAULT_DTYPE = "float32"
DEFAULT_TEST_SIZE = 0.2

# Distributions reported by `bpk info` when installed; versions come from their metadata, so
# nothing heavy (numba, cupy, scikit-learn) is imported just to be named.
# ---------------------------------------------------------------------------- argument parsing
class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error instead of the usage block plus error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_USAGE, f"bpk: error: {message} (see '{self.prog} --help')\n")


def _layers(text: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text.replace(" ", ",").split(",") if p.strip()]
    try:
        widths = tuple(int(p) for p in parts)
    except ValueError:
        widths = ()
    if not widths or any(w < 1 for w in widths):
        raise argparse.ArgumentTypeError(
            f"hidden widths must be positive integers like 128 or 256,128, got {text!r}")
    return widths


def _label(text: str) -> int | str:
    # A CSV label column is picked by index (negative counts from the end) or by header name.
    try:
        return int(text)
    except ValueError:
        return text


def _test_size(text: str) -> float | int:
    # "0.2" is a fraction of the rows, "300" a row count, as datasets.train_test_split takes.
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a fraction in (0, 1) or a row count, got {text!r}") from None


def _build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bpk", description="Train multilayer perceptrons with bpkernels.")
    parser.add_argument("--version", action="version", version=f"bpkernels {bpkernels.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    train = commands.add_parser(
        "train", help="train an MLP on a data set and report its test metrics",
        description="Train an MLP: split the data (seeded, stratified for classes), standardize "
                    "the features from the training split, train, and print a summary.")
    data = train.add_argument_group("data")
    data.add_argument("--data", "--dataset", dest="data", default=DEFAULT_DATA, metavar="SPEC",
                      help=f"{', '.join(datasets.SPEC_NAMES)}, a .npz (arrays X, y) or .csv file, "
                           f"or a folder of MNIST IDX files (default: {DEFAULT_DATA})")
    data.add_argument("--label", type=_label, default=None, metavar="COLUMN",
                      help="label column of a CSV file: index or header name (default: last)")
    data.add_argument("--test-size", type=_test_size, default=DEFAULT_TEST_SIZE, metavar="SIZE",
                      help=f"test fraction, or row count (default: {DEFAULT_TEST_SIZE})")
    model = train.add_argument_group("model")
    model.add_argument("--layers", type=_layers, default=None, metavar="WIDTHS",
                       help="hidden layer widths, e.g. 128 or 256,128 (default: "
                            f"{','.join(map(str, DEFAULT_LAYERS))}); input and output widths "
                            "come from the data")
    model.add_argument("--activation", default=None, metavar="NAME",
                       help=f"hidden activation: {', '.join(ACTIVATIONS)} "
                            f"(default: {DEFAULT_ACTIVATION})")
    model.add_argument("--dropout", type=probabilities, default=None, metavar="P",
                       help="dropout after each hidden activation in training: one probability "
                            "in [0, 1) or one per hidden layer, e.g. 0.1 or 0.2,0.1 (default: 0)")
    model.add_argument("--norm", choices=("layer",), default=None,
                       help="layer: LayerNorm between each hidden layer's product and its "
                            "activation (default: none)")
    model.add_argument("--loss", default=None, metavar="NAME",
                       help=f"{', '.join(LOSSES)} (default: cross_entropy for integer labels, "
                            "mse for float targets)")
    model.add_argument("--backend", default=None, metavar="NAME",
                       help=f"auto, {', '.join(backend_names())} (default: {DEFAULT_BACKEND}; "
                            "with --resume, the checkpoint's backend when available)")
    model.add_argument("--dtype", default=None, metavar="DTYPE",
                       help=f"{', '.join(PRECISIONS)} (default: {DEFAULT_DTYPE})")
    model.add_argument("--seed", type=count(0), default=None,
                       help="seed of the split, the initial weights and the batch order "
                            "(default: 0; with --resume, the checkpoint's, so the test split stays unseen)")
    opt = train.add_argument_group("training")
    opt.add_argument("--optimizer", default=None, metavar="NAME",
                     help=f"{', '.join(OPTIMIZERS)} (default: {DEFAULT_OPTIMIZER}; with --resume, "
                          "the checkpoint's optimizer continues)")
    opt.add_argument("--lr", type=float, default=None,
                     help="learning rate (default: the optimizer's own, e.g. "
                          f"{make_optimizer(DEFAULT_OPTIMIZER).lr:g} for {DEFAULT_OPTIMIZER})")
    opt.add_argument("--epochs", type=count(0), default=DEFAULT_EPOCHS, metavar="N",
                     help="epochs to run, on top of a resumed checkpoint's "
                          f"(default: {DEFAULT_EPOCHS})")
    opt.add_argument("--batch-size", type=count(1), default=DEFAULT_BATCH_SIZE, metavar="N",
                     help=f"rows per step (default: {DEFAULT_BATCH_SIZE})")
    opt.add_argument("--lr-schedule", type=lr_schedule, default=None, metavar="NAME",
                     help="cosine, onecycle (per step, over the run), step:EPOCHS:GAMMA, or "
                          "plateau (x0.1 when val_loss stalls; a validation split is kept) "
                          "(default: the rate stays; with --resume, the checkpoint's continues)")
    opt.add_argument("--warmup-epochs", type=count(0), default=0, metavar="N",
                     help=f"a linear warm-up from {cli_schedule.WARMUP_START:g}x the rate over "
                          "the first N epochs, before --lr-schedule")
    opt.add_argument("--clip-grad-norm", type=positive_real, default=None, metavar="X",
                     help="scale each step's gradient down to L2 norm X where it is longer "
                          "(torch.nn.utils.clip_grad_norm_; default: no clipping)")
    opt.add_argument("--early-stopping", type=count(0), default=None, metavar="PATIENCE",
                     help="stop once val_loss of a validation split "
                          f"({cli_schedule.VALIDATION_FRACTION:.0%}% of the training rows) has not "
                          "improved for PATIENCE epochs; the best epoch's weights are kept")
    opt.add_argument("--class-weight", type=cli_metrics.class_weight, default=None,
                     metavar="WEIGHTS", help="balanced, or CLASS:WEIGHT pairs like 0:1,1:5 "
                     "(weigh the training rows by class; default: all alike)")
    opt.add_argument("--metrics", type=cli_metrics.metrics, default=None, metavar="LIST",
                     help="metrics to record per epoch (--history) and report on the test "
                     "split, like f1_macro,top5 (see docs/training.md)")
    opt.add_argument("--threads", type=count(1), default=None, metavar="N",
                     help="at most N threads for BLAS and Numba (under mpiexec: per rank; "
                          "default: as the libraries choose)")
    io = train.add_argument_group("checkpoints and output")
    io.add_argument("--save", default=None, metavar="PATH",
                    help="checkpoint written after every epoch, at the end, on Ctrl-C and "
                         "on divergence")
    io.add_argument("--resume", default=None, metavar="PATH",
                    help="continue training the model of this checkpoint")
    io.add_argument("--history", default=None, metavar="PATH",
                    help="the records of every epoch as CSV (written at the end, also after "
                         "Ctrl-C or divergence)")
    io.add_argument("--plot", default=None, metavar="PATH",
                    help="the training curves as PNG (needs matplotlib)")
    io.add_argument("--no-progress", action="store_true", help="no per-epoch progress on stderr")
    io.add_argument("--quiet", action="store_true", help="print nothing but errors")
    train.set_defaults(handler=_cmd_train)

    add_bench_parser(commands)

    info = commands.add_parser("info", help="versions, CPU, BLAS, backends and GPUs",
                               description="Describe the installation and the machine.")
    info.add_argument("--json", action="store_true", help="print the same as JSON")
    info.set_defaults(handler=cmd_info)
    return parser


# ---------------------------------------------------------------------------- bpk train
def _dropout(args: argparse.Namespace, hidden: int | None = None) -> tuple[float, ...]:
    """--dropout as MLP takes it: one value repeated over the hidden layers, or one each."""
    if hidden is None:
        hidden = len(args.layers or DEFAULT_LAYERS)
    values = args.dropout or [0.0]
    return as_option("--dropout", check_dropout, values[0] if len(values) == 1 else values,
                     hidden)


def _check_options(args: argparse.Namespace) -> None:
    """Fail on a bad name or path before spending time on loading data or training; the
    package's own checks give the messages, so they list exactly what this version knows."""
    if args.activation is not None:
        as_option("--activation", get_activation, args.activation)
    if args.loss is not None:
        as_option("--loss", check_loss, args.loss)
    if args.dtype is not None:
        as_option("--dtype", resolve_dtype, args.dtype)
    if args.optimizer is not None:
        as_option("--optimizer", make_optimizer, args.optimizer)
    if args.lr is not None:
        # Every optimizer takes the same lr range; the check is the package's.
        as_option("--lr", make_optimizer, args.optimizer or DEFAULT_OPTIMIZER, lr=args.lr)
    if args.backend is not None:
        as_option("--backend", get_backend, args.backend)
    if args.dropout is not None and args.resume is None:
        _dropout(args)
    if args.label is not None and not str(args.data).lower().endswith(".csv"):
        raise ValueError(f"--label picks a column of a .csv file; {args.data!r} is not one")
    if args.save is not None:
        target = Path(args.save)
        if target.is_dir():
            raise ValueError(f"--save {target}: is a folder; give a file path")
        if not target.parent.is_dir():
            raise FileNotFoundError(f"--save {target}: folder {target.parent} does not exist")
        _check_save_is_no_input(target, args.data)
        checkpoint.check_writable(target)  # a read-only folder, a name too long: before training
    cli_schedule.check(args)
    outputs = {"--save": args.save, "--resume": args.resume}
    for option in ("--history", "--plot"):
        path = getattr(args, option[2:])
        if path is None:
            continue
        for other, taken in outputs.items():
            if taken is not None and Path(taken).resolve() == Path(path).resolve():
                raise ValueError(f"{option} {path}: is the {other} checkpoint; give another path")
        outputs[option] = path
        _check_save_is_no_input(Path(path), args.data, option)
        atomic.check_writable(path, what=f"{option} file")
    if args.plot is not None:
        try:
            importlib.import_module("matplotlib")
        except ImportError as err:
            raise ImportError(f"--plot needs matplotlib ({err}); pip install matplotlib") from None


def _check_save_is_no_input(target: Path, data, option: str = "--save") -> None:
    """The first checkpoint would replace the data set the run reads (the --data file, or a
    file of an MNIST --data folder): refused before anything runs. Compared as files, so a
    symlink or hard link to the data is caught too."""
    source = Path(str(data))
    if not target.exists() or not source.exists():
        return  # a file about to be created, or a built-in data set: nothing to overwrite
    inputs = [p for p in source.iterdir() if p.is_file()] if source.is_dir() else [source]
    for path in inputs:
        if target.resolve() == path.resolve() or os.path.samefile(target, path):
            what = "the --data file" if path == source else f"a file of the --data folder {source}"
            raise ValueError(f"{option} {target}: is {what} of this run; writing there would "
                             f"overwrite the data set; give another path")


def _default_loss(y: np.ndarray) -> str:
    return "cross_entropy" if y.dtype.kind in "biu" else "mse"


def _output_width(y: np.ndarray, loss: str) -> int:
    """Classes for 1-D cross_entropy labels (ids 0..k-1), else the number of targets."""
    if loss == "cross_entropy" and y.ndim == 1:
        if y.dtype.kind not in "biu":
            whole = np.isfinite(y) & (y == np.round(y)) & (np.abs(y) < 2.0**63)
            row = int(np.argmin(whole))
            where = "" if whole.all() else f" (row {row} holds {y[row]})"
            raise ValueError(f"cross_entropy needs integer class labels, but the data's labels "
                             f"are floats{where}; use --loss mse for regression")
        low, high = int(y.min()), int(y.max())
        if low < 0:
            raise ValueError(f"class labels must be ids 0..k-1, found {low}")
        if high < 1:
            raise ValueError("cross_entropy needs at least 2 classes, the labels hold only class 0")
        return high + 1
    return 1 if y.ndim == 1 else int(y.shape[1])


def _resume(args: argparse.Namespace) -> tuple[MLP, str]:
    """The checkpointed model, refusing explicit options that contradict it, and why it runs
    on its backend."""
    meta, arrays = checkpoint.read(args.resume)
    model = MLP.from_state(meta, arrays, backend=args.backend)
    if args.backend is not None:
        why = _backend_reason(args.backend)
    elif model.backend.name == meta["backend"]:
        why = "the checkpoint's"
    else:
        why = f"auto: the checkpoint's {meta['backend']} is unavailable here"
    conflicts = []
    if args.layers is not None and tuple(args.layers) != tuple(model.sizes[1:-1]):
        conflicts.append(f"--layers {','.join(map(str, args.layers))} "
                         f"(checkpoint: {','.join(map(str, model.sizes[1:-1])) or 'none'})")
    if args.activation is not None and set(model.activations) != {args.activation}:
        conflicts.append(f"--activation {args.activation} "
                         f"(checkpoint: {','.join(model.activations)})")
    if args.dropout is not None and _dropout(args, len(model.sizes) - 2) != model.dropout:
        conflicts.append(f"--dropout {','.join(map(str, args.dropout))} "
                         f"(checkpoint: {','.join(map(str, model.dropout)) or 'none'})")
    if args.norm is not None and args.norm != model.norm:
        conflicts.append(f"--norm {args.norm} (checkpoint: none)")
    if args.dtype is not None and resolve_dtype(args.dtype) != model.dtype:
        conflicts.append(f"--dtype {args.dtype} (checkpoint: {model.dtype.name})")
    if conflicts:
        raise ValueError(f"--resume {args.resume}: the architecture comes from the checkpoint; "
                         f"drop {'; '.join(conflicts)}")
    return model, why


def _backend_reason(name: str) -> str:
    return "auto: the fastest available here" if name == "auto" else f"--backend {name}"


def _check_fits(model, path: str, data: str, n_features: int, n_out: int, loss: str,
                y: np.ndarray) -> None:
    # Integer labels may use fewer classes than the model has outputs (a subset of the data).
    labels = loss == "cross_entropy" and y.ndim == 1
    outputs_ok = n_out <= model.sizes[-1] if labels else n_out == model.sizes[-1]
    if model.sizes[0] != n_features or not outputs_ok:
        what = "classes" if labels else "outputs"
        raise ValueError(f"checkpoint {path} has {model.sizes[0]} inputs and {model.sizes[-1]} "
                         f"outputs, but data set {data} has {n_features} features and "
                         f"{n_out} {what}")


def _choose_optimizer(args: argparse.Namespace, model):
    """The optimizer to pass to fit(); None lets a restored optimizer continue as it was."""
    restored = model.optimizer
    if args.optimizer is None and args.lr is None:
        return None if restored is not None else make_optimizer(DEFAULT_OPTIMIZER)
    name = args.optimizer or (restored.name if restored is not None else DEFAULT_OPTIMIZER)
    fresh = make_optimizer(name, **({} if args.lr is None else {"lr": args.lr}))
    if restored is not None and restored.name == fresh.name:
        # Same kind: keep its moments and step count, only the step size may change.
        if args.lr is not None:
            restored.lr = fresh.lr
        return restored
    return fresh


class _Saver:
    """Checkpoints of one run: a fit() callback saving after every epoch, plus the last save."""

    def __init__(self, model, path: str | None) -> None:
        self.model, self.path = model, path
        self.saved_epochs: int | None = None

    def __call__(self, epoch: int, record: dict) -> None:
        self.save()  # returns None: never asks fit() to stop

    def save(self) -> None:
        if self.path is not None:
            self.model.save(self.path)
            self.saved_epochs = self.model.epochs_trained

    def final(self, restored: bool = False) -> None:
        if self.path is not None and (restored or self.saved_epochs != self.model.epochs_trained):
            self.save()


class _Records:
    """The run's History for --history and --plot: kept by a fit() callback, so that a run
    that ends in Ctrl-C or divergence leaves its records too."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.csv, self.png = args.history, args.plot
        self.history = bpkernels.History()

    def __call__(self, epoch: int, record: dict) -> None:
        self.history.epochs.append(dict(record))

    def write(self) -> None:
        if self.csv is not None:
            self.history.to_csv(self.csv)
        if self.png is not None and len(self.history):
            self.history.plot(self.png)


def _cmd_train(args: argparse.Namespace) -> int:
    from .threads import limit_threads
    with limit_threads(args.threads), _STOP:
        return _train_command(args)


_STOP = StopSignals(EXIT_INTERRUPTED)  # the run's: main() reads what stopped it


def _train_command(args: argparse.Namespace) -> int:
    memory.check_address_space_for_training(args.backend if args.resume is None else "auto")
    # --resume without --save keeps its work: the run is saved back to the resumed file.
    args.saving_back = args.resume is not None and args.save is None
    if args.saving_back:
        args.save = args.resume
    comm = distributed.launched_world()  # under `mpirun -n N` (N >= 2): data-parallel
    if comm is not None:
        distributed.use_local_gpu(comm, args.backend)
        if comm.Get_rank() != 0:
            args.quiet, args.save = True, None  # rank 0 alone prints and writes checkpoints
    # Under MPI a failure of any rank before training is raised on every rank: none waits.
    model, loss, classify, train, val, test, optimizer, why = distributed.on_every_rank(
        comm, _prepare_training, args)
    ranks = 1 if comm is None else comm.Get_size()
    sched, interval = cli_schedule.schedule(args, optimizer or model.optimizer, len(train[0]))
    if not args.quiet:
        _print_settings(args, model, loss, classify, train, test, optimizer, why, ranks, val)
    saver = _Saver(model, args.save)
    stoppers = cli_schedule.early_stopping(args)
    records = _Records(args)
    unregister = model.backend.on_compile(_CompileNotice()) if not args.quiet else None
    start = time.perf_counter()
    history = None
    try:
        history = fit(model, *train, loss=loss, optimizer=optimizer, epochs=args.epochs,
                      batch_size=args.batch_size, seed=args.seed,
                      validation_data=test if val is None else val,
                      callbacks=[records, *stoppers, saver],
                      progress=not (args.no_progress or args.quiet), comm=comm,
                      lr_scheduler=sched, lr_scheduler_interval=interval if sched else None,
                      class_weight=args.class_weight, metrics=args.metrics,
                      clip_grad_norm=args.clip_grad_norm)
    except KeyboardInterrupt:
        return _interrupted(saver)
    except TrainingDiverged as err:
        kept = ""
        if args.save:
            try:
                saver.save()  # the model holds the weights of the last finite step
                kept = f"; the last finite weights were saved to {args.save}"
            except checkpoint.CheckpointError as refused:  # (never, while the latch holds)
                kept = f"; {refused}"
        _error(f"{err}{kept}")
        return EXIT_DIVERGED
    finally:
        if unregister is not None:
            unregister()
        if history is None and (comm is None or comm.Get_rank() == 0):
            records.write()  # what the epochs run before Ctrl-C or divergence recorded
    seconds = time.perf_counter() - start
    if comm is None or comm.Get_rank() == 0:
        records.history = history
        records.write()
    saver.final(restored=bool(stoppers))  # early stopping may have restored the best weights
    if not args.quiet:
        _print_summary(args, model, loss, train, test, history, seconds, saver)
    return 0


class _CompileNotice:
    """The backend's on_compile callback: says once, when compiling starts, why the first
    epoch is slow (a cached model loads its kernels and never calls it)."""

    TEXT = "compiling kernels for this model, first run only"

    def __init__(self) -> None:
        self.said = False

    def __call__(self) -> None:
        if not self.said:
            self.said = True
            print(self.TEXT, flush=True)


def _prepare_training(args: argparse.Namespace) -> tuple:
    """The options checked, the data loaded, split and standardized, the model built or
    resumed and the optimizer chosen: (model, loss, classify, train, validation split or None,
    test, optimizer, why)."""
    _check_options(args)
    # The checkpoint before the data: a bad --resume fails before the data is loaded.
    model, why = _resume(args) if args.resume else (None, "")
    if args.seed is None:
        # A resumed run must split as the first did, or it would train on its old test rows.
        args.seed = model.seed if model is not None else 0
    X, y = datasets.load(args.data, label=-1 if args.label is None else args.label, seed=args.seed)
    loss = args.loss or _default_loss(y)
    n_out = _output_width(y, loss)
    classify = has_accuracy(loss, n_out)
    stratify = classify and y.ndim == 1 and y.dtype.kind in "biu"
    X_tr, X_te, y_tr, y_te = datasets.train_test_split(X, y, args.test_size, seed=args.seed,
                                                       stratify=stratify)
    val = None
    if cli_schedule.needs_validation(args):
        X_tr, X_val, y_tr, y_val = datasets.train_test_split(
            X_tr, y_tr, cli_schedule.VALIDATION_FRACTION, seed=args.seed, stratify=stratify)
        X_tr, X_val, X_te = datasets.standardize(X_tr, X_val, X_te)
        val = (X_val, y_val)
    else:
        X_tr, X_te = datasets.standardize(X_tr, X_te)
    if model is None:
        why = _backend_reason(args.backend or DEFAULT_BACKEND)
        model = MLP([X.shape[1], *(args.layers or DEFAULT_LAYERS), n_out],
                    activation=args.activation or DEFAULT_ACTIVATION,
                    backend=args.backend or DEFAULT_BACKEND, dtype=args.dtype or DEFAULT_DTYPE,
                    seed=args.seed, dropout=_dropout(args), norm=args.norm)
    else:
        _check_fits(model, args.resume, args.data, X.shape[1], n_out, loss, y)
    optimizer = _choose_optimizer(args, model)
    return model, loss, classify, (X_tr, y_tr), val, (X_te, y_te), optimizer, why


def _interrupted(saver: _Saver) -> int:
    what, code = _STOP.outcome()
    if saver.path is None:
        _error(f"{what}; nothing saved (no --save given)", prefix="bpk:")
        return code
    try:
        saver.save()
    except KeyboardInterrupt:
        # A second Ctrl-C: the atomic save left the previous checkpoint (if any) intact.
        _error(f"{_STOP.outcome()[0]} twice; {saver.path} holds the last completed save",
               prefix="bpk:")
        return _STOP.outcome()[1]
    # Saved as trained so far: an unfinished epoch's steps are in the weights, but it is not
    # counted, so --resume runs that epoch again in full.
    _error(f"{what}; model saved to {saver.path} as trained so far "
           f"({saver.model.epochs_trained} complete epochs)", prefix="bpk:")
    return code


def _print_settings(args, model, loss: str, classify: bool, train, test, optimizer, why: str,
                    ranks: int, val=None) -> None:
    """What the run will do, on stdout before the first epoch: data, model, backend and why,
    dtype, threads, optimizer, checkpoint. Lines fit 80 columns but for long paths."""
    from .threads import get_num_threads
    X_tr, X_te = train[0], test[0]
    n_out = model.sizes[-1]
    outputs = f"{n_out} classes" if classify and n_out > 1 else \
        f"{n_out} output{'s' if n_out > 1 else ''}"
    hidden = ",".join(map(str, model.sizes[1:-1])) or "none"
    activation = ",".join(model.activations) or "no"
    threads = get_num_threads()
    whose = f"--threads {args.threads}" if args.threads else "the libraries' default"
    per_rank = ", per rank" if ranks > 1 else ""
    opt = optimizer if optimizer is not None else model.optimizer
    restored = " (the checkpoint's, continued)" if opt is model.optimizer else ""
    lines = [
        f"data set: {args.data} ({X_tr.shape[0] + X_te.shape[0]} rows, {X_tr.shape[1]} "
        f"features, {outputs})",
        f"split: {X_tr.shape[0]} train / " + ("" if val is None else f"{len(val[0])} "
                                                  "validation / ") +
        f"{X_te.shape[0]} test (seed {args.seed})",
        f"model: sizes {list(model.sizes)} (hidden {hidden}, {activation} activation), "
        f"{model.n_params:,} parameters",
        f"backend: {model.backend.name} ({why})",
        f"dtype: {model.dtype.name}",
        f"threads: {threads} ({whose}{per_rank})",
        f"optimizer: {_optimizer_text(opt)}{restored}",
        f"loss: {loss}, {args.epochs} epoch{'s' if args.epochs != 1 else ''} of batch "
        f"{args.batch_size}" + (f", {model.epochs_trained} trained before" if args.resume else ""),
    ]
    schedule = cli_schedule.describe(args)
    if schedule is not None:
        lines.append(f"learning rate: {schedule}")
    elif args.resume and model.lr_scheduler is not None:
        lines.append(f"learning rate: {type(model.lr_scheduler).__name__} (the checkpoint's, "
                     "continued)")
    if args.clip_grad_norm is not None:
        lines.append(f"gradient clipping: to L2 norm {args.clip_grad_norm:g}")
    if args.early_stopping is not None:
        lines.append(f"early stopping: patience {args.early_stopping} on val_loss, the best "
                     "epoch's weights kept")
    if ranks > 1:
        lines.append(f"MPI ranks: {ranks} (data-parallel)")
    if args.save is None:
        lines.append("checkpoint: none (--save PATH keeps the model)")
    elif args.saving_back:
        lines.append(f"checkpoint: {args.save} (the resumed file), saved after every epoch")
    else:
        lines.append(f"checkpoint: {args.save}, saved after every epoch")
    print("\n".join(lines), flush=True)


def _optimizer_text(opt) -> str:
    """The optimizer's repr, or where that is long, its name with the hyper-parameters that
    differ from its class's defaults (the learning rate always)."""
    text = repr(opt)
    if len(text) <= 60:
        return text
    defaults = type(opt)().hyperparameters()
    shown = {k: v for k, v in opt.hyperparameters().items() if k == "lr" or v != defaults.get(k)}
    return f"{type(opt).__name__}({', '.join(f'{k}={v!r}' for k, v in shown.items())})"


def _print_summary(args, model, loss: str, train, test, history, seconds: float,
                   saver: "_Saver") -> None:
    """The run's results on stdout (its settings were printed before it); ``seconds`` is the
    wall time of fit() (validation and checkpoints included), samples/s the training steps'
    own throughput."""
    X_tr, y_tr = train
    train_metrics = model.evaluate(X_tr, y_tr, loss=loss)
    test_metrics = model.evaluate(*test, loss=loss, metrics=args.metrics)
    epochs_run = len(history)
    train_seconds = sum(history["seconds"]) if epochs_run else 0.0
    rate = X_tr.shape[0] * epochs_run / train_seconds if train_seconds > 0 else 0.0
    lines = [
        f"epochs: {epochs_run} run, {model.epochs_trained} in total",
        f"final train loss: {train_metrics['loss']:.4f}",
        f"test loss: {test_metrics['loss']:.4f}",
    ]
    if "accuracy" in test_metrics:
        lines.append(f"train accuracy: {train_metrics['accuracy']:.4f}")
        lines.append(f"test accuracy: {test_metrics['accuracy']:.4f}")
    more = cli_metrics.summary_line(test_metrics, args.metrics)
    lines += [more] if more else []
    if history.stopped_epoch is not None:
        lines.append(f"early stopping: stopped after epoch {history.stopped_epoch}, kept the "
                     f"weights of epoch {history.best_epoch} (best val_loss)")
    elif history.best_epoch is not None:
        lines.append(f"early stopping: did not stop; kept the weights of epoch "
                     f"{history.best_epoch} (best val_loss)")
    lines.append(f"seconds: {seconds:.2f}")
    lines.append(f"samples/s: {rate:,.0f}")
    if saver.saved_epochs is not None:
        back = " (the resumed file)" if args.saving_back else ""
        lines.append(f"checkpoint: saved to {saver.path}{back}, {saver.saved_epochs} epochs "
                     "in total")
    print("\n".join(lines), flush=True)


# ---------------------------------------------------------------------------- entry point
def _error(message: str, prefix: str = "bpk: error:") -> None:
    if distributed.launched_rank() not in (None, 0):
        return  # under mpirun, rank 0 reports: errors reach every rank alike (see _cmd_train)
    # Exactly one line, whatever the message holds.
    text = " ".join(str(message).split("\n")).strip()
    print(f"{prefix} {text}", file=sys.stderr, flush=True)


def _message(err: BaseException) -> str:
    # KeyError's str() is the repr of its key, quotes included; show the text itself.
    if isinstance(err, KeyError) and len(err.args) == 1 and isinstance(err.args[0], str):
        return err.args[0]
    return str(err) or type(err).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``bpk`` with ``argv`` (default: the process arguments); returns the exit code."""
    parser = _build_parser()
    _STOP.signum = None
    try:
        args = parser.parse_args(argv)
    except SystemExit as done:  # --help, --version and usage errors (already printed)
        return done.code if isinstance(done.code, int) else (0 if done.code is None else EXIT_USAGE)
    try:
        return args.handler(args)
    except KeyboardInterrupt:
        what, code = _STOP.outcome()
        _error(what, prefix="bpk:")
        return code
    except TrainingDiverged as err:  # raised outside fit(): not expected, but never a traceback
        _error(_message(err))
        return EXIT_DIVERGED
    except MemoryError as err:
        # InsufficientMemory names the sizes; an allocation that failed anyway (NumPy's own
        # message names the array) is still one line: the model, batch or data is too large.
        if os.environ.get("BPK_DEBUG"):
            raise
        _error(str(err) if isinstance(err, InsufficientMemory) else memory.out_of_memory(err))
        return EXIT_USAGE
    except (ValueError, TypeError, ImportError, OSError, KeyError) as err:
        # User mistakes (bad names, paths, files, data, missing extras); the package's
        # messages name what was wrong. BPK_DEBUG=1 shows where, for bug reports.
        if os.environ.get("BPK_DEBUG"):
            raise
        _error(_message(err))
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
