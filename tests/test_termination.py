"""Termination signals: a real SIGTERM, SIGHUP or Slurm SIGUSR1 to a real script inside an open block.

The block gets a card that says why it stopped, and then the process ends
exactly as it would have (killed by the same signal), or the program's own
handler runs (chained, never swallowed).
"""

from __future__ import annotations

import os
import signal
import time

import pytest
from conftest import wait_until
from test_watcher import armed_rows, card_facts, ready, script_env, start_script

BLOCK = """
    import os, signal, sys, time, chat_magic
    {before}
    with chat_magic.notify_when_done("long training") as n:
        n.update("epoch 1 done")
        print("READY", flush=True)
        for _ in range(600):
            time.sleep(0.1)
    print("BLOCK CLOSED", flush=True)
"""


def stops(space) -> list[dict]:
    return [m for m in space.messages() if "🛑" in (m.get("fallbackText") or m.get("text") or "")]


@pytest.mark.parametrize("sig, why", [
    (signal.SIGTERM, "terminated by SIGTERM"),
    (signal.SIGHUP, "SIGHUP: its terminal or SSH session closed"),
])
def test_a_termination_signal_closes_the_block_with_a_card_then_ends_the_process_as_before(fast_space, tmp_path, sig, why):
    home = tmp_path / "home"
    proc = start_script(tmp_path, BLOCK.replace("{before}", ""), script_env(fast_space, home))
    ready(proc)
    proc.send_signal(sig)
    proc.wait(30)
    assert proc.returncode == -sig  # the default action, as without chat_magic
    found = wait_until(lambda: stops(fast_space), timeout=15, what="the termination card")
    assert "long training was terminated after" in found[0]["fallbackText"]
    facts = card_facts(found[0])
    assert facts["Cause"].startswith(why) and facts["Last progress"] == "epoch 1 done"
    wait_until(lambda: armed_rows(home) == 0, what="nothing left armed")
    assert not [m for m in fast_space.messages() if "💀" in (m.get("fallbackText") or "")]  # not also a death notice


def test_in_a_kubernetes_pod_sigterm_says_the_pod_is_being_stopped(fast_space, tmp_path):
    env = script_env(fast_space, tmp_path / "home", KUBERNETES_SERVICE_HOST="10.0.0.1")
    proc = start_script(tmp_path, BLOCK.replace("{before}", ""), env)
    ready(proc)
    proc.terminate()
    proc.wait(30)
    found = wait_until(lambda: stops(fast_space), timeout=15, what="the termination card")
    assert "Kubernetes is stopping the pod" in card_facts(found[0])["Cause"]


def test_the_programs_own_handler_is_chained_not_swallowed(fast_space, tmp_path):
    before = """
    def checkpoint(sig, frame):
        print("USER HANDLER", flush=True)
        sys.exit(0)
    signal.signal(signal.SIGTERM, checkpoint)
    """
    proc = start_script(tmp_path, BLOCK.replace("{before}", before), script_env(fast_space, tmp_path / "home"))
    ready(proc)
    proc.terminate()
    out, err = proc.communicate(timeout=30)
    assert "USER HANDLER" in out and proc.returncode == 0, err
    wait_until(lambda: any("received terminated by SIGTERM" in (m.get("text") or "") for m in fast_space.messages()),
               what="the line saying the signal came")
    assert stops(fast_space) == []  # the program decided what to do: its block reported how it ended
    wait_until(lambda: any("long training finished" in (m.get("fallbackText") or "") for m in fast_space.messages()),
               what="the block's own completion card")


def test_slurm_warning_signal_says_how_long_is_left_and_runs_the_jobs_handler(fast_space, tmp_path):
    before = """
    saved = []
    def requeue(sig, frame):
        print("CHECKPOINT SAVED", flush=True)
        saved.append(sig)
    signal.signal(signal.SIGUSR1, requeue)
    """
    # the block closes once the job's handler has run (not 1.2 s after READY: a signal sent later, on a loaded
    # machine, found no block open and no handler of chat_magic's to post the line)
    body = BLOCK.replace("{before}", before).replace("for _ in range(600):", "while not saved:")
    env = script_env(fast_space, tmp_path / "home", SLURM_JOB_ID="4242", SLURM_JOB_END_TIME=str(int(time.time()) + 60))
    proc = start_script(tmp_path, body, env)
    ready(proc)
    proc.send_signal(signal.SIGUSR1)
    out, err = proc.communicate(timeout=60)
    assert "CHECKPOINT SAVED" in out and "BLOCK CLOSED" in out and proc.returncode == 0, err
    line = wait_until(lambda: [m for m in fast_space.messages() if "Slurm time limit in" in (m.get("text") or "")],
                      what="the Slurm warning line")
    assert "long training" in line[0]["text"]


def test_an_ignored_signal_stays_ignored_while_sigterm_still_reports(fast_space, tmp_path):
    before = "signal.signal(signal.SIGHUP, signal.SIG_IGN)"
    proc = start_script(tmp_path, BLOCK.replace("{before}", before), script_env(fast_space, tmp_path / "home"))
    ready(proc)
    proc.send_signal(signal.SIGHUP)  # nohup's choice: ignored, the job goes on
    time.sleep(0.5)
    assert proc.poll() is None
    proc.terminate()
    proc.wait(30)
    assert proc.returncode == -signal.SIGTERM
    found = wait_until(lambda: stops(fast_space), timeout=15, what="the termination card")
    assert len(found) == 1 and card_facts(found[0])["Cause"].startswith("terminated by SIGTERM")


def test_handlers_are_back_to_the_programs_when_no_block_is_open(fast_space):
    import chat_magic

    before = signal.getsignal(signal.SIGTERM)
    with chat_magic.notify_when_done("short"):
        assert signal.getsignal(signal.SIGTERM) is not before
    assert signal.getsignal(signal.SIGTERM) is before
    assert os.getpid()  # this process was never signalled


@pytest.mark.slow
def test_a_kernel_terminated_mid_chat_cell_posts_a_termination_card(fast_space, tmp_path):
    from test_watcher import _kernel, start_chat_cell

    home = tmp_path / "home"
    km, kc = _kernel(script_env(fast_space, home))
    try:
        kc.execute_interactive("%load_ext chat_magic", timeout=60)
        start_chat_cell(kc, home, "Sweep", "for _ in range(3000): time.sleep(0.1)")
        km.provisioner.process.send_signal(signal.SIGTERM)
        found = wait_until(lambda: stops(fast_space), timeout=15, what="the termination card")
        assert "Sweep was terminated after" in found[0]["fallbackText"]
        assert "the kernel was shut down or restarted" in card_facts(found[0])["Cause"]
        wait_until(lambda: km.provisioner.process.poll() is not None, what="the kernel to end")
        assert km.provisioner.process.returncode == -signal.SIGTERM
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
