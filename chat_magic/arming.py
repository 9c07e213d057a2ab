"""Opening a block: its death notice armed, and everything that watches it started (see :mod:`chat_magic.deadman`).

A ``notify_when_done`` block, a ``%%chat`` cell, an auto-notified cell, a
training callback's run and ``chat-magic run`` call :func:`arm` before the
work starts. The first block of a process installs the termination signal
handlers (:mod:`chat_magic.termination`), registers the exit's last look
and spawns the watcher (:mod:`chat_magic.watcher`), all before its row is
armed: once it is, someone is watching. Each block then starts the hooks of
:mod:`chat_magic.stalls` and :mod:`chat_magic.heartbeat`.

This module is the one place that imports those modules so that their
hooks are registered (:mod:`chat_magic.hooks`) whenever a block opens;
none of them imports it, nor deadman any of them (no import cycle).
"""

from __future__ import annotations

import atexit
import json
import logging
import os
import sqlite3
import time
from typing import Any

from . import deadman, heartbeat, hooks, stalls, termination, watcher
from .console import say as _warn
from .errors import OutboxError

__all__ = ["arm"]

log = logging.getLogger("chat_magic")

HOOKED = (heartbeat, stalls, termination)  # imported for their hooks (on_arm, on_progress, on_close)

_exit_registered = False


def arm(webhook: Any, thread_key: str | None, *, title: str, details: dict[str, str] | None = None,
        cards: bool = True, to: Any = None, stall_after: float | None = None, job: str | None = None,
        probe: Any = None) -> deadman.Armed | None:
    """Write ``title``'s death notice to the outbox before the work starts; None (and one line) if it cannot be.

    ``to`` is the destination as the user named it (a space name, or None for
    the default): kept for ``chat-magic watch`` (never the URL).
    """
    from . import jobs, ranks
    from .delivery import dispatcher

    box: Any = None
    now = 0.0
    try:
        d = dispatcher()
        box = d.outbox
        deadman.retry_disarms()
        _at_first_arm(box)  # the watcher first: once the row is armed, someone is watching
        now = time.time()
        host = (details or {}).get("Host") or _hostname()
        rank = ranks.current()
        spec = {"title": title, "started": now, "details": dict(details or {}), "cards": bool(cards), "host": host,
                "pid": os.getpid(), "job": job or (jobs.identity() if rank.distributed else None),
                "rank": jobs.describe_rank(rank)}
        fallback = json.dumps({"text": f"💀 {title} died", **({"thread": {"threadKey": thread_key}} if thread_key else {})},
                              ensure_ascii=False)
        row_id = box.arm(webhook, thread_key, fallback, json.dumps(spec, ensure_ascii=False), now=now,
                         peak=deadman.peak_memory())
    except (OutboxError, sqlite3.Error, OSError) as e:
        # a storage fault (locked, disk full): the notice that follows says it, once, and is kept in memory
        log.warning("chat_magic: could not arm the death notice of %r: %s", title, e)
        termination.uninstall()  # no block of this one to close on SIGTERM: the program's handlers back if none is open
        return None
    except Exception as e:
        _warn(f"could not arm the death notice of {title!r} (if the process dies it goes unreported): {e}")
        termination.uninstall()
        return None
    except BaseException:  # an interrupt (Ctrl-C) while arming: a row it committed is nobody's
        _abandon(box, now, None)
        raise
    armed: deadman.Armed | None = None
    try:
        armed = deadman.Armed(row_id, box, title, started=now)
        deadman.register(armed)
        spec.update(to=to if isinstance(to, str) and "://" not in to else None, thread_key=thread_key,
                    stall_after=stall_after, job=job, webhook=webhook, probe=probe)
        for raised in hooks.call(hooks.on_arm, armed, spec):
            _warn(f"{title!r}: {type(raised).__name__}: {raised}")
    except BaseException:  # an interrupt after the row was committed: the caller never gets the block to close
        _abandon(box, now, armed)
        raise
    return armed


def _abandon(box: Any, now: float, armed: deadman.Armed | None) -> None:
    """An interrupt while a block opened: its row deleted (or left to the retry), its hooks closed, the handlers back.

    Without this, the row would stay armed with nobody to close it, and the
    watcher would post "💀 ... exited without closing it" for a block that
    never ran. A row committed by an :meth:`Outbox.arm` the interrupt cut
    short (its id never returned) is found by its owner and time. Never
    raises an Exception (the interrupt goes on).
    """
    try:
        if armed is not None:
            armed.disarm()  # the on_close hooks undo what on_arm started (stalls, heartbeat, the signal handlers)
        elif box is not None and now:
            from .outbox import owner_id

            held = {a.id for a in deadman.open_notices()}
            for row in box.armed_rows():
                if row["owner"] == owner_id() and row["created_at"] == now and row["id"] not in held:
                    deadman.disarm_row(box, int(row["id"]))
    except Exception as e:
        log.warning("chat_magic: could not undo an interrupted arm: %s", e)
    termination.uninstall()  # no block of this one to close on SIGTERM: the program's handlers back if none is open


def _hostname() -> str:
    from .hosts import current_host

    return current_host()


def _at_first_arm(box: Any) -> None:
    global _exit_registered
    termination.install()
    if not _exit_registered:
        _exit_registered = True
        atexit.register(_fire_own_at_exit)  # after the dispatcher's: runs before it (atexit is LIFO)
    watcher.ensure(box.path)


def _fire_own_at_exit() -> None:
    """Interpreter exit with blocks still open (a kernel shut down mid-cell, a daemon thread): fire them now."""
    from .outbox import owner_id

    deadman.retry_disarms_at_exit()  # closed while the outbox could not be written: try once more, patiently
    mine = deadman.open_notices()
    if not mine:
        return
    for box, open_ids in deadman.by_outbox(mine):
        try:
            ids = deadman.fire_dead(box, owner=owner_id(), ids=open_ids, cause_text="the process exited while it was still running",
                                    died_at=time.time(), icon="⏹️", verb="ended")
            from .delivery import dispatchers

            for d in dispatchers():
                if d.outbox is box:
                    d.mine.update(ids)  # the exit waits for them
        except Exception as e:
            _warn(f"could not post the notice of a block still open at exit: {e}")
    for a in mine:
        a.closed = True


def _after_fork_in_child() -> None:
    """A forked child registers its own exit look at its first block."""
    global _exit_registered
    _exit_registered = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
