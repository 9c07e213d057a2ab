"""The IPython extension in a real InteractiveShell, posting to the emulator over real HTTP.

Each test that posts gets its own space (``space`` fixture): one header plus
one notice per cell, paced at Chat's 1 request/second.
"""

from __future__ import annotations

import html
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest
from conftest import KEY, TOKEN, assert_no_secret, validate_message
from IPython.core.error import UsageError

import chat_magic
from chat_magic.magics import ChatMagics, OutputTail, cell_title, describe_display
from chat_magic.message import strip_ansi
from chat_magic.session import current_session

PNG_1X1 = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNkYPhfDwAChwGA60e6kgAAAABJRU5ErkJggg=="
)


# -- fixtures and helpers --------------------------------------------------------


def magics_of(shell) -> ChatMagics | None:
    return shell.magics_manager.registry.get("ChatMagics")


def run(shell, source: str):
    return shell.run_cell(source, store_history=True)


def counts(shell) -> tuple[int, int]:
    cb = shell.events.callbacks
    return len(cb["pre_run_cell"]), len(cb["post_run_cell"])


def flat(m: dict) -> str:
    """Everything a reader sees in a message, as plain text (cards unescaped)."""
    parts = [m.get("text", "")]
    for entry in m.get("cardsV2", []):
        card = entry["card"]
        parts.append(card.get("header", {}).get("title", ""))
        for sec in card.get("sections", []):
            parts.append(sec.get("header", ""))
            for w in sec["widgets"]:
                for kind in ("decoratedText", "textParagraph"):
                    if kind in w:
                        parts.append(w[kind].get("topLabel", ""))
                        parts.append(html.unescape(re.sub(r"<[^>]+>", "", w[kind]["text"])))
    return "\n".join(p for p in parts if p)


def titles(messages: list[dict]) -> list[str]:
    return [e["card"]["header"]["title"] for m in messages for e in m.get("cardsV2", [])]


def delivered(space) -> list[dict]:
    assert chat_magic.flush(30), "not everything was delivered"
    return space.messages()


def usage_lines(text: str) -> list[str]:
    return [ln for ln in strip_ansi(text).splitlines() if ln.startswith("UsageError")]


# -- %%chat ------------------------------------------------------------------------


def test_chat_cell_runs_as_usual_and_posts_one_notice(ip, fast_space, capsys):
    capsys.readouterr()
    r = run(ip, "%%chat\n# Train the model\nimport sys\nprint('epoch 1 done')\nprint('careful', file=sys.stderr)\n6 * 7")
    out = capsys.readouterr()
    assert r.success
    assert "epoch 1 done" in out.out and "careful" in out.err  # the user still sees the output
    assert out.out.count("Out[") == 1 and "42" in out.out  # and the result, once
    assert ip.user_ns["Out"][r.execution_count] == 42 and ip.user_ns["_"] == 42

    msgs = delivered(fast_space)
    assert len(msgs) == 2  # the session header, then one notice
    assert len({m["thread"]["name"] for m in msgs}) == 1
    assert "IPython" in msgs[0]["text"] and current_session().host in msgs[0]["text"]
    (title,) = titles(msgs)
    assert re.match(r"✅ Train the model finished in \d+ ms$", title)
    body = flat(msgs[1])
    assert "epoch 1 done" in body and "careful" in body
    assert f"Out[{r.execution_count}]: 42" in body
    assert "Duration" in body
    assert msgs[1]["fallbackText"].startswith("✅ Train the model finished")


def test_failing_cell_shows_its_traceback_once_and_posts_the_error(ip, fast_space, capsys):
    capsys.readouterr()
    r = run(ip, "%%chat --title 'Load the data'\nprint('loading')\nraise ValueError('bad value')")
    out = capsys.readouterr()
    shown = strip_ansi(out.out + out.err)
    assert not r.success and isinstance(r.error_in_exec, ValueError)  # the cell fails, as without the magic
    assert shown.count("ValueError: bad value") == 1 and shown.count("Traceback") == 1
    assert "UsageError" not in shown and "chat_magic" not in shown
    assert "loading" in out.out

    msgs = delivered(fast_space)
    (title,) = titles(msgs)
    assert title.startswith("❌ Load the data failed in")
    body = flat(msgs[-1])
    assert "ValueError: bad value" in body and "loading" in body
    assert "raise ValueError('bad value')" in body  # the last traceback lines
    assert "interactiveshell.py" not in body  # IPython's own frames are left out


def test_on_error_posts_only_failures_not_interrupts(ip, fast_space, capsys):
    # an interrupt is not a failure (report.should_post, the same in every front end: test_house_rules.py)
    assert run(ip, "%%chat --on-error --title Quiet\nprint('fine')").success
    r = run(ip, "%%chat --on-error --title Stopped\nraise KeyboardInterrupt")
    assert isinstance(r.error_in_exec, KeyboardInterrupt)
    run(ip, "%%chat --on-error --title Broken\n1 / 0")
    msgs = delivered(fast_space)
    t = titles(msgs)
    assert len(t) == 1
    assert t[0].startswith("❌ Broken failed")
    assert "ZeroDivisionError" in flat(msgs[-1])
    assert "Quiet" not in json.dumps(msgs, ensure_ascii=False) and "Stopped" not in json.dumps(msgs, ensure_ascii=False)


def test_untrusted_output_cannot_mention_nor_break_its_block(ip, fast_space, capsys):
    run(ip, "%config ChatMagics.cards = False")
    cell = (
        "%%chat --title Untrusted\n"
        "print('\\x1b[31mred\\x1b[0m <users/all> ping <https://evil.example|click here>')\n"
        "print('```')\n"
        "print('after the fence')\n"
        "raise RuntimeError('oops <users/all>')"
    )
    run(ip, cell)
    run(ip, "%%chat --mention all --title Wanted\nprint('done')")
    text = "\n\n".join(m.get("text", "") for m in delivered(fast_space))
    assert text.count("<users/all>") == 1  # only --mention mentions
    assert "<users/all> " in text.split("Wanted")[0][-40:]
    assert "<https://evil.example|" not in text and "evil.example" in text
    assert "\x1b" not in text and "[31m" not in text and "red" in text
    # "after the fence" still sits inside the output's code block
    lines = text.splitlines()
    inside = False
    for ln in lines:
        if ln == "```":
            inside = not inside
        elif "after the fence" in ln:
            assert inside
            break
    else:
        pytest.fail("output missing")
    assert "RuntimeError: oops" in text


def test_max_lines_no_output_and_a_huge_output(ip, fast_space, capsys):
    run(ip, "%config ChatMagics.cards = False")
    run(ip, "%%chat --max-lines 3 --title Lines\nfor i in range(100):\n    print(f'line {i}')")
    run(ip, "%%chat --no-output --title Private\nprint('private-data-123')")
    big = "%%chat --title Big\nchunk = 'x' * 9999 + '\\n'\nfor _ in range(500):\n    print(chunk, end='')\nprint('the end')"
    run(ip, big)
    capsys.readouterr()
    text = "\n\n".join(m.get("text", "") for m in delivered(fast_space))
    lines_part = text.split("Lines finished")[1].split("Private")[0]
    assert "line 99" in lines_part and "line 97" in lines_part and "line 96" not in lines_part
    assert "cut]" in lines_part
    assert "Private finished" in text and "private-data-123" not in text
    big_part = text.split("Big finished")[1]
    assert "the end" in big_part
    cut = int(re.search(r"\[… ([\d,]+) characters", big_part).group(1).replace(",", ""))
    assert cut > 4_900_000  # 5 MB printed: the note counts what was dropped before the report, too


def test_output_tail_memory_is_bounded():
    t = OutputTail(1000)
    chunk = "y" * 1_000_000
    for _ in range(50):  # 50 MB
        t.write(chunk)
    t.write("tail\n")
    assert len(t.text()) <= 1000 and t.text().endswith("yyyytail\n")
    assert t.dropped == 50_000_005 - 1000


def test_rich_output_is_summarised(ip, fast_space, capsys):
    cell = (
        "%%chat --title Rich\n"
        "import base64\n"
        "from IPython.display import HTML, Image, display\n"
        "display(HTML('<b>bold words</b>'))\n"
        f"display(Image(data=base64.b64decode('{PNG_1X1}'), format='png'))\n"
        "print('plain text too')\n"
        "HTML('<i>result</i>')"
    )
    r = run(ip, cell)
    assert r.success
    body = flat(delivered(fast_space)[-1])
    assert body.count("[text/html]") == 2  # the display and the result
    assert "[image/png]" in body and "plain text too" in body
    assert "bold words" not in body and "IPython.core.display" not in body


def test_describe_display_prefers_useful_text():
    assert describe_display({"text/plain": "   a  b\n0  1  2", "text/html": "<table>"}) == "   a  b\n0  1  2"
    assert describe_display({"text/plain": "<Figure size 640x480 with 1 Axes>", "image/png": "..."}) == "[image/png]"
    assert describe_display({"text/plain": "IntSlider(value=0)", "application/vnd.jupyter.widget-view+json": {}}) == "[widget]"
    assert describe_display({"text/plain": "<foo.Bar object at 0x7f00>", "text/html": "x"}) == "[text/html]"
    assert cell_title("%%time\n\n#   Load data  \nx = 1\n# later") == "Load data"
    assert cell_title("x = 1") == ""


# -- mistakes and problems -------------------------------------------------------


def test_user_mistakes_are_one_line_usage_errors(ip, capsys):
    # outbox_home: no webhook configured at all
    cases = {
        "%%chat\nran_anyway = True": "set GOOGLE_CHAT_WEBHOOK_URL or add a space to",
        "%chat hello": "set GOOGLE_CHAT_WEBHOOK_URL",
        "%chat_autonotify": "set GOOGLE_CHAT_WEBHOOK_URL",
        "%%chat --to nope\n1": "add [spaces.nope] with webhook_url",
        "%%chat --frob\n1": "unrecognized arguments: --frob",
        "%%chat --max-lines many\n1": "--max-lines",
        "%%chat --max-lines -1\n1": ">= 0",
        "%%chat --title 'unclosed\n1": "No closing quotation",
        "%%chat --mention 'every one'\n1": "is not someone Google Chat can mention",
        "%%chat --mention alice-bot\n1": "use 'all', a numeric user id",
        "%chat": "nothing to post",
        "%chat --to": "expected one argument",
        "%chat_autonotify --threshold -3": "--threshold",
        "%chat_thread --bogus": "unrecognized arguments",
    }
    for source, hint in cases.items():
        capsys.readouterr()
        r = run(ip, source)
        out = capsys.readouterr()
        shown = strip_ansi(out.out + out.err)
        errs = usage_lines(shown)
        assert len(errs) == 1 and hint in errs[0], (source, shown)
        assert "Traceback" not in shown and not r.success, source
    assert "ran_anyway" not in ip.user_ns  # a cell whose notice could not go anywhere does not run

    with pytest.raises(UsageError) as e:
        ip.run_cell_magic("chat", "--on-error", "1")
    assert "\n" not in str(e.value) and "GOOGLE_CHAT_WEBHOOK_URL" in str(e.value)


def test_inline_url_warns_once_redacted_and_still_sends(ip, fast_space, capsys, debug_logs, monkeypatch):
    monkeypatch.delenv("GOOGLE_CHAT_WEBHOOK_URL")
    capsys.readouterr()
    r = run(ip, f"%%chat --to {fast_space.url} --title Inline\nprint('inline works')")
    out = capsys.readouterr()
    assert r.success
    warnings = [ln for ln in out.err.splitlines() if ln.startswith("chat_magic:")]
    assert len(warnings) == 1 and "saved with the notebook" in warnings[0] and "key=…" in warnings[0]
    assert "inline works" in flat(delivered(fast_space)[-1])
    assert_no_secret(out.out, out.err, debug_logs.text)


def test_a_delivery_problem_is_one_warning_line_and_the_cell_is_untouched(ip, fast_space, capsys, tmp_path, monkeypatch):
    # The outbox cannot be created at send time: CHAT_MAGIC_HOME under a plain
    # file, and no temporary folder to fall back to.
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(tempfile, "tempdir", tempfile.tempdir)  # restored afterwards
    monkeypatch.setenv("CHAT_MAGIC_HOME", os.environ["CHAT_MAGIC_HOME"])
    cell = (
        "%%chat --title Unlucky\n"
        "import os, tempfile\n"
        f"os.environ['CHAT_MAGIC_HOME'] = {str(blocker / 'home')!r}\n"
        f"tempfile.tempdir = {str(tmp_path / 'missing' / 'tmp')!r}\n"
        "21 * 2"
    )
    capsys.readouterr()
    r = run(ip, cell)
    out = capsys.readouterr()
    assert r.success and ip.user_ns["Out"][r.execution_count] == 42 and out.out.count("Out[") == 1
    lines = [ln for ln in out.err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("chat_magic: message not queued:"), out.err
    assert "Traceback" not in out.out + out.err
    assert_no_secret(out.out, out.err)


def test_a_refused_message_is_told_in_one_line_once_delivery_ends(ip, emulator, capsys, monkeypatch):
    monkeypatch.setenv("GOOGLE_CHAT_WEBHOOK_URL", emulator.webhook_url(space="MAGREFUSED", key=KEY, token="rotated-token-0"))
    capsys.readouterr()
    r = run(ip, "%%chat --title Refused\n6 * 7")
    assert r.success and ip.user_ns["Out"][r.execution_count] == 42
    assert chat_magic.flush(15) is False  # the space said no, for good
    import time

    deadline = time.monotonic() + 5
    err = ""
    while time.monotonic() < deadline and "not delivered" not in err:
        time.sleep(0.05)
        err += capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert lines == ["chat_magic: message not delivered: permission denied: the webhook's token is wrong, "
                     "or the webhook or space was deleted"], err
    assert "rotated-token-0" not in err and KEY not in err


def test_chat_compose_opens_a_composer(ip, fast_space):
    c = ip.run_line_magic("chat_compose", "")
    from chat_magic import Composer

    assert isinstance(c, Composer)
    with pytest.raises(UsageError):
        ip.run_line_magic("chat_compose", "--thread nowhere")


# -- load, unload, configuration -------------------------------------------------------------


def test_unload_and_reload_leave_nothing_behind(shell, fast_space, capsys):
    shell.config.pop("ChatMagics", None)
    if "chat_magic" in shell.extension_manager.loaded:  # left loaded by someone else
        run(shell, "%unload_ext chat_magic")
    before = counts(shell)
    run(shell, "%load_ext chat_magic")
    run(shell, "%chat_autonotify --threshold 100")
    assert counts(shell) == (before[0] + 1, before[1] + 1)
    for _ in range(2):
        run(shell, "%reload_ext chat_magic")
        assert counts(shell) == before
        assert sum(isinstance(c, ChatMagics) for c in shell.configurables) == 1
    run(shell, "%chat_autonotify --threshold 100")
    assert counts(shell) == (before[0] + 1, before[1] + 1)
    assert run(shell, "%chat still working after two reloads").success
    run(shell, "%unload_ext chat_magic")
    assert counts(shell) == before and not any(isinstance(c, ChatMagics) for c in shell.configurables)
    assert "chat" not in shell.magics_manager.magics["line"] and "chat" not in shell.magics_manager.magics["cell"]
    assert magics_of(shell) is None
    capsys.readouterr()
    assert not run(shell, "%chat gone").success
    assert "still working after two reloads" in "\n".join(m.get("text", "") for m in delivered(fast_space))


def test_config_traits(ip, shell, capsys):
    capsys.readouterr()
    run(ip, "%config ChatMagics")
    listing = capsys.readouterr().out
    for trait in ("to", "thread_key", "autonotify_threshold", "max_lines", "max_chars", "cards"):
        assert f"ChatMagics.{trait}=" in listing
    run(ip, "%config ChatMagics.max_lines = 5")
    assert magics_of(ip).max_lines == 5

    from traitlets import TraitError

    url = f"https://chat.googleapis.com/v1/spaces/AAAA/messages?key={KEY}&token={TOKEN}"
    with pytest.raises(TraitError) as e:
        magics_of(ip).to = url
    assert "space name" in str(e.value)
    assert_no_secret(str(e.value))
    with pytest.raises(TraitError):
        magics_of(ip).thread_key = "k" * 4001

    # c.ChatMagics.x in ipython_config.py reaches a freshly loaded extension
    run(ip, "%unload_ext chat_magic")
    shell.config.ChatMagics.autonotify_threshold = 5.5
    shell.config.ChatMagics.cards = False
    run(ip, "%load_ext chat_magic")
    assert magics_of(ip).autonotify_threshold == 5.5 and magics_of(ip).cards is False
    assert ChatMagics.chat_cell.__doc__ and "--on-error" in ChatMagics.chat_cell.__doc__
    assert "%%chat" in ChatMagics.chat_cell.__doc__


# -- %chat_autonotify ----------------------------------------------------------------


def test_autonotify_announces_slow_and_failing_cells_once(ip, fast_space, capsys):
    before = counts(ip)
    # the threshold well above a quick cell on a loaded machine (a 0.2 s one was passed by "1 + 1" in CI)
    run(ip, "%chat_autonotify --threshold 1")
    assert counts(ip) == (before[0] + 1, before[1] + 1)
    run(ip, "# Quick\n1 + 1")
    run(ip, "# Slow step\nimport time\ntime.sleep(1.1)\nprint('slow done')")
    r = run(ip, "# Broken step\nraise OSError('disk full')")
    assert isinstance(r.error_in_exec, OSError)
    run(ip, "%%chat --title Wrapped\nimport time\ntime.sleep(0.3)")  # its own notice, not a second one
    run(ip, "%chat_autonotify --on-error --threshold 0")
    run(ip, "# Fine but slow\nimport time\ntime.sleep(0.3)")
    run(ip, "# Fails fast\n{}['missing']")
    run(ip, "%chat_autonotify off")
    assert counts(ip) == before
    run(ip, "# After off\nimport time\ntime.sleep(0.3)\n1 / 0")
    out = capsys.readouterr()
    assert "auto-notify is on" in out.out and "auto-notify is off" in out.out

    msgs = delivered(fast_space)
    t = titles(msgs)
    assert len(t) == 4, t
    assert t[0].startswith("✅ Slow step finished in")
    assert t[1].startswith("❌ Broken step failed")
    assert t[2].startswith("✅ Wrapped finished")
    assert t[3].startswith("❌ Fails fast failed")
    assert "slow done" in flat(msgs[1]) and "OSError: disk full" in flat(msgs[2]) and "KeyError" in flat(msgs[4])
    assert len({m["thread"]["name"] for m in msgs}) == 1


# -- %chat, threads ----------------------------------------------------------------


def test_chat_line_expands_variables_and_keeps_one_thread(ip, fast_space, capsys):
    run(ip, "loss = 0.25\nepochs = 3")
    run(ip, "%chat loss is *$loss* after {epochs} epochs")
    run(ip, "%chat --mention 123456789 -- -- look at this")
    capsys.readouterr()
    run(ip, "%chat_thread")
    key = current_session().thread_key
    assert key in capsys.readouterr().out
    run(ip, "%%chat --title First\nprint(1)")
    first = delivered(fast_space)
    assert len({m["thread"]["name"] for m in first}) == 1
    assert all(m["thread"]["threadKey"] == key for m in first)
    text = "\n".join(m.get("text", "") for m in first)
    assert "loss is *0.25* after 3 epochs" in text  # the user's own Chat syntax, untouched
    assert "<users/123456789> -- look at this" in text

    run(ip, "%%chat --new-thread --title Second\nprint(2)")
    msgs = delivered(fast_space)[len(first):]
    assert len(msgs) == 2 and msgs[0]["text"].startswith("🐍")  # announced again in the new thread
    assert msgs[0]["thread"]["name"] == msgs[1]["thread"]["name"] != first[0]["thread"]["name"]

    run(ip, "%config ChatMagics.thread_key = 'team-run-7'")
    run(ip, "%chat into a chosen thread")
    last = delivered(fast_space)[-1]
    assert last["thread"]["threadKey"] == "team-run-7"


def test_secrets_never_reach_output_logs_or_the_space(ip, fast_space, capsys, debug_logs):
    cell = (
        "%%chat --title Leaky\n"
        "import os\n"
        "url = os.environ['GOOGLE_CHAT_WEBHOOK_URL']\n"
        "print(url)\n"
        "raise RuntimeError(url)"
    )
    run(ip, cell)  # the cell prints the URL itself: that is the user's doing, but it is not posted
    capsys.readouterr()
    run(ip, "%chat_autonotify --threshold 0")
    run(ip, "# Announced\n1")
    run(ip, "%chat_autonotify off")
    run(ip, "%chat --to nope x")
    run(ip, "%chat_thread")
    out = capsys.readouterr()
    msgs = delivered(fast_space)
    assert "Leaky failed" in json.dumps(msgs, ensure_ascii=False)
    assert_no_secret(out.out, out.err, debug_logs.text, json.dumps(msgs), json.dumps(fast_space.requests()))
    for m in fast_space.requests():
        if m.get("status") == 200:
            validate_message(m["body"])


# -- terminal IPython --------------------------------------------------------------


def test_terminal_ipython_posts_and_delivers_before_exit(fast_space, tmp_path):
    env = dict(os.environ, CHAT_MAGIC_EXIT_TIMEOUT="20", IPYTHONDIR=str(tmp_path / "ipython"))
    code = "%%chat --title Terminal\nprint('from the terminal')\n6 * 7"
    p = subprocess.run(
        [sys.executable, "-m", "IPython", "--quick", "--no-banner", "--ext=chat_magic", "-c", code],
        env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "from the terminal" in p.stdout and "42" in p.stdout
    assert_no_secret(p.stdout, p.stderr)
    msgs = fast_space.wait_for(2, timeout=10)  # delivered before the process exited
    assert titles(msgs)[0].startswith("✅ Terminal finished in")
    assert "from the terminal" in flat(msgs[1])
    assert len({m["thread"]["name"] for m in msgs}) == 1


def test_top_level_await_under_a_running_loop_is_a_usage_error(ip, fast_space):
    import asyncio

    async def in_a_kernel_like_loop():  # ipykernel runs cells while its event loop runs
        with pytest.raises(UsageError) as e:
            ip.run_cell_magic("chat", "", "import asyncio\nawait asyncio.sleep(0)\nran_it = True")
        return str(e.value)

    message = asyncio.run(in_a_kernel_like_loop())
    assert "top-level await" in message and "\n" not in message
    assert "ran_it" not in ip.user_ns
    # without a running loop (terminal IPython) the same cell runs and posts
    assert run(ip, "%%chat --title Awaited\nimport asyncio\nawait asyncio.sleep(0)\nran_it = True").success
    assert ip.user_ns["ran_it"] is True
    assert titles(delivered(fast_space))[0].startswith("✅ Awaited finished")


def test_posting_never_waits_for_the_network(ip, space, emulator):
    import time

    emulator.inject("stall", count=1, seconds=4)  # the next request hangs for 4 s
    try:
        start = time.monotonic()
        r = run(ip, "%%chat --title Stalled\nprint('quick cell')")
        run(ip, "%chat and a line")
        elapsed = time.monotonic() - start
        msgs = delivered(space)
    finally:
        emulator.clear_faults()
    assert r.success
    assert elapsed < 4.0  # waiting for the stalled request would take 4 s at least (2.0 left a loaded machine half that)
    assert [rq["fault"] for rq in space.requests()].count("stall") == 1
    text = json.dumps(msgs, ensure_ascii=False)
    assert "Stalled finished" in text and "and a line" in text
