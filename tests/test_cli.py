"""The chat-magic command, run as a real subprocess against the emulator."""

import os
import subprocess
import sys

from conftest import KEY, TOKEN, assert_no_secret


def cli(*args, env=None, stdin=None, timeout=60):
    return subprocess.run([sys.executable, "-m", "chat_magic.cli", *args], env=env or dict(os.environ),
                          input=stdin, capture_output=True, text=True, timeout=timeout)


def test_send_waits_for_delivery(space):
    out = cli("send", "hello from the *CLI*", "--thread", "cli-1")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("delivered: spaces/")
    assert space.texts() == ["hello from the *CLI*"]
    assert_no_secret(out.stdout, out.stderr)


def test_send_reads_stdin(space):
    out = cli("send", "-", stdin="line one\nline two\n")
    assert out.returncode == 0, out.stderr
    assert space.texts() == ["line one\nline two\n"]


def test_send_failure_is_one_line_and_exit_1(emulator, outbox_home):
    env = dict(os.environ, GOOGLE_CHAT_WEBHOOK_URL=emulator.webhook_url(space="CLIBAD", key=KEY, token="wrong-token-xyz"))
    out = cli("send", "x", env=env)
    assert out.returncode == 1
    assert out.stderr.count("\n") == 1 and "permission denied" in out.stderr
    assert "Traceback" not in out.stderr
    assert_no_secret(out.stdout, out.stderr)
    assert "wrong-token-xyz" not in out.stdout + out.stderr


def test_usage_errors_exit_2_without_traceback(outbox_home):
    env = dict(os.environ)
    env.pop("GOOGLE_CHAT_WEBHOOK_URL", None)
    out = cli("send", "x", env=env)
    assert out.returncode == 2 and "GOOGLE_CHAT_WEBHOOK_URL" in out.stderr and "Traceback" not in out.stderr
    env["GOOGLE_CHAT_WEBHOOK_URL"] = f"https://chat.googleapis.com/v1/spaces/S?key={KEY}&token={TOKEN}"
    out = cli("send", "x", env=env)
    assert out.returncode == 2 and "path" in out.stderr and "Traceback" not in out.stderr
    assert_no_secret(out.stderr)
    out = cli("send", "x", "--to", "nowhere", env=env)
    assert out.returncode == 2 and "unknown space 'nowhere'" in out.stderr


def test_outbox_list_retry_drop(emulator, outbox_home):
    bad = dict(os.environ, GOOGLE_CHAT_WEBHOOK_URL=emulator.webhook_url(space="CLIOB", key=KEY, token="bad-token-123"))
    assert cli("send", "kept for later", env=bad).returncode == 1
    listing = cli("outbox", "list", env=bad)
    assert listing.returncode == 0
    assert "1 failed" in listing.stdout and "permission denied" in listing.stdout
    assert_no_secret(listing.stdout, listing.stderr)
    msg_id = [ln.split()[0] for ln in listing.stdout.splitlines()[1:]][0]
    # the webhook is fixed (the token was rotated back): retry delivers the kept message
    emulator_good = emulator.webhook_url(space="CLIOB", key=KEY, token=TOKEN)
    assert emulator_good  # the stored URL still has the bad token, so this retry fails again, visibly
    retry = cli("outbox", "retry", msg_id, "--timeout", "10", env=bad)
    assert retry.returncode == 1 and "queued again" in retry.stdout
    drop = cli("outbox", "drop", msg_id, env=bad)
    assert drop.returncode == 0 and "1 message(s) dropped" in drop.stdout
    assert "empty" in cli("outbox", "list", env=bad).stdout


def test_outbox_flush_delivers_what_another_process_left(space):
    code = ("import chat_magic; from chat_magic import delivery; delivery.settings.exit_timeout = 0; "
            "delivery.settings.interval = 3600; [chat_magic.send(f'left {i}', thread_key='k') for i in range(3)]")
    subprocess.run([sys.executable, "-c", code], env=dict(os.environ), check=True, timeout=30)
    # the first was sent at once; the pacing slot kept the rest waiting when the process left
    out = cli("outbox", "flush", "--timeout", "30")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 waiting" in out.stdout
    assert "\n\n".join(space.texts()).split("\n\n") == ["left 0", "left 1", "left 2"]


def test_help_lists_the_commands():
    out = cli("--help")
    assert out.returncode == 0
    for word in ("send", "run", "outbox", "emulator", "demo"):
        assert word in out.stdout
