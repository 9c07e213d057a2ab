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

The total is from the first cell's start to the last cell's end (the quiet
wait is not part of it); the cell that turns ``--run-all`` on counts like any
other (from the magic's call to the cell's end). After a failing cell, the
cells of the notebook that Run All never reached are named, when the
notebook's file can be found (VS Code's ``__vsc_ipynb_file__``, Jupyter's
``__session__`` or ``JPY_SESSION_NAME``, ``CHAT_MAGIC_SOURCE``, the
``.ipynb`` papermill or nbconvert was given). A failure that another notice
already reported in full (a training callback, ``notify_when_done``) is
named, not repeated: one failure notice per failing cell.

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
import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .cells import cell_error, cell_title
from .console import say
from .report import FAILED, INTERRUPTED, OK, Report, format_duration, should_post, status_of, was_reported

__all__ = ["CellRun", "RunAll"]

SLOWEST = 3  # cells named in "Slowest cells"


@dataclass
class CellRun:
    """One top-level cell of a run."""

    number: int | None
    title: str
    duration: float
    error: BaseException | None = None
    source: str = ""  # the cell's code: finds it in the notebook file (the cells after it were not run)

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
        self._ended: float | None = None  # wall clock of the run's last cell end (the total stops there)
        self._enabled_at: tuple[float, float] | None = None  # (wall, perf) of start(): the enabling cell's start
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
        self._enabled_at = (time.time(), time.perf_counter())  # the cell running the magic counts from here
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
            if self._depth == 0:  # the cell that turned tracking on: it started before pre_run_cell was ours
                if self._enabled_at is None:
                    return
                wall, self._cell_start = self._enabled_at
                if self._started is None:
                    self._started = wall
                    self.idle.clear()
            else:
                self._depth -= 1
                if self._depth > 0:
                    return
            self._enabled_at = None
            error = cell_error(result)
            raw = getattr(getattr(result, "info", None), "raw_cell", "") or ""
            self._cells.append(CellRun(getattr(result, "execution_count", None), cell_title(raw),
                                       time.perf_counter() - self._cell_start, error, raw))
            self._ended = time.time()
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
        self._cells, self._started, self._ended, self._depth = [], None, None, 0
        self.idle.set()

    def finish(self) -> Report | None:
        """End the run now: post its summary if it is worth one; return the report (or None)."""
        with self._lock:
            cells, started, ended = self._cells, self._started, self._ended
            self._cells, self._started, self._ended = [], None, None
        report = None
        try:
            if cells and self.worth_telling(cells):
                report = self.report(cells, (ended or time.time()) - (started or time.time()))
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
        told = failed is not None and was_reported(failed.error)
        facts = {"Cells run": str(len(cells))}
        if failed is not None:
            facts["Stopped at" if failed is cells[-1] else "Failed cell"] = failed.name + (" (its failure notice is above)" if told else "")
            left = self.not_run(cells[-1])
            if left:
                facts["Not run"] = f"{len(left)} cell{'s' if len(left) != 1 else ''}: " + " · ".join(left)
        facts["Slowest cells"] = " · ".join(f"{c.name} {format_duration(c.duration)}" for c in slowest)
        report = Report.from_outcome(
            f"Run of {len(cells)} cell{'s' if len(cells) != 1 else ''}",
            failed.error if failed is not None else None,
            scrub=self.scrub,
            shell=self.shell,
            duration=duration,
            details={**facts, **self.details()},
            mention=self.mention,
            with_traceback=not told,
        )
        if told:
            report.error = ""  # the error and its traceback are in the failure notice already posted
        elif failed is not None and report.error:
            report.error = f"{failed.name}: {report.error}"
        return report

    def not_run(self, last: CellRun) -> list[str]:
        """The titles of the notebook's code cells after ``last`` (Run All stopped there); [] when unknown."""
        try:
            return cells_after(notebook_file(self.shell), last.source)
        except Exception:
            return []


def notebook_file(shell: Any) -> Path | None:
    """The ``.ipynb`` this kernel runs, when something names it; None otherwise (the summary then says less)."""
    ns = getattr(shell, "user_ns", None) or {}
    names = [ns.get("__vsc_ipynb_file__"), ns.get("__session__"), os.environ.get("JPY_SESSION_NAME"),
             os.environ.get("CHAT_MAGIC_SOURCE")]
    for name in names:
        if isinstance(name, str) and name.endswith(".ipynb"):
            for path in (Path(name), Path.cwd() / Path(name).name):  # __session__ is relative to the server's root
                if path.is_file():
                    return path
    return _launcher_file()


def _launcher_file() -> Path | None:
    """The ``.ipynb`` on the parent process's command line (papermill, nbconvert), from its working folder."""
    try:
        ppid = os.getppid()
        with open(f"/proc/{ppid}/cmdline", "rb") as f:
            args = [a.decode("utf-8", "replace") for a in f.read().split(b"\0")]
        cwd = Path(os.readlink(f"/proc/{ppid}/cwd"))
    except OSError:
        return None
    for a in args:
        if a.endswith(".ipynb") and (cwd / a).is_file():
            return cwd / a
    return None


def cells_after(path: Path | None, source: str) -> list[str]:
    """Titles of the code cells after the one whose code is ``source`` (empty cells skipped); [] if not found."""
    if path is None or not source.strip():
        return []
    import json  # not nbformat: this may run at kernel exit, where a slow import can be cut short

    with open(path, encoding="utf-8") as f:
        cells = json.load(f).get("cells") or []
    code = ["".join(c.get("source") or "") if isinstance(c.get("source"), list) else str(c.get("source") or "")
            for c in cells if isinstance(c, dict) and c.get("cell_type") == "code"]
    at = [i for i, src in enumerate(code) if src.strip() == source.strip()]
    if not at:
        return []
    return [_title(src) for src in code[at[-1] + 1:] if src.strip()]


def _title(source: str) -> str:
    """A cell's ``#`` title, else its first line of code (cut at 40 characters)."""
    first = next((line.strip() for line in source.splitlines() if line.strip()), "")
    return cell_title(source) or (first if len(first) <= 40 else first[:39] + "…")
