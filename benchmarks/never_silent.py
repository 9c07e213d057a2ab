#!/usr/bin/env python
"""What "never silent" costs: the watcher at idle, the added time per block, send() and cell, Redis heartbeats.

    python benchmarks/never_silent.py [--quick] [--out PATH]

- *watcher at idle*: a script opens a ``notify_when_done`` block and sleeps;
  its watcher's resident memory (``VmRSS``) and the CPU it uses over the idle
  period (``utime + stime`` from ``/proc``), next to a bare ``python -c
  'sleep'`` for scale;
- *added overhead*: in fresh processes, side by side in one run, the median
  time of one ``notify_when_done`` block (open and close: the death notice is
  armed and disarmed), of one ``send()``, and of one ``%%chat`` cell in a real
  IPython shell, with ``CHAT_MAGIC_WATCHER=off`` and with the watcher; the
  figure is the ratio (the first block of a process, which spawns the
  watcher, is reported on its own);
- *heartbeat traffic*: one open block with ``CHAT_MAGIC_REDIS_URL`` against a
  real ``redis-server``: commands and bytes per beat, per hour at the default
  beat (15 s).

Messages go to the project's emulator over loopback. Writes a markdown table
to stdout and to ``benchmarks/never_silent_results.md``. A measurement, not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

KEY, TOKEN = "bench-key-" + "k" * 20, "bench-token-" + "t" * 20


def _env(url: str, home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_MAGIC_", "GOOGLE_CHAT_"))}
    env.update(GOOGLE_CHAT_WEBHOOK_URL=url, CHAT_MAGIC_HOME=str(home), CHAT_MAGIC_CONFIG=str(home / "none.toml"),
               PYTHONPATH=str(ROOT), **extra)
    return env


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        fields = f.read().rsplit(b")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def watcher_idle(url: str, tmp: Path, idle: float) -> dict:
    body = ("import time, chat_magic\nfrom chat_magic import watcher\nwith chat_magic.notify_when_done('idle'):\n"
            f"    print(watcher.pid(), flush=True)\n    time.sleep({idle + 5})\n")
    proc = subprocess.Popen([sys.executable, "-c", body], env=_env(url, tmp / "idle"), stdout=subprocess.PIPE, text=True)
    wpid = int(proc.stdout.readline())
    time.sleep(1.0)
    cpu0, t0 = _cpu_s(wpid), time.monotonic()
    time.sleep(idle)
    cpu1, t1 = _cpu_s(wpid), time.monotonic()
    rss = _rss_kib(wpid)
    proc.kill()
    proc.wait()
    bare = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    time.sleep(1.0)
    bare_rss = _rss_kib(bare.pid)
    bare.kill()
    bare.wait()
    return {"rss_mib": rss / 1024, "bare_rss_mib": bare_rss / 1024, "cpu_pct": 100 * (cpu1 - cpu0) / (t1 - t0),
            "idle_s": t1 - t0}


OVERHEAD = r"""
import json, statistics, sys, time
import chat_magic
n = int(sys.argv[1])
t = time.perf_counter()
with chat_magic.notify_when_done("first"):
    pass
first = time.perf_counter() - t
blocks, sends = [], []
for i in range(n):
    t = time.perf_counter()
    with chat_magic.notify_when_done("b", on="error"):
        pass
    blocks.append(time.perf_counter() - t)
for i in range(n):
    t = time.perf_counter()
    chat_magic.send(f"line {i}")
    sends.append(time.perf_counter() - t)
from IPython.core.interactiveshell import InteractiveShell
ip = InteractiveShell.instance()
ip.run_cell("%load_ext chat_magic")
ip.run_cell("%%chat --on-error\nx = 1")
cells, plain = [], []
for i in range(n // 4):
    t = time.perf_counter(); ip.run_cell("%%chat --on-error\nx = 1"); cells.append(time.perf_counter() - t)
    t = time.perf_counter(); ip.run_cell("x = 1"); plain.append(time.perf_counter() - t)
print(json.dumps({"first": first, "block": statistics.median(blocks), "send": statistics.median(sends),
                  "cell": statistics.median(cells) - statistics.median(plain)}))
chat_magic.flush(60)
"""


def overhead(url: str, tmp: Path, n: int, rounds: int, baseline: str | None = None) -> dict:
    modes = ("off", "on") + (("baseline",) if baseline else ())
    got: dict[str, list[dict]] = {m: [] for m in modes}
    for r in range(rounds):
        for mode in modes:  # alternating, in one run
            env = _env(url, tmp / f"ovh-{mode}-{r}", CHAT_MAGIC_WATCHER="off" if mode == "off" else "on")
            if mode == "baseline":
                env["PYTHONPATH"] = baseline  # another checkout (e.g. before dead-man notices), same script
            out = subprocess.run([sys.executable, "-c", OVERHEAD, str(n)], env=env, capture_output=True, text=True, timeout=600)
            got[mode].append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {mode: {k: statistics.median(x[k] for x in runs) for k in runs[0]} for mode, runs in got.items()}


def heartbeat(url: str, tmp: Path, seconds: float) -> dict | None:
    from cluster_support import RedisServer

    if not shutil.which("redis-server"):
        return None
    server = RedisServer(tmp / "redis").start()
    try:
        body = f"import time, chat_magic\nwith chat_magic.notify_when_done('beating'):\n    time.sleep({seconds + 2})\n"
        env = _env(url, tmp / "beat", CHAT_MAGIC_REDIS_URL=server.url, CHAT_MAGIC_HEARTBEAT="1")
        with server.client() as c:
            time.sleep(0.5)
            proc = subprocess.Popen([sys.executable, "-c", body], env=env)
            time.sleep(3.0)  # the first beat and the pacing probes are done
            s0, c0 = c.info("stats"), c.info("commandstats")
            time.sleep(seconds)
            s1, c1 = c.info("stats"), c.info("commandstats")
            proc.wait(60)
        beats = seconds / 1.0
        cmds = sum(v["calls"] for v in c1.values()) - sum(v["calls"] for v in c0.values()) - 2  # minus our INFOs
        inb = s1["total_net_input_bytes"] - s0["total_net_input_bytes"]
        outb = s1["total_net_output_bytes"] - s0["total_net_output_bytes"]
        return {"cmds_per_beat": cmds / beats, "bytes_in_per_beat": inb / beats, "bytes_out_per_beat": outb / beats}
    finally:
        server.stop()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "never_silent_results.md"))
    p.add_argument("--baseline", metavar="DIR", help="also time another checkout of chat_magic (e.g. main) in the same run")
    args = p.parse_args()
    from chat_magic.emulator import Emulator

    emu = Emulator(key=KEY, token=TOKEN, qps=None, strict=True).start()
    url = emu.webhook_url(space="BENCH", key=KEY, token=TOKEN)
    tmp = Path(tempfile.mkdtemp(prefix="cm-bench-"))
    try:
        idle = watcher_idle(url, tmp, 10.0 if args.quick else 60.0)
        ovh = overhead(url, tmp, 100 if args.quick else 400, 1 if args.quick else 3, args.baseline)
        beat = heartbeat(url, tmp, 5.0 if args.quick else 20.0)
    finally:
        emu.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    off, on = ovh["off"], ovh["on"]
    rows = [
        ("watcher resident memory at idle", f"{idle['rss_mib']:.1f} MiB (a bare `python -c sleep`: {idle['bare_rss_mib']:.1f} MiB)"),
        ("watcher CPU at idle", f"{idle['cpu_pct']:.3f} % of one core over {idle['idle_s']:.0f} s"),
        ("first block of a process (spawns the watcher)", f"{on['first'] * 1e3:.1f} ms vs {off['first'] * 1e3:.1f} ms off "
                                                          f"({on['first'] / off['first']:.2f}×)"),
        ("one `notify_when_done` block, median", f"{on['block'] * 1e3:.2f} ms vs {off['block'] * 1e3:.2f} ms off "
                                                 f"({on['block'] / off['block']:.2f}×)"),
        ("one `send()`, median", f"{on['send'] * 1e3:.3f} ms vs {off['send'] * 1e3:.3f} ms off ({on['send'] / off['send']:.2f}×)"),
        ("`%%chat` overhead per cell, median", f"{on['cell'] * 1e3:.2f} ms vs {off['cell'] * 1e3:.2f} ms off "
                                               f"({on['cell'] / off['cell']:.2f}×)"),
    ]
    base = ovh.get("baseline")
    if base:
        rows.append((f"the same against {args.baseline} (no death notices)",
                     f"block {on['block'] / base['block']:.2f}×, send() {on['send'] / base['send']:.2f}×, "
                     f"%%chat cell {on['cell'] / base['cell']:.2f}× ({base['block'] * 1e3:.2f} / {base['send'] * 1e3:.3f} / "
                     f"{base['cell'] * 1e3:.2f} ms)"))
    if beat:
        per_hour = 3600 / 15
        rows.append(("heartbeat traffic per open block", f"{beat['cmds_per_beat']:.1f} Redis commands, "
                     f"{beat['bytes_in_per_beat']:.0f} B in / {beat['bytes_out_per_beat']:.0f} B out per beat; at the default "
                     f"15 s beat: {beat['cmds_per_beat'] * per_hour:.0f} commands, "
                     f"{(beat['bytes_in_per_beat'] + beat['bytes_out_per_beat']) * per_hour / 1024:.0f} KiB per hour"))
    head = (f"# Never silent: what it costs\n\n{datetime.now():%Y-%m-%d %H:%M}, {platform.system()} {platform.machine()}, "
            f"{os.cpu_count()} CPUs, Python {platform.python_version()}{' (--quick)' if args.quick else ''}\n\n"
            "| measure | result |\n| --- | --- |\n")
    text = head + "\n".join(f"| {a} | {b} |" for a, b in rows) + "\n"
    print(text)
    Path(args.out).write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
