"""One rule, one place (issue 20): each rule driven through every front end that has it.

Everything is real: the magics in a real IPython shell, ``notify_when_done``
and the training watch in this process, the ``chat-magic`` command as a
subprocess, the composer's widgets clicked, all posting to the emulator over
HTTP. A rule that a front end skipped shows up here as a post (or a
traceback) where every other front end has none.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from conftest import assert_no_secret

import chat_magic
from chat_magic.errors import ConfigError

pytestmark = pytest.mark.jupyter  # magics, the composer: CI runs these on Colab's pinned stack too

CLI = [sys.executable, "-m", "chat_magic.cli"]


def cli(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    p = subprocess.run([*CLI, *args], env=dict(os.environ), capture_output=True, text=True, timeout=timeout)
    assert_no_secret(p.stdout, p.stderr)
    return p


def settled(space) -> int:
    """How many requests reached the space, once this process has nothing left to send."""
    assert chat_magic.flush(30)
    return len(space.requests())


def notices(space) -> list[dict]:
    """The messages in the space but a session's "🐍 ... session started" announcement."""
    assert chat_magic.flush(30)
    return [m for m in space.messages() if not m.get("text", "").startswith("🐍")]


# -- "post only on error": one decision (report.should_post) ---------------------------------

# how a run ends, as Python code for a cell, a block, or a child process
ENDINGS = {
    "interrupted": "raise KeyboardInterrupt",
    "exit 0": "raise SystemExit(0)",
    "failed": "raise ValueError('bad batch')",
}
POSTED = {"interrupted": False, "exit 0": False, "failed": True}


def _cell_magic(ip, code):
    ip.run_cell(f"%%chat --on-error\n{code}", store_history=True)


def _autonotify(ip, code):
    ip.run_cell("%chat_autonotify --on-error", store_history=True)
    ip.run_cell(code, store_history=True)
    ip.run_cell("%chat_autonotify off", store_history=True)


def _run_all(ip, code):
    ip.run_cell("%chat_autonotify --run-all --on-error --quiet 0.1", store_history=True)
    magics = ip.magics_manager.registry["ChatMagics"]
    runall = magics._runall
    ip.run_cell("x = 1", store_history=True)
    ip.run_cell(code, store_history=True)
    # the run with the cell ends (not just any run: a pause of 0.1 s before it, on a loaded machine, ended the first
    # one without it, and "off" below then dropped the one with it)
    assert runall.idle.wait(30), "the run with the cell to end"
    ip.run_cell("%chat_autonotify off", store_history=True)


def _notify_when_done(ip, code):
    try:
        with chat_magic.notify_when_done("job", on="error"):
            exec(code)
    except BaseException:
        pass


def _training_callback(ip, code):
    from chat_magic.integrations._base import TrainingWatch

    watch = TrainingWatch("fit", on="error")  # what the Lightning, Keras and HF callbacks drive
    watch.begin(name="fit", model="Net", epochs=2)
    watch.epoch(1, {"loss": 0.5})
    try:
        exec(code)
    except BaseException as e:
        watch.end(e)
    else:
        watch.end(None)


def _chat_magic_run(ip, code):
    if code == ENDINGS["interrupted"]:  # a child killed by SIGINT, as Ctrl-C in a terminal does
        code = "import os, signal; os.kill(os.getpid(), signal.SIGINT); import time; time.sleep(30)"
    cli("run", "--on", "error", "--", sys.executable, "-c", code)  # the child's own traceback passes through


FRONT_ENDS = {
    "%%chat --on-error": _cell_magic,
    "%chat_autonotify --on-error": _autonotify,
    "%chat_autonotify --run-all --on-error": _run_all,
    'notify_when_done(on="error")': _notify_when_done,
    'training callbacks on="error"': _training_callback,
    "chat-magic run --on error": _chat_magic_run,
}


@pytest.mark.parametrize("ending", list(ENDINGS))
@pytest.mark.parametrize("front_end", list(FRONT_ENDS))
def test_post_only_on_error_is_one_decision_in_every_front_end(ip, fast_space, capsys, front_end, ending):
    FRONT_ENDS[front_end](ip, ENDINGS[ending])
    posted = notices(fast_space)
    assert len(posted) == (1 if POSTED[ending] else 0), (front_end, ending, fast_space.texts())
    if posted:
        assert "bad batch" in str(posted) or "exit code" in str(posted)


def test_the_on_error_rule_itself():
    from chat_magic.report import FAILED, INTERRUPTED, OK, should_post, status_of

    assert status_of(KeyboardInterrupt()) == INTERRUPTED and status_of(SystemExit(0)) == OK
    assert status_of(SystemExit(2)) == FAILED and status_of(exit_code=-2) == INTERRUPTED
    assert status_of(exit_code=-15) == FAILED and status_of(exit_code=0) == OK
    assert [should_post(s, on_error=True) for s in (OK, INTERRUPTED, FAILED)] == [False, False, True]
    assert [should_post(s, on_error=False) for s in (OK, INTERRUPTED, FAILED)] == [True, True, True]
    assert [should_post(s, on_error=False, worth_it=False) for s in (OK, INTERRUPTED, FAILED)] == [False, False, True]


# -- the thread-key rule, inside send() -------------------------------------------------------

BAD_KEYS = {"blank": "   ", "empty": "", "too long": "k" * 4001}


def _send(key):
    chat_magic.send("hello", thread_key=key)


def _session_send(key):
    from chat_magic.session import current_session

    current_session().send("hello", thread_key=key or " ")  # "" means "the session's thread" there


def _cli_send(key):
    p = cli("send", "--thread", key, "--timeout", "20", "hello")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "--thread" in p.stderr, p.stderr
    raise ConfigError(p.stderr)


def _composer(key):
    from chat_magic.composer import Composer

    c = Composer(thread="custom", thread_key=key)
    c.message.value = "hello"
    c.send_button.click()  # a blank key leaves the button disabled: nothing is sent either way
    if not key.strip():
        assert c.send_button.disabled
        raise ConfigError("no thread key: the Send button stays disabled")
    assert "thread_key" in c.status.value, c.status.value
    raise ConfigError(c.status.value)


def _tqdm(key):
    for _ in chat_magic.tqdm(range(3), chat_thread_key=key, chat_interval=0):
        pass


SENDERS = {
    "chat_magic.send": _send,
    "the session's send": _session_send,
    "chat-magic send --thread": _cli_send,
    "the composer": _composer,
    "the tqdm wrapper": _tqdm,
}


@pytest.mark.parametrize("key", list(BAD_KEYS))
@pytest.mark.parametrize("front_end", list(SENDERS))
def test_a_bad_thread_key_is_refused_by_every_front_end(fast_space, front_end, key):
    with pytest.raises(ConfigError, match=r"1 to 4,000 characters|thread"):
        SENDERS[front_end](BAD_KEYS[key])
    assert settled(fast_space) == 0, fast_space.texts()


def test_a_good_thread_key_is_posted_stripped(fast_space):
    chat_magic.send("hello", thread_key="  nightly  ")
    (m,) = fast_space.wait_for(1)
    assert m["thread"]["threadKey"] == "nightly"


# -- settings: ConfigError, one line, public names only ------------------------------------------


@pytest.fixture
def saved_settings():
    from chat_magic import delivery

    saved = dict(vars(delivery.settings))
    yield delivery.settings
    vars(delivery.settings).update(saved)


@pytest.mark.parametrize("value", ["fast", None, True, -1, float("nan"), [1], "1.5"])
def test_a_bad_setting_is_one_config_error_naming_it(saved_settings, value):
    before = saved_settings.interval
    with pytest.raises(ConfigError) as e:
        chat_magic.configure(read_timeout=3, interval=value)
    line = str(e.value)
    assert "\n" not in line and line.startswith("interval=") and "number of seconds >= 0" in line
    assert saved_settings.interval == before and saved_settings.read_timeout != 3  # all checked before any is set


@pytest.mark.parametrize("name", ["backoff_base", "backoff_cap"])
def test_a_retry_longer_than_another_process_believes_is_refused(saved_settings, name, tmp_path):
    """A retry time past 300 s reads as a wall clock that stepped back in another process: retried there at once."""
    from chat_magic import delivery, outbox

    assert delivery.LONGEST_RETRY + 30 <= outbox.MAX_HOLD  # what this process may wait, another believes
    before = getattr(saved_settings, name)
    with pytest.raises(ConfigError) as e:
        chat_magic.configure(**{name: 600})
    assert "\n" not in str(e.value) and str(e.value).startswith(f"{name}=600") and "at most 300 seconds" in str(e.value)
    assert getattr(saved_settings, name) == before
    chat_magic.configure(**{name: 300})
    assert getattr(saved_settings, name) == 300.0


def test_unknown_setting_lists_only_public_ones(saved_settings):
    for name in ("speed", "_exit_timeout", "lease"):
        with pytest.raises(ConfigError) as e:
            chat_magic.configure(**{name: 1})
        listed = str(e.value).split("choose from ", 1)[1].split(", ")
        assert "exit_timeout" in listed and "interval" in listed and "lease" not in listed and "_exit_timeout" not in listed


def test_good_settings_are_set(saved_settings):
    chat_magic.configure(interval=2, exit_timeout=0.5, give_up_after=float("inf"))
    assert saved_settings.interval == 2.0 and saved_settings.exit_timeout == 0.5
    assert isinstance(saved_settings.interval, float)


# -- every line on stderr goes through console.say (it redacts) ------------------------------------

# the only other places that name sys.stderr, and why they may
STDERR_ALLOWED = {
    "console.py",  # say() itself
    "run.py",  # chat-magic run checks which streams are terminals; the child's output passes through
    "cli.py",  # a warning shown to a file other than stderr keeps its file
    "demo.py",  # the kernel's own log lines, indented under the one-line reason
    "magics.py",  # a docstring about IPython's streams
}


def test_no_module_writes_to_stderr_but_console():
    import ast
    from pathlib import Path

    offenders = []
    for path in sorted(Path(chat_magic.__file__).parent.rglob("*.py")):
        if path.name in STDERR_ALLOWED:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Attribute) and node.attr == "stderr" and getattr(node.value, "id", "") == "sys":
                offenders.append(f"{path.name}:{node.lineno}")
    assert offenders == []


def _outbox_tell(tmp_path, line):
    from chat_magic.outbox import Outbox

    box = Outbox(tmp_path / "o.sqlite")
    try:
        box._tell(line)
    finally:
        box.close()


def _delivery_say(tmp_path, line):
    from chat_magic import delivery

    delivery._say(line)


def _pacing_line(tmp_path, line):
    from chat_magic import pacing

    pacing._stderr_line(f"chat_magic: {line}")


def _emulator_line(tmp_path, line):
    from chat_magic.emulator import server

    assert server.main(["--space", line.split()[-1]]) == 2  # an invalid space id, echoed


@pytest.mark.parametrize("helper", [_outbox_tell, _delivery_say, _pacing_line, _emulator_line])
def test_each_stderr_helper_is_one_redacted_line(outbox_home, tmp_path, capsys, caplog, helper):
    from conftest import KEY, TOKEN

    url = f"https://chat.googleapis.com/v1/spaces/AAA/messages?key={KEY}&token={TOKEN}"
    helper(tmp_path, f"could not reach {url}")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("chat_magic"), err
    assert KEY not in err and TOKEN not in err and KEY not in caplog.text and TOKEN not in caplog.text


def test_a_refused_tqdm_bar_leaves_no_exception_at_collection(tmp_path):
    """A bad thread key refuses the bar before tqdm set itself up: its ``__del__`` must say nothing more."""
    code = ("import gc, chat_magic\n"
            "try:\n"
            "    chat_magic.tqdm(range(3), chat_thread_key='   ')\n"
            "except Exception as e:\n"
            "    print(type(e).__name__)\n"
            "gc.collect()\n")
    env = dict(os.environ, CHAT_MAGIC_HOME=str(tmp_path))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ConfigError", out.stdout + out.stderr
    assert "Exception ignored" not in out.stderr and "AttributeError" not in out.stderr, out.stderr
