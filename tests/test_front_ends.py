"""One rule in every front end, and the rough edges a new user met (issue 13).

Everything runs for real: the magics in a real IPython shell and a real
kernel (nbclient + ipykernel), ``notify_when_done`` in this process, the
``chat-magic`` command as a subprocess, all posting to the emulator over HTTP.
"""

from __future__ import annotations

import html
import os
import re
import subprocess
import sys
import time

import IPython
import nbformat
import pytest
import requests
from conftest import assert_no_secret, wait_until

import chat_magic
from chat_magic.emulator import Emulator
from chat_magic.errors import ConfigError
from chat_magic.rules import validate_mention

CLI = [sys.executable, "-m", "chat_magic.cli"]


def cli(*args: str, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    p = subprocess.run([*CLI, *args], env=env or dict(os.environ), capture_output=True, text=True, timeout=timeout)
    assert_no_secret(p.stdout, p.stderr)
    return p


def card_text(m: dict) -> str:
    parts = [m.get("text", "")]
    for entry in m.get("cardsV2", []):
        for sec in entry["card"]["sections"]:
            for w in sec["widgets"]:
                for kind in ("decoratedText", "textParagraph"):
                    if kind in w:
                        parts.append(html.unescape(re.sub(r"<[^>]+>", "", w[kind]["text"])))
    return "\n".join(parts)


# -- the mention rule, the same everywhere ----------------------------------------------


@pytest.mark.parametrize("who, ok", [
    ("all", True), ("users/all", True), ("123456789012345678901", True), ("alice@example.com", True),
    ("users/alice@example.com", True), ("alice-bot", False), ("every one", False), ("", False), ("<users/all>", False),
])
def test_the_mention_rule_is_one_rule_in_all_three_front_ends(ip, fast_space, capsys, who, ok):
    # the rule itself
    if ok:
        assert validate_mention(who) == who.removeprefix("users/")
    else:
        with pytest.raises(ConfigError, match="is not someone Google Chat can mention"):
            validate_mention(who)
    # %%chat: a UsageError line, or the cell runs
    capsys.readouterr()
    r = ip.run_cell(f"%%chat --mention '{who}' --on-error\n1", store_history=True)
    shown = capsys.readouterr()
    assert ("UsageError" in shown.out + shown.err) is (not ok), shown
    assert r.success is ok or r.error_before_exec is None
    # notify_when_done: a ConfigError at once, or accepted
    if ok:
        assert chat_magic.notify_when_done("x", mention=who).mention == who.removeprefix("users/")
    else:
        with pytest.raises(ConfigError):
            chat_magic.notify_when_done("x", mention=who)
    # chat-magic run: exit 2 before the command runs, or the command's own status
    p = subprocess.run([*CLI, "run", "--on", "error", "--mention", who, "--", sys.executable, "-c", "pass"],
                       env=dict(os.environ), capture_output=True, text=True, timeout=60)
    assert p.returncode == (0 if ok else 2), p.stderr
    if not ok:
        assert p.stderr.count("\n") == 1 and "is not someone Google Chat can mention" in p.stderr


def test_an_email_mention_reaches_the_text(ip, fast_space):
    ip.run_cell("%chat --mention alice@example.com -- deploy done", store_history=True)
    assert chat_magic.flush(30)
    assert "\n<users/alice@example.com> deploy done" in "\n".join(fast_space.texts())


# -- %chat and a literal dollar ---------------------------------------------------------------


def test_a_literal_dollar_is_written_twice(ip, fast_space):
    ip.user_ns["price"] = 5
    ip.run_cell("%chat costs $$5, or $price, and {{braces}}", store_history=True)
    assert chat_magic.flush(30)
    assert "\ncosts $5, or 5, and {braces}" in "\n".join(fast_space.texts())


# -- tracebacks name the cell that ran ---------------------------------------------------------


def test_a_failing_chat_cell_is_named_by_its_own_prompt(ip, fast_space, capsys):
    ip.run_cell("x = 1", store_history=True)
    capsys.readouterr()
    r = ip.run_cell("%%chat --title Load\nopen('/nonexistent/chat-magic-data.csv')", store_history=True)
    shown = capsys.readouterr()
    n = r.execution_count
    assert isinstance(n, int) and not r.success
    from chat_magic.message import strip_ansi

    # what the user sees, under prompt [n] ("<ipython-input-n-...>" on IPython 7)
    assert re.search(rf"Cell In\[{n}\]|<ipython-input-{n}-", strip_ansi(shown.out + shown.err))
    assert chat_magic.flush(30)
    (notice,) = [m for m in fast_space.messages() if "cardsV2" in m]
    text = card_text(notice)
    assert f"Cell In[{n}], line 1" in text or f'"Cell In[{n}]", line 1' in text, text
    assert "_modified_open" not in text and "IPython" not in text and "ipython-input" not in text
    assert "FileNotFoundError" in text


NOTEBOOK_CELLS = [
    "%load_ext chat_magic",
    "x = 41",
    "%%chat --title Load\nopen('/nonexistent/chat-magic-data.csv')",
]


def test_in_a_real_kernel_the_card_shows_the_cell_not_a_temporary_file(fast_space, tmp_path):
    from nbclient import NotebookClient

    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(src) for src in NOTEBOOK_CELLS]
    nb.cells[-1].metadata["tags"] = ["raises-exception"]
    NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}}).execute()
    failing = nb.cells[-1]
    (error,) = [o for o in failing.outputs if o.output_type == "error"]
    prompt = failing.execution_count
    from chat_magic.message import strip_ansi

    shown = strip_ansi("\n".join(error.traceback))
    # IPython 8+ names a cell by its prompt: the %%chat cell's own. IPython 7 (Colab) shows ipykernel's
    # temporary file and keeps no record of its number; the card names the cell's number all the same.
    modern = int(IPython.__version__.split(".")[0]) >= 8
    if modern:
        assert re.search(rf"Cell In\[{prompt}\]", shown), shown  # under prompt [n]: [n]
    wait_until(lambda: [m for m in fast_space.messages() if "cardsV2" in m], 30, what="the notice")
    text = card_text([m for m in fast_space.messages() if "cardsV2" in m][0])
    assert f'"Cell In[{prompt}]", line 1' in text, text
    assert "ipykernel_" not in text and "_modified_open" not in text and "/tmp/" not in text


# -- the command line -------------------------------------------------------------------------


def test_send_timeout_is_the_whole_wait(space, emulator):
    emulator.set_down(True)
    try:
        t0 = time.monotonic()
        p = cli("send", "never arrives", "--timeout", "2")
        took = time.monotonic() - t0
    finally:
        emulator.set_down(False)
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1, p.stderr
    assert p.stderr.startswith("chat-magic: not delivered within 2 s (still queued, will retry)")
    assert "not delivered: not delivered" not in p.stderr
    # before: --timeout, then the exit hook's own 3 s wait (5 s in all for --timeout 2)
    assert took < 4.5, took
    assert chat_magic.flush(30)  # it stayed queued: delivered now
    assert space.texts() == ["never arrives"]


def test_unknown_outbox_ids_are_named(outbox_home):
    for action in ("retry", "drop"):
        p = cli("outbox", action, "999")
        assert p.returncode == 2, (action, p.stdout, p.stderr)
        assert "no message 999 in the outbox" in p.stderr


@pytest.mark.parametrize("command", ["send", "run", "outbox", "emulator", "demo", "spaces"])
def test_every_subcommand_has_help(command):
    p = cli(command, "--help")
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith(f"usage: chat-magic {command}")
    description = p.stdout.split("\n\n")[1]
    assert len(description.split()) >= 5, "a sentence that says what it does"


def test_outbox_help_explains_each_action():
    out = cli("outbox", "--help").stdout
    for action in ("list", "flush", "retry", "drop", "prune"):
        assert re.search(rf"^\s+{action}\s+\w+", out, re.M), action


# -- the emulator ------------------------------------------------------------------------------


def test_the_web_views_favicon_is_not_a_webhook_request():
    with Emulator(qps=None) as emu:
        page = requests.get(emu.base_url + "/", timeout=5)
        icon = requests.get(emu.base_url + "/favicon.ico", timeout=5)
        assert page.status_code == 200 and icon.status_code == 204
        stats = emu.stats()
        assert stats["requests"] == 0 and stats["rejected"] == 0
        again = requests.get(emu.base_url + "/", timeout=5).text
        assert "0 requests" in again and "rejected" not in again.split("0 requests", 1)[1][:40]


def test_message_and_thread_ids_differ_between_emulator_runs():
    names = []
    for _ in range(2):
        with Emulator(qps=None) as emu:
            url = emu.webhook_url(space="SAME")
            r = requests.post(url, params={"messageReplyOption": "REPLY_MESSAGE_FALLBACK_TO_NEW_THREAD"},
                              json={"text": "hi", "thread": {"threadKey": "k"}}, timeout=5)
            assert r.status_code == 200, r.text
            names.append((r.json()["name"], r.json()["thread"]["name"]))
    assert names[0][0] != names[1][0] and names[0][1] != names[1][1]


# -- a set-up mistake in a notebook is one line, even under %xmode Verbose ----------------------


def test_a_config_mistake_is_one_line_in_a_verbose_shell(ip, fast_space, tmp_path, monkeypatch, capsys):
    from conftest import KEY, TOKEN

    config = tmp_path / "config.toml"
    bad = f"http://chat.example.com/v1/spaces/AAA/messages?key={KEY}&token={TOKEN}"  # http to another host: refused
    config.write_text(f'[spaces.broken]\nwebhook_url = "{bad}"\n[spaces.fine]\nwebhook_url = "{fast_space.url}"\n')
    config.chmod(0o600)
    monkeypatch.setenv("CHAT_MAGIC_CONFIG", str(config))
    ip.run_line_magic("xmode", "Verbose")
    try:
        capsys.readouterr()
        r = ip.run_cell("import chat_magic\nchat_magic.notify_when_done('job', to='broken')", store_history=True)
        shown = capsys.readouterr()
    finally:
        ip.run_line_magic("xmode", "Context")
    assert not r.success and type(r.error_in_exec).__name__ == "WebhookURLError"
    from chat_magic.message import strip_ansi

    lines = [ln for ln in strip_ansi(shown.out + shown.err).splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("WebhookURLError: [spaces.broken]: "), lines
    assert_no_secret(shown.out, shown.err)
