"""Dead-man notices: a process that dies inside an open block still reports, once, into its thread.

Real processes, real signals: a script killed with SIGKILL, ended with
``os._exit``, killed by the kernel's OOM killer in a memory cgroup; a real
ipykernel killed and restarted mid-``%%chat`` cell (jupyter_client); the
watcher turned off (the next process delivers). Every notice goes to the
emulator over loopback.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from conftest import assert_no_secret, wait_until

import chat_magic

REPO = Path(chat_magic.__file__).resolve().parent.parent  # the code under test, in the scripts too


def script_env(space, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_MAGIC_", "GOOGLE_CHAT_"))}
    env.update(GOOGLE_CHAT_WEBHOOK_URL=space.url, CHAT_MAGIC_HOME=str(home), CHAT_MAGIC_CONFIG=str(home / "none.toml"),
               PYTHONPATH=str(REPO), PYTHONUNBUFFERED="1", CHAT_MAGIC_WATCHER_LOG=str(home.parent / "watcher.log"), **extra)
    return env


def start_script(tmp_path: Path, body: str, env: dict[str, str], name: str = "job.py") -> subprocess.Popen:
    path = tmp_path / name
    path.write_text(textwrap.dedent(body), encoding="utf-8")
    return subprocess.Popen([sys.executable, str(path)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def ready(proc: subprocess.Popen) -> dict[str, str]:
    """Read the script's ``KEY=VALUE`` lines up to ``READY``."""
    seen = {}
    for line in proc.stdout:
        line = line.strip()
        if line == "READY":
            return seen
        k, _, v = line.partition("=")
        seen[k] = v
    raise AssertionError(f"the script ended before READY: {proc.stderr.read()[-2000:]}")


def deaths(space) -> list[dict]:
    return [m for m in space.messages() if "💀" in (m.get("fallbackText") or m.get("text") or "")]


def armed_rows(home: Path) -> int:
    n = 0
    for f in home.glob("outbox-*.sqlite3"):
        db = sqlite3.connect(f, timeout=10)
        try:
            n += db.execute("SELECT count(*) FROM message WHERE state='armed'").fetchone()[0]
        except sqlite3.OperationalError:  # being created right now
            pass
        finally:
            db.close()
    return n


def card_facts(message: dict) -> dict[str, str]:
    widgets = message["cardsV2"][0]["card"]["sections"][0]["widgets"]
    return {w["decoratedText"]["topLabel"]: w["decoratedText"]["text"] for w in widgets}


BLOCK = """
    import os, time, chat_magic
    from chat_magic import watcher
    with chat_magic.notify_when_done("nightly training") as n:
        junk = b"x" * (80 * 1024 * 1024)  # a peak the notice can show (recorded with the progress line)
        n.update("epoch 3: loss 0.250")
        print(f"WATCHER={watcher.pid()}")
        print("READY", flush=True)
        {end}
"""


def test_a_script_killed_with_sigkill_inside_notify_when_done_posts_its_death_once(fast_space, tmp_path):
    home = tmp_path / "home"
    proc = start_script(tmp_path, BLOCK.replace("{end}", "time.sleep(120)"), script_env(fast_space, home))
    seen = ready(proc)
    assert seen["WATCHER"] != "None"
    t0 = time.monotonic()
    os.kill(proc.pid, signal.SIGKILL)  # not reaped yet: the watcher can read how it died
    found = wait_until(lambda: deaths(fast_space), timeout=10, what="the death notice within 10 s")
    assert time.monotonic() - t0 < 10
    proc.wait()
    death = found[0]
    assert "nightly training died after" in death["fallbackText"]
    facts = card_facts(death)
    assert facts["Cause"] == "killed by SIGKILL — out of memory?"
    assert facts["Last progress"] == "epoch 3: loss 0.250"
    assert facts["Peak memory"].endswith("MiB") and float(facts["Peak memory"].split()[0]) >= 80
    assert facts["Script"] == "job.py" and "Started" in facts
    # in the job's thread: the one its progress line went to
    progress = next(m for m in fast_space.messages() if "epoch 3" in (m.get("text") or ""))
    assert death["thread"]["name"] == progress["thread"]["name"]
    # exactly once: a later process on the host finds nothing left to fire
    subprocess.run([sys.executable, "-m", "chat_magic.cli", "outbox", "flush"], env=script_env(fast_space, home),
                   capture_output=True, timeout=60)
    wait_until(lambda: not os.path.exists(f"/proc/{seen['WATCHER']}"), timeout=30, what="the watcher to exit")
    assert len(deaths(fast_space)) == 1 and armed_rows(home) == 0
    assert_no_secret(death)


def test_os_exit_inside_a_block_is_reported_with_its_exit_code(fast_space, tmp_path):
    home = tmp_path / "home"
    proc = start_script(tmp_path, BLOCK.replace("{end}", "time.sleep(0.5); os._exit(3)"), script_env(fast_space, home))
    ready(proc)
    found = wait_until(lambda: deaths(fast_space), timeout=10, what="the death notice")
    proc.wait()
    assert card_facts(found[0])["Cause"] == "exited with code 3 without closing it (os._exit?)"


def test_closing_normally_disarms_it_and_the_watcher_leaves_with_its_parent(fast_space, tmp_path):
    home = tmp_path / "home"
    proc = start_script(tmp_path, BLOCK.replace("{end}", "pass"), script_env(fast_space, home))
    seen = ready(proc)
    proc.wait(60)
    assert proc.returncode == 0, proc.stderr.read()
    wait_until(lambda: not os.path.exists(f"/proc/{seen['WATCHER']}"), timeout=20, what="the watcher to exit with its parent")
    wait_until(lambda: any("finished" in (m.get("fallbackText") or "") for m in fast_space.messages()), what="the completion card")
    assert deaths(fast_space) == [] and armed_rows(home) == 0


def test_with_the_watcher_off_the_next_process_delivers_the_death_notice(fast_space, tmp_path):
    home = tmp_path / "home"
    env = script_env(fast_space, home, CHAT_MAGIC_WATCHER="off")
    proc = start_script(tmp_path, BLOCK.replace("{end}", "time.sleep(120)"), env)
    seen = ready(proc)
    assert seen["WATCHER"] == "None"
    proc.kill()
    proc.wait()
    assert armed_rows(home) == 1  # still armed: nobody watched
    later = subprocess.run([sys.executable, "-c", "import chat_magic; chat_magic.send('next job starts').wait(30)"],
                           env=env, capture_output=True, text=True, timeout=60)
    assert later.returncode == 0, later.stderr
    found = wait_until(lambda: deaths(fast_space), timeout=30, what="the death notice from the next process")
    assert "killed (SIGKILL or out of memory) or os._exit" in card_facts(found[0])["Cause"]  # nobody saw it die: honest
    assert armed_rows(home) == 0 and len(deaths(fast_space)) == 1


def test_two_processes_firing_at_once_post_it_once(fast_space, tmp_path):
    home = tmp_path / "home"
    env = script_env(fast_space, home, CHAT_MAGIC_WATCHER="off")
    proc = start_script(tmp_path, BLOCK.replace("{end}", "time.sleep(120)"), env)
    ready(proc)
    proc.kill()
    proc.wait()
    fire = ("from chat_magic import deadman; from chat_magic.outbox import Outbox; from chat_magic.hosts import outbox_path;"
            "import pathlib, os; print(len(deadman.fire_dead(Outbox(outbox_path(pathlib.Path(os.environ['CHAT_MAGIC_HOME']))))))")
    racers = [subprocess.Popen([sys.executable, "-c", fire], env=env, stdout=subprocess.PIPE, text=True) for _ in range(4)]
    fired = [int(p.communicate(timeout=60)[0].strip() or 0) for p in racers]
    assert sorted(fired) == [0, 0, 0, 1]
    subprocess.run([sys.executable, "-m", "chat_magic.cli", "outbox", "flush"], env=env, capture_output=True, timeout=60)
    assert len(deaths(fast_space)) == 1


def _cgroup_v1_memory() -> Path | None:
    root = Path("/sys/fs/cgroup/memory")
    if os.geteuid() != 0 or not (root / "cgroup.procs").exists():
        return None
    return root


@pytest.mark.slow
def test_a_real_oom_kill_in_a_memory_cgroup_is_named(fast_space, tmp_path):
    root = _cgroup_v1_memory()
    if root is None:
        pytest.skip("needs root and a cgroup v1 memory controller to make a real OOM kill")
    group = root / f"chat_magic_oom_{os.getpid()}"
    group.mkdir()
    try:
        (group / "memory.limit_in_bytes").write_text(str(300 * 1024 * 1024))
        try:
            (group / "memory.memsw.limit_in_bytes").write_text(str(300 * 1024 * 1024))
        except OSError:
            pass
        body = f"""
            import os, time, chat_magic
            open({str(group / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))
            with chat_magic.notify_when_done("memory hog") as n:
                n.update("loading the data")
                print("READY", flush=True)
                chunks = []
                while True:
                    chunks.append(b"x" * (8 * 1024 * 1024))
                    time.sleep(0.1)
        """
        proc = start_script(tmp_path, body, script_env(fast_space, tmp_path / "home"))
        ready(proc)
        found = wait_until(lambda: deaths(fast_space), timeout=30, what="the death notice of the OOM-killed job")
        proc.wait(30)
        assert proc.returncode == -signal.SIGKILL
        facts = card_facts(found[0])
        assert facts["Cause"].startswith("killed by the out-of-memory killer"), facts
        assert float(facts["Peak memory"].split()[0]) > 100, facts
    finally:
        for _ in range(50):
            try:
                group.rmdir()
                break
            except OSError:
                time.sleep(0.2)


# -- a real kernel -------------------------------------------------------------------


def _kernel(env: dict[str, str]):
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env)
    kc = km.client()
    kc.start_channels()
    kc.wait_for_ready(timeout=60)
    return km, kc


def cell_notices(space, title: str) -> list[str]:
    """The texts posted about the cell titled ``title`` (the session's opening line left out)."""
    texts = [m.get("fallbackText") or m.get("text") or "" for m in space.messages()]
    return [t for t in texts if title in t]


def start_chat_cell(kc, home: Path, title: str, body: str) -> None:
    """Run ``%%chat`` cell ``title`` (``body``: its code, ``time`` imported) in the kernel; return once its own code runs.

    Not as soon as its death notice is armed: a signal while ``%%chat`` is
    still opening the block ends it before the cell starts (an interrupt
    then ends no cell, and withdraws the notice; a SIGTERM finds no block
    open yet and the watcher reports the death).
    """
    running = home.parent / f"running-{abs(hash(title))}"
    kc.execute(f"%%chat\n# {title}\nimport pathlib, time\npathlib.Path({str(running)!r}).touch()\n{body}")
    wait_until(lambda: running.exists() and armed_rows(home) == 1, timeout=60, what="the cell to run, its death notice armed")


@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigkill", "restart", "restart-interrupt-lands-first"])
def test_a_kernel_killed_mid_chat_cell_posts_the_cells_death(fast_space, tmp_path, how):
    """One notice about the cell, whatever kills the kernel, within 10 s.

    A restart (jupyter_client 7 and 8 alike: ``shutdown_kernel`` sends SIGINT,
    then SIGKILL at once with ``now=True``) races two endings. Usually the
    kill lands first: the death notice. If the kernel runs its Ctrl-C handler
    between the two (seen in CI under load), the cell ends "interrupted" and
    that card replaces the death notice in one transaction, delivered by
    the kernel or, the kernel gone, by its watcher. Either way the space gets
    exactly one notice for the cell; the third case forces the second order.
    The signals wait for the cell's own code to run (:func:`start_chat_cell`).
    """
    home = tmp_path / "home"
    env = script_env(fast_space, home)
    km, kc = _kernel(env)
    title = "Fine-tune the big model"
    try:
        kc.execute_interactive("%load_ext chat_magic", timeout=60)
        start_chat_cell(kc, home, title, "print('step 1', flush=True)\ntime.sleep(300)")
        pid = km.provisioner.process.pid
        if how == "sigkill":
            os.kill(pid, signal.SIGKILL)
        elif how == "restart":
            km.restart_kernel(now=True)
        else:
            os.kill(pid, signal.SIGINT)  # what restart_kernel sends first, landing well before its kill
            wait_until(lambda: armed_rows(home) == 0, timeout=30, what="the interrupted card to replace the death notice")
            km.restart_kernel(now=True)
        log = tmp_path / "watcher.log"
        found = wait_until(lambda: cell_notices(fast_space, title), timeout=10,
                           what=f"the cell's notice within 10 s ({log.read_text()[-2000:] if log.exists() else 'no watcher log'})")
        if how == "sigkill":
            assert f"{title} died after" in found[0], found
        elif how == "restart":
            assert f"{title} died after" in found[0] or f"{title} interrupted" in found[0], found
        else:
            assert f"{title} interrupted" in found[0], found
        wait_until(lambda: armed_rows(home) == 0, timeout=10, what="nothing armed")
        # the watcher has finished with this kernel (no process left that could post a second one)
        wait_until(lambda: not watchers_of(pid), timeout=30, what="the watcher to exit")
        assert len(cell_notices(fast_space, title)) == 1, cell_notices(fast_space, title)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)


def watchers_of(pid: int) -> list[int]:
    """The ``python -m chat_magic.watcher --pid <pid>`` processes alive now."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"chat_magic.watcher" in args and b"--pid" in args and args[args.index(b"--pid") + 1] == str(pid).encode():
            found.append(int(entry.name))
    return found


# -- the last notice leaves before the process ------------------------------------------


@pytest.mark.slow  # three messages at 1.5 s each, and the script's start: about 9 s
def test_a_short_scripts_completion_card_is_delivered_before_it_exits_at_1_5_s_latency(tmp_path):
    from conftest import KEY, TOKEN, Space

    from chat_magic.emulator import Emulator

    emu = Emulator(key=KEY, token=TOKEN, qps=1.0, strict=True, latency=1.5).start()
    try:
        space = Space(emu, "SLOW")
        body = """
            import chat_magic
            with chat_magic.notify_when_done("quick job", notify_start=True) as n:
                n.update("half way")
            print("READY", flush=True)
        """
        proc = start_script(tmp_path, body, script_env(space, tmp_path / "home", CHAT_MAGIC_WATCHER="off"))
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        # the moment it exited, the space already had the completion card
        cards = [m for m in space.messages() if "quick job finished" in (m.get("fallbackText") or "")]
        assert len(cards) == 1, (err, [m.get("fallbackText") or m.get("text") for m in space.messages()])
        assert "waiting up to 30 s for 1 completion notice to be delivered" in err
        assert "still queued" not in err
    finally:
        emu.stop()


def test_outbox_list_counts_armed_notices_as_a_known_state(fast_space, tmp_path):
    home = tmp_path / "home"
    env = script_env(fast_space, home, CHAT_MAGIC_WATCHER="off")
    proc = start_script(tmp_path, BLOCK.replace("{end}", "time.sleep(120)"), env)
    ready(proc)
    try:
        out = subprocess.run([sys.executable, "-m", "chat_magic.cli", "outbox", "list"], env=env, capture_output=True,
                             text=True, timeout=60)
    finally:
        proc.kill()
        proc.wait()
    assert "1 armed" in out.stdout and "does not know" not in out.stderr, (out.stdout, out.stderr)
