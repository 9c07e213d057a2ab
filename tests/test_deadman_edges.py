"""The dead-man notice at its edges: a Ctrl-C while a block opens or closes, a signal inside the registry's lock,
a Ctrl-C inside the SIGTERM handler, closed blocks still armed when the process ends, a locked outbox at exit.

Each case is a real script in a real process: the interrupt is a real SIGINT (or SIGTERM, SIGUSR1) the
process sends itself from a trace function at the exact instant named (the call, or the return, of one
function), as ``tests/scenarios.py`` and ``tests/test_signal_card_at_exit.py`` do; another process holds
the outbox's write lock where the case needs it; the emulator receives over loopback. A "false" notice is
one that says a block died, ended or was terminated when it did not: its row must never be left armed with
nobody to close it, nor fired next to the block's own card.
"""

from __future__ import annotations

import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import wait_until
from test_watcher import armed_rows, script_env

import chat_magic
from chat_magic.hosts import outbox_path

ROOT = Path(chat_magic.__file__).resolve().parents[1]

# a trace function that sends the process SIG at the call (or the return) of MODULE:FUNCTION, once
TRACER = r"""
import linecache, os, signal, sys
_shot = {"fired": False}

def shoot_at(where, sig, when="call", line=None):
    mod, fn = where.split(":")

    def local(frame, event, arg):
        if not _shot["fired"] and event == when and (line is None or line in linecache.getline(frame.f_code.co_filename, frame.f_lineno)):
            _shot["fired"] = True
            os.kill(os.getpid(), sig)
        return local

    def tracer(frame, event, arg):
        if _shot["fired"] or frame.f_code.co_name != fn or frame.f_globals.get("__name__") != mod:
            return None
        if when == "call":
            return local(frame, event, arg)
        return local

    sys.settrace(tracer)

def fired():
    return _shot["fired"]
"""


def _env(space, home: Path, **more: str) -> dict[str, str]:
    return script_env(space, home, CHAT_MAGIC_EXIT_TIMEOUT="20", **more)


def _run(tmp_path: Path, body: str, env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    path = tmp_path / "job.py"
    path.write_text(TRACER + textwrap.dedent(body), encoding="utf-8")
    return subprocess.run([sys.executable, str(path), *args], env=env, capture_output=True, text=True, timeout=timeout)


def _texts(space) -> list[str]:
    return [" ".join([m.get("text") or "", m.get("fallbackText") or "", json.dumps(m.get("cardsV2") or [])])
            for m in space.messages()]


def _notices(space, title: str) -> list[str]:
    """Messages saying ``title`` died, ended or was terminated."""
    return [t for t in _texts(space) if title in t and any(icon in t for icon in ("💀", "⏹️", "🛑"))]


def _later_process(home: Path, space) -> None:
    """A later chat_magic process on this host fires whatever a dead process left armed, and delivers it."""
    later = subprocess.run([sys.executable, "-m", "chat_magic.cli", "outbox", "flush", "--timeout", "20"],
                           env=_env(space, home), capture_output=True, text=True, timeout=120)
    assert later.returncode == 0, later.stderr


# -- 1. a Ctrl-C while a block closes, or while it opens, leaves no row armed ------------------------------------

CLOSE = """
before = signal.getsignal(signal.SIGTERM)
import chat_magic
from chat_magic import stalls
url, where, when = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    with chat_magic.notify_when_done("quiet job", to=url, on="error", stall_after=3600):  # no card: its row is deleted
        shoot_at(where, signal.SIGINT, when)
    sys.settrace(None)
except KeyboardInterrupt:
    sys.settrace(None)
    print("INTERRUPTED", flush=True)
print(f"fired={fired()} handlers_back={signal.getsignal(signal.SIGTERM) is before} watches={len(stalls._watches)}", flush=True)
"""


@pytest.mark.parametrize(("where", "watches"), [
    ("chat_magic.heartbeat:on_close", 0),  # the first close hook (heartbeat's deletes the block's key in Redis)
    ("chat_magic.stalls:_closed", 1),  # the one interrupted stays undone; the ones after it still run
    ("chat_magic.outbox:disarm", 0),  # inside the delete itself
])
def test_a_ctrl_c_while_a_block_closes_leaves_no_death_notice_armed(fast_space, tmp_path, where, watches):
    home = tmp_path / "home"
    done = _run(tmp_path, CLOSE, _env(fast_space, home, CHAT_MAGIC_WATCHER="off"), fast_space.url, where, "call")
    assert done.returncode == 0, done.stderr
    assert "INTERRUPTED" in done.stdout, (done.stdout, done.stderr)
    # the other close hooks ran: the program's SIGTERM handler is back, no stall watch left for a closed block
    assert f"fired=True handlers_back=True watches={watches}" in done.stdout, (done.stdout, done.stderr)
    assert armed_rows(home) == 0  # deleted at once, or by the retry at exit: nothing left to be posted as a death
    _later_process(home, fast_space)
    assert _notices(fast_space, "quiet job") == [], _texts(fast_space)


OPEN = """
before = signal.getsignal(signal.SIGTERM)
import chat_magic
url, where, when = sys.argv[1], sys.argv[2], sys.argv[3]
try:
    shoot_at(where, signal.SIGINT, when)
    with chat_magic.notify_when_done("opening job", to=url, on="error"):
        sys.settrace(None)
        print("BODY RAN", flush=True)
except KeyboardInterrupt:
    sys.settrace(None)
    print("INTERRUPTED", flush=True)
print(f"fired={fired()} handlers_back={signal.getsignal(signal.SIGTERM) is before}", flush=True)
"""


@pytest.mark.parametrize(("where", "when"), [
    ("chat_magic.outbox:arm", "return"),  # the row committed, its id not yet returned
    ("chat_magic.deadman:register", "call"),  # the block made, not yet registered
    ("chat_magic.stalls:watch", "call"),  # an on_arm hook
])
def test_a_ctrl_c_while_a_block_opens_leaves_no_death_notice_armed_and_the_handlers_back(fast_space, tmp_path, where, when):
    home = tmp_path / "home"
    done = _run(tmp_path, OPEN, _env(fast_space, home, CHAT_MAGIC_WATCHER="off"), fast_space.url, where, when)
    assert done.returncode == 0, done.stderr
    assert "INTERRUPTED" in done.stdout and "BODY RAN" not in done.stdout, (done.stdout, done.stderr)
    assert "fired=True handlers_back=True" in done.stdout, (done.stdout, done.stderr)  # the program's SIGTERM is its own again
    assert armed_rows(home) == 0
    _later_process(home, fast_space)
    assert _notices(fast_space, "opening job") == [], _texts(fast_space)


# -- 2. closed blocks still armed when the process ends get their card, not a notice too -----------------------------

KEPT = """
import time
import chat_magic
url, then = sys.argv[1], sys.argv[2]
other = chat_magic.notify_when_done("still running", to=url)
other.__enter__()  # open when the process ends: this one gets the notice
n = chat_magic.notify_when_done("nightly job", to=url)
n.__enter__()
first = chat_magic.send("step 1", to=url)
first.wait(30)
time.sleep(0.3)  # the worker idle again: the card below stays in memory until something queues it

def handler(sig, frame):
    n.__exit__(None, None, None)  # the job ends in a handler run inside an outbox call: its card is kept in memory

signal.signal(signal.SIGUSR1, handler)
shoot_at("chat_magic.outbox:rows", signal.SIGUSR1)
first.status  # an outbox read (Outbox.rows): the handler runs inside it
sys.settrace(None)
print(f"fired={fired()}", flush=True)
if then == "sigterm":
    os.kill(os.getpid(), signal.SIGTERM)  # the pod is stopped while the card is still in memory
    time.sleep(60)
"""


@pytest.mark.parametrize(("then", "icon", "code"), [("exit", "⏹️", 0), ("sigterm", "🛑", -signal.SIGTERM)])
def test_a_closed_block_whose_card_is_kept_in_memory_gets_no_notice_when_the_process_ends(fast_space, tmp_path,
                                                                                          then, icon, code):
    home = tmp_path / "home"
    done = _run(tmp_path, KEPT, _env(fast_space, home), fast_space.url, then)
    assert done.returncode == code, done.stderr
    assert "fired=True" in done.stdout, (done.stdout, done.stderr)
    wait_until(lambda: [t for t in _texts(fast_space) if icon in t and "still running" in t], timeout=30,
               what="the open block's notice")
    wait_until(lambda: [t for t in _texts(fast_space) if "nightly job finished" in t], timeout=30,
               what="the closed block's own card")
    wait_until(lambda: armed_rows(home) == 0, timeout=30, what="nothing left armed")
    _later_process(home, fast_space)
    assert _notices(fast_space, "nightly job") == [], _texts(fast_space)  # its card only: no "ended", "terminated", "died"


# -- 3. a Ctrl-C during the SIGTERM handler's wait still ends the process -------------------------------------------

CTRL_C_IN_HANDLER = """
import time
import chat_magic
url = sys.argv[1]

def tracer(frame, event, arg):
    # the handler waits for the termination card: a Ctrl-C right then
    if event == "call" and not _shot["fired"] and frame.f_code.co_name == "wait_for":
        f = frame.f_back
        while f is not None and f.f_code.co_name != "_close_blocks":
            f = f.f_back
        if f is not None:
            _shot["fired"] = True
            os.kill(os.getpid(), signal.SIGINT)
    return None

try:
    with chat_magic.notify_when_done("long training", to=url):
        sys.settrace(tracer)
        print("READY", flush=True)
        for _ in range(300):
            time.sleep(0.1)
except KeyboardInterrupt:
    print("INTERRUPTED", flush=True)
for _ in range(50):  # a kernel goes on after a Ctrl-C
    time.sleep(0.1)
print("STILL RUNNING", flush=True)
"""


def _start(tmp_path: Path, body: str, space) -> subprocess.Popen:
    """``body`` (after the tracer) run as a script with the space's URL, its home in ``tmp_path``."""
    path = tmp_path / "job.py"
    path.write_text(TRACER + textwrap.dedent(body), encoding="utf-8")
    return subprocess.Popen([sys.executable, str(path), space.url], env=_env(space, tmp_path / "home"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_a_ctrl_c_during_the_termination_wait_still_ends_the_process_by_its_signal(fast_space, tmp_path):
    proc = _start(tmp_path, CTRL_C_IN_HANDLER, fast_space)
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "READY"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert "STILL RUNNING" not in out, (out, err)  # "🛑 terminated" was posted: the process must not go on
    assert proc.returncode == -signal.SIGTERM, err
    wait_until(lambda: [t for t in _texts(fast_space) if "🛑" in t and "long training" in t], timeout=30,
               what="the termination card")


# -- 4. SIGTERM while the main thread holds the registry's lock ---------------------------------------------------

IN_LOCK = """
import time
import chat_magic
url = sys.argv[1]
first = chat_magic.notify_when_done("first block", to=url)
first.__enter__()
shoot_at("chat_magic.deadman:register", signal.SIGTERM, "line", line="_open[")  # inside `with _lock:`
second = chat_magic.notify_when_done("second block", to=url)
second.__enter__()
sys.settrace(None)
print("NOT ENDED", flush=True)
"""


def test_sigterm_while_the_main_thread_holds_the_registry_lock_still_posts_and_ends(fast_space, tmp_path):
    proc = _start(tmp_path, IN_LOCK, fast_space)
    try:
        out, err = proc.communicate(timeout=45)  # a deadlocked handler never ends
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the SIGTERM handler hung (deadlocked on the registry's lock): {err[-2000:]}")
    assert proc.returncode == -signal.SIGTERM and "NOT ENDED" not in out, (out, err)
    wait_until(lambda: [t for t in _texts(fast_space) if "🛑" in t and "first block was terminated" in t], timeout=30,
               what="the open block's termination card")


# -- 5. closed blocks still armed at exit, the outbox locked by another process: one deadline, one line ------------------

LOCKER = r"""
import sqlite3, sys
db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
db.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
sys.stdin.readline()
db.execute("COMMIT")
"""

UNDONE = """
import threading, time
import chat_magic
from chat_magic import deadman
url, n = sys.argv[1], int(sys.argv[2])
opened, go = threading.Barrier(n + 1), threading.Event()

def block(i):
    with chat_magic.notify_when_done(f"quiet {i}", to=url, on="error"):  # no card: its close deletes the row
        opened.wait()
        go.wait()

threads = [threading.Thread(target=block, args=(i,)) for i in range(n)]
for t in threads:
    t.start()
opened.wait()
print("READY", flush=True)
sys.stdin.readline()  # another process holds the outbox's write lock now
go.set()  # the blocks close at once, each waiting for the lock in its own thread
for t in threads:
    t.join()
print(f"UNDONE={len(deadman._undone)}", flush=True)
"""


@pytest.mark.slow  # the outbox stays locked past the closes' wait (10 s) and the exit's (10 s)
def test_at_exit_closed_blocks_still_armed_get_one_deadline_and_one_line_not_ten_seconds_each(fast_space, tmp_path):
    n = 4
    home = tmp_path / "home"
    path = tmp_path / "job.py"
    path.write_text(TRACER + textwrap.dedent(UNDONE), encoding="utf-8")
    proc = subprocess.Popen([sys.executable, str(path), fast_space.url, str(n)], env=_env(fast_space, home, CHAT_MAGIC_WATCHER="off"),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    locker = None
    try:
        assert proc.stdout is not None and proc.stdin is not None and proc.stdout.readline().strip() == "READY"
        locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(outbox_path(home))],
                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        proc.stdin.write("go\n")
        proc.stdin.flush()
        line = proc.stdout.readline().strip()
        assert line == f"UNDONE={n}", line  # every close found the outbox locked: all left to the retry at exit
        t0 = time.monotonic()
        out, err = proc.communicate(timeout=120)
        took = time.monotonic() - t0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        if locker is not None and locker.poll() is None:
            locker.communicate("done\n", timeout=30)
    assert proc.returncode == 0, err
    said = [x for x in err.splitlines() if "still armed" in x]
    assert len(said) == 1 and f"{n} closed blocks" in said[0], err  # one line for them all
    assert took < n * 10.0 - 10.0, took  # one deadline for all: each row waiting its own 10 s would take 40 s
    db = sqlite3.connect(f"file:{outbox_path(home)}?mode=ro", uri=True)
    try:
        assert db.execute("SELECT count(*) FROM message WHERE state='armed'").fetchone()[0] == n  # said, not lost
    finally:
        db.close()
