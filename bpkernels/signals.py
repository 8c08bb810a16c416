"""Stop signals of a command-line run: SIGTERM and SIGHUP handled as Ctrl-C is."""
from __future__ import annotations

import signal
import threading


class StopSignals:
    """SIGTERM and SIGHUP (a scheduler's stop, a closed terminal) act as Ctrl-C does: through
    whatever handles SIGINT now (fit's: stop at the next step boundary; a second one at once),
    so the run ends with a final loadable checkpoint. Exit code 128 + the signal's number."""

    def __init__(self, interrupted_code: int = 130) -> None:
        self.interrupted_code = interrupted_code
        self.signum: int | None = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        self.signum = None
        if threading.current_thread() is threading.main_thread():
            for name in ("SIGTERM", "SIGHUP"):
                number = getattr(signal, name, None)
                # A signal ignored on purpose (nohup) stays ignored.
                if number is not None and signal.getsignal(number) is not signal.SIG_IGN:
                    self._previous[number] = signal.signal(number, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def _handler(self, signum: int, frame) -> None:
        self.signum = signum
        on_sigint = signal.getsignal(signal.SIGINT)
        if not callable(on_sigint):
            raise KeyboardInterrupt
        on_sigint(signal.SIGINT, frame)

    def outcome(self) -> tuple[str, int]:
        """What stopped the run, for its message, and the exit code."""
        if self.signum is None:
            return "interrupted", self.interrupted_code
        return f"stopped by {signal.Signals(self.signum).name}", 128 + self.signum
