"""Stalls: a block with no progress for ``stall_after`` seconds says so, and says when it moves again.

Small values (fractions of a second) against the real emulator; a real
Lightning fit on the CPU whose step hangs; a real IPython shell for
``%chat_autonotify --stall-after``.
"""

from __future__ import annotations

import time

import pytest
from conftest import wait_until

import chat_magic
from chat_magic import ConfigError


def texts(space) -> list[str]:
    return [m.get("text") or "" for m in space.messages()]


def lines_with(space, mark: str) -> list[str]:
    return [p for t in texts(space) for p in t.split("\n\n") if mark in p]


def test_a_block_with_no_progress_posts_one_stall_line_and_one_when_it_moves_again(fast_space):
    with chat_magic.notify_when_done("nightly training", stall_after=0.4) as n:
        n.update("epoch 3: loss 0.250")
        stalled = wait_until(lambda: lines_with(fast_space, "⏸"), what="the stall line")
        time.sleep(0.5)  # still stalled: no second line (checked below, after the end)
        n.log(loss=0.2)  # queues the moving-again line itself
    # the block ends at once: left open while the line is delivered, it could stall again (a correct second line,
    # seen with a 5 s delivery)
    moving = wait_until(lambda: lines_with(fast_space, "▶️"), what="the line saying it moves again")
    wait_until(lambda: any("finished" in (m.get("fallbackText") or "") for m in fast_space.messages()), what="the card")
    assert stalled[0].startswith("⏸ *nightly training*: no progress for") and stalled[0].endswith("(last: epoch 3: loss 0.250)")
    assert moving[0].startswith("▶️ *nightly training* is moving again after")
    assert len(lines_with(fast_space, "⏸")) == 1 and len(lines_with(fast_space, "▶️")) == 1


def test_a_block_that_makes_progress_never_stalls(fast_space):
    """A sign of life every 0.1 s for 2.5 s, ``stall_after`` 1.5 s: no stall line.

    Unless this process really went 1.5 s without one (a loaded machine can stop it that long): then a stall
    line is right, and the test accepts it (with 0.6 s and no such check, a 0.7 s stop failed it).
    """
    # the longest time the block can have gone without a sign of life: from before one (or the block's start)
    # to after the next (or the block's end)
    gap, before = 0.0, time.monotonic()
    with chat_magic.notify_when_done("steady", stall_after=1.5) as n:
        for i in range(25):
            started = time.monotonic()
            n.log(step=i)
            gap, before = max(gap, time.monotonic() - before), started
            time.sleep(0.1)
    gap = max(gap, time.monotonic() - before)
    wait_until(lambda: any("steady finished" in (m.get("fallbackText") or "") for m in fast_space.messages()), what="the card")
    if gap < 1.5:
        assert lines_with(fast_space, "⏸") == [], f"stalled with signs of life at most {gap:.2f} s apart"
    else:
        assert len(lines_with(fast_space, "⏸")) <= 1, f"the machine stopped this test {gap:.1f} s: one stall line at most"


# "10" was refused until the one duration rule (chat_magic.rules.seconds): stall_after="10m" reads as 600 s now
@pytest.mark.parametrize("bad", [0, -5, "soon", True])
def test_a_bad_stall_after_is_a_one_line_config_error(fast_space, bad):
    with pytest.raises(ConfigError, match="stall_after=.* is not a duration over 0s"):
        chat_magic.notify_when_done("x", stall_after=bad)


def test_autonotify_stall_after_watches_what_a_cell_prints(ip, fast_space):
    ip.run_cell("%chat_autonotify --threshold 100 --stall-after 0.4")
    ip.run_cell("import time\nprint('step 1 of 2', flush=True)\ntime.sleep(1.5)\nprint('step 2 of 2', flush=True)\ntime.sleep(0.6)")
    stalled = wait_until(lambda: lines_with(fast_space, "⏸"), what="the stall line")
    moving = wait_until(lambda: lines_with(fast_space, "▶️"), what="the moving-again line")
    assert stalled[0].endswith("(last: step 1 of 2)") and "moving again" in moving[0]
    ip.run_cell("%chat_autonotify off")


def test_autonotify_stall_after_must_be_positive(ip, fast_space, capsys):
    ip.run_cell("%chat_autonotify --stall-after 0")
    assert "--stall-after: '0' is not a duration over 0s" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_lightning_step_that_hangs_is_reported_by_the_callback(fast_space, tmp_path):
    L = pytest.importorskip("lightning")
    torch = pytest.importorskip("torch")
    from chat_magic.integrations.lightning import ChatCallback

    class Hangs(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.layer = torch.nn.Linear(1, 1)

        def training_step(self, batch, batch_idx):
            if self.current_epoch == 1 and batch_idx == 2:
                time.sleep(2.0)  # a stuck data loader, a slow collective
            return torch.nn.functional.mse_loss(self.layer(batch[0]), batch[1])

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    x = torch.rand(32, 1)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, 3 * x + 1), batch_size=8)
    trainer = L.Trainer(max_epochs=3, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, default_root_dir=str(tmp_path),
                        callbacks=[ChatCallback("hang test", stall_after=0.8)])
    trainer.fit(Hangs(), data)
    stalled = wait_until(lambda: lines_with(fast_space, "⏸"), what="the stall line")
    wait_until(lambda: lines_with(fast_space, "▶️"), what="the moving-again line")
    assert "*hang test*: no progress for" in stalled[0] and "(last: epoch" in stalled[0]
    assert len(lines_with(fast_space, "⏸")) == 1
