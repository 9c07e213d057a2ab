"""A completion card sent from a signal handler, while the main thread is inside the outbox, at exit.

A signal handler that runs while the main thread is inside ``send()`` or an
outbox call cannot wait for the outbox: what it sends is kept in memory and
queued when the interrupted call returns (``delivery._send_later``). When the
handler closes a block (its completion card) and the process then ends, the
card must still be queued and delivered within the exit wait, and the block's
death notice must go with it: no "💀 ... exited ... without closing it" for a
block that did complete. Before, the card kept in memory lost its ``disarm``
(the armed death notice stayed, and a later process or the watcher posted
it), and the exit hook never queued what was still kept in memory.

Real processes: the signal is a real ``SIGUSR1``, sent by the process to
itself from a trace function the moment its main thread enters the outbox
call (so the handler runs inside it); the emulator receives over loopback.
"""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import wait_until

import chat_magic
from chat_magic.hosts import outbox_path

ROOT = Path(chat_magic.__file__).resolve().parents[1]

SCRIPT = r"""
import os, signal, sys
import chat_magic

url, where, then = sys.argv[1], sys.argv[2], sys.argv[3]
n = chat_magic.notify_when_done("nightly job", to=url)
n.__enter__()
first = chat_magic.send("step 1", to=url)
state = {"fired": False, "closed": False}

def handler(sig, frame):
    state["inside"] = frame.f_code.co_name
    n.__exit__(None, None, None)  # the job ends in the handler: its completion card
    state["closed"] = True
    if then == "exit":
        raise SystemExit(0)

def tracer(frame, event, arg):
    if not state["fired"] and frame.f_code.co_name == where and frame.f_globals.get("__name__") == "chat_magic.outbox":
        state["fired"] = True
        os.kill(os.getpid(), signal.SIGUSR1)  # handled on the next line run here: inside the outbox call
    return None

signal.signal(signal.SIGUSR1, handler)
sys.settrace(tracer)
try:
    if where == "enqueue":
        chat_magic.send("step 2", to=url)  # inside send(), holding the outbox
    else:
        first.status  # an outbox read (Outbox.rows), outside send()
finally:
    sys.settrace(None)
    print(f"fired={state['fired']} closed={state['closed']}", flush=True)
"""


def _env(home: Path, **more: str) -> dict[str, str]:
    env = dict(os.environ, CHAT_MAGIC_HOME=str(home), CHAT_MAGIC_CONFIG=str(home / "none.toml"), PYTHONPATH=str(ROOT),
               CHAT_MAGIC_EXIT_TIMEOUT="20", **more)
    for name in ("GOOGLE_CHAT_WEBHOOK_URL", "CHAT_MAGIC_REDIS_URL", "CHAT_MAGIC_THREAD_KEY"):
        env.pop(name, None)
    return env


def _texts(space) -> list[str]:
    out = []
    for m in space.messages():
        out.append(" ".join([m.get("text") or "", m.get("fallbackText") or "", json.dumps(m.get("cardsV2") or [])]))
    return out


def _stored(home: Path) -> list[tuple[str, str]]:
    """(state, payload) of every row in the host's outbox, read only."""
    db = sqlite3.connect(f"file:{outbox_path(home)}?mode=ro", uri=True)
    try:
        return [(str(s), str(p)) for s, p in db.execute("SELECT state, payload FROM message")]
    finally:
        db.close()


@pytest.mark.parametrize(("where", "then"), [("enqueue", "return"), ("enqueue", "exit"), ("rows", "return"), ("rows", "exit")])
def test_a_completion_card_sent_from_a_signal_handler_is_delivered_and_no_death_notice_follows(fast_space, tmp_path,
                                                                                               where, then):
    home = tmp_path / "home"
    home.mkdir()
    done = subprocess.run([sys.executable, "-c", SCRIPT, fast_space.url, where, then], env=_env(home),
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 0, done.stderr
    assert "fired=True closed=True" in done.stdout, (done.stdout, done.stderr)
    # delivered by the exiting process itself, within its exit wait
    rows = _stored(home)
    cards = [p for s, p in rows if "nightly job" in p and "💀" not in p]
    assert cards and all(s == "sent" for s, p in rows if "nightly job" in p and "💀" not in p), rows
    # and the block's death notice went with it: nothing armed left for the watcher or a later process to fire
    assert not [s for s, p in rows if s == "armed" or "💀" in p], rows
    wait_until(lambda: any("nightly job" in t for t in _texts(fast_space)), what="the completion card")
    # a later process on this host fires whatever a dead process left armed: nothing may come of it
    later = subprocess.run([sys.executable, "-m", "chat_magic.cli", "outbox", "flush", "--timeout", "20"], env=_env(home),
                           capture_output=True, text=True, timeout=120)
    assert later.returncode == 0, later.stderr
    assert not [t for t in _texts(fast_space) if "💀" in t or "without closing" in t], _texts(fast_space)
