"""The child processes of the interrupt, signal and fork scenarios: one copy for the tests and the chaos benchmark.

``tests/test_interrupts.py`` runs each once with its assertions; ``benchmarks/chaos.py``
runs them at length and counts. Each is a script for ``python -c SCRIPT ARGS...`` (a real
process: a real SIGINT, a real SIGALRM handler, a real ``os.fork``).

- :data:`STORM` ``URL RUN N``: sends ``storm-RUN-0000``... (thread ``storm``) while the
  parent presses Ctrl-C; prints ``ready``, then ``ok TEXT`` for each send that returned,
  then ``done``.
- :data:`SIGNALLED` ``URL OUT``: sends ``main-0000``..``main-0059`` (thread ``main``) while
  a SIGALRM handler sends ``sig-0000``... (thread ``sig``) every 10 ms; writes how many the
  handler sent to OUT.
- :data:`FORKS` ``URL N OUT``: N children (``os.fork`` and multiprocessing's fork context)
  each send ``child-NNNN`` (thread ``children``) while 3 parent threads send
  ``parent-K-NNNN`` (threads ``p0``..``p2``); writes ``{"hung", "failed", "parent"}`` to OUT.

:func:`ctrl_c_storm` runs :data:`STORM` under the Ctrl-C storm.
"""

from __future__ import annotations

import os
import random
import re
import signal
import subprocess
import sys
import threading
import time

STORM = r"""
import signal, sys
import chat_magic
url, run, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
chat_magic.send(f"storm-{run}-warm", to=url, thread_key="storm")  # loaded and opened: the storm is about sending
print("ready", flush=True)
it = iter(range(n))
while True:
    try:
        for i in it:
            try:
                chat_magic.send(f"storm-{run}-{i:04d}", to=url, thread_key="storm")
                print(f"ok storm-{run}-{i:04d}", flush=True)
            except KeyboardInterrupt:
                print("^C", flush=True)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        break
    except KeyboardInterrupt:
        continue
print("done", flush=True)
sys.exit(0 if chat_magic.flush(120) else 4)
"""

SIGNALLED = r"""
import json, signal, sys
import chat_magic
url, out = sys.argv[1], sys.argv[2]
handled = []

def handler(signum, frame):
    k = len(handled)
    handled.append(k)
    chat_magic.send(f"sig-{k:04d}", to=url, thread_key="sig")

signal.signal(signal.SIGALRM, handler)
signal.setitimer(signal.ITIMER_REAL, 0.0005, 0.01)  # from before the first send: its setup is hit too
for i in range(60):
    chat_magic.send(f"main-{i:04d}", to=url, thread_key="main")
signal.setitimer(signal.ITIMER_REAL, 0, 0)
json.dump(len(handled), open(out, "w"))
sys.exit(0 if chat_magic.flush(120) else 4)
"""

FORKS = r"""
import json, multiprocessing as mp, os, sys, threading, time
import chat_magic
url, n, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
stop = threading.Event()
parent_sent = []

def parent(k):
    j = 0
    while not stop.is_set():
        chat_magic.send(f"parent-{k}-{j:04d}", to=url, thread_key=f"p{k}")
        parent_sent.append(f"parent-{k}-{j:04d}")
        j += 1
        time.sleep(0.005)

def child(i):
    try:
        chat_magic.send(f"child-{i:04d}", to=url, thread_key="children")
    except BaseException as e:
        sys.stderr.write(f"child {i}: {type(e).__name__}: {e}\n")
        sys.stderr.flush()
        os._exit(3)
    os._exit(0)

chat_magic.send("parent-start", to=url, thread_key="p")  # loaded first (a fork while threads load it: see the report)
threads = [threading.Thread(target=parent, args=(k,)) for k in range(3)]
for t in threads:
    t.start()
ctx = mp.get_context("fork")
hung, failed = [], []
for i in range(n):
    if i % 2:
        p = ctx.Process(target=child, args=(i,))
        p.start()
        p.join(20)
        if p.is_alive():
            hung.append(i)
            p.kill()
            p.join()
        elif p.exitcode:
            failed.append(i)
        continue
    pid = os.fork()
    if pid == 0:
        child(i)
    deadline = time.monotonic() + 20
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            if os.waitstatus_to_exitcode(status):
                failed.append(i)
            break
        if time.monotonic() > deadline:
            hung.append(i)
            os.kill(pid, 9)
            os.waitpid(pid, 0)
            break
        time.sleep(0.002)
stop.set()
for t in threads:
    t.join()
json.dump({"hung": hung, "failed": failed, "parent": parent_sent}, open(out, "w"))
sys.exit(0 if chat_magic.flush(180) else 4)
"""


def ctrl_c_storm(url: str, run: int, env: dict[str, str], rnd: random.Random) -> tuple[int, set[str], int | None, str, int]:
    """One :data:`STORM` process sending 300 events under real SIGINTs every 0.5-8 ms.

    Returns (presses, the events whose send returned, its exit code or None when it hung and
    was killed, its stderr, how many Ctrl-C its sends raised: none means none landed). Like a user's program, it may be stopped by a Ctrl-C that lands
    outside its ``try`` (a KeyboardInterrupt traceback): what it queued must still be delivered.
    """
    proc = subprocess.Popen([sys.executable, "-c", STORM, url, str(run), "300"], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(proc.stdout))  # type: ignore[arg-type]
    reader.start()
    presses = 0
    deadline = time.monotonic() + 120
    while proc.poll() is None and "done\n" not in lines and time.monotonic() < deadline:
        os.kill(proc.pid, signal.SIGINT)
        presses += 1
        time.sleep(rnd.uniform(0.0005, 0.008))
    try:
        _, stderr = proc.communicate(timeout=150)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return presses, set(), None, "", 0
    finally:
        reader.join(10)
    # a print cut by Ctrl-C runs into the next one: take every whole name
    text = "".join(lines)
    return presses, set(re.findall(r"storm-\d+-\d{4}", text)), proc.returncode, stderr, text.count("^C")
