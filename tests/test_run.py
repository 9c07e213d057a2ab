"""``chat-magic run`` as a real subprocess, posting to the emulator over real HTTP.

The wrapper runs as ``python -c "...main(sys.argv[1:])" -- CMD`` with the
environment pointing at the test's space and a private ``CHAT_MAGIC_HOME``.
"""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import textwrap

from conftest import assert_no_secret

import chat_magic
from chat_magic.run import main

RUN = [sys.executable, "-c", "import sys; from chat_magic.run import main; sys.exit(main(sys.argv[1:]))"]
PY = sys.executable


def run_cli(args: list[str], *, env: dict | None = None, timeout: float = 60, **kw) -> subprocess.CompletedProcess:
    p = subprocess.run(RUN + args, env=env or dict(os.environ), capture_output=True, timeout=timeout, **kw)
    assert_no_secret(p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace"))
    return p


def start_cli(args: list[str], **kw) -> subprocess.Popen:
    return subprocess.Popen(RUN + args, env=dict(os.environ), stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)


def cards(space) -> list[dict]:
    return [m["cardsV2"][0]["card"] for m in space.messages() if m.get("cardsV2")]


def rows(card: dict) -> dict[str, str]:
    return {w["decoratedText"]["topLabel"]: w["decoratedText"]["text"]
            for w in card["sections"][0]["widgets"] if "decoratedText" in w}


def output_section(card: dict) -> str:
    for sec in card["sections"][1:]:
        if sec.get("header") == "Output":
            return sec["widgets"][0]["textParagraph"]["text"]
    return ""


def py(code: str) -> list[str]:
    return [PY, "-c", textwrap.dedent(code)]


# -- exit codes and the notice ------------------------------------------------------


def test_success_exit_0_passes_output_and_posts_a_card(space):
    p = run_cli(["--label", "hello job", "--"] + py("""
        import sys
        print('out line')
        print('err line <script>', file=sys.stderr)
    """))
    assert p.returncode == 0
    assert p.stdout == b"out line\n"
    assert p.stderr == b"err line <script>\n", "nothing of ours on stderr when all went well"
    (msg,) = space.messages()  # run waited for delivery before exiting; a short run is one message
    (card,) = cards(space)
    assert card["header"]["title"].startswith("✅ hello job finished in ")
    r = rows(card)  # the card itself says where it comes from: no header message before it
    assert r["Exit code"] == "0" and "Duration" in r and r["Host"] and "import sys" in r["Command"]
    assert "Error" not in r
    assert "out line" in output_section(card)
    assert "err line &lt;script&gt;" in output_section(card)


def test_failure_exit_3_is_passed_on_and_reported(space):
    p = run_cli(["--"] + py("import sys; print('about to fail'); sys.exit(3)"))
    assert p.returncode == 3
    (card,) = cards(space)
    assert "failed in" in card["header"]["title"]
    assert card["header"]["title"].startswith("❌ python -c")  # default label: the command, shortened
    assert len(card["header"]["title"]) < 100
    r = rows(card)
    assert r["Error"].endswith(">exit code 3</font>")
    assert "Exit code" not in r, "the exit code is said once, in the error line"
    assert "import sys" in r["Command"]
    assert "about to fail" in output_section(card)


def test_child_killed_by_sigterm_exits_143_and_says_so(space):
    p = run_cli(["--label", "self-kill", "--"] + py("import os, signal; print('bye', flush=True); os.kill(os.getpid(), signal.SIGTERM)"))
    assert p.returncode == 128 + signal.SIGTERM == 143
    (card,) = cards(space)
    assert card["header"]["title"].startswith("❌ self-kill failed")
    assert rows(card)["Error"].endswith(">killed by SIGTERM</font>") and "Exit code" not in rows(card)


def test_command_not_found_exits_127_with_one_line_and_a_notice(space):
    p = run_cli(["--", "no-such-command-chat-magic-test", "arg"])
    assert p.returncode == 127
    assert p.stderr.decode() == "chat-magic run: command not found: no-such-command-chat-magic-test\n"
    (card,) = cards(space)
    assert "failed" in card["header"]["title"]
    assert rows(card)["Error"].endswith(">command not found: no-such-command-chat-magic-test (exit code 127)</font>")


def test_usage_and_setup_mistakes_exit_2_with_one_line_before_running(space, tmp_path, monkeypatch, capsys):
    marker = tmp_path / "ran"
    cmd = py(f"open({str(marker)!r}, 'w').close()")
    assert main([]) == 2
    assert main(["--on", "sometimes", "--"] + cmd) == 2
    assert main(["--mention", "everyone", "--"] + cmd) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 3 and all(line.startswith("chat-magic run: ") for line in err.splitlines())
    monkeypatch.delenv("GOOGLE_CHAT_WEBHOOK_URL")
    assert main(["--"] + cmd) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "GOOGLE_CHAT_WEBHOOK_URL" in err
    assert main(["--to", "nowhere", "--"] + cmd) == 2
    assert "unknown space 'nowhere'" in capsys.readouterr().err
    assert not marker.exists(), "the command must not run when its notice could not be sent"
    assert main(["--help"]) == 0
    assert "--notify-start" in capsys.readouterr().out
    assert chat_magic.flush(5)
    assert space.messages() == []


# -- streaming ----------------------------------------------------------------------


def test_output_streams_through_unchanged_and_in_order(space, tmp_path):
    go = tmp_path / "go"
    # the child waits for the test to see its first line: proves streaming without timing
    child = py(f"""
        import os, sys, time
        sys.stdout.buffer.write(b"first\\n"); sys.stdout.flush()
        while not os.path.exists({str(go)!r}):
            time.sleep(0.02)
        sys.stdout.buffer.write(b"raw \\xff\\xfe bytes\\r\\n\\x1b[31mred\\x1b[0m\\n")
        for i in range(2000):
            sys.stdout.write(f"line {{i}}\\n")
        sys.stderr.write("e1\\n"); sys.stderr.write("e2 no newline")
        sys.stdout.write("tail without newline")
    """)
    proc = start_cli(["--label", "stream", "--"] + child)
    try:
        assert proc.stdout.readline() == b"first\n"  # arrives while the child still runs
        assert proc.poll() is None
        go.touch()
        rest_out, err = proc.communicate(timeout=60)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 0
    lines = b"".join(f"line {i}\n".encode() for i in range(2000))
    expected = b"raw \xff\xfe bytes\r\n\x1b[31mred\x1b[0m\n" + lines + b"tail without newline"
    assert rest_out == expected
    assert err == b"e1\ne2 no newline"
    (card,) = cards(space)
    out = output_section(card)
    assert "tail without newline" in out and "line 1999" in out
    assert "cut]" in out  # 2,000 lines are cut to the tail
    assert "\x1b" not in out


def test_large_binary_output_is_passed_byte_for_byte(space):
    code = "import sys, os; data = bytes(range(256)) * 8192; sys.stdout.buffer.write(data); sys.stdout.flush()"
    p = run_cli(["--label", "binary", "--"] + py(code))
    assert p.returncode == 0
    assert hashlib.sha256(p.stdout).hexdigest() == hashlib.sha256(bytes(range(256)) * 8192).hexdigest()
    assert len(cards(space)) == 1


# -- signals ------------------------------------------------------------------------


HANDLER_CHILD = """
    import signal, sys, time
    def handler(signum, frame):
        print(f"child got {signal.Signals(signum).name}", flush=True)
        sys.exit(5)
    signal.signal(signal.SIGTERM, handler)
    print("ready", flush=True)
    time.sleep(60)
"""


def test_sigterm_is_forwarded_to_the_child_and_waited_for(space):
    proc = start_cli(["--label", "graceful", "--"] + py(HANDLER_CHILD))
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
    finally:
        proc.kill() if proc.poll() is None else None
    assert out == b"child got SIGTERM\n"
    assert proc.returncode == 5, err
    (card,) = cards(space)
    r = rows(card)
    assert r["Error"].endswith(">exit code 5</font>")
    assert r["Signal"] == "received SIGTERM (forwarded)"


def test_sigterm_forwarded_to_a_child_that_dies_of_it(space):
    proc = start_cli(["--label", "victim", "--"] + py("import time; print('ready', flush=True); time.sleep(60)"))
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 143
    (card,) = cards(space)
    assert "Exit code" not in rows(card)
    assert "forwarded by chat-magic run, which received SIGTERM" in rows(card)["Error"]


def test_sigint_is_forwarded_and_reported_as_interrupted(space):
    proc = start_cli(["--label", "ctrl-c", "--"] + py("import time; print('ready', flush=True); time.sleep(60)"))
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill() if proc.poll() is None else None
    assert proc.returncode == 128 + signal.SIGINT
    assert b"KeyboardInterrupt" in err  # the child's own traceback, passed through
    (card,) = cards(space)
    assert card["header"]["title"].startswith("⏸️ ctrl-c interrupted")


# -- options ------------------------------------------------------------------------


def test_notify_start_thread_and_mention(space):
    p = run_cli(["--notify-start", "--thread", "nightly-42", "--mention", "all", "--label", "nightly", "--"] + py("print('ok')"))
    assert p.returncode == 0
    msgs = space.messages()
    assert {m["thread"]["threadKey"] for m in msgs} == {"nightly-42"}
    titles = [c["header"]["title"] for c in cards(space)]
    assert titles[0] == "▶️ nightly started" and titles[1].startswith("✅ nightly finished")
    assert msgs[-1]["text"].startswith("<users/all> nightly finished")


def test_on_error(space):
    assert run_cli(["--on", "error", "--"] + py("pass")).returncode == 0
    assert space.messages() == []
    assert run_cli(["--on", "error", "--label", "bad", "--"] + py("raise SystemExit(4)")).returncode == 4
    (card,) = cards(space)
    assert card["header"]["title"].startswith("❌ bad failed")


def test_ranks_filter_success_but_not_failure(space, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "1")
    monkeypatch.setenv("SLURM_NTASKS", "2")
    assert run_cli(["--label", "step", "--"] + py("pass")).returncode == 0
    assert space.messages() == []
    assert run_cli(["--label", "step", "--"] + py("raise SystemExit(1)")).returncode == 1
    (card,) = cards(space)
    assert card["header"]["title"].startswith("❌ step (rank 1 of 2) failed")
    assert rows(card)["Rank"] == "rank 1 of 2"


def test_undelivered_notice_is_queued_and_delivered_by_the_next_process(space, emulator):
    env = dict(os.environ, CHAT_MAGIC_EXIT_TIMEOUT="0")
    emulator.set_down(True)
    try:
        p = run_cli(["--wait", "1", "--label", "offline", "--"] + py("print('done')"), env=env)
    finally:
        emulator.set_down(False)
    assert p.returncode == 0
    assert p.stdout == b"done\n"
    assert p.stderr.decode() == ("chat-magic run: notice queued; it will be delivered by the next chat_magic "
                                 "process or `chat-magic outbox flush`\n")
    # this test process shares the outbox (same CHAT_MAGIC_HOME): it delivers what was left
    assert chat_magic.flush(30)
    (card,) = cards(space)
    assert card["header"]["title"].startswith("✅ offline finished")


def test_refused_notice_is_one_line_and_the_exit_code_is_the_commands(space, emulator):
    from conftest import KEY

    bad = emulator.webhook_url(space=space.name, key=KEY, token="wrong-token-" + "w" * 20)
    env = dict(os.environ, GOOGLE_CHAT_WEBHOOK_URL=bad, CHAT_MAGIC_EXIT_TIMEOUT="0")
    p = run_cli(["--label", "refused", "--"] + py("raise SystemExit(7)"), env=env)
    assert p.returncode == 7
    err = p.stderr.decode()
    assert err.count("\n") == 1, err
    assert err.startswith("chat-magic run: notice not delivered: permission denied")
    assert "wrong-token" not in err
    assert space.messages() == []


def in_pty(argv: list[str], *, ctrl_c_after: bytes | None = None) -> tuple[bytes, int]:
    """Run ``argv`` as the foreground job of a fresh terminal (a pty); type Ctrl-C once ``ctrl_c_after`` shows."""
    import pty
    import select
    import time

    pid, fd = pty.fork()
    if pid == 0:
        try:
            os.execv(argv[0], argv)
        finally:
            os._exit(127)
    buf, sent = b"", False
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if ctrl_c_after is not None and ctrl_c_after in buf and not sent:
                os.write(fd, b"\x03")  # Ctrl-C typed at the terminal
                sent = True
            r, _, _ = select.select([fd], [], [], 0.1)
            if r:
                try:
                    chunk = os.read(fd, 1024)
                except OSError:
                    break
                if not chunk:
                    break
                buf += chunk
    finally:
        status = None
        for _ in range(50):
            done, st = os.waitpid(pid, os.WNOHANG)
            if done:
                status = st
                break
            time.sleep(0.1)
        if status is None:  # hung: do not hang the test run too
            os.kill(pid, signal.SIGKILL)
            _, status = os.waitpid(pid, 0)
        os.close(fd)
    return buf, os.waitstatus_to_exitcode(status)


def test_terminal_foreground_is_detected_only_in_a_terminal():
    code = "from chat_magic.run import _terminal_foreground as f; print('foreground', f())"
    out, rc = in_pty([PY, "-c", code])
    assert rc == 0 and b"foreground True" in out
    p = subprocess.run([PY, "-c", code], stdin=subprocess.DEVNULL, capture_output=True, timeout=60)
    assert p.stdout == b"foreground False\n"


def test_ctrl_c_in_a_terminal_reaches_the_command_once(space):
    """In a real terminal, Ctrl-C goes to the whole foreground group: the command gets it from
    the terminal, chat-magic run does not send it a second one, and still posts the notice."""
    child = textwrap.dedent("""
        import os, signal, time
        # count deliveries at the C level: Python-level handlers can merge two close signals
        r, w = os.pipe()
        os.set_blocking(w, False)
        signal.set_wakeup_fd(w)
        signal.signal(signal.SIGINT, lambda signum, frame: None)
        print("ready", flush=True)
        first = os.read(r, 100)
        time.sleep(0.5)  # a forwarded duplicate would arrive within this
        os.set_blocking(r, False)
        try:
            more = os.read(r, 100)
        except BlockingIOError:
            more = b""
        print("sigints", len(first + more), flush=True)
    """)
    out, rc = in_pty(RUN + ["--label", "tty", "--", PY, "-c", child], ctrl_c_after=b"ready")
    assert b"sigints 1" in out, out
    assert rc == 0
    (card,) = cards(space)
    assert card["header"]["title"].startswith("✅ tty finished")
    assert rows(card)["Signal"] == "received SIGINT (from the terminal, not forwarded)"
