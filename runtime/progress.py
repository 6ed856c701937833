"""The one progress helper of every command that makes a person wait: `==> STAGE [elapsed, ETA] what` on
stderr, one line per step (a terminal and a log file read the same), nothing under `--quiet`.

    with Progress("bench").ticking() as p:   # a line whenever nothing was said for HEARTBEAT_S seconds
        p.log("single-stream")               # a step starts
        p.eta(41.0)                          # the caller's measured estimate of the seconds left
        p.count(320, 1000, "images")         # a counted step, at most a line every COUNT_EVERY_S seconds

While ticking, the `edgexfer` logger's lines count as output and name the step a heartbeat repeats, so a long
step that logs nothing (a scikit-learn fit, an ONNX Runtime calibration) still says every few seconds that it
runs. Standard library only (the runtime install)."""
from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time

HEARTBEAT_S = 5.0   # a line at least this often while a stage runs (the bound a person waits for: 10 s)
COUNT_EVERY_S = 2.0


def _secs(s: float) -> str:
    s = max(0.0, s)
    return f"{s:.0f} s" if s < 90 else f"{int(s // 60)} min {int(s % 60):02d} s"


class Progress:
    """Progress lines of one command. `of`: the number of steps, for an ETA from the mean step when the steps
    are alike (the caller's `eta()` replaces it when it measures better). `quiet`: no line at all (default: the
    running command's --quiet, `Progress.quiet_all`)."""

    quiet_all = False  # --quiet of the command running (set by its option, reset by the command tree)

    def __init__(self, stage: str, of: int | None = None, *, quiet: bool | None = None):
        self.stage, self.of, self.done = stage, of, 0
        self.quiet = Progress.quiet_all if quiet is None else quiet
        self.t0 = self.last = time.monotonic()
        self.step = "working"
        self._eta: tuple[float, float] | None = None  # (when, seconds left then)
        self._counted = 0.0
        self._lock = threading.Lock()

    # -- what is said -------------------------------------------------------------------------------
    def _times(self) -> str:
        now = time.monotonic()
        el = _secs(now - self.t0)
        if self._eta is not None:
            return f"{el}, ETA {_secs(self._eta[1] - (now - self._eta[0]))}"
        if self.of and 0 < self.done < self.of:
            return f"{el}, ETA {_secs((now - self.t0) / self.done * (self.of - self.done))}"
        return el

    def _say(self, text: str) -> None:
        with self._lock:
            self.last = time.monotonic()
            if not self.quiet:
                print(f"==> {self.stage} [{self._times()}] {text}", file=sys.stderr, flush=True)

    def begin(self, stage: str, note: str | None = None) -> None:
        """A new stage under the same clock (the stages of `run`): `==> STAGE` (and what about it)."""
        with self._lock:
            self.stage, self.step, self._eta, self.last = stage, note or stage, None, time.monotonic()
            if not self.quiet:
                print(f"==> {stage}" + (f": {note}" if note else ""), file=sys.stderr, flush=True)

    def log(self, what: str) -> None:
        """A step starts (the ETA from the mean step counts the steps before it as done)."""
        self.step = what
        self._say(what)
        self.done += 1

    def eta(self, remaining_s: float | None) -> None:
        """The seconds left as the caller measures them now (None: no estimate); lines count it down."""
        self._eta = None if remaining_s is None else (time.monotonic(), max(0.0, float(remaining_s)))

    def count(self, done: int, total: int, what: str) -> None:
        """`done` of `total` units of `what`: a line at the first, the last, and at most every COUNT_EVERY_S s
        between, with an ETA from the rate so far."""
        now = time.monotonic()
        if done < total and done > 0 and now - self._counted < COUNT_EVERY_S:
            return
        if self._counted == 0.0:
            self._count_t0 = now
        if 0 < done < total:
            self.eta((now - self._count_t0) / done * (total - done))
        self._counted = now
        self.step = f"{what} {done}/{total}"
        self._say(self.step)

    # -- the heartbeat ------------------------------------------------------------------------------
    @contextlib.contextmanager
    def ticking(self, every: float = HEARTBEAT_S):
        """While the block runs: a line whenever nothing (neither this helper nor the `edgexfer` logger) was said
        for `every` seconds, naming the last step: a long step that logs nothing is not a hang."""
        stop = threading.Event()
        listener = _Listener(self)
        logger = logging.getLogger("edgexfer")
        logger.addHandler(listener)

        def tick():
            while not stop.wait(min(1.0, every / 4)):
                if time.monotonic() - self.last >= every:
                    self._say(f"still working; last step: {self.step}")

        t = threading.Thread(target=tick, daemon=True, name="edgexfer-progress")
        t.start()
        try:
            yield self
        finally:
            stop.set()
            t.join()
            logger.removeHandler(listener)


class _Listener(logging.Handler):
    """A line of the `edgexfer` logger is output too, and names the step in progress (the logger's own handler
    prints it)."""

    def __init__(self, progress: Progress):
        super().__init__(logging.INFO)
        self.progress = progress

    def emit(self, record: logging.LogRecord) -> None:
        try:
            msg = record.getMessage().splitlines()[0]
        except Exception:  # a record that cannot be formatted is the logger's to report
            return
        self.progress.step = msg if len(msg) <= 120 else msg[:117] + "..."
        self.progress.last = time.monotonic()


def bars_off() -> bool | None:
    """tqdm's `disable` for the training package's progress bars: True under --quiet (`Progress.quiet_all`),
    else None (tqdm's own rule: a bar on a terminal, none in a log)."""
    return True if Progress.quiet_all else None
