"""Receipts that tell the truth (issues 16 and 19), against a real outbox file and the emulator on loopback.

- a message delivered, then pruned from the outbox (older than an hour, beyond
  the newest ``CHAT_MAGIC_KEEP_SENT``), reads ``sent``: only a drop reads
  ``dropped``, and a message no record accounts for reads lost;
- a receipt read while another thread or process recovers a damaged outbox
  never calls a message lost that is then salvaged and delivered.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
import time

import pytest
from conftest import KEY, TOKEN, wait_until
from helpers_outbox import queued_by_another_process

import chat_magic
from chat_magic import delivery
from chat_magic.delivery import Delivered
from chat_magic.errors import DeliveryFailed
from chat_magic.hosts import outbox_path


def _age(box, ids, seconds: float) -> None:
    """Make delivered rows look delivered ``seconds`` ago (another process's write: the real file, by SQL)."""
    db = sqlite3.connect(box, timeout=10)
    db.executemany("UPDATE message SET updated_at = updated_at - ? WHERE id = ?", [(seconds, i) for i in ids])
    db.commit()
    db.close()


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chat_magic.cli", *args], env=dict(os.environ),
                          capture_output=True, text=True, timeout=120)


def test_a_delivered_message_pruned_later_still_reads_sent(fast_space, monkeypatch):
    """Older than an hour and beyond the newest N: pruned by the outbox's own tidying, and still "sent"."""
    monkeypatch.setenv("CHAT_MAGIC_KEEP_SENT", "1")
    receipts = [chat_magic.send(f"pruned later {i}", thread_key=f"t{i}") for i in range(4)]  # not merged: 4 rows
    seen = receipts[0].wait(20)  # this one was looked at while its row was there: its name stays known
    for r in receipts[1:]:
        r.wait(20)
    fast_space.wait_for(4)
    box = delivery.dispatcher().outbox
    _age(box.path, [i for r in receipts for i in r.ids], 2 * 3600)
    fresh = [delivery.Receipt(delivery.dispatcher(), list(r.ids), r.destination) for r in receipts]  # never looked at
    box._tidy()  # what the worker runs every PRUNE_EVERY deliveries
    assert len(box.rows([i for r in receipts for i in r.ids])) == 1, "the newest one is kept, the others pruned"
    for r in fresh[:3]:
        assert r.status == "sent", (r.ids, r.error)  # was: "failed"
        assert r.error is None
        assert r.results() == [Delivered(None, None)], "delivered, its name no longer known"
        assert r.wait(1) == Delivered(None, None)  # was: DeliveryFailed("... it was dropped ...")
    assert fresh[3].status == "sent" and fresh[3].results()[0].name, "the newest one: still in the outbox"
    assert receipts[0].status == "sent" and receipts[0].results() == [seen], "an outcome seen once is remembered"


def test_a_dropped_message_reads_dropped_and_a_delivered_one_dropped_reads_sent(fast_space, monkeypatch):
    delivered = chat_magic.send("delivered, then dropped from the list")
    delivered.wait(20)
    monkeypatch.setenv("GOOGLE_CHAT_WEBHOOK_URL", f"http://127.0.0.1:1/v1/spaces/D/messages?key={KEY}&token={TOKEN}")
    monkeypatch.setattr(delivery.settings, "backoff_base", 300.0)
    monkeypatch.setattr(delivery.settings, "backoff_cap", 300.0)
    waiting = chat_magic.send("never delivered, dropped")
    wait_until(lambda: waiting.error is not None, 10, what="a failed attempt")
    fresh = delivery.Receipt(delivery.dispatcher(), list(delivered.ids), delivered.destination)
    out = _cli("outbox", "drop", str(waiting.ids[0]), str(delivered.ids[0]))
    assert out.returncode == 0 and "2 message(s) dropped" in out.stdout, out.stderr
    assert waiting.status == "failed" and "dropped (chat-magic outbox drop)" in waiting.error
    with pytest.raises(DeliveryFailed, match="dropped"):
        waiting.wait(1)
    assert fresh.status == "sent" and fresh.results() == [Delivered(None, None)], "delivered stays delivered"


def test_pruned_and_dropped_records_survive_a_recovery_and_lost_ids_are_never_reused(fast_space, outbox_home, monkeypatch):
    """A damaged file: the record of what was pruned is salvaged; a message lost with the damage stays lost."""
    monkeypatch.setenv("CHAT_MAGIC_KEEP_SENT", "0")
    first = chat_magic.send("delivered, pruned, then the file is damaged")
    first.wait(20)
    box = delivery.dispatcher().outbox
    _age(box.path, first.ids, 2 * 3600)
    box._tidy()
    assert not box.rows(first.ids)
    delivery.shutdown()
    fast_space.emu.set_down(True)
    try:
        subprocess.run([sys.executable, "-c", "import chat_magic\nfrom chat_magic import delivery\n"
                        "delivery.settings.exit_timeout = 0\nchat_magic.send('lost with the damage ' + 'x' * 3000)"],
                       env=dict(os.environ), check=True, timeout=60)
    finally:
        fast_space.emu.set_down(False)
    path = outbox_path(outbox_home)
    db = sqlite3.connect(path, timeout=10)
    last = db.execute("SELECT max(id) FROM message").fetchone()[0]
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    db.close()
    data = path.read_bytes()
    page = data.index(b"lost with the damage ") // 4096
    with open(path, "r+b") as f:
        f.seek(page * 4096)
        f.write(b"\xff" * 4096)
    lost = delivery.Receipt(delivery.dispatcher(), [last], "the space")
    again = delivery.Receipt(delivery.dispatcher(), list(first.ids), "the space")
    assert lost.status == "failed" and "no record says it was delivered" in lost.error  # recovered on this read
    assert again.status == "sent", again.error
    newer = chat_magic.send("after the recovery")
    assert newer.ids[0] > last, "an id of the old file is never handed out again"
    newer.wait(20)
    assert lost.status == "failed", "its id names no newer message"


def _fill(path, n: int) -> None:
    """``n`` delivered rows, as an outbox that served a long job holds them: a salvage of them takes a while."""
    db = sqlite3.connect(path, timeout=10)
    dest, space_key = db.execute("SELECT id, space_key FROM destination").fetchone()
    now = time.time()
    db.executemany(
        "INSERT INTO message (request_id, dest, space_key, payload, state, next_at, created_at, updated_at, name)"
        " VALUES (?,?,?,?,'sent',?,?,?,?)",
        [(f"cm-fill{i}", dest, space_key, f'{{"text":"filler {i} {"f" * 300}"}}', now, now, now, f"n{i}") for i in range(n)])
    db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    db.close()


def _damage_a_filler_page(path) -> None:
    data = path.read_bytes()
    page = data.index(b"filler 777 ") // 4096
    with open(path, "r+b") as f:
        f.seek(page * 4096)
        f.write(b"\xff" * 4096)


def _watch(receipt, stop: threading.Event, seen: list[str]) -> None:
    while not stop.is_set():
        try:
            seen.append(receipt.status)
        except Exception as e:  # an OutboxError would be a finding too
            seen.append(f"error: {e}")


def _queue_one_waiting(fast_space, monkeypatch):
    monkeypatch.setattr(delivery.settings, "backoff_base", 300.0)  # a retry in 150-300 s (one further ahead than
    monkeypatch.setattr(delivery.settings, "backoff_cap", 300.0)   # MAX_HOLD is taken for a clock step: not waited for)
    fast_space.emu.inject("503")
    r = chat_magic.send("waits through a recovery")
    wait_until(lambda: r.error is not None, 10, what="a first, failed attempt")  # its retry: in 300-600 s
    return r


@pytest.mark.parametrize("where", ["thread", "process"])
def test_a_receipt_read_during_a_recovery_never_calls_its_message_lost(fast_space, monkeypatch, where):
    """Another thread (or process) recovers a damaged outbox while this receipt is read in a loop."""
    r = _queue_one_waiting(fast_space, monkeypatch)
    box = delivery.dispatcher().outbox
    _fill(box.path, 20_000)
    _damage_a_filler_page(box.path)
    stop, seen = threading.Event(), []
    watcher = threading.Thread(target=_watch, args=(r, stop, seen), daemon=True)
    watcher.start()
    wait_until(lambda: len(seen) > 5, 10, what="the receipt read")
    try:
        if where == "thread":
            reader = threading.Thread(target=lambda: box.rows(limit=100_000))  # reads the damaged page: recovers
            reader.start()
            reader.join(60)
            assert box.notices and "salvaged" in box.notices[-1], box.notices
        else:
            out = _cli("outbox", "list", "--all")  # another process finds the damage and recovers the file this one uses
            assert "salvaged" in out.stderr, out.stderr
        time.sleep(0.5)  # this process follows the new file (it looks 5 times a second)
        n = len(seen)
        wait_until(lambda: len(seen) > n + 5, 10, what="reads after the recovery")
    finally:
        stop.set()
        watcher.join(10)
    assert "pending" in seen and set(seen) <= {"pending", "sent"}, sorted(set(seen))  # was: "failed" mid-salvage
    assert chat_magic.flush(60)
    assert r.wait(30).name and r.status == "sent"
    assert [m["text"] for m in fast_space.messages()] == ["waits through a recovery"], "delivered once"


@pytest.mark.slow  # over 3 s, or a framework: the slow run (see conftest)
def test_a_flush_is_not_done_while_the_worker_still_salvages(space, outbox_home):
    """What made ``test_damaged_outbox_found_by_the_next_process`` fail now and then, made certain.

    The CLI's worker finds the damage (its integrity check) and recovers while
    the CLI's main thread waits for the queued ids: read half-way, the new file
    held none of them, so ``flush`` was done at once (exit 0) with nothing
    delivered. A large file makes the salvage long enough to be caught every time.
    """
    queued_by_another_process(space, 3)
    path = outbox_path(outbox_home)
    _fill(path, 20_000)
    _damage_a_filler_page(path)
    out = _cli("outbox", "flush", "--timeout", "60")
    assert "salvaged" in out.stderr, out.stderr
    assert out.returncode == 0, out.stderr
    assert [m["text"] for m in space.messages()] == ["queued 00", "queued 01", "queued 02"]  # was: [] (and exit 0)
