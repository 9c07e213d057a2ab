"""Progress milestones in the thread: ``chat_magic.tqdm`` and :class:`ChatProgress`.

``chat_magic.tqdm`` is a drop-in ``tqdm.auto.tqdm`` (a widget in notebooks, a
text bar in terminals) that also posts milestones into the session thread::

    from chat_magic import tqdm
    for batch in tqdm(loader, desc="epoch 1"):
        ...

For a bar you already have, or any loop with a counter::

    bar = tqdm.auto.tqdm(total=1000)
    ChatProgress(bar)                      # hooks into that bar
    p = ChatProgress(label="export", total=80)
    p.update(n)                            # or report the count yourself

What gets posted, and how often:

- at 25, 50, 75 and 100 % (``milestones=``), with the rate, elapsed time and
  ETA taken from the bar (tqdm's ``format_dict`` and ``format_interval``);
- never more often than once every ``interval`` seconds (default 300) for one
  label in one thread: a milestone reached sooner is skipped (a later one
  replaces it), so nested per-epoch bars stay quiet. The final 100 % is always
  posted, except for a transient bar (tqdm ``leave=False``), which obeys the
  interval too;
- a bar of unknown length posts its count once per ``interval`` (at least a
  minute apart, the first an interval after the start) and a summary when it
  closes;
- only rank 0 of a distributed job posts (see :mod:`chat_magic.ranks`);
- inside ``with notify_when_done(...)`` the lines go to that block's thread.

Lines are plain text, so the delivery worker merges those that wait together:
the space's 1 message/second quota is never exceeded.

tqdm is an optional dependency: importing this module works without it, and
using ``chat_magic.tqdm`` then raises ``ImportError`` saying ``pip install tqdm``.
A missing webhook never stops a bar: one ``chat_magic: ...`` line, and the bar
goes on without posting.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import Any

from . import ranks as _ranks
from . import rules
from .console import say

__all__ = ["ChatProgress", "format_interval", "trange"]

DEFAULT_MILESTONES = (25, 50, 75, 100)
DEFAULT_INTERVAL = 300.0  # seconds: at most one line per label and thread per 5 minutes
UNKNOWN_MIN_INTERVAL = 60.0  # a bar without a total posts its count at most once a minute, whatever ``interval`` says

_last_post: dict[tuple[str, str], float] = {}  # (thread key, label) -> monotonic time of the last line
_plock = threading.Lock()

TQDM_MISSING = "chat_magic.tqdm needs the tqdm package: pip install tqdm"


def format_interval(seconds: float) -> str:
    """``01:02`` / ``1:02:03`` (tqdm's format when tqdm is installed)."""
    try:
        from tqdm.std import tqdm as _std

        return _std.format_interval(seconds)
    except ImportError:
        m, s = divmod(int(seconds), 60)
        h, m = divmod(m, 60)
        return f"{h:d}:{m:02d}:{s:02d}" if h else f"{m:02d}:{s:02d}"


def _num(x: float, scale: bool = False) -> str:
    if scale:
        try:
            from tqdm.std import tqdm as _std

            return _std.format_sizeof(x)
        except ImportError:
            pass
    if float(x).is_integer():
        return f"{int(x):,}"
    return f"{x:,.2f}"


class ChatProgress:
    """Post progress milestones of a loop into the thread.

    ``bar``: a tqdm bar to hook into (its ``update``/``close``/``reset``), or
    None to call :meth:`update` yourself. ``label``: what the lines say (default:
    the bar's ``desc``, else ``"progress"``). ``total``: the count at 100 %.
    ``milestones``: percentages to post at. ``interval``: minimum seconds
    between two lines for this label. ``final``: always post 100 %.
    ``to`` / ``thread_key`` / ``ranks``: as for ``notify_when_done`` (default:
    the enclosing ``notify_when_done`` block's, else the session's).
    """

    def __init__(
        self,
        bar: Any = None,
        *,
        label: str | None = None,
        total: float | None = None,
        milestones: Iterable[float] = DEFAULT_MILESTONES,
        interval: float = DEFAULT_INTERVAL,
        final: bool = True,
        unit: str = "it",
        to: Any = None,
        thread_key: str | None = None,
        ranks: str | None = None,
    ) -> None:
        ms = sorted({float(m) for m in milestones})
        if any(not 0 < m <= 100 for m in ms):
            from .errors import ConfigError

            raise ConfigError("milestones are percentages between 0 (excluded) and 100")
        if interval < 0:
            from .errors import ConfigError

            raise ConfigError("interval is a number of seconds >= 0")
        _ranks.policy(ranks)
        self.milestones = tuple(ms)
        self.interval = float(interval)
        self.final = final
        self.label = label
        self.total = total
        self.unit = unit
        self.to = to
        self.thread_key = rules.validate_thread_key(thread_key, option="thread_key")  # now, not at the first line
        self.ranks = ranks
        self.bar: Any = None  # the tqdm bar it is attached to, if any
        self.posted: list[str] = []  # the lines this object posted (or tried to), in order
        self._done: set[float] = set()
        self._t0 = time.monotonic()
        self._closed = False
        self._lock = threading.Lock()
        self._target: Any = None  # resolved lazily: (post function, thread key)
        self._disabled = False
        if bar is not None:
            self.attach(bar)

    # -- where lines go --------------------------------------------------

    def _resolve(self) -> tuple[Callable[[str], Any], str] | None:
        """(send, thread key) or None when this process does not post. Warns once on a set-up problem."""
        if self._disabled:
            return None
        if self._target is not None:
            return self._target
        from . import notify

        run = notify.active()
        if run is not None and self.to is None and self.thread_key is None:
            self._target = (lambda text: run.post(_ranks.PROGRESS, "progress line", text=text, truncate=True),
                            run.owner.thread_key or run.session.thread_key)
            return self._target
        if not _ranks.should_post(_ranks.PROGRESS, self.ranks):
            self._disabled = True
            return None
        from . import config

        try:
            webhook = config.resolve(self.to)
        except Exception as e:
            say(f"progress lines not posted: {e}")
            self._disabled = True
            return None
        sess = notify.session()

        def send(text: str) -> Any:
            try:
                return sess.send(text, to=webhook, thread_key=self.thread_key, truncate=True)
            except Exception as e:
                say(f"could not post a progress line: {e}")
                return None

        self._target = (send, self.thread_key or sess.thread_key)
        return self._target

    # -- the numbers -----------------------------------------------------

    def _state(self, n: float | None, total: float | None, elapsed: float | None, rate: float | None) -> dict[str, Any]:
        d: dict[str, Any] = {}
        bar = self.bar
        if bar is not None:
            try:
                d = dict(bar.format_dict)
            except Exception:
                d = {}
        if n is not None:
            d["n"] = n
        if total is not None:
            d["total"] = total
        if elapsed is not None:
            d["elapsed"] = elapsed
        if rate is not None:
            d["rate"] = rate
        d.setdefault("n", 0)
        if d.get("total") is None:
            d["total"] = self.total
        if d.get("elapsed") is None:
            d["elapsed"] = time.monotonic() - self._t0
        d.setdefault("unit", self.unit)
        if not d.get("rate") and d["elapsed"] and d["n"]:
            d["rate"] = d["n"] / d["elapsed"]
        return d

    def _label(self) -> str:
        if self.label:
            return self.label
        desc = getattr(self.bar, "desc", "") if self.bar is not None else ""
        desc = str(desc or "").strip().rstrip(":").strip()
        return desc or "progress"

    def line(self, d: dict[str, Any], *, closing: bool = False) -> str:
        """The text of one progress line (Chat syntax; label and unit neutralized)."""
        from .message import neutralize

        n, total, unit = d["n"], d.get("total"), str(d.get("unit") or "it")
        scale = bool(d.get("unit_scale"))
        rate, elapsed = d.get("rate"), float(d.get("elapsed") or 0)
        parts = []
        if total:
            pct = 100.0 * n / total
            done = pct >= 100
            parts.append(f"{pct:.0f}% ({_num(n, scale)}/{_num(total, scale)} {unit})")
        else:
            done = False
            parts.append(f"{_num(n, scale)} {unit}")
        if rate:
            if rate >= 1:
                parts.append(f"{_num(rate, scale) if scale else f'{rate:,.3g}'} {unit}/s")
            else:
                parts.append(f"{format_interval(1 / rate)}/{unit}")
        parts.append(f"elapsed {format_interval(elapsed)}")
        if total and not done and rate:
            parts.append(f"ETA {format_interval((total - n) / rate)}")
        icon = "✅" if done else ("⏹️" if closing else "⏳")
        return f"{icon} *{neutralize(self._label())}*: {neutralize(' · '.join(parts))}"

    # -- deciding --------------------------------------------------------

    def _post(self, text: str, *, force: bool = False, every: float | None = None) -> Any:
        target = self._resolve()
        if target is None:
            return None
        send, key = target
        slot = (key or "", self._label())
        now = time.monotonic()
        with _plock:
            last = _last_post.get(slot)
            if not force and last is not None and now - last < (self.interval if every is None else every):
                return None
            _last_post[slot] = now
        self.posted.append(text)
        return send(text)

    def update(self, n: float | None = None, total: float | None = None, *, elapsed: float | None = None, rate: float | None = None) -> Any:
        """Report the count ``n`` (of ``total``); posts a line when a milestone is crossed.

        Returns the Receipt of the line posted, or None. Never raises for a
        delivery or set-up problem.
        """
        if self._closed:
            return None
        try:
            with self._lock:
                d = self._state(n, total, elapsed, rate)
                tot = d.get("total")
                if tot:
                    pct = 100.0 * d["n"] / tot
                    crossed = [m for m in self.milestones if m <= pct + 1e-9 and m not in self._done]
                    if not crossed:
                        return None
                    self._done.update(crossed)
                    top = max(crossed)
                    return self._post(self.line(d), force=top >= 100 and self.final)
                # unknown length: a line per interval (at least a minute), the first one an interval after the start
                if not d["n"] or time.monotonic() - self._t0 < max(self.interval, UNKNOWN_MIN_INTERVAL):
                    return None
                return self._post(self.line(d), every=max(self.interval, UNKNOWN_MIN_INTERVAL))
        except Exception as e:  # never break the user's loop
            say(f"progress line not posted: {type(e).__name__}: {e}")
            return None

    def close(self, n: float | None = None) -> Any:
        """The loop ended: post 100 % if reached and not posted yet, or a summary for an unknown length."""
        if self._closed:
            return None
        try:
            with self._lock:
                d = self._state(n, None, None, None)
                tot = d.get("total")
                receipt = None
                if tot:
                    pct = 100.0 * d["n"] / tot
                    crossed = [m for m in self.milestones if m <= pct + 1e-9 and m not in self._done]
                    if crossed:
                        self._done.update(crossed)
                        receipt = self._post(self.line(d), force=max(crossed) >= 100 and self.final)
                elif d["n"]:
                    receipt = self._post(self.line(d, closing=True), force=self.final)
                self._closed = True
                return receipt
        except Exception as e:
            say(f"progress line not posted: {type(e).__name__}: {e}")
            return None

    def reset(self, total: float | None = None) -> None:
        """Start over (a bar reused with ``reset()``): milestones count again, the interval still holds."""
        with self._lock:
            self._done.clear()
            self._closed = False
            self._t0 = time.monotonic()
            if total is not None:
                self.total = total

    # -- hooking into an existing bar -------------------------------------

    def attach(self, bar: Any) -> Any:
        """Hook into a tqdm bar's ``update``, ``close`` and ``reset``; returns the bar."""
        self.bar = bar
        if getattr(bar, "leave", True) is False:
            self.final = False
        orig_update, orig_close, orig_reset = bar.update, bar.close, getattr(bar, "reset", None)
        chat = self

        def update(n: float = 1) -> Any:
            out = orig_update(n)
            chat.update()
            return out

        def close() -> None:
            if not getattr(bar, "disable", False):
                chat.close()
            return orig_close()

        bar.update = update
        bar.close = close
        if orig_reset is not None:

            def reset(total: float | None = None) -> Any:
                out = orig_reset(total=total)
                chat.reset(total)
                return out

            bar.reset = reset
        return bar


def _make_tqdm() -> Any:
    try:
        from tqdm.auto import tqdm as _base
    except ImportError:
        raise ImportError(TQDM_MISSING) from None

    class tqdm(_base):  # type: ignore[valid-type,misc]
        """``tqdm.auto.tqdm`` that also posts milestones into the thread.

        Extra keyword arguments (all optional): ``chat_label``,
        ``chat_milestones`` (default 25/50/75/100), ``chat_interval`` (seconds
        between two lines, default 300), ``chat_to``, ``chat_thread_key``,
        ``chat_ranks``, ``chat`` (False: a plain bar).
        """

        def __init__(
            self,
            *args: Any,
            chat: bool = True,
            chat_label: str | None = None,
            chat_milestones: Iterable[float] = DEFAULT_MILESTONES,
            chat_interval: float = DEFAULT_INTERVAL,
            chat_to: Any = None,
            chat_thread_key: str | None = None,
            chat_ranks: str | None = None,
            **kwargs: Any,
        ) -> None:
            self._chat: ChatProgress | None = None
            cp = None
            if chat:  # check the options before the bar draws
                cp = ChatProgress(label=chat_label, milestones=chat_milestones, interval=chat_interval,
                                  to=chat_to, thread_key=chat_thread_key, ranks=chat_ranks)
            super().__init__(*args, **kwargs)
            if cp is not None and not self.disable:
                cp.bar = self
                cp.final = bool(self.leave)
                self._chat = cp

        def update(self, n: float = 1) -> Any:
            out = super().update(n)
            if self._chat is not None:
                self._chat.update()
            return out

        def close(self) -> None:
            if not hasattr(self, "disable"):
                return  # refused before tqdm set itself up (a bad thread key): its __del__ must not raise
            chat = getattr(self, "_chat", None)
            if chat is not None and not self.disable:
                chat.close()
            super().close()

        def reset(self, total: float | None = None) -> None:
            super().reset(total=total)
            chat = getattr(self, "_chat", None)
            if chat is not None:
                chat.reset(total)

    tqdm.__module__ = __name__
    tqdm.__qualname__ = "tqdm"
    return tqdm


_tqdm_class = None


def __getattr__(name: str) -> Any:
    global _tqdm_class
    if name == "tqdm":
        if _tqdm_class is None:
            _tqdm_class = _make_tqdm()
        return _tqdm_class
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def trange(*args: Any, **kwargs: Any) -> Any:
    """``chat_magic.tqdm(range(*args), **kwargs)``."""
    return __getattr__("tqdm")(range(*args), **kwargs)
