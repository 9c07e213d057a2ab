"""The process's edges: Ctrl-C, fork, signal handlers, atexit and ``__del__``, many threads.

Every case is a real reproduction against the emulator over real HTTP:

- an interrupt injected at every line (``sys.settrace``) of ``send()`` and of
  the worker's claim and completion paths, while a real second process holds
  the outbox's write lock part of the time; after each one the connection is
  not in a transaction, no lock is held, other processes are not blocked, the
  next send is delivered, nothing is lost or duplicated;
- a real SIGINT storm against a process that sends;
- 150 real forks (``os.fork`` and multiprocessing's fork context) sending
  while the parent sends from threads;
- a signal handler that sends, run while the main thread is inside ``send()``;
- an ``atexit`` handler registered before chat_magic's first use, and a
  ``__del__`` late in shutdown, that send;
- 96 threads of one process sending at once.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import chat_magic
from chat_magic import config, delivery
from chat_magic import outbox as outbox_module
from chat_magic.hosts import outbox_path
from chat_magic.outbox import SENT

pytestmark = [pytest.mark.timeout(600)]

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = str(ROOT / "chat_magic")
CORE = {str(ROOT / "chat_magic" / "outbox.py"), str(ROOT / "chat_magic" / "delivery.py")}


def items(messages: list[dict]) -> list[str]:
    """Every event in ``messages``, merged messages split on their blank lines."""
    return [part for m in messages for part in (m.get("text") or "").split("\n\n") if part]


def _env(home: Path, **more: str) -> dict[str, str]:
    env = dict(os.environ, CHAT_MAGIC_HOME=str(home), CHAT_MAGIC_CONFIG=str(home / "none.toml"),
               PYTHONPATH=str(ROOT), **more)
    for name in ("GOOGLE_CHAT_WEBHOOK_URL", "CHAT_MAGIC_REDIS_URL", "CHAT_MAGIC_THREAD_KEY"):
        env.pop(name, None)
    return env


# -- a real second process that holds the write lock part of the time ----------------------

LOCKER = r"""
import random, sqlite3, sys, time
path, stop, report = sys.argv[1:4]
import os
db = sqlite3.connect(path, isolation_level=None, timeout=30)
turns = slow = 0
worst = 0.0
while not os.path.exists(stop):
    t = time.monotonic()
    try:
        db.execute("BEGIN IMMEDIATE")
    except sqlite3.OperationalError:
        slow += 1
        continue
    waited = time.monotonic() - t
    worst = max(worst, waited)
    slow += waited > 2.0
    turns += 1
    time.sleep(random.uniform(0.002, 0.02))
    db.execute("COMMIT")
    time.sleep(random.uniform(0.005, 0.03))
open(report, "w").write(f"{turns} {slow} {worst:.3f}")
"""


class Locker:
    """A real process taking the outbox's write lock for a few ms at a time; says if it was ever kept out > 2 s."""

    def __init__(self, path: Path, tmp: Path) -> None:
        self.stop_file, self.report = tmp / "locker.stop", tmp / "locker.report"
        self.proc = subprocess.Popen([sys.executable, "-c", LOCKER, str(path), str(self.stop_file), str(self.report)])

    def finish(self) -> tuple[int, int, float]:
        self.stop_file.touch()
        assert self.proc.wait(60) == 0
        turns, slow, worst = self.report.read_text().split()
        return int(turns), int(slow), float(worst)


@pytest.fixture
def locker(fast_space, outbox_home, tmp_path):
    """The second process; started once the outbox exists."""
    chat_magic.send("warm up", thread_key="sweep").wait(15)
    lk = Locker(outbox_path(config.home()), tmp_path)
    yield lk
    if lk.proc.poll() is None:
        lk.stop_file.touch()
        lk.proc.wait(60)


# -- injecting an interrupt at the Nth line event ------------------------------------------


class Injected(KeyboardInterrupt):
    """The interrupt the sweep raises (a KeyboardInterrupt: what Ctrl-C raises)."""


def interrupt_at(n: int, fn, files: set[str] | None, skip: tuple[str, ...] = ()) -> tuple[bool, object]:
    """Run ``fn`` raising :class:`Injected` at its ``n``-th line event; return (raised, result or exception).

    Line events count in frames whose file is in ``files`` (None: chat_magic's
    package) and whose function is not in ``skip`` (the catchers themselves).
    """
    count = 0
    fired = False

    def local(frame, event, arg):
        nonlocal count, fired
        if event == "line" and not fired:
            count += 1
            if count == n:
                fired = True
                raise Injected(f"line event {n}: {frame.f_code.co_name} {Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
        return local

    def global_(frame, event, arg):
        if fired:
            return None
        name = frame.f_code.co_filename
        wanted = name.startswith(PACKAGE) if files is None else name in files
        return local if wanted and frame.f_code.co_name not in skip else None

    sys.settrace(global_)
    try:
        result = fn()
    except Injected as e:
        return True, e
    finally:
        sys.settrace(None)
    return fired, result


def assert_clean(d: delivery.Dispatcher) -> None:
    """No transaction left open, no lock held, another connection (as another process would) may write."""
    conn = getattr(d.outbox._local, "conn", None)
    assert conn is None or not conn.in_transaction, "a transaction was left open"
    assert outbox_module._gate.depth() == 0 and not outbox_module._gate._lock._is_owned(), "the outbox gate is held"
    for lock in (outbox_module._gate._lock, d._lock, d._drain_lock, d._changed, delivery._dlock, config._lock):
        got: list[bool] = []
        t = threading.Thread(target=lambda lk=lock, got=got: got.append(lk.acquire(timeout=5) and (lk.release() or True)))
        t.start()
        t.join(10)
        assert got == [True], f"{lock!r} is held"
    other = sqlite3.connect(str(d.outbox.path), isolation_level=None, timeout=5)
    try:
        other.execute("BEGIN IMMEDIATE")  # the write lock is free within the locker's few ms
        other.execute("ROLLBACK")
    finally:
        other.close()


def check_delivery(space, d: delivery.Dispatcher, expected_after: list[str]) -> None:
    """Every message the outbox took is delivered exactly once, every later send too, and nothing else."""
    inside = delivery._inside(), d.outbox.stranded()
    ok = delivery.flush(60)
    assert ok, f"everything in the outbox is delivered: {inside} {d.outbox.counts()} held {len(d._held)} " \
        f"{[(r.id, r.state, r.error) for r in d.outbox.rows(limit=100_000) if r.state not in (SENT, 'merged')]}"
    got = items(space.messages())
    assert len(got) == len(set(got)), f"duplicated: {sorted({x for x in got if got.count(x) > 1})[:5]}"
    taken = {part for (payload,) in d.outbox._db().execute("SELECT payload FROM message")
             for part in json.loads(payload)["text"].split("\n\n")}
    assert set(got) == taken, f"lost: {sorted(taken - set(got))[:5]}; not from the outbox: {sorted(set(got) - taken)[:5]}"
    assert set(expected_after) <= set(got)


def _sender_names(n: int) -> tuple[str, str]:
    return f"cut-{n:04d}", f"after-{n:04d}"


def run_send_sweep(space, locker, files: set[str] | None, limit: int | None = None) -> int:
    d = delivery.dispatcher()
    n, after = 0, []
    while True:
        n += 1
        cut, nxt = _sender_names(n)
        fired, what = interrupt_at(n, lambda cut=cut: chat_magic.send(cut, thread_key="sweep"), files)
        assert_clean(d)
        chat_magic.send(nxt, thread_key="sweep").wait(30)  # the next send works and is delivered
        after.append(nxt)
        if not fired or (limit and n >= limit):
            break
    turns, slow, worst = locker.finish()
    assert turns > 0 and slow == 0, f"the other process was kept out {slow} time(s) (worst wait {worst} s)"
    check_delivery(space, d, after)
    return n


def test_an_interrupt_at_every_line_of_send_in_the_outbox_leaves_nothing_behind(fast_space, locker):
    n = run_send_sweep(fast_space, locker, CORE)
    assert n > 40, "the sweep went through send()'s outbox lines"


@pytest.mark.slow
def test_an_interrupt_at_every_line_of_send_anywhere_in_chat_magic_leaves_nothing_behind(fast_space, locker):
    n = run_send_sweep(fast_space, locker, None)
    assert n > 100


def _manual_dispatcher() -> delivery.Dispatcher:
    """This host's dispatcher with no worker thread: the test drives its claim and completion paths itself."""
    d = delivery.dispatcher()
    d.stop(5)
    d._thread = threading.current_thread()  # alive: ensure_running starts no worker
    d._stop.clear()
    return d


def _drive(d: delivery.Dispatcher, until, what: str) -> None:
    """Run the worker's turns (in this thread) until ``until()``."""
    deadline = time.monotonic() + 40
    while not until():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        if d._turn():
            time.sleep(0.01)


def _sent(space, text: str) -> bool:
    return text in items(space.messages())


def test_an_interrupt_at_every_line_of_the_workers_claim_leaves_nothing_behind(fast_space, locker):
    d = _manual_dispatcher()
    n, after = 0, []
    while True:
        n += 1
        cut, nxt = _sender_names(n)
        chat_magic.send(cut, thread_key="claim")
        fired, what = interrupt_at(n, d._turn, None, skip=("_turn",))
        assert_clean(d)
        _drive(d, lambda c=cut: _sent(fast_space, c), f"{cut} delivered after the interrupt")
        chat_magic.send(nxt, thread_key="claim")
        _drive(d, lambda c=nxt: _sent(fast_space, c), f"{nxt} delivered")
        after += [cut, nxt]
        if not fired:
            break
    assert n > 60, "the sweep went through the claim"
    turns, slow, worst = locker.finish()
    assert slow == 0, f"the other process was kept out {slow} time(s) (worst wait {worst} s)"
    got = items(fast_space.messages())
    assert sorted(got) == sorted(set(got)) and all(t in got for t in after)


def test_an_interrupt_at_every_line_of_the_workers_completion_leaves_nothing_behind(fast_space, locker):
    d = _manual_dispatcher()
    n, after = 0, []
    lane = delivery._Lane(d, "")
    while True:
        n += 1
        cut, nxt = _sender_names(n)
        chat_magic.send(cut, thread_key="done")
        job = None
        deadline = time.monotonic() + 30
        while job is None:
            assert time.monotonic() < deadline
            job = d.outbox.claim(time.time(), interval=0, lease=delivery.settings.lease)
        lane.busy = True
        fired, what = interrupt_at(n, lambda j=job: lane._work(j), None, skip=("_work",))
        assert_clean(d)
        _drive(d, lambda c=cut: _sent(fast_space, c) and not d._owed and not d.outbox.unfinished_ids(),
               f"{cut} delivered and recorded after the interrupt")
        chat_magic.send(nxt, thread_key="done")
        _drive(d, lambda c=nxt: _sent(fast_space, c), f"{nxt} delivered")
        after += [cut, nxt]
        if not fired:
            break
    assert n > 40, "the sweep went through the POST and the ack"
    turns, slow, worst = locker.finish()
    assert slow == 0, f"the other process was kept out {slow} time(s) (worst wait {worst} s)"
    got = items(fast_space.messages())
    assert len(got) == len(set(got)) and all(t in got for t in after)
    rows = d.outbox.rows(limit=100_000)
    assert all(r.state in (SENT, "merged") for r in rows), "every message ended as sent"
