"""Distributed jobs: which process of a torch.distributed, SLURM or MPI job this is.

In a job of N processes every process runs the same code, so a notice from
each would post N times. The policy (``ranks="zero"``, the default) is:

- success, start and progress notices come from rank 0 only;
- a failure is posted by whichever rank fails, naming it ("rank 3 of 8");
- an interrupt (Ctrl-C reaches every rank at once) comes from rank 0 only.

``ranks="all"`` (or the environment variable ``CHAT_MAGIC_RANKS=all``) makes
every rank post everything, each naming its rank.

The rank is read from the environment (``RANK``, ``SLURM_PROCID``,
``OMPI_COMM_WORLD_RANK``, ``PMI_RANK``, ``PMIX_RANK``, then ``LOCAL_RANK``),
or from ``torch.distributed`` when the program has already imported and
initialised it (torch is never imported here).
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["FAILURE", "INTERRUPT", "PROGRESS", "RankInfo", "START", "SUCCESS", "current", "policy", "should_post"]

ENV_RANKS = "CHAT_MAGIC_RANKS"
POLICIES = ("zero", "all")

# (rank variable, world-size variable), most specific first
_RANK_VARS = (
    ("RANK", "WORLD_SIZE"),  # torchrun, torch.distributed.launch, accelerate, deepspeed
    ("SLURM_PROCID", "SLURM_NTASKS"),
    ("OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE"),  # Open MPI
    ("PMI_RANK", "PMI_SIZE"),  # MPICH, Intel MPI
    ("PMIX_RANK", "PMIX_SIZE"),
    ("LOCAL_RANK", "LOCAL_WORLD_SIZE"),  # last: a rank within one node only
)

# what kind of notice: start/progress/success go through rank 0 only, failure from any rank
START, PROGRESS, SUCCESS, FAILURE, INTERRUPT = "start", "progress", "success", "failure", "interrupt"


@dataclass(frozen=True)
class RankInfo:
    """This process's place in a distributed job (``rank`` is None outside one)."""

    rank: int | None = None
    world_size: int | None = None
    source: str = ""  # the variable it came from, e.g. "SLURM_PROCID"

    @property
    def distributed(self) -> bool:
        return self.rank is not None and (self.world_size is None or self.world_size > 1 or self.rank > 0)

    @property
    def is_zero(self) -> bool:
        return not self.rank

    def describe(self) -> str:
        """``"rank 3 of 8"`` (or ``"rank 3"`` when the size is unknown); ``""`` outside a job."""
        if not self.distributed:
            return ""
        return f"rank {self.rank} of {self.world_size}" if self.world_size else f"rank {self.rank}"


def _int(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value.strip())
    except ValueError:
        return None


def current() -> RankInfo:
    """Read the rank now (never cached: a launcher may set the variables late)."""
    for rank_var, size_var in _RANK_VARS:
        rank = _int(os.environ.get(rank_var))
        if rank is not None and rank >= 0:
            size = _int(os.environ.get(size_var))
            return RankInfo(rank, size if size and size > 0 else None, rank_var)
    dist = sys.modules.get("torch.distributed")
    if dist is not None:
        try:
            if dist.is_available() and dist.is_initialized():
                return RankInfo(int(dist.get_rank()), int(dist.get_world_size()), "torch.distributed")
        except Exception:
            pass
    return RankInfo()


def policy(ranks: str | None = None) -> str:
    """The policy in force: the argument, else ``CHAT_MAGIC_RANKS``, else ``"zero"``."""
    source = "ranks="
    if ranks is None:
        ranks = os.environ.get(ENV_RANKS) or "zero"
        source = f"{ENV_RANKS}="
    value = str(ranks).strip().lower()
    if value in ("0", "rank0"):
        value = "zero"
    if value not in POLICIES:
        raise ConfigError(f"{source}{ranks!r} is not a rank policy: use 'zero' (rank 0 posts, failures from any rank) or 'all'")
    return value


def should_post(kind: str, ranks: str | None = None, info: RankInfo | None = None) -> bool:
    """Whether this process posts a notice of ``kind`` (start/progress/success/failure/interrupt)."""
    info = info or current()
    if info.is_zero or policy(ranks) == "all":
        return True
    return kind == FAILURE
