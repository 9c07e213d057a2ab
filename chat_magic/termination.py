"""Termination signals: SIGTERM, SIGHUP and Slurm's warning signal close open blocks with a card that says so.

A job stopped by Kubernetes (pod deleted, evicted, preempted), by Slurm (time
limit, ``scancel``, preemption), by a spot VM's shutdown or by a closed SSH
session gets SIGTERM or SIGHUP; with ``--signal=USR1@60`` Slurm warns with
SIGUSR1 first. While a block (``notify_when_done``, a ``%%chat`` cell, an
auto-notified cell, a training callback's run, ``chat-magic run``) is open,
chat_magic handles these signals:

- the signal's previous handler is the default (the process ends): every
  open block gets a card "🛑 *label* was terminated after 12 min (terminated
  by SIGTERM — Kubernetes is stopping the pod ...)", queued as an important
  notice; the handler waits a little for its delivery (the watcher delivers
  the rest once the process is gone), then restores the default and sends
  the signal again, so the process ends exactly as it would have;
- the previous handler is the program's own (a checkpoint-and-requeue
  handler): one line "⚠️ *label* received SIGTERM (...)" goes to each open
  block's thread, then that handler runs; the blocks stay open;
- an ignored signal (``nohup``) stays ignored: nothing is installed for it.

Handlers are installed only from the main thread, when the first block
opens, and the previous ones are put back when the last block closes (if
nobody replaced ours meanwhile). SIGINT is never touched: Ctrl-C is
IPython's and ipykernel's (they raise ``KeyboardInterrupt``, which a block
reports as interrupted). ipykernel leaves SIGTERM and SIGHUP at their
default, so a kernel shut down mid-cell reports the cell the same way.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from typing import Any

from . import hooks
from .console import say as _warn

__all__ = ["describe", "install", "signals", "uninstall"]

WAIT = 10.0  # seconds the handler waits for the cards before the process ends (the watcher delivers the rest)

_prev: dict[int, Any] = {}  # signal -> the handler ours replaced


def signals() -> list[int]:
    """The signals handled here: SIGTERM, SIGHUP, and SIGUSR1 inside a Slurm job."""
    wanted = ["SIGTERM", "SIGHUP"]
    if os.environ.get("SLURM_JOB_ID"):
        wanted.append("SIGUSR1")
    return [getattr(signal, n) for n in wanted if hasattr(signal, n)]


def install() -> None:
    """Handle the termination signals (main thread only; never an ignored one). Idempotent; never raises."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in signals():
        if sig in _prev:
            continue
        try:
            old = signal.getsignal(sig)
            if old is signal.SIG_IGN or old is None:  # ignored (nohup), or set from C: leave it alone
                continue
            signal.signal(sig, _handle)
            _prev[sig] = old
        except (ValueError, OSError):
            pass


def uninstall() -> None:
    """Put the previous handlers back when no block is open (main thread; ours only)."""
    from .deadman import open_notices

    if threading.current_thread() is not threading.main_thread() or open_notices():
        return
    for sig, old in list(_prev.items()):
        try:
            if signal.getsignal(sig) is _handle:
                signal.signal(sig, old)
            _prev.pop(sig, None)
        except (ValueError, OSError):
            pass


def describe(sig: int, env: Any = None) -> str:
    """Why the process got ``sig``, as far as its environment tells (no network is asked)."""
    from .report import signal_name

    env = os.environ if env is None else env
    name = signal_name(sig)
    if name == "SIGUSR1" and env.get("SLURM_JOB_ID"):
        end = env.get("SLURM_JOB_END_TIME", "")
        try:
            left = max(0, round(float(end) - time.time()))
            return f"Slurm time limit in {left} s ({name})"
        except ValueError:
            return f"Slurm's warning signal ({name}): the time limit or a preemption is near"
    if name == "SIGHUP":
        return f"{name}: its terminal or SSH session closed"
    where = ""
    if env.get("SLURM_JOB_ID"):
        where = " — Slurm is stopping the job: cancelled, preempted or at its time limit"
    elif env.get("KUBERNETES_SERVICE_HOST"):
        where = " — Kubernetes is stopping the pod: deleted, evicted or preempted"
    elif "ipykernel" in __import__("sys").modules:
        where = " — the kernel was shut down or restarted"
    return f"terminated by {name}{where}"


def _handle(sig: int, frame: Any) -> None:
    prev = _prev.get(sig, signal.SIG_DFL)
    try:
        if callable(prev):
            _warn_blocks(sig)
        else:
            _close_blocks(sig)
    except Exception as e:  # never keep the process from ending as it would have
        _warn(f"could not post the termination notice: {type(e).__name__}: {e}")
    finally:  # a Ctrl-C during the wait too: the blocks are closed as terminated, so the process must end as it would have
        _pass_on(sig, frame, prev)


def _pass_on(sig: int, frame: Any, prev: Any) -> None:
    """What the signal would have done without chat_magic: the program's handler, or the default action (the end)."""
    if callable(prev):
        prev(sig, frame)
        return
    try:
        signal.signal(sig, signal.SIG_DFL)
    except (ValueError, OSError):
        pass
    os.kill(os.getpid(), sig)


def _close_blocks(sig: int) -> None:
    """The process ends: every open block gets its termination card (important), then a bounded wait."""
    from . import deadman
    from .delivery import dispatcher
    from .outbox import owner_id

    deadman.retry_disarms(wait=1.0)  # closed blocks whose delete failed: this process ends now, nobody retries them later
    mine = deadman.open_notices()
    if not mine:
        return
    text = describe(sig)
    ids: list[int] = []
    for box, open_ids in deadman.by_outbox(mine):
        ids += deadman.fire_dead(box, owner=owner_id(), ids=open_ids, cause_text=text, died_at=time.time(), icon="🛑",
                                 verb="was terminated", peak=deadman.peak_memory())
    for a in mine:
        a.closed = True
        deadman.forget(a)
    if ids:
        d = dispatcher()
        d.mine.update(ids)
        d.wake()
        d.ensure_running()
        if not d.wait_for(ids, WAIT):
            _warn(f"{text}: the notice is queued; the watcher or the next chat_magic process delivers it")


def _warn_blocks(sig: int) -> None:
    """The program handles the signal itself: one line into each open block's thread, blocks stay open."""
    from . import deadman
    from .delivery import send
    from .message import neutralize

    text = describe(sig)
    for a in deadman.open_notices():
        target = a.outbox.armed_target(a.id)
        if target is None:
            continue
        receipt = send(f"⚠️ *{neutralize(a.title)}* received {neutralize(text)}", to=target[0], thread_key=target[1],
                       keep_on_fault=True)
        deadman.mark_important(receipt)


def _closed(block: hooks.Block) -> None:
    uninstall()  # after the last block closes: the program's own handlers back


hooks.on_close.append(_closed)
