"""What the Lightning, Keras and Hugging Face callbacks share: one :class:`TrainingWatch`.

A framework callback only translates its framework's hooks into four calls:
``begin`` (training starts), ``epoch`` (an epoch ended, with its metrics),
``end`` (training ended, with the exception if it crashed) and nothing else.
The watch is built on :class:`~chat_magic.notify_when_done`, so a callback's
notices have the shape of every other completion notice: the same card, the
same rank rule (rank 0 posts, a failure from any rank), the same thread.

What it posts, by ``on=``:

- ``"epoch"`` (default): a start line (run name, model, epochs planned,
  host), a line per epoch (every ``every_n_epochs``) with the metrics, and a
  final card (status, duration, epochs done, per metric last/best and a
  sparkline); a crash posts a failure card with the exception and the
  traceback tail.
- ``"end"``: the final card (success or failure) only.
- ``"error"``: the failure card only.

``stall_after=`` (seconds): one line when no step or epoch ends for that
long, one when training moves again (see :mod:`chat_magic.stalls`).

Epoch lines are plain text: lines waiting together for the space's quota are
merged into one message by the outbox. Metrics are recorded every epoch
whatever is posted, so the sparklines are complete.

Keras 3 and the Hugging Face ``Trainer`` call no callback hook when training
raises. For them :func:`guard` wraps the entry point (``keras.Model.fit``,
``transformers.Trainer.train``) once, transparently: same arguments, same
return value, and the very exception re-raised; on the way out it ends the
watches that began inside that call with the exception.
"""

from __future__ import annotations

import fnmatch
import functools
import threading
from collections.abc import Callable, Mapping
from typing import Any

from .. import ranks as _ranks
from ..console import say as _warn
from ..errors import ConfigError
from ..metrics import as_number, format_value
from ..notify import notify_when_done
from ..report import exception_summary

ON = ("epoch", "end", "error")
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
    return f"{done} of {planned}" if planned else str(done)


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
        metrics: Any = None,
        thread_key: str | None = None,
        cards: bool = True,
        ranks: str | None = None,
        stall_after: float | None = None,
    ) -> None:
        if on not in ON:
            raise ConfigError(f"on={on!r}: use 'epoch' (start, every epoch, end), 'end' (the final card) or 'error' (failures only)")
        if isinstance(every_n_epochs, bool) or not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ConfigError(f"every_n_epochs={every_n_epochs!r}: give a whole number >= 1")
        self.keep = metric_filter(metrics)
        self.on = on
        self.every = every_n_epochs
        self.label = label
        self.notifier = notify_when_done(label or "training", to=to, thread_key=thread_key, mention=mention,
                                         on="error" if on == "error" else "always", cards=cards, ranks=ranks,
                                         stall_after=stall_after)
        self.notifier._ready()  # no webhook configured: say so now, not after the run
        self.run: Any = None
        self.planned: int | None = None
        self.done = 0

    # -- the hooks -------------------------------------------------------------

    def begin(self, *, name: str, model: str, epochs: int | None, rank: _ranks.RankInfo | None = None) -> None:
        """Training starts: remember it, and post the start line (``on="epoch"``)."""
        try:
            if self.run is not None:  # a run whose end no hook reported: how it ended is unknown, so say nothing
                self._forget().disarm()
            self.run = self.notifier._begin(self.label or name)
            if rank is not None:
                self.run.rank = rank
            self.planned, self.done = (epochs if epochs and epochs > 0 else None), 0
            self.run.facts.update({"Model": model, "Epochs": format_epochs(0, self.planned)})
            _opened().append(self)
            if self.on == "epoch":
                self.run.post(_ranks.START, "start line", text=self._start_line(model))
        except Exception as e:
            _warn(f"training notices: could not start: {exception_summary(e)}")

    def epoch(self, number: int, values: Mapping[str, Any]) -> None:
        """Epoch ``number`` (1-based) ended with ``values``: record them, post a line every n epochs."""
        run = self.run
        if run is None:
            return
        try:
            kept = {str(k): v for k, v in values.items() if self.keep(str(k)) and as_number(v) is not None}
            run.log(kept, step=number)
            self.done = max(self.done, number)
            run.facts["Epochs"] = format_epochs(self.done, self.planned)
            if self.on == "epoch" and number % self.every == 0:
                run.update(self._epoch_line(number, kept))
        except Exception as e:
            _warn(f"training notices: epoch {number}: {exception_summary(e)}")

    def step(self) -> None:
        """A training step ended: a sign of life for ``stall_after`` and death notices (nothing is posted)."""
        run = self.run
        if run is not None and run.armed is not None:
            run.armed.record()

    def end(self, exc: BaseException | None) -> None:
        """Training ended (``exc`` if it crashed): post the final or failure card. Idempotent."""
        run = self._forget()
        if run is not None:
            self.notifier._end(run, exc)  # never raises

    def _forget(self) -> Any:
        run, self.run = self.run, None
        try:
            _opened().remove(self)
        except ValueError:
            pass
        return run

    # -- the lines -----------------------------------------------------------------

    def _start_line(self, model: str) -> str:
        from ..message import neutralize

        run = self.run
        planned = f"{self.planned} epochs planned" if self.planned else "epochs not fixed"
        return f"▶️ *{neutralize(run.title)}* started: {neutralize(model)}, {planned}, on {neutralize(run.session.host)}"

    def _epoch_line(self, number: int, values: Mapping[str, Any]) -> str:
        shown = [f"{k} {format_value(as_number(v))}" for k, v in values.items()]
        head = f"epoch {format_epochs(number, self.planned).replace(' of ', '/')}"
        return " · ".join([head, *shown])


# -- frameworks without an exception hook ------------------------------------------

_local = threading.local()


def _opened() -> list[TrainingWatch]:
    """The watches begun in this thread and not ended yet, oldest first."""
    opened = getattr(_local, "opened", None)
    if opened is None:
        opened = _local.opened = []
    return opened


def guard(cls: type, name: str) -> None:
    """Wrap ``cls.name`` once so that a crash inside it ends the watches begun inside it.

    Idempotent; the wrapper passes everything through and re-raises the same
    exception object (``raise``), so the user sees exactly what they would
    without chat_magic.
    """
    fn = getattr(cls, name)
    if getattr(fn, "__chat_magic_guard__", False):
        return

    @functools.wraps(fn)
    def guarded(*args: Any, **kwargs: Any) -> Any:
        opened = _opened()
        mark = len(opened)
        try:
            return fn(*args, **kwargs)
        except BaseException as exc:
            for watch in list(opened[mark:])[::-1]:
                watch.end(exc)
            raise

    guarded.__chat_magic_guard__ = True  # type: ignore[attr-defined]
    setattr(cls, name, guarded)


def model_name(obj: Any) -> str:
    """A model's class name (``LitRegressor``), for the start line and the card."""
    return type(obj).__name__ if obj is not None else "model"
