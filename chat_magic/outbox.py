"""The durable outbox: one SQLite file shared by every process on the machine.

A message is written here before ``send`` returns, and leaves only when the
space has it (``sent``) or refused it for good (``failed``, kept for the user).
The file also holds each space's pacing slot, so every process that posts to
one space shares its 1 request/second quota.

States: ``pending`` -> ``sending`` (claimed under a lease by one process) ->
``sent`` | ``failed`` | back to ``pending`` with a retry time. Short plain-text
messages to one thread that wait together are *merged* into the oldest one,
which carries them (their state becomes ``merged``).

A process killed mid-delivery leaves its row ``sending``: the next claim takes
it back as soon as that process is gone (or its lease runs out) and sends it
again with the same ``requestId``.

Nothing here knows about IPython or HTTP.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from .errors import OutboxError
from .hosts import current_host
from .message import MAX_TEXT, SEPARATOR, merge_texts

if TYPE_CHECKING:
    from .pacing import RedisSlot

log = logging.getLogger("chat_magic")

PENDING, SENDING, SENT, FAILED, MERGED = "pending", "sending", "sent", "failed", "merged"
TERMINAL = (SENT, FAILED)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS message (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,
    request_id  TEXT    NOT NULL UNIQUE,
    url         TEXT    NOT NULL,
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
"""

@dataclass
class Job:
    """One HTTP request to make: a row (possibly carrying merged ones)."""

    id: int
    request_id: str
    url: str
    space_key: str
    thread_key: str | None
    payload: str
    attempts: int
    merged: int = 0  # how many other messages it carries


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


def _owner_alive(owner: str | None) -> bool:
    if not owner:
        return False
    host, _, pid = owner.rpartition(":")
    if host != current_host():
        return True  # another machine sharing the file: trust its lease
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except (PermissionError, ValueError):
        return True
    return True


class Outbox:
    """The outbox file. Each thread gets its own SQLite connection."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 10.0, caller_timeout: float = 2.0) -> None:
        self.busy_timeout = busy_timeout
        self.caller_timeout = caller_timeout
        self._local = threading.local()
        self.owner = f"{current_host()}:{os.getpid()}"
        self.cluster: RedisSlot | None = None  # the pacing slot shared by every host (pacing.py), if any
        self.problem: str | None = None  # why the configured file could not be used
        self.path = Path(path)
        try:
            self._open()
        except (sqlite3.Error, OSError) as e:
            import tempfile

            self.problem = f"outbox {self.path} is unusable ({_reason(e)}): move it away or set CHAT_MAGIC_HOME"
            self.path = Path(tempfile.mkdtemp(prefix="chat_magic-")) / "outbox.sqlite3"
            log.warning("chat_magic: %s; using %s meanwhile", self.problem, self.path)
            self._local = threading.local()
            self._open()

    # -- connections -----------------------------------------------------

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        if os.stat(self.path).st_mode & 0o077:
            os.chmod(self.path, 0o600)
        conn = self._connect()
        conn.executescript(_SCHEMA)
        conn.execute("SELECT count(*) FROM message").fetchone()

    def _connect(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            return conn
        conn = sqlite3.connect(str(self.path), isolation_level=None, timeout=self.busy_timeout)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.row_factory = sqlite3.Row
        self._local.conn = conn
        return conn

    def _db(self) -> sqlite3.Connection:
        try:
            return self._connect()
        except sqlite3.Error as e:
            raise OutboxError(f"cannot open the outbox {self.path}: {_reason(e)}") from None

    def _write(self):
        return _Tx(self._db())

    # -- caller side -----------------------------------------------------

    def enqueue(self, url: str, space_key: str, thread_key: str | None, bodies: Iterable[tuple[str, bool]]) -> list[int]:
        """Store messages (in order) and return their ids. Each gets a fresh requestId.

        ``bodies`` are ``(JSON Message, mergeable)`` pairs: plain-text messages
        may be merged with others waiting for the same thread.
        """
        now = time.time()
        rows = [(_request_id(), url, space_key, thread_key, body, int(mergeable), PENDING, now, now, now) for body, mergeable in bodies]
        try:
            db = self._db()
            if not getattr(self._local, "caller", False):
                # a caller never waits long for another process's lock: it gets a clear error instead
                db.execute(f"PRAGMA busy_timeout={int(self.caller_timeout * 1000)}")
                self._local.caller = True
            with self._write() as db:
                ids = []
                for r in rows:
                    cur = db.execute(
                        "INSERT INTO message (request_id, url, space_key, thread_key, payload, mergeable, state, next_at, created_at, updated_at)"
                        " VALUES (?,?,?,?,?,?,?,?,?,?)",
                        r,
                    )
                    ids.append(cur.lastrowid)
        except sqlite3.Error as e:
            raise OutboxError(f"cannot write to the outbox {self.path}: {_reason(e)}") from None
        return ids

    # -- worker side -----------------------------------------------------

    def next_ready(self, now: float) -> float | None:
        """Seconds until some message may be sent (0 = now), or None when nothing waits.

        Read only: no lock is taken.
        """
        waits = self.ready_spaces(now)
        if self.cluster is not None:
            waits = self.cluster.waits(waits)
        return min(waits.values()) if waits else None

    def ready_spaces(self, now: float) -> dict[str, float]:
        """Seconds until each waiting space's head may be sent from this host (0 = now), oldest head first.

        Read only: no lock is taken.
        """
        db = self._db()
        waits: dict[str, float] = {}
        for head in db.execute(
            "SELECT m.space_key, m.state, m.next_at, m.owner, m.lease_until, p.next_slot FROM message m"
            " LEFT JOIN pacing p ON p.space_key = m.space_key"
            " WHERE m.id IN (SELECT MIN(id) FROM message WHERE state IN ('pending','sending') GROUP BY space_key)"
            " ORDER BY m.id"
        ):
            if head["state"] == SENDING:
                if _owner_alive(head["owner"]) and (head["lease_until"] or 0) > now:
                    t = head["lease_until"]
                else:
                    t = now
            else:
                t = head["next_at"]
            t = max(t, head["next_slot"] or 0)
            waits[head["space_key"]] = max(0.0, t - now)
        return waits

    def claim(self, now: float, *, interval: float, lease: float, space_key: str | None = None) -> Job | None:
        """Take the next message that may be sent now (in ``space_key`` if given), merging short ones behind it.

        With a cluster slot (Redis), the space's slot is taken there first, then here.
        """
        if self.cluster is not None:
            return self.cluster.claim(self, now, interval=interval, lease=lease, space_key=space_key)
        return self.claim_local(now, interval=interval, lease=lease, space_key=space_key)

    def claim_local(self, now: float, *, interval: float, lease: float, space_key: str | None = None) -> Job | None:
        """:meth:`claim` paced by this host's outbox alone.

        Takes the space's pacing slot in the same transaction, so two processes
        never send to one space within ``interval`` seconds.
        """
        with self._write() as db:
            now = max(now, time.time())  # waiting for the lock took time: pace from when the slot is taken
            heads = db.execute(
                "SELECT m.*, p.next_slot FROM message m LEFT JOIN pacing p ON p.space_key = m.space_key"
                " WHERE m.id IN (SELECT MIN(id) FROM message WHERE state IN ('pending','sending') GROUP BY space_key)"
                " ORDER BY m.id"
            ).fetchall()
            for head in heads:
                if (head["next_slot"] or 0) > now or (space_key is not None and head["space_key"] != space_key):
                    continue
                if head["state"] == SENDING:
                    if _owner_alive(head["owner"]) and (head["lease_until"] or 0) > now:
                        continue
                    log.debug("chat_magic: taking back message %s from %s", head["id"], head["owner"])
                elif head["next_at"] > now:
                    continue
                return self._take(db, head, now, interval, lease)
        return None

    def _take(self, db: sqlite3.Connection, head: sqlite3.Row, now: float, interval: float, lease: float) -> Job:
        payload = head["payload"]
        merged_ids: list[int] = []
        if head["mergeable"] and head["attempts"] == 0:
            texts = [json.loads(payload)["text"]]
            size = len(texts[0])
            for r in db.execute(
                "SELECT id, url, thread_key, payload, mergeable, attempts FROM message"
                " WHERE state = 'pending' AND space_key = ? AND id > ? ORDER BY id LIMIT 2000",
                (head["space_key"], head["id"]),
            ):
                if r["url"] != head["url"] or r["thread_key"] != head["thread_key"]:
                    continue  # another thread or webhook: its own order
                if not r["mergeable"] or r["attempts"]:
                    break
                t = json.loads(r["payload"])["text"]
                if size + len(SEPARATOR) + len(t) > MAX_TEXT:
                    break
                texts.append(t)
                size += len(SEPARATOR) + len(t)
                merged_ids.append(r["id"])
            if merged_ids:
                body = json.loads(payload)
                body["text"] = merge_texts(texts)
                payload = json.dumps(body, ensure_ascii=False, separators=(",", ":"))
                db.executemany(
                    f"UPDATE message SET state='{MERGED}', merged_into=?, updated_at=? WHERE id=?",
                    [(head["id"], now, i) for i in merged_ids],
                )
        db.execute(
            "UPDATE message SET state=?, payload=?, attempts=attempts+1, owner=?, lease_until=?, updated_at=? WHERE id=?",
            (SENDING, payload, self.owner, now + lease, now, head["id"]),
        )
        db.execute(
            "INSERT INTO pacing (space_key, next_slot) VALUES (?, ?)"
            " ON CONFLICT(space_key) DO UPDATE SET next_slot = excluded.next_slot",
            (head["space_key"], now + interval),
        )
        return Job(
            id=head["id"], request_id=head["request_id"], url=head["url"], space_key=head["space_key"],
            thread_key=head["thread_key"], payload=payload, attempts=head["attempts"] + 1, merged=len(merged_ids),
        )

    def ack(self, job: Job, name: str | None, thread_name: str | None, *, space_free_at: float = 0.0) -> None:
        now = time.time()
        with self._write() as db:
            db.execute(
                "UPDATE message SET state=?, name=?, thread_name=?, owner=NULL, lease_until=NULL,"
                " error_code=NULL, error_status=NULL, error=NULL, updated_at=? WHERE id=?",
                (SENT, name, thread_name, now, job.id),
            )
            _hold_space(db, job.space_key, space_free_at)
        self._hold_cluster(job.space_key, space_free_at)

    def retry_later(self, job: Job, delay: float, *, code: int, status: str, error: str, space_free_at: float = 0.0) -> None:
        now = time.time()
        with self._write() as db:
            db.execute(
                "UPDATE message SET state=?, next_at=?, owner=NULL, lease_until=NULL, error_code=?, error_status=?, error=?, updated_at=? WHERE id=?",
                (PENDING, now + delay, code, status, error, now, job.id),
            )
            _hold_space(db, job.space_key, space_free_at)
        self._hold_cluster(job.space_key, space_free_at)

    def fail(self, job: Job, *, code: int, status: str, error: str, space_free_at: float = 0.0) -> None:
        now = time.time()
        with self._write() as db:
            db.execute(
                "UPDATE message SET state=?, owner=NULL, lease_until=NULL, error_code=?, error_status=?, error=?, updated_at=? WHERE id=?",
                (FAILED, code, status, error, now, job.id),
            )
            _hold_space(db, job.space_key, space_free_at)
        self._hold_cluster(job.space_key, space_free_at)

    def _hold_cluster(self, space_key: str, until: float) -> None:
        """Hold the space in the cluster slot too, after the commit: no network call under the write lock."""
        if self.cluster is not None and until:
            self.cluster.hold(space_key, until - time.time())

    # -- inspection and maintenance -------------------------------------------

    def rows(self, ids: Iterable[int] | None = None, *, states: Iterable[str] | None = None, limit: int = 1000) -> list[Row]:
        if ids is not None:
            ids = list(ids)
            if len(ids) > 500:
                return [r for k in range(0, len(ids), 500) for r in self.rows(ids[k:k + 500], states=states, limit=limit)]
        db = self._db()
        sql = ("SELECT id, state, space_key, thread_key, attempts, created_at, next_at, merged_into, name, thread_name,"
               " error_code, error_status, error, substr(payload, 1, 200) AS preview FROM message")
        where, args = [], []
        if ids is not None:
            ids = list(ids)
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
        """Rows for ``ids``, each merged row replaced by the row that carried it."""
        rows = {r.id: r for r in self.rows(ids)}
        carriers = {r.merged_into for r in rows.values() if r.state == MERGED and r.merged_into}
        if carriers:
            rows.update({r.id: r for r in self.rows(carriers)})
        out = []
        for i in ids:
            r = rows.get(i)
            if r is not None and r.state == MERGED and r.merged_into in rows:
                r = rows[r.merged_into]
            if r is not None:
                out.append(r)
        return out

    def counts(self) -> dict[str, int]:
        return {r[0]: r[1] for r in self._db().execute("SELECT state, count(*) FROM message GROUP BY state")}

    def unfinished_ids(self) -> list[int]:
        return [r[0] for r in self._db().execute("SELECT id FROM message WHERE state IN ('pending','sending') ORDER BY id")]

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

    def drop(self, ids: Iterable[int]) -> int:
        """Delete messages that are not being sent (``chat-magic outbox drop``)."""
        with self._write() as db:
            n = 0
            for i in ids:
                db.execute("DELETE FROM message WHERE merged_into=? AND state=?", (i, MERGED))
                n += db.execute("DELETE FROM message WHERE id=? AND state != ?", (i, SENDING)).rowcount
        return n

    def prune(self, older_than: float) -> int:
        """Forget delivered messages older than ``older_than`` seconds."""
        cutoff = time.time() - older_than
        with self._write() as db:
            db.execute("DELETE FROM message WHERE state=? AND merged_into IN (SELECT id FROM message WHERE state=? AND updated_at < ?)", (MERGED, SENT, cutoff))
            return db.execute("DELETE FROM message WHERE state=? AND updated_at < ?", (SENT, cutoff)).rowcount

    def close(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None


class _Tx:
    """``BEGIN IMMEDIATE`` ... ``COMMIT``: one writer at a time across processes."""

    def __init__(self, db: sqlite3.Connection) -> None:
        self.db = db

    def __enter__(self) -> sqlite3.Connection:
        self.db.execute("BEGIN IMMEDIATE")
        return self.db

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.db.execute("COMMIT")
        else:
            self.db.execute("ROLLBACK")


def _hold_space(db: sqlite3.Connection, space_key: str, until: float) -> None:
    """Keep the space's pacing slot closed until ``until`` (never opens it earlier)."""
    if until:
        db.execute("UPDATE pacing SET next_slot = MAX(next_slot, ?) WHERE space_key = ?", (until, space_key))


def _request_id() -> str:
    return "cm-" + uuid.uuid4().hex


def _reason(e: BaseException) -> str:
    return str(e) or type(e).__name__
