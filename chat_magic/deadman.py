"""Dead-man notices: a block that never closes still reports.

When a ``notify_when_done`` block, a ``%%chat`` cell, an auto-notified cell,
a training callback's run or ``chat-magic run`` opens, its death notice is
written to the outbox *before the work starts*, as a row in the state
``armed`` owned by this process (``host:pid/start``). Closing normally
deletes it in the transaction that queues the completion notice
(``send(..., disarm=armed.replacing())``), or right after when none is
posted. An armed row is
never claimed, merged or counted as waiting: only :func:`fire_dead` turns
it into a pending message, in one transaction (the row deleted only while
still armed, then the notice inserted: :meth:`Outbox.fire_armed`), so it is
posted exactly once, whoever fires it, and after whatever the dead process
queued before.

Who fires it:

- the watcher (:mod:`chat_magic.watcher`), a small process spawned once per
  process, in a session of its own (a kernel restart or ``killpg`` does not
  take it along), that waits for this process to die; ``CHAT_MAGIC_WATCHER=off``
  turns it off;
- any later chat_magic process on this host (its dispatcher looks once at start);
- this process itself at interpreter exit, for blocks still open then (a
  kernel shut down mid-cell, a daemon thread).

What it says: "💀 *label* died after 12 min (killed by SIGKILL — out of
memory?)", with when it started, the last progress line, the peak memory seen
and the cause as far as it can be known (see :func:`cause`).

Who imports whom (no cycle): this module sits below :mod:`chat_magic.delivery`
(whose dispatcher fires orphans at start and asks :func:`exit_wait` at exit)
and above the outbox (whose SQL it calls through public methods); opening a
block, which starts the watcher and the signal handlers, is
:func:`chat_magic.arming.arm`, above them all. The modules that watch a block
register in :mod:`chat_magic.hooks`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from . import (
    heartbeat,  # noqa: F401 - its on_fired hook: whoever fires a notice forgets the block in Redis
    hooks,
)
from .console import say as _warn

__all__ = [
    "Armed", "by_outbox", "cause", "death_message", "disarm_row", "exit_wait", "fire_dead", "fire_orphans", "fired", "forget", "mark_important",
    "moved_notices", "notice_payloads", "open_notices", "peak_memory", "register", "retry_disarms", "retry_disarms_at_exit",
]

log = logging.getLogger("chat_magic")

RECORD_EVERY = 2.0  # seconds between two progress writes of one open block (update() lines always)


@dataclass
class Armed:
    """One open block's armed death notice (a row of ``outbox``); made by :func:`chat_magic.arming.arm`."""

    id: int
    outbox: Any
    title: str
    pid: int = field(default_factory=os.getpid)
    started: float = field(default_factory=time.time)
    last_write: float = 0.0
    last_progress: str = ""
    closed: bool = False
    replaced: bool = False  # a completion card queued with ``disarm=`` took the row with it (see :meth:`replacing`)
    extra: dict[str, Any] = field(default_factory=dict)  # stalls.py and heartbeat.py keep their state here

    def record(self, text: str | None = None, *, force: bool = False) -> None:
        """Remember a sign of life (and ``text``, the last progress line); written at most every 2 s unless ``force``."""
        if self.closed or self.pid != os.getpid():
            return
        now = time.time()
        if text:
            self.last_progress = text[:500]
        hooks.call(hooks.on_progress, self, now)
        if not force and now - self.last_write < RECORD_EVERY:
            return
        self.last_write = now
        try:
            self.outbox.record_progress(self.id, self.last_progress or None, beat=now, peak=peak_memory())
        except Exception:
            # not worth a line (the notice is armed already), nor a training loop held up: try again in 30 s
            self.last_write = now + 30.0

    def replacing(self) -> int | None:
        """The ``disarm=`` of the completion or failure card that replaces this notice (None: nothing to replace).

        ``send(..., disarm=armed.replacing())`` queues the card and deletes
        the armed row in one transaction (:meth:`Outbox.enqueue`): a kill at
        any moment leaves one of the two, never both. Once ``send`` returns,
        set :attr:`replaced`; :meth:`disarm` then has no row to delete.
        """
        return self.id if not self.closed and self.pid == os.getpid() else None

    def disarm(self) -> None:
        """The block closed normally: forget its death notice. Never raises (but lets an interrupt through).

        The row is deleted, or put on the retry list, whatever the hooks do:
        a Ctrl-C in one of them (heartbeat's is a Redis call) or in the delete
        itself must not leave a row nobody holds (a false "💀 ... exited").
        Every hook runs even if one is interrupted (:func:`hooks.call`); the
        interrupt goes on after the delete.
        """
        if self.closed or self.pid != os.getpid():
            return
        self.closed = True
        try:
            forget(self)
            hooks.call(hooks.on_close, self)  # heartbeat, stalls; termination puts the signal handlers back after the last
        finally:
            if not self.replaced:  # else gone with the card's transaction (or, the card kept in memory, when it is queued)
                disarm_row(self.outbox, self.id)


def disarm_row(box: Any, row_id: int, *, wait: float | None = None) -> None:
    """Delete an armed row of this process, or keep it for a retry (later, and at exit) if the outbox cannot take it.

    An interrupt inside the delete keeps it for the retry too, then goes on
    (a delete that committed first is harmless to retry).
    """
    try:
        done = _delete(box, row_id, wait=wait)
    except BaseException:
        _undone.append((box, row_id))
        raise
    if not done:
        _undone.append((box, row_id))  # the outbox is locked or full: retried later, and at exit


def _delete(box: Any, row_id: int, *, wait: float | None = None) -> bool:
    """Delete an armed row; False if the outbox cannot be written now (it is retried: never a false death notice)."""
    try:
        box.disarm(row_id, wait=wait)
        return True
    except Exception as e:
        log.warning("chat_magic: could not disarm death notice %s yet: %s", row_id, e)
        return False


def retry_disarms(*, wait: float | None = None) -> None:
    """Delete the armed rows of closed blocks that the outbox could not take when they closed.

    ``wait``: how long another process's lock may hold up each delete (None:
    the outbox's busy timeout); the first that fails ends this try.
    """
    while _undone:
        box, row_id = _undone[0]
        if not _delete(box, row_id, wait=wait):
            return
        _undone.pop(0)


EXIT_RETRY = 10.0  # seconds the exit gives, in all, to the rows of closed blocks still armed


def retry_disarms_at_exit(budget: float = EXIT_RETRY) -> None:
    """The last try, patiently, for closed blocks still armed: ``budget`` seconds in all, then one line for the rest.

    One deadline for every row, not a wait each: with another process holding
    the write lock, the exit would otherwise hang 10 s per closed block.
    """
    deadline = time.monotonic() + budget
    error: Exception | None = None
    for box, row_id in list(_undone):
        left = deadline - time.monotonic()
        if left <= 0:
            break
        try:
            box.disarm(row_id, wait=left)
            _undone.remove((box, row_id))
        except Exception as e:
            error = e
    if _undone:
        n = len(_undone)
        where = ", ".join(sorted({str(box.path) for box, _ in _undone}))
        why = f" ({error})" if error is not None else f" (not written within {budget:g} s)"
        what = f"{n} closed blocks' death notices are" if n > 1 else "a closed block's death notice is"
        _warn(f"{what} still armed in {where}{why}: the watcher may post {'them' if n > 1 else 'it'} as if the process had died")


_undone: list[tuple[Any, int]] = []  # (outbox, row id) of closed blocks still armed in the outbox
_open: dict[tuple[str, int], Armed] = {}  # every armed notice of this process not closed yet
# guards _open; reentrant: the SIGTERM handler (termination.py) reads it on the main thread, maybe while it holds it
_lock = threading.RLock()


def open_notices() -> list[Armed]:
    """This process's open blocks (a forked child has none of its parent's)."""
    with _lock:
        return [a for a in _open.values() if a.pid == os.getpid()]


def by_outbox(blocks: list[Armed]) -> list[tuple[Any, list[int]]]:
    """``blocks`` grouped by outbox file: ``(outbox, their row ids)``, what :func:`fire_dead`'s ``ids=`` takes.

    When this process fires its own open blocks (termination, exit), only
    their rows: a closed block's row still armed goes with its card kept in
    memory, or its retried delete, never a second notice.
    """
    boxes: dict[str, Any] = {}
    ids: dict[str, list[int]] = {}
    for a in blocks:
        path = str(a.outbox.path)
        boxes[path] = a.outbox
        ids.setdefault(path, []).append(a.id)
    return [(boxes[path], ids[path]) for path in boxes]


def register(armed: Armed) -> None:
    """A block opened: it is open until :func:`forget` (its close, its termination, the exit)."""
    with _lock:
        _open[(str(armed.outbox.path), armed.id)] = armed


def forget(armed: Armed) -> None:
    """A block is no longer open (closed, or its notice fired by this process)."""
    with _lock:
        _open.pop((str(armed.outbox.path), armed.id), None)


def peak_memory() -> int:
    """This process's peak resident memory in bytes (``VmHWM``; ``ru_maxrss`` where there is no /proc)."""
    hwm = _status_kib(os.getpid(), "VmHWM")
    if hwm:
        return hwm * 1024
    try:
        import resource

        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(rss if sys.platform == "darwin" else rss * 1024)
    except Exception:
        return 0


def _status_kib(pid: int, name: str) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(name.encode() + b":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


def exit_wait(d: Any, mine: list[int], settings: Any) -> tuple[list[int], float]:
    """The exit policy: which of this process's waiting messages to wait for at exit, and for how long.

    While a completion, failure, termination or death notice waits: those,
    for ``CHAT_MAGIC_EXIT_TIMEOUT`` seconds if set, else 30 s, said in one
    line; else every message, for the usual short window (3 s). ``d`` is the
    dispatcher, ``settings`` delivery's. Never raises.
    """
    try:
        if not mine:
            return mine, settings.exit_timeout
        told = [i for i in mine if i not in d.reported][:900]  # a caller that waited and told the user: not again
        important = d.outbox.important_waiting(told)
        if not important:
            return mine, settings.exit_timeout
        timeout = settings.exit_timeout_or(30.0)  # a bad value: one line, and 30 s here
        if timeout <= 1.0:
            return mine, timeout
        if d.wait_for(important, 1.0):  # most are gone within a second: no line then
            return [], 0.0
        n = len(important)
        _warn(f"waiting up to {timeout:g} s for {n} completion notice{'s' if n > 1 else ''} to be delivered "
              "(CHAT_MAGIC_EXIT_TIMEOUT sets how long)")
        return important, max(0.0, timeout - 1.0)
    except Exception:
        return mine, settings.exit_timeout


def mark_important(receipt: Any) -> None:
    """Flag a queued completion/failure notice: the exit waits for it, the watcher delivers it. Never raises."""
    try:
        ids = list(getattr(receipt, "ids", ()) or ())
        box = getattr(receipt, "outbox", None)
        if ids and box is not None:
            box.mark_important(ids)
    except Exception:
        pass


# -- firing ------------------------------------------------------------------------


def cause(exit_status: int | None = None, oom_kills: int = 0) -> str:
    """What ended the process, as far as it can be known, said honestly.

    ``exit_status`` is the kernel's wait status read from ``/proc`` while the
    process was a zombie (None when it was reaped first); ``oom_kills`` how
    many OOM kills its memory cgroup counted meanwhile.
    """
    from .report import signal_name

    if oom_kills > 0:
        return "killed by the out-of-memory killer — its memory cgroup counted the kill"
    if exit_status is None:
        return "ended abruptly: killed (SIGKILL or out of memory) or os._exit"
    sig = exit_status & 0x7F
    if sig == 0:
        return f"exited with code {(exit_status >> 8) & 0xFF} without closing it (os._exit?)"
    name = signal_name(sig)
    if name == "SIGKILL":
        return "killed by SIGKILL — out of memory?"
    if name in ("SIGSEGV", "SIGBUS", "SIGILL", "SIGFPE", "SIGABRT"):
        return f"crashed ({name})"
    return f"killed by {name}"


def _fmt_bytes(size: int | None) -> str:
    if not size:
        return ""
    n = float(size)
    for unit in ("bytes", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def death_message(spec: dict[str, Any], row: dict[str, Any], *, cause_text: str, died_at: float | None,
                  peak: int = 0, icon: str = "💀", verb: str = "died") -> dict[str, Any]:
    """``send`` arguments for a death notice: a card with a text fallback (or text alone)."""
    import html

    from .message import neutralize
    from .report import format_duration

    title = str(spec.get("title") or "block")
    started = float(spec.get("started") or row.get("created_at") or time.time())
    if died_at is not None:
        when = f"{verb} after {format_duration(max(0.0, died_at - started))}"
    else:
        last = float(row.get("beat") or started)
        when = f"died (found later; last sign of life {format_duration(max(0.0, last - started))} after it started)"
    head = f"{icon} {title} {when}"
    text = f"{icon} *{neutralize(title)}* {neutralize(when)} ({neutralize(cause_text)})"
    facts = {"Cause": cause_text, "Started": time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(started))}
    if row.get("progress"):
        facts["Last progress"] = str(row["progress"])
    memory = _fmt_bytes(max(int(row.get("peak") or 0), int(peak or 0)))
    if memory:
        facts["Peak memory"] = memory
    facts.update({str(k): str(v) for k, v in (spec.get("details") or {}).items() if v})
    if not spec.get("cards", True):
        lines = [text, " · ".join(f"{neutralize(k)}: {neutralize(v[:300])}" for k, v in facts.items() if k != "Cause")]
        return {"text": "\n".join(lines)}
    widgets = [{"decoratedText": {"topLabel": html.escape(k), "text": html.escape(v[:1000]), "wrapText": True}}
               for k, v in facts.items()]
    card = {"cardId": "death", "card": {"header": {"title": head[:200], "subtitle": html.escape(str(spec.get("host") or "")[:100])},
                                        "sections": [{"widgets": widgets}]}}
    return {"cards": [card], "fallback_text": f"{head} ({cause_text})"[:1000]}


def fire_dead(box: Any, *, owner: str | None = None, cause_text: str | None = None, exit_status: int | None = None,
              oom_kills: int = 0, died_at: float | None = None, peak: int = 0, ids: Any = None,
              **wording: str) -> list[int]:
    """Turn armed rows into pending death notices: those of ``owner``, or (None) of every dead owner on this host.

    ``ids``: only these rows (the still-open blocks of this process, when it
    fires its own: a closed block's row still armed waits for its card kept
    in memory, or for the retry of its delete, never a second notice).
    Returns the ids of the messages queued. Exactly once: each row is
    deleted while still armed and its notice inserted in one transaction
    (:meth:`Outbox.fire_armed`); a row another process fired meanwhile is
    skipped.
    """
    from .outbox import armed_spec, owner_alive

    rows = box.armed_rows()
    if ids is not None:
        wanted = set(ids)
        rows = [r for r in rows if r["id"] in wanted]
    if owner is not None:
        rows = [r for r in rows if r["owner"] == owner]
    else:
        rows = [r for r in rows if not owner_alive(r["owner"])]
    queued: list[int] = []
    for row in rows:
        spec = armed_spec(row)
        webhook = box.webhook(row["dest"])
        text = cause_text or cause(exit_status, oom_kills)
        payloads = notice_payloads(box, spec, row, webhook, cause_text=text, died_at=died_at, peak=peak, **wording)
        ids = box.fire_armed(row, [json.dumps(p, ensure_ascii=False, separators=(",", ":")) for p in payloads])
        if ids is None:
            continue  # fired (or closed) by someone else meanwhile
        queued += ids
        fired(spec, row)
    return queued


def notice_payloads(box: Any, spec: dict[str, Any], row: dict[str, Any], webhook: Any, *, cause_text: str,
                    died_at: float | None, peak: int = 0, **wording: str) -> list[dict[str, Any]]:
    """The built messages of one armed row's death notice (a rank's after the job's first failure: a line)."""
    from .message import build_payloads

    kwargs = death_message(spec, row, cause_text=cause_text, died_at=died_at, peak=peak, **wording)
    if spec.get("job"):  # a rank of a distributed job: the first failure of the job is the card, the rest lines
        from . import jobs

        first = jobs.first_failure(str(spec["job"]), str(spec.get("rank") or ""), cause_text, box=box)
        if first is not None:
            kwargs = {"text": jobs.as_line(str(spec.get("title") or ""), cause_text, first)}
    return build_payloads(kwargs.get("text"), cards=kwargs.get("cards"), fallback_text=kwargs.get("fallback_text"),
                          thread_key=row["thread_key"], truncate=True, webhook=webhook)


def fired(spec: dict[str, Any], row: dict[str, Any]) -> None:
    """A death notice was queued for ``row``: tell the hooks (heartbeat.py forgets the block in Redis). Never raises."""
    hooks.call(hooks.on_fired, spec, row)


def moved_notices(box: Any, rows: list[dict[str, Any]], urls: dict[Any, str]) -> list[tuple[dict[str, Any], list[str]]]:
    """Death notices for the armed rows of a vanished host's file (:meth:`Outbox.take_over`), as JSON bodies.

    Their owners ran on a host no process uses the file of any more: they
    are dead, and nobody saw how. Built before the take-over's transaction
    (a distributed job's first failure is recorded in its own).
    """
    from .outbox import armed_spec
    from .webhook import parse_webhook_url

    out = []
    for row in rows:
        spec = armed_spec(row)
        host = str(spec.get("host") or str(row.get("owner") or "").rpartition(":")[0] or "its host")
        text = f"its host {host} is gone (the machine or container stopped, or restarted under another name)"
        payloads = notice_payloads(box, spec, row, parse_webhook_url(urls[row["dest"]]), cause_text=text, died_at=None)
        out.append((row, [json.dumps(p, ensure_ascii=False, separators=(",", ":")) for p in payloads]))
    return out


hooks.death_notices = moved_notices  # the outbox's take-over words them here (delivery imports this module first)


def fire_orphans(box: Any) -> list[int]:
    """Fire the armed notices of processes on this host that died unreported (a later process does this). Never raises."""
    try:
        ids = fire_dead(box)
    except Exception as e:
        _warn(f"could not check for blocks of dead processes: {e}")
        return []
    return ids


def _after_fork_in_child() -> None:
    """A forked child owns none of its parent's blocks (their rows name the parent)."""
    global _lock
    _lock = threading.RLock()  # it may have been held by another thread at the fork
    _open.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
