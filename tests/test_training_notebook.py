"""notebooks/training_job.ipynb runs in a real kernel (nbclient + ipykernel) against the emulator."""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from conftest import KEY, TOKEN, assert_no_secret, committed_clean

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "training_job.ipynb"


def test_committed_notebook_is_clean():
    raw, _code = committed_clean(NOTEBOOK)
    assert not re.search(r"https?://", raw), "no URL in the committed notebook"
    assert "key=" not in raw and "token=" not in raw


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_training_notebook_posts_one_thread_with_progress_and_a_completion_card(space, monkeypatch, tmp_path):
    from nbclient import NotebookClient

    # the kernel gets the webhook from its environment, as under Jupyter; Jupyter Server
    # tells the kernel its notebook's name the same way
    monkeypatch.setenv("JPY_SESSION_NAME", str(NOTEBOOK))
    monkeypatch.setenv("CHAT_MAGIC_EXIT_TIMEOUT", "10")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}})
    client.execute()

    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    streams = "".join(o.get("text", "") for o in outputs if o.output_type == "stream" and o.name == "stdout")
    assert re.search(r"final loss \d\.\d{3}", streams)
    results = [o["data"]["text/plain"] for o in outputs if o.output_type == "execute_result"]
    assert results[-1] == "True", "chat_magic.flush(30) in the last cell: everything delivered"

    # no secret anywhere in the executed notebook (outputs, widget state, metadata)
    saved = nbformat.writes(nb)
    assert_no_secret(saved)
    assert KEY not in saved and TOKEN not in saved and space.url not in saved

    msgs = space.messages()
    assert msgs, "the space received the notebook's messages"
    assert len({m["thread"]["name"] for m in msgs}) == 1, "one thread for the whole notebook session"
    assert msgs[0]["text"].startswith("📓 *training_job.ipynb*")

    cards = [m["cardsV2"][0]["card"] for m in msgs if m.get("cardsV2")]
    titles = [c["header"]["title"] for c in cards]
    assert titles[0] == "▶️ simulated training started"
    assert titles[-1].startswith("✅ simulated training finished in ")
    rows = {w["decoratedText"]["topLabel"]: w["decoratedText"]["text"]
            for w in cards[-1]["sections"][0]["widgets"] if "decoratedText" in w}
    assert rows["Notebook"] == "training_job.ipynb"
    assert rows["Host"]

    text = "\n".join(m.get("text", "") for m in msgs)
    updates = re.findall(r"\*simulated training\*: epoch (\d)/4: loss \d\.\d{3}", text)
    assert updates == ["1", "2", "3", "4"], "every .update() line, in order"
    pct = [int(p) for p in re.findall(r"\*epochs\*: (\d+)% ", text)]
    assert pct == [25, 50, 75, 100], "the progress milestones"
    assert "ETA" in text
    # the completion card comes after every progress line
    last_card_at = max(i for i, m in enumerate(msgs) if m.get("cardsV2"))
    assert all(not m.get("text", "").startswith("⏳") for m in msgs[last_card_at + 1:])
    assert_no_secret(json.dumps(msgs))
