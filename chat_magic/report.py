"""Completion notices: one builder for ``%%chat``, auto-notify, ``notify_when_done`` and ``chat-magic run``.

A :class:`Report` says what ran, how it ended, how long it took, where it ran,
and the tail of its output or traceback. It renders as Chat-syntax text
(:meth:`Report.text`) and as a ``cardsV2`` card with that text as fallback
(:meth:`Report.card`). Output and tracebacks are untrusted: in text they sit
in a code block they cannot break out of and cannot mention anyone; in cards
they are HTML-escaped.
"""

from __future__ import annotations

import html
import linecache
import re
import signal as _signal
import traceback as _traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from . import metrics as _metrics
from . import ranks as _ranks
from .message import MAX_BYTES, MAX_TEXT, code_block, cut_note, neutralize, payload_size, strip_ansi, tail
from .rules import mention_tag

__all__ = [
    "Cards", "DIVERGED", "FAILED", "FAILURES", "INTERRUPTED", "OK", "PROGRESS", "Report", "STARTED", "STOPPED",
    "cell_name", "exception_summary", "format_duration", "format_traceback", "outcome", "remember_cell", "should_post",
    "mark_reported", "signal_name", "status_of", "was_reported"
]

OK, FAILED, INTERRUPTED, STARTED, PROGRESS = "ok", "failed", "interrupted", "started", "progress"
# how a training run ended without an exception, read from the framework's own state (integrations/_base.py)
STOPPED, DIVERGED = "stopped", "diverged"
FAILURES = (FAILED, DIVERGED)  # what "post only on error" posts (should_post)
ICONS = {OK: "✅", FAILED: "❌", INTERRUPTED: "⏸️", STARTED: "▶️", PROGRESS: "⏳", STOPPED: "⏹️", DIVERGED: "⚠️"}
WORDS = {OK: "finished", FAILED: "failed", INTERRUPTED: "interrupted", STARTED: "started", PROGRESS: "progress",
         STOPPED: "stopped early", DIVERGED: "diverged"}
COLORS = {OK: "#188038", FAILED: "#d93025", INTERRUPTED: "#e37400", STARTED: "#1a73e8", PROGRESS: "#1a73e8",
          STOPPED: "#1a73e8", DIVERGED: "#e37400"}
MAX_DETAILS = 95  # detail rows in a card: with error, duration, "more", output and traceback, at most 100 widgets
# which rank posts a notice of each status (see chat_magic.ranks)
KINDS = {OK: _ranks.SUCCESS, FAILED: _ranks.FAILURE, INTERRUPTED: _ranks.INTERRUPT, STARTED: _ranks.START, PROGRESS: _ranks.PROGRESS,
         STOPPED: _ranks.SUCCESS, DIVERGED: _ranks.SUCCESS}  # every rank sees the same metrics: rank 0 tells
TRACEBACK_LINES = 15


def _clip(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: max(0, limit - 1)] + "…"


def status_of(error: BaseException | None = None, *, exit_code: int | None = None) -> str:
    """How a run ended, ``OK``, ``FAILED`` or ``INTERRUPTED``: the rule of :func:`outcome`, without the words."""
    if exit_code is not None:
        if exit_code < 0 and -exit_code == _signal.SIGINT:
            return INTERRUPTED
        return OK if exit_code == 0 else FAILED
    if error is None or (isinstance(error, SystemExit) and error.code in (None, 0)):
        return OK
    if isinstance(error, (KeyboardInterrupt, GeneratorExit)) or type(error).__name__ == "CancelledError":
        return INTERRUPTED
    return FAILED


def should_post(status: str, *, on_error: bool, worth_it: bool = True) -> bool:
    """The one "post only on error" rule, for every front end that has such a switch.

    ``%%chat --on-error``, ``%chat_autonotify --on-error`` (and ``--run-all``),
    ``notify_when_done(on="error")``, the training callbacks' ``on="error"``
    and ``chat-magic run --on error`` all ask this. A failure (an exception,
    a non-zero exit, a training run whose metrics went NaN/inf) is always
    posted. Under ``on_error`` nothing else is, and an interrupt (Ctrl-C,
    a cancelled task, a child killed by SIGINT) is not a failure: whoever
    interrupted the run is there and knows. Otherwise a run is posted when the
    front end finds it ``worth_it`` (auto-notify: slow enough; the others:
    always), interrupted or not.
    """
    return status in FAILURES or (worth_it and not on_error)


def outcome(error: BaseException | None = None, *, exit_code: int | None = None, shell: Any = None) -> tuple[str, str, str]:
    """``(status, error line, traceback)`` for an exception, or for a process's exit status.

    - no exception, ``SystemExit(0)``, exit status 0: finished;
    - ``KeyboardInterrupt``, a cancelled task, ``GeneratorExit``, or a child
      killed by SIGINT: interrupted (no traceback: the user pressed Ctrl-C);
    - anything else: failed, with the exception's one-line summary and the
      last lines of its traceback.
    """
    status = status_of(error, exit_code=exit_code)
    if exit_code is not None:
        if exit_code == 0:
            return OK, "", ""
        if exit_code > 0:
            return FAILED, f"exit code {exit_code}", ""
        return status, f"killed by {signal_name(-exit_code)}", ""
    if status == OK or error is None:
        return OK, "", ""
    if status == INTERRUPTED:
        return INTERRUPTED, "cancelled" if type(error).__name__ == "CancelledError" else exception_summary(error), ""
    return FAILED, exception_summary(error), format_traceback(error, shell=shell)


def mark_reported(error: BaseException | None) -> None:
    """``error`` was posted in full (a failure card): a summary that meets it again names it, no more."""
    if error is None:
        return
    try:
        error.__chat_magic_reported__ = True  # type: ignore[attr-defined]
    except Exception:  # an exception type with __slots__: it may be reported twice
        pass


def was_reported(error: BaseException | None) -> bool:
    return bool(getattr(error, "__chat_magic_reported__", False))


def signal_name(signum: int) -> str:
    """``SIGTERM`` for 15 (``signal 99`` for a number with no name)."""
    try:
        return _signal.Signals(signum).name
    except ValueError:
        return f"signal {signum}"


def exception_summary(exc: BaseException) -> str:
    """``"ValueError: bad value"`` (never raises, even for a broken ``__str__``)."""
    name = type(exc).__qualname__
    try:
        msg = str(exc).strip()
    except Exception:
        msg = "<unprintable>"
    return f"{name}: {msg}" if msg else name


_CELL_FILE = re.compile(r"<ipython-input-(\d+)-[0-9a-f]+>|[/\\]ipykernel_\d+[/\\]\d+\.py$")


def _is_ipython_frame(frame: Any) -> bool:
    """IPython's own frames (``run_code``'s exec, the ``open`` wrapper) say nothing about the user's code."""
    return str(frame.f_globals.get("__name__", "")).startswith("IPython.")


# file name -> cell number, for the cells chat_magic itself has IPython compile (a %%chat cell's body): IPython 7's
# compiler keeps no such map (IPython 8+ has ``_filename_map``). Bounded: the oldest names are forgotten first.
_COMPILED: dict[str, int] = {}
_COMPILED_MAX = 1000
HISTORY_LOOKBACK = 500  # cells searched, newest first, for the one IPython 7 compiled into a file


def remember_cell(filename: str, number: int) -> None:
    """Record that IPython compiled cell ``number`` into ``filename`` (what its tracebacks will name)."""
    _COMPILED.pop(filename, None)
    _COMPILED[filename] = number
    while len(_COMPILED) > _COMPILED_MAX:
        del _COMPILED[next(iter(_COMPILED))]


def _number_in_history(filename: str, shell: Any) -> int | None:
    """The cell whose code IPython 7 under ipykernel compiled into ``filename``, found through the history.

    ipykernel names that file by a hash of the cell's code and keeps no
    record of its number; the shell's compiler (``get_code_name``) names each
    stored cell again until one matches.
    """
    name_of = getattr(getattr(shell, "compile", None), "get_code_name", None)
    cells = getattr(getattr(shell, "history_manager", None), "input_hist_raw", None)
    if not callable(name_of) or not isinstance(cells, list):
        return None
    try:
        for n in range(len(cells) - 1, max(0, len(cells) - HISTORY_LOOKBACK), -1):
            if name_of(cells[n], cells[n], n) == filename:
                return n
    except Exception:
        return None
    return None


def cell_name(filename: str, shell: Any = None) -> str | None:
    """``Cell In[4]`` for the file IPython compiled cell 4 into, else None (a real file).

    The number comes from IPython 8+'s own map, else from what chat_magic
    recorded (:func:`remember_cell`), else from the file name (IPython 7's
    ``<ipython-input-4-…>``), else from the history (IPython 7 in a kernel);
    ``Cell`` when none of these knows it.
    """
    number = None
    mapping = getattr(getattr(shell, "compile", None), "_filename_map", None)
    if isinstance(mapping, dict):
        number = mapping.get(filename)
    if number is None:
        number = _COMPILED.get(filename)
    m = _CELL_FILE.search(filename)
    if number is None and m is not None and m.group(1):
        number = m.group(1)
    if number is None and m is not None:
        number = _number_in_history(filename, shell)
    if number is not None:
        return f"Cell In[{number}]"
    return "Cell" if m is not None else None


def format_traceback(exc: BaseException, *, shell: Any = None, lines: int = TRACEBACK_LINES) -> str:
    """The last ``lines`` lines of ``exc``'s traceback, as a reader of the notice wants it.

    IPython's own frames are left out, and a cell's code shows as
    ``Cell In[4]`` rather than the temporary file IPython compiled it into.
    Chained exceptions (``raise ... from``) are kept. Never raises.
    """
    try:
        te = _traceback.TracebackException(type(exc), exc, exc.__traceback__)
        seen: set[int] = set()
        pending: list[tuple[_traceback.TracebackException, BaseException | None]] = [(te, exc)]
        while pending:
            node, err = pending.pop()
            if id(node) in seen:
                continue
            seen.add(id(node))
            node.stack = _user_frames(err.__traceback__ if err is not None else None, shell)
            for nxt, cause in ((node.__cause__, err.__cause__ if err is not None else None),
                               (node.__context__, err.__context__ if err is not None else None)):
                if nxt is not None:
                    pending.append((nxt, cause))
        text = "".join(te.format())
    except Exception:
        return ""
    return "\n".join(text.splitlines()[-lines:]) if lines else text


def _user_frames(tb: TracebackType | None, shell: Any) -> _traceback.StackSummary:
    frames = []
    for frame, lineno in _traceback.walk_tb(tb):
        if _is_ipython_frame(frame):
            continue
        filename = frame.f_code.co_filename
        line = linecache.getline(filename, lineno).strip()
        shown = cell_name(filename, shell) or filename
        frames.append(_traceback.FrameSummary(shown, lineno, frame.f_code.co_name, line=line, lookup_line=False))
    return _traceback.StackSummary.from_list(frames)


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return ""
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(round(seconds)), 60)
    if m < 60:
        return f"{m} min {s:02d} s"
    h, m = divmod(m, 60)
    return f"{h} h {m:02d} min"


@dataclass
class Report:
    """What to tell the space about a finished (or started) piece of work."""

    title: str
    status: str = OK
    duration: float | None = None
    output: str = ""  # captured stdout/stderr/result, untrusted
    error: str = ""  # "ValueError: bad value", untrusted
    traceback: str = ""  # the last traceback lines, untrusted
    details: dict[str, str] = field(default_factory=dict)  # e.g. {"Host": ..., "Notebook": ..., "Exit code": ...}
    mention: str | None = None  # "all", a user id or an e-mail: the only way a mention gets in
    max_lines: int | None = 40
    note: str = ""  # one extra trusted line (e.g. "[image/png]" summaries are in output instead)
    output_cut: int = 0  # characters already cut from the front of ``output`` before it got here
    metrics: list[_metrics.MetricSummary] = field(default_factory=list)  # last/best/sparkline per metric (metrics.py)
    figures: list[dict[str, Any]] = field(default_factory=list)  # card image widgets (images.Figures.widgets)
    sections: list[dict[str, Any]] = field(default_factory=list)  # more card sections (tables.frame_section)

    # -- pieces ----------------------------------------------------------------

    @property
    def headline(self) -> str:
        dur = format_duration(self.duration)
        word = WORDS.get(self.status, self.status)
        return f"{self.title} {word}" + (f" in {dur}" if dur and self.status != STARTED else "")

    @property
    def kind(self) -> str:
        """The kind of notice for the rank policy: failures post from any rank, the rest from rank 0."""
        return KINDS.get(self.status, _ranks.SUCCESS)

    def _mention_tag(self) -> str:
        if not self.mention:
            return ""
        m = str(self.mention).strip()
        if m.startswith("users/"):
            m = m[len("users/"):]
        return mention_tag(m) + " "

    @classmethod
    def from_outcome(
        cls,
        title: str,
        error: BaseException | None = None,
        *,
        exit_code: int | None = None,
        reason: str = "",
        scrub: Any = None,
        shell: Any = None,
        with_traceback: bool = True,
        **fields: Any,
    ) -> Report:
        """The notice for a piece of work that ended: the one place an outcome becomes a status.

        ``error`` is the exception the work raised (None: it returned), or
        ``exit_code`` a process's exit status (negative: killed by that
        signal, as :mod:`subprocess` reports it). ``reason`` replaces the
        error line (e.g. "command not found: x"). ``scrub`` is a function
        applied to every untrusted text (output, error, traceback) before
        anything is cut from it, so no cut can leave a fragment of a secret.
        ``shell`` (IPython's) names cells as ``Cell In[n]`` in the traceback.
        The rest (``duration``, ``output``, ``details``, ``mention``, ...) are
        :class:`Report` fields.
        """
        status, error_line, tb = outcome(error, exit_code=exit_code, shell=shell if with_traceback else None)
        if not with_traceback:
            tb = ""
        clean = scrub or (lambda text: text)
        if "output" in fields:
            fields["output"] = clean(fields["output"] or "")
        return cls(title, status=status, error=clean(reason or error_line), traceback=clean(tb), **fields)

    def _tail(self, text: str, budget: int, already: int = 0) -> str:
        text = strip_ansi(text)
        kept, cut = tail(text, max(0, budget), self.max_lines)
        if already > 0:
            return f"{cut_note(cut + already)}\n{kept}"
        if cut:
            lines_cut = text[: len(text) - len(kept)].count("\n")
            unit = f"characters ({lines_cut:,} lines)" if lines_cut else "characters"
            return f"{cut_note(cut, unit)}\n{kept}"
        return kept

    # -- renderings --------------------------------------------------------

    def text(self, limit: int = MAX_TEXT) -> str:
        """The report as Chat-syntax text, within ``limit`` characters."""
        head = f"{self._mention_tag()}{ICONS.get(self.status, '')} *{neutralize(self.headline)}*".strip()
        lines = [head]
        if self.error:
            lines.append(f"`{neutralize(self.error.splitlines()[0] if self.error else '')[:300].replace('`', 'ʼ')}`")
        facts = " · ".join(f"{neutralize(_clip(str(k), 60))}: {neutralize(_clip(str(v), 300))}" for k, v in self.details.items() if v not in (None, ""))
        if facts:
            lines.append(facts)
        if self.note:
            lines.append(self.note)
        lines.extend(_metrics.text_lines(self.metrics))
        body = "\n".join(lines)
        blocks = [(t, c) for t, c in ((self.output, self.output_cut), (self.traceback, 0)) if t and t.strip()]
        if blocks:
            room = limit - len(body) - 16 * len(blocks) - 200
            share = max(0, room // len(blocks))
            for t, already in blocks:
                kept = self._tail(t, share, already)
                cb = code_block(kept)
                if cb:
                    body += "\n" + cb
        return body[:limit]

    def card(self, card_id: str = "report", *, max_details: int = MAX_DETAILS, detail_chars: int = 1000,
             output_chars: int = 6000) -> dict[str, Any]:
        """The report as one ``cardsV2`` entry, within Chat's card limits.

        At most ``max_details`` detail rows (the rest are counted in one line,
        so a card never exceeds 100 widgets), each value cut at ``detail_chars``;
        the output and traceback tails at ``output_chars`` each, with a cut note.
        """
        max_details = max(0, min(max_details, MAX_DETAILS - _metrics.card_widgets(self.metrics)))
        color = COLORS.get(self.status, "#5f6368")
        widgets: list[dict[str, Any]] = []
        if self.error:
            first = html.escape(self.error.splitlines()[0][:500])
            label = "Why" if self.status in (STOPPED, DIVERGED) else "Error"  # a stop or a divergence is no exception
            widgets.append({"decoratedText": {"topLabel": label, "text": f'<font color="{color}">{first}</font>', "wrapText": True}})
        if self.duration is not None and self.status != STARTED:
            widgets.append({"decoratedText": {"topLabel": "Duration", "text": html.escape(format_duration(self.duration))}})
        shown = [(k, v) for k, v in self.details.items() if v not in (None, "")]
        for k, v in shown[:max_details]:
            widgets.append({"decoratedText": {"topLabel": html.escape(_clip(str(k), 60)), "text": html.escape(_clip(str(v), detail_chars)), "wrapText": True}})
        if len(shown) > max_details:
            widgets.append({"textParagraph": {"text": html.escape(f"[… {len(shown) - max_details:,} more details]")}})
        if self.note:
            widgets.append({"textParagraph": {"text": html.escape(self.note)}})
        sections: list[dict[str, Any]] = [{"widgets": widgets or [{"textParagraph": {"text": html.escape(WORDS.get(self.status, self.status))}}]}]
        if self.figures:
            sections.append({"widgets": list(self.figures)})
        sections += [s for s in [_metrics.card_section(self.metrics)] if s]
        sections += self.sections
        for label, t, already in (("Output", self.output, self.output_cut), ("Traceback", self.traceback, 0)):
            if t and t.strip():
                kept = self._tail(t, output_chars, already)
                sections.append({
                    "header": label,
                    "collapsible": True,
                    "uncollapsibleWidgetsCount": 1,
                    "widgets": [{"textParagraph": {"text": f"<pre>{html.escape(kept)}</pre>"}}],
                })
        return {
            "cardId": card_id,
            "card": {
                "header": {"title": f"{ICONS.get(self.status, '')} {self.headline}"[:200],
                           "subtitle": html.escape(_clip(str(self.details.get("Host") or ""), 100))},
                "sections": sections,
            },
        }

    def payload_kwargs(self, *, cards: bool = True) -> dict[str, Any]:
        """Arguments for ``send``/``Session.send``: a card with a text fallback, or text alone.

        A mention must be in ``text`` to notify anyone, so a report with a
        mention carries it there.
        """
        if not cards:
            return {"text": self.text()}
        fallback = f"{ICONS.get(self.status, '')} {self.headline}"[:1000]
        kwargs: dict[str, Any] = {"fallback_text": fallback}
        if self.mention:
            kwargs["text"] = f"{self._mention_tag()}{neutralize(_clip(self.headline, 300))}"
        guess = {k: v for k, v in (("text", kwargs.get("text", "")), ("fallbackText", fallback)) if v}
        guess["thread"] = {"threadKey": "x" * 100}  # refit() redoes this with the real envelope
        kwargs["cards"] = Cards([self._fitted_card(guess)], refit=lambda envelope: [self._fitted_card(envelope)])
        return kwargs

    def _fitted_card(self, envelope: dict[str, Any]) -> dict[str, Any]:
        """The richest card that, with ``envelope`` (text, fallback, thread), fits Chat's 32,000 bytes.

        Shortens the output sections until it fits, then (huge or countless
        details) the detail rows.
        """
        def fits(card: dict[str, Any]) -> bool:
            return payload_size({"cardsV2": [card], **envelope}) <= MAX_BYTES - 200

        for max_details, detail_chars in ((MAX_DETAILS, 1000), (MAX_DETAILS, 200), (40, 80), (10, 40)):
            budget = 6000
            card = self.card(max_details=max_details, detail_chars=detail_chars, output_chars=budget)
            while not fits(card) and budget > 200:
                budget //= 2
                card = self.card(max_details=max_details, detail_chars=detail_chars, output_chars=budget)
            if fits(card):
                break
        return card


class Cards(list):
    """A list of cards that can rebuild itself for the real envelope (see ``message.build_payloads``)."""

    def __init__(self, cards: list[dict[str, Any]], *, refit: Callable[[dict[str, Any]], list[dict[str, Any]]]) -> None:
        super().__init__(cards)
        self.refit = refit
