"""Scale-out on torch.distributed: launch detection, the process group, row slices and exact merges of states.

A thin layer over what ``torchrun`` sets up, with no scheduler of its own. Launched as
``torchrun --nproc_per_node=K [--nnodes=M ...] -m ncaudit ...`` (on Slurm: ``srun torchrun ...``, one torchrun per
node), every process finds ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT`` in its
environment; :func:`process_group` joins the group (NCCL when the ranks compute on CUDA, gloo on CPU), pins the rank
to ``cuda:LOCAL_RANK`` and leaves the group on exit. Without those variables everything here works as one process:
rank 0 of a world of 1, every collective a no-op.

Rows are split into contiguous slices (:func:`rank_rows`), never padded or repeated as ``DistributedSampler`` does:
a duplicated sample would bias every statistic. Accumulators (:class:`~ncaudit.stats.ClassStatistics`,
:class:`~ncaudit.stats.SampleDecisions`) merge exactly through their public ``state_dict`` / ``load_state_dict`` /
``merge``: :func:`merge_states` reduces every rank's state, in rank order, to the state one process would have
accumulated over the concatenated slices (to floating-point rounding). States travel as tensors (no pickles).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ncaudit._lazy import lazy_attributes
from ncaudit.distributed._launch import (
    WIRED_COMMANDS,
    DistContext,
    Launch,
    backend_for,
    check_launch,
    is_active,
    is_main,
    launch_env,
    local_device,
    process_group,
    rank,
    rank_rows,
    world_size,
)

if TYPE_CHECKING:
    from ncaudit.distributed._collectives import all_equal, any_rank, barrier, broadcast_ints, together
    from ncaudit.distributed._merge import Mergeable, merge_all, merge_states, spawn
    from ncaudit.distributed._progress import GlobalProgress

#: The names that need torch (collectives, merges, the global progress), imported on first access; launch detection
#: and the rows of each rank do not load torch.
_TORCH = {"all_equal": "_collectives", "any_rank": "_collectives", "barrier": "_collectives",
          "broadcast_ints": "_collectives", "together": "_collectives", "Mergeable": "_merge", "merge_all": "_merge",
          "merge_states": "_merge", "spawn": "_merge", "GlobalProgress": "_progress"}

__all__ = ["DistContext", "GlobalProgress", "Launch", "Mergeable", "WIRED_COMMANDS", "all_equal", "any_rank",
           "backend_for", "barrier", "broadcast_ints", "check_launch", "is_active", "is_main", "launch_env",
           "local_device", "merge_all", "merge_states", "process_group", "rank", "rank_rows", "spawn", "together",
           "world_size"]

__getattr__ = lazy_attributes(__name__, _TORCH)
