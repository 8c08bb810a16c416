"""The History of a fit: one record per epoch, kept as columns, a CSV file or a figure."""
from __future__ import annotations

import csv
import io
import math
import os
from dataclasses import dataclass, field
from typing import Any, Iterable

# Records that are bookkeeping, not curves to plot.
_NOT_CURVES = ("epoch", "seconds", "samples_per_sec", "lr")


@dataclass
class History:
    """One record per epoch: epoch, loss, accuracy (classifiers), val_loss, val_accuracy,
    seconds, samples_per_sec (and lr, metrics where fit has them). ``history["loss"]`` gives
    one column as a list. ``best_epoch`` and ``stopped_epoch`` are set by early stopping
    (epoch numbers as in the records), else None."""

    epochs: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int | None = None
    stopped_epoch: int | None = None

    def __getitem__(self, key: str) -> list[float]:
        if not self.epochs or key not in self.epochs[0]:
            known = ", ".join(self.epochs[0]) if self.epochs else "nothing (no epoch ran)"
            raise KeyError(f"{key!r}; the history records: {known}")
        return [record[key] for record in self.epochs]

    def __len__(self) -> int:
        return len(self.epochs)

    def keys(self) -> list[str]:
        """The records' names, in the order of the first record (then any added later)."""
        names: dict[str, None] = {}
        for record in self.epochs:
            names.update(dict.fromkeys(record))
        return list(names)

    @property
    def history(self) -> dict[str, list[float]]:
        return self.to_dict()

    def to_dict(self) -> dict[str, list[float]]:
        """The records as columns, ``{"epoch": [...], "loss": [...], ...}`` (what
        ``pandas.DataFrame`` takes); an epoch without a record has None in its column."""
        return {key: [record.get(key) for record in self.epochs] for key in self.keys()}

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the records as CSV: a header of names, one row per epoch, numbers written so
        that they read back exactly. The file is replaced atomically; an existing one is left
        whole if writing fails."""
        from . import atomic
        text = io.StringIO()
        writer = csv.writer(text, lineterminator="\n")
        keys = self.keys()
        writer.writerow(keys)
        for record in self.epochs:
            writer.writerow(["" if record.get(k) is None else _exact(record[k]) for k in keys])
        data = text.getvalue().encode()
        atomic.write(path, lambda f: f.write(data), "history CSV")

    def plot(self, path: str | os.PathLike[str] | None = None,
             metrics: Iterable[str] | None = None) -> Any:
        """A matplotlib Figure with one panel per curve (loss first, then each metric), the
        training and validation values against the epoch, and the best epoch marked; written as
        a PNG to ``path`` when given. ``metrics`` picks the panels by name (``"loss"``,
        ``"accuracy"``, ...). Needs matplotlib (``pip install "bpkernels[bench]"``)."""
        try:
            from matplotlib.figure import Figure
        except ImportError as exc:
            raise ImportError(f"History.plot needs matplotlib ({exc}); install it with "
                              f"pip install matplotlib, or \"bpkernels[bench]\"") from None
        if not self.epochs:
            raise ValueError("the history is empty: no epoch ran, nothing to plot")
        keys = self.keys()
        curves = [k for k in keys if k not in _NOT_CURVES and not k.startswith("val_")]
        curves += [k[4:] for k in keys if k.startswith("val_") and k[4:] not in curves]
        if metrics is not None:
            if isinstance(metrics, str):
                metrics = [metrics]
            chosen = list(metrics)
            unknown = [m for m in chosen if m not in curves]
            if unknown or not chosen:
                raise ValueError(f"cannot plot {unknown or chosen!r}: the history has "
                                 f"{', '.join(curves)}")
            curves = chosen
        fig = Figure(figsize=(5.0 * len(curves), 3.6), layout="constrained")
        axes = fig.subplots(1, len(curves), squeeze=False)[0]
        epochs = self.to_dict().get("epoch") or list(range(1, len(self) + 1))
        for ax, name in zip(axes, curves):
            for key, label in ((name, "train"), (f"val_{name}", "validation")):
                if key in keys:
                    values = [math.nan if v is None else v for v in self.to_dict()[key]]
                    ax.plot(epochs, values, marker="o" if len(epochs) < 30 else None,
                            markersize=3, label=label)
            if self.best_epoch is not None:
                ax.axvline(self.best_epoch, color="0.6", linestyle="--", linewidth=1,
                           label=f"best epoch ({self.best_epoch})")
            ax.set_xlabel("epoch")
            ax.set_title(name)
            if name == "loss" and all(v > 0 for v in self[name]):
                ax.set_yscale("log")
            ax.legend()
        if path is not None:
            from . import atomic
            atomic.write(path, lambda f: fig.savefig(f, format="png", dpi=100), "plot")
        return fig


def _exact(value: Any) -> str:
    # repr of a float is the shortest string that reads back as the same float
    return repr(float(value)) if isinstance(value, float) else str(value)
