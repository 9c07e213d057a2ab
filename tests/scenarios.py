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
"""

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
                pass
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
