"""What the Lightning, Keras and Hugging Face callbacks share: one :class:`TrainingWatch`.

A framework callback only translates its framework's hooks into four calls:
``begin`` (training starts), ``epoch`` (an epoch ended, with its metrics),
``end`` (training ended, with the exception if it crashed) and nothing else.
The watch is built on :class:`~chat_magic.notify_when_done`, so a callback's
notices have the shape of every other completion notice: the same card, the
same rank rule (rank 0 posts, a failure from any rank), the same thread.

What it posts, by ``on=``:

- ``"epoch"`` (default): a start line (run name, model, epochs or steps
  planned, host), progress lines (an epoch line every ``every_n_epochs``; in
  step-based training a step line per logging or evaluation step, or every
  ``every_n_steps``), and a final card (status, duration, epochs/steps done,
  per metric last/best and a sparkline); a crash posts a failure card with the
  exception and the traceback tail.
- ``"end"``: the final card only.
- ``"error"``: failures only (a crash, or a run whose metrics went NaN/inf;
  an interrupted run posts nothing: see :func:`chat_magic.report.should_post`).

``stall_after=`` (seconds): one line when no step or epoch ends for that
long, one when training moves again (see :mod:`chat_magic.stalls`).

Cadence: at most one progress message per ``progress_every`` seconds (default
300): the lines of that span are merged into one message; the start line and
the final card are always posted. ``progress_every=0`` posts every line (the
outbox still merges the lines that wait together for the space's quota).
Metrics are recorded at every epoch or step whatever is posted, so the
sparklines are complete.

How the run ended is read from the framework's own state, by each callback,
as an :class:`Ending`: finished; stopped early (by which callback, at which
epoch of how many, which best epoch was restored); diverged (which metric went
NaN or infinite first, at which epoch or step); failed; interrupted. A
callback also names the monitored metric's direction (``mode``,
``greater_is_better``), the best checkpoint saved, and the W&B or MLflow run
active in the process (looked up only if the user imported them).

Keras 3 and the Hugging Face ``Trainer`` call no callback hook when training
raises. For them :func:`guard` wraps the entry point (``keras.Model.fit``,
``transformers.Trainer.train``), and acts only for a call that holds a
chat_magic callback: same arguments, same return value, the very exception
re-raised; any other call runs untouched (the wrapper's frame is hidden from
IPython's and pytest's tracebacks). The failure card's traceback is the
user's: it runs from their frame (``model.fit(...)``) to where the error was
raised, without the wrapper. ``Trainer.train`` gets its original back when
the last callback object is gone; ``keras.Model.fit`` keeps the wrapper once
the Keras integration is imported (``fit(callbacks=[ChatCallback()])`` looks
``fit`` up before the callback exists).
"""

from __future__ import annotations

import fnmatch
import functools
import math
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import ranks as _ranks
from .. import rules as _rules
from ..console import say as _warn
from ..errors import ConfigError
from ..metrics import MAX, MIN, as_number, format_value, point
from ..notify import notify_when_done
from ..report import DIVERGED, OK, exception_summary

__all__ = ["TrainingWatch", "format_epochs", "guard", "metric_filter", "model_name"]

ON = ("epoch", "end", "error")
PROGRESS_EVERY = 300.0  # seconds: at most one progress message per span (the lines of the span merged)
# bookkeeping the frameworks log next to the metrics: not worth a sparkline
SKIP = ("epoch", "step", "global_step", "total_flos", "*_runtime", "*_per_second", "*samples_per_second")

MetricFilter = Callable[[str], bool]


def metric_filter(spec: Any) -> MetricFilter:
    """``metrics=``: None (all but bookkeeping), a name or glob, a list of them, or a ``name -> bool`` function."""
    if spec is None:
        return lambda name: not any(fnmatch.fnmatchcase(name, p) for p in SKIP)
    if callable(spec):
        return spec
    patterns = [spec] if isinstance(spec, str) else list(spec) if isinstance(spec, (list, tuple, set, frozenset)) else []
    if not patterns or not all(isinstance(p, str) and p.strip() for p in patterns):
        raise ConfigError(f"metrics={spec!r}: give metric names or globs (['val_loss', 'train_*']) or a function name -> bool")
    return lambda name: any(fnmatch.fnmatchcase(name, p) for p in patterns)


def format_epochs(done: int, planned: int | None) -> str:
    return f"{done:,} of {planned:,}" if planned else f"{done:,}"


def _whole(value: Any, option: str, low: int = 1) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ConfigError(f"{option}={value!r}: give a whole number >= {low}")
    return value


@dataclass
class Ending:
    """How a run that raised nothing ended, as a callback read it from its framework.

    ``status``: ``OK``, ``STOPPED`` or ``DIVERGED`` (report.py). ``reason``:
    the line under the title (``by EarlyStopping (val_loss) at epoch 25 of
    40``). ``facts``: extra card rows (``Best epoch``, ``Best checkpoint``).
    """

    status: str = OK
    reason: str = ""
    facts: dict[str, str] = field(default_factory=dict)


class TrainingWatch:
    """One training run's notices, whatever the framework.

    Construction checks every option (and that a webhook is configured) and
    raises a one-line :class:`~chat_magic.ConfigError`: before training,
    not after it. The hook methods never raise into the training loop.
    """

    def __init__(
        self,
        label: str | None = None,
        *,
        to: Any = None,
        mention: str | None = None,
        on: str = "epoch",
        every_n_epochs: int = 1,
        every_n_steps: int | None = None,
        progress_every: float = PROGRESS_EVERY,
        metrics: Any = None,
        thread_key: str | None = None,
        cards: bool = True,
        ranks: str | None = None,
        stall_after: float | None = None,
    ) -> None:
        if on not in ON:
            raise ConfigError(f"on={on!r}: use 'epoch' (start, progress, end), 'end' (the final card) or 'error' (failures only)")
        _whole(every_n_epochs, "every_n_epochs")
        _whole(every_n_steps, "every_n_steps")
        self.keep = metric_filter(metrics)
        self.on = on
        self.every = every_n_epochs
        self.every_steps = every_n_steps
        self.progress_every = _rules.seconds(progress_every, option="progress_every", most=7 * _rules.DAY)  # 0: every line
        self.label = label
        self.notifier = notify_when_done(label or "training", to=to, thread_key=thread_key, mention=mention,
                                         on="error" if on == "error" else "always", cards=cards, ranks=ranks,
                                         stall_after=stall_after)
        self.notifier.ready()  # no webhook configured: say so now, not after the run
        self.run: Any = None
        self.planned: int | None = None
        self.done = 0
        self.steps_planned: int | None = None
        self.step_count = 0
        self.unit = "epoch"
        self.plan: str | None = None
        self._lines: list[str] = []  # progress lines not posted yet (the cadence merges them)
        self._posted_at = 0.0  # monotonic time of the last message (the start line counts)

    # -- the hooks -------------------------------------------------------------

    def begin(self, *, name: str, model: str, epochs: int | None, rank: _ranks.RankInfo | None = None,
              steps: int | None = None, unit: str = "epoch", plan: str | None = None) -> None:
        """Training starts: remember it, and post the start line (``on="epoch"``).

        ``unit``: how the metrics' points are named in the card: ``"epoch"``
        (``epoch 3``), ``"epoch="`` (Lightning's ``epoch=2``, as in its
        checkpoint names) or ``"step"`` (step-based training: ``steps``
        planned, a line per logging/evaluation step; Ray: ``"report"``,
        ``"iteration"``). ``plan``: what the start line says is planned
        (default: the epochs or steps).
        """
        try:
            if self.run is not None:  # a run whose end no hook reported: how it ended is unknown, so say nothing
                self._forget().disarm()
            self.run = self.notifier.begin(self.label or name)
            if rank is not None:
                self.run.rank = rank
            self.planned, self.done = (epochs if epochs and epochs > 0 else None), 0
            self.steps_planned, self.step_count = (steps if steps and steps > 0 else None), 0
            self.unit, self.plan = unit, plan
            self.run.metrics.unit = unit
            self._lines, self._posted_at = [], time.monotonic()
            self.run.facts.update({"Model": model, "Epochs": format_epochs(0, self.planned)})
            if unit not in ("epoch", "epoch="):
                self.run.facts[self._steps_key] = format_epochs(0, self.steps_planned)
            self.run.facts.update(tracking_links())
            _opened().append(self)
            if self.on == "epoch":
                self.run.post(_ranks.START, "start line", text=self._start_line(model))
        except Exception as e:
            _warn(f"training notices: could not start: {exception_summary(e)}")

    def goal(self, name: str | None, mode: Any) -> None:
        """The framework says ``name`` is best at its ``"min"`` or ``"max"`` (a checkpoint's or early stop's ``mode``)."""
        run = self.run
        if run is not None and name and str(mode) in (MIN, MAX):
            run.metrics.goals[str(name)] = str(mode)

    def epoch(self, number: int, values: Mapping[str, Any], *, done: int | None = None) -> None:
        """Epoch ``number`` ended with ``values``: record them, queue a line every n epochs.

        ``number`` names the epoch in the card (1-based, or Lightning's 0-based
        index); ``done``: epochs completed so far (default ``number``).
        """
        run = self.run
        if run is None:
            return
        try:
            done = number if done is None else done
            kept = self.kept(values)
            if self.unit != "step":
                run.log(kept, step=number)
            self.done = max(self.done, done)
            run.facts["Epochs"] = format_epochs(self.done, self.planned)
            if self.on == "epoch" and self.unit != "step" and done % self.every == 0:
                self.progress(self._epoch_line(number, done, kept))
        except Exception as e:
            _warn(f"training notices: epoch {number}: {exception_summary(e)}")

    def alive(self) -> None:
        """A training step ended: a sign of life for ``stall_after`` and death notices (nothing is posted)."""
        run = self.run
        if run is not None and run.armed is not None:
            run.armed.record()

    def step(self, number: int, values: Mapping[str, Any], *, line: bool = True) -> None:
        """Step-based training logged ``values`` at global step ``number``: record, queue a line."""
        run = self.run
        if run is None:
            return
        try:
            kept = self.kept(values)
            run.log(kept, step=number)
            self.step_count = max(self.step_count, number)
            run.facts[self._steps_key] = format_epochs(self.step_count, self.steps_planned)
            due = self.every_steps is None or number % self.every_steps == 0
            if self.on == "epoch" and line and due and kept:
                shown = " · ".join(f"{k} {format_value(as_number(v))}" for k, v in kept.items())
                self.progress(f"{self.unit} {format_epochs(number, self.steps_planned).replace(' of ', '/')} · {shown}")
        except Exception as e:
            _warn(f"training notices: step {number}: {exception_summary(e)}")

    def progress(self, line: str) -> None:
        """Queue a progress line; post the queued lines as one message once ``progress_every`` has passed."""
        self._lines.append(line)
        if self.run is not None and self.run.armed is not None:
            self.run.armed.record(line)  # the last progress line of a death or stall notice, posted or not
        now = time.monotonic()
        if self.progress_every and now - self._posted_at < self.progress_every:
            return
        lines, self._lines, self._posted_at = self._lines, [], now
        self.run.update("\n".join(lines))

    def end(self, exc: BaseException | None, ending: Ending | None = None) -> None:
        """Training ended (``exc`` if it crashed; else ``ending``, as the framework tells it): post the card. Idempotent."""
        run = self._forget()
        if run is None:
            return
        try:
            if exc is None:
                run.amend = functools.partial(_apply, self._verdict(run, ending or Ending()))
        except Exception as e:
            _warn(f"training notices: how the run ended: {exception_summary(e)}")
        self.notifier.end(run, exc)  # never raises

    def _verdict(self, run: Any, ending: Ending) -> Ending:
        """A NaN or infinity in any recorded metric makes the run diverged, whatever else stopped it."""
        bad = run.metrics.first_bad()
        if bad is None:
            return ending
        name, step, value = bad
        where = f" at {point(self.unit, step)}" if step is not None else ""
        reason = f"{name} went {format_value(value)}{where}"
        if ending.reason:
            reason += f"; stopped {ending.reason}"
        return Ending(DIVERGED, reason, ending.facts)

    def _forget(self) -> Any:
        run, self.run = self.run, None
        try:
            _opened().remove(self)
        except ValueError:
            pass
        return run

    @property
    def _steps_key(self) -> str:
        return f"{self.unit.capitalize()}s"  # "Steps", "Reports", "Iterations"

    def kept(self, values: Mapping[str, Any]) -> dict[str, Any]:
        """The metrics of ``values`` worth recording: numbers, through ``metrics=`` (also for Ray's results)."""
        return {str(k): v for k, v in values.items() if self.keep(str(k)) and as_number(v) is not None}

    # -- the lines -----------------------------------------------------------------

    def _start_line(self, model: str) -> str:
        from ..message import neutralize

        run = self.run
        if self.plan:
            planned = self.plan
        elif self.unit == "step" and self.steps_planned:
            planned = f"{self.steps_planned:,} steps planned"
        else:
            planned = f"{self.planned} epochs planned" if self.planned else "epochs not fixed"
        return f"▶️ *{neutralize(run.title)}* started: {neutralize(model)}, {planned}, on {neutralize(run.session.host)}"

    def _epoch_line(self, number: int, done: int, values: Mapping[str, Any]) -> str:
        shown = [f"{k} {format_value(as_number(v))}" for k, v in values.items()]
        count = format_epochs(done, self.planned).replace(" of ", "/")
        head = f"epoch={number} ({count})" if self.unit == "epoch=" else f"epoch {count}"
        return " · ".join([head, *shown])


def _apply(ending: Ending, report: Any) -> None:
    """Give the final report the status and reason the callback read (``run.amend``)."""
    if report.status != OK:  # an exception decided already
        return
    report.status = ending.status
    if ending.reason:
        report.error = ending.reason
    report.details = {**ending.facts, **{k: v for k, v in report.details.items() if k not in ending.facts}}


def tracking_links() -> dict[str, str]:
    """The W&B run URL, the MLflow run id and tracking URI, when the user's process has one active.

    Looked up only in modules already imported (never imports them, never
    touches the network): ``wandb.run.url``, ``mlflow.active_run()``.
    """
    links: dict[str, str] = {}
    try:
        wandb = sys.modules.get("wandb")
        url = getattr(getattr(wandb, "run", None), "url", None)
        if isinstance(url, str) and url:
            links["W&B run"] = url
    except Exception:
        pass
    try:
        mlflow: Any = sys.modules.get("mlflow")
        active = mlflow.active_run() if mlflow is not None else None
        if active is not None:
            links["MLflow run"] = f"{active.info.run_id} at {mlflow.get_tracking_uri()}"
    except Exception:
        pass
    return links


def early_reason(by: str, epoch: int | None, planned: int | None, what: str = "", unit: str = "epoch") -> str:
    """``by EarlyStopping (val_loss did not improve) at epoch 25 of 40``."""
    text = f"by {by}" + (f" ({what})" if what else "")
    if epoch is not None:
        text += f" at {point(unit, epoch)}" + (f" of {planned:,}" if planned else "")
    return text


# -- frameworks without an exception hook ------------------------------------------

_local = threading.local()


def _opened() -> list[TrainingWatch]:
    """The watches begun in this thread and not ended yet, oldest first."""
    opened = getattr(_local, "opened", None)
    if opened is None:
        opened = _local.opened = []
    return opened


# (class, method name) -> (the original function, the chat_magic callbacks alive that keep it, kept for good)
_guards: dict[tuple[type, str], tuple[Callable[..., Any], weakref.WeakSet, bool]] = {}
_guards_lock = threading.Lock()  # guards _guards and the class attributes it patches


def guard(cls: type, name: str, attached: Callable[[tuple, dict], list], owner: Any = None) -> None:
    """Wrap ``cls.name`` so that a crash in a call holding a chat_magic callback is reported.

    ``attached(args, kwargs)`` returns the chat_magic callbacks a call holds
    (Keras: in ``callbacks=``; HF: in the Trainer's callback handler); a
    call that holds none runs the original with nothing around it (the
    wrapper's frame carries ``__tracebackhide__``, so IPython and pytest leave
    it out of tracebacks). For one that does, each callback's
    ``_entered(args, kwargs)`` is called first (it may read the other
    callbacks of the call), and a crash ends the watches begun inside the
    call, with the user's traceback, before the very exception is re-raised.

    ``owner``: the wrapper stays while ``owner`` (a callback) or another owner
    is alive, and the class gets its original method back when the last one
    is collected. None: for good (Keras: ``model.fit(callbacks=[ChatCallback()])``
    looks ``fit`` up *before* the callback is built, so the wrapper must
    already be there).
    """
    key = (cls, name)
    with _guards_lock:
        if key not in _guards:
            fn = getattr(cls, name)
            _guards[key] = (fn, weakref.WeakSet(), owner is None)
            setattr(cls, name, _wrapper(fn, attached))
        if owner is not None:
            _guards[key][1].add(owner)
    if owner is not None:
        weakref.finalize(owner, _unguard, key)


def _unguard(key: tuple[type, str]) -> None:
    with _guards_lock:
        entry = _guards.get(key)
        if entry is None or entry[2] or any(True for _ in entry[1]):  # iterating skips a just-dead owner; len() may not
            return
        del _guards[key]
        setattr(key[0], key[1], entry[0])


def guarded(cls: type, name: str) -> bool:
    """Whether ``cls.name`` is wrapped now (tests, and users who wonder)."""
    return (cls, name) in _guards


def _wrapper(fn: Callable[..., Any], attached: Callable[[tuple, dict], list]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def chat_magic_guard(*args: Any, **kwargs: Any) -> Any:
        __tracebackhide__ = True  # noqa: F841  (IPython and pytest leave this frame out of tracebacks)
        try:
            ours = attached(args, kwargs)
        except Exception:
            ours = []
        if not ours:
            return fn(*args, **kwargs)
        for cb in ours:
            try:
                cb._entered(args, kwargs)
            except Exception:
                pass
        opened = _opened()
        mark = len(opened)
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            _end_with_user_traceback(exc, list(opened[mark:])[::-1], sys._getframe(1))
            raise

    chat_magic_guard.__chat_magic_guard__ = True  # type: ignore[attr-defined]
    return chat_magic_guard


def _end_with_user_traceback(exc: BaseException, watches: list[TrainingWatch], caller: Any) -> None:
    """End ``watches`` with ``exc`` whose traceback, for the card, starts at the user's frames, not this wrapper's.

    The exception's own traceback is put back before the caller sees it.
    """
    own = exc.__traceback__
    try:
        exc.__traceback__ = _user_traceback(own, caller)
    except Exception:
        pass
    try:
        for watch in watches:
            watch.end(exc)
    finally:
        exc.__traceback__ = own


def _user_traceback(tb: types.TracebackType | None, caller: Any) -> types.TracebackType | None:
    """The caller's frames (outermost first) followed by ``tb`` without the wrapper's own frame."""
    inner = tb.tb_next if tb is not None else None
    frames = []
    frame = caller
    while frame is not None:
        frames.append(frame)
        frame = frame.f_back
    for frame in frames:  # innermost caller first: each links to the chain built so far
        inner = types.TracebackType(inner, frame, frame.f_lasti, frame.f_lineno)
    return inner


def model_name(obj: Any) -> str:
    """A model's class name (``LitRegressor``), for the start line and the card."""
    return type(obj).__name__ if obj is not None else "model"


def finite(value: Any) -> bool:
    number = as_number(value)
    return number is not None and math.isfinite(number)
