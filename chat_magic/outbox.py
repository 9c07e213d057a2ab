"""The durable outbox: one SQLite file shared by every process on the machine.

A message is written here before ``send`` returns, and leaves only when the
space has it (``sent``) or refused it for good (``failed``, kept for the user).
The file also holds each space's pacing slot (see :class:`chat_magic.pacing.SqlitePacer`), so
every process that posts to one space shares its 1 request/second quota.

States: ``pending`` -> ``sending`` (claimed under a lease by one process) ->
``sent`` | ``failed`` | back to ``pending`` with a retry time. Short plain-text
messages to one thread of one destination that wait together are *merged*
into the oldest one, which carries them (their state becomes ``merged``).

Destinations: a webhook's canonical URL is stored once, in ``destination``;
messages refer to it by id. Two spellings of one webhook are one destination,
so order within a thread follows the destination, not the URL string.

A process killed mid-delivery leaves its row ``sending``: the next claim takes
it back as soon as that process is gone (a zombie counts as gone; so does a
pid reused by another process) or its lease runs out, and sends it again with
the same ``requestId``.

Storage faults are loud and lose nothing:

- every SQLite or file-system error leaves this module as a one-line
  :class:`OutboxError`;
- a damaged file is moved aside (``outbox.sqlite3.corrupt-<time>``), the rows
  that can still be read are salvaged into a new outbox (same ids and
  requestIds), and the user is told in one line on stderr;
- a file that cannot be used at all (a folder in its place, no permission)
  makes the process use a temporary outbox, said in one line on stderr;
  :meth:`Outbox.stranded` counts what still waits in the configured one.

The file is the user's alone (:func:`private_files`), stays small (delivered
rows are pruned to the newest :data:`KEEP_SENT`, the write-ahead log is cut
back when idle), and opens in the same time whatever its size (no integrity
scan on open). Times shared between processes are wall-clock times; one
implausibly far ahead (the clock stepped back) is not waited for (:func:`_ahead`).

All SQL of the package lives here, and every statement of the process,
whoever issues it, holds one gate (:class:`_GatedConnection`): a fork waits
for it, so no child inherits a statement half-way ("database is locked").

Nothing here knows about IPython or HTTP.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import re
import sqlite3
import stat
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from . import hooks
from .console import say
from .errors import OutboxError
from .hosts import ACTIVE_WINDOW, current_host, hold_live, legacy_path, let_go, live_path
from .message import MAX_BYTES, MAX_TEXT, SEPARATOR, merge_texts
from .pacing import RedisSlot, SqlitePacer  # SqlitePacer: still importable here (its old home)
from .webhook import redact

if TYPE_CHECKING:  # pragma: no cover
    from .webhook import Webhook

__all__ = [
    "ARMED", "DROPPED", "FAILED", "KEEP_SENT", "LOST", "MAX_HOLD", "MERGED", "PENDING", "SENDING", "SENT", "STATES",
    "TERMINAL", "Job", "Outbox", "PacingTable", "Row", "SqlitePacer", "State", "heal_gate", "in_use", "inside", "keep_sent",
    "legacy_to_drain", "private_files", "private_folder", "unfinished",
    "armed_spec", "hold_for_fork", "owner_alive", "owner_id",  # the dead-man modules' doors
]

log = logging.getLogger("chat_magic")

class State(str, Enum):
    """A message's state, as the ``state`` column stores it (its value; every version reads the same text).

    A ``str`` too, so SQL parameters, f-strings in SQL, JSON and comparisons
    with a row's plain text all see the value (``(str, Enum)``, not
    ``StrEnum``: Python 3.10 is supported).
    """

    PENDING = "pending"
    SENDING = "sending"  # claimed by a worker, under a lease
    SENT = "sent"
    FAILED = "failed"  # refused by the space: kept until ``chat-magic outbox retry``
    MERGED = "merged"  # its text rides in another message (``merged_into``)
    # a death notice waiting for its owner to die (deadman.py): never claimed, merged or counted as waiting;
    # only deadman.fire turns it into a pending message, or closing deletes it
    ARMED = "armed"

    def __str__(self) -> str:
        return self.value  # the text, not "State.SENT", wherever it is printed or formatted

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)  # 3.11 changed Enum's format of a mixin to "State.SENT": keep the value

    def __hash__(self) -> int:
        return hash(self.value)  # a member and its text are one dict key (rows carry the text)


PENDING, SENDING, SENT, FAILED, MERGED, ARMED = State  # the names SQL and other modules use
STATES = tuple(State)  # every state this version knows (``chat-magic outbox list``)
TERMINAL = (SENT, FAILED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS destination (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    digest      TEXT    NOT NULL UNIQUE,
    url         TEXT    NOT NULL,
    space_key   TEXT    NOT NULL
);
CREATE TABLE IF NOT EXISTS message (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id  TEXT    NOT NULL UNIQUE,
    dest        INTEGER NOT NULL,
    space_key   TEXT    NOT NULL,
    thread_key  TEXT,
    payload     TEXT    NOT NULL,
    mergeable   INTEGER NOT NULL DEFAULT 0,
    state       TEXT    NOT NULL,
    attempts    INTEGER NOT NULL DEFAULT 0,
    next_at     REAL    NOT NULL,
    created_at  REAL    NOT NULL,
    updated_at  REAL    NOT NULL,
    owner       TEXT,
    lease_until REAL,
    merged_into INTEGER,
    name        TEXT,
    thread_name TEXT,
    error_code  INTEGER,
    error_status TEXT,
    error       TEXT
);
CREATE INDEX IF NOT EXISTS message_state ON message(state, space_key, id);
CREATE INDEX IF NOT EXISTS message_merged ON message(merged_into);
CREATE TABLE IF NOT EXISTS pacing (
    space_key TEXT PRIMARY KEY,
    next_slot REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS job_failure (
    job     TEXT PRIMARY KEY,
    rank    TEXT,
    summary TEXT,
    at      REAL
);
CREATE TABLE IF NOT EXISTS blob (
    sha256 TEXT PRIMARY KEY,
    data   BLOB NOT NULL,
    mime   TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS forgotten (
    lo  INTEGER PRIMARY KEY,
    hi  INTEGER NOT NULL,
    why TEXT    NOT NULL
);
"""
# Columns added after the first release, applied to an existing file with ALTER TABLE when missing
# (a file written by an older chat_magic keeps its rows). Append one line per column; never reorder.
# (table, column, declaration)
_ADDED_COLUMNS: list[tuple[str, str, str]] = [
    ("message", "images", "TEXT"),  # figures to upload before the POST: {"store": ..., "images": [[sha256, mime]]} (images.py)
    ("message", "own_payload", "TEXT"),  # a head that carries merged messages: its own body, to rebuild from
    ("message", "armed", "TEXT"),  # an armed death notice: what to say if its owner dies (deadman.py); NULL otherwise
    ("message", "progress", "TEXT"),  # armed rows: the last progress line the owner recorded
    ("message", "beat", "REAL"),  # armed rows: when the owner last showed a sign of life
    ("message", "peak", "INTEGER"),  # armed rows: the owner's peak memory (bytes) when it last recorded progress
    ("message", "important", "INTEGER NOT NULL DEFAULT 0"),  # a completion, failure or death notice: the exit waits for it
]
_COLUMNS = ("id", "request_id", "dest", "space_key", "thread_key", "payload", "mergeable", "state", "attempts", "next_at",
            "created_at", "updated_at", "owner", "lease_until", "merged_into", "name", "thread_name", "error_code",
            "error_status", "error", "images", "own_payload")
# Times written by another process's wall clock that lie further ahead than this are not believed:
# the clock stepped back since (see _ahead). A space is held, or a retry waits, at most 300 s
# (Retry-After is capped there); a lease is renewed while its request is in flight.
MAX_HOLD = 330.0
RENEW_FOR = 600.0  # a lease is renewed while its request is in flight, but no longer than this
PRUNE_EVERY = 200  # delivered messages recorded between two prunings (and the first of a process)
KEEP_SENT = 1000  # delivered messages kept for `outbox list` (CHAT_MAGIC_KEEP_SENT)
KEEP_SENT_FOR = 3600.0  # and every one delivered in the last hour, whatever their number
WAL_LIMIT = 4 * 1024 * 1024  # the write-ahead log is cut back to this after a checkpoint
KEEP_FORGOTTEN = 10_000  # runs of ids remembered as pruned after delivery or dropped (table ``forgotten``)
DROPPED, LOST = "dropped", "lost"  # why a message is no longer in the outbox (besides SENT: pruned after delivery)
_WAITING = f"state IN ('{PENDING}','{SENDING}')"  # a message still to deliver (SQL)
_HEADS = f"SELECT id FROM message WHERE id IN (SELECT MIN(id) FROM message WHERE {_WAITING} GROUP BY space_key)"

def _proc_stat(pid: int) -> tuple[str, str] | None:
    """(state, start time) of a process from ``/proc``, or None where there is no such file."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            fields = f.read().rsplit(b")", 1)[1].split()
        return fields[0].decode(), fields[19].decode()
    except (OSError, IndexError):
        return None


def _owner_id() -> str:
    """``host:pid/start``: the start time tells a reused pid from the process that took a row."""
    stat = _proc_stat(os.getpid())
    return f"{current_host()}:{os.getpid()}" + (f"/{stat[1]}" if stat else "")


def _owner_alive(owner: str | None) -> bool:
    """Whether the process that claimed a row may still be sending it.

    On this machine: gone, a zombie (killed, not yet reaped: ``kill(pid, 0)``
    still succeeds) or a pid now used by another process all count as dead
    at once. Another machine sharing the file: trust its lease.
    """
    if not owner:
        return False
    host, _, who = owner.rpartition(":")
    if host != current_host():
        return True
    pid_text, _, started = who.partition("/")
    try:
        pid = int(pid_text)
    except ValueError:
        return True
    stat = _proc_stat(pid)
    if stat is not None:
        return stat[0] not in ("Z", "X") and (not started or stat[1] == started)
    if os.path.isdir("/proc"):
        return False  # Linux without /proc/<pid>: the process is gone
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _live_here(owner: str | None) -> bool:
    """Whether an armed row's owner is a live process of this very host (a file it closed early): not dead."""
    return bool(owner) and str(owner).rpartition(":")[0] == current_host() and _owner_alive(owner)


# -- doors for the dead-man modules (deadman.py, termination.py, heartbeat.py, watcher.py) --


def owner_id() -> str:
    """This process as a row's ``owner`` names it (``host:pid/start``): who armed a death notice, who claimed a row."""
    return _owner_id()


def owner_alive(owner: str | None) -> bool:
    """Whether the process a row's ``owner`` names may still run (gone, a zombie or a reused pid: dead)."""
    return _owner_alive(owner)


def armed_spec(row: dict[str, Any]) -> dict[str, Any]:
    """What an armed row says to post if its owner dies (its ``armed`` column, JSON); {} when unreadable."""
    try:
        spec = json.loads(row.get("armed") or "{}")
    except ValueError:
        return {}
    return spec if isinstance(spec, dict) else {}


@dataclass
class Job:
    """One HTTP request to make: a row (possibly carrying merged ones)."""

    id: int
    request_id: str
    dest: int
    space_key: str
    thread_key: str | None
    payload: str
    attempts: int
    created_at: float = 0.0
    merged: int = 0  # how many other messages it carries
    images: str | None = None  # figures to upload and put in the body before the POST (images.fill)


@dataclass
class Row:
    id: int
    state: str
    space_key: str
    thread_key: str | None
    attempts: int
    created_at: float
    next_at: float
    merged_into: int | None
    name: str | None
    thread_name: str | None
    error_code: int | None
    error_status: str | None
    error: str | None
    preview: str


T = TypeVar("T")


def _guarded(what: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    """Turn every storage error of a method into a one-line :class:`OutboxError`.

    A damaged file is recovered (moved aside, rows salvaged) and the method
    tried once more on the new outbox.
    """
    def decorate(method: Callable[..., T]) -> Callable[..., T]:
        # a read holds the gate throughout (its cursor is used to the end); a write takes it in its transaction
        gate = what == "read"

        @functools.wraps(method)
        def guarded(self: Outbox, *args: Any, **kwargs: Any) -> T:
            depth = _gate.depth()
            try:
                return self._attempt(method, what, gate, args, kwargs)
            except BaseException:
                # an interrupt (anywhere below, even on a line that releases): leave nothing held
                self._heal(depth)
                raise
        return guarded
    return decorate


class Outbox:
    """The outbox file. Each thread gets its own SQLite connection."""

    def _attempt(self, method: Callable[..., T], what: str, gate: bool, args: Any, kwargs: Any) -> T:
        try:
            return _call_gated(self, method, gate, args, kwargs)
        except (sqlite3.Error, OSError) as e:
            if not (_is_corrupt(e) and self._recover(_reason(e))):
                raise OutboxError(f"cannot {what} the outbox {self.path}: {_explain(e)}") from None
        try:
            return _call_gated(self, method, gate, args, kwargs)
        except (sqlite3.Error, OSError) as e:
            raise OutboxError(f"cannot {what} the outbox {self.path}: {_explain(e)}") from None

    def _heal(self, depth: int) -> None:
        """After an interrupt: roll back a transaction this call left open, give back the gate holds it took."""
        conn = getattr(self._local, "conn", None)
        try:
            # only what this call left, under the gate it left held (waiting for the gate here doubled the
            # wait of every error that left an outbox call while another thread held it)
            if depth == 0 and conn is not None and _gate.held():
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                conn.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")
        except sqlite3.Error:
            pass
        finally:  # a second Ctrl-C in the rollback still gives back the holds
            if self._lease_lock._is_owned():  # never held across an outbox call: an interrupt left it
                self._lease_lock._release_save()
            _gate.restore(depth)

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 10.0, caller_timeout: float = 2.0,
                 pacer: SqlitePacer | None = None, cluster: RedisSlot | None = None) -> None:
        self.busy_timeout = busy_timeout
        self.caller_timeout = caller_timeout
        self.pacer = pacer or SqlitePacer()
        self._local = threading.local()
        self._gen = 0  # bumped when the file is replaced: every thread reconnects
        # held by a recovery (under the gate), with the lock file: guards path/_opened/_salvaging while the file
        # is moved aside and salvaged; order: gate -> _recovering -> the lock file (_file_lock)
        self._recovering = threading.RLock()
        self._salvaging = False  # a recovery in this process holds the lock file (set and read under _recovering)
        self._ino: int | None = None
        self._next_look = 0.0
        self._opened = False
        self._webhooks: dict[int, Webhook] = {}
        self._dests: dict[str, int] = {}  # webhook digest -> destination id, once committed
        self.owner = _owner_id()
        self.cluster = cluster  # the pacing slot shared by every host (pacing.py), if any
        self.problem: str | None = None  # why the configured file could not be used
        self.path = Path(path)
        self.configured = self.path  # the file asked for; ``path`` differs when a temporary outbox stands in
        self.notices: list[str] = []  # what this outbox told the user (recoveries, fallbacks)
        self._conns: list[tuple[threading.Thread, sqlite3.Connection]] = []  # every thread's connection: closed before a fork
        _outboxes.add(self)
        self._live: int | None = None  # the shared lock that tells other hosts a process here uses the file
        self._acked = 0  # outcomes recorded by this process (prune every PRUNE_EVERY)
        self._next_tidy = 0.0  # monotonic time of the next idle checkpoint
        self._checked = False  # whether the worker has run its one integrity check (never on a caller's path)
        self.lease_cap = MAX_HOLD  # a lease further ahead than this is not believed (raised by longer leases)
        self._leases: dict[int, tuple[float, float]] = {}  # job id -> (lease, monotonic end of renewing); under _lease_lock
        # guards _leases and _renewer; a leaf, never held across an outbox call, so never with the gate
        # (reentrant, and given back by _heal after an interrupt)
        self._lease_lock: Any = threading.RLock()
        self._renewer: threading.Thread | None = None
        self.adopted: list[int] = []  # death notices this process queued for another host's jobs (take_over): the exit waits
        try:
            _call_gated(self, Outbox._open, True, (), {})
        except OutboxError as e:  # files another user could read or replace: refused, a temporary outbox stands in
            self._fall_back(e)
        except (sqlite3.Error, OSError) as e:
            if _is_busy(e):
                return  # a lock is brief: opened on first use, a caller meanwhile gets an OutboxError
            if not (_is_corrupt(e) and self._recover(_reason(e))):
                self._fall_back(e)

    # -- connections -----------------------------------------------------

    def _open(self) -> None:
        """Make sure the files are the user's alone, then open and set up the schema.

        No integrity check here: reading the schema catches a file that is
        not a database, and any damage further in shows up as an error on
        the page that holds it, which :func:`_guarded` recovers from. A
        ``quick_check`` would cost the caller's first ``send()`` time in
        proportion to the file's size: the worker runs one instead, in its
        first :meth:`ready_spaces`.
        """
        if self.path == self.configured and self._live is None:
            private_folder(self.path.parent)
            self._live = hold_live(self.path)  # before the file exists: no other host sees it unowned
        private_files(self.path)
        self._gen += 1
        self._webhooks.clear()
        self._dests.clear()
        conn = self._connect()
        columns = {r[1] for r in conn.execute("PRAGMA table_info(message)")}
        if columns and "dest" not in columns:
            raise _OlderFormat("an older format, with the webhook URL on every row")
        conn.executescript(_SCHEMA)
        _add_columns(conn)
        self._ino = os.stat(self.path).st_ino
        self._opened = True

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None and self._local.gen == self._gen:
            return conn
        if conn is not None:
            _close_quietly(conn)
        # check_same_thread off: the fork hook closes every thread's connection (under the gate, so none is in use)
        conn = _connect_file(str(self.path), timeout=self.busy_timeout, isolation_level=None, check_same_thread=False)
        self._local.conn, self._local.gen = conn, self._gen
        me = threading.current_thread()
        for old in [c for t, c in self._conns if c is not conn and (t is me or _ended(t))]:
            _close_quietly(old)  # this thread's previous one, or one of a thread that has ended (a lane)
        self._conns = [(t, c) for t, c in self._conns if t is not me and not _ended(t)] + [(me, conn)]
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT}")  # a burst's log does not stay on disk
        conn.row_factory = sqlite3.Row
        return conn

    def _db(self) -> sqlite3.Connection:
        """This thread's connection, to the file now at ``path``; never to one a recovery is still salvaging into.

        Every statement on it holds the gate (:class:`_GatedConnection`), whoever issues it.

        A recovery in another thread of this process holds the gate (and
        :attr:`_recovering`) throughout; one in another process holds the lock
        file (:meth:`_follow`). Read half-way, the new file lacks the rows
        still to be copied: a receipt would call a message lost that is then
        salvaged and delivered. No ``with`` lock here: an interrupt on the
        line that releases it would leave it held (the gate heals itself).
        """
        depth = _gate.depth()
        try:
            _gate.enter(self.busy_timeout)
            if not self._opened:
                self._follow()
            elif self._ino is not None and time.monotonic() >= self._next_look:
                self._next_look = time.monotonic() + 0.2  # a stat costs as much as an insert: look 5 times a second at most
                if _inode(self.path) != self._ino:
                    self._follow()  # another process replaced the file (a recovery): follow it
            return self._connect()
        finally:
            _gate.leave_to(depth)

    def _follow(self) -> None:
        """Open the file at ``path`` once no recovery (in any process) is moving it aside or salvaging into it."""
        if self.path != self.configured or self._salvaging:  # never recovered, or this thread is the recovery
            self._open()
            return
        with _file_lock(self.path.with_name(self.path.name + ".lock"), shared=True):
            self._open()

    def _write(self, wait: float | None = None) -> _Tx:
        """A write transaction; ``wait``: how long another process's lock may keep it waiting (busy timeout)."""
        return _Tx(self, self.busy_timeout if wait is None else wait)

    def _close_thread(self, thread: threading.Thread) -> None:
        """Close ``thread``'s own connection (it reconnects on next use); other threads' stay open."""
        mine = [c for t, c in self._conns if t is thread]
        self._conns = [(t, c) for t, c in self._conns if t is not thread]
        if getattr(self._local, "conn", None) in mine:  # ``_local`` is read in the calling thread: its own
            self._local.conn = None
        for conn in mine:
            _close_quietly(conn)

    def _close_all(self) -> None:
        """Close every thread's connection (before a fork, under the gate): each reconnects on next use.

        A child must not inherit an open connection: SQLite's per-file lock
        bookkeeping would make the child's own connection believe it holds
        locks that only the parent holds.
        """
        conns, self._conns = self._conns, []
        self._gen += 1
        for _, conn in conns:
            _close_quietly(conn)

    # -- caller side -----------------------------------------------------

    @_guarded("write to")
    def enqueue(self, webhook: Webhook, thread_key: str | None, bodies: Iterable[tuple[str, bool] | tuple[str, bool, str | None]], *,
                patient: bool = False, blobs: dict[str, tuple[bytes, str]] | None = None, disarm: int | None = None) -> list[int]:
        """Store messages (in order, in one transaction) and return their ids. Each gets a fresh requestId.

        ``bodies`` are ``(JSON Message, mergeable)`` pairs: plain-text messages
        may be merged with others waiting for the same thread. A caller waits
        at most ``caller_timeout`` for another process's lock; a background
        thread (``patient``) the full busy timeout. A body may carry a third
        item, its ``images`` (see :mod:`chat_magic.images`); ``blobs`` are
        their bytes, stored in the same transaction. ``disarm``: the id of the
        armed death notice these messages (a completion or failure card)
        replace: deleted in the same transaction, and they are marked
        important, so a kill at any moment posts one or the other, never both.
        """
        now = time.time()
        # a caller never waits long for another process's lock: it gets a clear error instead
        with self._write(None if patient else self.caller_timeout) as db:
            dest = self._dests.get(webhook.id) or self._dest_id(db, webhook)
            for digest, (data, mime) in (blobs or {}).items():
                db.execute("INSERT OR IGNORE INTO blob (sha256, data, mime) VALUES (?,?,?)", (digest, data, mime))
            ids = [
                int(db.execute(
                    "INSERT INTO message (request_id, dest, space_key, thread_key, payload, mergeable, state, next_at, created_at, updated_at, images)"
                    " VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                    (_request_id(), dest, webhook.space_key, thread_key, b[0], int(b[1] and not _images(b)),
                     PENDING, now, now, now, _images(b)),
                ).lastrowid or 0)
                for b in bodies
            ]
            if disarm is not None:  # the card replaces the death notice: both in one transaction (deadman.py)
                _replace_armed(db, disarm, ids)
        self._dests[webhook.id] = dest  # committed: no need to look it up again
        return ids

    @staticmethod
    def _dest_id(db: sqlite3.Connection, webhook: Webhook) -> int:
        """The destination's id, stored once per canonical webhook (the URL is never a local here)."""
        row = db.execute("SELECT id FROM destination WHERE digest = ?", (webhook.id,)).fetchone()
        if row:
            return int(row[0])
        return int(db.execute("INSERT INTO destination (digest, url, space_key) VALUES (?,?,?)",
                              (webhook.id, webhook.reveal_url(), webhook.space_key)).lastrowid or 0)

    # -- worker side -----------------------------------------------------

    def next_ready(self, now: float, *, exclude: Iterable[str] = ()) -> float | None:
        """Seconds until some message may be sent (0 = now), or None when nothing waits.

        Spaces in ``exclude`` (this process is sending to them now) are not
        considered. With a cluster slot, a space is ready when both slots are
        open. Read only: no lock is taken.
        """
        waits = self.ready_spaces(now, exclude=exclude)
        if self.cluster is not None:
            waits = self.cluster.waits(waits)
        return min(waits.values()) if waits else None

    @_guarded("read")
    def ready_spaces(self, now: float, *, exclude: Iterable[str] = ()) -> dict[str, float]:
        """Seconds until each waiting space's head may be sent from this host (0 = now), oldest head first."""
        db = self._db()
        if not self._checked:  # once per process, on the worker's side: damage is found before a page of it is needed
            self._checked = True
            if db.execute("PRAGMA quick_check(1)").fetchone()[0] != "ok":
                raise sqlite3.DatabaseError("database disk image is malformed")
        skip = set(exclude)
        waits: dict[str, float] = {}
        for head in db.execute(f"SELECT space_key, state, next_at, owner, lease_until FROM message WHERE id IN ({_HEADS}) ORDER BY id"):
            if head["space_key"] in skip:
                continue
            if head["state"] == SENDING:
                t = head["lease_until"] if self._leased(head, now) else now
            else:
                t = _ahead(head["next_at"], now, MAX_HOLD)
            t = max(t, self._free_at(db, head["space_key"], now))
            waits[head["space_key"]] = max(0.0, t - now)
        if not waits:
            self._tidy_when_idle()
        return waits

    def _free_at(self, db: sqlite3.Connection, space_key: str, now: float) -> float:
        """When the space's pacing slot opens; a slot implausibly far ahead (the clock stepped back) is open."""
        return _ahead(self.pacer.free_at(PacingTable(db), space_key), now, MAX_HOLD)

    def _leased(self, head: sqlite3.Row, now: float) -> bool:
        """Whether a row being sent is still under its sender's lease (a live sender, a believable lease)."""
        until = head["lease_until"] or 0.0
        return _owner_alive(head["owner"]) and now < until <= now + self.lease_cap

    def claim(self, now: float, *, interval: float, lease: float, exclude: Iterable[str] = ()) -> Job | None:
        """Take the next message that may be sent now, merging short ones behind it.

        The outbox asks its pacers and claims by itself; no pacer calls back.
        With a cluster slot (Redis), the spaces open on this host are offered
        to it in one round trip however many are busy
        (:meth:`RedisSlot.take_first`), before the write lock is taken (no
        network call under it); the one it lets through is then claimed here.
        A slot taken for a space left with nothing to claim (another process
        of this host took it) is released at once. A Redis that does not
        answer: this host paces alone.
        """
        if self.cluster is None:
            return self.claim_local(now, interval=interval, lease=lease, exclude=exclude)
        spaces = [space for space, wait in self.ready_spaces(now, exclude=exclude).items() if wait <= 0]
        while spaces:
            got = self.cluster.take_first(spaces, interval)
            if got is None:
                return self.claim_local(now, interval=interval, lease=lease, exclude=exclude)
            if got < 0:
                return None
            job = self.claim_local(now, interval=interval, lease=lease, space_key=spaces[got])
            if job is not None:
                return job
            self.cluster.release(spaces[got])
            spaces = spaces[got + 1:]
        return None

    @_guarded("write to")
    def claim_local(self, now: float, *, interval: float, lease: float, exclude: Iterable[str] = (),
                    space_key: str | None = None) -> Job | None:
        """:meth:`claim` paced by this host's outbox alone (only ``space_key``'s head, if given).

        Takes the space's pacing slot in the same (short) transaction, so two
        processes never send to one space within ``interval`` seconds. Spaces
        in ``exclude`` are skipped: each space has at most one request in flight.
        """
        skip = set(exclude)
        self.lease_cap = max(self.lease_cap, lease + 1.0)
        job = None
        with self._write() as db:
            now = max(now, time.time())  # waiting for the lock took time: pace from when the slot is taken
            for head in db.execute(f"SELECT * FROM message WHERE id IN ({_HEADS}) ORDER BY id").fetchall():
                if head["space_key"] in skip or (space_key is not None and head["space_key"] != space_key):
                    continue
                if self._free_at(db, head["space_key"], now) > now:
                    continue
                if head["state"] == SENDING:
                    if self._leased(head, now):
                        continue
                    log.debug("chat_magic: taking back message %s from %s", head["id"], head["owner"])
                elif _ahead(head["next_at"], now, MAX_HOLD) > now:
                    continue
                job = self._take(db, head, now, interval, lease)
                break
        if job is not None:
            self._keep_leased(job.id, lease)
        return job

    def _take(self, db: sqlite3.Connection, head: sqlite3.Row, now: float, interval: float, lease: float) -> Job:
        payload, own = head["payload"], head["own_payload"]
        merged_ids: list[int] = []
        if head["mergeable"] and head["attempts"] == 0:
            payload, merged_ids = self._merge(db, head)
            db.executemany(
                f"UPDATE message SET state='{MERGED}', merged_into=?, updated_at=? WHERE id=?",
                [(head["id"], now, i) for i in merged_ids],
            )
            if merged_ids:
                own = head["payload"]
        elif own is not None:  # a retry of a head that carried others: only those still wanted (drop means drop)
            payload, merged_ids = self._rebuild(db, head["id"], own)
        db.execute(
            "UPDATE message SET state=?, payload=?, own_payload=?, attempts=attempts+1, owner=?, lease_until=?, updated_at=? WHERE id=?",
            (SENDING, payload, own, self.owner, now + lease, now, head["id"]),
        )
        self.pacer.take(PacingTable(db), head["space_key"], now + interval)
        return Job(
            id=head["id"], request_id=head["request_id"], dest=head["dest"], space_key=head["space_key"],
            thread_key=head["thread_key"], payload=payload, attempts=head["attempts"] + 1,
            created_at=head["created_at"], merged=len(merged_ids), images=head["images"],
        )

    @staticmethod
    def _merge(db: sqlite3.Connection, head: sqlite3.Row) -> tuple[str, list[int]]:
        """The head's body carrying the short texts waiting behind it for the same thread and destination.

        Stops at the first message of that thread it cannot carry (a card, a
        retried one, or one that would pass 4,096 characters or 32,000 bytes),
        so nothing overtakes anything within a thread.
        """
        body = json.loads(head["payload"])
        texts = [body["text"]]
        chars = len(texts[0])
        size = _json_bytes(head["payload"])
        merged: list[int] = []
        for r in db.execute(
            "SELECT id, dest, thread_key, payload, mergeable, attempts FROM message"
            f" WHERE state = '{PENDING}' AND space_key = ? AND id > ? ORDER BY id LIMIT 2000",
            (head["space_key"], head["id"]),
        ):
            if r["dest"] != head["dest"] or r["thread_key"] != head["thread_key"]:
                continue  # another thread (threads are per webhook): its own order
            if not r["mergeable"] or r["attempts"]:
                break
            t = json.loads(r["payload"])["text"]
            more = _json_bytes(json.dumps(t, ensure_ascii=False)) - 2 + 4  # the text without quotes, plus "\n\n"
            if chars + len(SEPARATOR) + len(t) > MAX_TEXT or size + more > MAX_BYTES:
                break
            texts.append(t)
            chars += len(SEPARATOR) + len(t)
            size += more
            merged.append(r["id"])
        if not merged:
            return head["payload"], []
        body["text"] = merge_texts(texts)
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")), merged

    @staticmethod
    def _rebuild(db: sqlite3.Connection, head_id: int, own: str) -> tuple[str, list[int]]:
        """A head's body carrying the merged messages still in the outbox (a dropped one is gone)."""
        rows = db.execute(f"SELECT id, payload FROM message WHERE merged_into = ? AND state = '{MERGED}' ORDER BY id",
                          (head_id,)).fetchall()
        if not rows:
            return own, []
        body = json.loads(own)
        body["text"] = merge_texts([body["text"]] + [json.loads(r["payload"])["text"] for r in rows])
        return json.dumps(body, ensure_ascii=False, separators=(",", ":")), [r["id"] for r in rows]

    @_guarded("read")
    def webhook(self, dest: int) -> Webhook:
        """The destination ``dest`` as a :class:`Webhook`, parsed once per process."""
        hook = self._webhooks.get(dest)
        if hook is None:
            from .webhook import parse_webhook_url

            row = self._db().execute("SELECT url FROM destination WHERE id = ?", (dest,)).fetchone()
            if row is None:
                raise OutboxError(f"the outbox {self.path} has no destination {dest}")
            hook = self._webhooks[dest] = parse_webhook_url(row[0])
        return hook

    @_guarded("write to")
    def ack(self, job: Job, name: str | None, thread_name: str | None, *, space_free_at: float = 0.0) -> None:
        self._release_lease(job.id)
        now = time.time()
        with self._write() as db:
            db.execute(
                "UPDATE message SET state=?, name=?, thread_name=?, owner=NULL, lease_until=NULL,"
                " error_code=NULL, error_status=NULL, error=NULL, updated_at=? WHERE id=?",
                (SENT, name, thread_name, now, job.id),
            )
            self.pacer.hold(PacingTable(db), job.space_key, space_free_at)
        self._hold_cluster(job.space_key, space_free_at)
        self._acked += 1
        if self._acked % PRUNE_EVERY == 1:
            self._tidy()

    @_guarded("write to")
    def retry_later(self, job: Job, delay: float, *, code: int, status: str, error: str, space_free_at: float = 0.0) -> None:
        self._release_lease(job.id)
        now = time.time()
        with self._write() as db:
            db.execute(
                "UPDATE message SET state=?, next_at=?, owner=NULL, lease_until=NULL, error_code=?, error_status=?, error=?, updated_at=?"
                " WHERE id=? AND state=?",
                (PENDING, now + delay, code, status, error, now, job.id, SENDING),
            )
            self.pacer.hold(PacingTable(db), job.space_key, space_free_at)
        self._hold_cluster(job.space_key, space_free_at)

    @_guarded("write to")
    def fail(self, job: Job, *, code: int, status: str, error: str, space_free_at: float = 0.0) -> None:
        self._release_lease(job.id)
        now = time.time()
        with self._write() as db:
            db.execute(
                "UPDATE message SET state=?, owner=NULL, lease_until=NULL, error_code=?, error_status=?, error=?, updated_at=? WHERE id=?",
                (FAILED, code, status, error, now, job.id),
            )
            self.pacer.hold(PacingTable(db), job.space_key, space_free_at)
        self._hold_cluster(job.space_key, space_free_at)

    # -- leases: renewed while a request is in flight ----------------------------

    def _keep_leased(self, job_id: int, lease: float) -> None:
        """Renew the job's lease every third of it until its outcome is recorded (or :data:`RENEW_FOR` passes).

        A reply dripped slowly keeps a request alive past any one lease; while
        it lasts, no other process may take the message back and POST it again.
        If this process dies, the renewing stops with it and the lease runs out.
        """
        with self._lease_lock:
            self._leases[job_id] = (lease, time.monotonic() + RENEW_FOR)
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew_leases, name="chat_magic-lease", daemon=True)
                self._renewer.start()

    def _release_lease(self, job_id: int) -> None:
        with self._lease_lock:
            self._leases.pop(job_id, None)

    def _renew_leases(self) -> None:
        while True:
            with self._lease_lock:
                if not self._leases:
                    self._renewer = None
                    return
                step = min(lease for lease, _ in self._leases.values()) / 3
            time.sleep(max(0.05, step))
            with self._lease_lock:
                due = {i: lease for i, (lease, end) in self._leases.items() if time.monotonic() < end}
            try:
                self._renew(due)
            except (OutboxError, sqlite3.Error, OSError) as e:  # a busy or full disk: try again next round
                log.info("chat_magic: could not renew a lease: %s", e)

    @_guarded("write to")
    def _renew(self, leases: dict[int, float]) -> None:
        if not leases:
            return
        now = time.time()
        with self._write() as db:
            db.executemany(f"UPDATE message SET lease_until=? WHERE id=? AND state='{SENDING}' AND owner=?",
                           [(now + lease, i, self.owner) for i, lease in leases.items()])

    # -- bounded growth ---------------------------------------------------------

    def _tidy(self) -> None:
        """Prune old delivered messages, then checkpoint and cut back the write-ahead log (never raises)."""
        try:
            self.prune_sent(keep_sent())
            self._checkpoint()
        except (OutboxError, sqlite3.Error, OSError) as e:
            log.info("chat_magic: could not tidy the outbox: %s", e)

    def _tidy_when_idle(self) -> None:
        """Nothing waits: checkpoint the log now and then, so a burst's log does not stay on disk."""
        if time.monotonic() >= self._next_tidy:
            self._next_tidy = time.monotonic() + 30.0
            try:
                self._checkpoint()
            except (sqlite3.Error, OSError) as e:
                log.info("chat_magic: could not checkpoint the outbox: %s", e)

    def _checkpoint(self) -> None:
        """``wal_checkpoint(TRUNCATE)``, waiting at most 0.1 s for other processes (incomplete then: next time)."""
        depth = _gate.depth()
        try:
            _gate.enter(self.busy_timeout)  # a fork must not come while this connection holds the log's locks
            db = self._db()
            db.execute("PRAGMA busy_timeout=100")
            try:
                db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            finally:
                db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")  # a caller's wait is set per transaction
        finally:
            _gate.leave_to(depth)

    @_guarded("write to")
    def prune_sent(self, keep: int, min_age: float = KEEP_SENT_FOR) -> int:
        """Forget delivered messages (and what they carried) beyond the newest ``keep``; return how many went.

        Only those delivered more than ``min_age`` seconds ago: a receipt a
        program still holds after a burst finds its message. Batches of 2,000
        rows, one short transaction each: another process waits for the lock
        at most that long.
        """
        gone = 0
        cutoff = time.time() - min_age
        while True:
            with self._write() as db:
                row = db.execute(f"SELECT id FROM message WHERE +state = '{SENT}' ORDER BY id DESC LIMIT 1 OFFSET ?",
                                 (max(0, keep),)).fetchone()
                if row is None:
                    return gone
                ids = [r[0] for r in db.execute(
                    f"SELECT id FROM message WHERE +state = '{SENT}' AND id <= ? AND updated_at < ? ORDER BY id LIMIT 2000",
                    (row[0], cutoff))]
                if not ids:
                    return gone
                marks = ",".join("?" * len(ids))
                carried = [r[0] for r in db.execute(f"SELECT id FROM message WHERE state = '{MERGED}' AND merged_into IN ({marks})", ids)]
                db.execute(f"DELETE FROM message WHERE state = '{MERGED}' AND merged_into IN ({marks})", ids)
                gone += db.execute(f"DELETE FROM message WHERE id IN ({marks})", ids).rowcount
                _remember(db, ids + carried, SENT)  # a receipt still held finds "delivered", not "dropped"
                db.execute("DELETE FROM forgotten WHERE lo IN (SELECT lo FROM forgotten ORDER BY lo DESC LIMIT -1 OFFSET ?)",
                           (KEEP_FORGOTTEN,))

    @_guarded("read")
    def blob(self, digest: str) -> bytes | None:
        """An image's bytes, stored with its message (None when gone)."""
        row = self._db().execute("SELECT data FROM blob WHERE sha256 = ?", (digest,)).fetchone()
        return bytes(row[0]) if row else None

    @_guarded("write to")
    def set_payload(self, job: Job, payload: str) -> None:
        """Record the body with its images' URLs filled in (every retry sends it); their bytes are no longer needed."""
        with self._write() as db:
            db.execute("UPDATE message SET payload=?, images=NULL, updated_at=? WHERE id=?", (payload, time.time(), job.id))
            _forget_blobs(db)

    def _hold_cluster(self, space_key: str, until: float) -> None:
        """Hold the space in the cluster slot too, after the commit: no network call under the write lock."""
        if self.cluster is not None and until:
            self.cluster.hold(space_key, until - time.time())

    # -- inspection and maintenance -------------------------------------------

    @_guarded("read")
    def rows(self, ids: Iterable[int] | None = None, *, states: Iterable[str] | None = None, limit: int = 1000) -> list[Row]:
        if ids is not None:
            ids = list(ids)
            if len(ids) > 500:
                return [r for k in range(0, len(ids), 500) for r in self.rows(ids[k:k + 500], states=states, limit=limit)]
        db = self._db()
        sql = ("SELECT id, state, space_key, thread_key, attempts, created_at, next_at, merged_into, name, thread_name,"
               " error_code, error_status, error, substr(payload, 1, 200) AS preview FROM message")
        where: list[str] = []
        args: list[Any] = []
        if ids is not None:
            where.append(f"id IN ({','.join('?' * len(ids))})")
            args += ids
        if states is not None:
            states = list(states)
            where.append(f"state IN ({','.join('?' * len(states))})")
            args += states
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY id LIMIT ?"
        args.append(limit)
        return [Row(**dict(r)) for r in db.execute(sql, args)]

    def resolve(self, ids: Iterable[int]) -> list[Row]:
        """Rows for ``ids``, each merged row replaced by the row that carried it (missing ids left out)."""
        return [r for r in self._resolved(list(ids)) if r is not None]

    def _resolved(self, ids: list[int]) -> list[Row | None]:
        """:meth:`resolve`, one item per id: None where the id is no longer in the outbox."""
        rows = {r.id: r for r in self.rows(ids)}
        carriers = {r.merged_into for r in rows.values() if r.state == MERGED and r.merged_into}
        if carriers:
            rows.update({r.id: r for r in self.rows(carriers)})
        out: list[Row | None] = []
        for i in ids:
            r = rows.get(i)
            if r is not None and r.state == MERGED and r.merged_into in rows:
                r = rows[r.merged_into]
            out.append(r)
        return out

    def account(self, ids: Iterable[int]) -> tuple[list[Row | None], dict[int, str]]:
        """:meth:`resolve` one item per id (None: gone), and why each gone id is: ``sent`` (pruned after delivery), ``dropped``, or ``lost``.

        ``lost`` means no record says why: lost with a damaged outbox, or
        removed before this outbox kept a record (an older chat_magic, or more
        than :data:`KEEP_FORGOTTEN` runs ago). A reader never sees a file
        mid-recovery (see :meth:`_db`), so ``lost`` is not a recovery's half-way state.
        """
        ids = list(ids)
        found = self._resolved(ids)
        missing = [i for i, r in zip(ids, found) if r is None]
        why = self.forgotten(missing) if missing else {}
        return found, {i: why.get(i, LOST) for i in missing}

    @_guarded("read")
    def forgotten(self, ids: Iterable[int]) -> dict[int, str]:
        """Why each of ``ids`` left the outbox, where recorded: ``sent`` (pruned after delivery) or ``dropped``."""
        db = self._db()
        out = {}
        for i in ids:
            r = db.execute("SELECT hi, why FROM forgotten WHERE lo <= ? ORDER BY lo DESC LIMIT 1", (i,)).fetchone()
            if r is not None and r["hi"] >= i:
                out[i] = str(r["why"])
        return out

    @_guarded("read")
    def counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._db().execute("SELECT state, count(*) FROM message GROUP BY state")}

    @_guarded("read")
    def unfinished_ids(self) -> list[int]:
        return [r[0] for r in self._db().execute(f"SELECT id FROM message WHERE {_WAITING} ORDER BY id")]

    @_guarded("write to")
    def release_mine(self, keep: Iterable[int] = ()) -> int:
        """Put back rows this process claimed but no longer sends (a claim cut short by an interrupt).

        ``keep``: ids this process is sending now. Their requestId is kept, so a
        message that did reach the space is not duplicated when sent again.
        """
        keep = set(keep)
        with self._write() as db:
            ids = [r[0] for r in db.execute("SELECT id FROM message WHERE state=? AND owner=?", (SENDING, self.owner))
                   if r[0] not in keep]
            db.executemany("UPDATE message SET state=?, owner=NULL, lease_until=NULL WHERE id=? AND state=?",
                           [(PENDING, i, SENDING) for i in ids])
        return len(ids)

    def stranded(self) -> int | None:
        """Messages still waiting in the configured outbox while a temporary one stands in.

        0 when this is the configured outbox; None when that file cannot be read.
        """
        if self.path == self.configured:
            return 0
        for options in ("mode=ro", "mode=ro&immutable=1"):  # immutable: a read-only filesystem, where no -shm can be made
            try:
                return _call_gated(self, Outbox._count_configured, True, (options,), {})
            except sqlite3.Error:
                continue
        return None

    def _count_configured(self, options: str) -> int:
        db = _connect_file(f"file:{self.configured}?{options}", timeout=1.0, uri=True)
        try:
            return int(db.execute(f"SELECT count(*) FROM message WHERE {_WAITING}").fetchone()[0])
        finally:
            db.close()

    @_guarded("write to")
    def requeue(self, ids: Iterable[int]) -> int:
        """Put failed messages back in the queue (``chat-magic outbox retry``)."""
        now = time.time()
        with self._write() as db:
            n = 0
            for i in ids:
                n += db.execute(
                    "UPDATE message SET state=?, next_at=?, error_code=NULL, error_status=NULL, error=NULL, updated_at=? WHERE id=? AND state=?",
                    (PENDING, now, now, i, FAILED),
                ).rowcount
        return n

    @_guarded("write to")
    def drop(self, ids: Iterable[int]) -> int:
        """Delete messages that are not being sent (``chat-magic outbox drop``); return how many went.

        Drop means drop: a message merged into another that waits (a retry)
        is deleted, and the other carries only the messages still wanted when
        it is sent again (:meth:`_rebuild`). One that a request in flight
        carries cannot be stopped and stays. A waiting head's own carried
        messages are still wanted: they go back in the queue, in order.
        """
        now = time.time()
        with self._write() as db:
            n = 0
            for i in ids:
                row = db.execute("SELECT state, merged_into FROM message WHERE id=?", (i,)).fetchone()
                if row is None or row["state"] == SENDING:
                    continue
                if row["state"] == MERGED:
                    carrier = db.execute("SELECT id, state, own_payload FROM message WHERE id=?", (row["merged_into"],)).fetchone()
                    if carrier is not None and carrier["state"] == SENDING:
                        continue  # on its way now
                    n += db.execute("DELETE FROM message WHERE id=?", (i,)).rowcount
                    _remember(db, [i], SENT if carrier is not None and carrier["state"] == SENT else DROPPED)
                    if carrier is not None and carrier["own_payload"] is not None:  # the text leaves the file now
                        db.execute("UPDATE message SET payload=? WHERE id=?",
                                   (self._rebuild(db, carrier["id"], carrier["own_payload"])[0], carrier["id"]))
                    continue
                elif row["state"] == PENDING:
                    db.execute(f"UPDATE message SET state='{PENDING}', merged_into=NULL, next_at=?, updated_at=?"
                               f" WHERE merged_into=? AND state='{MERGED}'", (now, now, i))
                    carried = []
                else:
                    carried = [r[0] for r in db.execute("SELECT id FROM message WHERE merged_into=? AND state=?", (i, MERGED))]
                    db.execute("DELETE FROM message WHERE merged_into=? AND state=?", (i, MERGED))
                n += db.execute("DELETE FROM message WHERE id=?", (i,)).rowcount
                _remember(db, [i, *carried], SENT if row["state"] == SENT else DROPPED)  # a delivered one stays delivered
            _forget_blobs(db)
        return n

    @_guarded("write to")
    def prune(self, older_than: float) -> int:
        """Forget delivered messages older than ``older_than`` seconds."""
        cutoff = time.time() - older_than
        with self._write() as db:
            gone = [r[0] for r in db.execute(
                "SELECT id FROM message WHERE (state=? AND merged_into IN (SELECT id FROM message WHERE state=? AND updated_at < ?))"
                " OR (state=? AND updated_at < ?)", (MERGED, SENT, cutoff, SENT, cutoff))]
            db.execute("DELETE FROM message WHERE state=? AND merged_into IN (SELECT id FROM message WHERE state=? AND updated_at < ?)", (MERGED, SENT, cutoff))
            n = int(db.execute("DELETE FROM message WHERE state=? AND updated_at < ?", (SENT, cutoff)).rowcount)
            _remember(db, gone, SENT)
            _forget_blobs(db)
            return n

    # -- death notices: armed rows (deadman.py, termination.py) --------------------------
    # Each under the gate, like every statement here: a fork in the middle of an ungated one
    # could leave the child's connection "database is locked".

    @_guarded("write to")
    def arm(self, webhook: Webhook, thread_key: str | None, fallback: str, spec: str, *, now: float, peak: int) -> int:
        """Write a block's death notice as an ``armed`` row of this process (never claimed, merged or counted); its id.

        ``fallback`` is the JSON body posted if nothing better can be built,
        ``spec`` (JSON) what :func:`chat_magic.deadman.death_message` builds it
        from. A caller waits at most ``caller_timeout`` for another process's lock.
        """
        with self._write(self.caller_timeout) as db:
            dest = self._dest_id(db, webhook)
            return int(db.execute(
                "INSERT INTO message (request_id, dest, space_key, thread_key, payload, mergeable, state, next_at, created_at,"
                " updated_at, owner, armed, beat, peak) VALUES (?,?,?,?,?,0,?,?,?,?,?,?,?,?)",
                (_request_id(), dest, webhook.space_key, thread_key, fallback, ARMED, now, now, now, _owner_id(), spec, now, peak),
            ).lastrowid or 0)

    @_guarded("write to")
    def record_progress(self, row_id: int, progress: str | None, *, beat: float, peak: int) -> None:
        """An armed block's sign of life: its last progress line, when, and its peak memory (kept if higher)."""
        with self._write(self.caller_timeout) as db:
            db.execute("UPDATE message SET progress=?, beat=?, peak=MAX(COALESCE(peak, 0), ?) WHERE id=? AND state=?",
                       (progress, beat, peak, row_id, ARMED))

    @_guarded("write to")
    def disarm(self, row_id: int, *, wait: float | None = None) -> None:
        """Delete an armed row (its block closed); one fired meanwhile is a pending message now and stays."""
        with self._write(wait) as db:
            db.execute("DELETE FROM message WHERE id=? AND state=?", (row_id, ARMED))

    @_guarded("read")
    def armed_rows(self) -> list[dict[str, Any]]:
        """Every armed row, oldest first (whoever owns it)."""
        return [dict(r) for r in self._db().execute("SELECT * FROM message WHERE state=? ORDER BY id", (ARMED,))]

    @_guarded("read")
    def armed_target(self, row_id: int) -> tuple[Webhook, str | None] | None:
        """Where an armed row's notices go: its destination and thread key (None: no such row)."""
        row = self._db().execute("SELECT dest, thread_key FROM message WHERE id=?", (row_id,)).fetchone()
        return None if row is None else (self.webhook(row[0]), row[1])

    @_guarded("write to")
    def fire_armed(self, row: dict[str, Any], bodies: list[str]) -> list[int] | None:
        """Turn an armed row into its death notice (``bodies``, pending, important) in one transaction; their ids.

        None when the row is no longer armed (another process fired it, or its
        block closed, meanwhile): a death notice is queued exactly once.
        """
        now = time.time()
        with self._write() as db:
            if db.execute("DELETE FROM message WHERE id=? AND state=?", (row["id"], ARMED)).rowcount != 1:
                return None
            return [int(db.execute(
                "INSERT INTO message (request_id, dest, space_key, thread_key, payload, mergeable, state, next_at,"
                " created_at, updated_at, important) VALUES (?,?,?,?,?,0,?,?,?,?,1)",
                (_request_id(), row["dest"], row["space_key"], row["thread_key"], body, PENDING, now, now, now),
            ).lastrowid or 0) for body in bodies]

    @_guarded("write to")
    def mark_important(self, ids: Iterable[int]) -> None:
        """Flag messages as completion, failure or death notices: the exit waits for them, the watcher delivers them."""
        with self._write() as db:
            db.executemany("UPDATE message SET important=1 WHERE id=?", [(i,) for i in ids])

    @_guarded("write to")
    def first_job_failure(self, job: str, rank: str, summary: str) -> tuple[str, str] | None:
        """Record a rank's failure of a distributed ``job`` unless one is recorded; the first's ``(rank, summary)``.

        Records older than a week are forgotten on the way (jobs.py: the first
        failure is the card, later ones of the job a line).
        """
        now = time.time()
        with self._write() as db:
            db.execute("DELETE FROM job_failure WHERE at < ?", (now - 7 * 86400,))
            db.execute("INSERT OR IGNORE INTO job_failure (job, rank, summary, at) VALUES (?,?,?,?)", (job, rank, summary, now))
            row = db.execute("SELECT rank, summary FROM job_failure WHERE job=?", (job,)).fetchone()
        return None if row is None else (str(row[0]), str(row[1]))

    @_guarded("read")
    def important_waiting(self, ids: list[int] | None = None) -> list[int]:
        """Which of ``ids`` (at most 900; None: all, as the watcher asks) are important notices still waiting to be delivered."""
        if ids is None:
            return [r[0] for r in self._db().execute(f"SELECT id FROM message WHERE important=1 AND {_WAITING} ORDER BY id")]
        if not ids:
            return []
        return [r[0] for r in self._db().execute(
            f"SELECT id FROM message WHERE important=1 AND state IN (?,?) AND id IN ({','.join('?' * len(ids))})",
            (PENDING, SENDING, *ids))]

    # -- another host's file ----------------------------------------------------

    def take_over(self, other: Path) -> int:
        """Move what waits in another host's file into this one, in order; return how many messages came.

        Only when no process uses that file (its liveness lock is free, see
        :func:`hosts.claim_orphan`): a container restarted with a new
        hostname delivers what the previous one left, before anything it
        queues itself, at once (a row its dead sender left under a lease is
        sent again). Rows keep their ``requestId`` (the
        copy is idempotent: a row already here is not copied twice); the ones
        copied are then deleted there. Never raises: a file that cannot be
        read is left alone (logged).
        """
        from .hosts import claim_orphan

        if not live_path(other).exists() and in_use(other) is not None:
            return 0  # last used by a chat_magic without liveness locks, which may still be running
        fd = claim_orphan(other)
        if fd is None:
            return 0
        try:
            private_files(other)
            src = _connect_file(str(other), timeout=self.busy_timeout, isolation_level=None)
            try:
                return self._copy_from(src)
            finally:
                src.close()
        except Exception as e:  # a file we cannot read, a row we cannot parse: never into the caller's send()
            log.warning("chat_magic: left the outbox %s alone: %s", other, _reason(e))
            return 0
        finally:
            let_go(fd)

    def _copy_from(self, src: sqlite3.Connection) -> int:
        from .webhook import parse_webhook_url

        src.row_factory = sqlite3.Row
        now = time.time()
        if "dest" not in {r[1] for r in src.execute("PRAGMA table_info(message)")}:
            return 0  # an older format: the old single-file path drains those
        have = {r[1] for r in src.execute("PRAGMA table_info(message)")}
        # A row under a lease is not waited for: the liveness lock this process holds says no process uses the
        # file, so its sender is gone and nothing can still be sending it. Its request may have reached the space:
        # sent again under the same requestId, as any retry after a lost reply.
        waiting = f"state IN ('{PENDING}','{SENDING}','{FAILED}')"
        rows = [dict(r) for r in src.execute(
            f"SELECT * FROM message WHERE {waiting} OR (state='{MERGED}' AND merged_into IN (SELECT id FROM message WHERE {waiting}))"
            " ORDER BY id")]
        armed = [dict(r) for r in src.execute(f"SELECT * FROM message WHERE state='{ARMED}' ORDER BY id")
                 if not _live_here(r["owner"])]
        if not rows and not armed:
            return 0
        urls = _readable_destinations(src)
        if armed and hooks.death_notices is None:  # never deleted there unreported: left for a process that has the wording
            raise OutboxError("chat_magic.deadman is not loaded: it words the death notices of that host's blocks")
        deaths = hooks.death_notices(self, armed, urls) if hooks.death_notices and armed else []  # died with their host
        fired: list[tuple[dict[str, Any], int]] = []
        moved: dict[int, int] = {}
        with self._write() as db:
            for row in rows:
                hook = parse_webhook_url(urls[row["dest"]])
                old_id = row.pop("id")
                row.update(dest=self._dest_id(db, hook), space_key=hook.space_key)
                if "own_payload" not in have:
                    row["own_payload"] = None
                if row["state"] == SENDING:  # its sender is gone: send again, same requestId
                    row.update(state=PENDING, owner=None, lease_until=None)
                if row["state"] == PENDING:
                    row["next_at"] = now
                if row["state"] == MERGED:
                    row["merged_into"] = moved.get(row["merged_into"])
                cols = [c for c in _COLUMNS if c != "id"]
                db.execute(f"INSERT OR IGNORE INTO message ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                           [row.get(c) for c in cols])
                moved[old_id] = int(db.execute("SELECT id FROM message WHERE request_id=?", (row["request_id"],)).fetchone()[0])
            _copy_blobs(src, db, [r.get("images") for r in rows])
            for row, bodies in deaths:  # after what their owners queued; the armed row's requestId: copied twice, posted once
                fired += [(row, self._fire_moved(db, row, bodies, urls, now))]
                moved[row["id"]] = fired[-1][1]
        with _plain_tx(src):
            src.executemany("DELETE FROM message WHERE id=?", [(i,) for i in moved])
        for row, _ in fired:
            hooks.call(hooks.on_fired, armed_spec(row), row)  # heartbeat.py forgets the block in Redis
        left = sum(1 for r in rows if r["state"] in (PENDING, MERGED))
        what = [f"{left} message(s) left"] if left or not fired else []
        what += [f"the death notice of {len(fired)} job(s) still running"] if fired else []
        self._tell(f"delivering {' and '.join(what)} in {src_name(src)} by a host no process uses any more")
        self.adopted += [i for _, i in fired]
        return len(moved)

    def _fire_moved(self, db: sqlite3.Connection, row: dict[str, Any], bodies: list[str], urls: dict[Any, str], now: float) -> int:
        """Queue the death notice of another host's armed ``row`` (in the take-over's transaction); return its id.

        Its first message takes the armed row's ``requestId`` (the next ones a
        suffix of it): a take-over repeated after a crash, before the rows
        were deleted there, finds it here and adds nothing, and the space
        itself keeps one message per ``requestId``.
        """
        from .webhook import parse_webhook_url

        hook = parse_webhook_url(urls[row["dest"]])
        dest = self._dest_id(db, hook)
        ids = []
        for k, body in enumerate(bodies):
            request_id = row["request_id"] if k == 0 else f"{row['request_id']}-{k}"
            db.execute("INSERT OR IGNORE INTO message (request_id, dest, space_key, thread_key, payload, mergeable, state,"
                       " next_at, created_at, updated_at, important) VALUES (?,?,?,?,?,0,?,?,?,?,1)",
                       (request_id, dest, hook.space_key, row["thread_key"], body, PENDING, now, now, now))
            ids.append(int(db.execute("SELECT id FROM message WHERE request_id=?", (request_id,)).fetchone()[0]))
        return ids[0]

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            self._conns = [(t, c) for t, c in self._conns if c is not conn]
            _close_quietly(conn)
            self._local.conn = None
        if self._live is not None:  # used again later: opened again, and the lock taken again
            let_go(self._live)
            self._live = None
            self._opened = False

    # -- faults ------------------------------------------------------------

    def _fall_back(self, e: BaseException) -> None:
        """Use a temporary outbox, and say so on stderr: the configured file cannot be used at all."""
        import tempfile

        self.problem = f"outbox {self.path} is unusable ({_reason(e)}): move it away or set CHAT_MAGIC_HOME"
        self.path = Path(tempfile.mkdtemp(prefix="chat_magic-")) / "outbox.sqlite3"
        self._local = threading.local()
        self._open()
        self._tell(f"{self.problem}; using the temporary outbox {self.path} meanwhile")

    def _recover(self, reason: str) -> bool:
        return _call_gated(self, Outbox._recover_gated, True, (reason,), {})

    def _recover_gated(self, reason: str) -> bool:
        """Move a damaged (or older-format) file aside, salvage what can be read into a new one; tell the user.

        Returns whether the outbox is usable again. One process at a time (a
        lock file); a process that finds the file already replaced just
        reconnects.
        """
        if self.path != self.configured:
            return False
        try:
            with self._recovering, _file_lock(self.path.with_name(self.path.name + ".lock")), self._salvage_mark():
                if self._healthy():
                    self._open()
                    return True
                older = reason.startswith("an older format")
                aside = self.path.with_name(f"{self.path.name}.{'old' if older else 'corrupt'}-{time.strftime('%Y%m%dT%H%M%S')}")
                self.close()
                for suffix in ("", "-wal"):
                    if suffix and os.path.isfile(f"{self.path}{suffix}") and not os.path.getsize(f"{self.path}{suffix}"):
                        os.remove(f"{self.path}{suffix}")  # an empty log (made before SQLite opened the file): nothing to keep
                    elif os.path.exists(f"{self.path}{suffix}"):
                        os.replace(f"{self.path}{suffix}", f"{aside}{suffix}")
                with _suppress(OSError):
                    os.remove(f"{self.path}-shm")
                self._opened = False
                self._open()
                kept, waiting = self._salvage(aside)
        except (sqlite3.Error, OSError) as e:
            log.warning("chat_magic: could not recover the outbox %s: %s", self.path, _reason(e))
            return False
        what = "is in an older format" if older else f"was damaged ({reason})"
        self._tell(f"the outbox {self.path} {what}: moved aside to {aside.name}; "
                   f"{kept} message(s) salvaged into a new outbox, {waiting} of them still to deliver")
        return True

    @contextmanager
    def _salvage_mark(self) -> Iterator[None]:
        self._salvaging = True
        try:
            yield
        finally:
            self._salvaging = False

    def _healthy(self) -> bool:
        """Whether the file at ``path`` (perhaps replaced by another process) opens and checks fine."""
        try:
            db = _connect_file(str(self.path), timeout=self.busy_timeout)
            try:
                cols = {r[1] for r in db.execute("PRAGMA table_info(message)")}
                return "dest" in cols and db.execute("PRAGMA quick_check(1)").fetchone()[0] == "ok"
            finally:
                db.close()
        except sqlite3.Error:
            return False

    def _salvage(self, source: Path) -> tuple[int, int]:
        """Copy every readable row of ``source`` into this outbox (same ids); return (rows kept, of them waiting)."""
        from .errors import WebhookURLError
        from .webhook import parse_webhook_url

        kept = waiting = 0
        wanted: set[str] = set()  # image bytes that salvaged messages still need
        try:
            src = _connect_file(str(source), timeout=1.0)
        except sqlite3.Error:
            return 0, 0
        try:
            src.row_factory = sqlite3.Row
            urls = _readable_destinations(src)
            with self._write() as db:
                for row in _readable_rows(src):
                    url = row.get("url") or urls.get(row.get("dest"))
                    try:
                        hook = parse_webhook_url(url) if url else None
                    except WebhookURLError:
                        hook = None
                    if hook is None:
                        continue
                    row.update(dest=self._dest_id(db, hook), space_key=hook.space_key)
                    if row["state"] == SENDING:  # its sender is gone with the old file: send again, same requestId
                        row.update(state=PENDING, owner=None, lease_until=None)
                    if row["state"] == PENDING:
                        row["next_at"] = time.time()  # after a recovery, try again at once
                    cols = _COLUMNS + tuple(c for t, c, _ in _ADDED_COLUMNS if t == "message" and c in row and c not in _COLUMNS)
                    db.execute(f"INSERT OR IGNORE INTO message ({','.join(cols)}) VALUES ({','.join('?' * len(cols))})",
                               [row.get(c) for c in cols])
                    kept += 1
                    waiting += row["state"] == PENDING
                    if row.get("images") and row["state"] == PENDING:
                        wanted.update(re.findall(r"[0-9a-f]{64}", str(row["images"])))
                _salvage_blobs(src, db, wanted)
                _salvage_forgotten(src, db)
        finally:
            src.close()
        return kept, waiting

    def _tell(self, line: str) -> None:
        """One visible line on stderr (not only a log record), and in :attr:`notices`."""
        self.notices.append(line)
        log.warning("chat_magic: %s", redact(line))
        say(line)  # redacted, never raises


def _readable_destinations(src: sqlite3.Connection) -> dict[Any, str]:
    try:
        return {r[0]: r[1] for r in src.execute("SELECT id, url FROM destination")}
    except sqlite3.Error:
        return {}


def _readable_rows(src: sqlite3.Connection, budget: int = 20_000) -> Iterator[dict[str, Any]]:
    """Every message row that can still be read, in id order: ranges that fail are halved until single rows."""
    top = None
    for sql in ("SELECT max(id) FROM message", "SELECT seq FROM sqlite_sequence WHERE name = 'message'"):
        try:
            top = src.execute(sql).fetchone()[0]
        except (sqlite3.Error, TypeError):
            continue
        if top:
            break
    if not top:
        return
    ranges = [(1, int(top))]
    while ranges and budget > 0:
        lo, hi = ranges.pop(0)
        budget -= 1
        sql, args = ("SELECT * FROM message WHERE id = ?", (lo,)) if lo == hi else \
            ("SELECT * FROM message WHERE id BETWEEN ? AND ? ORDER BY id", (lo, hi))
        done = lo - 1
        try:
            for r in src.execute(sql, args):  # row by row: what was read before a bad page is kept
                done = r["id"]
                yield dict(r)
        except sqlite3.DatabaseError:
            if done >= lo:
                ranges.insert(0, (done + 1, hi))  # go on after the last good row
            elif lo < hi:
                mid = (lo + hi) // 2
                ranges[:0] = [(lo, mid), (mid + 1, hi)]


def _salvage_forgotten(src: sqlite3.Connection, db: sqlite3.Connection) -> None:
    """Keep the record of ids pruned after delivery or dropped, and never hand out an id of the old file again.

    A receipt of a message lost with the damage must not find a newer
    message under its id (the new file would count ids from the highest one
    salvaged).
    """
    try:
        for lo, hi, why in src.execute("SELECT lo, hi, why FROM forgotten").fetchall():
            db.execute("INSERT OR IGNORE INTO forgotten (lo, hi, why) VALUES (?,?,?)", (int(lo), int(hi), str(why)))
    except (sqlite3.Error, TypeError, ValueError):
        pass  # an unreadable (or older, absent) record: those ids read as lost
    top = 0
    for sql in ("SELECT max(id) FROM message", "SELECT seq FROM sqlite_sequence WHERE name = 'message'"):
        try:
            top = max(top, int(src.execute(sql).fetchone()[0] or 0))
        except (sqlite3.Error, TypeError, ValueError):
            continue
    if top and not db.execute("UPDATE sqlite_sequence SET seq = max(seq, ?) WHERE name = 'message'", (top,)).rowcount:
        db.execute("INSERT INTO sqlite_sequence (name, seq) VALUES ('message', ?)", (top,))


def _salvage_blobs(src: sqlite3.Connection, db: sqlite3.Connection, wanted: set[str]) -> int:
    """Copy the image bytes ``wanted`` that can still be read, and still hash to their name; return how many."""
    import hashlib

    copied = 0
    for digest in sorted(wanted):
        try:
            row = src.execute("SELECT data, mime FROM blob WHERE sha256 = ?", (digest,)).fetchone()
        except sqlite3.DatabaseError:
            continue  # a damaged page: this figure posts as lost (unless the store has it already)
        if row is None or hashlib.sha256(bytes(row[0])).hexdigest() != digest:
            continue  # gone, or damaged bytes: never post a picture that was not shown
        db.execute("INSERT OR IGNORE INTO blob (sha256, data, mime) VALUES (?,?,?)", (digest, bytes(row[0]), str(row[1])))
        copied += 1
    return copied


def _copy_blobs(src: sqlite3.Connection, db: sqlite3.Connection, images: list[str | None]) -> None:
    """The image bytes the moved messages still need, from another host's file into this one."""
    digests = {d for i in images if i for d in re.findall(r"[0-9a-f]{64}", i)}
    for digest in sorted(digests):
        try:
            row = src.execute("SELECT data, mime FROM blob WHERE sha256 = ?", (digest,)).fetchone()
        except sqlite3.OperationalError:  # a file from before images: no blob table
            return
        if row is not None:
            db.execute("INSERT OR IGNORE INTO blob (sha256, data, mime) VALUES (?,?,?)", (digest, row[0], row[1]))


def _remember(db: sqlite3.Connection, ids: Iterable[int], why: str) -> None:
    """Record why ``ids`` leave the file (``sent``: pruned after delivery; ``dropped``), as runs of consecutive ids.

    A run that touches a neighbouring one of the same reason joins it: pruning
    in id order keeps the table a handful of rows.
    """
    for lo, hi in _runs(ids):
        prev = db.execute("SELECT lo, hi, why FROM forgotten WHERE lo < ? ORDER BY lo DESC LIMIT 1", (lo,)).fetchone()
        if prev is not None and prev[2] == why and prev[1] >= lo - 1:
            lo, hi = prev[0], max(hi, prev[1])
        after = db.execute("SELECT lo, hi, why FROM forgotten WHERE lo > ? ORDER BY lo LIMIT 1", (lo,)).fetchone()
        if after is not None and after[2] == why and after[0] <= hi + 1:
            db.execute("DELETE FROM forgotten WHERE lo = ?", (after[0],))
            hi = max(hi, after[1])
        db.execute("INSERT OR REPLACE INTO forgotten (lo, hi, why) VALUES (?,?,?)", (lo, hi, why))


def _runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted ids as runs of consecutive ones: [1, 2, 3, 7] -> [(1, 3), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    for i in sorted(set(ids)):
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def _forget_blobs(db: sqlite3.Connection) -> None:
    """Delete image bytes that no waiting message names any more (content-addressed: one row serves many)."""
    if db.execute("SELECT 1 FROM blob LIMIT 1").fetchone() is None:
        return
    wanted = set()
    for (images,) in db.execute("SELECT images FROM message WHERE images IS NOT NULL"):
        wanted.update(re.findall(r"[0-9a-f]{64}", images))
    for (digest,) in db.execute("SELECT sha256 FROM blob").fetchall():
        if digest not in wanted:
            db.execute("DELETE FROM blob WHERE sha256 = ?", (digest,))


def _replace_armed(db: sqlite3.Connection, armed: int, ids: list[int]) -> None:
    """Inside :meth:`Outbox.enqueue`'s transaction: forget the armed notice ``armed``; ``ids`` are important now."""
    db.execute(f"DELETE FROM message WHERE id=? AND state='{ARMED}'", (armed,))
    db.executemany("UPDATE message SET important=1 WHERE id=?", [(i,) for i in ids])


def _images(body: tuple[Any, ...]) -> str | None:
    """The ``images`` of an enqueued body (its optional third item)."""
    return body[2] if len(body) > 2 else None


def _add_columns(conn: sqlite3.Connection) -> None:
    """Add the columns of :data:`_ADDED_COLUMNS` that an existing file lacks."""
    for table, column, decl in _ADDED_COLUMNS:
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            try:
                conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {decl}")
            except sqlite3.OperationalError as e:
                if "duplicate column" not in str(e):  # another process added it meanwhile
                    raise


def private_files(path: Path) -> None:
    """Make the outbox's folder and files the user's alone, or refuse in one line (:class:`OutboxError`).

    The file holds every webhook URL (key and token). Another local user who
    can write the folder could plant a symlink or a world-writable ``-wal``
    before SQLite opens it and read every message after. So: the folder is
    made 0700, and must belong to this user and not be writable by group or
    others; the database, ``-wal`` and ``-shm`` are created 0600 with
    ``O_EXCL | O_NOFOLLOW`` before SQLite opens them (SQLite then keeps using
    those files), and one found in place must be a regular file of this user
    that no one else can write (one only readable by others is made 0600).
    """
    if not hasattr(os, "geteuid"):  # pragma: no cover - Windows: the user's profile folder is private already
        path.parent.mkdir(parents=True, exist_ok=True)
        return
    private_folder(path.parent)
    for suffix in ("", "-wal", "-shm"):
        _private_file(Path(f"{path}{suffix}"))


def private_folder(folder: Path) -> None:
    """Make ``folder`` (0700), or check the one there: this user's, writable by no one else."""
    folder.mkdir(parents=True, exist_ok=True, mode=0o700)
    if not hasattr(os, "geteuid"):  # pragma: no cover - Windows
        return
    st = os.stat(folder)
    if st.st_uid != os.geteuid():
        raise OutboxError(f"the outbox folder {folder} belongs to another user (uid {st.st_uid}): "
                          "set CHAT_MAGIC_HOME to a folder of your own")
    if st.st_mode & 0o022:
        raise OutboxError(f"the outbox folder {folder} is writable by other users: chmod 700 {folder}")


def _private_file(p: Path) -> None:
    """Create ``p`` 0600 (never through a symlink), or check the one already there."""
    flags = os.O_RDWR | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        os.close(os.open(p, flags, 0o600))
        return
    except FileExistsError:
        pass
    st = os.lstat(p)
    if stat.S_ISLNK(st.st_mode):
        raise OutboxError(f"{p} is a symbolic link, where the outbox keeps its own file: remove it")
    if not stat.S_ISREG(st.st_mode):
        raise OutboxError(f"{p} is not a file (a folder or a device in its place): move it away")
    if st.st_uid != os.geteuid():
        raise OutboxError(f"{p} belongs to another user (uid {st.st_uid}): remove it")
    if st.st_mode & 0o022:
        raise OutboxError(f"{p} is writable by other users, who may have read it: remove it")
    if st.st_mode & 0o077:
        os.chmod(p, 0o600)


class _OlderFormat(sqlite3.DatabaseError):
    """An outbox written by an older chat_magic: rebuilt like a damaged one, nothing lost."""


class _Gate:
    """The process's one way into SQLite: every outbox call of every thread holds it.

    - Threads of one process queue here, on a Python lock, instead of
      fighting through SQLite's busy handler (which gives up after its timeout
      however short each writer's turn is: 96 threads raised "database is locked").
    - A fork waits for it (:func:`_before_fork`), so no SQLite mutex is held
      mid-call by another thread when the child is made.
    - Reentrant. The thread's depth is counted beside the lock: a hold an
      interrupt left behind (between taking the lock and counting it, or in a
      line that releases it) is given back by :meth:`restore`, which every
      outbox call runs when an exception leaves it, and on the thread's next entry.
    """

    def __init__(self) -> None:
        # guards every SQLite call of this process (all outboxes, all threads) and, before a fork, the
        # connections; order: delivery's _dlock and _drain_lock -> the gate -> Outbox._recovering -> lock file
        self._lock: Any = threading.RLock()
        self._local = threading.local()

    def depth(self) -> int:
        return int(getattr(self._local, "depth", 0))

    def held(self) -> bool:
        """Whether this thread is inside the outbox now (a signal handler that runs here must not wait for it)."""
        return bool(self._lock._is_owned())

    def enter(self, timeout: float) -> bool:
        moving = getattr(self._local, "moving", None)
        depth = self.depth()
        if depth == 0 and self._lock._is_owned() and not _on_stack(moving):
            self.restore(0)
            log.warning("chat_magic: released the outbox lock left held by an interrupt")
        self._local.moving = sys._getframe()
        if not self._lock.acquire(True, max(0.0, timeout)):
            self._local.moving = moving
            raise sqlite3.OperationalError("database is locked (by another thread of this process)")
        self._local.depth = depth + 1
        self._local.moving = moving
        return True

    # The count never says more than the holds: it goes down before a release and up after an
    # acquire, so an interrupt between the two leaves an extra hold (given back at depth 0), never
    # a count above the holds (which no depth-0 check would ever see: the gate then stayed held for
    # good, and a Ctrl-C storm left a worker waiting on it with hundreds of messages queued).

    # A signal handler can run inside enter or leave, between the lock and the count, and enter the gate
    # itself: the frame mid-way (``moving``, found on the handler's stack) tells that hold from one an
    # interrupt left, so the handler's entry does not give back a hold its own thread is still counting.

    def leave(self) -> None:
        if self._lock._is_owned():
            moving = getattr(self._local, "moving", None)
            self._local.moving = sys._getframe()
            self._local.depth = max(0, self.depth() - 1)
            self._lock.release()
            self._local.moving = moving

    def leave_to(self, depth: int) -> None:
        """Back to ``depth`` after a call that entered once: a leave, or a restore when an interrupt cut ``enter`` short."""
        if self.depth() == depth + 1:
            self.leave()
        else:
            self.restore(depth)

    def restore(self, depth: int) -> None:
        """Hold the gate exactly ``depth`` times, as this thread did before a call an interrupt cut short."""
        self._local.depth = 0
        if self._lock._is_owned():
            self._lock._release_save()
        if depth:
            self._lock._acquire_restore((depth, threading.get_ident()))
        self._local.depth = depth


def _on_stack(frame: Any) -> bool:
    """Whether ``frame`` is one of the caller's callers (a mark an interrupt left is on no stack)."""
    if frame is None:
        return False
    f: Any = sys._getframe(2)
    while f is not None:
        if f is frame:
            return True
        f = f.f_back
    return False


_gate = _Gate()


def inside() -> bool:
    """Whether this thread is inside an outbox call now (a signal handler that runs here must not wait for one)."""
    return _gate.held()


def heal_gate(*, outside: bool = False) -> None:
    """Outside any outbox call (depth 0, or ``outside``: this thread is known to be), give back a gate hold an interrupt left."""
    if outside or not _gate.depth():
        _gate.restore(0)


def _call_gated(box: Outbox, method: Callable[..., T], gate: bool, args: Any, kwargs: Any) -> T:
    """``method(box, ...)``, holding the gate when ``gate``."""
    if not gate:
        return method(box, *args, **kwargs)
    depth = _gate.depth()
    try:
        _gate.enter(box.busy_timeout)
        return method(box, *args, **kwargs)
    finally:
        _gate.leave_to(depth)


# -- the gated connection: every statement of the process holds the gate -----------------


class _Rows:
    """What one gated statement did: its rows, read to the end under the gate, handed out from memory.

    No statement stays half-way (a lock in SQLite's per-file bookkeeping)
    once the gate is let go, so a fork, which waits for the gate, never makes
    a child that believes its process holds a lock. A read that fails
    half-way (a damaged page) hands out the rows read before the failure,
    then raises it, as a plain cursor does (salvage reads row by row).
    """

    __slots__ = ("_error", "_rows", "description", "lastrowid", "rowcount")

    def __init__(self, cur: sqlite3.Cursor, rows: list[Any], error: sqlite3.Error | None) -> None:
        self._rows, self._error = iter(rows), error
        self.rowcount, self.lastrowid, self.description = cur.rowcount, cur.lastrowid, cur.description

    def __iter__(self) -> _Rows:
        return self

    def __next__(self) -> Any:
        for row in self._rows:
            return row
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        raise StopIteration

    def fetchone(self) -> Any:
        return next(self, None)

    def fetchmany(self, size: int = 1) -> list[Any]:
        return [row for _, row in zip(range(size), self)]

    def fetchall(self) -> list[Any]:
        return list(self)


def _ran(conn: sqlite3.Connection, step: Callable[[Any, str, Any], sqlite3.Cursor], sql: str, args: Any) -> _Rows:
    """Run one statement to its end under the gate (taken here unless this thread holds it: a transaction, an outbox call)."""
    outermost = not _gate.held()
    depth = _gate.depth()
    try:
        if outermost:
            _gate.enter(_wait_of(conn))
        cur = step(conn, sql, args)
        rows: list[Any] = []
        error = None
        try:
            row = sqlite3.Cursor.fetchone(cur)
            while row is not None:
                rows.append(row)
                row = sqlite3.Cursor.fetchone(cur)
        except sqlite3.DatabaseError as e:
            error = e
        if outermost and conn.in_transaction:
            _refuse_open_transaction(conn)
        return _Rows(cur, rows, error)
    finally:
        if outermost:
            _gate.leave_to(depth)


class _Statement(sqlite3.Cursor):
    """A cursor of a gated connection (``cursor()``, seldom used): each statement runs as :func:`_ran` runs it."""

    _done: _Rows | None = None

    def execute(self, sql: str, parameters: Any = (), /) -> _Statement:  # type: ignore[override]
        self._done = _ran(self.connection, lambda _, s, a: sqlite3.Cursor.execute(self, s, a), sql, parameters)
        return self

    def executemany(self, sql: str, seq_of_parameters: Any, /) -> _Statement:  # type: ignore[override]
        self._done = _ran(self.connection, lambda _, s, a: sqlite3.Cursor.executemany(self, s, a), sql, seq_of_parameters)
        return self

    def executescript(self, script: str, /) -> _Statement:  # type: ignore[override]
        self._done = _ran(self.connection, lambda _, s, a: sqlite3.Cursor.executescript(self, s), script, None)
        return self

    def __next__(self) -> Any:
        if self._done is None:
            raise StopIteration
        return next(self._done)

    def fetchone(self) -> Any:
        return next(self, None)

    def fetchmany(self, size: int | None = None) -> list[Any]:
        return [row for _, row in zip(range(self.arraysize if size is None else size), self)]

    def fetchall(self) -> list[Any]:
        return list(self)


class _GatedConnection(sqlite3.Connection):
    """A connection whose every statement, commit, rollback and close holds the process's gate.

    The only kind this package opens (:func:`_connect_file`): an ungated
    statement cannot be written by accident, whichever module issues it
    through :meth:`Outbox._db`. A transaction left open when the gate is let
    go (``BEGIN`` outside :meth:`Outbox._write`) is rolled back and refused.
    """

    wait = 10.0  # how long a statement waits for the gate (set to the connection's busy timeout)

    def cursor(self, factory: Any = None) -> Any:
        return sqlite3.Connection.cursor(self, factory or _Statement)

    def execute(self, sql: str, parameters: Any = (), /) -> Any:
        return _ran(self, sqlite3.Connection.execute, sql, parameters)

    def executemany(self, sql: str, parameters: Any, /) -> Any:
        return _ran(self, sqlite3.Connection.executemany, sql, parameters)

    def executescript(self, script: str, /) -> Any:
        return _ran(self, lambda conn, sql, _: sqlite3.Connection.executescript(conn, sql), script, None)

    def commit(self) -> None:
        self._gated(super().commit)

    def rollback(self) -> None:
        self._gated(super().rollback)

    def close(self) -> None:
        self._gated(super().close)  # the last connection's close checkpoints the log: locks, like a statement

    def _gated(self, call: Callable[[], None]) -> None:
        depth = _gate.depth()
        try:
            _gate.enter(self.wait)
            call()
        finally:
            _gate.leave_to(depth)


def _wait_of(conn: sqlite3.Connection) -> float:
    return float(getattr(conn, "wait", 10.0))


def _refuse_open_transaction(conn: sqlite3.Connection) -> None:
    """A transaction would outlive the gate (a fork then leaves the child "database is locked"): roll it back, refuse it."""
    sqlite3.Connection.execute(conn, "ROLLBACK")
    raise sqlite3.ProgrammingError("an outbox transaction must hold the gate (Outbox._write): rolled back")


def _connect_file(target: str, *, timeout: float, **options: Any) -> sqlite3.Connection:
    """A gated connection to an SQLite file (:class:`_GatedConnection`): the only way this package opens one."""
    conn = sqlite3.connect(target, timeout=timeout, factory=_GatedConnection, **options)
    conn.wait = timeout  # type: ignore[attr-defined]
    return conn


class PacingTable:
    """The ``pacing`` table, as the local pacer (:class:`chat_magic.pacing.SqlitePacer`) sees it.

    Read and written inside the claim's or the outcome's own transaction
    (``db``): the pacer decides, the outbox keeps the SQL.
    """

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def slot(self, space_key: str) -> float | None:
        """When the space's slot opens (a wall-clock time), or None when it was never taken."""
        row = self.db.execute("SELECT next_slot FROM pacing WHERE space_key = ?", (space_key,)).fetchone()
        return float(row[0]) if row else None

    def set_slot(self, space_key: str, until: float) -> None:
        self.db.execute("INSERT INTO pacing (space_key, next_slot) VALUES (?, ?)"
                        " ON CONFLICT(space_key) DO UPDATE SET next_slot = excluded.next_slot", (space_key, until))

    def extend_slot(self, space_key: str, until: float) -> None:
        """Keep a taken slot closed until ``until``, never opening it earlier."""
        self.db.execute("UPDATE pacing SET next_slot = MAX(next_slot, ?) WHERE space_key = ?", (until, space_key))


# -- another outbox file, looked at without using it (hosts.py names the files) ------------


def unfinished(path: Path) -> int:
    """How many messages wait in the outbox file ``path`` (0 if absent or unreadable)."""
    if not path.is_file():
        return 0
    try:
        conn = _connect_file(str(path), timeout=1.0)
        try:
            row = conn.execute(f"SELECT count(*) FROM message WHERE {_WAITING}").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


def legacy_to_drain(home: str | os.PathLike[str]) -> Path | None:
    """The old single outbox file (before per-host files) when it still holds waiting messages, else None."""
    old = legacy_path(Path(home))
    return old if unfinished(old) else None


def in_use(path: Path, now: float | None = None) -> str | None:
    """Why another host's outbox file looks in use (a live lease, a recent write), or None.

    A heuristic: no process can tell from here whether another machine is
    alive, but a message under a lease, or a write-ahead log written in the
    last two minutes, means some process there is working on the file.
    """
    now = time.time() if now is None else now
    for p in (path, Path(f"{path}-wal")):  # first: opening the file below may checkpoint and touch it
        try:
            age = now - p.stat().st_mtime
        except OSError:
            continue
        if age < ACTIVE_WINDOW:
            return f"it was written {max(0.0, age):.0f} s ago"
    try:
        conn = _connect_file(str(path), timeout=1.0)
        try:
            lease = conn.execute(f"SELECT max(lease_until) FROM message WHERE state = '{SENDING}'").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as e:
        return f"cannot read it ({e})"
    if lease and now < lease <= now + MAX_HOLD:  # further ahead: written before the clock stepped back
        return f"a message is being sent from it (lease for {lease - now:.0f} s more)"
    return None


_TRY_BUSY_MS = 50  # one try at the write lock; between tries the gate lets this process's other threads in


class _Tx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``: one writer at a time across processes, and across this process's threads.

    Safe against an asynchronous exception (Ctrl-C, a signal handler's
    exception) at any point: ``BEGIN`` runs inside the ``try`` that rolls
    back, ``__exit__`` rolls back whatever stopped it, and a transaction left
    open anyway (an interrupt inside the rollback itself) is rolled back, and
    said, at the start of the connection's next one. ``wait``: how long
    another process's lock may keep this transaction from starting.
    """

    def __init__(self, box: Outbox | sqlite3.Connection, wait: float | None = None) -> None:
        # a bare connection (older callers): its own busy timeout is how long it waits
        self.box = box if isinstance(box, Outbox) else None
        self.fixed = None if isinstance(box, Outbox) else box
        self.busy_timeout = box.busy_timeout if isinstance(box, Outbox) else box.execute("PRAGMA busy_timeout").fetchone()[0] / 1000
        self.wait = self.busy_timeout if wait is None else wait
        self.db: Any = None

    def __enter__(self) -> sqlite3.Connection:
        waited = 0.0
        gate_deadline = time.monotonic() + self.busy_timeout
        while True:
            entered = False
            try:
                entered = _gate.enter(gate_deadline - time.monotonic())
                # under the gate: a fork meanwhile may have closed the thread's connection
                self.db = self.box._db() if self.box is not None else self.fixed
                if self.db.in_transaction:
                    _rollback(self.db)
                    log.warning("chat_magic: rolled back an outbox transaction left open by an interrupt")
                t = time.monotonic()
                if self._begin():
                    return self.db
                waited += time.monotonic() - t
                if waited >= self.wait:
                    raise sqlite3.OperationalError("database is locked")
            except BaseException:
                if self.db is not None:
                    _rollback(self.db)
                if entered:
                    _gate.leave()
                raise
            _gate.leave()  # another process holds the write lock: let this process's readers in meanwhile
            entered = False
            time.sleep(0.002)

    def _begin(self) -> bool:
        """One short try at the write lock; False when another process holds it."""
        self.db.execute(f"PRAGMA busy_timeout={_TRY_BUSY_MS}")
        try:
            self.db.execute("BEGIN IMMEDIATE")
            return True
        except sqlite3.OperationalError as e:
            if _is_busy(e):
                return False
            raise
        finally:
            self.db.execute(f"PRAGMA busy_timeout={int(self.busy_timeout * 1000)}")

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        try:
            if exc_type is None:
                self.db.execute("COMMIT")
        finally:
            try:
                _rollback(self.db)  # nothing to do after a COMMIT; after anything else, undo
            finally:
                _gate.leave()


@contextmanager
def _plain_tx(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A write transaction on a connection of another file (another host's outbox): under the gate, no retries."""
    depth = _gate.depth()
    try:
        _gate.enter(getattr(db, "wait", 10.0))
        db.execute("BEGIN IMMEDIATE")
        yield db
        db.execute("COMMIT")
    except BaseException:
        _rollback(db)
        raise
    finally:
        _gate.leave_to(depth)


def _rollback(db: sqlite3.Connection) -> None:
    try:
        if db.in_transaction:
            db.execute("ROLLBACK")
    except sqlite3.Error:
        pass


_outboxes: weakref.WeakSet[Outbox] = weakref.WeakSet()
_inherited: list[sqlite3.Connection] = []  # in a forked child: the parent's other threads' connections, never used nor closed
_fork_held = False


def _before_fork() -> None:
    """Take the gate and close every connection: the child inherits no SQLite call in progress, no open handle."""
    global _fork_held
    try:
        _gate.enter(5.0)
    except BaseException:
        return  # a thread holds it that long (never seen): fork anyway
    _fork_held = True
    me = threading.current_thread()
    for box in list(_outboxes):
        # Only this thread's connection is closed here. Another thread keeps its own between two
        # statements (each holds the gate, _GatedConnection): closed under it, its next one would
        # fail (and, when statements ran ungated, the process crashed: SIGSEGV, 1 fork in 6). The
        # child never uses nor closes what it inherits (see _after_fork_in_child).
        box._close_thread(me)


def _after_fork_in_parent() -> None:
    global _fork_held
    if _fork_held:
        _fork_held = False
        _gate.leave()


def _after_fork_in_child() -> None:
    """Fresh locks: whatever another parent thread held is not held here."""
    global _gate, _fork_held
    _gate = _Gate()
    _fork_held = False
    for box in list(_outboxes):
        _inherited.extend(c for _, c in box._conns)  # kept, never closed: closing them here would release the parent's locks
        box._conns = []
        box._gen += 1
        box._local = threading.local()
        box._recovering = threading.RLock()  # no recovery runs in the child


if hasattr(os, "register_at_fork"):
    os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


def hold_for_fork() -> None:
    """Prepare a fork already under way as this module's own hook does, unless it did (``chat_magic.__init__``).

    This module imported while a fork waited in the package's hook: its own
    ``before`` hook is not in that fork's list.
    """
    if not _fork_held:
        _before_fork()


@contextmanager
def _file_lock(path: Path, *, shared: bool = False) -> Iterator[None]:
    """An exclusive lock across processes (``flock``) for the duration of a recovery.

    ``shared``: wait for a recovery in progress to finish (a reader about to
    open the file); best effort, a lock file that cannot be made is not waited for.
    """
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError:
        if not shared:
            raise
        yield
        return
    try:
        try:
            import fcntl

            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
        except ImportError:  # pragma: no cover - Windows: recoveries are rare; go on unlocked
            pass
        yield
    finally:
        os.close(fd)


@contextmanager
def _suppress(*kinds: type[BaseException]) -> Iterator[None]:
    try:
        yield
    except kinds:
        pass


def _ended(t: threading.Thread) -> bool:
    """Whether a thread has ended (the main thread counts as running: at exit it reads as stopped, yet runs atexit)."""
    return t is not threading.main_thread() and not t.is_alive()


def _close_quietly(conn: sqlite3.Connection) -> None:
    try:
        conn.close()
    except sqlite3.Error:
        pass


def _inode(path: Path) -> int | None:
    try:
        return os.stat(path).st_ino
    except OSError:
        return None


def src_name(db: sqlite3.Connection) -> str:
    """The file name of a connection's main database."""
    row = db.execute("PRAGMA database_list").fetchone()
    return Path(row[2]).name if row and row[2] else "another outbox"


def _ahead(t: float, now: float, longest: float) -> float:
    """``t``, or ``now`` when ``t`` lies more than ``longest`` seconds ahead.

    Pacing slots, retry times and leases are shared between processes, so
    they are wall-clock times. A time further ahead than anything this code
    ever writes was written before the clock stepped back: waiting for it
    would stall the space for as long as the step (an hour for -3600 s).
    """
    return now if t > now + longest else t


_PEEKED = ("id", "state", "space_key", "thread_key", "attempts", "created_at", "next_at", "merged_into", "name", "thread_name",
           "error_code", "error_status", "error")  # what a listing shows of a row (Row's fields but the preview)


def peek(path: str | os.PathLike[str], states: Iterable[str], limit: int = 1000) -> tuple[dict[str, int], list[Row]]:
    """Counts by state, and the rows in ``states``, of an outbox file another host owns: read only.

    For ``chat-magic outbox list --all-hosts``. Opening an :class:`Outbox`
    would hold the file's ``.live`` lock (other hosts would take it for in
    use), write its schema, checkpoint and delete its log, and move a damaged
    file aside to salvage it: a listing must do none of that. With a
    ``-wal`` beside it (a process has it open, or one died) the file is read
    ``mode=ro``; without one ``immutable=1``, since ``mode=ro`` would create
    the ``-wal`` and ``-shm`` (and no process has the file open then). Raises
    :class:`sqlite3.Error` for a damaged, locked or foreign file.
    """
    path = Path(path)
    options = "mode=ro" if Path(f"{path}-wal").exists() else "mode=ro&immutable=1"
    db = _connect_file(f"{path.resolve().as_uri()}?{options}", uri=True, timeout=1.0)
    try:
        db.row_factory = sqlite3.Row
        counts = {r[0]: r[1] for r in db.execute("SELECT state, count(*) FROM message GROUP BY state")}
        has = {r[1] for r in db.execute("PRAGMA table_info(message)")}  # an older file lacks later columns: None
        shown = ", ".join(c if c in has else f"NULL AS {c}" for c in _PEEKED)
        wanted = list(states)
        rows = db.execute(f"SELECT {shown}, substr(payload, 1, 200) AS preview FROM message"
                          f" WHERE state IN ({','.join('?' * len(wanted))}) ORDER BY id LIMIT ?", [*wanted, limit])
        return counts, [Row(**dict(r)) for r in rows]
    finally:
        db.close()


def keep_sent() -> int:
    """How many delivered messages to keep for ``outbox list``: ``CHAT_MAGIC_KEEP_SENT``, else :data:`KEEP_SENT`."""
    value = os.environ.get("CHAT_MAGIC_KEEP_SENT", "").strip()
    if not value:
        return KEEP_SENT
    try:
        return max(0, int(value))
    except ValueError:
        log.warning("chat_magic: CHAT_MAGIC_KEEP_SENT=%r is not a number of messages; keeping %d", value, KEEP_SENT)
        return KEEP_SENT


def _json_bytes(s: str) -> int:
    return len(s.encode("utf-8", "surrogatepass"))


def _is_corrupt(e: BaseException) -> bool:
    if isinstance(e, _OlderFormat):
        return True
    name = getattr(e, "sqlite_errorname", "")
    if name:
        return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
    text = str(e).lower()
    return isinstance(e, sqlite3.DatabaseError) and ("malformed" in text or "not a database" in text or "corrupt" in text)


def _is_busy(e: BaseException) -> bool:
    name = getattr(e, "sqlite_errorname", "")
    return name.startswith(("SQLITE_BUSY", "SQLITE_LOCKED")) or "locked" in str(e).lower()


def _explain(e: BaseException) -> str:
    """The reason, with what to do about it."""
    reason = _reason(e)
    if _is_busy(e):
        return f"{reason} (another process holds its lock; try again in a moment)"
    if isinstance(e, OSError) and e.errno == 28 or "disk is full" in reason or "SQLITE_FULL" in getattr(e, "sqlite_errorname", ""):
        return f"{reason} (free some disk space)"
    return reason


def _request_id() -> str:
    return "cm-" + uuid.uuid4().hex


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__
