"""Shared fixtures: a real emulator over real HTTP on loopback, a private outbox per test.

- ``emulator``: one :class:`chat_magic.emulator.Emulator` for the whole run
  (strict proto validation, the real 1 request/second quota).
- ``space``: a fresh space on that emulator for one test, with the
  environment pointing ``GOOGLE_CHAT_WEBHOOK_URL`` at it and ``CHAT_MAGIC_HOME``
  at a private folder; ``space.messages()`` is what the space received.
- ``validate_message(payload)``: checks a payload with the official proto.
"""

from __future__ import annotations

import json
import logging
import uuid

import pytest

from chat_magic.emulator import Emulator

KEY = "emu-key-" + "k" * 24  # long enough that a leak is unmistakable
TOKEN = "emu-token-" + "t" * 24


def validate_message(payload: dict | str) -> None:
    """Raise unless ``payload`` is a valid google.chat.v1 Message (unknown fields rejected)."""
    from google.apps.chat_v1.types import Message

    s = payload if isinstance(payload, str) else json.dumps(payload)
    Message.from_json(s, ignore_unknown_fields=False)


def assert_no_secret(*texts: object) -> None:
    for t in texts:
        s = str(t)
        assert KEY not in s and TOKEN not in s, f"secret leaked in: {s[:300]}"


class Space:
    def __init__(self, emu: Emulator, name: str) -> None:
        self.emu = emu
        self.name = name
        self.url = emu.webhook_url(space=name, key=KEY, token=TOKEN)

    def messages(self) -> list[dict]:
        return self.emu.messages(space=self.name)

    def wait_for(self, n: int, timeout: float = 20.0) -> list[dict]:
        return self.emu.wait_for(n, timeout=timeout, space=self.name)

    def requests(self) -> list[dict]:
        return [r for r in self.emu.requests if f"/spaces/{self.name}/" in r["path"]]

    def texts(self) -> list[str]:
        return [m.get("text", "") for m in self.messages()]


@pytest.fixture(scope="session")
def emulator():
    emu = Emulator(key=KEY, token=TOKEN, qps=1.0, strict=True)
    emu.start()
    yield emu
    emu.stop()


@pytest.fixture
def outbox_home(tmp_path, monkeypatch):
    home = tmp_path / "chat_magic_home"
    monkeypatch.setenv("CHAT_MAGIC_HOME", str(home))
    monkeypatch.setenv("CHAT_MAGIC_CONFIG", str(tmp_path / "no-config.toml"))
    monkeypatch.delenv("GOOGLE_CHAT_WEBHOOK_URL", raising=False)
    monkeypatch.delenv("CHAT_MAGIC_THREAD_KEY", raising=False)
    monkeypatch.delenv("CHAT_MAGIC_REDIS_URL", raising=False)
    yield home
    from chat_magic import delivery, pacing, session

    delivery.shutdown()
    pacing.reset()
    session.set_session(None)


@pytest.fixture
def space(emulator, outbox_home, monkeypatch):
    sp = Space(emulator, "S" + uuid.uuid4().hex[:12].upper())
    monkeypatch.setenv("GOOGLE_CHAT_WEBHOOK_URL", sp.url)
    yield sp
    # every payload a test made the space accept is a valid Message
    for r in sp.requests():
        if r.get("status") == 200 and r.get("body"):
            validate_message(r["body"])


@pytest.fixture
def fast_backoff():
    """Retries after 0.1-0.8 s instead of 0.5-15 s: the same behaviour, quicker fault tests."""
    from chat_magic import delivery

    saved = (delivery.settings.backoff_base, delivery.settings.backoff_cap)
    delivery.settings.backoff_base, delivery.settings.backoff_cap = 0.2, 0.8
    yield
    delivery.settings.backoff_base, delivery.settings.backoff_cap = saved


@pytest.fixture
def debug_logs(caplog):
    """Capture chat_magic's log at DEBUG (for secret scans)."""
    caplog.set_level(logging.DEBUG, logger="chat_magic")
    caplog.set_level(logging.DEBUG, logger="urllib3")
    return caplog

