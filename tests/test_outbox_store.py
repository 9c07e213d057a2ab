"""The outbox file at its edges: who may touch it, how big it gets, clock steps, drop, hostnames, slow replies.

Real parts only: real SQLite files, the emulator over real HTTP on loopback,
the real CLI in subprocesses, a loopback server of our own that drips its
reply, and simulated hosts under ``unshare --uts`` (their own hostnames,
one shared home, as pods restarted on one volume).
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from cluster_support import events_in, unshare_works
from conftest import KEY, TOKEN, assert_no_secret, wait_until

import chat_magic
from chat_magic import delivery, hosts, outbox
from chat_magic.hosts import outbox_path
from chat_magic.outbox import MERGED, PENDING, SENDING, SENT, Outbox
from chat_magic.webhook import parse_webhook_url

NO_UNSHARE = unshare_works()
needs_hosts = pytest.mark.skipif(NO_UNSHARE is not None, reason=f"simulated hosts: {NO_UNSHARE}")


def cli(*args: str, env: dict | None = None, timeout: float = 90) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chat_magic.cli", *args], env=env or dict(os.environ),
                          capture_output=True, text=True, timeout=timeout)


def text_body(text: str, thread: str | None = None) -> str:
    body: dict = {"text": text}
    if thread:
        body["thread"] = {"threadKey": thread}
    return json.dumps(body)


# -- 6. the folder and its files are the user's alone ----------------------------------------------------


PLANTS = ["world-writable -wal", "symlink at the database", "symlink at -wal", "group-writable folder", "another user's database",
          "another user's folder"]


@pytest.mark.parametrize("plant", PLANTS)
def test_a_planted_file_or_an_open_folder_is_refused_in_one_line(fast_space, outbox_home, tmp_path, capfd, plant):
    """What another local user could plant before the outbox exists: refused, a temporary outbox stands in."""
    if plant.startswith("another user's") and os.geteuid() != 0:
        pytest.skip("chown to another uid needs root")
    outbox_home.mkdir(mode=0o700)
    path = outbox_path(outbox_home)
    loot = tmp_path / "the-attacker-reads-this"  # outside the outbox folder
    wal = Path(f"{path}-wal")
    if plant == "world-writable -wal":
        wal.touch()
        os.chmod(wal, 0o666)
    elif plant == "symlink at the database":
        os.symlink(loot, path)
    elif plant == "symlink at -wal":
        loot.touch()
        os.symlink(loot, wal)
    elif plant == "group-writable folder":
        os.chmod(outbox_home, 0o770)
    elif plant == "another user's folder":
        os.chown(outbox_home, 12345, 12345)
    else:
        Outbox(path).close()
        os.chown(path, 12345, 12345)
    capfd.readouterr()

    r = chat_magic.send("a notice that must not leak")
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and err.startswith("chat_magic: "), err
    assert "unusable" in err and "temporary outbox" in err, err
    reason = {"world-writable -wal": "writable by other users", "symlink at the database": "symbolic link",
              "symlink at -wal": "symbolic link", "group-writable folder": "chmod 700",
              "another user's database": "belongs to another user", "another user's folder": "belongs to another user"}[plant]
    assert reason in err, err
    assert_no_secret(err)
    r.wait(10)
    assert fast_space.texts() == ["a notice that must not leak"]
    for planted in (loot, wal):  # nothing of ours went into a file someone else controls
        if planted.exists() and not planted.is_symlink():
            data = planted.read_bytes()
            assert KEY.encode() not in data and b"must not leak" not in data
    assert delivery.dispatcher().outbox.path.parent != outbox_home
    for planted in (wal, path):  # the attacker's files are no outbox of ours: gone, for the session-wide outbox scans
        if planted.is_symlink() or (plant != "another user's database" and planted.exists()):
            planted.unlink()


# -- 7. bounded growth ------------------------------------------------------------------------------------


def fill_with_sent(path: Path, url: str, n: int, size: int = 200) -> None:
    """``n`` delivered rows, written fast (executemany), as months of use leave them."""
    box = Outbox(path)
    box.enqueue(parse_webhook_url(url), None, [(text_body("seed"), False)])
    box.close()
    db = sqlite3.connect(path)
    dest, space = db.execute("SELECT dest, space_key FROM message").fetchone()
    now = time.time() - 86400
    db.execute("UPDATE message SET state = ?, updated_at = ?", (SENT, now))
    filler = "x" * size
    db.executemany(
        "INSERT INTO message (request_id, dest, space_key, payload, state, next_at, created_at, updated_at, name)"
        " VALUES (?,?,?,?,?,?,?,?,?)",
        ((f"cm-old-{i}", dest, space, text_body(f"old {i} {filler}"), SENT, now, now, now, f"{space}/messages/{i}")
         for i in range(n)))
    db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()


@pytest.fixture
def statements(monkeypatch):
    """Every SQL statement run on a SQLite connection opened from now on, with its thread's name."""
    seen: list[tuple[str, str]] = []
    connect = sqlite3.connect

    def traced(*args, **kwargs):
        conn = connect(*args, **kwargs)
        conn.set_trace_callback(lambda sql: seen.append((threading.current_thread().name, sql)))
        return conn

    monkeypatch.setattr(sqlite3, "connect", traced)
    return seen


@pytest.mark.slow
def test_first_send_on_a_big_outbox_checks_no_integrity_and_pruning_keeps_n(fast_space, outbox_home, statements, monkeypatch):
    """200,000 delivered rows: the first send() runs no quick_check/integrity_check; the history is cut to N."""
    monkeypatch.setenv("CHAT_MAGIC_KEEP_SENT", "50")
    path = outbox_path(outbox_home)
    fill_with_sent(path, fast_space.url, 200_000)
    statements.clear()

    r = chat_magic.send("the first notice of this process")
    caller = [sql for who, sql in statements if who == threading.current_thread().name]
    assert caller, "the trace sees the caller's statements"
    r.wait(20)
    checks = [who for who, sql in statements if "quick_check" in sql.lower() or "integrity_check" in sql.lower()]
    assert threading.current_thread().name not in checks, "no integrity scan on the caller's path"
    assert "chat_magic-delivery" in checks, "the worker checks, in the background"
    assert fast_space.texts() == ["the first notice of this process"]

    box = delivery.dispatcher().outbox
    wait_until(lambda: box.counts().get(SENT) == 50, 60, what="the delivered history cut to the newest 50")
    kept = [row.id for row in box.rows(states=[SENT])]
    assert len(kept) == 50 and max(kept) == r.ids[0], "the newest ones are kept"
    out = cli("outbox", "list", "--all")
    assert out.returncode == 0 and "50 sent" in out.stdout, out.stdout + out.stderr


def test_pruning_takes_what_a_delivered_message_carried(fast_space, outbox_home):
    box = Outbox(outbox_path(outbox_home))
    hook = parse_webhook_url(fast_space.url)
    box.enqueue(hook, "t", [(text_body(f"short {i}", "t"), True) for i in range(5)])
    job = box.claim_local(time.time(), interval=0, lease=30)
    assert job is not None and job.merged == 4
    box.ack(job, "spaces/x/messages/1", None)
    box.enqueue(hook, None, [(text_body("later"), False)])
    box.ack(box.claim_local(time.time(), interval=0, lease=30), "spaces/x/messages/2", None)
    assert box.prune_sent(1) == 0, "delivered in the last hour: kept (a receipt may still ask)"
    assert box.prune_sent(1, min_age=0) == 1
    assert box.counts() == {SENT: 1}, "the carrier and the four it carried are gone; the newest stays"


def test_the_wal_is_cut_back_once_the_burst_is_over(fast_space, outbox_home):
    """A burst of 20,000 rows grows the write-ahead log; once nothing waits, the idle worker truncates it."""
    d = delivery.dispatcher()
    box = d.outbox
    hook = parse_webhook_url(fast_space.url)
    ids = box.enqueue(hook, None, [(text_body(f"burst {i} " + "y" * 300), False) for i in range(20_000)])
    wal = Path(f"{box.path}-wal")
    assert wal.stat().st_size > 4_000_000, "the burst grew the log"
    assert box.drop(ids) == len(ids)
    d.ensure_running()
    wait_until(lambda: wal.stat().st_size < 64_000, 30, what="the log truncated once idle")


# -- 8. wall-clock steps ----------------------------------------------------------------------------------


def test_a_slot_and_a_lease_written_an_hour_ahead_do_not_stall_the_space(outbox_home, tmp_path):
    """Process A's clock ran an hour ahead, then stepped back: B's next claim proceeds within the interval."""
    url = f"http://127.0.0.1:9/v1/spaces/CLOCK/messages?key={KEY}&token={TOKEN}"
    hook = parse_webhook_url(url)
    path = outbox_path(outbox_home)
    a = Outbox(path)
    a.enqueue(hook, None, [(text_body(f"m{i}"), False) for i in range(3)])
    ahead = time.time() + 3600
    first = a.claim_local(ahead, interval=1.1, lease=35)  # slot and lease written with the clock an hour ahead
    assert first is not None
    a.ack(first, "spaces/CLOCK/messages/1", None)
    second = a.claim_local(ahead + 2, interval=1.1, lease=35)  # in flight, owner alive, lease an hour ahead
    assert second is not None

    b = Outbox(path)  # a second instance on the same file: the clock is right again
    now = time.time()
    assert b.ready_spaces(now) == {hook.space_key: 0.0}
    again = b.claim_local(now, interval=1.1, lease=35)
    assert again is not None and again.id == second.id and again.request_id == second.request_id, "taken back, same requestId"
    b.ack(again, "spaces/CLOCK/messages/2", None)
    assert b.claim_local(time.time(), interval=1.1, lease=35) is None, "the slot B took itself is honoured"
    wait_until(lambda: b.claim_local(time.time(), interval=1.1, lease=35), 5, what="the next claim within the interval")


def test_a_retry_time_an_hour_ahead_does_not_stall_the_space(outbox_home):
    url = f"http://127.0.0.1:9/v1/spaces/CLOCK/messages?key={KEY}&token={TOKEN}"
    path = outbox_path(outbox_home)
    box = Outbox(path)
    box.enqueue(parse_webhook_url(url), None, [(text_body("retry me"), False)])
    db = sqlite3.connect(path)
    db.execute("UPDATE message SET next_at = ?", (time.time() + 3600,))  # scheduled before the clock stepped back
    db.commit()
    db.close()
    assert Outbox(path).claim_local(time.time(), interval=1.1, lease=35) is not None


# -- 9. drop means drop -----------------------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.pacing  # the slot held after "warming up" is what makes the three wait, and merge, together
def test_a_message_dropped_after_it_was_merged_is_never_delivered(space, outbox_home, monkeypatch):
    """Three short messages merge into one request that fails; the user drops the password; it never arrives."""
    monkeypatch.setattr(delivery.settings, "backoff_base", 8.0)  # the retry waits 4-8 s: time to drop
    monkeypatch.setattr(delivery.settings, "backoff_cap", 8.0)
    chat_magic.send("warming up").wait(10)
    space.emu.inject("down")  # the next request is reset before the server reads its body
    first = chat_magic.send("step 1 done")
    secret = chat_magic.send("oops: password hunter2")
    last = chat_magic.send("step 2 done")
    box = delivery.dispatcher().outbox
    wait_until(lambda: [r.state for r in box.rows(secret.ids)] == [MERGED] and box.rows(first.ids)[0].state == PENDING,
               20, what="the three merged into one request that failed and waits for its retry")

    out = cli("outbox", "drop", str(secret.ids[0]))
    assert out.returncode == 0 and "1 message(s) dropped" in out.stdout, out.stdout + out.stderr
    assert "hunter2" not in box.rows(first.ids)[0].preview, "the dropped text leaves the file at once"

    first.wait(30)
    last.wait(10)
    texts = space.texts()
    assert texts == ["warming up", "step 1 done\n\nstep 2 done"], texts
    assert all("hunter2" not in json.dumps(r.get("body") or "") for r in space.requests())
    assert secret.status == "failed" and "dropped" in (secret.error or "")


def test_dropping_a_waiting_carrier_keeps_what_it_carried(outbox_home):
    url = f"http://127.0.0.1:9/v1/spaces/DROP/messages?key={KEY}&token={TOKEN}"
    box = Outbox(outbox_path(outbox_home))
    ids = box.enqueue(parse_webhook_url(url), "t", [(text_body(f"part {i}", "t"), True) for i in range(3)])
    job = box.claim_local(time.time(), interval=0, lease=30)
    assert job is not None and job.merged == 2
    box.retry_later(job, 0, code=503, status="UNAVAILABLE", error="503")
    assert box.drop([ids[0]]) == 1
    again = box.claim_local(time.time(), interval=0, lease=30)
    assert again is not None and again.id == ids[1] and json.loads(again.payload)["text"] == "part 1\n\npart 2"


# -- 14. a reply dripped past the lease -------------------------------------------------------------------


class DripServer(ThreadingHTTPServer):
    """Answers every POST with a valid message, one byte of padding every ``step`` seconds for ``seconds``."""

    daemon_threads = True

    def __init__(self, seconds: float, step: float = 0.2) -> None:
        self.posts: list[str] = []
        self.seconds, self.step = seconds, step

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # request lines carry key and token
                pass

            def do_POST(self):  # noqa: N802
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                self.server.posts.append(self.path.rpartition("requestId=")[2])  # not the key and token
                body = json.dumps({"name": "spaces/DRIP/messages/m1", "thread": {"name": "spaces/DRIP/threads/t1"}}).encode()
                pad = int(self.server.seconds / self.server.step)
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body) + pad))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()
                for _ in range(pad):
                    time.sleep(self.server.step)
                    self.wfile.write(b" ")
                    self.wfile.flush()

        super().__init__(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.serve_forever, daemon=True).start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/v1/spaces/DRIP/messages?key={KEY}&token={TOKEN}"


@pytest.mark.slow
def test_a_reply_dripped_past_the_lease_is_posted_once(outbox_home, monkeypatch):
    """A short lease, a reply dripped for 14 s, and a second real process flushing meanwhile: one POST.

    The lease is 1 s here (``lease_seconds``); a chat_magic without that
    setting gets 11.5 s from the short timeouts, still well under the reply.
    """
    server = DripServer(seconds=14.0)
    try:
        monkeypatch.setattr(delivery.settings, "connect_timeout", 0.5)
        monkeypatch.setattr(delivery.settings, "read_timeout", 1.0)  # each dripped byte comes within it
        monkeypatch.setattr(delivery.settings, "lease_seconds", 1.0, raising=False)
        r = chat_magic.send("a reply that takes its time", to=server.url)
        wait_until(lambda: server.posts, 10, what="the first POST")
        drop = cli("outbox", "drop", str(r.ids[0]))  # too late: it is on its way, and the user is told so
        assert drop.returncode == 1 and "being sent right now" in drop.stderr and drop.stderr.count("\n") == 1, drop.stderr
        other = subprocess.Popen([sys.executable, "-m", "chat_magic.cli", "outbox", "flush", "--timeout", "30"],
                                 env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        out, err = other.communicate(timeout=60)
        assert other.returncode == 0, out + err
        r.wait(30)
        assert len(server.posts) == 1, f"{len(server.posts)} POSTs of one message"
        assert_no_secret(out, err)
    finally:
        server.shutdown()
        server.server_close()


# -- 10. hosts: a restarted container takes over what the previous one left --------------------------------


LIVE_HOST = textwrap.dedent("""
    import json, sys
    from chat_magic import config, hosts
    from chat_magic.outbox import Outbox
    from chat_magic.webhook import parse_webhook_url
    box = Outbox(hosts.outbox_path(config.home()))
    box.enqueue(parse_webhook_url(sys.argv[1]), None, [(json.dumps({"text": "pod-c is still running"}), False)])
    print("ready", flush=True)
    sys.stdin.read()  # alive (its outbox open) until the test closes stdin
""")


def as_host(name: str, *argv: str, env: dict, **kwargs) -> subprocess.Popen:
    cmd = ["unshare", "--uts", "sh", "-c", 'hostname "$1" && shift && exec "$@"', "sh", name, sys.executable, *argv]
    return subprocess.Popen(cmd, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kwargs)


@needs_hosts
def test_a_new_hostname_delivers_what_the_previous_one_left_first_and_leaves_a_live_host_alone(space, outbox_home):
    env = dict(os.environ, CHAT_MAGIC_EXIT_TIMEOUT="0")
    env.pop("CHAT_MAGIC_HOST_ID", None)
    # pod-a queues three messages while the space is unreachable, then its container is gone
    space.emu.set_down(True)
    try:
        queue = "import chat_magic\n" + "".join(f"chat_magic.send('pod-a {i}', thread_key='T')\n" for i in range(3))
        a = as_host("pod-a", "-c", queue, env=env)
        out, err = a.communicate(timeout=60)
        assert a.returncode == 0, err
    finally:
        space.emu.set_down(False)
    assert outbox.unfinished(outbox_path(outbox_home, "pod-a")) >= 1  # perhaps merged into one
    # pod-c is alive on another node, its outbox open with a message waiting
    c = as_host("pod-c", "-c", LIVE_HOST, space.url, env=env, stdin=subprocess.PIPE)
    try:
        assert c.stdout.readline().strip() == "ready"
        # the restarted container comes up as pod-b and posts into the same thread
        b = as_host("pod-b", "-m", "chat_magic.cli", "send", "pod-b after the restart", "--thread", "T", env=env)
        out, err = b.communicate(timeout=90)
        assert b.returncode == 0, out + err
        assert events_in(space.messages()) == ["pod-a 0", "pod-a 1", "pod-a 2", "pod-b after the restart"]
        assert outbox.unfinished(outbox_path(outbox_home, "pod-a")) == 0
        assert "left in outbox-pod-a.sqlite3" in err and err.count("\n") == 1, err
        assert outbox.unfinished(outbox_path(outbox_home, "pod-c")) == 1, "a live host's file is left alone"
        assert "pod-c" not in " ".join(space.texts())
    finally:
        c.communicate(timeout=30)  # pod-c ends
    # now no process uses pod-c's file: the next process here delivers it
    out = as_host("pod-b", "-m", "chat_magic.cli", "outbox", "flush", "--timeout", "30", env=env)
    stdout, stderr = out.communicate(timeout=90)
    assert out.returncode == 0, stdout + stderr
    assert space.texts()[-1] == "pod-c is still running"
    assert_no_secret(stdout, stderr)


@needs_hosts
def test_chat_magic_host_id_names_the_file_whatever_the_hostname(outbox_home):
    env = dict(os.environ, CHAT_MAGIC_HOST_ID="node-7")
    for name in ("pod-x1", "pod-x2"):
        p = as_host(name, "-m", "chat_magic.cli", "outbox", "path", env=env)
        out, err = p.communicate(timeout=60)
        assert out.strip() == str(outbox_home / "outbox-node-7.sqlite3"), err


def test_sending_rows_of_a_gone_host_come_back_pending_with_their_request_id(outbox_home):
    """A takeover moves waiting, in-flight and failed rows, keeps requestIds and merged carriers, in order."""
    url = f"http://127.0.0.1:9/v1/spaces/MOVE/messages?key={KEY}&token={TOKEN}"
    hook = parse_webhook_url(url)
    gone = Outbox(outbox_path(outbox_home, "gone-pod"))
    gone.enqueue(hook, "t", [(text_body(f"part {i}", "t"), True) for i in range(3)])
    job = gone.claim_local(time.time() - 100, interval=0, lease=30)  # claimed long ago: the lease ran out
    gone.enqueue(hook, None, [(text_body("after"), False)])
    gone.close()
    db = sqlite3.connect(outbox_path(outbox_home, "gone-pod"))
    db.execute("UPDATE message SET lease_until = ? WHERE state = ?", (time.time() - 60, SENDING))
    db.commit()
    db.close()

    mine = Outbox(outbox_path(outbox_home))
    assert mine.take_over(outbox_path(outbox_home, "gone-pod")) == 4
    assert mine.take_over(outbox_path(outbox_home, "gone-pod")) == 0
    again = mine.claim_local(time.time(), interval=0, lease=30)
    assert again is not None and again.request_id == job.request_id and json.loads(again.payload)["text"] == "part 0\n\npart 1\n\npart 2"
    assert [r.state for r in mine.rows()] == [SENDING, MERGED, MERGED, PENDING]


def test_setting_a_host_id_keeps_what_the_hostname_file_held(fast_space, outbox_home, monkeypatch):
    """Messages queued under the hostname's file are delivered, first, once CHAT_MAGIC_HOST_ID names another."""
    old = Outbox(outbox_path(outbox_home, hosts.current_host()))
    old.enqueue(parse_webhook_url(fast_space.url), "T", [(text_body("queued before the id was set", "T"), False)])
    old.close()
    monkeypatch.setenv("CHAT_MAGIC_HOST_ID", "node-7")
    r = chat_magic.send("sent with the id", thread_key="T")
    assert delivery.dispatcher().outbox.path == outbox_home / "outbox-node-7.sqlite3"
    r.wait(10)
    assert chat_magic.flush(10)
    assert fast_space.texts() == ["queued before the id was set", "sent with the id"]
