"""Progress milestones (chat_magic.tqdm, ChatProgress) posted to the emulator over real HTTP."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys

import pytest
import tqdm as tqdm_pkg

import chat_magic
from chat_magic import notify_when_done
from chat_magic.progress import ChatProgress


def progress_text(space) -> str:
    """Everything the space holds, joined (plain-text lines that waited together were merged)."""
    assert chat_magic.flush(30)
    return "\n".join(m.get("text", "") for m in space.messages())


def percents(text: str, label: str) -> list[int]:
    return [int(p) for p in re.findall(rf"\*{re.escape(label)}\*: (\d+)% ", text)]


def quiet(**kw):
    return dict(file=io.StringIO(), mininterval=0, miniters=1, **kw)


def test_tqdm_posts_each_milestone_once_with_rate_and_eta(space):
    for _ in chat_magic.tqdm(range(8), desc="epoch 1", chat_interval=0, **quiet()):
        pass
    text = progress_text(space)
    assert percents(text, "epoch 1") == [25, 50, 75, 100]
    mid = [line for line in text.splitlines() if "*epoch 1*: 50%" in line][0]
    assert "(4/8 it)" in mid and "ETA" in mid and "elapsed" in mid
    assert re.search(r"it/s|/it", mid)
    last = [line for line in text.splitlines() if "*epoch 1*: 100%" in line][0]
    assert last.startswith("✅") and "ETA" not in last


def test_default_interval_keeps_quiet_between_the_first_milestone_and_the_end(fast_space):
    bar = chat_magic.tqdm(total=100, desc="slow", **quiet())
    for _ in range(100):
        bar.update(1)
    bar.close()
    assert percents(progress_text(fast_space), "slow") == [25, 100]


def test_custom_milestones_and_skipped_ones_are_replaced_by_the_latest(space):
    bar = chat_magic.tqdm(total=10, desc="jumpy", chat_interval=0, chat_milestones=(10, 20, 90), **quiet())
    bar.update(5)  # crosses 10 and 20 at once: one line, at 50 %
    bar.update(5)
    bar.close()
    assert percents(progress_text(space), "jumpy") == [50, 100]


def test_transient_inner_bars_share_the_interval(space):
    for _epoch in range(3):
        for _ in chat_magic.tqdm(range(4), desc="batches", leave=False, **quiet()):
            pass
    # one line in all: the first 25 %; the others fall within the 5-minute interval
    assert percents(progress_text(space), "batches") == [25]


def test_unknown_total_posts_only_a_summary_at_the_end(space):
    def gen():
        yield from range(5)

    for _ in chat_magic.tqdm(gen(), desc="stream", chat_interval=0, **quiet()):
        pass
    text = progress_text(space)
    assert re.search(r"\*stream\*: 5 it", text)
    assert text.count("*stream*") == 1


def test_existing_bar_and_manual_counter(space):
    bar = tqdm_pkg.tqdm(total=4, desc="plain tqdm", **quiet())
    ChatProgress(bar, interval=0)
    for _ in range(4):
        bar.update()
    bar.close()
    p = ChatProgress(label="export", total=200, interval=0, milestones=(50, 100))
    p.update(99)
    p.update(100)
    p.update(200)
    p.close()
    text = progress_text(space)
    assert percents(text, "plain tqdm") == [25, 50, 75, 100]
    assert percents(text, "export") == [50, 100]
    assert "(100/200 it)" in text


def test_progress_goes_into_the_enclosing_block_thread(space):
    with notify_when_done("job", thread_key="job-thread", cards=False):
        for _ in chat_magic.tqdm(range(2), desc="inside", chat_interval=0, **quiet()):
            pass
    assert chat_magic.flush(30)
    msgs = space.messages()
    assert {m["thread"]["threadKey"] for m in msgs} == {"job-thread"}
    assert percents("\n".join(m["text"] for m in msgs), "inside") == [50, 100]


def test_only_rank_zero_posts_progress(space, monkeypatch):
    monkeypatch.setenv("LOCAL_RANK", "1")
    for _ in chat_magic.tqdm(range(4), desc="rank one", chat_interval=0, **quiet()):
        pass
    assert progress_text(space) == ""


def test_no_webhook_keeps_the_bar_working_with_one_warning_line(outbox_home, capsys):
    out = io.StringIO()
    seen = list(chat_magic.tqdm(range(4), desc="offline", chat_interval=0, file=out, mininterval=0))
    assert seen == [0, 1, 2, 3]
    assert "4/4" in out.getvalue()
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("chat_magic: progress lines not posted: no webhook configured")


def test_bad_options_are_one_line_errors(outbox_home):
    with pytest.raises(chat_magic.ConfigError, match="milestones"):
        chat_magic.tqdm(range(3), chat_milestones=(0, 150))
    with pytest.raises(chat_magic.ConfigError, match="interval"):
        ChatProgress(interval=-1)


def test_without_tqdm_the_module_imports_and_use_says_pip_install():
    code = (
        "import sys; sys.modules['tqdm'] = None\n"
        "import chat_magic, chat_magic.progress\n"
        "p = chat_magic.progress.ChatProgress(label='x', total=3)\n"
        "try:\n"
        "    chat_magic.tqdm\n"
        "except ImportError as e:\n"
        "    print('ImportError:', e)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "GOOGLE_CHAT_WEBHOOK_URL"}
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "ImportError: chat_magic.tqdm needs the tqdm package: pip install tqdm"


def test_tqdm_is_a_tqdm_auto_subclass():
    import tqdm.auto

    assert issubclass(chat_magic.tqdm, tqdm.auto.tqdm)
    assert chat_magic.tqdm is chat_magic.progress.tqdm
