"""Many threads of one process sending at once: send() latency and errors, two code trees side by side.

    python benchmarks/threads.py [--old /path/to/older/checkout] [--threads 32] [--sends 20]

Each tree runs in its own process (same machine, same emulator, one after
the other, three rounds alternating): ``--threads`` threads each call
``send()`` ``--sends`` times as fast as they can while the worker delivers.
Prints p50/p99 of one ``send()`` call and how many raised, per tree, and the
ratio new/old; then the same with 96 threads, errors only.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from chat_magic.emulator import Emulator  # noqa: E402

KEY, TOKEN = "bench-key-" + "k" * 20, "bench-token-" + "t" * 20

RUN = r"""
import json, sys, threading, time
import chat_magic
url, n_threads, n_sends = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
chat_magic.send("warm up", to=url).wait(30)
times, errors = [], []
start = threading.Barrier(n_threads)

def sender(k):
    start.wait()
    for j in range(n_sends):
        t = time.perf_counter()
        try:
            chat_magic.send(f"t{k}-{j}", to=url, thread_key=f"t{k}")
        except Exception as e:
            errors.append(type(e).__name__)
        times.append(time.perf_counter() - t)

threads = [threading.Thread(target=sender, args=(k,)) for k in range(n_threads)]
for t in threads:
    t.start()
for t in threads:
    t.join()
times.sort()
print(json.dumps({"p50": times[len(times) // 2], "p99": times[int(len(times) * 0.99)], "errors": len(errors)}))
chat_magic.flush(300)
"""


def run(tree: Path, url: str, threads: int, sends: int) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="bench-threads-"))
    env = dict(os.environ, PYTHONPATH=str(tree), PYTHONDONTWRITEBYTECODE="1", CHAT_MAGIC_HOME=str(home),
               CHAT_MAGIC_CONFIG=str(home / "none.toml"))
    env.pop("GOOGLE_CHAT_WEBHOOK_URL", None)
    out = subprocess.run([sys.executable, "-c", RUN, url, str(threads), str(sends)], env=env, cwd=home,
                         capture_output=True, text=True, timeout=900)
    line = out.stdout.strip().splitlines()[0] if out.stdout.strip() else "{}"
    return json.loads(line)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old", type=Path, help="an older checkout to compare with (its folder holding chat_magic/)")
    p.add_argument("--threads", type=int, default=32)
    p.add_argument("--sends", type=int, default=20)
    args = p.parse_args(argv)
    new = Path(__file__).resolve().parents[1]
    trees = {"new": new} | ({"old": args.old.resolve()} if args.old else {})
    emu = Emulator(key=KEY, token=TOKEN, qps=None, strict=True).start()
    results: dict[str, list[dict[str, float]]] = {name: [] for name in trees}
    for rnd in range(3):
        for name, tree in (trees.items() if rnd % 2 == 0 else reversed(list(trees.items()))):
            url = emu.webhook_url(space=f"BENCH{name.upper()}{rnd}", key=KEY, token=TOKEN)
            results[name].append(run(tree, url, args.threads, args.sends))
    for name, rs in results.items():
        p50 = sorted(r["p50"] for r in rs)[1] * 1000
        p99 = sorted(r["p99"] for r in rs)[1] * 1000
        errors = sum(int(r["errors"]) for r in rs)
        print(f"{name}: {args.threads} threads x {args.sends} sends: p50 {p50:.1f} ms, p99 {p99:.1f} ms "
              f"(median of 3 rounds), {errors} send(s) raised")
    if "old" in results:
        ratio = lambda k: sorted(r[k] for r in results["new"])[1] / max(1e-9, sorted(r[k] for r in results["old"])[1])  # noqa: E731
        print(f"new/old: p50 x{ratio('p50'):.2f}, p99 x{ratio('p99'):.2f}")
    for name, tree in trees.items():
        url = emu.webhook_url(space=f"BENCH96{name.upper()}", key=KEY, token=TOKEN)
        r = run(tree, url, 96, 8)
        print(f"{name}: 96 threads x 8 sends: {int(r.get('errors', -1))} send(s) raised, p99 {r.get('p99', 0) * 1000:.0f} ms")
    emu.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
