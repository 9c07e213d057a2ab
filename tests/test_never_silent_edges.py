"""Never silent, at its edges: nothing is posted twice, and a vanished host's death is reported.

- A kill at the worst moment: right after a block's completion card is
  queued (the transaction committed), before anything else runs. Queuing the
  card and disarming the death notice are one transaction, so the space gets
  one notice, never the card *and* a death notice. The kill is a real
  SIGKILL, sent by the process to itself from a ``sys.settrace`` hook on the
  return of ``Outbox.enqueue`` (deterministic: the same instant every run).
- A container restarted under a new hostname: the process killed with its
  whole host (a UTS+PID namespace, its watcher too) left its death notice
  armed in a shared folder; the new host's first process takes the file over
  and posts that death, once, in the job's thread.

Real processes, real signals, the emulator over loopback.
"""

from __future__ import annotations

import os
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from cluster_support import unshare_works
from conftest import assert_no_secret, wait_until
from test_watcher import card_facts, deaths, script_env

# SIGKILL this process the moment Outbox.enqueue returns from queuing a card (its transaction committed)
KILL_AFTER_CARD = """
import os, signal, sys
from chat_magic.outbox import Outbox
_enqueue = Outbox.enqueue.__wrapped__.__code__  # the method under its storage-error guard

def _local(frame, event, arg):
    if event == "return" and arg is not None and any('"cardsV2"' in b[0] for b in frame.f_locals.get("bodies") or ()):
        os.kill(os.getpid(), signal.SIGKILL)
    return _local

def _calls(frame, event, arg):
    return _local if frame.f_code is _enqueue else None

sys.settrace(_calls)
"""

BODIES = {
    "notify_when_done": """
        import chat_magic
        with chat_magic.notify_when_done("nightly training") as n:
            n.update("epoch 3: loss 0.250")
        print("NOT KILLED", flush=True)
    """,
    "%%chat": """
        from IPython.core.interactiveshell import InteractiveShell
        shell = InteractiveShell.instance()
        shell.run_cell("%load_ext chat_magic")
        shell.run_cell("%%chat\\n# nightly training\\nprint('epoch 3: loss 0.250')")
        print("NOT KILLED", flush=True)
    """,
    "chat-magic run": """
        from chat_magic import run
        run.main(["--label", "nightly training", "--", sys.executable, "-c", "print('epoch 3: loss 0.250')"])
        print("NOT KILLED", flush=True)
    """,
}


def _notices(space) -> list[str]:
    """Every completion card and death notice of the job (progress lines and headers left out)."""
    out = []
    for m in space.messages():
        text = (m.get("fallbackText") or "") + (m.get("text") or "")
        if "nightly training" in text and ("💀" in text or "⏹" in text or m.get("cardsV2")):
            out.append(text)
    return out


@pytest.mark.parametrize("front", sorted(BODIES))
def test_a_kill_right_after_the_completion_card_is_queued_posts_one_notice_not_two(fast_space, tmp_path, front):
    home = tmp_path / "home"
    env = script_env(fast_space, home)
    script = tmp_path / "job.py"
    script.write_text(KILL_AFTER_CARD + textwrap.dedent(BODIES[front]), encoding="utf-8")
    proc = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr[-2000:])
    assert "NOT KILLED" not in proc.stdout
    # the watcher delivers what the dead process left (its completion card is important); a death notice would
    # come within 10 s
    wait_until(lambda: _notices(fast_space), timeout=15, what="a notice from the killed job")
    # and whatever is still queued: the next process on the host delivers it (and fires any death left armed)
    later = subprocess.run([sys.executable, "-m", "chat_magic.cli", "outbox", "flush", "--timeout", "30"], env=env,
                           capture_output=True, text=True, timeout=90)
    assert later.returncode == 0, later.stderr
    notices = _notices(fast_space)
    assert len(notices) == 1, notices  # the completion card, never also "died"
    assert "💀" not in notices[0] and "finished" in notices[0], notices
    assert _armed(home) == 0


def _armed(home: Path) -> int:
    n = 0
    for f in home.glob("outbox-*.sqlite3"):
        db = sqlite3.connect(f, timeout=10)
        try:
            n += db.execute("SELECT count(*) FROM message WHERE state='armed'").fetchone()[0]
        finally:
            db.close()
    return n


# -- a container restarted under a new hostname reports its predecessor's death ------------------------------

NO_HOSTS = unshare_works()

HOST_JOB = """
    import time, chat_magic
    with chat_magic.notify_when_done("nightly training") as n:
        n.update("epoch 3: loss 0.250")
        print("READY", flush=True)
        time.sleep(300)
"""


def _as_host(name: str, *argv: str, env: dict, whole: bool = False) -> subprocess.Popen:
    """``argv`` run by Python under the hostname ``name`` (``whole``: in a PID namespace too, to kill it whole)."""
    ns = ["--uts", "--pid", "--fork", "--mount-proc"] if whole else ["--uts"]
    cmd = ["unshare", *ns, "sh", "-c", 'hostname "$1" && shift && exec "$@"', "sh", name, sys.executable, *argv]
    return subprocess.Popen(cmd, env=env, text=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.mark.slow
@pytest.mark.skipif(bool(NO_HOSTS), reason=NO_HOSTS or "")
def test_a_container_restarted_under_a_new_hostname_reports_its_predecessors_death_once_in_its_thread(fast_space, tmp_path):
    from test_jobs import _ns_init

    home = tmp_path / "home"  # a folder the containers share (a volume)
    env = script_env(fast_space, home)
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(HOST_JOB), encoding="utf-8")
    pod_a = _as_host("pod-a", str(job), env=env, whole=True)
    assert pod_a.stdout.readline().strip() == "READY", pod_a.stderr.read()
    progress = wait_until(lambda: [m for m in fast_space.messages() if "epoch 3" in (m.get("text") or "")],
                          what="pod-a's progress line")
    os.kill(_ns_init(pod_a.pid), signal.SIGKILL)  # the container is gone: the job, its watcher, everything
    pod_a.wait(30)
    assert _armed(home) == 1 and deaths(fast_space) == []  # nobody was left to report it
    # the container comes back as pod-b: its first chat_magic process takes the file over
    pod_b = _as_host("pod-b", "-m", "chat_magic.cli", "send", "pod-b is up", env=env)
    out, err = pod_b.communicate(timeout=90)
    assert pod_b.returncode == 0, out + err
    found = wait_until(lambda: deaths(fast_space), timeout=30, what="pod-a's job's death notice")
    # the progress line too, when the kill came before pod-a recorded it sent (a request in flight): sent again
    assert re.search(r"delivering (\d+ message\(s\) left and )?the death notice of 1 job\(s\) still running in "
                     r"outbox-pod-a\.sqlite3 by a host no process uses", err) and "Traceback" not in err, err
    death = found[0]
    assert "nightly training died (found later" in death["fallbackText"]
    facts = card_facts(death)
    assert facts["Cause"].startswith("its host pod-a is gone") and facts["Last progress"] == "epoch 3: loss 0.250"
    assert death["thread"]["name"] == progress[0]["thread"]["name"], "into the job's thread"
    # exactly once: nothing stays armed anywhere, and the next process (here or on pod-b) fires nothing more
    assert _armed(home) == 0
    again = _as_host("pod-b", "-m", "chat_magic.cli", "outbox", "flush", "--timeout", "30", env=env)
    out, err = again.communicate(timeout=90)
    assert again.returncode == 0, out + err
    assert len(deaths(fast_space)) == 1
    assert len([m for m in fast_space.messages() if "epoch 3" in (m.get("text") or "")]) == 1, "sent again: posted once"
    assert_no_secret(out, err, death)



IN_FLIGHT_JOB = """
    import sys, time, chat_magic
    with chat_magic.notify_when_done("nightly training") as n:
        n.update("epoch 3: loss 0.250")
        print("READY", flush=True)
        sys.stdin.readline()
        chat_magic.send("checkpoint saved")  # the emulator holds this request: the container dies with it in flight
        time.sleep(300)
"""


def _sending(home: Path, text: str = "") -> int:
    """Rows being sent (whose payload holds ``text``) in the outbox files of ``home``."""
    n = 0
    for f in home.glob("outbox-*.sqlite3"):
        db = sqlite3.connect(f"file:{f}?mode=ro", uri=True, timeout=10)
        try:
            n += db.execute("SELECT count(*) FROM message WHERE state='sending' AND instr(payload, ?) > 0", (text,)).fetchone()[0]
        finally:
            db.close()
    return n


@pytest.mark.slow
@pytest.mark.skipif(bool(NO_HOSTS), reason=NO_HOSTS or "")
def test_a_host_killed_with_a_request_in_flight_is_taken_over_at_once_not_after_its_lease(fast_space, tmp_path):
    """The dead host's last request left its row under a lease. No process uses the file (its liveness lock is
    free), so nothing can still be sending it: the next host's first process delivers the death notice and
    that message (same ``requestId``: posted once) at once, not minutes later when the lease runs out."""
    from test_jobs import _ns_init

    home = tmp_path / "home"
    env = script_env(fast_space, home)
    job = tmp_path / "job.py"
    job.write_text(textwrap.dedent(IN_FLIGHT_JOB), encoding="utf-8")
    pod_a = _as_host("pod-a", str(job), env=env, whole=True)
    assert pod_a.stdout.readline().strip() == "READY", pod_a.stderr.read()
    wait_until(lambda: [m for m in fast_space.messages() if "epoch 3" in (m.get("text") or "")], what="pod-a's progress line")
    fast_space.emu.inject("stall", seconds=4)
    pod_a.stdin.write("go\n")
    pod_a.stdin.flush()
    wait_until(lambda: _sending(home, "checkpoint saved"), what="pod-a's request in flight")
    os.kill(_ns_init(pod_a.pid), signal.SIGKILL)
    pod_a.wait(30)
    assert _armed(home) == 1 and deaths(fast_space) == []
    pod_b = _as_host("pod-b", "-m", "chat_magic.cli", "send", "pod-b is up", env=env)
    out, err = pod_b.communicate(timeout=90)
    assert pod_b.returncode == 0, out + err
    # pod-b's process waited for what it adopted before it exited: both are in the space already
    assert len(deaths(fast_space)) == 1, err
    # what was in flight (and the progress line, if its answer had not been recorded either)
    assert re.search(r"\d+ message\(s\) left and the death notice of 1 job\(s\) still running in outbox-pod-a", err), err
    assert [m["text"] for m in fast_space.messages() if "checkpoint saved" in (m.get("text") or "")] == ["checkpoint saved"]
    # the held request ends too (the emulator answers it after its stall): the space keeps one message per requestId
    wait_until(lambda: any(r.get("fault") == "stall" for r in fast_space.requests()), timeout=30, what="the held request's end")
    assert [m["text"] for m in fast_space.messages() if "checkpoint saved" in (m.get("text") or "")] == ["checkpoint saved"]
    assert len([m for m in fast_space.messages() if "epoch 3" in (m.get("text") or "")]) == 1
    assert _armed(home) == 0 and _sending(home) == 0
    assert_no_secret(out, err)


# -- a card the outbox cannot take yet keeps its death notice armed until it is queued --------------------------


def _armed_in(box) -> int:
    return box._db().execute("SELECT count(*) FROM message WHERE state='armed'").fetchone()[0]


@pytest.mark.slow  # the outbox is locked past the caller's 2 s: about 6 s
def test_a_card_kept_in_memory_keeps_its_death_notice_armed_until_the_card_is_queued(fast_space, monkeypatch):
    from test_hardening import _lock

    import chat_magic
    from chat_magic import deadman, delivery

    monkeypatch.setenv("CHAT_MAGIC_WATCHER", "off")  # this test's process is the one that must not die unreported
    chat_magic.send("before the lock").wait(10)
    box = delivery.dispatcher().outbox
    with chat_magic.notify_when_done("kept-block"):
        assert _armed_in(box) == 1
        locker = _lock(box.path, 5.0)  # another process holds the write lock past the caller's 2 s
    try:
        # the card waits in memory: were this process killed now, its death notice is what would be posted
        assert _armed_in(box) == 1
    finally:
        assert locker.wait(30) == 0
    wait_until(lambda: any("kept-block finished" in (m.get("fallbackText") or "") for m in fast_space.messages()),
               timeout=30, what="the card once the outbox works again")
    wait_until(lambda: _armed_in(box) == 0, timeout=10, what="the death notice disarmed with the card's transaction")
    assert deadman._undone == [] and deaths(fast_space) == []
