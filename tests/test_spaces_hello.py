"""``chat-magic spaces add NAME --test``: a hello that did not arrive leaves nothing behind.

"nothing saved" must hold for the outbox too: a hello left queued would be
delivered by every later chat_magic process, into a space that was never
saved. The real CLI runs in a subprocess against a real emulator that
refuses (its connections reset while it is down, or a wrong token).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import KEY, TOKEN, assert_no_secret, wait_until

from chat_magic import hosts
from chat_magic.emulator import Emulator
from chat_magic.outbox import Outbox

pytestmark = pytest.mark.jupyter  # beside tests/test_spaces.py, which %chat_setup makes a jupyter module


@pytest.fixture
def refusing():
    """An emulator of this test's own (its outage must not touch the shared one), no quota."""
    emu = Emulator(key=KEY, token=TOKEN, qps=None, strict=True)
    emu.start()
    yield emu
    emu.stop()


def _cli(*args: str, home, cfg, stdin: str = "") -> subprocess.CompletedProcess:
    env = dict(os.environ, CHAT_MAGIC_HOME=str(home), CHAT_MAGIC_CONFIG=str(cfg), CHAT_MAGIC_EXIT_TIMEOUT="5")
    env.pop("GOOGLE_CHAT_WEBHOOK_URL", None)
    return subprocess.run([sys.executable, "-m", "chat_magic.cli", *args], input=stdin, capture_output=True, text=True,
                          timeout=180, env=env, check=False)


def _left_in_outbox(home) -> list:
    box = Outbox(hosts.outbox_path(home))
    try:
        return box.rows()
    finally:
        box.close()


@pytest.mark.parametrize("how", ["down", "wrong token"])
def test_a_failed_test_hello_is_not_left_in_the_outbox(refusing, outbox_home, tmp_path, how):
    url = refusing.webhook_url(space="SHELLO")
    if how == "down":
        refusing.set_down(True)  # every connection reset: a transient error, retried until --timeout
    else:
        url = url.replace(TOKEN, "wrong-token-" + "w" * 20)  # refused for good (401/403)
    cfg = tmp_path / "config.toml"
    p = _cli("spaces", "add", "team", "--test", "--timeout", "3", home=outbox_home, cfg=cfg, stdin=url + "\n")
    assert p.returncode == 1, p.stdout + p.stderr
    assert p.stderr.count("\n") == 1 and "nothing saved" in p.stderr, p.stderr
    assert "still queued" not in p.stderr and "will retry" not in p.stderr  # it is not
    assert_no_secret(p.stdout, p.stderr)
    assert "wrong-token" not in p.stderr and not cfg.exists()
    assert _left_in_outbox(outbox_home) == [], "the hello of a failed --test is still in the outbox"

    # a later process that uses chat_magic delivers nothing into the space that was not saved
    refusing.set_down(False)
    later = _cli("outbox", "flush", home=outbox_home, cfg=cfg)
    assert later.returncode == 0, later.stderr
    listed = _cli("outbox", "list", home=outbox_home, cfg=cfg)
    assert "SHELLO" not in listed.stdout and "👋" not in listed.stdout, listed.stdout
    assert refusing.messages(space="SHELLO") == []


def test_a_test_hello_that_arrives_is_saved_and_its_record_kept(refusing, outbox_home, tmp_path):
    """The control: a delivered hello is saved and stays in the outbox as sent (what `outbox list` counts)."""
    url = refusing.webhook_url(space="SHELLOOK")
    cfg = tmp_path / "config.toml"
    p = _cli("spaces", "add", "team", "--test", "--timeout", "30", home=outbox_home, cfg=cfg, stdin=url + "\n")
    assert p.returncode == 0, p.stderr
    assert cfg.exists() and "delivered a hello" in p.stdout
    wait_until(lambda: refusing.messages(space="SHELLOOK"), what="the hello in the space")
    assert [r.state for r in _left_in_outbox(outbox_home)] == ["sent"]
