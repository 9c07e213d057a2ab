"""Chaos: senders killed with SIGKILL (and left as zombies) while the emulator misbehaves.

    python benchmarks/chaos.py [--events 1000] [--seed 1] [--scenario kill|ctrl-c|forks|signals|all]

Sender processes post numbered events into a few threads of two spaces, with
a short pause between events; the driver SIGKILLs the running sender every
0.2-1.2 s and starts another, which goes on from the last event the outbox
holds. Killed senders are reaped only at the end, so their rows are held by
zombies. The emulator (strict, 1 request/s per space) injects 503s, 429s,
connection resets, lost replies and 3 s stalls. Finally ``chat-magic outbox
flush`` delivers what is left, and the script counts, per event: sent
(queued), delivered, lost, duplicated, and reordered (adjacent inversions
within a thread).

The process's edges (``--scenario``), each against the emulator with a real
second process taking the outbox's write lock a few ms at a time:

- ``ctrl-c``: Ctrl-C storms (real SIGINTs every 0.5-8 ms) against a process
  sending 300 events; an event whose ``send`` returned must arrive, one that
  was interrupted arrives if the outbox took it, never twice;
- ``forks``: 150 children (``os.fork`` and multiprocessing's fork context)
  each send while the parent sends from 3 threads;
- ``signals``: 12 processes whose SIGALRM handler sends (every 10 ms) while
  the main thread sends.

Each prints lost, duplicated, reordered and hung counts (all must be 0).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))  # the scenarios' child scripts: one copy, the tests'

from scenarios import FORKS, SIGNALLED, ctrl_c_storm  # noqa: E402

from chat_magic.emulator import Emulator  # noqa: E402

KEY, TOKEN = "chaos-key-" + "k" * 20, "chaos-token-" + "t" * 20
THREADS = ("a", "b", "c", "d")

SENDER = r"""
import re, sqlite3, sys, time, chat_magic
from chat_magic import config
urls, total = sys.argv[1].split(","), int(sys.argv[2])
box = config.home() / "outbox.sqlite3"
done = -1
try:
    db = sqlite3.connect(f"file:{box}?mode=ro", uri=True, timeout=10)
    for (payload,) in db.execute("SELECT payload FROM message"):
        for n in re.findall(r"ev-(\d+)", payload):
            done = max(done, int(n))
    db.close()
except sqlite3.Error:
    pass
for n in range(done + 1, total):
    thread = "abcd"[n % 4]
    chat_magic.send(f"ev-{n:05d}", to=urls[n % 2], thread_key=f"chaos-{thread}")
    time.sleep(0.03)
"""


LOCKER = r"""
import os, random, sqlite3, sys, time
path, stop = sys.argv[1:3]
db = sqlite3.connect(path, isolation_level=None, timeout=30)
slow = 0
while not os.path.exists(stop):
    t = time.monotonic()
    db.execute("BEGIN IMMEDIATE")
    slow += time.monotonic() - t > 2.0
    time.sleep(random.uniform(0.002, 0.02))
    db.execute("COMMIT")
    time.sleep(random.uniform(0.005, 0.03))
print(slow)
"""


def _texts(emu: Emulator, space: str) -> dict[str, list[str]]:
    """Delivered events per thread key, merged messages split."""
    out: dict[str, list[str]] = {}
    for m in emu.messages(space=space):
        out.setdefault(m["thread"]["threadKey"], []).extend(p for p in m.get("text", "").split("\n\n") if p)
    return out


def _reordered(threads: dict[str, list[str]], keys: tuple[str, ...]) -> int:
    return sum(1 for k in keys for a, b in zip(threads.get(k, []), threads.get(k, [])[1:]) if b < a)


def _edge_env(home: Path) -> dict[str, str]:
    env = dict(os.environ, CHAT_MAGIC_HOME=str(home), CHAT_MAGIC_CONFIG=str(home / "none.toml"),
               PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    for name in ("GOOGLE_CHAT_WEBHOOK_URL", "CHAT_MAGIC_REDIS_URL"):
        env.pop(name, None)
    return env


def _outbox_of(home: Path, env: dict[str, str]) -> Path:
    out = subprocess.run([sys.executable, "-m", "chat_magic.cli", "outbox", "path"], env=env, capture_output=True, text=True)
    return Path(out.stdout.strip())


def _with_locker(home: Path, env: dict[str, str]) -> tuple[subprocess.Popen, Path]:
    subprocess.run([sys.executable, "-c", "from chat_magic import delivery; delivery.dispatcher()"], env=env, check=True)
    stop = home / "locker.stop"
    return subprocess.Popen([sys.executable, "-c", LOCKER, str(_outbox_of(home, env)), str(stop)],
                            stdout=subprocess.PIPE, text=True), stop


def _stop_locker(locker: subprocess.Popen, stop: Path) -> int:
    stop.touch()
    out, _ = locker.communicate(timeout=60)
    return int(out.strip() or 0)


def _report(name: str, sent: int, delivered: int, lost: int, dups: int, reordered: int, hung: int, extra: str) -> bool:
    print(f"{name}: events sent {sent}, delivered {delivered}, lost {lost}, duplicated {dups}, reordered {reordered}, "
          f"hung {hung}; {extra}")
    return not (lost or dups or reordered or hung)


def ctrl_c(rnd: random.Random, runs: int = 10) -> bool:
    """Storms of real SIGINTs; a process stopped by one (outside its try) is a program stopped by Ctrl-C."""
    emu = Emulator(key=KEY, token=TOKEN, qps=None, strict=True).start()
    url = emu.webhook_url(space="CHAOSC", key=KEY, token=TOKEN)
    hung = presses = kept_out = stopped = 0
    confirmed: set[str] = set()
    t0 = time.monotonic()
    home = Path(tempfile.mkdtemp(prefix="chaos-ctrl-c-"))
    env = _edge_env(home)
    locker, stop = _with_locker(home, env)
    for run in range(runs):
        pressed, returned, code, _, _ = ctrl_c_storm(url, run, env, rnd)
        presses += pressed
        hung += code is None
        stopped += bool(code)
        confirmed |= returned
    kept_out += _stop_locker(locker, stop)
    flushed = subprocess.run([sys.executable, "-m", "chat_magic.cli", "outbox", "flush", "--timeout", "120"], env=env,
                             capture_output=True, text=True)
    got = [t for t in _texts(emu, "CHAOSC").get("storm", []) if not t.endswith("warm")]
    emu.stop()
    lost = len(confirmed - set(got))
    reordered = sum(_reordered({"t": [t for t in got if t.startswith(f"storm-{r}-")]}, ("t",)) for r in range(runs))
    return _report("ctrl-c", len(confirmed), len(set(got)), lost, len(got) - len(set(got)), reordered, hung,
                   f"{runs} storms, {presses} Ctrl-C presses ({stopped} process(es) stopped by one), another process "
                   f"kept out > 2 s {kept_out} time(s), final flush exit {flushed.returncode}; {time.monotonic() - t0:.0f} s")


def signals(runs: int = 12) -> bool:
    emu = Emulator(key=KEY, token=TOKEN, qps=None, strict=True).start()
    sent = delivered = lost = dups = reordered = hung = handled_total = 0
    t0 = time.monotonic()
    for run in range(runs):
        space = f"CHAOSS{run}"
        url = emu.webhook_url(space=space, key=KEY, token=TOKEN)
        home = Path(tempfile.mkdtemp(prefix="chaos-signals-"))
        out = home / "handled.json"
        try:
            subprocess.run([sys.executable, "-c", SIGNALLED, url, str(out)], env=_edge_env(home), timeout=150,
                           capture_output=True)
        except subprocess.TimeoutExpired:
            hung += 1
        handled = json.loads(out.read_text()) if out.exists() else 0
        handled_total += handled
        want = {f"main-{i:04d}" for i in range(60)} | {f"sig-{k:04d}" for k in range(handled)}
        threads = _texts(emu, space)
        got = [t for k in threads for t in threads[k]]
        sent += len(want)
        delivered += len(set(got) & want)
        lost += len(want - set(got))
        dups += len(got) - len(set(got))
        reordered += _reordered(threads, ("main",))
    emu.stop()
    return _report("signals", sent, delivered, lost, dups, reordered, hung,
                   f"{runs} processes, {handled_total} sends from a SIGALRM handler; {time.monotonic() - t0:.0f} s")


def forks(n: int = 150) -> bool:
    emu = Emulator(key=KEY, token=TOKEN, qps=None, strict=True).start()
    url = emu.webhook_url(space="CHAOSF", key=KEY, token=TOKEN)
    home = Path(tempfile.mkdtemp(prefix="chaos-forks-"))
    out = home / "forks.json"
    t0 = time.monotonic()
    hung_parent = 0
    try:
        subprocess.run([sys.executable, "-c", FORKS, url, str(n), str(out)], env=_edge_env(home), timeout=400,
                       capture_output=True)
    except subprocess.TimeoutExpired:
        hung_parent = 1
    result = json.loads(out.read_text()) if out.exists() else {"hung": [], "failed": [], "parent": []}
    threads = _texts(emu, "CHAOSF")
    got = [t for k in threads for t in threads[k]]
    want = {f"child-{i:04d}" for i in range(n)} | set(result["parent"]) | {"parent-start"}
    emu.stop()
    return _report("forks", len(want), len(set(got) & want), len(want - set(got)), len(got) - len(set(got)),
                   _reordered(threads, ("p0", "p1", "p2")), len(result["hung"]) + hung_parent,
                   f"{n} forks ({len(result['failed'])} failed) while 3 parent threads sent; "
                   f"{time.monotonic() - t0:.0f} s")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--scenario", choices=("kill", "ctrl-c", "forks", "signals", "all"), default="kill")
    args = p.parse_args(argv)
    rnd = random.Random(args.seed)
    if args.scenario != "kill":
        ok = True
        for name, run in (("ctrl-c", lambda: ctrl_c(rnd)), ("forks", forks), ("signals", signals)):
            if args.scenario in (name, "all"):
                ok = run() and ok
        if args.scenario != "all":
            return 0 if ok else 1
        return (0 if ok else 1) | kill_storm(args, rnd)
    return kill_storm(args, rnd)


def kill_storm(args: argparse.Namespace, rnd: random.Random) -> int:
    emu = Emulator(key=KEY, token=TOKEN, qps=1.0, strict=True, seed=args.seed).start()
    for fault, prob in (("503", 0.08), ("429", 0.04), ("reset", 0.04), ("lost_reply", 0.05)):
        emu.inject(fault, probability=prob)
    emu.inject("stall", probability=0.02, seconds=3.0)
    urls = [emu.webhook_url(space="CHAOSA", key=KEY, token=TOKEN), emu.webhook_url(space="CHAOSB", key=KEY, token=TOKEN)]
    home = Path(tempfile.mkdtemp(prefix="chaos-"))
    env = dict(os.environ, CHAT_MAGIC_HOME=str(home), CHAT_MAGIC_EXIT_TIMEOUT="0", CHAT_MAGIC_CONFIG=str(home / "none.toml"))
    env.pop("GOOGLE_CHAT_WEBHOOK_URL", None)
    kills, zombies, t0 = 0, [], time.monotonic()
    while True:
        proc = subprocess.Popen([sys.executable, "-c", SENDER, ",".join(urls), str(args.events)], env=env)
        try:
            proc.wait(rnd.uniform(0.2, 1.2))
            break  # it queued every event and exited
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            kills += 1
            zombies.append(proc)  # reaped at the end: until then its rows are held by a zombie
    out = subprocess.run([sys.executable, "-m", "chat_magic.cli", "outbox", "flush", "--timeout", "300"],
                         env=env, capture_output=True, text=True)
    for z in zombies:
        z.wait()
    elapsed = time.monotonic() - t0
    emu.clear_faults()
    events: dict[str, list[int]] = {t: [] for t in THREADS}
    for space in ("CHAOSA", "CHAOSB"):
        for m in emu.messages(space=space):
            thread = m["thread"]["threadKey"].rsplit("-", 1)[1]
            events[thread] += [int(n) for n in re.findall(r"ev-(\d+)", m.get("text", ""))]
    seen = [n for t in THREADS for n in events[t]]
    delivered = len(set(seen))
    dups = len(seen) - delivered
    reordered = sum(1 for t in THREADS for a, b in zip(events[t], events[t][1:]) if b < a)
    stats = emu.stats()
    emu.stop()
    print(f"events sent {args.events}, delivered {delivered}, lost {args.events - delivered}, duplicated {dups}, "
          f"reordered {reordered}; {kills} SIGKILLs (zombies until the end); faults {stats.get('faults')}; "
          f"final flush exit {out.returncode}; {elapsed:.0f} s")
    if out.returncode:
        print(out.stderr.strip())
    return 0 if delivered == args.events and not dups and not reordered else 1


if __name__ == "__main__":
    sys.exit(main())
