"""Real parts for cluster tests and the cluster benchmark.

- :class:`RedisServer`: Debian's ``redis-server`` on a free loopback port, no
  persistence, that can be killed (SIGKILL) and started again on the same port.
- :func:`start_host`: a simulated host, ``tests/cluster_host.py`` run under
  ``unshare --uts`` with its own hostname; every host shares the caller's
  network (the emulator and Redis on loopback) and, through
  ``CHAT_MAGIC_HOME``, one home folder, as an NFS home would be shared.
- :func:`events_in`: the events a space holds, merged texts split again.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
HOST_SCRIPT = HERE / "cluster_host.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on 127.0.0.1:``port``; ``kill()`` and ``start()`` keep the port."""

    def __init__(self, workdir: Path, port: int | None = None) -> None:
        self.binary = shutil.which("redis-server")
        self.port = port or free_port()
        self.workdir = workdir
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, timeout: float = 10.0) -> RedisServer:
        assert self.binary, "redis-server is not installed"
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.proc = subprocess.Popen(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--dir", str(self.workdir), "--logfile", str(self.workdir / "redis.log")],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.ping():
                return self
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.proc.returncode}: {(self.workdir / 'redis.log').read_text()[-500:]}")
            time.sleep(0.05)
        raise TimeoutError(f"redis-server did not answer on port {self.port}")

    def kill(self) -> None:
        """SIGKILL, as a crashed or unplugged Redis: no shutdown, no goodbye to clients."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)
        self.proc = None

    def client(self):
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=2, decode_responses=True)

    def ping(self) -> bool:
        try:
            with self.client() as c:
                return bool(c.ping())
        except Exception:
            return False

    def commands_run(self, name: str) -> int:
        """How many times this server ran ``name`` (INFO commandstats), e.g. "evalsha"."""
        with self.client() as c:
            return int(c.info("commandstats").get(f"cmdstat_{name.lower()}", {}).get("calls", 0))

    def stop(self) -> None:
        self.kill()


def running_redis(workdir: Path) -> Iterator[RedisServer]:
    """For a fixture: a redis-server on a free loopback port until the fixture ends; skips without it or the redis extra.

    A port another process (another pytest-xdist worker) took between the pick and the start
    is passed over: up to 3 ports are tried.
    """
    import pytest

    server = RedisServer(workdir)
    if not server.binary:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run does it)")
    pytest.importorskip("redis", reason='the redis extra is not installed: pip install -e ".[test,redis]"')
    for attempt in range(3):
        try:
            server.start()
            break
        except RuntimeError:
            if attempt == 2:
                raise
            server.port = free_port()
    yield server
    server.stop()


def unshare_works() -> str | None:
    """None when ``unshare --uts`` can give a process its own hostname here, else why not."""
    if not shutil.which("unshare"):
        return "unshare is not installed"
    r = subprocess.run(["unshare", "--uts", "sh", "-c", "hostname cm-probe && hostname"], capture_output=True, text=True)
    if r.returncode != 0 or r.stdout.strip() != "cm-probe":
        return f"unshare --uts does not work here ({(r.stderr or r.stdout).strip()[:200]}): needs root or user namespaces"
    return None


@dataclass
class Host:
    name: str
    proc: subprocess.Popen
    stdout: str = ""
    stderr: str = ""
    report: dict = field(default_factory=dict)

    def wait(self, timeout: float) -> Host:
        self.stdout, self.stderr = self.proc.communicate(timeout=timeout)
        lines = [ln for ln in self.stdout.splitlines() if ln.startswith("{")]
        assert self.proc.returncode == 0 and lines, f"host {self.name} failed ({self.proc.returncode}): {self.stderr[-2000:]}"
        self.report = json.loads(lines[-1])
        return self


def start_host(name: str, env: dict[str, str], *args: str) -> Host:
    """``tests/cluster_host.py ARGS`` as host ``name`` (its own UTS namespace), sharing ``env``'s home."""
    cmd = ["unshare", "--uts", "sh", "-c", 'hostname "$1" && shift && exec "$@"', "sh", name,
           sys.executable, str(HOST_SCRIPT), *args]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return Host(name, proc)


def host_env(home: Path, webhook_url: str, redis_url: str | None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHAT_MAGIC_", "GOOGLE_CHAT_"))}
    env.update(CHAT_MAGIC_HOME=str(home), CHAT_MAGIC_CONFIG=str(home.parent / "no-config.toml"),
               GOOGLE_CHAT_WEBHOOK_URL=webhook_url, PYTHONUNBUFFERED="1", **extra)
    if redis_url:
        env["CHAT_MAGIC_REDIS_URL"] = redis_url
    return env


def events_in(messages: list[dict]) -> list[str]:
    """Every event a space holds: texts split on blank lines (merged messages), cards by header title."""
    out: list[str] = []
    for m in messages:
        if m.get("cardsV2"):
            out += [c["card"]["header"]["title"] for c in m["cardsV2"]]
        else:
            out += [p for p in (m.get("text") or "").split("\n\n") if p]
    return out


def expected_events(hosts: list[str], n: int) -> list[str]:
    return [f"{h} event {i:02d}" for h in hosts for i in range(n)]


def tally(messages: list[dict], expected: list[str]) -> tuple[int, int]:
    """(lost, duplicated) events."""
    got = events_in(messages)
    lost = sum(1 for e in expected if e not in got)
    dups = sum(got.count(e) - 1 for e in set(got) if got.count(e) > 1)
    return lost, dups
