#!/usr/bin/env python
"""chat_magic on a cluster: H hosts posting into one space, with and without Redis.

    python benchmarks/cluster.py [--quick] [--only NAME ...] [--out PATH]

Real parts: the emulator (in this process, 1 request/s quota per space, over
HTTP on loopback), Debian's ``redis-server`` on a free loopback port, and
simulated hosts: ``tests/cluster_host.py`` under ``unshare --uts`` with its own
hostname, all sharing one ``CHAT_MAGIC_HOME`` as nodes share an NFS home.
Needs root (or user namespaces) for ``unshare``.

Scenarios:

1. ``share``       H hosts x M events (cards and short texts) into one space,
                   with Redis and without: delivered, duplicates, 429s,
                   requests, quota used, time to the last message, ``send()``
                   p50/p99 per process.
2. ``outage``      the same with Redis killed for 5 s mid-run, then restarted.
3. ``contention``  one host, 8 processes posting at once: ``send()`` p50/p99/max
                   from a cold start (each worker starting) and in steady state,
                   and how long the worker holds the outbox's write lock.

Writes a markdown table to ``benchmarks/results-cluster.md`` (date, machine),
then one PASS/MISS line per goal. Exits 0 even on a MISS, 1 if a scenario crashed.
"""

from __future__ import annotations

import argparse
import platform
import sys
import tempfile
import time
import traceback
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))

from cluster_support import (  # noqa: E402
    Host,
    RedisServer,
    expected_events,
    host_env,
    start_host,
    tally,
    unshare_works,
)

from chat_magic.emulator import Emulator  # noqa: E402

KEY = "bench-key-" + "k" * 20
TOKEN = "bench-token-" + "t" * 20


class Table:
    def __init__(self, title: str, note: str, columns: list[str]) -> None:
        self.title, self.note, self.columns = title, note, columns
        self.rows: list[list[str]] = []
        self.error = ""

    def add(self, metric: str, *values: Any) -> None:
        self.rows.append([metric, *(str(v) for v in values)])

    def render(self) -> str:
        out = [f"## {self.title}", "", self.note, ""]
        if self.error:
            return "\n".join(out + ["```", self.error, "```", ""])
        out.append("| " + " | ".join(["Metric", *self.columns]) + " |")
        out.append("|" + "---|" * (len(self.columns) + 1))
        out += ["| " + " | ".join(r + [""] * (len(self.columns) + 1 - len(r))) + " |" for r in self.rows]
        return "\n".join(out + [""])


GOALS: list[tuple[str, bool, str]] = []


def goal(name: str, ok: bool, value: str) -> None:
    GOALS.append((name, bool(ok), value))


def pct(values: list[float], q: float) -> float:
    s = sorted(values)
    if not s:
        return float("nan")
    return s[max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))]


def ms(seconds: float) -> str:
    v = seconds * 1000
    return f"{v:.2f} ms" if v < 10 else f"{v:.1f} ms" if v < 100 else f"{v:.0f} ms"


# -- a run of H hosts ---------------------------------------------------------------


class Run:
    """H hosts x M events into one fresh space of ``emu``; the figures of one run."""

    def __init__(self, emu: Emulator, hosts: int, events: int, cards: int, redis: RedisServer | None,
                 kill_redis_after: int | None = None) -> None:
        self.emu, self.redis = emu, redis
        self.names = [f"node-{k}" for k in range(hosts)]
        self.events, self.cards = events, cards
        self.kill_after = kill_redis_after
        self.space = f"CLUSTER{uuid.uuid4().hex[:8].upper()}"
        self.reports: list[Host] = []
        self.outage: tuple[float, float] | None = None

    def go(self, tmp: Path) -> Run:
        home = tmp / f"home-{self.space}"
        env = host_env(home, self.emu.webhook_url(space=self.space), self.redis.url if self.redis else None)
        self.t0 = time.time() + 2.0
        running = [start_host(n, env, "--start-at", f"{self.t0:.3f}", "--events", str(self.events), "--cards", str(self.cards),
                              "--flush", "900") for n in self.names]
        if self.kill_after is not None and self.redis is not None:
            self.emu.wait_for(self.kill_after, timeout=300, space=self.space)
            self.redis.kill()
            down = time.time()
            time.sleep(5.0)
            self.redis.start()
            self.outage = (down, time.time())
        self.reports = [h.wait(1200) for h in running]
        return self

    @property
    def requests(self) -> list[dict]:
        return [r for r in self.emu.requests if f"/spaces/{self.space}/" in r["path"]]

    def figures(self) -> dict[str, Any]:
        reqs = self.requests
        msgs = self.emu.messages(space=self.space)
        lost, dups = tally(msgs, expected_events(self.names, self.events))
        accepted = [r["time"] for r in reqs if r["outcome"] == "created"]
        span = (max(accepted) - min(r["time"] for r in reqs)) if len(accepted) > 1 else 0.0
        last = max((r["time"] for r in reqs if r["outcome"] == "created"), default=self.t0)
        sends = {h.name: h.report["send"] for h in self.reports}
        return {
            "delivered": len(self.names) * self.events - lost,
            "expected": len(self.names) * self.events,
            "lost": lost,
            "duplicates": dups,
            "429s": sum(1 for r in reqs if r["status"] == 429),
            "requests": len(reqs),
            "accepted": len(accepted),
            "quota": (len(accepted) - 1) / span if span else 0.0,
            "last": last - self.t0,
            "p50": {n: pct(v, 50) for n, v in sends.items()},
            "p99": {n: pct(v, 99) for n, v in sends.items()},
            "first": {n: v[0] for n, v in sends.items()},
            "p99_rest": {n: pct(v[1:], 99) for n, v in sends.items()},
            "outage_429s": sum(1 for r in reqs if r["status"] == 429 and self.outage and r["time"] >= self.outage[0]),
            "stderr": [ln for h in self.reports for ln in h.stderr.splitlines() if ln.strip()],
        }


def per_process(fig: dict[str, Any]) -> str:
    return "<br>".join(f"{n}: {ms(fig['p50'][n])} / {ms(fig['p99'][n])}" for n in sorted(fig["p50"]))


# -- scenarios --------------------------------------------------------------------------


def scenario_share(quick: bool, emu: Emulator, redis: RedisServer, tmp: Path) -> Table:
    shapes = [(2, 10, 3)] if quick else [(4, 23, 8), (8, 23, 8)]
    cols = [f"{h} hosts x {m}, {label}" for h, m, _ in shapes for label in ("Redis", "no Redis")]
    t = Table("1. Hosts sharing one space's quota",
              "Each host posts its events at once (cards spread among short texts, one thread per host), then waits until "
              "its outbox is empty. Quota used: accepted requests per second from the first request to the last accepted "
              "one (out of 1). Time to the last message: from the moment the hosts start posting. With 23 calls per "
              "process, a process's p99 is its slowest call: its first, which imports the delivery module and opens the "
              "outbox while every host starts at once on this machine's 2 cores.", cols)
    figs = []
    for h, m, c in shapes:
        for use_redis in (True, False):
            if use_redis:
                with redis.client() as cl:
                    cl.flushall()
            figs.append(Run(emu, h, m, c, redis if use_redis else None).go(tmp).figures())
    t.add("delivered", *(f"{f['delivered']}/{f['expected']}" for f in figs))
    t.add("lost / duplicates", *(f"{f['lost']} / {f['duplicates']}" for f in figs))
    t.add("429s", *(f["429s"] for f in figs))
    t.add("requests (accepted)", *(f"{f['requests']} ({f['accepted']})" for f in figs))
    t.add("quota used", *(f"{f['quota']:.2f} requests/s" for f in figs))
    t.add("time to the last message", *(f"{f['last']:.1f} s" for f in figs))
    t.add("send() p50 / p99 per process", *(per_process(f) for f in figs))
    t.add("send() worst p99", *(ms(max(f["p99"].values())) for f in figs))
    t.add("first send() of a process (imports the delivery module, opens the outbox), slowest", *(ms(max(f["first"].values())) for f in figs))
    t.add("send() worst p99 without each process's first call", *(ms(max(f["p99_rest"].values())) for f in figs))
    for (h, m, _), f in zip(shapes, figs[0::2]):
        goal(f"Redis, {h} hosts x {m} events: 0 x 429, 0 lost, 0 duplicates, quota used >= 0.85",
             f["429s"] == 0 and f["lost"] == 0 and f["duplicates"] == 0 and f["quota"] >= 0.85,
             f"{f['429s']} x 429, {f['lost']} lost, {f['duplicates']} duplicates, {f['quota']:.2f} requests/s")
    for (h, m, _), f in zip(shapes, figs[1::2]):
        goal(f"no Redis, {h} hosts x {m} events: everything delivered, once",
             f["lost"] == 0 and f["duplicates"] == 0, f"{f['delivered']}/{f['expected']}, {f['duplicates']} duplicates, {f['429s']} x 429")
    return t


def scenario_outage(quick: bool, emu: Emulator, redis: RedisServer, tmp: Path) -> Table:
    h, m, c = (2, 10, 3) if quick else (4, 23, 8)
    t = Table("2. Redis killed for 5 s mid-run",
              f"{h} hosts x {m} events with Redis; Redis is SIGKILLed once the space holds {h * 2} messages, and started "
              "again 5 s later (empty: no persistence). Each host paces itself meanwhile.", ["chat_magic"])
    with redis.client() as cl:
        cl.flushall()
    f = Run(emu, h, m, c, redis, kill_redis_after=h * 2).go(tmp).figures()
    down_lines = [ln for ln in f["stderr"] if "does not answer" in ln]
    t.add("delivered", f"{f['delivered']}/{f['expected']}")
    t.add("lost / duplicates", f"{f['lost']} / {f['duplicates']}")
    t.add("429s (all during or just after the outage)", f"{f['429s']} ({f['outage_429s']} after the kill)")
    t.add("requests (accepted)", f"{f['requests']} ({f['accepted']})")
    t.add("quota used", f"{f['quota']:.2f} requests/s")
    t.add("time to the last message", f"{f['last']:.1f} s")
    t.add("stderr lines about Redis, all hosts", f"{len(down_lines)} (one per host at most)")
    goal("Redis killed 5 s mid-run: nothing lost, nothing duplicated", f["lost"] == 0 and f["duplicates"] == 0,
         f"{f['lost']} lost, {f['duplicates']} duplicates of {f['expected']}")
    return t


def scenario_contention(quick: bool, emu: Emulator, redis: RedisServer, tmp: Path) -> Table:
    n = 50 if quick else 150
    t = Table("3. send() under 8-process contention",
              f"One host, 8 processes posting {n} short texts each, 10 ms apart, all at once, into one space (one thread "
              "per process). Cold: each process's first event is in the timed loop, so its worker starts (imports "
              "`requests`) while the caller posts. Steady: each process has delivered one message first. Write-lock "
              "hold: how long the delivery worker keeps the outbox's write lock per transaction (claim, ack, retry).",
              ["cold start", "steady state"])
    cols = []
    for warm in (False, True):
        space = f"CONTEND{uuid.uuid4().hex[:8].upper()}"
        env = host_env(tmp / f"home-{space}", emu.webhook_url(space=space), None)
        args = ["--procs", "8", "--events", str(n), "--cards", "0", "--every", "0.01", "--flush", "600", "--lock-holds"]
        host = start_host("node-busy", env, *args, *(["--warm"] if warm else [])).wait(900)
        procs = host.report["procs"]
        sends = [s for p in procs for s in p["send"]]
        holds = [x for p in procs for x in p["lock_holds"]]
        cols.append({
            "all": f"{ms(pct(sends, 50))} / {ms(pct(sends, 99))} / {ms(max(sends))}",
            "worst": ms(max(pct(p["send"], 99) for p in procs)),
            "holds": f"{ms(pct(holds, 50))} / {ms(pct(holds, 99))} / {ms(max(holds))} (n={len(holds)})" if holds else "—",
            "p99": pct(sends, 99),
            "delivered": all(p["delivered"] for p in procs),
        })
    t.add("send() p50 / p99 / max, all processes", *(c["all"] for c in cols))
    t.add("worst process's send() p99", *(c["worst"] for c in cols))
    t.add("worker write-lock hold p50 / p99 / max", *(c["holds"] for c in cols))
    t.add("everything delivered", *("yes" if c["delivered"] else "NO" for c in cols))
    goal("send() p99 with 8 processes posting (steady state) <= 10 ms", cols[1]["p99"] <= 0.010, ms(cols[1]["p99"]))
    return t


SCENARIOS = {"share": scenario_share, "outage": scenario_outage, "contention": scenario_contention}


def machine() -> str:
    import os

    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
        cpu = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), "")
    except OSError:
        cpu = ""
    return f"{platform.platform()}; {os.cpu_count()} CPUs ({cpu}); Python {platform.python_version()}"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="2 hosts x 10 events, 50 events per process")
    ap.add_argument("--only", nargs="+", choices=list(SCENARIOS))
    ap.add_argument("--out", type=Path, default=None, help="where to write the table (default: benchmarks/results-cluster.md after a "
                                                          "full run; a --quick or --only run prints it only)")
    args = ap.parse_args(argv)
    why = unshare_works()
    if why:
        print(f"cluster benchmark: cannot simulate hosts: {why}", file=sys.stderr)
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="chat_magic-cluster-bench-"))
    redis = RedisServer(tmp / "redis")
    if not redis.binary:
        print("cluster benchmark: redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 1
    redis.start()
    emu = Emulator(key=KEY, token=TOKEN, qps=1.0).start()
    started = time.monotonic()
    tables, crashed = [], False
    try:
        for name in args.only or list(SCENARIOS):
            print(f"-- {name}", file=sys.stderr, flush=True)
            try:
                tables.append(SCENARIOS[name](args.quick, emu, redis, tmp))
            except Exception:
                crashed = True
                t = Table(name, "crashed", [])
                t.error = traceback.format_exc()[-3000:]
                tables.append(t)
                goal(f"scenario {name} ran", False, "crashed")
    finally:
        emu.stop()
        redis.stop()
    elapsed = time.monotonic() - started
    head = ["# chat_magic on a cluster", "",
            f"- Date: {datetime.utcnow():%Y-%m-%d %H:%M} UTC",
            f"- Mode: {'quick' if args.quick else 'full'} ({elapsed:.0f} s)",
            f"- Machine: {machine()}",
            "- Hosts: processes under `unshare --uts` (own hostname) sharing one CHAT_MAGIC_HOME; "
            "emulator quota 1 request/s per space; delivery defaults (interval 1.1 s).", ""]
    goals = ["## Goals", ""] + [f"- {'PASS' if ok else 'MISS'} {name}: {value}" for name, ok, value in GOALS] + [""]
    text = "\n".join(head + [t.render() for t in tables] + goals)
    print(text)
    out = args.out or (None if args.quick or args.only else HERE / "results-cluster.md")
    if out is not None:  # the committed results stay those of a full run
        out.write_text(text, encoding="utf-8")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
