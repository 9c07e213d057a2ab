"""notebooks/quickstart.ipynb in a real ipykernel (nbclient) against the emulator, and ``chat-magic demo``."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

import nbformat
import pytest
from conftest import KEY, TOKEN, assert_no_secret, committed_clean, validate_message
from nbclient import NotebookClient
from traitlets.config import Config

from chat_magic import demo
from chat_magic.message import strip_ansi

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "quickstart.ipynb"


def _all_text(m: dict) -> str:
    import json

    return (m.get("text") or "") + "\n" + json.dumps(m.get("cardsV2", []), ensure_ascii=False)


def test_quickstart_is_committed_clean():
    raw, code = committed_clean(NOTEBOOK)
    assert "http://" not in raw and "https://" not in raw and not re.search(r"[?&](key|token)=", raw)
    assert "GOOGLE_CHAT_WEBHOOK_URL" in raw  # the docs point at the environment, not at a cell
    failing = [c for c in code if "raises-exception" in c.metadata.get("tags", [])]
    assert len(failing) == 1 and failing[0].source.startswith("%%chat")
    sources = "\n".join(c.source for c in code)
    for magic in ("%load_ext chat_magic", "%%chat", "%chat ", "%chat_autonotify", "%chat_thread"):
        assert magic in sources


@pytest.mark.slow
def test_quickstart_runs_in_a_real_kernel(space, monkeypatch):
    # the kernel inherits this process's environment: the space fixture set
    # GOOGLE_CHAT_WEBHOOK_URL and a private CHAT_MAGIC_HOME
    monkeypatch.setenv("JPY_SESSION_NAME", str(NOTEBOOK))  # as Jupyter Server does
    monkeypatch.setenv("CHAT_MAGIC_EXIT_TIMEOUT", "15")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    cfg = Config()
    cfg.KernelManager.shutdown_wait_time = 40.0  # time for the kernel's exit hook to deliver
    client = NotebookClient(
        nb, kernel_name="python3", timeout=120, allow_errors=False, config=cfg,
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    replies: dict[int, str] = {}
    client.on_cell_executed = lambda cell, cell_index, execute_reply: replies.__setitem__(cell_index, execute_reply["content"]["status"])
    client.execute()

    # what the user saw: output, result, the failing cell's one traceback
    code = [c for c in nb.cells if c.cell_type == "code"]
    train = next(c for c in code if "Train a tiny model" in c.source)
    streams = "".join(o.get("text", "") for o in train.outputs if o.output_type == "stream")
    assert "epoch 3: loss=0.125" in streams
    results = [o for o in train.outputs if o.output_type == "execute_result"]
    assert len(results) == 1 and results[0]["data"]["text/plain"] == "0.125"
    failing = next(c for c in code if "raises-exception" in c.metadata.get("tags", []))
    errors = [o for o in failing.outputs if o.output_type == "error"]
    assert len(errors) == 1 and errors[0].ename == "FileNotFoundError"
    assert not [o for o in failing.outputs if o.output_type == "stream" and "chat_magic" in o.get("text", "")]
    # the kernel reports the %%chat cell as failed, as it would without the magic (Run All stops there)
    assert {i for i, status in replies.items() if status != "ok"} == {nb.cells.index(failing)}

    # what arrived: the kernel has exited; its exit hook delivered the rest
    deadline = time.monotonic() + 30
    while "Long-running step" not in "".join(_all_text(m) for m in space.messages()):
        assert time.monotonic() < deadline, [_all_text(m)[:80] for m in space.messages()]
        time.sleep(0.2)
    msgs = space.messages()
    assert len({m["thread"]["name"] for m in msgs}) == 1  # one thread for the session
    assert "quickstart.ipynb" in msgs[0]["text"]  # the header names the notebook
    everything = "\n".join(_all_text(m) for m in msgs)
    assert "Train a tiny model finished" in everything
    assert "final loss is *0.125* after 3 epochs" in everything
    assert "Load the data failed" in everything and "FileNotFoundError" in everything
    # under the auto-notify threshold (0.5 s): not announced, unless the cell really took that long (a loaded
    # machine can make "1 + 1" take 0.6 s, and the notice is then right)
    for m in msgs:
        if "A quick step" in _all_text(m):
            took = re.search(r"A quick step[^\n]*? finished in (\d+) ms|A quick step[^\n]*? finished in ([\d.]+) s", _all_text(m))
            assert took and (int(took[1]) / 1000 if took[1] else float(took[2])) >= 0.5, _all_text(m)[:300]
    for r in space.requests():
        if r.get("status") == 200:
            validate_message(r["body"])

    saved = nbformat.writes(nb)
    assert_no_secret(saved)
    assert space.url not in saved and not re.search(r"[?&](key|token)=", saved)


@pytest.mark.slow
def test_demo_runs_the_quickstart_and_prints_the_thread(tmp_path):
    env = dict(os.environ)
    # the demo must use its own emulator and outbox, never these
    env["GOOGLE_CHAT_WEBHOOK_URL"] = f"https://chat.googleapis.com/v1/spaces/REAL/messages?key={KEY}&token={TOKEN}"
    env["CHAT_MAGIC_HOME"] = str(tmp_path / "users-outbox")
    p = subprocess.run(
        [sys.executable, "-m", "chat_magic.demo"], env=env, capture_output=True, text=True, timeout=180,
        stdin=subprocess.DEVNULL,
    )
    assert p.returncode == 0, p.stderr[-3000:]
    out = strip_ansi(p.stdout)
    assert_no_secret(out, p.stderr)
    assert "key=" not in out and "token=" not in out
    assert not (tmp_path / "users-outbox").exists()
    assert re.search(r"got \d+ messages in 1 thread", out)
    order = [out.index(s) for s in ("quickstart.ipynb", "Train a tiny model finished", "final loss is *0.125*",
                                   "Load the data failed", "FileNotFoundError", "Long-running step finished")]
    assert order == sorted(order)
    assert re.search(r"^\[\d\d:\d\d:\d\d\] thread \S+  \[card\] ✅ Train a tiny model", out, re.M)


def test_demo_without_the_notebook_says_what_to_do(tmp_path, capsys):
    assert demo.main(["--notebook", str(tmp_path / "nowhere.ipynb")]) == 2
    err = capsys.readouterr().err
    assert "nowhere.ipynb is not there" in err and "--notebook PATH" in err and len(err.strip().splitlines()) == 1


def test_format_message_renders_cards_and_text():
    m = {
        "createTime": "2024-01-01T12:00:00Z",
        "thread": {"name": "spaces/S/threads/T1"},
        "cardsV2": [{"cardId": "r", "card": {"header": {"title": "✅ Fit finished in 2.0 s"}, "sections": [
            {"widgets": [{"decoratedText": {"topLabel": "Duration", "text": "2.0 s"}}]},
            {"header": "Output", "widgets": [{"textParagraph": {"text": "<pre>a &lt;b&gt;\nc</pre>"}}]},
        ]}}],
    }
    lines = demo.format_message(m)
    assert lines[0].endswith("thread T1  [card] ✅ Fit finished in 2.0 s")
    assert "    Duration: 2.0 s" in lines and "      a <b>" in lines and "      c" in lines
    assert demo.format_message({"text": "hi *there*", "thread": {"name": "x/T2"}})[1] == "    hi *there*"
