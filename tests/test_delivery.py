"""Delivery against the emulator over real HTTP: threads, pacing, merging, faults, limits, secrets."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import stat
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import KEY, TOKEN, assert_no_secret, wait_until

import chat_magic
from chat_magic import delivery
from chat_magic.errors import DeliveryFailed, DeliveryTimeout, MessageError, NoDestinationError, WebhookURLError
from chat_magic.hosts import outbox_path
from chat_magic.message import MAX_TEXT

pytestmark = pytest.mark.usefixtures("fast_backoff")  # retries within a second: same behaviour, quicker


def test_send_returns_at_once_and_wait_gives_names(space):
    r = chat_magic.send("hello *team*", thread_key="t-1")
    result = r.wait(10)
    assert result.name.startswith(f"spaces/{space.name}/messages/")
    assert result.thread_name.startswith(f"spaces/{space.name}/threads/")
    (m,) = space.messages()
    assert m["text"] == "hello *team*"
    assert m["name"] == result.name
    assert r.status == "sent"
    assert_no_secret(repr(r), r.destination)


def test_a_thread_of_messages_lands_in_one_thread(space):
    names = set()
    for i in range(3):
        names.add(chat_magic.send(f"step {i}", thread_key="session-abc").wait(10).thread_name)
    assert len(names) == 1
    threads = space.emu.threads(space=space.name)
    assert len(threads) == 1
    (msgs,) = threads.values()
    assert [m["text"] for m in msgs] == ["step 0", "step 1", "step 2"]
    for r in space.requests():
        assert r["query"].get("messageReplyOption") == "REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD"
        assert r["query"].get("requestId", "").startswith("cm-")


@pytest.mark.pacing
def test_burst_of_20_is_paced_merged_and_in_order(space):
    t0 = time.monotonic()
    receipts = [chat_magic.send(f"event {i:02d}", thread_key="burst") for i in range(20)]
    caller = time.monotonic() - t0
    assert chat_magic.flush(30)
    assert all(r.status == "sent" for r in receipts)
    reqs = space.requests()
    assert [r["status"] for r in reqs].count(429) == 0, "pacing must not provoke quota errors"
    assert len(reqs) <= 4, f"20 short events should be merged, made {len(reqs)} requests"
    text = "\n\n".join(space.texts())
    assert [int(line.split()[1]) for line in text.split("\n\n")] == list(range(20))
    assert caller < 5  # generous: the caller only queues (the benchmark measures it)


@pytest.mark.pacing
def test_two_spaces_are_paced_independently(emulator, outbox_home, monkeypatch):
    a = emulator.webhook_url(space="PACEA" + os.urandom(3).hex(), key=KEY, token=TOKEN)
    b = emulator.webhook_url(space="PACEB" + os.urandom(3).hex(), key=KEY, token=TOKEN)
    ra = [chat_magic.send(f"a{i}", to=a, thread_key="x") for i in range(3)]
    rb = [chat_magic.send(f"b{i}", to=b, thread_key="x") for i in range(3)]
    for r in ra + rb:
        r.wait(15)
    assert all(r["status"] == 200 for r in emulator.requests if "/PACE" in r["path"] and (a.split("/")[5] in r["path"] or b.split("/")[5] in r["path"]))


@pytest.mark.parametrize("fault", ["503", "500", "502", "504", "429", "reset", "lost_reply"])
def test_transient_faults_deliver_exactly_once(space, fault):
    space.emu.inject(fault, count=2)
    r = chat_magic.send(f"survives {fault}", thread_key="f")
    r.wait(20)
    texts = space.texts()
    assert texts.count(f"survives {fault}") == 1, texts
    assert r.status == "sent"
    request_ids = {q["query"].get("requestId") for q in space.requests()}
    assert len(request_ids) == 1, "every retry reuses the requestId"


def test_retry_after_header_is_honoured(space):
    assert delivery._retry_after(type("R", (), {"headers": {"Retry-After": "2"}})()) == 2.0
    assert delivery.backoff(1, retry_after=2.0) >= 2.0
    assert delivery.backoff(30) <= delivery.settings.backoff_cap


def test_stalled_server_times_out_and_retries(space, monkeypatch):
    monkeypatch.setattr(delivery.settings, "read_timeout", 0.5)
    space.emu.inject("stall", count=1, seconds=1.5)
    r = chat_magic.send("after a stall", thread_key="s")
    r.wait(20)
    assert space.texts().count("after a stall") == 1


def test_many_faults_nothing_lost_nothing_duplicated(space):
    space.emu.inject("503", count=3)
    space.emu.inject("lost_reply", count=2)
    space.emu.inject("reset", count=2)
    receipts = []
    for i in range(12):
        receipts.append(chat_magic.send(f"item {i}", thread_key="many"))
        time.sleep(0.05)
    assert chat_magic.flush(60)
    items = [line for t in space.texts() for line in t.split("\n\n")]
    assert items == [f"item {i}" for i in range(12)]


@pytest.mark.parametrize("emu_kwargs, expect", [
    ({"token": "some-other-token"}, "permission denied"),
    ({"key": "some-other-key"}, "key is not valid"),
])
def test_final_4xx_is_kept_failed_with_one_clear_line(emulator, outbox_home, monkeypatch, debug_logs, emu_kwargs, expect):
    url = emulator.webhook_url(space="FINAL" + os.urandom(3).hex(), key=emu_kwargs.get("key", KEY), token=emu_kwargs.get("token", TOKEN))
    # the emulator knows KEY/TOKEN: the other value is wrong
    r = chat_magic.send("never arrives", to=url)
    with pytest.raises(DeliveryFailed) as e:
        r.wait(10)
    assert expect in str(e.value)
    assert "\n" not in str(e.value)
    assert e.value.code in (400, 403)
    assert r.status == "failed"
    assert len([q for q in emulator.requests if q["path"].endswith(url.split("?")[0].split("127.0.0.1")[1].split("/", 1)[1])]) == 1, "no retry of a final error"
    row = delivery.dispatcher().outbox.rows(r.ids)[0]
    assert row.state == "failed" and expect in row.error
    assert_no_secret(str(e.value), row.error, debug_logs.text, "some-other-token", "some-other-key")
    assert "some-other-token" not in debug_logs.text and "some-other-key" not in debug_logs.text


def test_long_text_is_split_complete_and_in_order(space):
    lines = [f"{i:05d} " + "abcdefghij" * 3 for i in range(1000)]
    text = "```\n" + "\n".join(lines) + "\n```"
    r = chat_magic.send(text, thread_key="long")
    assert len(r.ids) >= 9
    r.wait(30)
    msgs = space.messages()
    assert all(len(m["text"]) <= MAX_TEXT for m in msgs)
    assert all(m["text"].count("```") % 2 == 0 for m in msgs)
    got = [ln for m in msgs for ln in m["text"].splitlines() if ln and ln != "```"]
    assert got == lines
    assert len({m["thread"]["name"] for m in msgs}) == 1


def test_truncate_sends_one_message_with_a_note(space):
    chat_magic.send("x" * 9000, truncate=True).wait(10)
    (m,) = space.messages()
    assert len(m["text"]) <= MAX_TEXT and "characters cut" in m["text"]


def test_cards_are_sent_and_never_merged(space):
    from chat_magic.report import Report

    kw = Report("job", status="ok", duration=3.2, output="done", details={"Host": "h"}).payload_kwargs()
    rs = [chat_magic.send(thread_key="c", **kw) for _ in range(2)] + [chat_magic.send("plain", thread_key="c")]
    for r in rs:
        r.wait(15)
    msgs = space.messages()
    assert len(msgs) == 3
    assert [bool(m.get("cardsV2")) for m in msgs] == [True, True, False]


def test_bad_input_is_refused_before_queueing(outbox_home, monkeypatch):
    with pytest.raises(NoDestinationError) as e:
        chat_magic.send("x")
    assert "GOOGLE_CHAT_WEBHOOK_URL" in str(e.value) and "\n" not in str(e.value)
    monkeypatch.setenv("GOOGLE_CHAT_WEBHOOK_URL", "https://example.com/v1/spaces/S/messages?key=SECRETK&token=SECRETT")
    with pytest.raises(WebhookURLError) as e:
        chat_magic.send("x")
    assert "GOOGLE_CHAT_WEBHOOK_URL" in str(e.value) and "SECRETK" not in str(e.value)
    monkeypatch.setenv("GOOGLE_CHAT_WEBHOOK_URL", "http://127.0.0.1:9/v1/spaces/S/messages?key=k&token=t")
    with pytest.raises(MessageError):
        chat_magic.send("   ")
    assert delivery.dispatcher().outbox.counts() == {}, "nothing half-queued"


def test_named_destinations_from_the_config_file(space, tmp_path, monkeypatch):
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[spaces.ml-team]\nwebhook_url = "{space.url}"\n')
    cfg.chmod(0o600)
    monkeypatch.setenv("CHAT_MAGIC_CONFIG", str(cfg))
    monkeypatch.delenv("GOOGLE_CHAT_WEBHOOK_URL")
    chat_magic.send("to a named space", to="ml-team").wait(10)
    assert space.texts() == ["to a named space"]
    with pytest.raises(NoDestinationError, match="unknown space 'nope'.*ml-team"):
        chat_magic.send("x", to="nope")


def test_bad_toml_names_file_and_line(outbox_home, tmp_path, monkeypatch):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[spaces.a]\nwebhook_url = "https://chat.googleapis.com/v1/spaces/A/messages?key=SECRETK&token=SECRETT\n')
    cfg.chmod(0o600)
    monkeypatch.setenv("CHAT_MAGIC_CONFIG", str(cfg))
    with pytest.raises(chat_magic.ConfigError) as e:
        chat_magic.send("x", to="a")
    assert str(cfg) in str(e.value) and "line 2" in str(e.value)
    assert "SECRET" not in str(e.value)


def test_world_readable_config_warns(space, tmp_path, monkeypatch):
    cfg = tmp_path / "open.toml"
    cfg.write_text(f'[spaces.t]\nwebhook_url = "{space.url}"\n')
    cfg.chmod(0o644)
    monkeypatch.setenv("CHAT_MAGIC_CONFIG", str(cfg))
    with pytest.warns(UserWarning, match="chmod 600"):
        chat_magic.send("x", to="t")


def test_outbox_file_is_private(space):
    chat_magic.send("x").wait(10)
    path = delivery.dispatcher().outbox.path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) & 0o077 == 0


def test_corrupted_outbox_is_moved_aside_and_replaced(space, outbox_home, capfd):
    outbox_home.mkdir(parents=True, exist_ok=True)
    path = outbox_path(outbox_home)
    path.write_bytes(b"this is not a database" * 100)
    r = chat_magic.send("still delivered")
    err = capfd.readouterr().err
    assert "moved aside" in err and err.count("\n") == 1, err
    assert delivery.dispatcher().outbox.path == path, "the configured outbox, made anew"
    assert [p.name.startswith(path.name + ".corrupt-") for p in outbox_home.iterdir()].count(True) == 1
    r.wait(10)
    assert space.texts() == ["still delivered"]


def test_secrets_never_in_logs_or_errors(space, debug_logs):
    space.emu.inject("503", count=1)
    space.emu.inject("reset", count=1)
    chat_magic.send("debug me", thread_key="dbg").wait(20)
    # a connection refused error (requests puts the URL in its message)
    url = f"http://127.0.0.1:1/v1/spaces/S/messages?key={KEY}&token={TOKEN}"
    r = chat_magic.send("nobody listens", to=url)
    with pytest.raises(DeliveryTimeout) as e:
        r.wait(1.5)
    assert "connection" in str(e.value)
    assert debug_logs.records, "logging at DEBUG captured something"
    assert_no_secret(debug_logs.text, str(e.value), repr(r), r.error)
    for rec in debug_logs.records:
        assert_no_secret(rec.getMessage())


SENDER = textwrap.dedent("""
    import sys, time, chat_magic
    from chat_magic import delivery
    delivery.settings.exit_timeout = 0
    n = int(sys.argv[1])
    for i in range(n):
        chat_magic.send(f"killed-run {i}", thread_key="kill")
    print("queued", flush=True)
    time.sleep(60)
""")


def test_sigkill_mid_delivery_then_flush_from_a_new_process(space, outbox_home):
    space.emu.latency = 0.3
    try:
        env = dict(os.environ)
        p = subprocess.Popen([sys.executable, "-c", SENDER, "30"], env=env, stdout=subprocess.PIPE, text=True)
        assert p.stdout.readline().strip() == "queued"
        time.sleep(0.4)  # mid-delivery: the first request is in flight
        p.send_signal(signal.SIGKILL)
        p.wait(10)
        out = subprocess.run([sys.executable, "-m", "chat_magic.cli", "outbox", "flush", "--timeout", "40"],
                             env=env, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert_no_secret(out.stdout, out.stderr)
    finally:
        space.emu.latency = 0.0
    items = [line for t in space.texts() for line in t.split("\n\n")]
    assert items == [f"killed-run {i}" for i in range(30)], "everything, once, in order"


@pytest.mark.slow
@pytest.mark.pacing
def test_two_processes_share_the_quota(space, outbox_home):
    code = textwrap.dedent("""
        import sys, chat_magic
        for i in range(4):
            chat_magic.send(f"{sys.argv[1]}-{i}", thread_key=sys.argv[1]).wait(30)
    """)
    ps = [subprocess.Popen([sys.executable, "-c", code, tag], env=dict(os.environ)) for tag in ("p1", "p2")]
    for p in ps:
        assert p.wait(90) == 0
    statuses = [r["status"] for r in space.requests()]
    assert 429 not in statuses, statuses
    assert sorted(space.texts()) == sorted([f"p{j}-{i}" for j in (1, 2) for i in range(4)])


def test_pending_messages_survive_the_process_and_exit_gives_a_last_chance(space, outbox_home):
    code = "import chat_magic; chat_magic.send('sent at exit', thread_key='exit')"
    subprocess.run([sys.executable, "-c", code], env=dict(os.environ), check=True, timeout=30)
    assert space.texts() == ["sent at exit"]


def test_outbox_down_then_up(space):
    space.emu.set_down(True)
    try:
        rs = [chat_magic.send(f"outage {i}", thread_key="o") for i in range(5)]
        wait_until(lambda: rs[0].error, 20, what="the first attempt to meet the outage")
        assert all(r.status == "pending" for r in rs)
        assert "connection" in rs[0].error
    finally:
        space.emu.set_down(False)
    assert chat_magic.flush(30)
    items = [line for t in space.texts() for line in t.split("\n\n")]
    assert items == [f"outage {i}" for i in range(5)]


def test_outbox_rows_keep_the_reason_redacted(space, outbox_home):
    url = f"http://127.0.0.1:1/v1/spaces/S/messages?key={KEY}&token={TOKEN}"
    chat_magic.send("x", to=url)
    db = sqlite3.connect(delivery.dispatcher().outbox.path)
    errors = wait_until(lambda: [r[0] for r in db.execute("SELECT error FROM message") if r[0]], 20, what="the refused attempt's reason in the outbox")
    assert_no_secret(*errors)
    assert_no_secret(json.dumps([list(r) for r in db.execute("SELECT state, error, payload FROM message")]))


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_sends_through_its_own_worker(space):
    chat_magic.send("from the parent", thread_key="fork").wait(10)
    pid = os.fork()
    if pid == 0:  # the child: what a multiprocessing worker (fork start method) does
        code = 1
        try:
            chat_magic.send("from the child", thread_key="fork").wait(15)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    chat_magic.send("parent again", thread_key="fork").wait(15)
    items = [line for t in space.texts() for line in t.split("\n\n")]
    assert items == ["from the parent", "from the child", "parent again"]
