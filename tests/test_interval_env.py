"""``CHAT_MAGIC_INTERVAL``: the pacing interval from the environment, read when used, never at import.

It lets a process that cannot call ``configure`` (a kernel, ``chat-magic run``, a script) pace
for a server with another quota, such as ``chat-magic emulator --qps 0``; the test suite gives
it to the kernels and subprocesses of its pacing-free tests. ``configure`` still wins, and a bad
value is one line and the default, like ``CHAT_MAGIC_EXIT_TIMEOUT``.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import chat_magic
from chat_magic import delivery, rules

ENV = "CHAT_MAGIC_INTERVAL"


@pytest.fixture
def user_settings(monkeypatch):
    """This process's settings as a user's are (the suite's pacing-free interval set by nobody here)."""
    monkeypatch.delenv(ENV, raising=False)
    monkeypatch.setattr(delivery.settings, "_interval", None)
    monkeypatch.setattr(delivery.settings, "_gap_after_answer", None)
    return delivery.settings


@pytest.mark.parametrize(("value", "interval", "gap"), [(None, 1.1, 1.02), ("0", 0.0, 0.0), ("0.25", 0.25, 0.25), ("2", 2.0, 1.02), ("1m", 60.0, 1.02)])
def test_the_interval_and_the_gap_after_an_answer_follow_the_environment_when_read(user_settings, monkeypatch, value, interval, gap):
    if value is not None:
        monkeypatch.setenv(ENV, value)  # after chat_magic was imported: it is read when used
    assert (user_settings.interval, user_settings.gap_after_answer) == (interval, gap)


def test_configure_wins_over_the_environment(user_settings, monkeypatch):
    monkeypatch.setenv(ENV, "0.25")
    chat_magic.configure(interval=3, gap_after_answer=0.5)
    assert (user_settings.interval, user_settings.gap_after_answer) == (3.0, 0.5)
    assert "interval" in user_settings.names() and "gap_after_answer" in user_settings.names()
    assert not [n for n in user_settings.names() if n.startswith("_")]


@pytest.mark.parametrize("value", ["fast", "-1", "nan", "2 days"])
def test_a_bad_value_is_one_line_and_the_users_pacing(user_settings, monkeypatch, capsys, value):
    monkeypatch.setenv(ENV, value)
    monkeypatch.setattr(rules, "_said", set())
    assert (user_settings.interval, user_settings.gap_after_answer) == (1.1, 1.02)
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and ENV in err and "using 1.1s" in err and "Traceback" not in err, err


def test_a_subprocess_paces_by_the_environment_it_is_given(tmp_path):
    code = "from chat_magic import delivery; print(delivery.settings.interval, delivery.settings.gap_after_answer)"
    env = {k: v for k, v in os.environ.items() if k != ENV}
    user = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=60)
    fast = subprocess.run([sys.executable, "-c", code], env={**env, ENV: "0.01"}, capture_output=True, text=True, timeout=60)
    assert (user.stdout.split(), fast.stdout.split()) == (["1.1", "1.02"], ["0.01", "0.01"]), user.stderr + fast.stderr
