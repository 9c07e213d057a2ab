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

This module names files and holds their liveness locks; it reads no file's
content (what waits in one, whether it looks in use: ``outbox.unfinished``,
``outbox.in_use``, where all SQL lives).

``CHAT_MAGIC_HOST_ID`` names the file instead of the hostname (a node name
that outlives containers). Every process using a file holds a shared
``flock`` on ``<file>.live``: that is what "a live host" means. A file whose
lock is free belongs to a host that is gone (a container replaced by one
with a new hostname); the next process on any host moves its waiting
messages into its own file (``Outbox.take_over``). ``/etc/machine-id`` is not
used: a container image carries one for every replica, so two machines
would open one SQLite file over NFS, the one thing that must not happen.
"""

from __future__ import annotations

import errno
import os
import re
import socket
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "HostFile", "claim_orphan", "current_host", "file_label", "hold_live", "host_id", "legacy_path", "let_go", "live_path",
    "orphans", "outbox_files", "outbox_path",
]

LEGACY_NAME = "outbox.sqlite3"
_PREFIX, _SUFFIX = "outbox-", ".sqlite3"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
# another host's file written this recently is taken as still in use
ACTIVE_WINDOW = 120.0
ENV_HOST_ID = "CHAT_MAGIC_HOST_ID"
LIVE_SUFFIX = ".live"


def current_host() -> str:
    """This machine's hostname, read now."""
    return socket.gethostname() or "localhost"


def host_id() -> str:
    """The name of this host's outbox file: ``CHAT_MAGIC_HOST_ID`` when set, else the hostname (read now).

    Set ``CHAT_MAGIC_HOST_ID`` to something stable per machine (a node name)
    where the hostname changes with each container; without it, a new
    hostname takes over the file the previous one left (:func:`orphans`).
    """
    return os.environ.get(ENV_HOST_ID, "").strip() or current_host()


def file_label(host: str) -> str:
    """``host`` as it appears in a file name: letters, digits, ``.``, ``_``, ``-`` only."""
    label = _UNSAFE.sub("_", host).lstrip(".")[:200]
    return label or "localhost"


def outbox_path(home: Path, host: str | None = None) -> Path:
    """The outbox file of ``host`` (default: this one) in the folder ``home``."""
    return home / f"{_PREFIX}{file_label(host or host_id())}{_SUFFIX}"


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


# -- liveness: which files a process still uses -------------------------------------


def live_path(path: Path) -> Path:
    return path.with_name(path.name + LIVE_SUFFIX)


def _open_live(path: Path) -> int:
    flags = os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_CLOEXEC", 0)
    return os.open(live_path(path), flags, 0o600)


def hold_live(path: Path, wait: float = 10.0) -> int | None:
    """Hold a shared ``flock`` on ``<file>.live`` for as long as this process uses the outbox ``path``.

    Every process using the file holds one (a forked child shares its
    parent's); the kernel lets go when the process ends, however it ends.
    A process of another host finds the lock free when no process uses the
    file, and only then takes over what waits in it (:func:`claim_orphan`).
    While a takeover holds the lock exclusively (a few milliseconds to copy
    the rows), this waits up to ``wait`` seconds. Returns the descriptor to
    keep open, or None where there is no ``flock`` (Windows).
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows
        return None
    fd = _open_live(path)
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            return fd
        except OSError as e:
            if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN) or time.monotonic() >= deadline:
                return fd  # no lock to be had (a filesystem without locks): go on, as before liveness locks
            time.sleep(0.02)


def let_go(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def claim_orphan(path: Path) -> int | None:
    """An exclusive lock on another host's file when no process uses it, else None.

    Liveness is the lock, not a guess: a live process holds ``<file>.live``
    shared (:func:`hold_live`). A file with no ``.live`` beside it was last
    used by a chat_magic without these locks, which may still be running:
    the caller looks first (``outbox.in_use``, which reads the file; this
    module opens none). On NFS, Linux forwards ``flock`` to the
    server as a POSIX lock, so other nodes see it; on a mount with
    ``nolock`` or ``local_lock=flock`` they do not, and a node's live file
    could be taken: give each node a home of its own there.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - Windows: no takeover
        return None
    try:
        fd = _open_live(path)
    except OSError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def orphans(home: Path) -> list[HostFile]:
    """Other hosts' outbox files in ``home``: candidates for a takeover (none is opened here)."""
    return [f for f in outbox_files(home) if not f.mine and not f.legacy]
