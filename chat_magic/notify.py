"""``notify_when_done``: tell the space when a block or a function ends.

As a context manager::

    with chat_magic.notify_when_done("training") as n:
        for epoch in range(10):
            ...
            n.update(f"epoch {epoch}: loss {loss:.3f}")   # a progress line in the same thread
            n.log(loss=loss, acc=acc)   # recorded: the final notice shows last, best and a sparkline

As a decorator, for plain and ``async`` functions::

    @chat_magic.notify_when_done(mention="all", on="error")
    def train(): ...

When the block ends it posts a card (with a text fallback) into the session's
thread: success with the duration, failure with the exception and the last
traceback lines, ``KeyboardInterrupt`` as interrupted, each saying where it ran
(host, notebook or script, rank).

Guarantees:

- the user's exception propagates unchanged (same object, same traceback) and
  the return value is the very object the function returned;
- posting never raises into user code: a problem while posting is one
  ``chat_magic: ...`` line on stderr, and the message itself is queued in the
  durable outbox (delivered in the background, retried, never blocking);
- a set-up mistake (no webhook configured, unknown ``to=``, bad ``on=``) raises
  a one-line :class:`~chat_magic.ConfigError` before any of the user's work
  starts: better at once than after an eight-hour run whose notice could not be
  sent. Arguments are checked when ``notify_when_done(...)`` is called; a missing
  default webhook when the block is entered or the decorated function is
  called, so that decorating a function at import time never fails.

In distributed jobs only rank 0 posts success, start and progress; a failure
is posted by whichever rank fails (see :mod:`chat_magic.ranks`).
"""

from __future__ import annotations

import functools
import inspect
import re
import sys
import time
from collections.abc import Callable
from contextvars import ContextVar, Token
from pathlib import Path
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any, Literal, TypeVar

from . import ranks as _ranks
from . import rules
from .console import say as _warn
from .errors import ConfigError, NoDestinationError
from .metrics import MetricHistory
from .report import exception_summary, mark_reported

if TYPE_CHECKING:
    from .delivery import Receipt
    from .session import Session
    from .webhook import Webhook

__all__ = ["ON", "Run", "active", "log", "notify_when_done", "origin_details", "session", "update", "user_namespace"]

F = TypeVar("F", bound=Callable[..., Any])

ON = ("always", "error")

# the notify_when_done blocks running in this context, innermost last: (owner, run)
_STACK: ContextVar[tuple] = ContextVar("chat_magic_notify_stack", default=())


def _shell() -> Any:
    """IPython's shell when running in one (names cells in tracebacks), without importing IPython."""
    if "IPython" not in sys.modules:
        return None
    try:
        from IPython import get_ipython

        return get_ipython()
    except Exception:
        return None


def user_namespace() -> dict | None:
    """The IPython user namespace when running in IPython (without importing IPython)."""
    return getattr(_shell(), "user_ns", None)


def session() -> Session:
    from .session import current_session

    return current_session(user_namespace())




def origin_details(sess: Any, rank: _ranks.RankInfo | None = None) -> dict[str, str]:
    """``{"Notebook": "train.ipynb", "Host": "gpu-01", "Rank": "rank 3 of 8"}``: where a notice comes from."""
    kind = {"notebook": "Notebook", "script": "Script", "command": "Command"}.get(sess.kind, "Session")
    details = {kind: sess.source, "Host": sess.host}
    if rank is not None and rank.distributed:
        details["Rank"] = rank.describe()
    return details


def _is_cell_file(filename: str) -> bool:
    return bool(re.search(r"ipykernel_\d+|<ipython-input|<stdin>|<string>|<console>", filename))


class _Run:
    """One execution of a block or a call: when it started, where it posts."""

    def __init__(self, owner: notify_when_done, label: str) -> None:
        self.owner = owner
        self.label = label
        self.t0 = time.monotonic()
        self.rank = _ranks.current()
        self.session = session()
        self.receipt: Receipt | None = None
        self.metrics = MetricHistory()  # what log() recorded: the final notice summarizes it
        self.facts: dict[str, str] = {}  # extra rows for the notices, e.g. {"Epochs": "4 of 4"} (callbacks)
        self.amend: Callable[[Any], None] | None = None  # called with the final Report before it is posted (callbacks)
        self._refused: set[str] = set()  # metric names whose non-numeric value was already reported
        self.images: list[Any] = []  # what image() was given, as PNG/JPEG (images.Image): the final card shows them
        self.armed: Any = None  # its death notice in the outbox while it runs (deadman.py)

    def arm(self, stall_after: float | None = None) -> None:
        """Write this run's death notice to the outbox before the work starts (deadman.py). Never raises."""
        from . import arming

        if self.owner.webhook is not None and self.armed is None:
            self.armed = arming.arm(self.owner.webhook, self.owner.thread_key or self.session.thread_key, title=self.title,
                                    details=self.details(), cards=self.owner.cards, to=self.owner.to, stall_after=stall_after)

    def disarm(self) -> None:
        """The run closed: its death notice is not needed (after the completion notice is queued)."""
        armed, self.armed = self.armed, None
        if armed is not None:
            armed.disarm()

    @property
    def title(self) -> str:
        where = self.rank.describe()
        return f"{self.label} ({where})" if where else self.label

    def details(self) -> dict[str, str]:
        return {**self.facts, **origin_details(self.session, self.rank)}

    def post(self, kind: str, what: str, **payload: Any) -> Receipt | None:
        """Queue a message into the thread if this rank posts ``kind``; never raises."""
        try:
            if kind == _ranks.PROGRESS and self.armed is not None:  # update(), chat_magic.tqdm: a sign of life
                self.armed.record(str(payload.get("text") or "").split(": ", 1)[-1], force=True)
            if not _ranks.should_post(kind, self.owner.ranks, self.rank):
                return None
            return self.session.send(to=self.owner.webhook, thread_key=self.owner.thread_key, keep_on_fault=True, **payload)
        except Exception as e:
            _warn(f"could not post the {what} of {self.label!r}: {e}")
            return None

    def log(self, values: dict[str, Any], step: int | None = None) -> None:
        """Record metric values; a value that is not a number is one warning line, never an exception."""
        refused = [n for n in self.metrics.record(values, step) if n not in self._refused]
        if refused:  # once per name: a loop logging a bad value says so once
            self._refused.update(refused)
            _warn(f"log(): {', '.join(refused)} of {self.label!r} not recorded: give numbers (floats, ints, one-element tensors)")
        if self.armed is not None:
            from .metrics import as_number, format_value

            shown = ", ".join(f"{k} {format_value(as_number(v))}" for k, v in list(values.items())[:6])
            self.armed.record((shown + (f" (step {step})" if step is not None else "")) if shown else None)

    def update(self, text: str) -> Any:
        from .message import neutralize

        text = str(text).strip()
        if not text:
            return None
        return self.post(_ranks.PROGRESS, "progress line", text=f"⏳ *{neutralize(self.title)}*: {neutralize(text)}", truncate=True)


Run = _Run  # a run in progress, as :meth:`notify_when_done.begin` returns it


class notify_when_done:
    """Post a notice when a block (``with``) or a function (decorator) ends.

    ``label``: what to call the work (default: the function's qualified name,
    or ``block at train.py:42``). ``to``: a space name from the config file or
    a webhook URL (default: ``GOOGLE_CHAT_WEBHOOK_URL``). ``thread_key``: post
    into that thread instead of the session's. ``notify_start``: also post when
    it starts. ``mention``: ``"all"``, a numeric user id or a user's e-mail
    address, pinged in the completion notice. ``on``: ``"always"`` or
    ``"error"`` (only failures are posted; an interrupt is not one, see
    :func:`chat_magic.report.should_post`).
    ``cards``: a card with a text fallback (default) or plain text.
    ``ranks``: ``"zero"`` (default, or ``CHAT_MAGIC_RANKS``) or ``"all"``.
    ``stall_after``: seconds without ``update()``/``log()`` after which one
    line says the block has stalled (and one when it moves again; see
    :mod:`chat_magic.stalls`). While the block runs its death notice is armed
    in the outbox (see :mod:`chat_magic.deadman`).

    Raises :class:`~chat_magic.ConfigError` at once when the destination cannot
    be resolved or an argument is wrong; never raises when the work ends.
    """

    def __new__(cls, label: Any = None, **kwargs: Any) -> Any:
        if callable(label) and not isinstance(label, str) and not kwargs:
            # bare ``@notify_when_done`` without parentheses
            return cls()(label)
        return super().__new__(cls)

    def __init__(
        self,
        label: str | None = None,
        *,
        to: Any = None,
        thread_key: str | None = None,
        notify_start: bool = False,
        mention: str | None = None,
        on: str = "always",
        cards: bool = True,
        ranks: str | None = None,
        stall_after: float | None = None,
    ) -> None:
        from . import config

        if label is not None and not isinstance(label, str):
            raise ConfigError(f"label must be a string, not {type(label).__name__}")
        rules.validate_on(on, ON)
        _ranks.policy(ranks)  # a bad value (argument or CHAT_MAGIC_RANKS) fails now
        self.label = label
        self.to = to
        self.thread_key = rules.validate_thread_key(thread_key, option="thread_key")
        self.notify_start = bool(notify_start)
        self.mention = rules.validate_mention(mention, option="mention=")
        self.on = on
        self.cards = bool(cards)
        self.ranks = ranks
        self.stall_after = _stall_seconds(stall_after)
        try:
            self.webhook: Webhook | None = config.resolve(to)  # ConfigError now, not after the job
        except NoDestinationError:
            if to is not None:
                raise
            # No default webhook yet: a decorator may be applied at import time, in an
            # environment that never runs the job; the work itself checks at its start.
            self.webhook = None
        if isinstance(to, str) and self.webhook is not None and any(c in to for c in "/?="):
            self.to = self.webhook  # a URL: kept sealed, never as the string (pickle, yaml.dump, vars())
        self.receipt: Receipt | None = None  # the last completion notice's Receipt (None if none was posted)
        self._live: list[_Run] = []  # runs of this object now in progress (any thread or task)
        self._where = self._caller()

    @staticmethod
    def _caller() -> str:
        """``train.py:42`` for the code that called ``notify_when_done(...)``."""
        try:
            frame: FrameType | None = sys._getframe(2)
            while frame is not None and frame.f_code.co_filename == __file__:
                frame = frame.f_back
            if frame is None:
                return ""
            filename = frame.f_code.co_filename
            if _is_cell_file(filename):
                return ""
            return f"{Path(filename).name}:{frame.f_lineno}"
        except Exception:
            return ""

    def __repr__(self) -> str:
        return f"<notify_when_done {self.label!r} to {self.webhook or 'the default webhook (not configured yet)'}>"

    def __getstate__(self) -> dict[str, Any]:
        """What a pickle or a copy keeps: the settings, not the runs in progress nor the last receipt.

        The webhook pickles as its digest, never its key and token (see
        :class:`~chat_magic.webhook.Webhook`).
        """
        state = dict(self.__dict__)
        state.update(_live=[], receipt=None)
        return state

    # -- the run --------------------------------------------------------

    # -- a run's start and end in separate calls (the training callbacks) --------

    def ready(self) -> None:
        """Resolve the default webhook if construction could not: raises a one-line ConfigError.

        A front end calls it before the work starts, so that a missing webhook
        is said then, not after the run.
        """
        if self.webhook is None:
            from . import config

            self.webhook = config.resolve(None)

    def begin(self, label: str) -> Run:
        """Start a run called ``label`` (the start notice with ``notify_start``); may raise. See :meth:`end`."""
        run = _Run(self, label)
        run.arm(self.stall_after)
        if self.notify_start:
            from .report import STARTED, Report

            report = Report(run.title, status=STARTED, details=run.details())
            run.post(_ranks.START, "start notice", **report.payload_kwargs(cards=self.cards))
        return run

    def end(self, run: Run, exc: BaseException | None) -> None:
        """Post how ``run`` (from :meth:`begin`) ended, ``exc`` if it raised. Never raises."""
        try:
            self._finish(run, exc)
        except Exception as e:  # a bug here must not hide the user's result
            _warn(f"could not post the notice of {run.label!r}: {exception_summary(e)}")
        finally:
            run.disarm()  # after the completion notice is queued

    def _finish(self, run: _Run, exc: BaseException | None) -> None:
        from .report import FAILED, Report, should_post

        report = Report.from_outcome(
            run.title,
            exc,
            scrub=self.webhook.scrub if self.webhook else None,
            shell=_shell(),
            duration=time.monotonic() - run.t0,
            details=run.details(),
            mention=self.mention,
            max_lines=30,
            metrics=run.metrics.summaries(),
        )
        amend = getattr(run, "amend", None)
        if amend is not None:  # a training callback's reading of how the run ended (integrations/_base.py)
            amend(report)
        if not should_post(report.status, on_error=self.on == "error"):
            return
        if report.status == FAILED and self._peer_failed_first(run, exc, report):
            return
        figures = self._figures(run)
        if figures is not None:
            report.figures, report.note = figures.widgets(), figures.note()
        cards = self.cards or bool(figures is not None and figures.postable)  # an image needs a card
        armed = run.armed
        receipt = run.post(report.kind, "notice", figures=figures, disarm=armed.replacing() if armed is not None else None,
                           **report.payload_kwargs(cards=cards))
        if receipt is not None:
            if armed is not None:
                armed.replaced = True  # the card's transaction disarmed it
            run.receipt = self.receipt = receipt
            if report.status == FAILED:
                mark_reported(exc)  # a Run All summary names this failure instead of repeating it
            from .deadman import mark_important

            mark_important(receipt)

    def _peer_failed_first(self, run: _Run, exc: BaseException | None, report: Any) -> bool:
        """In a distributed job: whether another rank failed first and this error is its consequence.

        Then this rank posts one line naming the rank that failed first (the
        failure card is that rank's), and True is returned.
        """
        from . import jobs

        job = jobs.identity()
        if not job or not run.rank.distributed:
            return False
        from .delivery import dispatcher

        first = jobs.first_failure(job, jobs.describe_rank(run.rank), report.error, box=lambda: dispatcher().outbox)
        if first is None or not jobs.consequential(exc):
            return False
        armed = run.armed
        receipt = run.post(_ranks.FAILURE, "line", text=jobs.as_line(run.title, report.error, first), truncate=True,
                           disarm=armed.replacing() if armed is not None else None)
        if receipt is not None:
            run.receipt = self.receipt = receipt
            if armed is not None:
                armed.replaced = True  # the line's transaction disarmed it
        return True

    def _figures(self, run: _Run) -> Any:
        """The images given to image(), and a chart of the logged metrics when a store is set (else sparklines only)."""
        try:
            from . import images

            name = self.to if isinstance(self.to, str) else None
            items = list(run.images)
            if run.metrics and images.store_spec(name) is not None:
                chart = images.metrics_chart(run.metrics, title=run.label)
                if chart is not None:
                    items.append(chart)
            return images.Figures.collect(items, to=name, max_figures=images.MAX_FIGURES) if items else None
        except Exception as e:  # a figure never costs the notice
            _warn(f"the figures of {run.label!r} were left out: {exception_summary(e)}")
            return None

    # -- context manager -------------------------------------------------

    def _default_label(self) -> str:
        if self.label:
            return self.label
        if self._where:
            return f"block at {self._where}"
        try:
            return f"block in {session().source}"
        except Exception:
            return "block"

    def _push(self) -> _Run | None:
        try:
            run = self.begin(self._default_label())
        except Exception as e:  # never keep the user's block from running
            _warn(f"could not start watching: {exception_summary(e)}")
            run = None
        _STACK.set(_STACK.get() + ((self, run),))
        if run is not None:
            self._live.append(run)
        return run

    def _pop(self) -> _Run | None:
        stack = _STACK.get()
        for i in range(len(stack) - 1, -1, -1):
            if stack[i][0] is self:
                _STACK.set(stack[:i] + stack[i + 1:])
                self._forget(stack[i][1])
                return stack[i][1]
        return None

    def _forget(self, run: _Run | None) -> None:
        if run is None:
            return
        try:
            self._live.remove(run)
        except ValueError:
            pass

    def __enter__(self) -> notify_when_done:
        self.ready()
        self._push()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> Literal[False]:
        run = self._pop()
        if run is not None:
            self.end(run, exc)
        return False  # never swallow

    async def __aenter__(self) -> notify_when_done:
        return self.__enter__()

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> Literal[False]:
        return self.__exit__(exc_type, exc, tb)

    def update(self, text: str) -> Any:
        """Post a progress line into the thread (rank 0 only). Returns the Receipt, or None.

        Lines that wait together are merged into one message by the delivery
        worker, so frequent updates stay within the space's quota.
        """
        run = None
        for owner, r in reversed(_STACK.get()):
            if owner is self:
                run = r
                break
        if run is None and self._live:  # called from another thread (a callback, a data loader)
            run = self._live[-1]
        if run is None:
            _warn("update() outside its `with notify_when_done(...)` block or decorated call: not posted")
            return None
        return run.update(text)

    def log(self, **metrics: Any) -> None:
        """Record metric values, e.g. ``n.log(loss=0.31, acc=0.9)`` once per epoch.

        Nothing is posted now: the completion notice shows each metric's last
        and best value and a sparkline of its course. Best is lower for names
        like loss/error/mae/mse/perplexity, higher for acc/f1/auc/precision/recall
        (see :mod:`chat_magic.metrics`). Never raises.
        """
        run = _find_run(self)
        if run is None:
            _warn("log() outside its `with notify_when_done(...)` block or decorated call: not recorded")
            return
        run.log(metrics)

    def image(self, figure: Any, alt: str | None = None) -> None:
        """Show an image in the completion card: a matplotlib figure, a PIL image, PNG/JPEG bytes or a path.

        It is rendered now (later changes to the figure do not count) and
        uploaded to the image store by the background worker when the run
        ends (see the README's "Figures"). Never raises: a problem is one line.
        """
        run = _find_run(self)
        if run is None:
            _warn("image() outside its `with notify_when_done(...)` block or decorated call: not kept")
            return
        from . import images
        from .errors import MessageError

        try:
            run.images.append(images.to_image(figure, alt))
        except MessageError as e:
            _warn(f"image() not kept: {e}")

    # -- decorator -------------------------------------------------------

    def __call__(self, func: F) -> F:
        if not callable(func):
            raise TypeError(f"notify_when_done(...) decorates a function, not {type(func).__name__}")
        if inspect.isgeneratorfunction(func) or inspect.isasyncgenfunction(func):
            raise TypeError("notify_when_done cannot watch a generator function (it returns at once): "
                            "decorate the function that consumes it, or use `with notify_when_done(...)`")
        label = self.label or (getattr(func, "__qualname__", None) or repr(func)).replace("<locals>.", "")

        def begin() -> tuple[Run | None, Token[Any]]:
            self.ready()  # no webhook configured: a one-line ConfigError before the work runs
            try:
                run = self.begin(label)
            except Exception as e:
                _warn(f"could not start watching: {exception_summary(e)}")
                run = None
            if run is not None:
                self._live.append(run)
            return run, _STACK.set(_STACK.get() + ((self, run),))

        def end(run: Run | None, token: Token[Any], exc: BaseException | None) -> None:
            try:
                _STACK.reset(token)
            except Exception:
                pass
            self._forget(run)
            if run is not None:
                self.end(run, exc)

        if inspect.iscoroutinefunction(func):

            @functools.wraps(func)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                run, token = begin()
                try:
                    result = await func(*args, **kwargs)
                except BaseException as e:
                    end(run, token, e)
                    raise
                end(run, token, None)
                return result

            return async_wrapper  # type: ignore[return-value]

        @functools.wraps(func)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            run, token = begin()
            try:
                result = func(*args, **kwargs)
            except BaseException as e:
                end(run, token, e)
                raise
            end(run, token, None)
            return result

        return wrapper  # type: ignore[return-value]


def _stall_seconds(value: Any) -> float | None:
    """``stall_after=``: a duration over 0 (600, "10m"; :func:`chat_magic.rules.seconds`) or None; else a one-line ConfigError now."""
    if value is None:
        return None
    return rules.seconds(value, option="stall_after", above=True, most=7 * rules.DAY)


def _find_run(owner: notify_when_done) -> _Run | None:
    """``owner``'s run in this context, else its latest run in progress (another thread: a callback)."""
    for o, r in reversed(_STACK.get()):
        if o is owner and r is not None:
            return r
    return owner._live[-1] if owner._live else None


def log(**metrics: Any) -> None:
    """Record metric values into the innermost running ``notify_when_done`` (see :meth:`notify_when_done.log`)."""
    run = active()
    if run is None:
        _warn("log() outside a notify_when_done block or decorated call: not recorded")
        return
    run.log(metrics)


def active() -> _Run | None:
    """The innermost ``notify_when_done`` run in this context, if any."""
    for _owner, run in reversed(_STACK.get()):
        if run is not None:
            return run
    return None


def update(text: str) -> Any:
    """Post a progress line into the innermost running ``notify_when_done`` (e.g. from a decorated function)."""
    run = active()
    if run is None:
        _warn("update() outside a notify_when_done block or decorated call: not posted")
        return None
    return run.update(text)
