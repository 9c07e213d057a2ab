"""Stalls: a block that stops making progress says so, and says when it moves again.

``notify_when_done(..., stall_after=600)``, ``ChatCallback(stall_after=600)``
and ``%chat_autonotify --stall-after 600`` watch an open block: when no
``update()``, ``log()``, epoch, step, progress line (``chat_magic.tqdm``) or,
for a cell, no output arrives for that long, one line goes to its thread:

    ⏸ *training*: no progress for 10 min (last: epoch 3: loss 0.25)

and when something arrives again:

    ▶️ *training* is moving again after 14 min (epoch 4: loss 0.22)

One daemon thread per process does the watching (the process is alive: a
thread is enough), only while a watched block is open. In a distributed job
the lines come from rank 0 (a hang stalls every rank).
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any

from . import hooks

__all__ = ["watch"]


@dataclass
class _Watch:
    armed: Any
    after: float
    webhook: Any
    thread_key: str | None
    last: float
    probe: Any = None  # for a cell: a function whose value changes when it prints (no hook in the writer)
    seen: Any = None
    stalled_since: float | None = None


_watches: dict[int, _Watch] = {}  # id(armed) -> watch
_lock = threading.Lock()
# shares _lock: taken with the C-level ``with _lock:`` (a Ctrl-C cannot land between taking it and the block,
# as it can inside the Python-level ``Condition.__enter__`` and leave it held: the next block close then hung)
_wake = threading.Condition(_lock)
_thread: threading.Thread | None = None


def watch(armed: hooks.Block, spec: dict[str, Any]) -> None:
    """Start watching an armed block if it asked for it (``stall_after``)."""
    after = spec.get("stall_after")
    if not after:
        return
    w = _Watch(armed, float(after), spec["webhook"], spec.get("thread_key"), time.monotonic(), spec.get("probe"))
    if w.probe is not None:
        w.seen = _value(w.probe)
    global _thread
    with _lock:
        _watches[id(armed)] = w
        if _thread is None or not _thread.is_alive():
            _thread = threading.Thread(target=_run, name="chat_magic-stalls", daemon=True)
            _thread.start()
        _wake.notify_all()


def _progress(armed: hooks.Block, now: float) -> None:
    w = _watches.get(id(armed))
    if w is None:
        return
    before, w.last = w.last, time.monotonic()
    if w.stalled_since is not None:
        w.stalled_since = None
        _post(w, f"▶️ *{{title}}* is moving again after {_minutes(w.last - before)} without progress"
                 + (" ({last})" if armed.last_progress else ""))


def _closed(armed: hooks.Block) -> None:
    with _lock:
        _watches.pop(id(armed), None)
        _wake.notify_all()


def _value(probe: Any) -> Any:
    try:
        return probe()
    except Exception:
        return None


def _run() -> None:
    global _thread
    while True:
        with _lock:
            if not _watches:
                if _thread is threading.current_thread():
                    _thread = None  # said under the lock watch() decides under: the next watched block starts a new one
                return
            watches = list(_watches.values())
        now = time.monotonic()
        wait = 5.0
        for w in watches:
            if w.probe is not None:
                value = _value(w.probe)
                if value != w.seen:
                    w.seen = value
                    text = value[1] if isinstance(value, tuple) and len(value) > 1 else None
                    w.armed.record(text)  # calls _progress
            idle = now - w.last
            if w.stalled_since is None and idle >= w.after:
                w.stalled_since = now
                last = " (last: {last})" if w.armed.last_progress else " (no progress recorded yet)"
                _post(w, f"⏸ *{{title}}*: no progress for {_minutes(idle)}{last}")
            due = (w.last + w.after - now) if w.stalled_since is None else 5.0
            wait = min(wait, max(0.05, min(w.after / 4, due) if w.probe is not None else due))
        with _lock:
            _wake.wait(min(wait, 5.0))


def _post(w: _Watch, template: str) -> None:
    """Queue one line into the block's thread (rank 0 only, as progress lines). Never raises."""
    from . import ranks
    from .console import say
    from .delivery import send
    from .message import neutralize

    try:
        if not ranks.should_post(ranks.PROGRESS):
            return
        text = template.format(title=neutralize(w.armed.title), last=neutralize(w.armed.last_progress[:300]))
        send(text, to=w.webhook, thread_key=w.thread_key, keep_on_fault=True)
    except Exception as e:
        say(f"could not post the stall line of {w.armed.title!r}: {type(e).__name__}: {e}")


def _minutes(seconds: float) -> str:
    from .report import format_duration

    return format_duration(max(0.0, seconds))


hooks.on_arm.append(watch)
hooks.on_progress.append(_progress)
hooks.on_close.append(_closed)
