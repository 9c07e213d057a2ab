"""Edges of the job's first failure, the heartbeat and the stall watch (a reviewer's findings, each reproduced).

- a rank's error over 500 characters (a collective's C++ backtrace) is still
  its own first failure: the failure card, not "stopped too" about itself;
- the job's first failure is shared through the Redis set only in the config
  file (``redis_url``), as pacing and the heartbeat use it: one card per job;
- a block whose death or termination notice fired in its own live process
  stops beating (or ``chat-magic watch`` later says it lost contact);
- a block opened just as the heartbeat thread ends still beats;
- a Ctrl-C inside a lock's ``__enter__`` as a block closes never jams the
  next block's close;
- a duration too large for a float is the one-line ConfigError.

Real parts: a real ``redis-server``, real processes for the ranks, the
emulator over loopback.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
import threading
import time

import pytest
from cluster_support import running_redis
from conftest import wait_until
from test_watcher import script_env

import chat_magic
from chat_magic import ConfigError, rules


@pytest.fixture
def redis_server(tmp_path):
    yield from running_redis(tmp_path / "redis")


def _texts(m: dict) -> str:
    return (m.get("fallbackText") or "") + (m.get("text") or "")


RANK = """
    import os, chat_magic
    with chat_magic.notify_when_done("ddp sweep"):
        raise RuntimeError(os.environ["ERROR"])
"""


def _rank(fast_space, tmp_path, rank: int, error: str, home: str, **extra: str) -> subprocess.CompletedProcess:
    """One rank of Slurm job 4242 (of 2), failing with ``error``, on the host whose outbox is in ``home``."""
    path = tmp_path / "rank.py"
    path.write_text(textwrap.dedent(RANK), encoding="utf-8")
    env = script_env(fast_space, tmp_path / home, SLURM_JOB_ID="4242", SLURM_PROCID=str(rank), SLURM_NTASKS="2",
                     ERROR=error)
    env.update(extra)
    done = subprocess.run([sys.executable, str(path)], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "RuntimeError" in done.stderr, done.stderr[-2000:]
    return done


# -- 1. a long error is still this rank's own first failure --------------------------------------


def test_the_first_rank_with_an_error_over_500_characters_posts_the_failure_card(fast_space, tmp_path, redis_server):
    """Redis kept the first 500 characters, compared with the whole error: the first rank saw another's failure."""
    error = "[gloo] DistBackendError: Connection closed by peer; C++ backtrace:\n" + "".join(
        f"frame #{i}: c10d::ProcessGroupGloo::runLoop(unsigned long) + 0x{i:04x} (libtorch_cpu.so)\n" for i in range(12))
    assert len(error) > 600
    _rank(fast_space, tmp_path, 0, error, "host-a", CHAT_MAGIC_REDIS_URL=redis_server.url)
    card = wait_until(lambda: [m for m in fast_space.messages() if m.get("cardsV2") and "❌" in _texts(m)],
                      what="rank 0's failure card")
    assert "DistBackendError" in str(card[0]["cardsV2"])
    assert not [m for m in fast_space.messages() if "failed first" in _texts(m)], "no line about itself"
    # and the record kept is its own: the next rank's line names rank 0
    from chat_magic import jobs

    first = redis_server.client().get("chat_magic:job-failure:" + jobs.identity({"SLURM_JOB_ID": "4242"}))
    assert first is not None and "rank 1 of 2" not in first


def test_first_failure_cuts_the_summary_once_before_recording_and_comparing(redis_server, monkeypatch):
    from chat_magic import jobs

    monkeypatch.setenv("CHAT_MAGIC_REDIS_URL", redis_server.url)
    long = "DistBackendError: " + "x" * 900
    assert jobs.first_failure("job-long", "rank 0 of 2", long, box=None) is None
    assert jobs.first_failure("job-long", "rank 1 of 2", "Connection closed by peer", box=None) == ("rank 0 of 2", long[:500])


# -- 6. the job's first failure through the Redis of the config file ------------------------------


def test_two_hosts_with_redis_only_in_the_config_file_post_one_failure_card(fast_space, tmp_path, redis_server):
    """Each host has its own outbox; the Redis set only as ``redis_url`` in the config is the shared record."""
    config = tmp_path / "chat_magic.toml"
    config.write_text(f'redis_url = "{redis_server.url}"\n', encoding="utf-8")
    _rank(fast_space, tmp_path, 1, "bad batch 17 on rank 1", "host-b", CHAT_MAGIC_CONFIG=str(config))
    wait_until(lambda: [m for m in fast_space.messages() if m.get("cardsV2")], what="rank 1's failure card")
    _rank(fast_space, tmp_path, 0, "[gloo] Connection closed by peer", "host-a", CHAT_MAGIC_CONFIG=str(config))
    line = wait_until(lambda: [m for m in fast_space.messages() if "failed first" in _texts(m)], what="rank 0's line")
    assert "rank 1 of 2 failed first" in line[0]["text"] and "bad batch 17" in line[0]["text"]
    cards = [m for m in fast_space.messages() if m.get("cardsV2")]
    assert len(cards) == 1 and "bad batch 17" in str(cards[0]["cardsV2"]), [_texts(m) for m in fast_space.messages()]


# -- 2. a block whose notice fired in its own process stops beating -------------------------------


def _beats(client) -> dict[str, str]:
    """Label -> last beat of every block recorded in Redis."""
    out = {}
    for key in client.keys("chat_magic:open:*"):
        out[client.hget(key, "label")] = client.hget(key, "beat")
    return out


def test_a_block_whose_notice_fired_in_its_live_process_writes_nothing_at_the_next_beats(fast_space, redis_server, monkeypatch):
    """As a termination card or the exit's notice does: the block never closes, its notice is posted, it beats no more."""
    from chat_magic import deadman, heartbeat
    from chat_magic.delivery import dispatcher
    from chat_magic.outbox import owner_id

    monkeypatch.setenv("CHAT_MAGIC_REDIS_URL", redis_server.url)
    monkeypatch.setenv("CHAT_MAGIC_HEARTBEAT", "0.2")
    heartbeat._wake.set()  # a heartbeat thread of an earlier test waits out its old interval no more
    client = redis_server.client()
    fired = chat_magic.notify_when_done("fired while open")
    fired.__enter__()
    try:
        wait_until(lambda: _beats(client).get("fired while open"), what="the block's first beat")
        box = dispatcher().outbox
        ids = deadman.fire_dead(box, owner=owner_id(), cause_text="terminated by SIGTERM", died_at=time.time(),
                                icon="🛑", verb="was terminated")  # what termination._close_blocks does
        assert ids
        for a in deadman.open_notices():  # ... and then
            a.closed = True
            deadman.forget(a)
        # gone, once a beat on its way (its blocks read before the notice fired) has written it again and seen
        # the block gone: it deletes what it wrote (the keys reappeared for that moment, and the test failed)
        wait_until(lambda: "fired while open" not in _beats(client), what="the fired block's record gone")
        with chat_magic.notify_when_done("still open"):
            # two beats of another block of this process: the heartbeat ran twice since the notice fired
            first = wait_until(lambda: _beats(client).get("still open"), what="the other block's beat")
            wait_until(lambda: _beats(client).get("still open") not in (None, first), what="its next beat")
            assert "fired while open" not in _beats(client), "the fired block was written again"
            assert len(client.keys("chat_magic:beat:*")) == 1, "the other block's heartbeat only"
        wait_until(lambda: [m for m in fast_space.messages() if "🛑" in _texts(m)], what="the termination card")
    finally:
        fired.__exit__(None, None, None)  # off this thread's stack of open blocks (a later tqdm would report into it)
        deadman.retry_disarms()


def test_a_beat_on_its_way_as_the_block_closes_leaves_no_record(fast_space, redis_server, monkeypatch):
    """The heartbeat thread is held just before it writes its beat while the block closes (and forgets its keys)."""
    import linecache

    from chat_magic import heartbeat

    monkeypatch.setenv("CHAT_MAGIC_REDIS_URL", redis_server.url)
    monkeypatch.setenv("CHAT_MAGIC_HEARTBEAT", "0.2")
    monkeypatch.setattr(heartbeat, "_open", {})
    client = redis_server.client()
    wait_until(lambda: heartbeat._wake.set() or heartbeat._thread is None or not heartbeat._thread.is_alive(),
               what="no heartbeat thread left by an earlier test")
    held, go = threading.Event(), threading.Event()

    def local(frame, event, arg):
        line = linecache.getline(frame.f_code.co_filename, frame.f_lineno)
        if event == "line" and "pipe.execute()" in line and not held.is_set():
            held.set()
            go.wait(20)
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code is heartbeat._beat_once.__code__ else None

    threading.settrace(tracer)
    try:
        with chat_magic.notify_when_done("closed as it beats"):
            assert held.wait(20), "the heartbeat thread came to write its beat"
        threading.settrace(None)
        assert client.keys("chat_magic:open:*") == []  # the close forgot it; the beat is still on its way
        go.set()
        wait_until(lambda: not heartbeat._thread or not heartbeat._thread.is_alive(), what="the heartbeat thread's end")
        assert client.keys("chat_magic:open:*") == [] and client.keys("chat_magic:beat:*") == [], \
            "the beat written after the close was forgotten too"
    finally:
        threading.settrace(None)
        go.set()


# -- 4. a block opened just as the heartbeat thread ends ------------------------------------------


def test_a_block_opened_as_the_heartbeat_thread_ends_still_beats(fast_space, redis_server, monkeypatch):
    """The thread is held at the return of its loop (it decided to end, it is still alive) while a block opens."""
    from chat_magic import heartbeat

    monkeypatch.setenv("CHAT_MAGIC_REDIS_URL", redis_server.url)
    monkeypatch.setenv("CHAT_MAGIC_HEARTBEAT", "0.2")
    client = redis_server.client()
    monkeypatch.setattr(heartbeat, "_open", {})  # blocks an earlier test left open in this process beat no more here

    def idle() -> bool:
        heartbeat._wake.set()  # an earlier test's thread ends at once when nothing is open
        thread = heartbeat._thread
        return thread is None or not thread.is_alive()

    wait_until(idle, what="no heartbeat thread left by an earlier test")
    ending, go = threading.Event(), threading.Event()

    def local(frame, event, arg):
        if event == "return" and not ending.is_set():
            ending.set()
            go.wait(20)
        return local

    def tracer(frame, event, arg):
        return local if frame.f_code is heartbeat._run.__code__ else None

    threading.settrace(tracer)  # every thread started from now: the heartbeat thread the first block starts
    try:
        with chat_magic.notify_when_done("first"):
            wait_until(lambda: client.keys("chat_magic:beat:*"), what="the first block's beat")
        assert ending.wait(20), "the heartbeat thread ends once no block is open"
        threading.settrace(None)
        with chat_magic.notify_when_done("opened as it ends"):
            go.set()
            wait_until(lambda: client.keys("chat_magic:beat:*"), timeout=10, what="a beat of the block opened as the thread ended")
    finally:
        threading.settrace(None)
        go.set()


# -- 3. a Ctrl-C as the stall watch takes its lock at a block's close -----------------------------


def _interrupt_in_stalls(n: int, fn) -> bool:
    """Run ``fn`` raising a KeyboardInterrupt at the ``n``-th return of a Python function the stall watch calls.

    Such as ``Condition.__enter__``: the lock taken, the ``with`` block not
    begun (a real Ctrl-C lands there, at the eval loop's check after the
    C-level acquire inside it). Whether it was raised.
    """
    from test_interrupts import Injected

    from chat_magic import stalls

    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "return":
            count += 1
            if count == n:
                raise Injected(f"return #{n}: {frame.f_code.co_name} {frame.f_code.co_filename}:{frame.f_lineno}")
        return local

    def global_(frame, event, arg):
        caller = frame.f_back
        wanted = count < n and caller is not None and caller.f_code.co_filename == stalls.__file__
        return local if wanted else None

    sys.settrace(global_)
    try:
        fn()
    except Injected:
        return True
    finally:
        sys.settrace(None)
    return count >= n


def test_an_interrupt_as_the_stall_watch_takes_its_lock_at_a_block_close_never_jams_the_next_block(fast_space):
    """A Ctrl-C at the return of every function the stall watch calls as a block closes; the next block closes within 20 s.

    ``with _wake:`` (a Condition) took its lock in the Python-level
    ``Condition.__enter__``: a Ctrl-C there left it held, and the next
    block's open or close hung for good.
    """
    from chat_magic import deadman, stalls

    n = 0
    while True:
        n += 1
        block = chat_magic.notify_when_done(f"cut {n}", stall_after=600)
        block.__enter__()
        fired = _interrupt_in_stalls(n, lambda b=block: b.__exit__(None, None, None))
        done = threading.Event()

        def next_block(n=n, done=done) -> None:
            with chat_magic.notify_when_done(f"after {n}", stall_after=600):
                pass
            done.set()

        threading.Thread(target=next_block, daemon=True).start()
        try:
            assert done.wait(20), f"the next block closed after an interrupt at the stall watch's moment #{n}"
        finally:
            if not done.is_set() and stalls._lock.locked():
                stalls._lock.release()  # the old code kept it: let the stuck close and this process go on
                done.wait(20)
            for a in deadman.open_notices():
                a.disarm()  # what the interrupt left open
        if not fired:
            break
    assert n > 1, "the sweep went through the stall watch's part of a close"
    assert not stalls._lock.locked()


# -- 5. a duration too large for a float -----------------------------------------------------------


@pytest.mark.parametrize("value", [10**400, -(10**400), 10**5000, float("inf"), float("nan")],
                         ids=["1e400", "-1e400", "1e5000", "inf", "nan"])
def test_a_number_too_large_for_a_duration_is_the_one_line_config_error(value):
    with pytest.raises(ConfigError) as caught:
        rules.seconds(value, option="stall_after", above=True)
    line = str(caught.value)
    assert "\n" not in line and line.startswith("stall_after=") and rules.DURATION_FORMS in line and len(line) < 200


def test_stall_after_ten_to_the_400_is_refused_in_one_line(fast_space):
    with pytest.raises(ConfigError, match=r"^stall_after=about 10\*\*400 is not a duration over 0s"):
        chat_magic.notify_when_done("x", stall_after=10**400)


# -- a forked child beats for none of its parent's blocks ------------------------------------------


def test_a_forked_child_keeps_no_heartbeat_of_its_parents_blocks(fast_space, redis_server, monkeypatch):
    """A child that outlived a killed parent would keep the parent's block beating: the watch would never say it."""
    import os

    from chat_magic import heartbeat

    monkeypatch.setenv("CHAT_MAGIC_REDIS_URL", redis_server.url)
    with chat_magic.notify_when_done("parent's block"):
        assert heartbeat._open
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: report what it would beat, and whether it could take the lock
            try:
                ok = heartbeat._lock.acquire(timeout=5)
                os.write(write, f"{len(heartbeat._open)} {ok}".encode())
            finally:
                os._exit(0)
        os.close(write)
        got = os.read(read, 100).decode()
        os.close(read)
        os.waitpid(pid, 0)
    assert got == "0 True", got
