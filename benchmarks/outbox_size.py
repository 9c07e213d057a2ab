"""The first ``send()`` of a process on a 1 GB outbox vs an empty one (issue 16, item 7).

Builds two outboxes in temporary folders: an empty one, and one holding
delivered rows of 5 KB until the file reaches ``--gb`` GB (written with
``executemany``, as months of use would leave them). Then, for each, starts
fresh processes that import chat_magic and time their first
``chat_magic.send()`` (to a closed loopback port: only the queueing is timed),
``--runs`` times, and prints the medians and their ratio. For contrast, it
also times the ``PRAGMA quick_check`` that every first ``send()`` used to run.

    python benchmarks/outbox_size.py            # 1 GB, 5 runs each
    python benchmarks/outbox_size.py --gb 0.2   # quicker

The result goes to stdout and to ``benchmarks/results-outbox.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
URL = "http://127.0.0.1:9/v1/spaces/BENCH/messages?key=bench-key-0000000000000000&token=bench-token-000000000000"
CHILD = """
import time, chat_magic
t = time.perf_counter()
chat_magic.send("the first notice of this process")
print(time.perf_counter() - t)
"""


def build(home: Path, gigabytes: float) -> Path:
    from chat_magic.hosts import outbox_path
    from chat_magic.outbox import Outbox
    from chat_magic.webhook import parse_webhook_url

    path = outbox_path(home)
    box = Outbox(path)
    box.enqueue(parse_webhook_url(URL), None, [(json.dumps({"text": "seed"}), False)])
    box.close()
    db = sqlite3.connect(path)
    db.execute("UPDATE message SET state = 'sent'")  # nothing waits: the worker stays idle in both
    db.commit()
    if gigabytes <= 0:
        db.close()
        return path
    dest, space = db.execute("SELECT dest, space_key FROM message").fetchone()
    filler = "x" * 5000
    now = time.time() - 86400
    rows = int(gigabytes * 1e9 / 5200)
    for start in range(0, rows, 20_000):
        db.executemany(
            "INSERT INTO message (request_id, dest, space_key, payload, state, next_at, created_at, updated_at)"
            " VALUES (?,?,?,?, 'sent', ?,?,?)",
            ((f"cm-old-{i}", dest, space, json.dumps({"text": f"old {i} {filler}"}), now, now, now)
             for i in range(start, min(rows, start + 20_000))))
        db.commit()
    db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    db.close()
    return path


def first_send(home: Path, runs: int, code: str | None = None) -> float:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_MAGIC_", "GOOGLE_CHAT_"))}
    env["PYTHONPATH"] = code or str(HERE.parent)  # this checkout, unless another is compared
    env.update(CHAT_MAGIC_HOME=str(home), CHAT_MAGIC_CONFIG=str(home / "none.toml"), GOOGLE_CHAT_WEBHOOK_URL=URL,
               CHAT_MAGIC_EXIT_TIMEOUT="0")
    times = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=home, capture_output=True, text=True, timeout=600, check=True)
        times.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(times)


def quick_check(path: Path) -> float:
    db = sqlite3.connect(path)
    t = time.perf_counter()
    db.execute("PRAGMA quick_check(1)").fetchone()
    took = time.perf_counter() - t
    db.close()
    return took


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--gb", type=float, default=1.0)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--compare", metavar="CHECKOUT", help="also time another checkout of chat_magic (e.g. /work/main)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        empty, big = Path(tmp) / "empty", Path(tmp) / "big"
        build(empty, 0)
        t = time.perf_counter()
        path = build(big, args.gb)
        size = path.stat().st_size
        built = time.perf_counter() - t
        small, large = first_send(empty, args.runs), first_send(big, args.runs)
        before = (first_send(empty, args.runs, args.compare), first_send(big, args.runs, args.compare)) if args.compare else None
        check = quick_check(path)
    lines = [
        f"# The first send() vs the outbox's size ({time.strftime('%Y-%m-%d')}, Python {sys.version.split()[0]}, {os.cpu_count()} cores)",
        "",
        f"| outbox | first `send()` (median of {args.runs} fresh processes) |",
        "| --- | --- |",
        f"| empty | {small * 1000:.1f} ms |",
        f"| {size / 1e9:.2f} GB of delivered rows (built in {built:.0f} s) | {large * 1000:.1f} ms |",
        "",
        f"Ratio {size / 1e9:.2f} GB / empty: **{large / small:.2f}×** (goal: about 1, no scan of the file).",
        f"For contrast, the `PRAGMA quick_check` every first `send()` ran before: {check:.2f} s on that file.",
    ]
    if before:
        lines.append(f"The same with {args.compare} (side by side, same files): empty {before[0] * 1000:.1f} ms, "
                     f"{size / 1e9:.2f} GB {before[1] * 1000:.1f} ms, ratio {before[1] / before[0]:.2f}×.")
    text = "\n".join(lines) + "\n"
    print(text)
    (HERE / "results-outbox.md").write_text(text)


if __name__ == "__main__":
    main()
