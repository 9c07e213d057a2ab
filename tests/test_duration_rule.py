"""One rule for durations (``chat_magic.rules.seconds``), pinned across every front end that reads one.

A duration is seconds (``90``, ``2.5``) or a number with ``s``, ``m`` or
``h``. Environment variables (read deep inside delivery) fall back to their
default with one line naming the variable, the value and the accepted forms;
an option a user types (Python keyword, magic option, command-line option) is
refused with that line. Before the rule there were three parsers that
disagreed: ``CHAT_MAGIC_EXIT_TIMEOUT=3s`` and ``CHAT_MAGIC_REDIS_SLOW=1m`` were
bad input while ``CHAT_MAGIC_IMAGE_PATIENCE=5m`` was fine, and every option
took plain floats only.

Front ends are real: the environment readers the delivery code calls, a real
IPython shell for ``%chat_autonotify``, ``notify_when_done``, and the
``chat-magic`` command in a subprocess.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys

import pytest

from chat_magic import rules

BAD = None  # the expected value of a case that must be refused
FORMS = "seconds (90 or 2.5) or a number with s, m or h (90s, 5m, 2h)"  # what every bad-duration line says


def _env(name: str, read, default: float):
    def front(value: str, monkeypatch, capsys, **_) -> tuple[float | None, str]:
        monkeypatch.setenv(name, value)
        got = read()
        err = capsys.readouterr().err
        if err:
            assert got == default, "a bad value falls back to the default"
            assert "; using " in err
        return (None if err else got), err

    return front


def _exit_timeout() -> float:
    from chat_magic import delivery

    return delivery.settings.exit_timeout


def _patience() -> float:
    from chat_magic import images

    return images.patience()


def _redis_slow() -> float:
    from chat_magic import pacing

    return pacing._slow_after(lambda line: print(line, file=sys.stderr))


def _heartbeat() -> float:
    from chat_magic import heartbeat

    return heartbeat.beat_every()


def _stall_after_keyword(value: str, monkeypatch, capsys, **_) -> tuple[float | None, str]:
    import chat_magic
    from chat_magic import ConfigError

    try:
        return chat_magic.notify_when_done("x", stall_after=value).stall_after, ""
    except ConfigError as e:
        return None, str(e)


def _progress_every_keyword(value: str, monkeypatch, capsys, **_) -> tuple[float | None, str]:
    from chat_magic import ConfigError
    from chat_magic.integrations._base import TrainingWatch  # what every framework's ChatCallback is

    try:
        return TrainingWatch(progress_every=value).progress_every, ""
    except ConfigError as e:
        return None, str(e)


def _magic(option: str, key: str):
    def front(value: str, monkeypatch, capsys, request, **_) -> tuple[float | None, str]:
        ip = request.getfixturevalue("ip")
        given = f"{option} {shlex.quote(value)}"
        result = ip.run_cell(f"%chat_autonotify {given}" if option == "--threshold" else f"%chat_autonotify --threshold 100 {given}")
        try:
            if result.error_in_exec is not None:
                return None, str(result.error_in_exec)
            magics = ip.magics_manager.registry["ChatMagics"]
            return magics._auto[key], ""
        finally:
            ip.run_cell("%chat_autonotify off")

    return front


def _cli(args: list[str], ok_words: str):
    def front(value: str, monkeypatch, capsys, **_) -> tuple[float | None, str]:
        argv = [a.replace("VALUE", value) for a in args]
        out = subprocess.run([sys.executable, "-m", "chat_magic.cli", *argv], env=dict(os.environ),
                             capture_output=True, text=True, timeout=60)
        if "argument --" in out.stderr:  # argparse's line about an option's value
            assert out.returncode == 2, out.stderr
            return None, out.stderr
        assert ok_words in out.stdout + out.stderr, out.stderr
        return {"5s": 5.0, "1m": 60.0, "2.5": 2.5, " 0.5 m ": 30.0}[value], ""  # parsed: the command went on to its work

    return front


FRONT_ENDS = {
    "CHAT_MAGIC_EXIT_TIMEOUT": _env("CHAT_MAGIC_EXIT_TIMEOUT", _exit_timeout, 3.0),
    "CHAT_MAGIC_IMAGE_PATIENCE": _env("CHAT_MAGIC_IMAGE_PATIENCE", _patience, 120.0),
    "CHAT_MAGIC_REDIS_SLOW": _env("CHAT_MAGIC_REDIS_SLOW", _redis_slow, 0.15),
    "CHAT_MAGIC_HEARTBEAT": _env("CHAT_MAGIC_HEARTBEAT", _heartbeat, 15.0),
    "stall_after=": _stall_after_keyword,
    "%chat_autonotify --stall-after": _magic("--stall-after", "stall_after"),
    "%chat_autonotify --threshold": _magic("--threshold", "threshold"),
    "chat-magic send --timeout": _cli(["send", "--timeout", "VALUE", "duration rule"], ""),
    "chat-magic watch --lost-after": _cli(["watch", "--once", "--lost-after", "VALUE"], "no Redis configured"),
    "chat-magic run --wait": _cli(["run", "--wait", "VALUE", "--", sys.executable, "-c", "pass"], ""),
    "ChatCallback(progress_every=)": _progress_every_keyword,
}
# "5s" for the exit timeout was bad input before the rule: a user who writes 3s means 3 seconds
VALUES = [("5s", 5.0), ("1m", 60.0), ("2.5", 2.5), (" 0.5 m ", 30.0), ("soon", BAD), ("-1", BAD), ("1e3", BAD)]


@pytest.fixture
def quiet_once(monkeypatch):
    """A fresh "said once" memory: each case's bad value is told in this case."""
    monkeypatch.setattr(rules, "_said", set(), raising=False)
    monkeypatch.delenv("CHAT_MAGIC_REDIS_URL", raising=False)
    from chat_magic import delivery

    monkeypatch.setattr(delivery.settings, "_exit_timeout", None)


@pytest.mark.parametrize(("value", "expected"), VALUES, ids=[v for v, _ in VALUES])
@pytest.mark.parametrize("front", list(FRONT_ENDS))
def test_every_front_end_reads_a_duration_by_the_one_rule(front, value, expected, fast_space, quiet_once, monkeypatch,
                                                          capsys, request):
    got, said = FRONT_ENDS[front](value, monkeypatch=monkeypatch, capsys=capsys, request=request)
    if expected is BAD:
        lines = [ln for ln in said.splitlines() if value.strip() in ln]
        assert len(lines) == 1, said
        assert FORMS in lines[0] and repr(value.strip()) in lines[0], lines[0]
        assert "Traceback" not in said
        if front.startswith("CHAT_MAGIC_"):
            assert f"{front}={value!r}" in lines[0], lines[0]
    else:
        assert said == "" and got == expected


def test_a_bad_environment_value_is_told_once_per_process(monkeypatch, capsys):
    from chat_magic import images

    monkeypatch.setattr(rules, "_said", set(), raising=False)
    monkeypatch.setenv("CHAT_MAGIC_IMAGE_PATIENCE", "2d")
    assert [images.patience() for _ in range(3)] == [images.PATIENCE] * 3
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.parametrize(("value", "least", "most", "above", "ok"), [
    ("0", 0.0, 60.0, False, True), ("0", 0.0, 60.0, True, False), ("1m", 0.0, 60.0, False, True),
    ("61", 0.0, 60.0, False, False), ("0.1", 0.2, 3600.0, False, False),
])
def test_each_caller_states_its_bounds_and_the_message_says_them(value, least, most, above, ok):
    if ok:
        assert rules.seconds(value, option="X", least=least, most=most, above=above) >= least
    else:
        with pytest.raises(rules.ConfigError, match=r"^X='[^']*' is not a duration (from|over) .* write seconds"):
            rules.seconds(value, option="X", least=least, most=most, above=above)
