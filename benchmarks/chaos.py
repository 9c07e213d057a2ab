"""Chaos: senders killed with SIGKILL (and left as zombies) while the emulator misbehaves.

    python benchmarks/chaos.py [--events 1000] [--seed 1]

Sender processes post numbered events into a few threads of two spaces, with
a short pause between events; the driver SIGKILLs the running sender every
0.2-1.2 s and starts another, which goes on from the last event the outbox
holds. Killed senders are reaped only at the end, so their rows are held by
zombies. The emulator (strict, 1 request/s per space) injects 503s, 429s,
connection resets, lost replies and 3 s stalls. Finally ``chat-magic outbox
flush`` delivers what is left, and the script counts, per event: sent
(queued), delivered, lost, duplicated, and reordered (adjacent inversions
within a thread).
"""

from __future__ import annotations

import argparse
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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--events", type=int, default=1000)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args(argv)
    rnd = random.Random(args.seed)
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
