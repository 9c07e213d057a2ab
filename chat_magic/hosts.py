"""One outbox file per host: ``outbox-<host>.sqlite3`` under the state directory.

On a cluster the home directory is usually NFS, shared by every node. SQLite's
WAL mode needs shared memory on one machine and file locks over NFS are not
reliable, so two hosts must never open the same SQLite file: the file name
carries the host. The folder stays ``CHAT_MAGIC_HOME`` (or the user's state
directory), so a shared home holds one file per node side by side.

The hostname is read each time a path is asked for (never cached at import):
a container runtime, ``unshare --uts`` or a forked job step may give a process
its hostname after Python started.

Before per-host files there was one ``outbox.sqlite3``; a process that finds
one with waiting messages still drains it (see ``delivery.dispatcher``).
"""

from __future__ import annotations

import os
import re
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

LEGACY_NAME = "outbox.sqlite3"
_PREFIX, _SUFFIX = "outbox-", ".sqlite3"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# another host's file written this recently is taken as still in use
ACTIVE_WINDOW = 120.0


def current_host() -> str:
    """This machine's hostname, read now."""
    return socket.gethostname() or "localhost"


def file_label(host: str) -> str:
    """``host`` as it appears in a file name: letters, digits, ``.``, ``_``, ``-`` only."""
    label = _UNSAFE.sub("_", host).lstrip(".")[:200]
    return label or "localhost"


def outbox_path(home: Path, host: str | None = None) -> Path:
    """The outbox file of ``host`` (default: this one) in the folder ``home``."""
    return home / f"{_PREFIX}{file_label(host or current_host())}{_SUFFIX}"


def legacy_path(home: Path) -> Path:
    """The single outbox file of versions before per-host files."""
    return home / LEGACY_NAME


@dataclass(frozen=True)
class HostFile:
    """An outbox file found in a home folder."""

    label: str  # the host part of the name, or "(old single file)"
    path: Path
    mine: bool  # this host's own file
    legacy: bool = False


def outbox_files(home: Path) -> list[HostFile]:
    """Every host's outbox file in ``home``, this host's first, then the old single file."""
    own = outbox_path(home)
    found = []
    for p in sorted(home.glob(f"{_PREFIX}*{_SUFFIX}")):
        if p.is_file():
            found.append(HostFile(p.name[len(_PREFIX):-len(_SUFFIX)], p, p == own))
    found.sort(key=lambda f: not f.mine)
    old = legacy_path(home)
    if old.is_file():
        found.append(HostFile("(old single file)", old, False, legacy=True))
    return found


def unfinished(path: Path) -> int:
    """How many messages wait in the outbox file ``path`` (0 if absent or unreadable)."""
    if not path.is_file():
        return 0
    try:
        conn = sqlite3.connect(str(path), timeout=1.0)
        try:
            row = conn.execute("SELECT count(*) FROM message WHERE state IN ('pending','sending')").fetchone()
        finally:
            conn.close()
    except sqlite3.Error:
        return 0
    return int(row[0]) if row else 0


def legacy_to_drain(home: str | os.PathLike[str]) -> Path | None:
    """The old single outbox file when it still holds waiting messages, else None."""
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
        conn = sqlite3.connect(str(path), timeout=1.0)
        try:
            lease = conn.execute("SELECT max(lease_until) FROM message WHERE state = 'sending'").fetchone()[0]
        finally:
            conn.close()
    except sqlite3.Error as e:
        return f"cannot read it ({e})"
    if lease and lease > now:
        return f"a message is being sent from it (lease for {lease - now:.0f} s more)"
    return None
