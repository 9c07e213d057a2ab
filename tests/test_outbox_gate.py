"""Every SQLite statement of the process holds the outbox's gate (issue 20: connections in the core).

A fork waits for the gate. A statement run without it (``box._db().execute``
from another module, the way deadman, the watcher and hosts.py issued theirs)
could be half-way when another thread forks: the child then inherits SQLite's
per-file lock bookkeeping saying its process holds the write lock, which no
process holds, and every write of the child fails with "database is locked".

Real forks, real SQLite files, no mocks.
"""

from __future__ import annotations

import ast
import json
import os
import sqlite3
import sys
import threading
import time
from pathlib import Path

import pytest
from test_interrupts import interrupt_at

import chat_magic
from chat_magic import outbox as outbox_module
from chat_magic.outbox import Outbox
from chat_magic.webhook import parse_webhook_url

needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
HOOK = parse_webhook_url("https://chat.googleapis.com/v1/spaces/GATE/messages?key=k&token=t")
# about a second of work inside one UPDATE: SQLite holds the write lock throughout
SLOW_UPDATE = ("UPDATE message SET progress = (WITH RECURSIVE c(x) AS (SELECT 1 UNION ALL SELECT x + 1 FROM c"
               " WHERE x < ?) SELECT count(*) FROM c) WHERE id = ?")


def _body(text: str) -> str:
    return json.dumps({"text": text})


def _child_sends(box: Outbox, report: int) -> None:
    """In the forked child: queue one message (a caller's send) and report how it went; never returns."""
    try:
        box.enqueue(HOOK, None, [(_body("from the child"), False)], patient=True)
        os.write(report, b"ok")
    except BaseException as e:  # noqa: BLE001 - whatever it is, the parent reads it
        os.write(report, f"{type(e).__name__}: {e}"[:500].encode())
    finally:
        os._exit(0)


@needs_fork
def test_a_fork_while_another_thread_runs_a_long_statement_leaves_the_child_a_working_outbox(tmp_path: Path):
    box = Outbox(tmp_path / "outbox.sqlite3", busy_timeout=3.0, caller_timeout=3.0)
    [row] = box.enqueue(HOOK, None, [(_body("in the parent"), False)])
    n = 3_000_000
    started, done = threading.Event(), threading.Event()

    def slow() -> None:
        db = box._db()
        started.set()
        db.execute(SLOW_UPDATE, (n, row))  # the way deadman, the watcher and hosts.py issued theirs
        done.set()

    t = threading.Thread(target=slow)
    t.start()
    started.wait(10)
    time.sleep(0.05)  # inside the statement now (it runs about a second)
    assert not done.is_set(), "the statement is long enough to fork in its middle"
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        _child_sends(box, w)
    os.close(w)
    t.join(30)
    _, status = os.waitpid(pid, 0)
    said = os.read(r, 1000).decode()
    os.close(r)
    assert status == 0 and said == "ok", f"the child could not use the outbox: {said!r}"
    assert len(box.rows()) == 2  # the child's message is in the file


def test_every_statement_of_a_send_a_notice_the_watcher_and_the_hosts_check_holds_the_gate(fast_space, monkeypatch):
    """Each SQLite statement chat_magic runs, seen by SQLite itself (a trace callback on every connection)."""
    from chat_magic import config, delivery, hosts, outbox, watcher

    monkeypatch.setenv("CHAT_MAGIC_WATCHER", "off")  # the watcher's own query is run below, in this process
    seen: list[tuple[str, bool]] = []
    connect = sqlite3.connect

    def traced(*args, **kwargs):
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(lambda sql: seen.append((sql, outbox.inside())))
        return conn

    monkeypatch.setattr(sqlite3, "connect", traced)
    with chat_magic.notify_when_done("gate audit") as n:  # arms a death notice, records progress (deadman.py)
        n.log(loss=0.5)
        chat_magic.send("inside the block").wait(15)
    assert delivery.flush(30)
    path = hosts.outbox_path(config.home())
    unfinished = getattr(outbox, "unfinished", None) or getattr(hosts, "unfinished")  # noqa: B009 - its old home
    assert unfinished(path) == 0
    watcher.report("gone-host:1/1", [str(path)], {"exit_status": None, "oom_kills": 0, "died_at": time.time(), "peak": 0})
    statements = {sql for sql, _ in seen}
    assert any("important=1" in s for s in statements) and any("armed" in s for s in statements)  # all three were seen
    assert any(s.startswith("UPDATE message SET state=") and "payload=" in s for s in statements), sorted(statements)  # the claim
    assert [sql for sql, held in seen if not held] == []


SQL_WORDS = ("SELECT", "INSERT", "UPDATE", "DELETE", "PRAGMA", "BEGIN", "COMMIT", "ROLLBACK", "CREATE", "ALTER", "WITH")


def _sql_calls(tree: ast.AST) -> list[ast.Call]:
    """Calls ``x.execute("SELECT ...")`` (and executemany, executescript) whose text is SQL."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.args \
                and node.func.attr in ("execute", "executemany", "executescript"):
            first = node.args[0]
            text = first.value if isinstance(first, ast.Constant) else ast.unparse(first).lstrip("f'\"")
            if isinstance(text, str) and text.lstrip().upper().startswith(SQL_WORDS):
                found.append(node)
    return found


def test_all_sql_is_in_the_outbox_and_every_connection_it_opens_is_gated():
    package = Path(chat_magic.__file__).parent
    elsewhere = sorted({p.name for p in package.rglob("*.py") if p.name != "outbox.py"
                        and _sql_calls(ast.parse(p.read_text(encoding="utf-8")))})
    assert elsewhere == [], "SQL outside outbox.py"
    assert _sql_calls(ast.parse((package / "outbox.py").read_text(encoding="utf-8")))  # the finder finds SQL
    connects = [(p.name, node) for p in package.rglob("*.py") for node in ast.walk(ast.parse(p.read_text(encoding="utf-8")))
                if isinstance(node, ast.Call) and ast.unparse(node.func) == "sqlite3.connect"]
    assert [(name, ast.unparse(node)) for name, node in connects
            if name != "outbox.py" or not any(k.arg == "factory" and ast.unparse(k.value) == "_GatedConnection"
                                               for k in node.keywords)] == []


def test_a_transaction_begun_outside_the_outboxs_own_writes_is_rolled_back_and_refused(tmp_path: Path):
    """``BEGIN`` on the outbox's connection from outside ``Outbox._write`` would hold the write lock past the gate."""
    box = Outbox(tmp_path / "outbox.sqlite3", busy_timeout=1.0, caller_timeout=1.0)
    db = box._db()
    with pytest.raises(sqlite3.ProgrammingError, match="must hold the gate"):
        db.execute("BEGIN IMMEDIATE")
    assert not db.in_transaction
    other = sqlite3.connect(str(box.path), isolation_level=None, timeout=0.1)  # another process would find the lock free
    other.execute("BEGIN IMMEDIATE")
    other.execute("ROLLBACK")
    other.close()
    assert box.enqueue(HOOK, None, [(_body("after"), False)])


def _cut_at_opcode(n: int, fn) -> bool:
    """Run ``fn`` raising a KeyboardInterrupt at its ``n``-th instruction inside the gate's methods; whether it was raised."""
    gate = outbox_module._Gate
    codes = {f.__code__ for f in (gate.enter, gate.leave, gate.restore, gate.depth)}
    return interrupt_at(n, fn, None, events=("opcode",), codes=codes)[0]


def _holds(gate) -> int:
    """How many times this thread holds the gate's lock (the RLock's own count)."""
    if not gate._lock._is_owned():
        return 0
    state = gate._lock._release_save()
    gate._lock._acquire_restore(state)
    return state[0]


@pytest.mark.parametrize("step", ["enter", "leave", "restore"])
def test_an_interrupt_at_any_opcode_of_the_gate_never_counts_more_than_it_holds(step):
    """The count may fall behind the holds (an extra hold is given back at depth 0), never run ahead of them.

    ``leave`` released before it counted down: a Ctrl-C between the two left a
    count above the holds, no depth-0 check healed a later leak, and a storm of
    Ctrl-C left the gate held for good (a worker waited on it, 293 messages queued).
    """
    n = 0
    while True:
        n += 1
        gate = outbox_module._Gate()
        gate.enter(1)
        gate.enter(1)
        call = {"enter": lambda g=gate: g.enter(1), "leave": gate.leave, "restore": lambda g=gate: g.restore(1)}[step]
        fired = _cut_at_opcode(n, call)
        assert gate.depth() <= _holds(gate), (step, n, gate.depth(), _holds(gate))
        gate.restore(0)
        if not fired:
            break
    assert n > 5, "the sweep went through the gate's opcodes"


# -- a signal handler that runs inside the gate's own steps, and an interrupt just past an entry ---------------


def _handler_at_opcode(n: int, fn, handler) -> bool:
    """Run ``fn``, calling ``handler`` (as a signal handler runs: same thread, between two instructions) at its
    ``n``-th instruction inside the gate's ``enter``/``leave``; whether it was called."""
    gate = outbox_module._Gate
    codes = {gate.enter.__code__, gate.leave.__code__}
    count = 0
    fired = False

    def local(frame, event, arg):
        nonlocal count, fired
        if event == "opcode" and not fired:
            count += 1
            if count == n:
                fired = True
                handler()  # tracing is off inside a trace function: the handler's own entries run untraced
        return local

    def global_(frame, event, arg):
        if fired or frame.f_code not in codes:
            return None
        frame.f_trace_opcodes = True
        return local

    sys.settrace(global_)
    try:
        fn()
    finally:
        sys.settrace(None)
    return fired


def test_a_signal_handler_reading_the_outbox_inside_the_gates_own_steps_leaves_it_as_it_was(tmp_path: Path):
    """A program's own SIGTERM handler with a block open reads the outbox (termination's one line per block).

    Run between the lock and the count of ``enter`` (or of ``leave``), its
    entry took the hold its own thread was still counting for one an
    interrupt left, and gave it back: the interrupted call then counted a
    hold it did not have (the gate held for good at its next error), or
    ``leave`` raised "cannot release un-acquired lock" into the caller.
    """
    box = Outbox(tmp_path / "outbox.sqlite3", busy_timeout=2.0, caller_timeout=2.0)
    box.enqueue(HOOK, None, [(_body("queued"), False)])
    gate = outbox_module._gate
    seen = []
    n = 0
    while True:
        n += 1
        fired = _handler_at_opcode(n, lambda: seen.append(box.counts()), lambda: seen.append(box.counts()))
        assert (gate.depth(), _holds(gate)) == (0, 0), (n, gate.depth(), _holds(gate))
        if not fired:
            break
    assert n > 10, "the sweep went through the gate's instructions"
    assert all(c.get("pending") == 1 for c in seen) and len(seen) == 2 * (n - 1) + 1
    other = threading.Thread(target=lambda: seen.append(box.counts()))  # another thread gets in
    other.start()
    other.join(10)
    assert not other.is_alive() and len(seen) == 2 * n


def _statement(tmp_path: Path):
    conn = outbox_module._connect_file(str(tmp_path / "other-host.sqlite3"), timeout=1.0, isolation_level=None)
    return lambda: conn.execute("SELECT 1").fetchall()


def _plain_transaction(tmp_path: Path):
    conn = outbox_module._connect_file(str(tmp_path / "other-host.sqlite3"), timeout=1.0, isolation_level=None)

    def run():
        with outbox_module._plain_tx(conn):
            pass
    return run


def _checkpoint(tmp_path: Path):
    box = Outbox(tmp_path / "outbox.sqlite3", busy_timeout=1.0, caller_timeout=1.0)
    box.enqueue(HOOK, None, [(_body("queued"), False)])
    return box._checkpoint


@pytest.mark.parametrize("make", [_statement, _plain_transaction, _checkpoint], ids=["statement", "plain-tx", "checkpoint"])
def test_an_interrupt_as_the_gate_is_entered_outside_any_outbox_call_leaves_it_free(tmp_path: Path, make):
    """Statements outside an outbox call (another host's file, read by a take-over; the checkpoint) took the gate
    before their ``try``: an interrupt as ``enter`` returned (Python 3.10 checks for one there) left it held,
    and no outbox call healed it (``heal_gate`` acts at depth 0 only): every other thread waited for good."""
    run = make(tmp_path)
    code = outbox_module._Gate.enter.__code__
    raised, _ = interrupt_at(1, run, None, events=("return",), codes={code})
    assert raised
    gate = outbox_module._gate
    assert (gate.depth(), _holds(gate)) == (0, 0)
    run()  # and it still works


def test_an_outbox_call_that_could_not_get_in_waits_for_the_gate_once_not_twice(tmp_path: Path):
    """Its clean-up ran SQL through the gate again (a busy-timeout reset), so every error that left an outbox
    call while another thread held the gate came after twice the wait, and a Ctrl-C in that wait hung longer."""
    box = Outbox(tmp_path / "outbox.sqlite3", busy_timeout=0.3, caller_timeout=0.3)
    box.enqueue(HOOK, None, [(_body("queued"), False)])
    holding, done = threading.Event(), threading.Event()

    def hold():
        outbox_module._gate.enter(5)
        holding.set()
        done.wait(30)
        outbox_module._gate.leave()

    holder = threading.Thread(target=hold)
    holder.start()
    assert holding.wait(10)
    entries = []
    code = outbox_module._Gate.enter.__code__
    sys.setprofile(lambda frame, event, arg: entries.append(1) if event == "call" and frame.f_code is code else None)
    try:
        with pytest.raises(chat_magic.OutboxError, match="locked"):
            box.counts()
    finally:
        sys.setprofile(None)
        done.set()
        holder.join(10)
    assert len(entries) == 1, f"the gate was waited for {len(entries)} times"
    assert box.counts().get("pending") == 1
