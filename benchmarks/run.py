#!/usr/bin/env python
"""chat_magic benchmarks, side by side with a plain synchronous POST.

    python benchmarks/run.py [--quick] [--only NAME ...] [--out PATH]

Every scenario runs against the local emulator (``chat_magic.emulator.Emulator``,
in this process, over real HTTP on loopback), in its own emulator, space and
private ``CHAT_MAGIC_HOME``. The comparison is "the Google quickstart way":
``requests.post(url, json=..., timeout=...)`` made by the caller itself.

Scenarios:

1. ``caller``  what one notice costs the caller, server at 150 ms latency;
               steady-state ``send`` with no latency.
2. ``burst``   20 and 100 short events into one thread under the 1 QPS quota.
3. ``faults``  15 % 503, 10 % lost replies, 5 % resets: lost and duplicated events.
4. ``outage``  the server down while 1,000 events are posted, then back.
5. ``startup`` ``import chat_magic``, ``%load_ext chat_magic``, ``%%chat`` overhead.

Prints a markdown table and, after a full run of every scenario, writes it to
``benchmarks/results.md`` with the date and the machine (a ``--quick`` or
``--only`` run only prints it, unless ``--out PATH``), then one PASS/MISS line
per goal. Delivery settings are
the defaults (nothing is tuned for the benchmark). Exits 0 even on a MISS (it
is a measurement), 1 if a scenario crashed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import threading
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import requests  # the plain-POST baseline

import chat_magic
from chat_magic import delivery
from chat_magic.emulator import Emulator

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

KEY = "bench-key-" + "k" * 20
TOKEN = "bench-token-" + "t" * 20
PLAIN_TIMEOUT = 10.0
REPLY_OPTION = "REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD"


# -- results ------------------------------------------------------------------


@dataclass
class Row:
    metric: str
    chat_magic: str
    plain: str = ""
    ratio: str = ""


@dataclass
class Section:
    title: str
    note: str = ""
    rows: list[Row] = field(default_factory=list)
    error: str = ""

    def add(self, metric: str, cm: Any, plain: Any = "", ratio: Any = "") -> None:
        self.rows.append(Row(metric, str(cm), str(plain), str(ratio)))


@dataclass
class Goal:
    name: str
    ok: bool
    value: str


SECTIONS: list[Section] = []
GOALS: list[Goal] = []


def goal(name: str, ok: bool, value: str) -> None:
    GOALS.append(Goal(name, bool(ok), value))


# -- helpers ------------------------------------------------------------------


def ms(seconds: float) -> str:
    v = seconds * 1000
    return f"{v:.3f} ms" if v < 1 else f"{v:.1f} ms" if v < 100 else f"{v:.0f} ms"


def sec(seconds: float | None) -> str:
    return "—" if seconds is None else f"{seconds:.2f} s"


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, int(round(q / 100 * len(s) + 0.5)) - 1))
    return s[k]


def ratio(a: float, b: float) -> str:
    if not b:
        return "—"
    r = a / b
    return f"{r:,.0f}×" if r >= 10 else f"{r:.1f}×"


def mb(n: float) -> str:
    return f"{n / 1e6:.1f} MB"


def rss_bytes() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def outbox_bytes(home: Path) -> int:
    return sum(p.stat().st_size for p in home.glob("outbox.sqlite3*") if p.is_file())


def events_in(emu: Emulator, space: str) -> list[str]:
    """Every event text the space holds, merged messages split on blank lines."""
    return [part for m in emu.messages(space=space) for part in (m.get("text") or "").split("\n\n") if part]


def wait_events(emu: Emulator, space: str, expected: set[str], timeout: float) -> float | None:
    """Poll until every expected event is in the space; return when (monotonic) or None."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if expected <= set(events_in(emu, space)):
            return time.monotonic()
        time.sleep(0.02)
    return None


def space_requests(emu: Emulator, space: str) -> list[dict]:
    return [r for r in emu.requests if f"/spaces/{space}/" in r["path"]]


def new_space(tag: str) -> str:
    return f"{tag}{uuid.uuid4().hex[:8].upper()}"


def plain_post(url: str, text: str, thread_key: str | None = None) -> tuple[int | None, float]:
    """The quickstart way: a synchronous POST in the caller. Returns (status or None, seconds)."""
    body: dict[str, Any] = {"text": text}
    if thread_key:
        body["thread"] = {"threadKey": thread_key}
        url = f"{url}&messageReplyOption={REPLY_OPTION}"
    t0 = time.perf_counter()
    try:
        status: int | None = requests.post(url, json=body, timeout=PLAIN_TIMEOUT).status_code
    except requests.RequestException:
        status = None
    return status, time.perf_counter() - t0


@contextmanager
def isolated(name: str, **emu_kwargs: Any) -> Iterator[tuple[Emulator, Path]]:
    """A fresh emulator and a private CHAT_MAGIC_HOME; environment restored after."""
    saved = {k: os.environ.get(k) for k in ("CHAT_MAGIC_HOME", "CHAT_MAGIC_CONFIG", "GOOGLE_CHAT_WEBHOOK_URL", "CHAT_MAGIC_THREAD_KEY")}
    tmp = Path(tempfile.mkdtemp(prefix=f"chat_magic-bench-{name}-"))
    home = tmp / "home"
    os.environ["CHAT_MAGIC_HOME"] = str(home)
    os.environ["CHAT_MAGIC_CONFIG"] = str(tmp / "no-config.toml")
    os.environ.pop("GOOGLE_CHAT_WEBHOOK_URL", None)
    os.environ.pop("CHAT_MAGIC_THREAD_KEY", None)
    emu = Emulator(key=KEY, token=TOKEN, qps=emu_kwargs.pop("qps", 1.0), **emu_kwargs).start()
    try:
        yield emu, home
    finally:
        delivery.shutdown()
        emu.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        shutil.rmtree(tmp, ignore_errors=True)


def use_space(emu: Emulator, space: str) -> str:
    url = emu.webhook_url(space=space)
    os.environ["GOOGLE_CHAT_WEBHOOK_URL"] = url
    return url


# -- 1. caller cost -----------------------------------------------------------


def scenario_caller(quick: bool) -> Section:
    n_cm, n_plain, n_steady = (200, 20, 200) if quick else (1000, 60, 2000)
    s = Section("1. Caller cost per notice", f"server latency 150 ms; chat_magic N={n_cm}, plain POST N={n_plain} (each to a fresh space, so the quota never answers early)")
    with isolated("caller") as (emu, home):
        emu.latency = 0.15
        space = new_space("CALLER")
        use_space(emu, space)
        t0 = time.perf_counter()
        chat_magic.send("warm-up", thread_key="caller")
        cold = time.perf_counter() - t0
        for _ in range(4):
            chat_magic.send("warm-up", thread_key="caller")

        cm: list[float] = []
        for i in range(n_cm):
            t0 = time.perf_counter()
            chat_magic.send(f"notice {i:05d}", thread_key="caller")
            cm.append(time.perf_counter() - t0)

        t_sent = time.monotonic()
        t_all = wait_events(emu, space, {f"notice {i:05d}" for i in range(n_cm)}, 180)
        drain = None if t_all is None else t_all - t_sent

        plain: list[float] = []
        statuses: list[int | None] = []
        for i in range(n_plain):
            url = emu.webhook_url(space=new_space("PLAIN"))
            st, dt = plain_post(url, f"notice {i:05d}", thread_key="caller")
            plain.append(dt)
            statuses.append(st)

        got = events_in(emu, space)
        delivered = sum(1 for i in range(n_cm) if f"notice {i:05d}" in got)
        reqs = space_requests(emu, space)

        s.add("caller time, median", ms(statistics.median(cm)), ms(statistics.median(plain)), ratio(statistics.median(plain), statistics.median(cm)))
        s.add("caller time, p95", ms(pct(cm, 95)), ms(pct(plain, 95)), ratio(pct(plain, 95), pct(cm, 95)))
        s.add("caller time, max", ms(max(cm)), ms(max(plain)), "")
        s.add("first send in a fresh process (opens the outbox)", ms(cold), "", "")
        s.add("delivered", f"{delivered}/{n_cm} in {len(reqs)} requests ({sum(1 for r in reqs if r['status'] == 429)} × 429)",
              f"{statuses.count(200)}/{n_plain}", "")
        s.add("time from the last send until all are in the space", sec(drain), "", "")
        r = statistics.median(plain) / statistics.median(cm)
        goal("caller cost: plain POST / chat_magic.send (median, 150 ms latency) >= 100x", r >= 100, f"{r:,.0f}x")

        # steady state, no latency
        emu.latency = 0.0
        space2 = new_space("STEADY")
        use_space(emu, space2)
        for _ in range(5):
            chat_magic.send("warm-up", thread_key="steady")
        chat_magic.flush(30)
        steady: list[float] = []
        for i in range(n_steady):
            t0 = time.perf_counter()
            chat_magic.send(f"steady {i:05d}", thread_key="steady")
            steady.append(time.perf_counter() - t0)
        chat_magic.flush(180)
        med = statistics.median(steady)
        s.add(f"steady-state send, no latency (N={n_steady}), median / p95", f"{ms(med)} / {ms(pct(steady, 95))}", "", "")
        goal("steady-state send median (no latency) < 1.5 ms", med < 0.0015, ms(med))
    return s


# -- 2. bursts ----------------------------------------------------------------


def scenario_burst(quick: bool) -> Section:
    s = Section("2. Burst into one thread (quota 1 request/s)",
                "chat_magic: send() each event, then wait until the space has them all. "
                "Plain: the naive loop, POST each event, a 429 is a lost event (no retry).")
    plain_cap = 20 if quick else None
    with isolated("burst") as (emu, home):
        # a session that has posted before: the worker is up and idle, so the first event leaves at once
        chat_magic.send("warm-up", to=emu.webhook_url(space=new_space("WARM")), thread_key="warm").wait(30)
        time.sleep(1.2)
        for n in (20, 100):
            space = new_space(f"BURST{n}-")
            use_space(emu, space)
            expected = {f"burst event {i:03d}" for i in range(n)}
            t0 = time.monotonic()
            for i in range(n):
                chat_magic.send(f"burst event {i:03d}", thread_key="burst")
            caller = time.monotonic() - t0
            t_last = wait_events(emu, space, expected, 120)
            reqs = space_requests(emu, space)
            got = events_in(emu, space)
            in_order = [e for e in got if e in expected] == sorted(expected)
            dup = len(got) - len(set(got))
            q429 = sum(1 for r in reqs if r["status"] == 429)
            done = None if t_last is None else t_last - t0

            pspace = new_space(f"PLAIN{n}-")
            purl = emu.webhook_url(space=pspace)
            n_plain = min(n, plain_cap) if plain_cap else n
            p0 = time.monotonic()
            pst = [plain_post(purl, f"burst event {i:03d}", thread_key="burst")[0] for i in range(n_plain)]
            p_caller = time.monotonic() - p0
            p_ok = pst.count(200)
            capped = f" (first {n_plain})" if n_plain < n else ""

            s.add(f"{n} events: delivered", f"{len(set(got) & expected)}/{n}" + ("" if in_order else " (out of order!)") + (f", {dup} duplicated" if dup else ""),
                  f"{p_ok}/{n_plain}{capped}", "")
            s.add(f"{n} events: 429s provoked", q429, pst.count(429), "")
            s.add(f"{n} events: requests made", len(reqs), len(pst), "")
            s.add(f"{n} events: time until the last is in the space", sec(done), sec(p_caller) + f" ({n_plain - p_ok} lost)", "")
            s.add(f"{n} events: caller time", ms(caller), ms(p_caller), ratio(p_caller, caller))
            if n == 20:
                ok = done is not None and done <= 3.0 and q429 == 0 and len(set(got) & expected) == n and dup == 0
                goal("burst of 20: all in the space within 3 s, 0 quota errors", ok, f"{sec(done)}, {q429} x 429, {len(set(got) & expected)}/20")
            time.sleep(1.1)  # the next space is separate anyway; keep the worker idle in between
    return s


# -- 3. faults ----------------------------------------------------------------


N_RETRY = 50  # events the plain + retry client posts (1.1 s apart: a minute)


def scenario_faults(quick: bool) -> Section:
    n, spacing = (50, 0.2) if quick else (200, 0.25)
    s = Section("3. Faults: 15 % 503, 10 % lost reply, 5 % reset",
                f"{n} events posted every {spacing:g} s to one thread; the clients run at once, each into its own space. "
                "Plain: POST once (a failure is a lost event). Plain + retry (full run only): the first "
                f"{N_RETRY} events 1.1 s apart (within the quota), up to 3 tries 1 s apart, no requestId.")
    with isolated("faults", seed=7) as (emu, home):
        emu.inject("503", probability=0.15)
        emu.inject("lost_reply", probability=0.10)
        emu.inject("reset", probability=0.05)
        sp_cm, sp_plain, sp_retry = new_space("FAULTCM"), new_space("FAULTPL"), new_space("FAULTRT")
        use_space(emu, sp_cm)
        url_plain, url_retry = emu.webhook_url(space=sp_plain), emu.webhook_url(space=sp_retry)
        texts = [f"fault event {i:03d}" for i in range(n)]
        caller_cm: list[float] = []
        plain_seen: list[int | None] = []
        retry_tries: list[int] = []

        drained: list[float | None] = []

        def run_cm() -> None:
            for t in texts:
                t0 = time.perf_counter()
                chat_magic.send(t, thread_key="faults")
                caller_cm.append(time.perf_counter() - t0)
                time.sleep(spacing)
            t_end = time.monotonic()
            t_all = wait_events(emu, sp_cm, set(texts), 300)
            drained.append(None if t_all is None else t_all - t_end)

        def run_plain() -> None:
            for t in texts:
                t0 = time.monotonic()
                plain_seen.append(plain_post(url_plain, t, thread_key="faults")[0])
                time.sleep(max(0.0, spacing - (time.monotonic() - t0)))

        def run_retry() -> None:
            for t in texts[:N_RETRY]:
                t0 = time.monotonic()
                for k in range(1, 4):  # noqa: B007 - k is the number of tries, kept after the loop
                    st, _ = plain_post(url_retry, t, thread_key="faults")
                    if st == 200:
                        break
                    time.sleep(1.0)
                retry_tries.append(k)
                time.sleep(max(0.0, 1.1 - (time.monotonic() - t0)))

        clients = (run_cm, run_plain) if quick else (run_cm, run_plain, run_retry)
        threads = [threading.Thread(target=f) for f in clients]
        for th in threads:
            th.start()
        for th in threads:
            th.join()
        chat_magic.flush(60)
        faults = emu.stats()["faults"]

        def tally(space: str, sent: list[str] = texts) -> tuple[int, int, int, int]:
            got = events_in(emu, space)
            delivered = len(set(got) & set(sent))
            dups = sum(got.count(t) - 1 for t in sent if got.count(t) > 1)
            reqs = space_requests(emu, space)
            return delivered, dups, len(sent) - delivered, len(reqs)

        d_cm, dup_cm, lost_cm, req_cm = tally(sp_cm)
        d_pl, dup_pl, lost_pl, req_pl = tally(sp_plain)
        q_pl = plain_seen.count(429)
        s.add("delivered", f"{d_cm}/{n}", f"{d_pl}/{n}", "")
        s.add("lost", lost_cm, f"{lost_pl} ({q_pl} of them to 429)", "")
        s.add("duplicates", dup_cm, dup_pl, "")
        s.add("requests made", req_cm, req_pl, "")
        if not quick:
            d_rt, dup_rt, lost_rt, req_rt = tally(sp_retry, texts[:N_RETRY])
            s.add("plain + retry: delivered / lost / duplicates / requests", "", f"{d_rt}/{N_RETRY} / {lost_rt} / {dup_rt} / {req_rt}", "")
        s.add("caller time per event, median / p95", f"{ms(statistics.median(caller_cm))} / {ms(pct(caller_cm, 95))}", "", "")
        s.add("time from the last post to all delivered", sec(drained[0] if drained else None), "", "")
        s.add("faults the emulator injected (all clients)", ", ".join(f"{k}: {v}" for k, v in sorted(faults.items())), "", "")
        goal("faults: nothing lost, nothing duplicated", lost_cm == 0 and dup_cm == 0, f"{lost_cm} lost, {dup_cm} duplicated of {n}")
    return s


# -- 4. outage ----------------------------------------------------------------


def scenario_outage(quick: bool) -> Section:
    n = 1000
    down_for = 10.0 if quick else 60.0
    s = Section(f"4. Outage: server down {down_for:g} s while {n} events are posted",
                f"default delivery settings (backoff cap {delivery.settings.backoff_cap:g} s); events spread over the outage")
    with isolated("outage") as (emu, home):
        space = new_space("OUTAGE")
        use_space(emu, space)
        chat_magic.send("before the outage", thread_key="outage").wait(30)
        samples: list[tuple[int, int]] = []
        stop = threading.Event()

        def sample() -> None:
            while not stop.is_set():
                samples.append((rss_bytes(), outbox_bytes(home)))
                stop.wait(0.2)

        rss0, box0 = rss_bytes(), outbox_bytes(home)
        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        texts = [f"outage event {i:04d}" for i in range(n)]
        emu.set_down(True)
        t_down = time.monotonic()
        caller: list[float] = []
        for i, t in enumerate(texts):
            t0 = time.perf_counter()
            chat_magic.send(t, thread_key="outage")
            caller.append(time.perf_counter() - t0)
            target = t_down + (i + 1) * down_for / n
            delay = target - time.monotonic()
            if delay > 0:
                time.sleep(delay)
        time.sleep(max(0.0, t_down + down_for - time.monotonic()))
        during = len(space_requests(emu, space)) - 1
        wall_up = time.time()
        emu.set_down(False)
        t_up = time.monotonic()
        t_last = wait_events(emu, space, set(texts), 180)
        stop.set()
        sampler.join()
        after = [r for r in space_requests(emu, space) if r["time"] >= wall_up]
        got = events_in(emu, space)
        delivered = len(set(got) & set(texts))
        dups = sum(got.count(t) - 1 for t in texts if got.count(t) > 1)
        in_order = [e for e in got if e in set(texts)] == texts
        rss_max = max(r for r, _ in samples) if samples else rss_bytes()
        box_max = max(b for _, b in samples) if samples else outbox_bytes(home)
        recovery = None if t_last is None else t_last - t_up

        s.add("delivered", f"{delivered}/{n}" + ("" if in_order else " (out of order!)") + (f", {dups} duplicated" if dups else ""), "", "")
        s.add("requests during the outage (refused connections)", during, "", "")
        s.add("requests after recovery", len(after), "", "")
        s.add("429s after recovery", sum(1 for r in after if r["status"] == 429), "", "")
        s.add("time from recovery to the last delivered", sec(recovery), "", "")
        s.add("caller time per event during the outage, median / p95", f"{ms(statistics.median(caller))} / {ms(pct(caller, 95))}", "", "")
        s.add("process RSS before / peak / after", f"{mb(rss0)} / {mb(rss_max)} / {mb(rss_bytes())}", "", "")
        s.add("outbox file(s) before / peak", f"{mb(box0)} / {mb(box_max)}", "", "")
        ok = delivered == n and dups == 0 and recovery is not None and recovery <= 30 and len(after) <= 15
        goal("outage: backlog in <= 15 requests within 30 s of recovery", ok,
             f"{len(after)} requests, {sec(recovery)}, {delivered}/{n} delivered")
    return s


# -- 5. start-up and magic overhead --------------------------------------------


IMPORTTIME = re.compile(r"^import time:\s+(\d+)\s+\|\s+(\d+)\s+\|(\s*)(\S+)\s*$")


def import_time_ms() -> float:
    """Cumulative import time of the chat_magic package (us -> ms), from -X importtime."""
    out = subprocess.run([sys.executable, "-X", "importtime", "-c", "import chat_magic"],
                         capture_output=True, text=True, cwd=str(ROOT), timeout=60, env=_child_env())
    if out.returncode != 0:
        raise RuntimeError(f"import chat_magic failed: {out.stderr.strip().splitlines()[-1:]}")
    total = 0
    for line in out.stderr.splitlines():
        m = IMPORTTIME.match(line)
        if m and m.group(4) == "chat_magic":
            total += int(m.group(2))
    if not total:
        raise RuntimeError("no chat_magic line in -X importtime output")
    return total / 1000


def _child_env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("GOOGLE_CHAT_WEBHOOK_URL", None)
    env.update(extra)
    return env


LOAD_EXT = textwrap.dedent("""
    import json, time
    from IPython.core.interactiveshell import InteractiveShell
    ip = InteractiveShell.instance()
    t0 = time.perf_counter()
    ip.run_line_magic("load_ext", "chat_magic")
    print(json.dumps({"load_ext": time.perf_counter() - t0}))
""")

CHAT_OVERHEAD = textwrap.dedent("""
    import json, sys, time
    from IPython.core.interactiveshell import InteractiveShell
    n = int(sys.argv[1])
    ip = InteractiveShell.instance()
    ip.run_line_magic("load_ext", "chat_magic")
    plain, magic = [], []
    for cell in ("x = 1", "%%chat\\nx = 1"):  # warm up both paths (the session announces itself once)
        ip.run_cell(cell)
    for i in range(n):
        t0 = time.perf_counter(); r1 = ip.run_cell("x = 1"); plain.append(time.perf_counter() - t0)
        t0 = time.perf_counter(); r2 = ip.run_cell("%%chat\\nx = 1"); magic.append(time.perf_counter() - t0)
        if not (r1.success and r2.success):
            raise SystemExit("a cell failed: " + repr(r2.error_in_exec or r2.error_before_exec))
    print(json.dumps({"plain": plain, "magic": magic}))
""")


def scenario_startup(quick: bool) -> Section:
    s = Section("5. Start-up and magic overhead", "subprocesses; best of 5 for import, best of 3 for %load_ext")
    imports = [import_time_ms() for _ in range(5)]
    best = min(imports)
    s.add("`import chat_magic` (-X importtime, cumulative)", f"{best:.1f} ms (best of 5; median {statistics.median(imports):.1f} ms)", "", "")
    goal("import chat_magic <= 30 ms", best <= 30.0, f"{best:.1f} ms")
    heavy = subprocess.run([sys.executable, "-c", "import sys, chat_magic; print(sorted(m for m in ('IPython','ipywidgets','requests','sqlite3') if m in sys.modules))"],
                           capture_output=True, text=True, env=_child_env(), timeout=60)
    s.add("heavy modules loaded by `import chat_magic`", heavy.stdout.strip() or heavy.stderr.strip()[-200:], "", "")

    magics = ROOT / "chat_magic" / "magics.py"
    if not magics.exists():
        s.add("`%load_ext chat_magic`", "n/a (chat_magic/magics.py not there yet)", "", "")
        s.add("`%%chat` overhead", "n/a (chat_magic/magics.py not there yet)", "", "")
        return s
    loads = []
    for _ in range(3):
        out = subprocess.run([sys.executable, "-c", LOAD_EXT], capture_output=True, text=True, env=_child_env(), timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"%load_ext chat_magic failed: {out.stderr.strip()[-500:]}")
        loads.append(json.loads(out.stdout.strip().splitlines()[-1])["load_ext"])
    s.add("`%load_ext chat_magic` in an InteractiveShell", f"{ms(min(loads))} (best of 3)", "", "")

    n = 50 if quick else 300
    with isolated("magic", qps=None) as (emu, home):
        url = emu.webhook_url(space=new_space("MAGIC"))
        env = _child_env(GOOGLE_CHAT_WEBHOOK_URL=url, CHAT_MAGIC_EXIT_TIMEOUT="0")
        out = subprocess.run([sys.executable, "-c", CHAT_OVERHEAD, str(n)], capture_output=True, text=True, env=env, timeout=300)
        if out.returncode != 0:
            raise RuntimeError(f"%%chat benchmark failed: {out.stderr.strip()[-800:]}")
        data = json.loads(out.stdout.strip().splitlines()[-1])
    p, m = statistics.median(data["plain"]), statistics.median(data["magic"])
    s.add(f"trivial cell `x = 1` (N={n}), median / p95", f"with %%chat: {ms(m)} / {ms(pct(data['magic'], 95))}",
          f"without: {ms(p)} / {ms(pct(data['plain'], 95))}", "")
    s.add("`%%chat` overhead per cell, median", ms(m - p), "", "")
    return s


SCENARIOS: dict[str, Callable[[bool], Section]] = {
    "caller": scenario_caller,
    "burst": scenario_burst,
    "faults": scenario_faults,
    "outage": scenario_outage,
    "startup": scenario_startup,
}


# -- report -----------------------------------------------------------------------


def machine() -> str:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{platform.platform()}; {os.cpu_count()} CPUs" + (f" ({cpu})" if cpu else "")
            + f"; Python {platform.python_version()} ({platform.python_implementation()})")


def render(quick: bool, elapsed: float) -> str:
    lines = [
        "# chat_magic benchmarks",
        "",
        f"- Date: {datetime.now().astimezone().strftime('%Y-%m-%d %H:%M %Z')}",
        f"- Mode: {'--quick' if quick else 'full'} ({elapsed:.0f} s)",
        f"- Machine: {machine()}",
        f"- chat_magic {chat_magic.__version__}, requests {requests.__version__}; "
        f"delivery defaults: interval {delivery.settings.interval:g} s, backoff {delivery.settings.backoff_base:g}-{delivery.settings.backoff_cap:g} s",
        "- Plain POST = `requests.post(url, json=..., timeout=10)` in the caller (Google's quickstart way).",
        "",
    ]
    for sct in SECTIONS:
        lines.append(f"## {sct.title}")
        lines.append("")
        if sct.note:
            lines += [sct.note, ""]
        if sct.error:
            lines += ["**CRASHED:**", "", "```", sct.error.rstrip(), "```", ""]
        if sct.rows:
            lines.append("| Metric | chat_magic | plain POST | plain / chat_magic |")
            lines.append("|---|---|---|---|")
            for r in sct.rows:
                lines.append(f"| {r.metric} | {r.chat_magic} | {r.plain} | {r.ratio} |")
            lines.append("")
    lines.append("## Goals")
    lines.append("")
    for g in GOALS:
        lines.append(f"- {'PASS' if g.ok else 'MISS'} {g.name}: {g.value}")
    lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="smaller runs, about a minute")
    ap.add_argument("--only", nargs="+", choices=list(SCENARIOS), help="run only these scenarios")
    ap.add_argument("--out", type=Path, default=None,
                    help="where to write the table (default: benchmarks/results.md after a full run of every scenario; "
                         "a --quick or --only run prints it only, so the committed results stay those of a full run)")
    args = ap.parse_args(argv)

    import logging

    logging.getLogger("chat_magic").setLevel(logging.ERROR)  # retries are expected here; keep the table readable
    t0 = time.monotonic()
    crashed = []
    for name, fn in SCENARIOS.items():
        if args.only and name not in args.only:
            continue
        print(f"… {name}", file=sys.stderr, flush=True)
        ts = time.monotonic()
        try:
            SECTIONS.append(fn(args.quick))
        except Exception:
            crashed.append(name)
            SECTIONS.append(Section(f"{name} (crashed)", error=traceback.format_exc()))
            goal(f"scenario {name} ran", False, "crashed")
        print(f"  {name}: {time.monotonic() - ts:.1f} s", file=sys.stderr, flush=True)
    text = render(args.quick, time.monotonic() - t0)
    print(text)
    out = args.out or (None if args.quick or args.only else HERE / "results.md")
    if out is not None:
        out.write_text(text, encoding="utf-8")
    else:
        print("(a --quick or --only run: benchmarks/results.md left as it is; --out PATH writes the table)", file=sys.stderr)
    for g in GOALS:
        print(f"{'PASS' if g.ok else 'MISS'} {g.name}: {g.value}")
    return 1 if crashed else 0


if __name__ == "__main__":
    sys.exit(main())
