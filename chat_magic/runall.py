"""One notice per Run All: ``%chat_autonotify --run-all``.

Cells that run back to back (Run All, Run All Below, papermill, nbclient) are
one *run*. When the run ends, one summary goes to the session's thread:
how many cells ran, the total time, the slowest cells, and the cell that
failed with its error and traceback tail.

A run ends when

- the kernel has been idle for ``quiet`` seconds with no new cell (a
  front end sends the next cell of a Run All within milliseconds of the
  previous reply, so a short quiet time separates runs), or
- the kernel shuts down or restarts (the interpreter exits: Python's
  ``atexit``, which runs on a normal kernel shutdown under every IPython and
  ipykernel; IPython has no shutdown event of its own). Jupyter stops a Run
  All at a failing cell and, under nbclient or papermill, shuts the kernel
  down at once: that run is reported at exit.

A run is worth a summary when it had two cells or more, a failing or
interrupted cell, or lasted at least the auto-notify threshold: a single
quick cell run by hand posts nothing.

Posting happens on a timer thread or in ``atexit``; it only queues (the
delivery worker sends). The worker is started when tracking starts, so that
its own exit flush runs after this module's exit summary, and so that no
thread needs starting during interpreter shutdown (refused from Python 3.12).
"""

from __future__ import annotations

import atexit
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .cells import cell_error, cell_title
from .console import say
from .report import FAILED, INTERRUPTED, OK, Report, format_duration, should_post, status_of

__all__ = ["CellRun", "RunAll"]

SLOWEST = 3  # cells named in "Slowest cells"


@dataclass
class CellRun:
    """One top-level cell of a run."""

    number: int | None
    title: str
    duration: float
    error: BaseException | None = None

    @property
    def name(self) -> str:
        where = f"[{self.number}]" if self.number is not None else "[?]"
        return f"{where} {self.title}" if self.title else where


class RunAll:
    """Watches a shell's cells and posts one summary per run of back-to-back cells.

    ``post(report)`` queues a :class:`~chat_magic.report.Report` (the magic
    gives one that posts into the session's thread). ``quiet``: idle seconds
    that end a run. ``threshold``: a one-cell run this long is reported too.
    ``only_failures``: report only runs with a failing cell.
    """

    def __init__(self, shell: Any, post: Callable[[Report], None], *, quiet: float = 3.0, threshold: float = 60.0,
                 mention: str | None = None, details: Callable[[], dict[str, str]] | None = None,
                 only_failures: bool = False, scrub: Callable[[str], str] | None = None) -> None:
        self.shell = shell
        self.scrub = scrub  # the webhook's own secrets out of error texts, before any cut
        self.post = post
        self.quiet = float(quiet)
        self.threshold = float(threshold)
        self.mention = mention
        self.only_failures = only_failures
        self.details = details or dict
        self._lock = threading.Lock()
        self._cells: list[CellRun] = []
        self._started: float | None = None  # wall clock of the run's first cell
        self._cell_start = 0.0
        self._depth = 0  # nested run_cell (%%chat runs the cell inside its own)
        self._seq = 0  # cells started: a timer armed before a newer cell is stale
        self._timer: threading.Timer | None = None
        self._callbacks = {"pre_run_cell": self._pre_run_cell, "post_run_cell": self._post_run_cell}
        self.runs_closed = 0  # runs ended (posted or not worth it)
        self.summaries_posted = 0
        self.idle = threading.Event()  # set whenever no run is open
        self.idle.set()

    # -- lifecycle ------------------------------------------------------------------

    def start(self) -> RunAll:
        from . import delivery

        delivery.dispatcher().ensure_running()  # before atexit.register: its exit flush must run after ours
        for event, fn in self._callbacks.items():
            self.shell.events.register(event, fn)
        atexit.register(self._at_exit)
        return self

    def stop(self) -> None:
        """Stop watching; a run in progress is dropped (``%chat_autonotify off``)."""
        for event, fn in self._callbacks.items():
            try:
                self.shell.events.unregister(event, fn)
            except ValueError:
                pass
        atexit.unregister(self._at_exit)
        with self._lock:
            self._cancel_timer()
            self._reset()

    def _at_exit(self) -> None:
        """The kernel is shutting down: report the open run now."""
        with self._lock:
            self._cancel_timer()
        self.finish()

    # -- events -----------------------------------------------------------------------

    def _pre_run_cell(self, info: Any) -> None:
        with self._lock:
            self._depth += 1
            if self._depth > 1:
                return
            self._seq += 1
            self._cancel_timer()
            if self._started is None:
                self._started = time.time()
                self.idle.clear()
            self._cell_start = time.perf_counter()

    def _post_run_cell(self, result: Any) -> None:
        try:
            self._record(result)
        except Exception as e:  # never disturb the user's cell
            say(f"run summary: {type(e).__name__}: {e}")

    def _record(self, result: Any) -> None:
        with self._lock:
            if self._depth == 0:  # the cell that turned tracking on: it started before
                return
            self._depth -= 1
            if self._depth > 0:
                return
            error = cell_error(result)
            raw = getattr(getattr(result, "info", None), "raw_cell", "") or ""
            self._cells.append(CellRun(getattr(result, "execution_count", None), cell_title(raw),
                                       time.perf_counter() - self._cell_start, error))
            self._arm(self._seq)

    def _arm(self, seq: int) -> None:
        self._cancel_timer()
        self._timer = threading.Timer(self.quiet, self._quiet_elapsed, args=(seq,))
        self._timer.daemon = True
        self._timer.name = "chat_magic-runall"
        self._timer.start()

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _quiet_elapsed(self, seq: int) -> None:
        with self._lock:
            if seq != self._seq or self._depth:
                return  # a newer cell started: the run goes on
        self.finish()

    # -- the summary ----------------------------------------------------------------------

    def _reset(self) -> None:
        self._cells, self._started, self._depth = [], None, 0
        self.idle.set()

    def finish(self) -> Report | None:
        """End the run now: post its summary if it is worth one; return the report (or None)."""
        with self._lock:
            cells, started = self._cells, self._started
            self._cells, self._started = [], None
        report = None
        try:
            if cells and self.worth_telling(cells):
                report = self.report(cells, time.time() - (started or time.time()))
                self.post(report)
                self.summaries_posted += 1
        except Exception as e:
            say(f"run summary not posted: {type(e).__name__}: {e}")
        finally:
            if cells:
                self.runs_closed += 1
            with self._lock:
                if self._started is None:
                    self.idle.set()
        return report

    def worth_telling(self, cells: list[CellRun]) -> bool:
        statuses = {status_of(c.error) for c in cells}
        status = FAILED if FAILED in statuses else INTERRUPTED if INTERRUPTED in statuses else OK
        worth_it = len(cells) >= 2 or status != OK or sum(c.duration for c in cells) >= self.threshold
        return should_post(status, on_error=self.only_failures, worth_it=worth_it)

    def report(self, cells: list[CellRun], duration: float) -> Report:
        """The summary of ``cells``: status, total time, slowest cells, the failing cell's error."""
        failed = next((c for c in cells if status_of(c.error) != OK), None)  # a clean SystemExit(0) is no failure
        slowest = sorted(cells, key=lambda c: c.duration, reverse=True)[:SLOWEST]
        facts = {"Cells run": str(len(cells))}
        if failed is not None:
            facts["Stopped at" if failed is cells[-1] else "Failed cell"] = failed.name
        facts["Slowest cells"] = " · ".join(f"{c.name} {format_duration(c.duration)}" for c in slowest)
        report = Report.from_outcome(
            f"Run of {len(cells)} cell{'s' if len(cells) != 1 else ''}",
            failed.error if failed is not None else None,
            scrub=self.scrub,
            shell=self.shell,
            duration=duration,
            details={**facts, **self.details()},
            mention=self.mention,
        )
        if failed is not None and report.error:
            report.error = f"{failed.name}: {report.error}"
        return report
