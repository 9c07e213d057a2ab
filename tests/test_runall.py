"""``%chat_autonotify --run-all``: one summary per run of back-to-back cells.

In a real ``InteractiveShell`` (cells run with ``run_cell``, as a kernel
does), and in a real kernel driven by nbclient for the kernel-shutdown path:
a Run All that stops at a failing cell posts exactly one summary naming the
error. Every accepted payload is validated with the official proto (``space``).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import nbformat
import pytest
from conftest import KEY, TOKEN, assert_no_secret

import chat_magic

# -- a shell with the extension ---------------------------------------------------------------


def tracker(shell):
    return shell.magics_manager.registry["ChatMagics"]._runall


# A run ends after QUIET idle seconds: 1.5 s, so that a loaded machine's pause between two cells run back to back
# (0.6 s split a 0.5 s run in two) does not end it; and the slow cells below sleep over 1 s, as a trivial cell can
# take 0.2-0.5 s under load ("1 + 1" passed a 0.2 s threshold in CI; a 0.35 s one outranked a 0.3 s "slowest" cell).
QUIET = 1.5


def cells(shell, *sources: str) -> None:
    """Run cells back to back, as a front end's Run All does."""
    for src in sources:
        shell.run_cell(src, store_history=True)


def closed(shell, runs: int = 1, timeout: float = 20) -> None:
    """Wait until the tracker has ended ``runs`` runs (an event, not a sleep)."""
    t = tracker(shell)
    assert t.idle.wait(timeout) and t.runs_closed >= runs, "the run did not end"


def summaries(space) -> list[dict]:
    assert chat_magic.flush(30)
    return [m["cardsV2"][0]["card"] for m in space.messages() if m.get("cardsV2")]


def rows(card: dict) -> dict[str, str]:
    return {w["decoratedText"]["topLabel"]: w["decoratedText"]["text"]
            for w in card["sections"][0]["widgets"] if "decoratedText" in w}


# -- in a shell ------------------------------------------------------------------------------------


def test_back_to_back_cells_post_one_summary_with_the_slowest_cells(ip, space, capsys):
    ip.run_cell(f"%chat_autonotify --run-all --quiet {QUIET}")
    assert "one summary per run of cells" in capsys.readouterr().out
    cells(ip, "# Load data\nx = 1", "# Train\nimport time; time.sleep(1.2)", "# Report\ny = x + 1", "z = 3")
    closed(ip)
    (card,) = summaries(space)
    assert card["header"]["title"].startswith("✅ Run of 5 cells finished in "), "the enabling cell counts too"
    r = rows(card)
    assert r["Cells run"] == "5"
    slowest = r["Slowest cells"].split(" · ")
    assert len(slowest) == 3 and re.fullmatch(r"\[\d+\] Train (\d+ ms|[\d.]+ s)", slowest[0]), slowest
    assert "Failed cell" not in r and "Stopped at" not in r and r["Host"]
    assert tracker(ip).summaries_posted == 1


def test_a_run_stopping_at_a_failing_cell_names_the_cell_and_the_error(ip, space):
    ip.run_cell(f"%chat_autonotify --run-all --quiet {QUIET} --mention all")
    cells(ip, "a = 1", "# Fit the model\nraise ValueError('learning rate too high')")
    closed(ip)
    (card,) = summaries(space)
    assert card["header"]["title"].startswith("❌ Run of 3 cells failed")
    r = rows(card)
    assert re.fullmatch(r"\[\d+\] Fit the model", r["Stopped at"])
    assert "ValueError: learning rate too high" in r["Error"] and "Fit the model" in r["Error"]
    (tb,) = [s for s in card["sections"] if s.get("header") == "Traceback"]
    assert "learning rate too high" in tb["widgets"][0]["textParagraph"]["text"]
    (msg,) = [m for m in space.messages() if m.get("cardsV2")]
    assert msg["text"].startswith("<users/all> "), "--mention pings in the summary"


def test_two_runs_separated_by_quiet_time_post_two_summaries(ip, space):
    ip.run_cell(f"%chat_autonotify --run-all --quiet {QUIET}")
    cells(ip, "a = 1", "b = 2")
    closed(ip, 1)
    cells(ip, "c = 3", "d = 4", "e = 5")
    closed(ip, 2)
    titles = [c["header"]["title"] for c in summaries(space)]
    assert [t.split(" finished")[0] for t in titles] == ["✅ Run of 3 cells", "✅ Run of 3 cells"]


def test_one_quick_cell_is_not_a_run_worth_a_summary(ip, space):
    ip.run_cell("%chat_autonotify --run-all --quiet 0.2")
    closed(ip)  # the enabling cell alone: a run of one quick cell
    cells(ip, "a = 1")
    closed(ip, 2)
    assert tracker(ip).summaries_posted == 0
    assert summaries(space) == []


def test_nested_cells_count_once(ip, space):
    ip.run_cell(f"%chat_autonotify --run-all --quiet {QUIET}")
    cells(ip, "get_ipython().run_cell('inner = 1')", "b = 2")
    closed(ip)
    (card,) = summaries(space)
    assert rows(card)["Cells run"] == "3"


def test_with_threshold_slow_cells_still_post_their_own_notice(ip, space):
    ip.run_cell(f"%chat_autonotify --run-all --quiet {QUIET} --threshold 1")
    cells(ip, "# Slow one\nimport time; time.sleep(1.1)", "b = 2")
    closed(ip)
    titles = [c["header"]["title"] for c in summaries(space)]
    assert len(titles) == 2 and titles[0].startswith("✅ Slow one finished") and titles[1].startswith("✅ Run of 3 cells")


def test_off_stops_the_tracker_and_bad_options_are_one_line(ip, space, capsys):
    ip.run_cell("%chat_autonotify --run-all")
    t = tracker(ip)
    assert t.quiet == 3.0, "the default quiet time: ChatMagics.runall_quiet"
    ip.run_cell("%chat_autonotify off")
    assert "auto-notify is off" in capsys.readouterr().out
    assert tracker(ip) is None
    assert t._pre_run_cell not in ip.events.callbacks["pre_run_cell"]
    for line, words in (("--run-all --quiet -1", "--quiet: '-1' is not a duration"), ("--quiet 2", "--quiet goes with --run-all")):
        result = ip.run_cell(f"%chat_autonotify {line}")
        assert words in str(result.error_in_exec)
        assert "\n" not in str(result.error_in_exec)


def test_config_trait_sets_the_quiet_time(ip, space):
    ip.run_cell("%config ChatMagics.runall_quiet = 0.25")
    ip.run_cell("%chat_autonotify --run-all")
    assert tracker(ip).quiet == 0.25


def test_kernel_exit_reports_the_open_run(ip, space):
    """The exit path (atexit) on its own: a run with a long quiet time, then the interpreter 'exits'."""
    ip.run_cell("%chat_autonotify --run-all --quiet 600")
    cells(ip, "a = 1", "b = 2", "1/0")
    tracker(ip)._at_exit()
    (card,) = summaries(space)
    assert "ZeroDivisionError" in rows(card)["Error"]


# -- in a real kernel run by nbclient --------------------------------------------------------------


def _notebook(path: Path) -> None:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_code_cell("%load_ext chat_magic\n%chat_autonotify --run-all --quiet 60"),
        nbformat.v4.new_code_cell("# Prepare\ndata = list(range(10))"),
        nbformat.v4.new_code_cell("# Train\nimport time\ntime.sleep(0.2)\nmodel = sum(data)"),
        nbformat.v4.new_code_cell("# Evaluate\nraise RuntimeError(f'accuracy too low: {model}')"),
        nbformat.v4.new_code_cell("# Never runs\nprint('after the failure')"),
    ]
    nbformat.write(nb, path)


@pytest.mark.timeout(180)
def test_nbclient_run_all_stopping_at_a_failing_cell_posts_exactly_one_summary(space, monkeypatch, tmp_path):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    path = tmp_path / "pipeline.ipynb"
    _notebook(path)
    monkeypatch.setenv("JPY_SESSION_NAME", str(path))
    monkeypatch.setenv("CHAT_MAGIC_EXIT_TIMEOUT", "10")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(nb, kernel_name="python3", timeout=120, resources={"metadata": {"path": str(tmp_path)}})
    with pytest.raises(CellExecutionError, match="accuracy too low"):
        client.execute()  # stops at the failing cell and shuts the kernel down (before the 60 s quiet time)
    assert nb.cells[-1].outputs == [], "Run All stopped at the failing cell"

    # the kernel posted at exit; whatever it had not delivered, this process's worker delivers
    cards = summaries(space)
    assert len(cards) == 1, [c["header"]["title"] for c in cards]
    card = cards[0]
    assert card["header"]["title"].startswith("❌ Run of 4 cells failed in "), "the enabling cell counts too"
    r = rows(card)
    assert r["Stopped at"] == "[4] Evaluate"
    assert r["Error"].endswith("[4] Evaluate: RuntimeError: accuracy too low: 45</font>")
    assert r["Cells run"] == "4"
    assert r["Not run"] == "1 cell: Never runs"
    # the three slowest of the four cells run, each with its time (which ones depends on the machine's load;
    # the enabling cell has no title: "[1] 0 ms")
    slowest = dict(re.fullmatch(r"\[(\d+)\](?: .+?)? (\d+ ms|[\d.]+ s|\d+ min \d+ s)", part).groups() for part in r["Slowest cells"].split(" · "))
    assert len(slowest) == 3 and set(slowest) <= {"1", "2", "3", "4"}, r["Slowest cells"]
    if "3" in slowest:
        assert re.fullmatch(r"\d{3} ms|[\d.]+ s", slowest["3"]), "the 0.2 s cell took at least 100 ms"
    assert r["Notebook"] == "pipeline.ipynb"
    msgs = space.messages()
    assert len({m["thread"]["name"] for m in msgs}) == 1
    saved = nbformat.writes(nb)
    assert KEY not in saved and TOKEN not in saved
    assert_no_secret(json.dumps(msgs))
