"""``chat-magic outbox list --all-hosts`` only reads other hosts' outbox files.

It used to open each one as this process's outbox: it held the file's
``.live`` lock (other hosts took the file for in use), wrote the schema,
checkpointed and deleted another process's log, and moved a damaged file
aside to salvage it. Now another host's file is read ``mode=ro`` (or
``immutable`` when it has no log): nothing beside it changes, and a damaged or
locked file is one line.

Hosts are real processes of ``chat-magic`` / ``chat_magic`` with their own
``CHAT_MAGIC_HOST_ID`` sharing one home folder (as on a shared file system);
pod-b stays running with its message waiting for an unreachable loopback port.
"""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys

from conftest import KEY, TOKEN, assert_no_secret
from helpers_outbox import OLD_MESSAGE_TABLE

POD_B = """
import sys
import chat_magic
chat_magic.send("waits on pod-b")
print("ready", flush=True)
sys.stdin.read()
"""

LOCKER = """
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute("PRAGMA journal_mode=WAL")
db.execute("PRAGMA locking_mode=EXCLUSIVE")
db.execute("CREATE TABLE message(id INTEGER PRIMARY KEY, state TEXT)")
db.execute("BEGIN EXCLUSIVE")
db.execute("INSERT INTO message(state) VALUES ('pending')")
print("ready", flush=True)
sys.stdin.read()
"""


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _host_env(host: str, **more: str) -> dict:
    return dict(os.environ, CHAT_MAGIC_HOST_ID=host, CHAT_MAGIC_EXIT_TIMEOUT="0", **more)


def _folder(home) -> dict[str, tuple[int, str]]:
    """Every file in the folder: its size and a digest of its bytes."""
    return {p.name: (p.stat().st_size, hashlib.sha256(p.read_bytes()).hexdigest()) for p in sorted(home.iterdir())}


def _started(args: list[str], env: dict) -> subprocess.Popen:
    p = subprocess.Popen(args, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert p.stdout is not None and p.stdout.readline().strip() == "ready", p.stderr.read() if p.stderr else ""
    return p


def test_listing_all_hosts_reads_other_hosts_files_and_changes_nothing(fast_space, outbox_home):
    # pod-a: one message delivered, its process gone (its file has no log left)
    sent = subprocess.run([sys.executable, "-m", "chat_magic.cli", "send", "from pod-a", "--timeout", "30"],
                          env=_host_env("pod-a"), capture_output=True, text=True, timeout=90)
    assert sent.returncode == 0, sent.stderr
    # pod-b: running, its message waiting for a port nobody listens on
    nowhere = f"http://127.0.0.1:{_closed_port()}/v1/spaces/BBBB/messages?key={KEY}&token={TOKEN}"
    pod_b = _started([sys.executable, "-c", POD_B], _host_env("pod-b", GOOGLE_CHAT_WEBHOOK_URL=nowhere))
    # pod-c: a damaged file; pod-d: a file another program holds locked
    (outbox_home / "outbox-pod-c.sqlite3").write_bytes(b"not a database at all" * 200)
    locker = _started([sys.executable, "-c", LOCKER, str(outbox_home / "outbox-pod-d.sqlite3")], dict(os.environ))
    try:
        before = {n: v for n, v in _folder(outbox_home).items() if "pod-b" not in n}  # pod-b's process writes its own
        names_before = sorted(p.name for p in outbox_home.iterdir())
        out = subprocess.run([sys.executable, "-m", "chat_magic.cli", "outbox", "list", "--all-hosts"],
                             env=_host_env("pod-x"), capture_output=True, text=True, timeout=90)
        names_after = sorted(p.name for p in outbox_home.iterdir())
        after = {n: v for n, v in _folder(outbox_home).items() if "pod-b" not in n}
    finally:
        for p in (pod_b, locker):
            p.stdin.close()
            p.wait(60)
    assert_no_secret(out.stdout, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    assert out.returncode == 0, out.stderr
    assert names_after == names_before, "the listing created, renamed or removed files beside other hosts' outboxes"
    assert after == before, "the listing changed another host's file"
    assert f"pod-a: {outbox_home / 'outbox-pod-a.sqlite3'}: 1 sent" in out.stdout, out.stdout
    assert f"pod-b: {outbox_home / 'outbox-pod-b.sqlite3'}: 1 pending" in out.stdout, out.stdout
    assert "BBBB  tries=" in out.stdout, out.stdout
    damaged = [ln for ln in out.stderr.splitlines() if "pod-c" in ln]
    locked = [ln for ln in out.stderr.splitlines() if "pod-d" in ln]
    assert len(damaged) == 1 and "could not be read" in damaged[0] and "damaged" in damaged[0], out.stderr
    assert len(locked) == 1 and "could not be read" in locked[0] and "lock" in locked[0], out.stderr



OLD_SCHEMA = OLD_MESSAGE_TABLE


def test_listing_shows_an_old_single_file_of_the_older_format_without_carrying_it_over(fast_space, outbox_home):
    """The old single file, in the format with the URL on every row: listed as it is; carrying it over is a flush's job."""
    import sqlite3
    import time

    outbox_home.mkdir(parents=True, exist_ok=True)
    old = outbox_home / "outbox.sqlite3"
    db = sqlite3.connect(old)
    db.executescript(OLD_SCHEMA)
    now = time.time()
    db.execute("INSERT INTO message (request_id, url, space_key, thread_key, payload, state, next_at, created_at, updated_at)"
               " VALUES ('cm-old', ?, 'spaces/OLDSPACE', 'old', '{\"text\": \"old\"}', 'pending', ?, ?, ?)",
               (fast_space.url, now, now, now))
    db.commit()
    db.close()
    before = _folder(outbox_home)
    out = subprocess.run([sys.executable, "-m", "chat_magic.cli", "outbox", "list", "--all-hosts"],
                         env=_host_env("pod-x"), capture_output=True, text=True, timeout=90)
    assert_no_secret(out.stdout, out.stderr)
    assert out.returncode == 0 and "Traceback" not in out.stderr, out.stderr
    assert f"(old single file): {old}: 1 pending" in out.stdout and "OLDSPACE  tries=0" in out.stdout, (out.stdout, out.stderr)
    assert _folder(outbox_home) == before, "the listing moved, salvaged or changed the old file"
    assert fast_space.messages() == [], "a listing delivers nothing"
