"""``bpk train``'s schedule and early stopping: the learning-rate schedule its options name,
built once the training rows are known, and the validation split both may watch."""
from __future__ import annotations

import math
from typing import Any

from . import lr_scheduler as S
from .callbacks import EarlyStopping

# The warm-up ramps from this fraction of the rate (PyTorch's LinearLR default is 1/3; a
# warm-up is meant to start small).
WARMUP_START = 0.01
# Rows of the training split kept aside to watch, when a run needs a validation split.
VALIDATION_FRACTION = 0.1


def needs_validation(args: Any) -> bool:
    """Early stopping and the plateau schedule watch val_loss of rows not trained on (never
    the test split: that would choose by the test)."""
    return args.early_stopping is not None or (args.lr_schedule or ("",))[0] == "plateau"


def check(args: Any) -> None:
    if args.warmup_epochs and (args.lr_schedule or ("",))[0] == "plateau":
        raise ValueError("--warmup-epochs does not combine with --lr-schedule plateau, which "
                         "steps on val_loss once per epoch; drop one of them")


def schedule(args: Any, optimizer: Any, n_train: int) -> tuple[S.LRScheduler | None, str]:
    """The scheduler of --lr-schedule and --warmup-epochs, and its interval (None: the
    model's own continues, if it has one)."""
    spec = args.lr_schedule
    if spec is None and not args.warmup_epochs:
        return None, "epoch"
    if spec is not None and spec[0] == "plateau":
        return S.ReduceLROnPlateau(monitor="val_loss"), "epoch"
    steps = math.ceil(n_train / args.batch_size)
    warmup = args.warmup_epochs * steps
    rest = args.epochs * steps - warmup
    if rest < 1 and spec is not None:
        raise ValueError(f"--warmup-epochs {args.warmup_epochs} leaves none of the "
                         f"{args.epochs} epochs to --lr-schedule; give more --epochs")
    main: S.LRScheduler | None = None
    if spec is not None and spec[0] == "cosine":
        main = S.CosineAnnealingLR(rest)
    elif spec is not None and spec[0] == "onecycle":
        cycle = getattr(optimizer, "beta1", None) is not None or \
            bool(getattr(optimizer, "momentum", 0))
        main = S.OneCycleLR(optimizer.lr, total_steps=rest, cycle_momentum=cycle)
    elif spec is not None:  # ("step", epochs, gamma), stepped per optimizer step
        main = S.StepLR(spec[1] * steps, spec[2])
    if not warmup:
        return main, "step"
    ramp = S.LinearLR(WARMUP_START, 1.0, warmup)
    return (ramp if main is None else S.SequentialLR([ramp, main], [warmup])), "step"


def describe(args: Any) -> str | None:
    """The schedule line of the settings, or None without a schedule option."""
    parts = []
    if args.warmup_epochs:
        parts.append(f"linear warm-up over {args.warmup_epochs} epoch"
                     f"{'s' if args.warmup_epochs != 1 else ''} from {WARMUP_START:g}x")
    spec = args.lr_schedule
    if spec is not None:
        parts.append({"cosine": "cosine annealing to 0, per step",
                      "onecycle": "one-cycle up to the rate, per step",
                      "plateau": "x0.1 after 10 epochs without val_loss improving"}.get(
            spec[0], f"x{spec[2]:g} every {spec[1]} epochs" if spec[0] == "step" else ""))
    return ", then ".join(parts) if parts else None


def early_stopping(args: Any) -> list[EarlyStopping]:
    if args.early_stopping is None:
        return []
    return [EarlyStopping(monitor="val_loss", patience=args.early_stopping,
                          restore_best_weights=True)]
