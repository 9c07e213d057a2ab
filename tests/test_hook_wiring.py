"""The dead-man hooks are in place in a fresh process (issue 20: a registry instead of import cycles).

The modules that watch an open block (stalls, heartbeat, termination,
watcher) register in ``chat_magic.hooks`` when they are imported; nothing
imports them back. A module that registers itself but that nothing imports
would be a hook never installed, silently: these tests open a block in a
fresh interpreter (nothing imported beforehand by a test) through each
front end that arms one, and look at the effects from outside: the signal
handler in ``/proc/<pid>/status``, the watcher among the processes, the
block's record and heartbeat in a real ``redis-server``, the stall line in
the emulator; then, after the block closes, each undone. And a process that
only sends (it never opens a block) fires a dead block's notice with the
Redis record forgotten: the ``on_fired`` hook is in place without any arming.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cluster_support import RedisServer
from conftest import wait_until
from test_watcher import armed_rows, deaths, ready, script_env, watchers_of


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path / "redis").start()
    try:
        yield server
    finally:
        server.stop()


def handles(pid: int, sig: int) -> bool:
    """Whether process ``pid`` has a handler of its own for ``sig`` (``SigCgt`` in ``/proc/<pid>/status``)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigCgt:"):
            return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    raise AssertionError("no SigCgt line")


def records(redis_server, kind: str, pid: int) -> list[str]:
    return [k for k in redis_server.client().keys(f"chat_magic:{kind}:*") if f":{pid}/" in k]  # host:pid/start:row


NOTIFY = """
    import sys, chat_magic
    with chat_magic.notify_when_done("wired block", stall_after=0.3):
        print("READY", flush=True)
        sys.stdin.readline()
    print("CLOSED", flush=True)
    sys.stdin.readline()
"""

# %%chat in a real IPython shell (its history in the test's own IPYTHONDIR)
CELL = """
    import sys
    from IPython.core.interactiveshell import InteractiveShell
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "chat_magic")
    ip.run_cell("%%chat\\nimport sys\\nprint('READY', flush=True)\\nsys.stdin.readline()")
    print("CLOSED", flush=True)
    sys.stdin.readline()
"""

# chat-magic run: the command it runs says READY, then waits for a line; the process that armed is its parent
RUN_CHILD = "import sys; print('READY', flush=True); sys.stdin.readline()"


def _open_block(front: str, tmp_path: Path, env: dict[str, str]) -> tuple[subprocess.Popen, int]:
    """Open a block through ``front`` in a fresh interpreter; (the process, the pid of the one that armed)."""
    if front in ("notify_when_done", "%%chat"):
        (tmp_path / "block.py").write_text(textwrap.dedent(NOTIFY if front == "notify_when_done" else CELL), encoding="utf-8")
        argv = [sys.executable, str(tmp_path / "block.py")]
    else:
        argv = [sys.executable, "-m", "chat_magic.cli", "run", "--label", "wired block", "--", sys.executable, "-c", RUN_CHILD]
    proc = subprocess.Popen(argv, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    ready(proc)
    return proc, proc.pid


@pytest.mark.parametrize("front", ["notify_when_done", "%%chat", "chat-magic run"])
def test_every_hook_is_in_place_when_a_block_opens_in_a_fresh_process_and_undone_when_it_closes(
        fast_space, tmp_path, redis_server, front):
    home = tmp_path / "home"
    env = script_env(fast_space, home, CHAT_MAGIC_REDIS_URL=redis_server.url, CHAT_MAGIC_HEARTBEAT="0.2",
                     IPYTHONDIR=str(tmp_path / "ipython"))
    proc, pid = _open_block(front, tmp_path, env)
    try:
        assert handles(pid, signal.SIGTERM), "termination: the SIGTERM handler is installed at the first block"
        assert wait_until(lambda: watchers_of(pid), what="the watcher spawned at the first block")
        wait_until(lambda: records(redis_server, "open", pid) and records(redis_server, "beat", pid),
                   what="heartbeat: the block's record and heartbeat in Redis")
        if front == "notify_when_done":  # stall_after is notify_when_done's (and the callbacks', %chat_autonotify's)
            wait_until(lambda: [m for m in fast_space.messages() if "⏸ *wired block*" in (m.get("text") or "")],
                       what="stalls: the stall line")
        assert armed_rows(home) == 1
        _close(proc, front)
        wait_until(lambda: not records(redis_server, "open", pid) and not records(redis_server, "beat", pid),
                   what="heartbeat: the record forgotten when the block closes")
        wait_until(lambda: armed_rows(home) == 0, what="disarmed")
        if front != "chat-magic run":  # (that process has ended)
            assert not handles(pid, signal.SIGTERM), "termination: the handler is given back after the last block"
    finally:
        proc.kill()
        proc.wait(30)


def _close(proc: subprocess.Popen, front: str) -> None:
    """One line on its stdin: the block ends (the script's, or the command chat-magic run runs)."""
    proc.stdin.write("\n")
    proc.stdin.flush()
    if front == "chat-magic run":
        proc.wait(60)
    else:
        assert wait_for_line(proc, "CLOSED")


def wait_for_line(proc: subprocess.Popen, line: str) -> bool:
    """Read the process's output up to ``line`` (a cell's own output may come before it)."""
    return any(got.strip() == line for got in proc.stdout)


def test_a_process_that_only_sends_fires_a_dead_blocks_notice_and_forgets_its_redis_record(fast_space, tmp_path, redis_server):
    home = tmp_path / "home"
    env = script_env(fast_space, home, CHAT_MAGIC_REDIS_URL=redis_server.url, CHAT_MAGIC_HEARTBEAT="0.2",
                     CHAT_MAGIC_WATCHER="off")
    proc, _ = _open_block("notify_when_done", tmp_path, env)
    wait_until(lambda: records(redis_server, "open", proc.pid), what="the block's record in Redis")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert armed_rows(home) == 1 and records(redis_server, "open", proc.pid)  # nobody watched
    later = subprocess.run([sys.executable, "-c", "import chat_magic; chat_magic.send('next job starts').wait(30)"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert later.returncode == 0, later.stderr
    wait_until(lambda: deaths(fast_space), timeout=30, what="the death notice from the next process")
    assert records(redis_server, "open", proc.pid) == [], "the watch must not also say 'lost contact' for it"
