"""Hardening: faults, bad input, limits, a broken or busy outbox, broken config.

Goes further than test_delivery.py, always over real HTTP on loopback:

- faults: a space whose quota another client eats, a 429 storm, ``Retry-After``
  (a scripted loopback server: the emulator sends none), a stall longer than
  the read timeout, an outage with events posted during it, a server restart,
  ``kill -9`` after a lost reply or mid-request, three processes at once;
- bad input: every kind of malformed webhook URL through the API and the CLI,
  final replies (400, 403, 404, 413, redirects), 50 MB outputs, undecodable
  and binary output, ANSI codes, fences and mentions in output, empty messages;
- the outbox corrupted, replaced by a folder, or locked by another process;
- config files that are not TOML, not UTF-8 or not shaped right.

Nothing lost, nothing duplicated, one line per mistake, never a secret.
The long soak is ``benchmarks/run.py``.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor
from email.utils import formatdate
from pathlib import Path

import pytest
import requests
from conftest import KEY, TOKEN, assert_no_secret, validate_message
from helpers_outbox import OLD_MESSAGE_TABLE, queued_by_another_process

import chat_magic
from chat_magic import delivery
from chat_magic.emulator import Emulator
from chat_magic.errors import ConfigError, DeliveryFailed, MessageError, OutboxError
from chat_magic.hosts import outbox_path
from chat_magic.message import FENCE, MAX_PARTS, MAX_TEXT, ZWSP, code_block, split_text
from chat_magic.outbox import Outbox
from chat_magic.report import Report

pytestmark = [pytest.mark.timeout(120), pytest.mark.usefixtures("fast_backoff")]


def items(messages: list[dict]) -> list[str]:
    """Every event in ``messages``, merged messages split on their blank lines."""
    return [part for m in messages for part in (m.get("text") or "").split("\n\n") if part]


def wait_until(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def one_line(text: str) -> None:
    assert text and "\n" not in text.strip(), f"not one line: {text!r}"
    assert "Traceback" not in text


def cli(*args: str, env: dict, stdin: str | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chat_magic.cli", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=timeout)


def _json(code: int, status: str, message: str) -> str:
    return json.dumps({"error": {"code": code, "message": message, "status": status}})


# --------------------------------------------------------------------------- faults


@pytest.mark.slow
@pytest.mark.pacing
def test_another_client_eating_the_quota_loses_nothing(space):
    """A foreign bot posts to the same space every 0.7 s: chat_magic meets real 429s and still delivers all, in order, once."""
    stop = threading.Event()
    foreign: list[int] = []

    def bot():
        for _ in range(6):
            if stop.wait(0.7):
                return
            foreign.append(requests.post(space.url, json={"text": "bot"}, timeout=5).status_code)

    assert requests.post(space.url, json={"text": "bot"}, timeout=5).status_code == 200  # the bot has the slot now
    t = threading.Thread(target=bot)
    t.start()
    try:
        receipts = []
        for i in range(6):
            receipts.append(chat_magic.send(f"crowded {i}", thread_key="crowded"))
            time.sleep(0.3)
        assert chat_magic.flush(60)
    finally:
        stop.set()
        t.join()
    ours = [m for m in space.messages() if m.get("thread", {}).get("threadKey") == "crowded"]
    assert items(ours) == [f"crowded {i}" for i in range(6)]
    assert all(r.status == "sent" for r in receipts)
    ours_429 = [r for r in space.requests() if r["status"] == 429 and "crowded" in r["body"]]
    assert ours_429, "the quota was contended (else this test proves nothing)"


@pytest.mark.slow
@pytest.mark.pacing
def test_429_storm_is_paced_and_delivered_once(space):
    space.emu.inject("429", count=3)
    receipts = [chat_magic.send(f"storm {i}", thread_key="storm") for i in range(3)]
    assert chat_magic.flush(40)
    assert items(space.messages()) == [f"storm {i}" for i in range(3)]
    assert all(r.status == "sent" for r in receipts)
    reqs = space.requests()
    assert [r["status"] for r in reqs].count(429) == 3
    assert len(reqs) <= 3 + 3, "one request per attempt, nothing more"
    times = [r["time"] for r in reqs]
    gaps = [b - a for a, b in zip(times, times[1:])]
    # never hammering: every attempt waits for the space's pacing slot (1.1 s)
    assert min(gaps) > 0.9, gaps
    assert len({r["query"]["requestId"] for r in reqs if "storm 0" in r["body"]}) == 1


@pytest.mark.parametrize("form", ["seconds", "http-date"])
def test_retry_after_is_honoured_over_real_http(outbox_home, replies, form):
    """The emulator sends no Retry-After (neither does Google, as far as reported); a scripted server does."""
    value = "2" if form == "seconds" else formatdate(time.time() + 3.5, usegmt=True)  # whole seconds: 2.5-3.5 s ahead
    stub = replies([(429, {"Retry-After": value, "Content-Type": "application/json"}, _json(429, "RESOURCE_EXHAUSTED", "quota"))])
    r = chat_magic.send("after retry-after", to=stub.url())
    r.wait(20)
    (t1, _, body1), (t2, _, body2) = stub.hits
    assert body1 == body2
    # without Retry-After the retry would come after the 1.1 s pacing slot
    assert t2 - t1 >= 1.9, f"retried after {t2 - t1:.2f} s despite Retry-After: {value}"


def test_stall_longer_than_the_read_timeout_creates_no_duplicate(space, monkeypatch):
    monkeypatch.setattr(delivery.settings, "read_timeout", 0.5)
    space.emu.inject("stall", count=1, seconds=3)
    t0 = time.monotonic()
    receipts = [chat_magic.send(f"stalled {i}", thread_key="stall") for i in range(3)]
    assert time.monotonic() - t0 < 2, "send never waits for a stalled server"
    assert chat_magic.flush(30)
    # the stalled request is answered late; its replay is recognised by requestId
    wait_until(lambda: any(r["outcome"] == "duplicate" for r in space.requests()), 10, "the stalled request to finish")
    assert items(space.messages()) == [f"stalled {i}" for i in range(3)]
    assert all(r.status == "sent" for r in receipts)


def test_short_outage_with_events_posted_during_it(space):
    space.emu.set_down(True)
    caller = []
    try:
        for i in range(8):
            t0 = time.monotonic()
            chat_magic.send(f"during outage {i:02d}", thread_key="outage")
            caller.append(time.monotonic() - t0)
            time.sleep(0.25)
        card = Report("job during the outage", status="failed", error="OSError: disk full").payload_kwargs()
        chat_magic.send(thread_key="outage", **card)
    finally:
        space.emu.set_down(False)
    assert max(caller) < 1.0, "send does not wait for a server that is down"
    assert any(r["outcome"] == "down" for r in space.requests()), "the worker did meet the outage"
    assert chat_magic.flush(40)
    msgs = space.messages()
    assert items([m for m in msgs if not m.get("cardsV2")]) == [f"during outage {i:02d}" for i in range(8)]
    assert [bool(m.get("cardsV2")) for m in msgs][-1] is True
    assert sum(1 for m in msgs if m.get("cardsV2")) == 1


def test_server_restart_connection_refused_then_delivered(outbox_home, monkeypatch):
    emu = Emulator(key=KEY, token=TOKEN, qps=1.0).start()
    try:
        monkeypatch.setenv("GOOGLE_CHAT_WEBHOOK_URL", emu.webhook_url(space="RESTART"))
        chat_magic.send("before", thread_key="r").wait(10)
        emu.stop()
        receipts = [chat_magic.send(f"while stopped {i}", thread_key="r") for i in range(3)]
        wait_until(lambda: receipts[0].error is not None, 10, "a failed attempt")
        assert "connection" in receipts[0].error and receipts[0].status == "pending"
        assert_no_secret(receipts[0].error)
        emu.start()  # same port
        assert chat_magic.flush(30)
        assert items(emu.messages()) == ["before"] + [f"while stopped {i}" for i in range(3)]
        for r in emu.requests:
            if r["status"] == 200:
                validate_message(r["body"])
    finally:
        emu.stop()


KILLED_SENDER = textwrap.dedent("""
    import sys, time, chat_magic
    from chat_magic import delivery
    delivery.settings.exit_timeout = 0
    delivery.settings.backoff_base = delivery.settings.backoff_cap = 3.0
    for i in range(5):
        chat_magic.send(f"kill-{i}", thread_key="kill")
    print("queued", flush=True)
    time.sleep(60)
""")


def _rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5)
    try:
        db.row_factory = sqlite3.Row
        return [dict(r) for r in db.execute("SELECT id, state, attempts, error FROM message")]
    except sqlite3.OperationalError:
        return []
    finally:
        db.close()


@pytest.mark.parametrize("moment", ["after_lost_reply", "mid_request"])
def test_kill_9_then_a_new_process_delivers_each_once(space, outbox_home, monkeypatch, moment):
    """The space has the message but the sender died before knowing: the next process's retry carries the same requestId.

    ``mid_request``: the kill waits for the emulator to have read the request (a row marked
    ``sending`` is not yet a request on the wire: a kill in between leaves the space nothing
    to deduplicate), and the emulator holds its answer for 3 s (the kill lands before it).
    """
    box = outbox_path(outbox_home)
    env = dict(os.environ)
    arrived = threading.Event()
    if moment == "after_lost_reply":
        space.emu.inject("lost_reply", count=1)
    else:
        space.emu.latency = 3.0
        from chat_magic.emulator import server

        read_body = server._Handler._read_body

        def seen(handler):  # observes the real emulator: the request's body has been read, nothing else changes
            body = read_body(handler)
            if body and b"kill-0" in body:
                arrived.set()
            return body

        monkeypatch.setattr(server._Handler, "_read_body", seen)
    try:
        p = subprocess.Popen([sys.executable, "-c", KILLED_SENDER], env=env, stdout=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "queued"
            if moment == "after_lost_reply":
                # the space stored it, the reply was lost, a retry is scheduled
                wait_until(lambda: any(r["state"] == "pending" and r["attempts"] >= 1 and r["error"] for r in _rows(box)), 20, "the lost reply")
                assert len(space.messages()) == 1
            else:
                assert arrived.wait(20), "the first request to reach the emulator"  # which answers 3 s later
        finally:
            p.send_signal(signal.SIGKILL)
            p.wait(10)
    finally:
        space.emu.latency = 0.0
    out = cli("outbox", "flush", "--timeout", "40", env=env)
    assert out.returncode == 0, out.stderr
    assert_no_secret(out.stdout, out.stderr)
    wait_until(lambda: any(r["outcome"] == "duplicate" for r in space.requests()), 10, "the replay to be suppressed")
    assert items(space.messages()) == [f"kill-{i}" for i in range(5)], "everything, once, in order"


@pytest.mark.slow
@pytest.mark.pacing
def test_three_processes_at_once_share_pacing(space, outbox_home):
    code = textwrap.dedent("""
        import sys, chat_magic
        tag = sys.argv[1]
        for i in range(5):
            chat_magic.send(f"{tag}-{i}", thread_key=tag)
        sys.exit(0 if chat_magic.flush(90) else 1)
    """)
    space.emu.inject("503", count=1)
    ps = [subprocess.Popen([sys.executable, "-c", code, tag], env=dict(os.environ), stderr=subprocess.PIPE, text=True)
          for tag in ("p1", "p2", "p3")]
    for p in ps:
        assert p.wait(120) == 0, p.stderr.read()
        assert_no_secret(p.stderr.read())
    statuses = [r["status"] for r in space.requests()]
    assert 429 not in statuses, f"the processes share one pacing slot per space: {statuses}"
    by_thread: dict[str, list[dict]] = {}
    for m in space.messages():
        by_thread.setdefault(m["thread"]["threadKey"], []).append(m)
    assert {k: items(v) for k, v in by_thread.items()} == {t: [f"{t}-{i}" for i in range(5)] for t in ("p1", "p2", "p3")}


# --------------------------------------------------------------------------- malformed webhook URLs

H = "chat.googleapis.com"
P = "/v1/spaces/AAAA/messages"
Q = f"key={KEY}&token={TOKEN}"
BAD_URLS = {
    "empty": "",
    "blank": "  \t ",
    "no scheme": f"{H}{P}?{Q}",
    "one slash": f"https:/{H}{P}?{Q}",
    "ftp": f"ftp://{H}{P}?{Q}",
    "another host": f"https://chat.example.com{P}?{Q}",
    "look-alike host": f"https://{H}.evil.example{P}?{Q}",
    "plain http": f"http://{H}{P}?{Q}",
    "user and password": f"https://user:pw@{H}{P}?{Q}",
    "bad port": f"https://{H}:99999{P}?{Q}",
    "broken IPv6": f"https://[::1{P}?{Q}",
    "wrong path": f"https://{H}/v1/spaces/AAAA?{Q}",
    "slash in the space": f"https://{H}/v1/spaces/AA%2FA/messages?{Q}",
    "empty space": f"https://{H}/v1/spaces//messages?{Q}",
    "no key": f"https://{H}{P}?token={TOKEN}",
    "no token": f"https://{H}{P}?key={KEY}",
    "empty key": f"https://{H}{P}?key=&token={TOKEN}",
    "HTML-escaped &": f"https://{H}{P}?key={KEY}&amp;token={TOKEN}",
    "key twice": f"https://{H}{P}?key={KEY}&key={KEY}2&token={TOKEN}",
    "percent-encoded query": f"https://{H}{P}%3Fkey%3D{KEY}%26token%3D{TOKEN}",
    "two URLs pasted": f"https://{H}{P}?{Q}\nhttps://{H}/v1/spaces/BBBB/messages?{Q}",
    "space inside the key": f"https://{H}{P}?key={KEY} {KEY}&token={TOKEN}",
    "in quotes": f'"https://{H}{P}?{Q}"',
    "in angle brackets": f"<https://{H}{P}?{Q}>",
    "a Markdown link": f"[hook](https://{H}{P}?{Q})",
}


@pytest.mark.parametrize("name", list(BAD_URLS))
def test_malformed_url_through_the_api_is_one_secret_free_line(outbox_home, monkeypatch, name):
    url = BAD_URLS[name]
    with pytest.raises(ConfigError) as by_arg:
        chat_magic.send("x", to=url)
    monkeypatch.setenv("GOOGLE_CHAT_WEBHOOK_URL", url)
    with pytest.raises(ConfigError) as by_env:
        chat_magic.send("x")
    for e in (by_arg, by_env):
        one_line(str(e.value))
        assert_no_secret(str(e.value), repr(e.value))
    assert delivery.dispatcher().outbox.counts() == {}, "nothing half-queued"


@pytest.mark.slow
def test_malformed_url_through_the_cli_is_exit_2_and_one_line(outbox_home, tmp_path):
    base = dict(os.environ, CHAT_MAGIC_CONFIG=str(tmp_path / "none.toml"))
    base.pop("GOOGLE_CHAT_WEBHOOK_URL", None)
    runs = [("env", name, dict(base, GOOGLE_CHAT_WEBHOOK_URL=url), ["send", "hello"]) for name, url in BAD_URLS.items()]
    runs += [("--to", name, base, ["send", "hello", "--to", url]) for name, url in BAD_URLS.items()]
    with ThreadPoolExecutor(max_workers=6) as pool:
        results = list(pool.map(lambda r: (r, cli(*r[3], env=r[2])), runs))
    for (how, name, _, _), out in results:
        where = f"{how} {name}: {out.stderr!r}"
        assert out.returncode == 2, where
        assert out.stdout == "", where
        assert out.stderr.startswith("chat-magic: ") and out.stderr.count("\n") == 1, where
        assert "Traceback" not in out.stderr, where
        assert_no_secret(out.stdout, out.stderr)
    assert not outbox_path(outbox_home).exists() or not _rows(outbox_path(outbox_home))


# --------------------------------------------------------------------------- final replies


def test_refused_messages_fail_alone_and_the_queue_goes_on(space, emulator, debug_logs):
    wrong_token = emulator.webhook_url(space=space.name, key=KEY, token=TOKEN + "x")
    wrong_key = emulator.webhook_url(space=space.name, key=KEY + "x", token=TOKEN)
    r_token = chat_magic.send("bad token", to=wrong_token, thread_key="q")
    r_key = chat_magic.send("bad key", to=wrong_key, thread_key="q")
    r_good = chat_magic.send("good", thread_key="q")
    r_good.wait(20)
    for r, code, words in ((r_token, 403, "permission denied"), (r_key, 400, "key is not valid")):
        with pytest.raises(DeliveryFailed) as e:
            r.wait(10)
        assert e.value.code == code and words in str(e.value)
        one_line(str(e.value))
        assert r.status == "failed" and r.error == str(e.value)
        assert_no_secret(str(e.value), repr(r), r.error)
    assert space.texts() == ["good"]
    assert [q["status"] for q in space.requests()].count(200) == 1
    assert_no_secret(debug_logs.text)


FINAL_REPLIES = [
    (404, {"Content-Type": "application/json"}, _json(404, "NOT_FOUND", "Requested entity was not found."), "not found"),
    (413, {"Content-Type": "text/html"}, "<html><body>Request Entity Too Large</body></html>", "too large"),
    (400, {"Content-Type": "text/html"}, "<html><body>Bad Request</body></html>", "refused"),
]


def test_other_final_replies_fail_once_without_retry(outbox_home, replies, debug_logs):
    """The emulator 404s only paths chat_magic refuses to post to, so scripted servers play the deleted webhook & co.

    (A redirect is retried, not final: tests/test_http_edges.py.)
    """
    stubs = [replies([(status, headers, body)]) for status, headers, body, _ in FINAL_REPLIES]
    receipts = [chat_magic.send("to a gone webhook", to=stub.url()) for stub in stubs]
    for (status, _, _, words), r in zip(FINAL_REPLIES, receipts):
        with pytest.raises(DeliveryFailed) as e:
            r.wait(10)
        assert e.value.code == status and words in str(e.value), (status, str(e.value))
        one_line(str(e.value))
        assert_no_secret(str(e.value), r.error)
    # final after one attempt: nothing is left pending, so the worker has no retry to make, ever
    assert [r.status for r in receipts] == ["failed"] * len(stubs)
    assert delivery.dispatcher().outbox.unfinished_ids() == []
    assert [len(stub.hits) for stub in stubs] == [1] * len(stubs), "a final reply is not retried (and a redirect is not followed)"
    assert_no_secret(debug_logs.text)


# --------------------------------------------------------------------------- big, binary and hostile output

BIG_LINE = "0123456789 abcdefghij " * 3 + "\n"


def _big() -> str:
    return BIG_LINE * (50_000_000 // len(BIG_LINE))


def test_50_mb_output_truncated_in_bounded_memory(space):
    big = _big()
    tracemalloc.start()
    try:
        r = chat_magic.send(big, truncate=True)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(big), f"send(truncate=True) of {len(big):,} characters peaked at {peak:,} bytes"
    assert len(r.ids) == 1
    r.wait(15)
    (m,) = space.messages()
    assert len(m["text"]) <= MAX_TEXT
    assert m["text"].startswith(BIG_LINE * 3)
    assert m["text"].rstrip().endswith("characters cut]")


def test_50_mb_output_is_refused_clearly_and_splitting_stays_linear(space):
    big = _big()
    tracemalloc.start()
    try:
        with pytest.raises(MessageError) as e:
            chat_magic.send(big, thread_key="huge")  # 12,000 messages would hold the thread for hours
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    one_line(str(e.value))
    assert "truncate=True" in str(e.value) and f"{len(big):,}" in str(e.value)
    assert peak < 3 * len(big), f"refusing {len(big):,} characters peaked at {peak:,} bytes"
    assert delivery.dispatcher().outbox.counts() == {}, "nothing half-queued"
    t0 = time.monotonic()
    parts = split_text(big)
    assert time.monotonic() - t0 < 60, "splitting is linear (it was quadratic: minutes)"
    assert len(parts) >= len(big) // MAX_TEXT and "".join(parts) == big
    # the largest text send() accepts is split and delivered in order
    most = big[: MAX_PARTS * (MAX_TEXT - 200)]  # parts end at line ends: not all 4,096 full
    r = chat_magic.send(most, thread_key="huge")
    assert len(r.ids) <= MAX_PARTS
    first = space.wait_for(1)[0]
    assert len(first["text"]) <= MAX_TEXT and first["text"].startswith(BIG_LINE)


def test_big_report_output_stays_within_limits(space):
    big = _big()[:10_000_000]
    tracemalloc.start()
    try:
        rep = Report("huge job", status="ok", output=big, traceback=big[:5_000_000])
        text, kwargs = rep.text(), rep.payload_kwargs()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 3 * len(big)
    assert len(text) <= MAX_TEXT and "characters" in text and "cut" in text
    chat_magic.send(text, thread_key="rep").wait(15)
    chat_magic.send(thread_key="rep", **kwargs).wait(15)
    assert len(space.messages()) == 2


def test_undecodable_and_binary_output_is_delivered_and_the_worker_lives_on(space):
    raw = b"ok \xff\xfe bad bytes \x00\x01\x02 half a euro \xe2\x82 end"
    texts = [
        raw.decode("utf-8", "replace"),
        raw.decode("utf-8", "surrogateescape"),  # lone surrogates: UTF-8 cannot carry them
        "lone \udcff and \ud800 surrogates",
    ]
    worker = None
    receipts = []
    for t in texts:
        receipts.append(chat_magic.send(t, thread_key="bin"))
        worker = worker or delivery.dispatcher()._thread
    rep = Report("binary job", status="failed", output=raw.decode("utf-8", "surrogateescape"), error="UnicodeDecodeError: \udcff")
    receipts.append(chat_magic.send(rep.text(), thread_key="bin"))
    receipts.append(chat_magic.send(thread_key="bin", **rep.payload_kwargs()))
    receipts.append(chat_magic.send("odd thread key", thread_key="bin-\udcff"))
    assert chat_magic.flush(30)
    assert [r.status for r in receipts] == ["sent"] * len(receipts), [r.error for r in receipts]
    assert worker is not None and worker.is_alive() and delivery.dispatcher()._thread is worker, "the worker never died"
    joined = json.dumps(space.messages(), ensure_ascii=False)
    assert "\ufffd" in joined and "lone" in joined and "odd thread key" in joined
    chat_magic.send("after the binary", thread_key="bin").wait(10)


NASTY = (
    "\x1b[31mred\x1b[0m \x1b[1;32mbold green\x1b[0m\x1b[2K\r progress 100%\n"
    "```\nfenced by the program\n```\n"
    "<users/all> wake up <users/123456789> <https://evil.example|click me> ``` ```` `` `\n"
    "\x1b]8;;https://evil.example\x07hyperlink\x1b]8;;\x07 tail"
)


def _inert(text: str) -> None:
    from chat_magic.chatsyntax import render

    assert "\x1b" not in text
    assert "<users/all>" not in text and "<users/123456789>" not in text and "<https://evil" not in text
    shown = render(text)  # as Chat would show it
    assert "cm-mention" not in shown and 'href="https://evil' not in shown


def test_ansi_fences_and_mentions_in_output_stay_inert(space):
    block = code_block(NASTY)
    _inert(block)
    assert block.startswith(FENCE + "\n") and block.endswith("\n" + FENCE) and block.count(FENCE) == 2
    assert "wake up" in block and "hyperlink" in block and ZWSP in block

    rep = Report("nasty", status="failed", output=NASTY, error="ValueError: <users/all> ``` boom", traceback="Traceback\n  ```\n<users/all>\n")
    text = rep.text()
    _inert(text)
    assert text.count(FENCE) == 4, "two code blocks, nothing else opens or closes one"
    card = json.dumps(rep.card(), ensure_ascii=False)
    assert "\x1b" not in card and "<users/all>" not in card

    loud = Report("loud", status="ok", mention="all")
    assert loud.text().count("<users/all>") == 1, "only an explicit mention pings"

    for kwargs in ({"text": block}, {"text": text}, rep.payload_kwargs()):
        chat_magic.send(thread_key="nasty", **kwargs)
    assert chat_magic.flush(30)
    for m in space.messages():
        if m.get("text"):
            _inert(m["text"])


@pytest.mark.parametrize("kwargs", [{"text": ""}, {"text": "   \n\t "}, {"text": None}, {"text": None, "cards": []}, {"text": "\n\n"}])
def test_empty_messages_are_refused_in_one_line(outbox_home, monkeypatch, kwargs):
    monkeypatch.setenv("GOOGLE_CHAT_WEBHOOK_URL", f"http://127.0.0.1:9/v1/spaces/E/messages?key={KEY}&token={TOKEN}")
    with pytest.raises(MessageError) as e:
        chat_magic.send(**kwargs)
    one_line(str(e.value))
    assert "empty" in str(e.value)
    assert delivery.dispatcher().outbox.counts() == {}


def test_empty_messages_through_the_cli_exit_2(outbox_home):
    env = dict(os.environ, GOOGLE_CHAT_WEBHOOK_URL=f"http://127.0.0.1:9/v1/spaces/E/messages?key={KEY}&token={TOKEN}")
    for args, stdin in ((["send", ""], None), (["send", "  "], None), (["send", "-"], ""), (["send", "-"], "\n\n")):
        out = cli(*args, env=env, stdin=stdin)
        assert out.returncode == 2 and "empty" in out.stderr, (args, out.stderr)
        assert out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
        assert_no_secret(out.stdout, out.stderr)


# --------------------------------------------------------------------------- the outbox


@pytest.mark.parametrize("damage", ["truncated database", "a folder in its place"])
def test_unusable_outbox_is_replaced_or_stood_in_for_and_says_so(space, outbox_home, capfd, damage):
    outbox_home.mkdir(parents=True, exist_ok=True)
    path = outbox_path(outbox_home)
    if damage == "a folder in its place":
        path.mkdir()
    else:
        Outbox(path).close()
        data = path.read_bytes()
        path.write_bytes(data[:100] + b"\x00garbage" * 64)
    capfd.readouterr()
    r = chat_magic.send("still delivered")
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("chat_magic: "), err  # one visible line, not only a log record
    if damage == "a folder in its place":
        assert "unusable" in err and "CHAT_MAGIC_HOME" in err and "temporary outbox" in err
    else:
        assert "damaged" in err and "moved aside" in err
        assert delivery.dispatcher().outbox.path == path, "a new outbox where it belongs, not a temporary one"
    r.wait(10)
    assert space.texts() == ["still delivered"]


def test_cli_send_with_a_damaged_outbox_says_so_and_delivers(space, outbox_home):
    outbox_home.mkdir(parents=True, exist_ok=True)
    outbox_path(outbox_home).write_bytes(b"not a database at all " * 50)
    out = cli("send", "from the CLI", env=dict(os.environ))
    assert out.returncode == 0, out.stderr
    assert space.texts() == ["from the CLI"]
    assert "Traceback" not in out.stderr
    assert_no_secret(out.stdout, out.stderr)
    # the user must hear that the configured outbox was broken, and where it went
    assert "moved aside" in out.stderr and "corrupt-" in out.stderr and out.stderr.count("\n") == 1, out.stderr


LOCKER = textwrap.dedent("""
    import sqlite3, sys, time
    db = sqlite3.connect(sys.argv[1], isolation_level=None, timeout=10)
    db.execute("BEGIN EXCLUSIVE")
    print("locked", flush=True)
    time.sleep(float(sys.argv[2]))
    db.execute("COMMIT")
""")


def _lock(path: Path, seconds: float) -> subprocess.Popen:
    p = subprocess.Popen([sys.executable, "-c", LOCKER, str(path), str(seconds)], stdout=subprocess.PIPE, text=True)
    assert p.stdout.readline().strip() == "locked"
    return p


def test_outbox_locked_for_a_moment_send_waits_then_succeeds(space, outbox_home):
    chat_magic.send("before the lock", thread_key="lock").wait(10)
    worker = delivery.dispatcher()._thread
    locker = _lock(delivery.dispatcher().outbox.path, 1.0)
    try:
        t0 = time.monotonic()
        r = chat_magic.send("during the lock", thread_key="lock")
        waited = time.monotonic() - t0
    finally:
        assert locker.wait(30) == 0
    assert waited < delivery.dispatcher().outbox.caller_timeout + 0.5, "a caller never waits past its short busy timeout"
    r.wait(15)
    assert items(space.messages()) == ["before the lock", "during the lock"]
    assert delivery.dispatcher()._thread is worker and worker.is_alive()


def test_outbox_locked_past_the_busy_timeout_is_one_clear_error(space, outbox_home):
    from chat_magic import config

    path = outbox_path(config.home())
    d = delivery.Dispatcher(Outbox(path, busy_timeout=0.5, caller_timeout=0.5))  # the defaults would make this test slow
    delivery._dispatchers[str(path)] = d
    assert delivery.dispatcher() is d
    chat_magic.send("queued before", thread_key="lock").wait(10)
    worker = d._thread
    locker = _lock(path, 3.0)
    try:
        with pytest.raises(OutboxError) as e:
            chat_magic.send("refused while locked", thread_key="lock")
    finally:
        assert locker.wait(30) == 0
    one_line(str(e.value))
    assert str(path) in str(e.value) and "locked" in str(e.value)
    assert_no_secret(str(e.value))
    chat_magic.send("after the lock", thread_key="lock").wait(15)
    assert items(space.messages()) == ["queued before", "after the lock"]
    assert d._thread is worker and worker.is_alive(), "the worker survived the busy database"


# --------------------------------------------------------------------------- config files


def _config_cases(tmp_path: Path) -> dict[str, tuple[Path, str]]:
    """name -> (config file, a word the error must contain)."""
    url = f"https://chat.googleapis.com/v1/spaces/AAAA/messages?key={KEY}&token={TOKEN}"
    cases = {
        "unterminated string": (f'[spaces.team]\nwebhook_url = "{url}\n', "line 2"),
        "not TOML at all": (f"webhook: {url}\n", "line 1"),
        "duplicate table": (f'[spaces.team]\nwebhook_url = "{url}"\n[spaces.team]\nwebhook_url = "{url}"\n', "line 3"),
        "spaces is not a table": (f'spaces = "{url}"\n', "[spaces]"),
        "space without a URL": ("[spaces.team]\nurl = 1\n", "no webhook_url"),
        "malformed URL in the file": (f'[spaces.team]\nwebhook_url = "{url.replace("/messages", "")}"\n', "[spaces.team]"),
        "not UTF-8": (b'[spaces.team]\nwebhook_url = "\xff\xfe"\n', "cannot read"),
    }
    out = {}
    for name, (content, word) in cases.items():
        f = tmp_path / (name.replace(" ", "-") + ".toml")
        f.write_bytes(content if isinstance(content, bytes) else content.encode())
        f.chmod(0o600)
        out[name] = (f, word)
    folder = tmp_path / "a-folder.toml"
    folder.mkdir()
    out["a folder"] = (folder, "cannot read")
    return out


def test_broken_config_files_are_one_line_naming_the_file(outbox_home, tmp_path, monkeypatch):
    for name, (path, word) in _config_cases(tmp_path).items():
        monkeypatch.setenv("CHAT_MAGIC_CONFIG", str(path))
        with pytest.raises(ConfigError) as e:
            chat_magic.send("x", to="team")
        msg = str(e.value)
        one_line(msg)
        assert word in msg, f"{name}: {msg}"
        assert str(path) in msg or "[spaces.team]" in msg, f"{name}: {msg}"
        assert_no_secret(msg)
    assert delivery.dispatcher().outbox.counts() == {}


def test_broken_config_files_through_the_cli(outbox_home, tmp_path):
    base = dict(os.environ)
    base.pop("GOOGLE_CHAT_WEBHOOK_URL", None)
    cases = _config_cases(tmp_path)
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = list(pool.map(lambda c: (c, cli("send", "x", "--to", "team", env=dict(base, CHAT_MAGIC_CONFIG=str(c[1][0])))), cases.items()))
    for (name, (_path, word)), out in results:
        assert out.returncode == 2, (name, out.stderr)
        assert out.stderr.count("\n") == 1 and word in out.stderr and "Traceback" not in out.stderr, (name, out.stderr)
        assert_no_secret(out.stdout, out.stderr)


# --------------------------------------------------------------------------- the edges (issue 10)
#
# Each test below is a real reproduction: a locked, damaged or read-only outbox file, a full
# filesystem (a real tmpfs), a server that never answers, a zombie process.


def _mount(target: Path, *args: str) -> None:
    out = subprocess.run(["mount", *args, str(target)], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.skip(f"cannot mount a filesystem here (needs root): {out.stderr.strip()}")


class Disk:
    """A real, small filesystem (tmpfs) that can be filled up and freed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.filler = path / "filler"

    def fill(self) -> None:
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            for size in (65536, 4096, 512, 1):
                try:
                    while True:
                        os.write(fd, b"\0" * size)
                except OSError as e:
                    assert e.errno == 28, e  # ENOSPC: the disk is full
        finally:
            os.close(fd)

    def free(self) -> None:
        self.filler.unlink(missing_ok=True)


@pytest.fixture
def small_disk(tmp_path, monkeypatch):
    """CHAT_MAGIC_HOME on a real 4 MB tmpfs."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    _mount(mnt, "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs")
    monkeypatch.setenv("CHAT_MAGIC_HOME", str(mnt / "home"))
    try:
        yield Disk(mnt)
    finally:
        delivery.shutdown()
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _states(ids) -> list[str]:
    return [r.state for r in delivery.dispatcher().outbox.resolve(ids)]


def _card_titles(messages: list[dict]) -> list[str]:
    return [m["cardsV2"][0]["card"]["header"]["title"] for m in messages if m.get("cardsV2")]


@pytest.mark.parametrize("fault", ["lock", "disk full"])
def test_notices_are_kept_in_memory_while_the_outbox_cannot_be_written(space, ip, capfd, tmp_path, monkeypatch, fault):
    """%%chat and notify_when_done on an outbox locked past the caller's 2 s, or on a full disk: one line, nothing lost."""
    if fault == "disk full":
        mnt = tmp_path / "disk"
        mnt.mkdir()
        _mount(mnt, "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs")
        monkeypatch.setenv("CHAT_MAGIC_HOME", str(mnt / "home"))
        disk = Disk(mnt)
    try:
        chat_magic.send("before", thread_key="edge").wait(10)
        capfd.readouterr()
        if fault == "lock":
            locker = _lock(delivery.dispatcher().outbox.path, 5.0)
        else:
            disk.fill()
        try:
            handler = signal.getsignal(signal.SIGTERM)
            ip.run_cell("%%chat --title kept-cell\nprint('cell output')")
            with chat_magic.notify_when_done("kept-block"):
                pass
            # no block could be armed: the program's SIGTERM handler is back (chat_magic's stayed installed for good)
            assert signal.getsignal(signal.SIGTERM) is handler
            err = capfd.readouterr().err
            lines = [ln for ln in err.splitlines() if ln.startswith("chat_magic:")]
            assert len(lines) == 1 and "kept in memory" in lines[0], err
            assert "Traceback" not in err
            assert_no_secret(err)
        finally:
            if fault == "lock":
                assert locker.wait(30) == 0
            else:
                disk.free()
        wait_until(lambda: len(_card_titles(space.messages())) >= 2, 30, "both notices after the outbox works again")
        assert chat_magic.flush(30)
        titles = _card_titles(space.messages())
        assert [t.split(" ", 1)[1].split()[0] for t in titles] == ["kept-cell", "kept-block"], titles
    finally:
        if fault == "disk full":
            delivery.shutdown()
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_disk_full_after_the_answer_does_not_leave_a_delivered_message_sending(space, small_disk):
    """The space answers 200 while the disk is full: the outcome is recorded as soon as there is room again."""
    chat_magic.send("warm", thread_key="full").wait(10)
    box = delivery.dispatcher().outbox.path
    space.emu.latency = 1.5
    try:
        r = chat_magic.send("answered while the disk is full", thread_key="full")
        wait_until(lambda: any(x["state"] == "sending" for x in _rows(box)), 10, "the request in flight")
        small_disk.fill()
        space.wait_for(2, timeout=10)
        wait_until(lambda: any(q.get("status") == 200 and "disk is full" in q.get("body", "") for q in space.requests()),
                   10, "the answer")
    finally:
        space.emu.latency = 0.0
    assert _states(r.ids) == ["sending"], "nothing could be written yet"
    small_disk.free()
    wait_until(lambda: r.status == "sent", 10, "the delivery to be recorded (it was stuck as sending until the lease ran out)")
    assert items(space.messages()) == ["warm", "answered while the disk is full"]
    assert sum(1 for q in space.requests() if "answered while" in q.get("body", "")) == 1, "not sent twice"


def test_caller_on_a_full_disk_gets_one_line_outbox_error(space, small_disk):
    chat_magic.send("warm").wait(10)
    small_disk.fill()
    try:
        with pytest.raises(OutboxError) as e:
            chat_magic.send("no room")
    finally:
        small_disk.free()
    one_line(str(e.value))
    assert "full" in str(e.value) and str(delivery.dispatcher().outbox.path) in str(e.value)
    assert isinstance(e.value, chat_magic.ChatMagicError)


def _checkpoint(path: Path) -> None:
    db = sqlite3.connect(path, timeout=10)
    try:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        db.close()


def _damage_pages_holding(path: Path, markers: list[str], page: int = 4096) -> bytes:
    """Write garbage over the pages that hold these markers; return what those pages held."""
    data = path.read_bytes()
    pages = {data.index(m.encode()) // page for m in markers}
    assert 0 not in pages
    with open(path, "r+b") as f:
        for p in pages:
            f.seek(p * page)
            f.write(os.urandom(page))
    return b"".join(data[p * page:(p + 1) * page] for p in pages)


def _damage_and_read(box: Path, receipts: list, capfd) -> tuple[list[str], str, set[int]]:
    """Garbage over the pages of messages 7 and 13; the receipts' statuses read, and what was said meanwhile."""
    _checkpoint(box)
    gone = _damage_pages_holding(box, [f"waiting {i:02d} " for i in (7, 13)])
    lost = {i for i in range(20) if f"waiting {i:02d} ".encode() in gone}
    db = sqlite3.connect(box, timeout=10)  # another process writes: every connection drops its cached pages
    db.execute("UPDATE pacing SET next_slot = next_slot")
    db.commit()
    db.close()
    capfd.readouterr()
    statuses = [r.status for r in receipts]  # was: a raw sqlite3.DatabaseError
    return statuses, capfd.readouterr().err, lost


def test_damaged_outbox_is_moved_aside_and_readable_rows_salvaged(space, outbox_home, capfd, monkeypatch):
    """Garbage over a checkpointed outbox holding 20 waiting messages, while the process uses it."""
    monkeypatch.setattr(delivery.settings, "backoff_base", 300.0)
    monkeypatch.setattr(delivery.settings, "backoff_cap", 300.0)
    filler = "·" * 600
    space.emu.set_down(True)  # down until the statuses are read: a retry at once (a reset connection) stays failed
    try:
        receipts = [chat_magic.send(f"waiting {i:02d} {filler}", thread_key=f"t{i:02d}") for i in range(20)]
        wait_until(lambda: receipts[0].error is not None, 10, "a first, failed attempt")
        statuses, err, lost = _damage_and_read(box := delivery.dispatcher().outbox.path, receipts, capfd)
    finally:
        space.emu.set_down(False)
    assert "moved aside" in err and "salvaged" in err and err.count("\n") == 1, err
    aside = [p for p in outbox_home.iterdir() if p.name.startswith(outbox_path(outbox_home).name + ".corrupt-") and not p.name.endswith("-wal")]
    assert len(aside) == 1
    assert 7 in lost and 13 in lost and len(lost) <= 6
    for i, (r, s) in enumerate(zip(receipts, statuses)):
        assert s == ("failed" if i in lost else "pending"), (i, s, lost, statuses, err)
        if i in lost:
            assert "no longer in the outbox" in r.error
            with pytest.raises(DeliveryFailed, match="no longer in the outbox"):
                r.wait(1)
    monkeypatch.setattr(delivery.settings, "backoff_base", 0.2)
    monkeypatch.setattr(delivery.settings, "backoff_cap", 0.8)
    assert chat_magic.flush(60)
    got = [m["text"].split(" ")[1] for m in space.messages()]
    assert got == [f"{i:02d}" for i in range(20) if i not in lost], "every readable message, once, in order"
    assert f"{20 - len(lost)} message(s) salvaged" in err


@pytest.mark.slow
def test_damaged_outbox_found_by_the_next_process(space, outbox_home):
    """A CLI flush opens a damaged file: moved aside, salvaged, delivered, said on stderr; no raw DatabaseError."""
    queued_by_another_process(space, 12, pad=600)
    box = outbox_path(outbox_home)
    _checkpoint(box)
    _damage_pages_holding(box, ["queued 05 "])
    out = cli("outbox", "flush", "--timeout", "40", env=dict(os.environ))
    assert "Traceback" not in out.stderr and "DatabaseError" not in out.stderr, out.stderr
    assert "moved aside" in out.stderr and "salvaged" in out.stderr
    assert out.returncode == 0, out.stderr
    got = [m["text"].split(" ")[1] for m in space.messages()]
    assert "05" not in got and len(got) >= 9 and got == sorted(got)


def test_temporary_outbox_is_loud_and_flush_reports_what_waits_in_the_real_one(space, outbox_home, tmp_path, capfd):
    """The configured outbox holds 3 waiting messages but sits on a read-only filesystem."""
    queued_by_another_process(space, 3, pad=600)
    _checkpoint(outbox_path(outbox_home))
    _mount(outbox_home, "--bind", str(outbox_home))
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(outbox_home)], check=True)
        capfd.readouterr()
        r = chat_magic.send("through a temporary outbox")
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and "unusable" in err and "temporary outbox" in err, err
        r.wait(10)
        assert not chat_magic.flush(5), "3 older messages still wait in the real outbox"
        err = capfd.readouterr().err
        assert "3 message(s) still wait in the outbox" in err and err.count("\n") == 1, err
        out = cli("outbox", "flush", "--timeout", "5", env=dict(os.environ))
        assert out.returncode == 1, out.stderr
        assert "3 message(s) still wait" in out.stderr and "temporary outbox" in out.stderr
        assert_no_secret(out.stdout, out.stderr, err)
    finally:
        delivery.shutdown()
        subprocess.run(["umount", "-l", str(outbox_home)], capture_output=True)


def test_wait_after_outbox_drop_is_a_clear_error(outbox_home, monkeypatch):
    monkeypatch.setenv("GOOGLE_CHAT_WEBHOOK_URL", f"http://127.0.0.1:1/v1/spaces/D/messages?key={KEY}&token={TOKEN}")
    monkeypatch.setattr(delivery.settings, "backoff_base", 300.0)
    monkeypatch.setattr(delivery.settings, "backoff_cap", 300.0)
    r = chat_magic.send("to be dropped")
    wait_until(lambda: r.error is not None, 10, "a failed attempt")
    out = cli("outbox", "drop", str(r.ids[0]), env=dict(os.environ))
    assert out.returncode == 0 and "1 message(s) dropped" in out.stdout, out.stderr
    with pytest.raises(DeliveryFailed) as e:
        r.wait(5)  # was: IndexError
    one_line(str(e.value))
    assert "dropped" in str(e.value)
    assert r.status == "failed"


class BlackHole:
    """A server that accepts connections and never answers: a hung webhook."""

    def __init__(self) -> None:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.port = self.sock.getsockname()[1]

    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1/spaces/HUNG/messages?key={KEY}&token={TOKEN}"

    def close(self) -> None:
        self.sock.close()


@pytest.mark.slow
@pytest.mark.pacing
def test_a_hung_space_does_not_delay_the_others(space, outbox_home):
    hole = BlackHole()
    try:
        hung = chat_magic.send("into the void", to=hole.url())
        wait_until(lambda: _states(hung.ids) == ["sending"], 10, "the hung request in flight")
        t0 = time.monotonic()
        kw = Report("healthy job", status="ok", duration=1.0, output="fine").payload_kwargs()
        receipts = [chat_magic.send(thread_key="healthy", **kw) for _ in range(3)]
        receipts.append(chat_magic.send("healthy text", thread_key="healthy"))
        for r in receipts:
            r.wait(15)  # was: held back by the read timeout (20 s) of the hung request
        took = time.monotonic() - t0
        assert _states(hung.ids) == ["sending"], "the hung request was still in flight all along"
        assert took < 10, f"the healthy space waited {took:.1f} s"
        reqs = space.requests()
        times = [q["time"] for q in reqs]
        assert min(b - a for a, b in zip(times, times[1:])) > 0.9, "still paced: 1 request/s per space"
        assert len({q["query"]["requestId"] for q in reqs}) == len(reqs) == 4
        assert [bool(m.get("cardsV2")) for m in space.messages()] == [True, True, True, False]
    finally:
        hole.close()


def test_two_spellings_of_one_webhook_keep_the_thread_in_order(space, outbox_home, emulator):
    base = emulator.webhook_url(space=space.name, key=KEY, token=TOKEN).split("?")[0]
    spellings = [f"{base}?key={KEY}&token={TOKEN}", f"{base}?token={TOKEN}&key={KEY}", f"{base}?%6Bey={KEY}&%74oken={TOKEN}"]
    space.emu.set_down(True)  # everything waits together: the merge decides the order
    try:
        receipts = [chat_magic.send(f"step {i}", to=spellings[i % 3], thread_key="spelled") for i in range(9)]
        wait_until(lambda: receipts[0].error is not None, 10, "a failed attempt")
    finally:
        space.emu.set_down(False)
    assert chat_magic.flush(30)
    assert items(space.messages()) == [f"step {i}" for i in range(9)]
    assert len(space.emu.threads(space=space.name)) == 1


def test_a_text_over_32000_bytes_with_a_long_thread_key_is_split_by_bytes(space):
    key = "🧵" * 4000  # 4,000 characters, 16,000 bytes
    text = "😀" * 4096
    r = chat_magic.send(text, thread_key=key)
    r.wait(20)  # was: 400 "Message is too large"
    msgs = space.messages()
    assert len(msgs) >= 2 and "".join(items(msgs)) == text  # parts that fit together may be merged
    for q in space.requests():
        assert q["status"] == 200 and len(q["body"].encode()) <= 32_000


def test_a_big_card_in_a_long_thread_key_session_fits_and_leaves_no_orphan_header(space):
    from chat_magic.session import Session

    sess = Session(thread_key="🧵" * 4000)
    rep = Report("long key job", status="failed", error="ValueError: x", output="o" * 40_000, traceback="r" * 40_000,
                 details={f"detail {i}": "v" * 900 for i in range(30)})
    r = sess.send(**rep.payload_kwargs())  # was: MessageError after the header had been queued
    r.wait(20)
    msgs = space.messages()
    assert len(msgs) == 2 and not msgs[0].get("cardsV2") and msgs[1].get("cardsV2")
    assert all(q["status"] == 200 and len(q["body"].encode()) <= 32_000 for q in space.requests())


def test_a_message_that_cannot_fit_queues_no_header(space):
    from chat_magic.session import Session

    sess = Session(thread_key="🧵" * 4000)
    card = {"cardId": "c", "card": {"sections": [{"widgets": [{"textParagraph": {"text": "x" * 40_000}}]}]}}
    with pytest.raises(MessageError):
        sess.send(cards=[card])
    assert delivery.dispatcher().outbox.counts() == {}, "no orphan header"


ZOMBIE_SENDER = textwrap.dedent("""
    import sys, time, chat_magic
    from chat_magic import delivery
    delivery.settings.exit_timeout = 0
    chat_magic.send("from the zombie", thread_key="z")
    print("queued", flush=True)
    time.sleep(60)
""")


def test_a_zombie_sender_is_recognised_at_once(space, outbox_home):
    """Killed, not yet reaped: kill(pid, 0) still succeeds. Its space must not wait out the 35 s lease."""
    box = outbox_path(outbox_home)
    space.emu.latency = 3.0
    try:
        p = subprocess.Popen([sys.executable, "-c", ZOMBIE_SENDER], env=dict(os.environ), stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "queued"
        wait_until(lambda: any(r["state"] == "sending" for r in _rows(box)), 20, "a request in flight")
        os.kill(p.pid, signal.SIGKILL)
        wait_until(lambda: Path(f"/proc/{p.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z", 10, "a zombie")
    finally:
        space.emu.latency = 0.0
    try:
        t0 = time.monotonic()
        assert chat_magic.flush(20)
        assert time.monotonic() - t0 < 15, "taken back at once, not after the lease"
        assert items(space.messages()) == ["from the zombie"]
    finally:
        p.wait(10)


OLD_SCHEMA = OLD_MESSAGE_TABLE + "CREATE TABLE pacing (space_key TEXT PRIMARY KEY, next_slot REAL NOT NULL);\n"


def test_an_outbox_of_the_older_format_is_carried_over(space, outbox_home, capfd):
    """An outbox written before destinations were stored once (the URL on every row): nothing waiting is lost."""
    outbox_home.mkdir(parents=True, exist_ok=True)
    db = sqlite3.connect(outbox_path(outbox_home))
    db.executescript(OLD_SCHEMA)
    now = time.time()
    for i in range(3):
        body = json.dumps({"text": f"old {i}", "thread": {"threadKey": "old"}})
        db.execute("INSERT INTO message (request_id, url, space_key, thread_key, payload, mergeable, state, next_at, created_at, updated_at)"
                   " VALUES (?,?,?,?,?,1,'pending',?,?,?)", (f"cm-old{i}", space.url, "x", "old", body, now, now, now))
    db.commit()
    db.close()
    assert chat_magic.flush(20)
    assert items(space.messages()) == ["old 0", "old 1", "old 2"]
    err = capfd.readouterr().err
    assert "older format" in err and "3 message(s) salvaged" in err and err.count("\n") == 1, err
    assert {q["query"]["requestId"] for q in space.requests()} == {"cm-old0"}, "the same requestIds (merged into the first)"
