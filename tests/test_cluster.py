"""On a cluster: per-host outbox files in one shared home, one space's quota shared through Redis.

Real parts only: the emulator enforcing the 1 request/s quota over HTTP on
loopback (``emulator``/``space`` from conftest), Debian's ``redis-server``
on a free loopback port (``redis_server``), and simulated hosts, each a
process under ``unshare --uts`` with its own hostname, all sharing one
``CHAT_MAGIC_HOME`` as nodes share an NFS home.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from cluster_support import (
    events_in,
    expected_events,
    host_env,
    running_redis,
    start_host,
    tally,
    unshare_works,
)
from conftest import assert_no_secret

import chat_magic
from chat_magic import delivery, hosts, outbox, pacing
from chat_magic.outbox import SENT, Outbox
from chat_magic.webhook import parse_webhook_url

pytestmark = pytest.mark.pacing  # the quota shared by hosts: the emulator enforces it, each process paces as users' do
NO_UNSHARE = unshare_works()
needs_hosts = pytest.mark.skipif(NO_UNSHARE is not None, reason=f"simulated hosts: {NO_UNSHARE}")
DOWN_LINE = "does not answer"


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory):
    """Debian's redis-server on a free loopback port for the session (skips without it)."""
    yield from running_redis(tmp_path_factory.mktemp("redis"))


@pytest.fixture
def redis_url(redis_server):
    """The session's Redis, running and empty."""
    if not redis_server.ping():
        redis_server.start()
    with redis_server.client() as c:
        c.flushall()
    return redis_server.url


def cli(*args: str, env: dict, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chat_magic.cli", *args], env=env, capture_output=True, text=True, timeout=timeout)


def run_hosts(names: list[str], env: dict, *args: str, timeout: float = 400) -> dict:
    """Start every host at the same moment, wait for all, return their reports by name."""
    start = f"{time.time() + 1.5:.3f}"
    running = [start_host(n, env, "--start-at", start, *args) for n in names]
    return {h.name: h.wait(timeout) for h in running}


def quota_errors(space) -> int:
    return sum(1 for r in space.requests() if r["status"] == 429)


# -- one file per host ----------------------------------------------------------------


@needs_hosts
@pytest.mark.slow
def test_four_hosts_sharing_a_home_have_four_outbox_files(space, outbox_home, redis_url):
    names = [f"node-{k}" for k in range(4)]
    env = host_env(outbox_home, space.url, redis_url)
    reports = run_hosts(names, env, "--events", "1", "--cards", "0", "--flush", "60")
    paths = {n: r.report["path"] for n, r in reports.items()}
    assert len(set(paths.values())) == 4
    for n, p in paths.items():
        assert p == str(outbox_home / f"outbox-{n}.sqlite3")
        assert reports[n].report["delivered"]
    assert sorted(p.name for p in outbox_home.glob("*.sqlite3")) == sorted(f"outbox-{n}.sqlite3" for n in names)
    lost, dups = tally(space.messages(), expected_events(names, 1))
    assert (lost, dups) == (0, 0)

    # `chat-magic outbox path` on a host names that host's file; list --all-hosts shows every file
    out = subprocess.run(["unshare", "--uts", "sh", "-c", f'hostname node-2 && exec "{sys.executable}" -m chat_magic.cli outbox path'],
                         env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == str(outbox_home / "outbox-node-2.sqlite3"), out.stderr
    listing = cli("outbox", "list", "--all-hosts", env=env)
    assert listing.returncode == 0, listing.stderr
    for n in names:
        assert f"{n}: {outbox_home / f'outbox-{n}.sqlite3'}: 1 sent" in listing.stdout


def test_outbox_path_follows_chat_magic_home_and_the_hostname(outbox_home, tmp_path):
    env = host_env(tmp_path / "elsewhere", "", None)
    out = cli("outbox", "path", env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == str(tmp_path / "elsewhere" / f"outbox-{hosts.file_label(hosts.current_host())}.sqlite3")
    assert not (tmp_path / "elsewhere").exists()  # asking for the path creates nothing
    assert hosts.outbox_path(tmp_path, "a/b c..:d") == tmp_path / "outbox-a_b_c.._d.sqlite3"


def test_the_old_single_file_is_still_drained(space, outbox_home):
    """Messages queued by a version with one outbox.sqlite3 are delivered by the next process; new ones go to the host's file."""
    old = Outbox(hosts.legacy_path(outbox_home))
    hook = parse_webhook_url(space.url)
    body = json.dumps({"text": "queued before the upgrade"})
    old.enqueue(hook, None, [(body, True)])
    old.close()

    chat_magic.send("queued after the upgrade").wait(20)
    space.wait_for(2, timeout=20)
    assert sorted(space.texts()) == ["queued after the upgrade", "queued before the upgrade"]
    assert _eventually(lambda: [r.state for r in Outbox(hosts.legacy_path(outbox_home)).rows()] == [SENT])
    mine = Outbox(hosts.outbox_path(outbox_home))
    assert [r.preview for r in mine.rows()] == ['{"text":"queued after the upgrade"}']


def test_flush_all_hosts_delivers_a_gone_host_and_leaves_a_busy_one_alone(space, outbox_home):
    hook = parse_webhook_url(space.url)
    gone = hosts.outbox_path(outbox_home, "gone-node")
    busy = hosts.outbox_path(outbox_home, "busy-node")
    for path, text in ((gone, "left behind by gone-node"), (busy, "still being sent by busy-node")):
        box = Outbox(path)
        box.enqueue(hook, None, [(json.dumps({"text": text}), True)])
        box.close()
    hour_ago = time.time() - 3600
    os.utime(gone, (hour_ago, hour_ago))  # nothing written there for an hour: that host's jobs are over

    out = cli("outbox", "flush", "--all-hosts", "--timeout", "30", env=dict(os.environ))
    assert out.returncode == 1  # busy-node's message is still waiting
    assert space.texts() == ["left behind by gone-node"]
    assert "gone-node: 0 waiting, 0 failed, 1 delivered" in out.stdout
    assert out.stderr.count("\n") == 1 and "busy-node: left alone" in out.stderr and "jobs are over" in out.stderr
    assert outbox.unfinished(busy) == 1
    assert_no_secret(out.stdout, out.stderr)


# -- the quota shared through Redis ---------------------------------------------------------


@needs_hosts
@pytest.mark.slow
def test_four_hosts_share_the_quota_through_redis(space, outbox_home, redis_url):
    """The issue's figure: 4 hosts x 23 events (8 cards, 15 texts) into one space: no 429, nothing lost or doubled."""
    names = [f"node-{k}" for k in range(4)]
    reports = run_hosts(names, host_env(outbox_home, space.url, redis_url))
    assert all(r.report["delivered"] for r in reports.values())
    assert all(DOWN_LINE not in r.stderr for r in reports.values())
    assert quota_errors(space) == 0
    lost, dups = tally(space.messages(), expected_events(names, 23))
    assert (lost, dups) == (0, 0)


@needs_hosts
@pytest.mark.slow
def test_without_redis_everything_is_still_delivered(space, outbox_home):
    names = [f"node-{k}" for k in range(4)]
    reports = run_hosts(names, host_env(outbox_home, space.url, None), "--events", "4", "--cards", "1")
    assert all(r.report["delivered"] for r in reports.values())
    lost, dups = tally(space.messages(), expected_events(names, 4))
    assert (lost, dups) == (0, 0)


@needs_hosts
@pytest.mark.slow
def test_redis_killed_mid_run_loses_nothing_and_comes_back(space, outbox_home, redis_server, redis_url):
    names = [f"node-{k}" for k in range(4)]
    start = f"{time.time() + 1.5:.3f}"
    running = [start_host(n, host_env(outbox_home, space.url, redis_url), "--start-at", start, "--events", "8", "--cards", "3")
               for n in names]
    space.wait_for(4, timeout=60)
    redis_server.kill()
    time.sleep(5)  # the scenario: Redis down for 5 s
    redis_server.start()
    reports = [h.wait(400) for h in running]

    assert all(h.report["delivered"] for h in reports)
    lost, dups = tally(space.messages(), expected_events(names, 8))
    assert (lost, dups) == (0, 0)
    lines = [ln for h in reports for ln in h.stderr.splitlines() if DOWN_LINE in ln]
    assert lines and all(h.stderr.count(DOWN_LINE) <= 1 for h in reports), [h.stderr for h in reports]
    assert "pacing this host alone" in lines[0]
    assert redis_server.commands_run("evalsha") + redis_server.commands_run("eval") > 0  # back on Redis by themselves


@needs_hosts
@pytest.mark.slow
def test_a_429_with_retry_after_holds_the_space_for_every_host(space, outbox_home, redis_url):
    names = ["node-a", "node-b", "node-c"]
    space.emu.inject("429", count=1, seconds=3)
    reports = run_hosts(names, host_env(outbox_home, space.url, redis_url), "--events", "1", "--cards", "0")
    assert all(r.report["delivered"] for r in reports.values())
    reqs = space.requests()
    refused = [r for r in reqs if r["status"] == 429]
    assert len(refused) == 1
    after = [r["time"] - refused[0]["time"] for r in reqs if r["time"] > refused[0]["time"]]
    assert len(after) == 3 and min(after) >= 2.9, after  # nobody posted into the space during the Retry-After
    lost, dups = tally(space.messages(), expected_events(names, 1))
    assert (lost, dups) == (0, 0)


# -- Redis trouble: one line, local pacing, nothing lost ---------------------------------------


def test_unreachable_redis_is_one_line_and_local_pacing(space, monkeypatch, capfd):
    dead = f"redis://:hunter2-secret-pw@127.0.0.1:{_closed_port()}/0"
    monkeypatch.setenv("CHAT_MAGIC_REDIS_URL", dead)
    for k in range(3):
        chat_magic.send(f"local pacing {k}")
    assert chat_magic.flush(30)
    assert sorted(events_in(space.messages())) == ["local pacing 0", "local pacing 1", "local pacing 2"]
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and DOWN_LINE in err and "redis://…@127.0.0.1" in err, err
    assert "hunter2" not in err


@pytest.mark.parametrize("url, says", [
    ("http://:hunter2-secret-pw@example.org:6379", "is not a Redis URL"),
    ("redis://:hunter2-secret-pw@127.0.0.1:port/0", "is not a valid Redis URL"),
])
def test_a_bad_redis_url_is_one_clear_line_and_delivery_goes_on(space, monkeypatch, capfd, url, says):
    monkeypatch.setenv("CHAT_MAGIC_REDIS_URL", url)
    chat_magic.send("delivered anyway").wait(20)
    err = capfd.readouterr().err
    assert err.count("\n") == 1 and says in err and "CHAT_MAGIC_REDIS_URL" in err, err
    assert "hunter2" not in err and "Traceback" not in err
    assert space.texts() == ["delivered anyway"]


def test_redis_url_from_the_config_file_with_a_password(space, outbox_home, redis_server, redis_url, tmp_path, monkeypatch, capfd):
    """A Redis user with a password, named in the config file: used, and the password shown nowhere."""
    with redis_server.client() as c:
        c.acl_setuser("chatmagic", enabled=True, passwords=["+hunter2-secret-pw"], keys=["chat_magic:*"], commands=["+@all"])
    url = f"redis://chatmagic:hunter2-secret-pw@127.0.0.1:{redis_server.port}/0"
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'redis_url = "{url}"\n')
    cfg.chmod(0o600)
    monkeypatch.setenv("CHAT_MAGIC_CONFIG", str(cfg))
    before = redis_server.commands_run("evalsha") + redis_server.commands_run("eval")
    chat_magic.send("paced through Redis").wait(20)
    assert redis_server.commands_run("evalsha") + redis_server.commands_run("eval") > before
    slot = delivery.dispatcher().outbox.cluster
    assert slot is not None and slot.up
    shown = [repr(slot), str(slot), slot.shown, pacing.redact_url(url), capfd.readouterr().err]
    assert all("hunter2" not in s for s in shown), shown
    assert pacing.redact_url(url) == f"redis://…@127.0.0.1:{redis_server.port}/0"


def test_the_cluster_slot_lets_one_request_through_per_interval_and_holds_for_everyone(redis_server, redis_url):
    """The slot's rules against the real server: one taker per interval, holds only lengthen, release frees.

    Slots of 30 s and more, and bounds from this test's own clock: none opens while the test runs, however
    slowly a loaded machine runs it (with 1 s slots and fixed 0.5 s margins, 0.6 s between two calls failed it).
    """
    a, b = pacing._connect(redis_url), pacing._connect(redis_url)  # two processes' clients, in effect
    assert a is not None and b is not None
    t0 = time.monotonic()
    assert a.take("h/S1", 30.0) == 0.0
    wait = b.take("h/S1", 30.0)
    assert wait is not None and 30.0 - (time.monotonic() - t0) - 0.01 <= wait <= 30.0, wait
    t0 = time.monotonic()
    a.hold("h/S1", 60.0)
    assert 60.0 - (time.monotonic() - t0) - 0.01 <= (b.remaining("h/S1") or 0) <= 60.0
    a.hold("h/S1", 0.2)  # never shortens
    assert (b.remaining("h/S1") or 0) >= 60.0 - (time.monotonic() - t0) - 0.01
    assert b.take("h/S2", 30.0) == 0.0
    b.release("h/S2")
    t0 = time.monotonic()
    assert a.remaining("h/S2") == 0.0 and a.take("h/S2", 30.0) == 0.0
    b.release("h/S2")  # b's token is gone, a holds it now: nothing happens
    assert (b.remaining("h/S2") or 0) >= 30.0 - (time.monotonic() - t0) - 0.01
    a.close()
    b.close()


def _eventually(cond, timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _closed_port() -> int:
    from cluster_support import free_port

    return free_port()  # bound and released: nothing listens there


def test_redis_url_without_the_redis_package_is_one_line_and_delivers(space, redis_url):
    """The package is made unimportable in the child (``sys.modules["redis"] = None``), as on a machine without the extra."""
    env = dict(os.environ, CHAT_MAGIC_REDIS_URL=redis_url)
    code = "import sys; sys.modules['redis'] = None; from chat_magic.cli import main; sys.exit(main(['send', 'no redis package']))"
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stderr.count("\n") == 1 and 'pip install "chat-magic[redis]"' in out.stderr, out.stderr
    assert space.texts() == ["no redis package"]
