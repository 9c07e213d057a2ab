"""The HTTP edges of delivery, each against a real loopback server that answers what Google would not.

- Delivered means Google answered: a 2xx counts only when its JSON names the
  created message (``spaces/...``); a proxy's HTML page, an empty 200 and a
  redirect (never followed) are retried, each kind said once in one line.
- A reply is read to a cap: a 200 MB body is not read whole.
- Common network errors in plain words ("connection refused"), not errnos.
- A bad ``CHAT_MAGIC_EXIT_TIMEOUT`` is one line and the default, never a ValueError.
- ``chat-magic outbox list`` says in one line when rows are in a state a newer version wrote.
"""

from __future__ import annotations

import os
import socket
import sqlite3
import struct
import subprocess
import sys
import threading

import pytest
from conftest import KEY, TOKEN, assert_no_secret, wait_until

import chat_magic
from chat_magic import delivery
from chat_magic.hosts import outbox_path

pytestmark = pytest.mark.timeout(120)

BIG = 200 * 1024 * 1024


@pytest.fixture
def quick(outbox_home):
    """This process's pacing off and short backoffs: what is tested is what an answer means, not timing."""
    s = delivery.settings
    saved = (s.interval, s.gap_after_answer, s.backoff_base, s.backoff_cap)
    s.interval, s.gap_after_answer, s.backoff_base, s.backoff_cap = 0.0, 0.0, 0.1, 0.4
    yield outbox_home
    s.interval, s.gap_after_answer, s.backoff_base, s.backoff_cap = saved


HTML = {"Content-Type": "text/html; charset=utf-8"}
JSON = {"Content-Type": "application/json"}


def test_a_2xx_without_a_message_and_a_redirect_are_retried_then_delivered(quick, replies, capfd):
    server = replies([
        (200, HTML, b"<!DOCTYPE html><html><body>Access to this site is blocked by your proxy</body></html>"),
        (200, JSON, b""),
        (200, JSON, b"{}"),
        (302, {"Location": f"http://127.0.0.1:1/portal?key={KEY}&token={TOKEN}"}, b""),
        (201, HTML, b"<html>created?</html>"),
    ])
    r = chat_magic.send("behind a proxy", to=server.url())
    got = r.wait(30)
    assert got.name == "spaces/STUB/messages/m6" and got.thread_name == "spaces/STUB/threads/t"
    assert len(server.hits) == 6, "every answer that was not Google's was retried, and only those"
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "answered" in ln]
    assert len(lines) == 2, err  # one line per kind (no message / redirect), not one per attempt
    assert "HTML page" in lines[0] and "retrying" in lines[0]
    assert "302 redirect to 127.0.0.1 (not followed)" in lines[1]
    assert_no_secret(err)


def test_an_empty_200_is_not_delivered_while_the_server_misbehaves(quick, replies):
    server = replies([(200, JSON, b"")] * 50)
    r = chat_magic.send("lost in a proxy", to=server.url())
    wait_until(lambda: len(server.hits) >= 3, what="three attempts")
    assert r.status == "pending" and "200 with an empty body" in (r.error or "")


def test_a_huge_reply_is_read_to_a_cap(quick, replies):
    server = replies([(200, HTML, BIG), (500, HTML, BIG)])
    r = chat_magic.send("a flood comes back", to=server.url())
    assert r.wait(60).name == "spaces/STUB/messages/m3"
    assert len(server.written) == 2
    assert max(server.written) < 32 * 1024 * 1024, f"the client read {server.written} bytes of a {BIG}-byte reply"
    rows = delivery.dispatcher().outbox.resolve(r.ids)
    assert rows[0].state == "sent"


def test_a_refusal_with_a_huge_body_keeps_a_short_error(quick, replies):
    server = replies([(400, HTML, BIG)])
    r = chat_magic.send("refused with a flood", to=server.url())
    with pytest.raises(chat_magic.DeliveryFailed) as e:
        r.wait(30)
    assert len(str(e.value)) <= 2200 and "\n" not in str(e.value)
    assert max(server.written) < 32 * 1024 * 1024


def _rst_server() -> socket.socket:
    """Accepts, reads the request, and resets the connection (SO_LINGER 0)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()

    def serve():
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            c.recv(65536)
            c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            c.close()

    threading.Thread(target=serve, daemon=True).start()
    return s


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _silent_server() -> socket.socket:
    """Accepts and reads, never answers (a stalled proxy)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    kept: list[socket.socket] = []

    def serve():
        while True:
            try:
                c, _ = s.accept()
            except OSError:
                return
            kept.append(c)

    threading.Thread(target=serve, daemon=True).start()
    return s


@pytest.mark.parametrize("where, words", [("closed", ("connection refused (is the server running",)),
                                          ("reset", ("connection reset", "connection closed by the server")),
                                          ("silent", ("no answer within 0.5 s (timed out",))])
def test_network_errors_in_plain_words(quick, where, words, monkeypatch):
    monkeypatch.setattr(delivery.settings, "read_timeout", 0.5)
    rst = {"reset": _rst_server, "silent": _silent_server}.get(where, lambda: None)()
    port = rst.getsockname()[1] if rst else _closed_port()
    try:
        r = chat_magic.send("nobody home", to=f"http://127.0.0.1:{port}/v1/spaces/S/messages?key={KEY}&token={TOKEN}")
        error = wait_until(lambda: r.error, what="the first attempt's error")
        assert error.startswith(tuple(f"network: {w}" for w in words)), error
        assert "(111)" not in error and "Errno" not in error
        assert_no_secret(error)
    finally:
        if rst:
            rst.close()


def _cli(*args: str, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chat_magic.cli", *args], env=env, capture_output=True, text=True, timeout=60)


# "3s" was bad input here until the one duration rule (chat_magic.rules.seconds): a user who writes
# CHAT_MAGIC_EXIT_TIMEOUT=3s means 3 seconds, so it is accepted now (tests/test_duration_rule.py pins it)
@pytest.mark.parametrize("value", ["3x", "-1", "nan", "soon"])
def test_a_bad_exit_timeout_is_one_line_and_the_default(fast_space, value):
    env = dict(os.environ, CHAT_MAGIC_EXIT_TIMEOUT=value)
    out = _cli("send", f"exit timeout {value}", env=env)
    assert out.returncode == 0, out.stderr
    assert fast_space.texts() == [f"exit timeout {value}"]
    code = ("import chat_magic; from chat_magic import delivery; r = chat_magic.send('queued at exit'); "
            "print(delivery.settings.exit_timeout)")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "3.0", out.stderr
    said = [ln for ln in out.stderr.splitlines() if "CHAT_MAGIC_EXIT_TIMEOUT" in ln]
    assert len(said) == 1 and "is not a duration" in said[0] and f"CHAT_MAGIC_EXIT_TIMEOUT={value!r}" in said[0], out.stderr
    assert "Traceback" not in out.stderr and "ValueError" not in out.stderr
    wait_until(lambda: len(fast_space.texts()) == 2, what="the message queued before exit")


def test_outbox_list_says_when_rows_are_in_a_state_it_does_not_know(quick, replies):
    server = replies([(503, JSON, b"{}")] * 100)
    r1 = chat_magic.send("one", to=server.url())
    r2 = chat_magic.send("two", to=server.url("OTHER"))
    wait_until(lambda: r1.error and r2.error, what="both tried once")
    delivery.shutdown()
    path = outbox_path(quick)
    with sqlite3.connect(path) as db:  # what a newer chat_magic might write
        db.execute("UPDATE message SET state='parked' WHERE id=?", (r1.ids[0],))
        db.execute("UPDATE message SET state='scheduled' WHERE id=?", (r2.ids[0],))
    db.close()
    env = dict(os.environ)
    for args in (["outbox", "list"], ["outbox", "list", "--all-hosts"]):
        out = _cli(*args, env=env)
        assert out.returncode == 0, out.stderr
        said = [ln for ln in out.stderr.splitlines() if "does not know" in ln]
        assert len(said) == 1, (args, out.stderr)
        assert "2 message(s)" in said[0] and "'parked'" in said[0] and "'scheduled'" in said[0] and "newer" in said[0]


@pytest.mark.parametrize(("value", "expected"), [("soon", 30.0), ("12", 12.0), ("", 30.0), ("3s", 3.0)])  # 3s: 3 seconds
def test_the_exit_wait_for_a_completion_notice_uses_its_own_default_when_the_setting_is_bad(monkeypatch, value, expected):
    """A bad CHAT_MAGIC_EXIT_TIMEOUT falls back to the default of the wait it sets: 30 s while a completion notice waits."""
    from chat_magic import delivery

    monkeypatch.setenv("CHAT_MAGIC_EXIT_TIMEOUT", value)
    monkeypatch.setattr(delivery.settings, "_exit_timeout", None)
    assert delivery.settings.exit_timeout_or(30.0) == expected
    assert delivery.settings.exit_timeout == (expected if value == "12" else 3.0)
