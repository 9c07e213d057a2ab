"""One thread per job: every rank of a distributed job posts into the same thread.

The thread key comes from the launcher's job identity when there is one
(first match wins):

- Slurm: ``SLURM_JOB_ID`` and ``SLURM_STEP_ID`` (every task of a step);
- torchrun / TorchElastic: ``TORCHELASTIC_RUN_ID`` (``--rdzv-id``; not the default ``none``);
- Ray: ``RAY_JOB_ID``;
- a Kubernetes Job (an indexed Job, a Kubeflow PyTorchJob): ``CHAT_MAGIC_JOB`` or ``JOB_NAME``;
- ``MASTER_ADDR:MASTER_PORT`` (torch.distributed, Lightning, accelerate), with
  the start time of the process group's leader (the shell's job or the launcher,
  shared by every rank it starts), so a port used again later is another job.

The failing rank's error is the failure notice. When several ranks fail, the
first failure recorded for the job wins (in the host's outbox, and in Redis
when one is configured, across hosts: ``CHAT_MAGIC_REDIS_URL`` or ``redis_url``
in the config file, as for pacing and the heartbeat); a later failure whose
error is a distributed collective's consequence ("Connection closed by
peer", NCCL/gloo errors, a timed-out collective) is one line naming the rank
that failed first, not a second failure card.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from typing import Any

__all__ = ["as_line", "consequential", "describe_rank", "first_failure", "identity", "thread_key"]

# errors a rank gets because a peer failed, not because of its own work
CONSEQUENTIAL = re.compile(
    r"connection closed by peer|connection reset by peer|broken pipe|nccl|gloo|ProcessGroup|DistBackendError|"
    r"DistNetworkError|collective operation timeout|watchdog caught collective|socket timeout|Connection refused",
    re.IGNORECASE,
)


def identity(env: Mapping[str, str] | None = None) -> str | None:
    """The launcher's identity of this job (``slurm-123.0``, ``torchrun-abc``, ...), or None outside one."""
    env = os.environ if env is None else env
    if env.get("SLURM_JOB_ID"):
        step = env.get("SLURM_STEP_ID", "")
        return f"slurm-{env['SLURM_JOB_ID']}" + (f".{step}" if step else "")
    run = env.get("TORCHELASTIC_RUN_ID", "")
    if run and run != "none":
        return f"torchrun-{run}"
    if env.get("RAY_JOB_ID"):
        return f"ray-{env['RAY_JOB_ID']}"
    name = env.get("CHAT_MAGIC_JOB") or env.get("JOB_NAME")
    if name:
        return f"job-{name}"
    if env.get("MASTER_ADDR") and env.get("MASTER_PORT"):
        return f"ddp-{env['MASTER_ADDR']}-{env['MASTER_PORT']}-{_group_start()}"
    return None


def _group_start() -> str:
    """When this process group's leader started (shared by the ranks a launcher starts), or ``""``."""
    try:
        with open(f"/proc/{os.getpgrp()}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError, AttributeError):
        return ""


def thread_key(ident: str) -> str:
    """The thread key every rank derives from the job's identity (the same on every host)."""
    slug = re.sub(r"[^A-Za-z0-9._-]+", "-", ident).strip("-.")[:60]
    return f"chat-magic-{slug}-{hashlib.sha256(ident.encode()).hexdigest()[:6]}"


KEPT = 500  # characters of a failure's summary that are recorded (and compared: what was kept is what comes back)


def first_failure(job: str, who: str, summary: str, box: Any) -> tuple[str, str] | None:
    """Record this rank's failure for ``job``; None if it is the first, else ``(rank, summary)`` of the first.

    Recorded in Redis when configured, else in the outbox ``box`` (or what
    ``box()`` returns, asked only then). Never raises: if no record can be
    kept, every failure counts as the first. The summary is cut to
    :data:`KEPT` characters here, once, before it is recorded or compared:
    a long error (a collective's C++ backtrace) read back must still be
    recognised as this rank's own.
    """
    mine = (who, summary[:KEPT])
    first = _first_in_redis(job, *mine)
    if first is None:
        try:
            if callable(box):
                box = box()
            first = box.first_job_failure(job, *mine)
        except Exception:
            return None
    return None if first is None or first == mine else first


def _first_in_redis(job: str, who: str, summary: str) -> tuple[str, str] | None:
    """The job's first failure as Redis keeps it (this one if none was), or None: no Redis configured or reachable.

    The Redis is the one pacing and the heartbeat use (:func:`chat_magic.heartbeat.redis_client`:
    the variable, else the config file): every host of a job must find the same record.
    """
    try:
        import json

        from .heartbeat import redis_client

        client = redis_client()
        if client is None:
            return None
        key = f"chat_magic:job-failure:{job}"
        client.set(key, json.dumps([who, summary]), nx=True, ex=7 * 86400)
        got = client.get(key)
        return tuple(json.loads(got)) if got else None  # type: ignore[return-value]
    except Exception:
        return None


def consequential(exc: BaseException | None) -> bool:
    """Whether ``exc`` looks like a peer's failure seen from this rank (a collective broke)."""
    if exc is None:
        return False
    seen = 0
    while exc is not None and seen < 5:
        try:
            text = f"{type(exc).__name__}: {exc}"
        except Exception:
            text = type(exc).__name__
        if CONSEQUENTIAL.search(text):
            return True
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return False


def as_line(title: str, summary: str, first: tuple[str, str]) -> str:
    """The line a peer's consequential error becomes."""
    from .message import neutralize

    return (f"↳ *{neutralize(title)}* stopped too: `{neutralize(summary[:200]).replace('`', 'ʼ')}` "
            f"— after {neutralize(first[0])} failed first ({neutralize(first[1][:200])})")


def describe_rank(info: Any) -> str:
    return info.describe() or "a process"
