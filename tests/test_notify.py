"""notify_when_done against the emulator over real HTTP.

Each test gets its own space (``space`` fixture) and a private outbox; what
the space received is read back from the emulator. Every accepted payload is
validated with the official proto by the fixture at teardown.
"""

from __future__ import annotations

import asyncio
import json
import os
import socket
import subprocess
import sys
import textwrap
import traceback

import pytest
from conftest import assert_no_secret, validate_message

import chat_magic
from chat_magic import ConfigError, notify_when_done


def settle(space, n: int | None = None) -> list[dict]:
    """Wait until everything queued is delivered, and return what the space holds.

    ``n`` is the least number of messages expected (short texts may be merged).
    """
    assert chat_magic.flush(30), "not delivered"
    msgs = space.messages()
    if n is not None:
        assert len(msgs) >= n, msgs
    return msgs


def cards(messages: list[dict]) -> list[dict]:
    return [m["cardsV2"][0]["card"] for m in messages if m.get("cardsV2")]


def card_text(card: dict) -> str:
    parts = [card["header"]["title"], card["header"].get("subtitle", "")]
    for sec in card["sections"]:
        for w in sec["widgets"]:
            for kind in ("decoratedText", "textParagraph"):
                if kind in w:
                    parts.append(f"{w[kind].get('topLabel', '')}={w[kind]['text']}")
    return "\n".join(parts)


def rows(card: dict) -> dict[str, str]:
    return {w["decoratedText"]["topLabel"]: w["decoratedText"]["text"]
            for w in card["sections"][0]["widgets"] if "decoratedText" in w}


def one_thread(messages: list[dict]) -> str:
    names = {m["thread"]["name"] for m in messages}
    assert len(names) == 1, f"expected one thread, got {names}"
    return names.pop()


# -- success, failure, interrupt --------------------------------------------------


def test_success_posts_a_card_with_duration_and_origin_in_the_session_thread(fast_space, capsys):
    with notify_when_done("training run") as n:
        n.update("epoch 1: loss 0.50")
        n.update("epoch 2: loss 0.25")
        value = 42
    assert value == 42
    msgs = settle(fast_space, 2)
    one_thread(msgs)
    assert all(m["thread"].get("threadKey") == chat_magic.session.current_session().thread_key for m in msgs)
    joined = "\n".join(m.get("text", "") for m in msgs)
    assert "epoch 1: loss 0.50" in joined and "epoch 2: loss 0.25" in joined
    assert joined.index("epoch 1") < joined.index("epoch 2")
    (card,) = cards(msgs)
    assert card["header"]["title"].startswith("✅ training run finished in ")
    r = rows(card)
    assert r["Host"] == socket.gethostname()
    assert "Duration" in r
    sess = chat_magic.session.current_session()
    assert any(v == sess.source for v in r.values()), r
    m = [m for m in msgs if m.get("cardsV2")][0]
    assert m["fallbackText"].startswith("✅ training run finished")
    # the completion card is the last message
    assert msgs[-1] is m or msgs[-1]["name"] == m["name"]
    assert capsys.readouterr().err == ""


def test_failure_propagates_the_same_exception_and_posts_type_message_and_traceback(fast_space):
    err = ValueError("bad learning rate <users/all>")

    def deepest_frame_of_user_code():
        raise err

    with pytest.raises(ValueError) as info, notify_when_done("fit"):
        deepest_frame_of_user_code()
    assert info.value is err
    frames = traceback.extract_tb(err.__traceback__)
    assert frames[-1].name == "deepest_frame_of_user_code"
    assert not any(f.filename.endswith(os.path.join("chat_magic", "notify.py")) for f in frames), "no frame of ours in the user's traceback"
    assert err.__context__ is None and err.__cause__ is None
    msgs = settle(fast_space, 2)
    (card,) = cards(msgs)
    assert card["header"]["title"].startswith("❌ fit failed")
    text = card_text(card)
    assert "ValueError: bad learning rate &lt;users/all&gt;" in text
    assert "deepest_frame_of_user_code" in text  # the traceback tail
    assert "Traceback" in text
    # untrusted text can't ping anyone, in the card or its fallback
    for m in msgs:
        assert "<users/all>" not in m.get("text", "") and "<users/all>" not in m.get("fallbackText", "")


def test_keyboard_interrupt_is_posted_as_interrupted(fast_space):
    with pytest.raises(KeyboardInterrupt), notify_when_done("long loop"):
        raise KeyboardInterrupt
    (card,) = cards(settle(fast_space, 2))
    assert card["header"]["title"].startswith("⏸️ long loop interrupted")


def test_exception_with_broken_str_still_propagates_and_is_reported(fast_space):
    class Weird(Exception):
        def __str__(self):
            raise RuntimeError("no str for you")

    w = Weird()
    with pytest.raises(Weird) as info, notify_when_done("weird"):
        raise w
    assert info.value is w
    (card,) = cards(settle(fast_space, 2))
    assert "Weird: &lt;unprintable&gt;" in card_text(card)


def test_system_exit_zero_is_success_nonzero_is_failure(fast_space):
    with pytest.raises(SystemExit), notify_when_done("exit zero"):
        sys.exit(0)
    with pytest.raises(SystemExit), notify_when_done("exit three"):
        sys.exit(3)
    titles = [c["header"]["title"] for c in cards(settle(fast_space, 3))]
    assert titles[0].startswith("✅ exit zero finished")
    assert titles[1].startswith("❌ exit three failed")


def test_default_label_names_the_file_and_line(fast_space):
    with notify_when_done():
        pass
    line = sys._getframe().f_lineno - 2
    (card,) = cards(settle(fast_space, 2))
    assert f"block at test_notify.py:{line} finished" in card["header"]["title"]


# -- decorator ------------------------------------------------------------------


def test_decorator_keeps_return_value_identity_and_exceptions(fast_space):
    sentinel = object()

    @notify_when_done(cards=False)
    def train(x, *, y):
        """Docstring kept."""
        return sentinel if x == y else None

    missing = KeyError("missing")

    @notify_when_done
    def broken():
        raise missing

    assert train.__name__ == "train" and train.__doc__ == "Docstring kept."
    assert train.__wrapped__ is not None
    assert train(1, y=1) is sentinel
    with pytest.raises(KeyError) as info:
        broken()
    assert info.value is missing
    assert info.value.__context__ is None and info.value.__cause__ is None
    assert traceback.extract_tb(missing.__traceback__)[-1].name == "broken"
    msgs = settle(fast_space, 2)
    one_thread(msgs)
    joined = "\n".join(m.get("text", "") for m in msgs)
    assert "*test_decorator_keeps_return_value_identity_and_exceptions.train finished in " in joined
    (card,) = cards(msgs)
    assert "broken failed" in card["header"]["title"]
    assert "KeyError: &#x27;missing&#x27;" in card_text(card)


def test_decorating_a_generator_function_is_refused_at_once(fast_space):
    def gen():
        yield 1

    with pytest.raises(TypeError, match="generator function"):
        notify_when_done("gen")(gen)
    with pytest.raises(TypeError, match="decorates a function"):
        notify_when_done("not callable")(42)


def test_async_decorator_and_async_with(fast_space):
    result = {"big": list(range(5))}

    boom = RuntimeError("async boom")

    @notify_when_done("async job")
    async def job(fail: bool):
        await asyncio.sleep(0.01)
        if fail:
            raise boom
        return result

    assert asyncio.iscoroutinefunction(job)

    async def main():
        got = await job(False)
        with pytest.raises(RuntimeError) as info:
            await job(True)
        assert info.value is boom
        async with notify_when_done("async block") as n:
            n.update("inside async block")
        return got

    assert asyncio.run(main()) is result
    msgs = settle(fast_space, 4)
    titles = [c["header"]["title"] for c in cards(msgs)]
    assert titles[0].startswith("✅ async job finished")
    assert titles[1].startswith("❌ async job failed")
    assert titles[2].startswith("✅ async block finished")
    assert any("inside async block" in m.get("text", "") for m in msgs)


def test_update_from_inside_a_decorated_function(fast_space, capsys):
    @notify_when_done("decorated")
    def work():
        chat_magic.notify.update("halfway there")

    work()
    msgs = settle(fast_space, 2)
    assert any("halfway there" in m.get("text", "") for m in msgs)
    # outside any block: one warning line, nothing posted, no exception
    chat_magic.notify.update("nobody listens")
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("chat_magic: update() outside")
    assert chat_magic.flush(10)
    assert not any("nobody listens" in m.get("text", "") for m in fast_space.messages())


def test_update_from_another_thread_reaches_the_block(fast_space):
    import threading

    with notify_when_done("threaded updates") as n:
        t = threading.Thread(target=n.update, args=("from a worker thread",))
        t.start()
        t.join()
    msgs = settle(fast_space, 2)
    assert any("*threaded updates*: from a worker thread" in m.get("text", "") for m in msgs)


# -- options ----------------------------------------------------------------------


def test_on_error_posts_only_failures(fast_space):
    with notify_when_done("quiet", on="error"):
        pass
    with pytest.raises(KeyboardInterrupt), notify_when_done("quiet", on="error"):
        raise KeyboardInterrupt
    assert chat_magic.flush(10)
    assert fast_space.messages() == []
    with pytest.raises(ZeroDivisionError), notify_when_done("loud", on="error"):
        1 / 0  # noqa: B018 - the point is the ZeroDivisionError
    (card,) = cards(settle(fast_space, 2))
    assert card["header"]["title"].startswith("❌ loud failed")


def test_notify_start_and_mention(fast_space):
    with notify_when_done("mentioned", notify_start=True, mention="all"):
        pass
    msgs = settle(fast_space, 3)
    one_thread(msgs)
    titles = [c["header"]["title"] for c in cards(msgs)]
    assert titles[0] == "▶️ mentioned started"
    assert titles[1].startswith("✅ mentioned finished")
    done = [m for m in msgs if m.get("cardsV2")][-1]
    assert done["text"].startswith("<users/all> mentioned finished")
    start = [m for m in msgs if m.get("cardsV2")][0]
    assert "<users/all>" not in start.get("text", ""), "only the completion notice pings"


def test_custom_thread_key(fast_space):
    with notify_when_done("threaded", thread_key="my-experiment-7", cards=False) as n:
        n.update("in my thread")
    msgs = settle(fast_space, 1)
    assert {m["thread"]["threadKey"] for m in msgs} == {"my-experiment-7"}
    assert "*threaded finished in " in "\n".join(m["text"] for m in msgs)


def test_setup_mistakes_raise_one_line_config_errors_before_the_work(fast_space, monkeypatch):
    ran = []
    monkeypatch.delenv("GOOGLE_CHAT_WEBHOOK_URL")
    with pytest.raises(ConfigError) as info, notify_when_done("never"):
        ran.append(1)
    assert ran == []
    assert "GOOGLE_CHAT_WEBHOOK_URL" in str(info.value) and "\n" not in str(info.value)
    with pytest.raises(ConfigError):
        notify_when_done(to="no-such-space")

    @notify_when_done("decorated at import time")  # no webhook yet: decorating is fine
    def job():
        ran.append("job")
        return 1

    with pytest.raises(ConfigError, match="GOOGLE_CHAT_WEBHOOK_URL"):
        job()  # ... but calling it says so before the work runs
    assert ran == []
    monkeypatch.setenv("GOOGLE_CHAT_WEBHOOK_URL", fast_space.url)
    for bad in ({"on": "sometimes"}, {"ranks": "some"}, {"mention": "everyone"}, {"thread_key": ""}):
        with pytest.raises(ConfigError) as info:
            notify_when_done("x", **bad)
        assert "\n" not in str(info.value)
        assert_no_secret(info.value)
    monkeypatch.setenv("CHAT_MAGIC_RANKS", "bogus")
    with pytest.raises(ConfigError, match="CHAT_MAGIC_RANKS"):
        notify_when_done("x")
    monkeypatch.delenv("CHAT_MAGIC_RANKS")
    assert job() == 1 and ran == ["job"]  # the webhook is set now: the same function runs and posts
    n = notify_when_done("shown")
    assert_no_secret(repr(n))
    assert "…" in repr(n)


def test_space_down_never_raises_into_user_code_and_the_notice_is_kept(space, emulator):
    emulator.set_down(True)
    try:
        with notify_when_done("while down") as n:
            result = "user result"
        assert result == "user result"
        receipt = n.receipt
        assert receipt is not None and receipt.status == "pending"
    finally:
        emulator.set_down(False)
    msgs = settle(space, 2)
    assert cards(msgs)[0]["header"]["title"].startswith("✅ while down finished")
    assert receipt.status == "sent"


# -- ranks ------------------------------------------------------------------------


def test_rank_nonzero_success_and_progress_are_not_posted(fast_space, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("WORLD_SIZE", "8")
    with notify_when_done("ddp", notify_start=True) as n:
        n.update("progress from rank 1")
    assert n.receipt is None
    assert chat_magic.flush(10)
    assert fast_space.messages() == []


def test_rank_nonzero_failure_is_posted_naming_the_rank(fast_space, monkeypatch):
    monkeypatch.setenv("SLURM_PROCID", "3")
    monkeypatch.setenv("SLURM_NTASKS", "8")
    with pytest.raises(MemoryError), notify_when_done("ddp"):
        raise MemoryError("CUDA out of memory")
    (card,) = cards(settle(fast_space, 2))
    assert card["header"]["title"].startswith("❌ ddp (rank 3 of 8) failed")
    assert rows(card)["Rank"] == "rank 3 of 8"


def test_rank_policy_all_posts_from_every_rank(fast_space, monkeypatch):
    monkeypatch.setenv("OMPI_COMM_WORLD_RANK", "2")
    monkeypatch.setenv("OMPI_COMM_WORLD_SIZE", "4")
    monkeypatch.setenv("CHAT_MAGIC_RANKS", "all")
    with notify_when_done("mpi"):
        pass
    with notify_when_done("mpi zero only", ranks="zero"):
        pass
    titles = [c["header"]["title"] for c in cards(settle(fast_space, 2))]
    assert len(titles) == 1 and titles[0].startswith("✅ mpi (rank 2 of 4) finished")


def test_rank_zero_posts_success(fast_space, monkeypatch):
    monkeypatch.setenv("PMI_RANK", "0")
    monkeypatch.setenv("PMI_SIZE", "2")
    with notify_when_done("rank zero"):
        pass
    (card,) = cards(settle(fast_space, 2))
    assert card["header"]["title"].startswith("✅ rank zero (rank 0 of 2) finished")


# -- a plain script: one thread per run ---------------------------------------------


def test_script_notices_share_one_thread_and_are_delivered_at_exit(fast_space, tmp_path):
    script = tmp_path / "train_script.py"
    script.write_text(textwrap.dedent("""
        from chat_magic import notify_when_done

        with notify_when_done("phase one") as n:
            n.update("loaded data")

        @notify_when_done()
        def phase_two():
            return 2

        phase_two()
        print("script done")
    """))
    env = dict(os.environ, CHAT_MAGIC_EXIT_TIMEOUT="20")
    p = subprocess.run([sys.executable, str(script)], env=env, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "script done\n"
    assert_no_secret(p.stdout, p.stderr)
    msgs = fast_space.messages()  # the script waited for delivery before exiting
    one_thread(msgs)
    assert msgs[0]["text"].startswith("📜 *train_script.py*")
    titles = [c["header"]["title"] for c in cards(msgs)]
    assert titles[0].startswith("✅ phase one finished") and titles[1].startswith("✅ phase_two finished")
    assert rows(cards(msgs)[0])["Script"] == "train_script.py"
    for m in msgs:
        validate_message({k: v for k, v in m.items() if k in ("text", "cardsV2", "fallbackText")})
    assert_no_secret(json.dumps(msgs))
