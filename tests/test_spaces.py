"""``chat-magic spaces`` and ``%chat_setup``: the webhook typed at a hidden prompt, never shown, saved 0600.

The CLI runs as a real subprocess (a pipe, and a real pseudo-terminal for the
hidden prompt); ``%chat_setup`` runs in a real kernel whose getpass request is
answered over the stdin channel, as a notebook frontend's password box does.
"""

from __future__ import annotations

import os
import pty
import select
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import KEY, TOKEN, assert_no_secret

from chat_magic import config

tomllib = config._toml()  # tomllib, or tomli on Python 3.10


@pytest.fixture
def cfg(outbox_home, monkeypatch, tmp_path):
    path = tmp_path / "conf" / "config.toml"
    monkeypatch.setenv("CHAT_MAGIC_CONFIG", str(path))
    return path


def cli(*args: str, stdin: str = "", env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "chat_magic.cli", *args], input=stdin, capture_output=True,
                          text=True, timeout=120, env=env or dict(os.environ), check=False)


def no_url_in(url: str, *texts: str) -> None:
    assert_no_secret(*texts)
    for t in texts:
        assert url not in t and "key=" not in t and "token=" not in t


def test_add_test_list_remove(space, cfg):
    url = space.url
    p = cli("spaces", "add", "team", "--test", stdin=url + "\n")
    assert p.returncode == 0, p.stderr
    no_url_in(url, p.stdout, p.stderr)
    assert "delivered a hello: spaces/" in p.stdout and f"saved space 'team' in {cfg}" in p.stdout
    assert [m["text"] for m in space.messages()] == ["👋 chat_magic is set up: messages for *team* will arrive in this space."]
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert tomllib.loads(cfg.read_text())["spaces"]["team"]["webhook_url"] == url
    assert config.resolve("team").space == space.name

    p = cli("spaces", "add", "other", "--default", stdin=url.replace(space.name, "SOTHER") + "\n")
    assert p.returncode == 0, p.stderr
    env = dict(os.environ)
    env.pop("GOOGLE_CHAT_WEBHOOK_URL")
    p = cli("spaces", "list", env=env)
    assert p.returncode == 0
    no_url_in(url, p.stdout, p.stderr)
    assert f"team  spaces/{space.name}" in p.stdout and "other  spaces/SOTHER  (default)" in p.stdout
    p = cli("spaces", "list")  # the environment's webhook comes first and is listed as such
    assert f"(default)  spaces/{space.name}  from GOOGLE_CHAT_WEBHOOK_URL" in p.stdout
    no_url_in(url, p.stdout)

    p = cli("spaces", "remove", "other")
    assert p.returncode == 0 and "removed space 'other'" in p.stdout
    data = tomllib.loads(cfg.read_text())
    assert set(data["spaces"]) == {"team"} and "default" not in data
    p = cli("spaces", "remove", "other")
    assert p.returncode == 2 and p.stderr.count("\n") == 1 and "no space 'other'" in p.stderr


def test_mistakes_are_one_line_and_show_nothing_typed(space, cfg):
    bad = f"https://example.com/v1/spaces/X/messages?key={KEY}&token={TOKEN}"
    for args, typed, expected in (
        (["add", "team"], bad, "that is not a Google Chat webhook URL: a Google Chat webhook URL points at chat.googleapis.com"),
        (["add", "team"], "", "nothing was entered"),
        (["add", "bad name!"], space.url, "a space name is 1 to 64 letters"),
        (["add", "team"], space.url.replace("&token=", "&tok="), "has no token"),
    ):
        p = cli("spaces", *args, stdin=typed + "\n")
        assert p.returncode == 2, (args, p.stderr)
        assert p.stderr.count("\n") == 1 and expected in p.stderr, p.stderr
        no_url_in(space.url, p.stdout, p.stderr)
        assert "/v1/spaces/" not in p.stderr and "example.com/v1" not in p.stderr
    assert not cfg.exists()


def test_a_test_hello_that_is_refused_saves_nothing(space, cfg):
    wrong = space.url.replace(TOKEN, "wrong-token-" + "w" * 20)
    p = cli("spaces", "add", "team", "--test", "--timeout", "20", stdin=wrong + "\n")
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "the test message was not delivered, nothing saved" in p.stderr
    no_url_in(space.url, p.stdout, p.stderr)
    assert "wrong-token" not in p.stderr and not cfg.exists()


def test_the_prompt_hides_what_is_typed_on_a_terminal(space, cfg):
    """A real pseudo-terminal: getpass turns echo off, so the URL never appears on the screen."""
    pid, fd = pty.fork()
    if pid == 0:  # the child: chat-magic on the terminal
        os.execv(sys.executable, [sys.executable, "-m", "chat_magic.cli", "spaces", "add", "team"])
    screen = b""
    deadline = time.monotonic() + 60

    def read_until(marker: bytes) -> None:
        nonlocal screen
        while marker not in screen:
            assert time.monotonic() < deadline, screen
            if select.select([fd], [], [], 0.5)[0]:
                try:
                    chunk = os.read(fd, 4096)
                except OSError:
                    return
                if not chunk:
                    return
                screen += chunk

    read_until(b"input hidden): ")
    os.write(fd, space.url.encode() + b"\n")
    read_until(b"(mode 0600)")
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    text = screen.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    no_url_in(space.url, text)
    assert space.name not in text
    assert tomllib.loads(cfg.read_text())["spaces"]["team"]["webhook_url"] == space.url


def test_chat_setup_in_a_real_kernel_keeps_the_url_out_of_the_notebook(space, cfg, tmp_path):
    from jupyter_client.manager import start_new_kernel

    env = dict(os.environ, IPYTHONDIR=str(tmp_path / "ipython"))  # its own history database, read back below
    env.pop("GOOGLE_CHAT_WEBHOOK_URL")
    log = (tmp_path / "kernel.log").open("wb")
    km, kc = start_new_kernel(kernel_name="python3", env=env, stderr=log)
    seen: list[dict] = []
    prompts: list[dict] = []

    def answer(msg: dict) -> None:  # the frontend's password box
        prompts.append(msg["content"])
        kc.input(space.url)

    def run(code: str) -> dict:
        return kc.execute_interactive(code, timeout=60, allow_stdin=True, stdin_hook=answer,
                                      output_hook=seen.append)["content"]

    try:
        assert run("%load_ext chat_magic")["status"] == "ok"
        assert run("%chat_setup team --test")["status"] == "ok"
        assert run("%chat --to team hello from the team space")["status"] == "ok"
        assert run("import chat_magic\nassert chat_magic.flush(30)")["status"] == "ok"
        history = run("%history -g")
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
        log.close()

    assert len(prompts) == 1 and prompts[0]["password"] is True and "input hidden" in prompts[0]["prompt"]
    shown = "\n".join(str(m["content"]) for m in seen)
    no_url_in(space.url, shown, (tmp_path / "kernel.log").read_text(errors="replace"), str(history))
    assert space.name not in shown
    assert "the hello arrived; saved space 'team'" in shown and "use it with --to team" in shown
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    texts = [m.get("text", "") for m in space.messages()]
    assert texts[0].startswith("👋 chat_magic is set up") and "hello from the team space" in texts[-1]


def test_chat_setup_mistakes_are_one_usage_line(cfg):
    from IPython.core.error import UsageError

    from chat_magic.spaces import setup_magic

    with pytest.raises(UsageError, match=r"^%chat_setup: that is not a Google Chat webhook URL: .*no token"):
        setup_magic("team", ask=lambda prompt: "http://127.0.0.1:9/v1/spaces/S/messages?key=" + KEY)
    with pytest.raises(UsageError, match=r"^%chat_setup: a space name is"):
        setup_magic("'no spaces'", ask=lambda prompt: "unused")
    with pytest.raises(UsageError, match=r"^%chat_setup: unrecognized arguments: --bogus"):
        setup_magic("team --bogus", ask=lambda prompt: "unused")
    assert not cfg.exists()


def test_config_file_round_trip_keeps_other_settings(cfg, emulator):
    cfg.parent.mkdir(parents=True)
    url = emulator.webhook_url(space="SA", key=KEY, token=TOKEN)
    cfg.write_text(f'default = "a"\nextra = 3\n[spaces.a]\nwebhook_url = "{url}"\nnote = "keep me"\n')
    cfg.chmod(0o644)
    with pytest.warns(UserWarning, match="readable by others"):
        config.load_config()
    config.save_space("b", config.parse_webhook_url(emulator.webhook_url(space="SB", key=KEY, token=TOKEN)))
    data = tomllib.loads(cfg.read_text())
    assert data["default"] == "a" and data["extra"] == 3 and data["spaces"]["a"]["note"] == "keep me"
    assert set(data["spaces"]) == {"a", "b"} and stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert config.resolve("b").space == "SB" and config.resolve().space == "SA"
    assert not [p for p in Path(cfg.parent).iterdir() if p.name.endswith(".tmp")]
