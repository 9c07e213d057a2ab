"""The watcher: a small process that reports its parent's death (``python -m chat_magic.watcher``).

Spawned once per process by the first block that arms a death notice (see
:mod:`chat_magic.deadman`), in a session of its own so that a kernel restart
or a ``killpg`` of the parent's group spares it. While the parent lives it
only waits: on a pidfd (Linux), else by polling ``/proc`` or ``getppid()``
once a second, sampling the parent's peak memory (``VmHWM``) every few
seconds; it reads the outbox paths the parent uses from a pipe. It imports
nothing but the standard library until the parent dies.

When the parent dies it reads what it can about the death (the exit status
while the parent is still a zombie; the memory cgroup's ``oom_kill``
counter), fires the parent's armed death notices (exactly once, see
:func:`chat_magic.deadman.fire_dead`) and delivers them, with whatever
completion, failure or termination notice the parent left undelivered; then
it exits. A parent that closed every block leaves nothing armed: the watcher
just exits.

``CHAT_MAGIC_WATCHER=off`` keeps it from being spawned; the outbox still
delivers a death notice, from the next chat_magic process on the host.
"""

from __future__ import annotations

import os
import select
import sys
import time
from typing import Any

__all__ = ["enabled", "ensure", "main", "pid", "report", "stop", "wait_for_death"]

SAMPLE = 1.0  # seconds between two samples of the parent's peak memory (one read of /proc/<pid>/status)
DELIVER_FOR = 120.0  # seconds the watcher tries to deliver before leaving the rest to the outbox

# -- the parent's side -------------------------------------------------------------

_proc = None  # the watcher of this process (subprocess.Popen)
_pid = 0  # the process that spawned it (a forked child spawns its own)
_told: set[str] = set()


def enabled() -> bool:
    return os.environ.get("CHAT_MAGIC_WATCHER", "").strip().lower() not in ("off", "0", "false", "no")


def ensure(path: os.PathLike[str] | str) -> bool:
    """Spawn this process's watcher if there is none yet, and tell it about the outbox ``path``. Never raises."""
    global _proc, _pid
    if not enabled():
        return False
    try:
        if _proc is None or _pid != os.getpid() or _proc.poll() is not None:
            _proc, _pid = _spawn(), os.getpid()
            _told.clear()
        p = str(path)
        if p not in _told and _proc.stdin is not None:
            _proc.stdin.write((p + "\n").encode("utf-8", "surrogateescape"))
            _proc.stdin.flush()
            _told.add(p)
        return True
    except Exception as e:
        from .console import say

        say(f"could not start the watcher (a death of this process goes unreported until the next chat_magic process): {e}")
        return False


def _spawn() -> Any:
    import subprocess

    from .outbox import owner_id

    return subprocess.Popen(
        [sys.executable, "-m", "chat_magic.watcher", "--owner", owner_id(), "--pid", str(os.getpid())],
        stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, stderr=_log(),
        start_new_session=True, close_fds=True, cwd="/",
    )


def _log() -> Any:
    """Where the watcher's own errors go: ``CHAT_MAGIC_WATCHER_LOG`` (a file, for debugging), else nowhere."""
    import subprocess

    path = os.environ.get("CHAT_MAGIC_WATCHER_LOG", "").strip()
    if path:
        try:
            return open(path, "ab")
        except OSError:
            pass
    return subprocess.DEVNULL


def stop() -> None:
    """Tell the watcher nothing more will come (tests): it still waits for its parent."""
    global _proc
    if _proc is not None and _pid == os.getpid():
        try:
            if _proc.stdin:
                _proc.stdin.close()
        except OSError:
            pass
    _proc = None


def pid() -> int | None:
    return _proc.pid if _proc is not None and _pid == os.getpid() else None


# -- the watcher's side --------------------------------------------------------------


def _stat(pid: int) -> list[bytes] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()
    except (OSError, IndexError):
        return None


def _alive(pid: int, started: str) -> bool:
    fields = _stat(pid)
    if fields is None:
        if os.path.isdir("/proc"):
            return False
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return os.getppid() == pid
    return fields[0] not in (b"Z", b"X") and (not started or fields[19].decode() == started)


def _exit_status(pid: int, started: str) -> int | None:
    """The wait status of ``pid`` while it is a zombie not reaped yet (``/proc/<pid>/stat`` field 52)."""
    fields = _stat(pid)
    if fields is None or fields[0] != b"Z" or (started and fields[19].decode() != started) or len(fields) < 50:
        return None
    try:
        return int(fields[49])
    except ValueError:
        return None


def _cgroup_events(pid: int) -> str | None:
    """The file that counts OOM kills in ``pid``'s memory cgroup: ``memory.events`` (v2) or ``memory.oom_control`` (v1)."""
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2) if line.count(":") >= 2 else ("", "", "")
        if "memory" in controllers.split(","):
            found = os.path.join("/sys/fs/cgroup/memory" + path, "memory.oom_control")
            if os.path.exists(found):
                return found
        if controllers == "":
            found = os.path.join("/sys/fs/cgroup" + path, "memory.events")
            if os.path.exists(found):
                return found
    return None


def _oom_kills(events: str | None) -> int:
    """The ``oom_kill`` counter of that file (0 if unreadable)."""
    if not events:
        return 0
    try:
        with open(events) as f:
            for line in f:
                name, _, value = line.partition(" ")
                if name == "oom_kill":
                    return int(value)
    except (OSError, ValueError):
        pass
    return 0


def _hwm(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def wait_for_death(pid: int, started: str, paths: list[str]) -> dict:
    """Block until ``pid`` dies; return what is known about it. Reads outbox paths from stdin meanwhile."""
    fd = None
    try:
        fd = os.pidfd_open(pid)  # type: ignore[attr-defined]
    except (AttributeError, OSError):
        fd = None
    events = _cgroup_events(pid)
    oom0 = _oom_kills(events)
    peak = _hwm(pid)
    inp: int | None = sys.stdin.fileno() if sys.stdin is not None else None
    buf = b""
    last = time.monotonic()
    while _alive(pid, started):
        wait = [x for x in (fd, inp) if x is not None]
        timeout = SAMPLE if fd is not None else 1.0
        try:
            ready, _, _ = select.select(wait, [], [], timeout)
        except (OSError, ValueError):
            ready = []
            time.sleep(1.0)
        if inp is not None and inp in ready:
            chunk = os.read(inp, 65536)
            if not chunk:
                inp = None  # the parent closed the pipe (or died): keep watching the pid
            buf += chunk
            *lines, buf = buf.split(b"\n")
            paths += [ln.decode("utf-8", "surrogateescape") for ln in lines if ln and ln.decode() not in paths]
        if time.monotonic() - last >= SAMPLE or (fd is not None and fd in ready):
            peak = max(peak, _hwm(pid))
            last = time.monotonic()
    died_at = time.time()
    status = _exit_status(pid, started)
    if inp is not None:  # what the parent wrote just before dying
        try:
            while select.select([inp], [], [], 0)[0]:
                chunk = os.read(inp, 65536)
                if not chunk:
                    break
                buf += chunk
        except OSError:
            pass
        paths += [ln.decode("utf-8", "surrogateescape") for ln in buf.split(b"\n") if ln and ln.decode() not in paths]
    return {"died_at": died_at, "exit_status": status, "oom_kills": _oom_kills(events) - oom0, "peak": peak}


def report(owner: str, paths: list[str], death: dict) -> int:
    """Fire the dead parent's armed notices in each outbox and deliver them; return how many were fired."""
    from . import deadman
    from .outbox import Outbox

    fired = 0
    for path in paths:
        if not os.path.isfile(path):
            continue  # removed meanwhile (a temporary home): nothing armed there
        try:
            box = Outbox(path)
            ids = deadman.fire_dead(box, owner=owner, exit_status=death["exit_status"], oom_kills=death["oom_kills"],
                                    died_at=death["died_at"], peak=death["peak"])
            ids += deadman.fire_dead(box)  # any other dead process's, while at it
            fired += len(ids)
            waiting = box.important_waiting()
            box.close()
            if waiting:
                _deliver(path, sorted(set(ids) | set(waiting)))
        except Exception as e:
            from .console import say

            say(f"{type(e).__name__}: {e}", prefix="chat_magic watcher")
    return fired


def _deliver(path: str, ids: list[int]) -> None:
    from .delivery import open_dispatcher

    d = open_dispatcher(path)
    d.ensure_running()
    try:
        d.wait_for(ids, DELIVER_FOR)
    finally:
        d.stop(5.0)
        d.outbox.close()


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m chat_magic.watcher", description=__doc__.splitlines()[0])
    p.add_argument("--owner", required=True, help="host:pid/start of the process to watch")
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--outbox", action="append", default=[], help="an outbox file (more come on stdin)")
    args = p.parse_args(argv)
    started = args.owner.rpartition(":")[2].partition("/")[2]
    paths = list(args.outbox)
    death = wait_for_death(args.pid, started, paths)
    if paths:
        report(args.owner, paths, death)
    return 0


if __name__ == "__main__":
    sys.exit(main())
