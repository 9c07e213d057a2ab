"""A distant Redis: claims cost one round trip however many spaces are busy; a slow one means local pacing.

Real parts: Debian's ``redis-server`` on loopback, and in front of it a small
TCP proxy (asyncio, in a thread) that holds every request for a set delay
and counts round trips (a client's turn to speak). Round trips are counted,
never timed.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time

import pytest
from cluster_support import running_redis
from conftest import KEY, TOKEN, wait_until

import chat_magic
from chat_magic import delivery, pacing
from chat_magic.outbox import Outbox
from chat_magic.webhook import parse_webhook_url

pytestmark = pytest.mark.timeout(240)


class LatencyProxy:
    """``127.0.0.1:port`` -> Redis, each request held ``delay`` seconds; ``round_trips`` counts client turns."""

    def __init__(self, upstream_port: int, delay: float) -> None:
        self.upstream_port = upstream_port
        self.delay = delay
        self.round_trips = 0
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.port = 0

        async def main() -> None:
            self._stop = asyncio.Event()
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            started.set()
            async with server:
                await self._stop.wait()
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in rest:
                t.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        self.thread = threading.Thread(target=lambda: self.loop.run_until_complete(main()), daemon=True)
        self.thread.start()
        started.wait(10)

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        waiting = asyncio.Event()  # a request was forwarded and its answer has not come back yet

        async def client_to_server() -> None:
            while data := await reader.read(65536):
                if not waiting.is_set():
                    with self._lock:
                        self.round_trips += 1
                    waiting.set()
                await asyncio.sleep(self.delay)
                up_writer.write(data)
                await up_writer.drain()
            up_writer.close()

        async def server_to_client() -> None:
            while data := await up_reader.read(65536):
                waiting.clear()
                writer.write(data)
                await writer.drain()
            writer.close()

        try:
            await asyncio.gather(client_to_server(), server_to_client())
        except (ConnectionError, OSError):
            pass

    def reset(self) -> None:
        with self._lock:
            self.round_trips = 0

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self._stop.set)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def redis_server(tmp_path_factory):
    yield from running_redis(tmp_path_factory.mktemp("redis-latency"))


@pytest.fixture
def proxy(redis_server):
    made: list[LatencyProxy] = []

    def make(delay: float) -> LatencyProxy:
        with redis_server.client() as c:
            c.flushall()
        made.append(LatencyProxy(redis_server.port, delay))
        return made[-1]

    yield make
    for p in made:
        p.close()


def _hook(n: int | str):
    return parse_webhook_url(f"http://127.0.0.1:9/v1/spaces/S{n}/messages?key={KEY}&token={TOKEN}")


def test_a_claim_across_thirty_busy_spaces_is_one_round_trip(outbox_home, redis_server, proxy, monkeypatch):
    monkeypatch.setenv("CHAT_MAGIC_REDIS_SLOW", "2")  # counted, not timed: a loaded machine must not make 50 ms look slow
    lagged = proxy(0.05)
    box = Outbox(outbox_home / "outbox.sqlite3")
    slot = pacing._connect(lagged.url)
    assert slot is not None
    box.cluster = slot
    try:
        box.enqueue(_hook("warm"), None, [('{"text":"warm up"}', True)])
        warm = box.claim(time.time(), interval=1.1, lease=30)  # loads the scripts: not what is counted
        assert warm is not None and warm.space_key.endswith("/Swarm")
        hooks = [_hook(n) for n in range(30)]
        for h in hooks:
            box.enqueue(h, None, [(f'{{"text":"to {h.space}"}}', True)])
        with redis_server.client() as c:  # 29 spaces held by other hosts, the last one open
            for h in hooks[:-1]:
                c.set(pacing.KEY_PREFIX + h.space_key, "other-host", px=60_000)
        now = time.time()
        lagged.reset()
        assert box.next_ready(now) == 0.0
        assert lagged.round_trips == 1, f"asking 30 spaces' waits took {lagged.round_trips} round trips"
        lagged.reset()
        job = box.claim(now, interval=1.1, lease=30)
        assert job is not None and job.space_key == hooks[-1].space_key
        assert lagged.round_trips == 1, f"a claim across 30 busy spaces took {lagged.round_trips} round trips"
        lagged.reset()
        assert box.claim(now, interval=1.1, lease=30) is None  # all 30 closed now: still one round trip
        assert lagged.round_trips == 1
        assert slot.up and slot.outages == 0
    finally:
        slot.close()
        box.close()


def test_a_slow_redis_means_local_pacing_with_one_line_and_everything_delivered(fast_emulator, outbox_home, proxy,
                                                                                 monkeypatch, capfd):
    lagged = proxy(0.2)
    monkeypatch.setenv("CHAT_MAGIC_REDIS_URL", lagged.url)
    spaces = [f"SLOW{os.getpid()}x{n}" for n in range(30)]
    receipts = [chat_magic.send(f"message {k} to {name}", to=fast_emulator.webhook_url(space=name, key=KEY, token=TOKEN))
                for k in range(3) for name in spaces]
    wait_until(lambda: all(r.status == "sent" for r in receipts), timeout=60, what="all 90 messages delivered")
    for name in spaces:  # short texts waiting together may travel merged: each is there once
        text = "\n".join(m.get("text", "") for m in fast_emulator.messages(space=name))
        assert [text.count(f"message {k} to {name}") for k in range(3)] == [1, 1, 1], text
    err = capfd.readouterr().err
    said = [ln for ln in err.splitlines() if "Redis" in ln]
    assert len(said) == 1 and "answers slowly" in said[0] and "pacing this host alone" in said[0], err
    assert lagged.round_trips < 90, "the host paced itself instead of asking the slow Redis for each message"
    delivery.shutdown()


@pytest.mark.parametrize("value", ["fast", "0", "-1", "150ms"])
def test_a_bad_slowness_limit_is_one_line_and_the_default(monkeypatch, value):
    from chat_magic import rules

    monkeypatch.setattr(rules, "_said", set())  # the line is said once per process and value
    monkeypatch.setenv("CHAT_MAGIC_REDIS_SLOW", value)
    lines: list[str] = []
    slot = pacing._connect("redis://127.0.0.1:1/0", say=lines.append)
    assert slot is not None and slot.slow_after == pacing.SLOW_AFTER
    assert len(lines) == 1 and "CHAT_MAGIC_REDIS_SLOW" in lines[0] and "is not a duration" in lines[0], lines
