"""fit()'s progress on stderr: one line per epoch of at most 80 columns, and on a terminal a
live bar within the epoch (tqdm, where installed)."""
from __future__ import annotations

import shutil
import sys
from typing import Any, Callable


# A line a terminal of any width shows whole: the classic 80 columns.
LINE_WIDTH = 80


def epoch_line(epoch: int, epochs: int, record: dict[str, float]) -> str:
    """The one line an epoch leaves in fit(progress=True) and ``bpk train``: its number, loss,
    accuracy (classifiers), validation loss and accuracy, samples/s; at most LINE_WIDTH
    columns (the spacing, then the throughput, give way first)."""
    parts = [f"epoch {epoch}/{epochs}", f"loss {_number(record['loss'])}"]
    if "accuracy" in record:
        parts.append(f"acc {record['accuracy']:.4f}")
    if "val_loss" in record:
        parts.append(f"val_loss {_number(record['val_loss'])}")
    if "val_accuracy" in record:
        parts.append(f"val_acc {record['val_accuracy']:.4f}")
    rate = _si(record["samples_per_sec"])
    for line in ("  ".join(parts + [f"{rate} samples/s"]), " ".join(parts + [f"{rate} samples/s"]),
                 " ".join(parts + [f"{rate}/s"]), " ".join(parts)):
        if len(line) <= LINE_WIDTH:
            return line
    return line[:LINE_WIDTH]


def _number(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 1e4 else f"{value:.3e}"


def _si(value: float) -> str:
    for scale, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if value >= scale:
            return f"{value / scale:.1f}{suffix}"
    return f"{value:.0f}"


class Progress:
    """Per epoch, one line (``epoch_line``) on stderr; on a terminal, with tqdm installed, a
    live bar within the epoch, advanced by the samples of each step (host-side counting only:
    no device read) and erased when the epoch's line is printed, so a run leaves one line per
    epoch whatever the terminal's width."""

    def __init__(self, enabled: bool, epochs: int, n: int) -> None:
        self.enabled, self.epochs, self.n, self.done = enabled, epochs, n, 0
        self.bar: Any = None
        self._tqdm = None
        if enabled and sys.stderr.isatty():  # a bar in a log file is noise
            try:
                from tqdm.auto import tqdm
                self._tqdm = tqdm
            except ImportError:
                pass

    def start(self) -> Callable[[int], Any] | None:
        """Open the bar of the next epoch; returns the per-step hook (None without a bar)."""
        self.done += 1
        if self._tqdm is None:
            return None
        width = min(LINE_WIDTH, shutil.get_terminal_size().columns)
        self.bar = self._tqdm(total=self.n, unit="sample", unit_scale=True, file=sys.stderr,
                              desc=f"epoch {self.done}/{self.epochs}", ncols=width,
                              leave=False)
        return self.bar.update

    def end(self, record: dict[str, float]) -> None:
        if not self.enabled:
            return
        self.close()
        print(epoch_line(self.done, self.epochs, record), file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()  # leave=False: erases the bar
            self.bar = None
