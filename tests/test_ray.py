"""``chat_magic.integrations.ray.ChatCallback`` with a real local Ray (2 CPUs, no dashboard).

Ray Train: a ``TorchTrainer`` with 2 CPU workers (gloo), its callbacks in Ray
Train's controller actor, posting through this host's outbox; Ray Tune: a
sweep of 4 trials. Each posts one thread with a correct final card; the
emulator validates every accepted payload with the official proto.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import assert_no_secret

import chat_magic

ray = pytest.importorskip("ray", reason='Ray not installed: pip install "chat-magic[ray]"')
pytest.importorskip("ray.train.torch", reason='Ray Train not installed: pip install "chat-magic[ray]"')
pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture
def local_ray(space):
    """A local Ray whose processes know the space's webhook (a pickled webhook carries no secret) and this folder."""
    path = os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False,
             runtime_env={"env_vars": {"PYTHONPATH": path, "GOOGLE_CHAT_WEBHOOK_URL": space.url}})
    yield
    ray.shutdown()


def thread_of(space, timeout=120) -> list[dict]:
    assert chat_magic.flush(timeout), "not delivered"
    msgs = space.messages()
    assert msgs and len({m["thread"]["name"] for m in msgs}) == 1, "one thread"
    assert_no_secret(json.dumps(msgs))
    return msgs


def the_card(msgs):
    cards = [m["cardsV2"][0]["card"] for m in msgs if m.get("cardsV2")]
    assert len(cards) == 1, [c["header"]["title"] for c in cards]
    return cards[0]


def rows(card):
    return {w["decoratedText"]["topLabel"]: w["decoratedText"]["text"]
            for w in card["sections"][0]["widgets"] if "decoratedText" in w}


def metric_rows(card):
    (section,) = [s for s in card["sections"] if s.get("header") == "Metrics"]
    return {w["decoratedText"]["topLabel"]: w["decoratedText"] for w in section["widgets"] if "decoratedText" in w}


def _train_loop(config):
    import ray.train
    import torch

    rank = ray.train.get_context().get_world_rank()
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 1)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.rand(64, 4)
    y = x.sum(1, keepdim=True)
    for epoch in range(config["epochs"]):
        if config.get("fail_rank") == rank and epoch == 1:
            raise ValueError(f"bad shard on rank {rank}")
        loss = torch.nn.functional.mse_loss(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        ray.train.report({"loss": float(loss), "epoch": epoch})


def _trainer(tmp_path, callback, **config):
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    return TorchTrainer(_train_loop, train_loop_config={"epochs": 3, **config},
                        scaling_config=ScalingConfig(num_workers=2, use_gpu=False),
                        run_config=RunConfig(name="tiny-ddp", storage_path=str(tmp_path), callbacks=[callback]))


def test_ray_train_two_workers_post_one_thread_with_the_final_card(local_ray, space, tmp_path):
    from chat_magic.integrations.ray import ChatCallback

    result = _trainer(tmp_path, ChatCallback(progress_every=0)).fit()
    assert result.error is None
    msgs = thread_of(space)
    text = "\n".join(m.get("text", "") for m in msgs)
    assert "▶️ *tiny-ddp* started: Ray Train, 2 workers" in text
    assert "report 1 · loss " in text and "report 3 · loss " in text
    card = the_card(msgs)
    assert card["header"]["title"].startswith("✅ tiny-ddp finished in ")
    r = rows(card)
    assert r["Workers"] == "2" and r["Reports"] == "3"
    loss = metric_rows(card)["loss"]
    assert " · best " in loss["text"] and "(min, report " in loss["text"]
    if result.metrics:  # Ray Train 2 keeps the last metrics only with a checkpoint
        assert loss["text"].startswith(chat_magic.metrics.format_value(result.metrics["loss"]) + " · best ")
    assert len(loss["bottomLabel"]) == 3


def test_ray_train_a_failing_worker_is_named_in_the_failure_card(local_ray, space, tmp_path):
    from ray.train import TrainingFailedError  # noqa: F401  (what fit() raises or returns, by version)

    from chat_magic.integrations.ray import ChatCallback

    try:
        result = _trainer(tmp_path, ChatCallback(), fail_rank=1).fit()
        assert result.error is not None
    except Exception as e:  # Ray Train 2 raises from fit()
        assert "bad shard on rank 1" in str(e)
    card = the_card(thread_of(space))
    assert card["header"]["title"].startswith("❌ tiny-ddp failed")
    error = rows(card)["Error"]
    assert "worker 1 of 2: " in error and "bad shard on rank 1" in error, error


def _trainable(config):
    import ray.tune

    if config["lr"] < 0:
        raise ValueError("negative learning rate")
    loss = 1.0
    for _ in range(3):
        loss = loss * (1 - config["lr"])
        ray.tune.report({"loss": loss})


def test_ray_tune_sweep_of_four_trials_posts_one_thread_with_the_best_trial(local_ray, space, tmp_path):
    from ray import tune

    from chat_magic.integrations.ray import ChatCallback

    tuner = tune.Tuner(_trainable, param_space={"lr": tune.grid_search([0.1, 0.5, 0.3, -1.0])},
                       tune_config=tune.TuneConfig(metric="loss", mode="min"),
                       run_config=tune.RunConfig(name="sweep", storage_path=str(tmp_path), callbacks=[ChatCallback(metric="loss", mode="min")]))
    results = tuner.fit()
    best = results.get_best_result()
    msgs = thread_of(space)
    text = "\n".join(m.get("text", "") for m in msgs)
    assert "▶️ *Ray Tune sweep* started: Ray Tune, 4 trials planned" in text
    assert "failed: " in text and "negative learning rate" in text, "the failing trial is named at once"
    card = the_card(msgs)
    assert card["header"]["title"].startswith("✅ Ray Tune sweep finished in ")
    r = rows(card)
    assert r["Trials"] == "4: 3 finished, 1 failed"
    assert r["Best config"] == "lr=0.5" and best.config["lr"] == 0.5
    assert r["Best trial"].endswith(f"loss {chat_magic.metrics.format_value(best.metrics['loss'])} (min)")
    assert "negative learning rate" in r["Failed trials"]
    assert len(metric_rows(card)["loss"]["bottomLabel"]) == 3
