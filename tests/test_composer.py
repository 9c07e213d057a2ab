"""The ipywidgets composer, without a browser: widget values, Button.click(), a real emulator."""

from __future__ import annotations

import time

import pytest
from conftest import KEY, TOKEN, assert_no_secret

pytest.importorskip("ipywidgets")

from chat_magic import session as session_mod  # noqa: E402
from chat_magic.composer import Composer, compose_magic  # noqa: E402


def wait_status(c: Composer, prefix: str, timeout: float = 20.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if c.status.value.startswith(prefix):
            return c.status.value
        time.sleep(0.02)
    raise AssertionError(f"status is {c.status.value!r}, not {prefix}… after {timeout} s")


def joined(messages: list[dict]) -> str:
    return "\n\n".join(m.get("text", "") for m in messages)


def test_send_button_follows_the_text_and_thread_choice(outbox_home):
    c = Composer()
    assert c.send_button.disabled
    c.message.value = "   \n\t "
    assert c.send_button.disabled
    c.message.value = "hello"
    assert not c.send_button.disabled
    c.thread.value = "custom"
    assert not c.thread_key.disabled
    assert c.send_button.disabled  # custom thread, no key yet
    c.thread_key.value = "my-key"
    assert not c.send_button.disabled
    c.thread.value = "new"
    assert c.thread_key.disabled and not c.send_button.disabled
    c.message.value = ""
    assert c.send_button.disabled


def test_preview_renders_chat_syntax_live(outbox_home):
    c = Composer()
    assert "cm-empty" in c.preview.value
    c.message.value = "*done* in `3 s` <users/all> <script>alert(1)</script>"
    assert "<b>done</b>" in c.preview.value
    assert '<code class="cm-code">3 s</code>' in c.preview.value
    assert "@all" in c.preview.value
    assert "<script>" not in c.preview.value and "&lt;script&gt;alert(1)&lt;/script&gt;" in c.preview.value
    c.message.value = "_now_"
    assert "<i>now</i>" in c.preview.value and "done" not in c.preview.value


def test_send_into_the_session_thread(space):
    c = Composer()
    typed = "*Results* for <https://example.com/run?id=7|run 7>\n  indented line\n```\nloss = 0.12\n```"
    c.message.value = typed
    c.send_button.click()
    assert c.message.value == ""  # queued: the box is cleared
    assert c.status.value == "queued" or c.status.value.startswith("delivered: ")
    status = wait_status(c, "delivered: ")
    msgs = space.wait_for(1)
    name = status.split(": ", 1)[1]
    assert name.startswith(f"spaces/{space.name}/messages/")
    assert name in [m["name"] for m in msgs]
    assert typed in joined(msgs)  # exactly as typed
    key = session_mod.current_session().thread_key
    assert {m["thread"].get("threadKey") for m in msgs} == {key}
    assert session_mod.current_session().header() in joined(msgs)  # the session announced itself first
    assert joined(msgs).index(session_mod.current_session().header()) < joined(msgs).index(typed)
    assert c.send_button.disabled  # the box is empty again
    assert "delivered" in c.history.value and "Results" in c.history.value


def test_new_thread_then_custom_key_continues_it(space):
    c = Composer(thread="new")
    c.message.value = "first in a new thread"
    c.send_button.click()
    wait_status(c, "delivered: ")
    key = c.thread_key.value
    assert key.startswith("chat-magic-compose-")  # offered for "custom key"
    first = space.wait_for(1)[-1]
    assert first["text"] == "first in a new thread" and first["thread"]["threadKey"] == key

    c.thread.value = "custom"
    c.message.value = "a reply"
    c.send_button.click()
    wait_status(c, "delivered: ")
    reply = space.wait_for(2)[-1]
    assert reply["text"] == "a reply"
    assert reply["thread"]["name"] == first["thread"]["name"]

    c.thread.value = "new"
    c.message.value = "another new thread"
    c.send_button.click()
    wait_status(c, "delivered: ")
    third = space.wait_for(3)[-1]
    assert third["text"] == "another new thread"
    assert third["thread"]["name"] != first["thread"]["name"]
    assert third["thread"]["threadKey"] != key


def test_click_does_not_block_and_double_click_sends_once(outbox_home, monkeypatch):
    from chat_magic.emulator import Emulator

    # the server holds each request 3 s: the clicks below happen while the first is in flight however slowly a
    # loaded machine runs them (with 1.5 s and a 1.0 s bound, a first send that creates the outbox had little room)
    with Emulator(key=KEY, token=TOKEN, qps=None, latency=3.0) as slow:
        monkeypatch.setenv("GOOGLE_CHAT_WEBHOOK_URL", slow.webhook_url(space="SLOW", key=KEY, token=TOKEN))
        c = Composer(thread="new")
        c.message.value = "takes a while to arrive"
        t0 = time.monotonic()
        c.send_button.click()
        c.send_button.click()  # ignored: a send is in flight (and the box is empty)
        c.message.value = "typed while the first is in flight"
        c._on_send()  # even when called directly, the in-flight send blocks a second one
        elapsed = time.monotonic() - t0
        assert elapsed < 3.0, f"click blocked for {elapsed:.2f} s"  # waiting for the server takes 3 s at least
        assert c.status.value == "queued"
        assert c.send_button.disabled
        wait_status(c, "delivered: ")
        assert [m["text"] for m in slow.messages()] == ["takes a while to arrive"]
        assert not c.send_button.disabled  # the second text can go now
        assert c.message.value == "typed while the first is in flight"


def test_refused_delivery_shows_a_redacted_reason_and_gives_the_text_back(emulator, outbox_home, monkeypatch):
    wrong = "wrong-token-" + "w" * 24
    monkeypatch.setenv("GOOGLE_CHAT_WEBHOOK_URL", emulator.webhook_url(space="SFORBIDDEN", key=KEY, token=wrong))
    c = Composer()
    c.message.value = "will be refused"
    c.send_button.click()
    status = wait_status(c, "failed: ")
    assert status.startswith("failed: permission denied")
    assert c.message.value == "will be refused"  # nothing typed is lost
    assert not c.send_button.disabled
    assert "failed" in c.history.value
    assert emulator.messages(space="SFORBIDDEN") == []
    assert_no_secret(status, c.history.value, repr(c), c.preview.value)
    assert wrong not in status + c.history.value + repr(c)


def test_no_webhook_fails_at_once_and_keeps_the_text(outbox_home):
    c = Composer()
    assert c.destination.label == "default"
    c.message.value = "nowhere to go"
    c.send_button.click()
    assert c.status.value.startswith("failed: no webhook configured")
    assert "GOOGLE_CHAT_WEBHOOK_URL" in c.status.value
    assert c.message.value == "nowhere to go"
    assert not c.send_button.disabled
    assert "failed" in c.history.value


def test_history_keeps_the_last_five(outbox_home):
    c = Composer()
    for i in range(7):
        c.message.value = f"attempt {i}"
        c.send_button.click()
    assert c.history.value.count("cm-row") == 5
    assert "attempt 6" in c.history.value and "attempt 2" in c.history.value
    assert "attempt 1" not in c.history.value


def test_named_destinations_show_names_never_urls(emulator, outbox_home, tmp_path, monkeypatch):
    team_url = emulator.webhook_url(space="STEAM", key=KEY, token=TOKEN)
    cfg = tmp_path / "config.toml"
    cfg.write_text(f'[spaces.team]\nwebhook_url = "{team_url}"\n[spaces.ops]\nwebhook_url = "{team_url}"\n')
    cfg.chmod(0o600)
    monkeypatch.setenv("CHAT_MAGIC_CONFIG", str(cfg))
    monkeypatch.setenv("GOOGLE_CHAT_WEBHOOK_URL", emulator.webhook_url(space="SDEFAULT", key=KEY, token=TOKEN))
    c = Composer()
    labels = [label for label, _ in c.destination.options]
    assert labels == ["default (GOOGLE_CHAT_WEBHOOK_URL)", "ops", "team"]
    assert all("://" not in str(o) for o in c.destination.options)
    assert_no_secret(c.destination.options, repr(c))
    c.destination.value = "team"
    c.thread.value = "new"
    c.message.value = "to the team"
    c.send_button.click()
    wait_status(c, "delivered: spaces/STEAM/")
    assert [m["text"] for m in emulator.messages(space="STEAM")] == ["to the team"]
    assert emulator.messages(space="SDEFAULT") == []
    assert "team" in c.history.value
    with pytest.raises(Exception, match="unknown space 'nope'"):
        Composer(to="nope")


def test_text_fallback_outside_a_notebook(space):
    from IPython.lib.pretty import pretty

    c = Composer()
    c.message.value = "draft *text*"
    text = repr(c)
    assert text.startswith("chat_magic Composer")
    assert "default (GOOGLE_CHAT_WEBHOOK_URL)" in text and "session thread" in text
    assert "draft *text* (12 characters)" in text
    assert pretty(c) == text
    bundle = c._repr_mimebundle_()
    assert bundle["text/plain"] == text and "application/vnd.jupyter.widget-view+json" in bundle
    c.send_button.click()
    wait_status(c, "delivered: ")
    assert "delivered: spaces/" in repr(c) and "draft *text*" in repr(c)
    assert_no_secret(repr(c))


def test_compose_magic_options(outbox_home):
    from IPython.core.error import UsageError

    c = compose_magic("--thread new")
    assert isinstance(c, Composer) and c.thread.value == "new"
    c = compose_magic("--key abc")
    assert c.thread.value == "custom" and c.thread_key.value == "abc"
    for bad in ("--thread sideways", "--bogus", "'unclosed", "--to nowhere"):
        with pytest.raises(UsageError) as e:
            compose_magic(bad)
        assert "\n" not in str(e.value) and str(e.value).startswith("%chat_compose: ")


def test_compose_magic_in_a_real_shell(space, capsys):
    from IPython.core.error import UsageError
    from IPython.core.interactiveshell import InteractiveShell

    ip = InteractiveShell.instance()
    ip.register_magic_function(lambda line: compose_magic(line, ip), "line", "chat_compose")
    try:
        c = ip.run_line_magic("chat_compose", "--thread new")
        assert isinstance(c, Composer) and c.thread.value == "new"
        result = ip.run_cell("%chat_compose --to nowhere")
        assert isinstance(result.error_in_exec, UsageError)
        err = capsys.readouterr().err
        assert "unknown space 'nowhere'" in err and "Traceback" not in err
        assert_no_secret(err)
    finally:
        ip.magics_manager.magics["line"].pop("chat_compose", None)
