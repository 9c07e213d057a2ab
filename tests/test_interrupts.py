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
import random
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from scenarios import FORKS, SIGNALLED, ctrl_c_storm

import chat_magic
from chat_magic import config, delivery
from chat_magic import outbox as outbox_module
from chat_magic.hosts import outbox_path
from chat_magic.outbox import SENT

pytestmark = [pytest.mark.timeout(600)]

ROOT = Path(chat_magic.__file__).resolve().parents[1]  # the code under test (children import it too)
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
import random
import signal
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

    def stop(self) -> None:
        """Whatever happened (a failed test too): the process ends (it ran for good after a failed storm test)."""
        self.stop_file.touch()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def locker(fast_space, outbox_home, tmp_path):
    """The second process; started once the outbox exists."""
    chat_magic.send("warm up", thread_key="sweep").wait(15)
    lk = Locker(outbox_path(config.home()), tmp_path)
    yield lk
    lk.stop()


# -- injecting an interrupt at the Nth line event ------------------------------------------


class Injected(KeyboardInterrupt):
    """The interrupt the sweep raises (a KeyboardInterrupt: what Ctrl-C raises)."""


def interrupt_at(n: int, fn, files: set[str] | None, skip: tuple[str, ...] = (), events: tuple[str, ...] = ("line",),
                 codes: set | None = None) -> tuple[bool, object]:
    """Run ``fn`` raising :class:`Injected` at its ``n``-th line event; return (raised, result or exception).

    Line events count in frames whose file is in ``files`` (None: chat_magic's
    package) and whose function is not in ``skip`` (the catchers themselves).
    ``events=("return",)``: at a function's return instead, after its last
    line ran (a lock's ``__enter__`` that took the lock: what a real Ctrl-C
    can do before the ``with`` block begins). ``events=("opcode",)`` with
    ``codes`` (functions' code objects, instead of ``files``): at any
    instruction of those functions, even in the middle of a line.
    """
    count = 0
    fired = False

    def local(frame, event, arg):
        nonlocal count, fired
        if event in events and not fired:
            count += 1
            if count == n:
                fired = True
                raise Injected(f"line event {n}: {frame.f_code.co_name} {Path(frame.f_code.co_filename).name}:{frame.f_lineno}")
        return local

    def global_(frame, event, arg):
        if fired:
            return None
        name = frame.f_code.co_filename
        if codes is not None:
            wanted = frame.f_code in codes
        else:
            wanted = name.startswith(PACKAGE) if files is None else name in files
        frame.f_trace_opcodes = "opcode" in events
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
    gate = getattr(outbox_module, "_gate", None)
    assert gate is None or not gate._lock._is_owned(), "the outbox gate is held"
    for lock in ([gate._lock] if gate else []) + [d._lock, d._drain_lock, d._changed, d._wake._cond, d._stop._cond,
                                                  delivery._dlock, config._lock]:
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
    inside = getattr(delivery, "_inside", lambda: None)(), d.outbox.stranded()
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
        try:
            if _turn(d)():
                time.sleep(0.01)
        except Exception:
            time.sleep(0.01)


def _turn(d: delivery.Dispatcher):
    """One turn of the worker's loop (the step alone where there is no ``_turn``)."""
    return getattr(d, "_turn", None) or d._step


def _sent(space, text: str) -> bool:
    return text in items(space.messages())


THREADING = {threading.__file__}


@pytest.mark.parametrize("call", ["send", "wait", "send-worker-stopped"])
def test_an_interrupt_as_any_lock_is_taken_in_send_or_wait_leaves_nothing_held(fast_space, call):
    """At the return of every ``threading`` function ``send()`` or ``Receipt.wait()`` calls (a lock's ``__enter__``).

    A Ctrl-C landing after ``Condition.__enter__`` took the worker's wake-up
    lock, before the ``with`` block began, kept it held for good: every lane
    then waited on it, and a storm of Ctrl-C jammed a process in about 30
    (``flush`` ended with 259 messages still queued). With the worker stopped,
    ``send`` starts it again and clears its stop flag, an Event whose lock the
    same instant kept held: the next ``send`` then waited for it for good.
    """
    d = delivery.dispatcher()
    chat_magic.send("warm up", thread_key="locks").wait(15)
    n, after = 0, []
    while True:
        n += 1
        cut, nxt = _sender_names(n)
        if call == "send-worker-stopped":
            d.stop(10)
            assert d._thread is None or not d._thread.is_alive()
        if call.startswith("send"):
            # not at the return of Condition._release_save in Thread.start's wait (a plain-lock condition): there
            # the standard library's own Condition.wait turns the interrupt into "release unlocked lock"
            fired, _ = interrupt_at(n, lambda cut=cut: chat_magic.send(cut, thread_key="locks"), THREADING, events=("return",),
                                    skip=("_release_save",))
        else:
            r = chat_magic.send(cut, thread_key="locks")
            fired, _ = interrupt_at(n, lambda r=r: r.wait(15), THREADING, events=("return",))
        assert_clean(d)
        chat_magic.send(nxt, thread_key="locks").wait(30)  # the lanes still deliver
        after.append(nxt)
        if not fired:
            break
    assert n > 3, "the sweep went through the locks send() and wait() take"
    check_delivery(fast_space, d, after)


@pytest.mark.slow  # over 3 s, or a framework: the slow run (see conftest)
def test_an_interrupt_at_every_line_of_the_workers_claim_leaves_nothing_behind(fast_space, locker):
    d = _manual_dispatcher()
    n, after = 0, []
    while True:
        n += 1
        cut, nxt = _sender_names(n)
        chat_magic.send(cut, thread_key="claim")
        fired, what = interrupt_at(n, _turn(d), None, skip=("_turn",))
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


@pytest.mark.slow  # over 3 s, or a framework: the slow run (see conftest)
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
        work = getattr(lane, "_work", None) or (lambda j: d._deliver(j, lane))
        fired, what = interrupt_at(n, lambda j=job, w=work: w(j), None, skip=("_work",))
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


# -- real processes: a SIGINT storm, forks, signal handlers, atexit and __del__ -----------------------------

def _run_child(script: str, args: list[str], home: Path, timeout: float, **env: str) -> subprocess.CompletedProcess:
    try:
        return subprocess.run([sys.executable, "-c", script, *args], env=_env(home, **env), capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"the process hung (no exit in {timeout:g} s); stderr: {(e.stderr or b'')[-800:]!r}")


def _no_trouble(stderr: str) -> None:
    for bad in ("Traceback", "within a transaction", "database is locked", "ImportError", "Exception ignored"):
        assert bad not in stderr, f"{bad!r} in stderr: {stderr[-1500:]}"


def _stored_texts(home: Path) -> list[str]:
    db = sqlite3.connect(f"file:{outbox_path(home)}?mode=ro", uri=True)
    try:
        return [part for (p,) in db.execute("SELECT payload FROM message") for part in json.loads(p)["text"].split("\n\n")]
    finally:
        db.close()


def _storm_run(url: str, run: int, home: Path, rnd: random.Random) -> tuple[int, set[str], str, int]:
    """One process sending 300 events under a Ctrl-C storm; (presses, events whose send returned, stderr, Ctrl-C that landed).

    Like a user's program, it may be stopped by a Ctrl-C that lands outside
    its ``try`` (a KeyboardInterrupt traceback): what it queued must still be
    delivered, once.
    """
    presses, returned, code, stderr, landed = ctrl_c_storm(url, run, _env(home), rnd)
    if code is None:
        pytest.fail("the process hung under the Ctrl-C storm")
    if code:  # stopped by a Ctrl-C outside its try (or during its exit), as a program is
        assert "KeyboardInterrupt" in stderr, f"exit {code}: {stderr[-1500:]}"
        stderr = stderr.replace("Traceback", "").replace("Exception ignored", "")
        landed += 1
    return presses, returned, stderr, landed


@pytest.mark.slow  # over 3 s, or a framework: the slow run (see conftest)
def test_a_sigint_storm_against_a_sending_process_jams_nothing(fast_space, tmp_path):
    home = tmp_path / "storm-home"
    home.mkdir()
    # the outbox exists before the second process takes its lock
    subprocess.run([sys.executable, "-c", "from chat_magic import delivery; delivery.dispatcher()"],
                   env=_env(home), check=True, timeout=60)
    locker = Locker(outbox_path(home), tmp_path)
    try:
        rnd = random.Random(16)
        presses, confirmed, run, landed = 0, set(), 0, 0
        while presses < 300 and run < 20:
            pressed, ok, stderr, hit = _storm_run(fast_space.url, run, home, rnd)
            _no_trouble(stderr)
            presses, confirmed, run, landed = presses + pressed, confirmed | ok, run + 1, landed + hit
        turns, slow, worst = locker.finish()
    finally:
        locker.stop()
    assert presses >= 300, "the storm pressed Ctrl-C many times while processes sent"
    assert landed >= 10, f"only {landed} Ctrl-C reached a send (is SIGINT ignored where the suite runs?)"
    assert slow == 0, f"another process was kept out of the outbox {slow} time(s) (worst {worst} s)"
    after = _run_child(f"import chat_magic, sys; chat_magic.send('after the storm', to={fast_space.url!r}, thread_key='storm');"
                       " sys.exit(0 if chat_magic.flush(60) else 1)", [], home, timeout=90)
    _no_trouble(after.stderr)
    assert after.returncode == 0, after.stderr
    got = items(fast_space.messages())
    assert len(got) == len(set(got)), "nothing duplicated"
    assert confirmed <= set(got), f"lost: {sorted(confirmed - set(got))[:5]}"
    assert set(got) == set(_stored_texts(home)), "what the outbox took was delivered, and nothing else"
    for r in range(run):
        mine = [t for t in got if t.startswith(f"storm-{r}-0")]
        assert mine == sorted(mine), "in order"


@pytest.mark.slow  # over 3 s, or a framework: the slow run (see conftest)
def test_a_signal_handler_that_sends_while_send_runs_never_deadlocks(fast_space, tmp_path):
    for run in range(12):
        home, out = tmp_path / f"sig-{run}", tmp_path / f"sig-{run}.json"
        home.mkdir()
        before = len(items(fast_space.messages()))
        done = _run_child(SIGNALLED, [fast_space.url, str(out)], home, timeout=150)
        _no_trouble(done.stderr)
        assert done.returncode == 0, f"run {run}: exit {done.returncode}: {done.stderr[-1500:]}"
        handled = json.loads(out.read_text())
        assert handled > 0, "the signal landed while the process sent"
        got = items(fast_space.messages())[before:]
        want = {f"main-{i:04d}" for i in range(60)} | {f"sig-{k:04d}" for k in range(handled)}
        assert len(got) == len(set(got)) and set(got) == want, f"run {run}: lost {sorted(want - set(got))[:5]}"
        mains = [t for t in got if t.startswith("main-")]
        assert mains == sorted(mains), "the main thread's messages in order"


@pytest.mark.slow  # over 3 s, or a framework: the slow run (see conftest)
def test_150_forks_sending_while_the_parent_sends_never_hang(fast_space, tmp_path):
    home, out = tmp_path / "forks", tmp_path / "forks.json"
    home.mkdir()
    done = _run_child(FORKS, [fast_space.url, "150", str(out)], home, timeout=400)
    result = json.loads(out.read_text())
    assert result["hung"] == [], f"{len(result['hung'])} child(ren) hung: {done.stderr[-1500:]}"
    assert result["failed"] == [], f"{len(result['failed'])} child(ren) failed: {done.stderr[-1500:]}"
    _no_trouble(done.stderr)
    assert done.returncode == 0, f"exit {done.returncode}: {done.stderr[-1500:]}"
    got = items(fast_space.messages())
    want = {f"child-{i:04d}" for i in range(150)} | set(result["parent"]) | {"parent-start"}
    assert len(got) == len(set(got)), "nothing duplicated"
    assert set(got) == want, f"lost: {sorted(want - set(got))[:5]}"


ATEXIT = r"""
import atexit, sys
url = sys.argv[1]

def late():
    import chat_magic
    chat_magic.send("from an atexit handler registered first", to=url, thread_key="exit")

atexit.register(late)  # before chat_magic's first use: it runs after chat_magic's own exit hook
import chat_magic
chat_magic.send("the job's notice", to=url, thread_key="exit")
"""

DEL = r"""
import sys
import chat_magic
url = sys.argv[1]

class Notifier:
    def __del__(self):
        chat_magic.send("from __del__ at shutdown", to=url, thread_key="del")

keep = Notifier()  # a module global: collected late in the interpreter's shutdown
chat_magic.send("the job's notice", to=url, thread_key="del")
"""

DEL_FIRST_USE = r"""
import sys
import chat_magic
url = sys.argv[1]

class Notifier:
    def __del__(self):
        chat_magic.send("first use from __del__ at shutdown", to=url, thread_key="del1")

keep = Notifier()
"""


def test_a_send_from_an_atexit_handler_registered_first_is_delivered(fast_space, tmp_path):
    home = tmp_path / "exit"
    home.mkdir()
    done = _run_child(ATEXIT, [fast_space.url], home, timeout=60)
    _no_trouble(done.stderr)
    assert done.returncode == 0
    got = items(fast_space.messages())
    assert got.count("the job's notice") == 1
    assert got.count("from an atexit handler registered first") == 1, f"delivered; stderr: {done.stderr[-800:]!r}"


def _said(stderr: str, words: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("chat_magic:") and words in line]


def test_a_send_from_del_at_shutdown_is_queued_and_said(fast_space, tmp_path):
    home = tmp_path / "del"
    home.mkdir()
    done = _run_child(DEL, [fast_space.url], home, timeout=60)
    _no_trouble(done.stderr)
    assert done.returncode == 0
    got = items(fast_space.messages())
    assert got.count("the job's notice") == 1
    # HTTP cannot work during module teardown (urllib3 imports as it goes): queued durably, and said
    assert len(_said(done.stderr, "still queued")) == 1, done.stderr
    assert "from __del__ at shutdown" in _stored_texts(home)
    again = _run_child("import chat_magic, sys; sys.exit(0 if chat_magic.flush(30) else 1)", [], home, timeout=60)
    assert again.returncode == 0 and items(fast_space.messages()).count("from __del__ at shutdown") == 1


def test_a_first_send_from_del_at_shutdown_is_said(fast_space, tmp_path):
    home = tmp_path / "del-first"
    home.mkdir()
    done = _run_child(DEL_FIRST_USE, [fast_space.url], home, timeout=60)
    _no_trouble(done.stderr)
    assert done.returncode == 0
    assert len(_said(done.stderr, "cannot be queued")) == 1, done.stderr


# -- many threads of one process ------------------------------------------------------------

SENDS = 16


@pytest.mark.slow  # over 3 s, or a framework: the slow run (see conftest)
def test_96_threads_sending_at_once_never_raise_database_is_locked(fast_space, locker):
    """While another process writes a few ms at a time too (the ``locker``)."""
    errors: list[str] = []
    start = threading.Barrier(96)

    def sender(k: int) -> None:
        start.wait()
        for j in range(SENDS):
            try:
                chat_magic.send(f"t{k:02d}-{j}", thread_key=f"t{k:02d}")
            except Exception as e:
                errors.append(f"{type(e).__name__}: {e}")

    threads = [threading.Thread(target=sender, args=(k,)) for k in range(96)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    locker.finish()
    assert errors == [], f"{len(errors)} send(s) raised, e.g. {errors[0]}"
    assert delivery.flush(180)
    got = items(fast_space.messages())
    assert len(got) == len(set(got)) == 96 * SENDS + 1
    for k in range(96):
        mine = [t for t in got if t.startswith(f"t{k:02d}-")]
        assert mine == [f"t{k:02d}-{j}" for j in range(SENDS)], f"thread {k} in order"
