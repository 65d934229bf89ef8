"""Small collectives that are no-ops in one process: barriers, agreement checks, broadcasts, and ``together``
(an error on one rank stops every rank)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from ncaudit.distributed._launch import is_active
from ncaudit.errors import InputError


def barrier() -> None:
    """Wait until every rank gets here (no-op for one process)."""
    if is_active() and dist.get_world_size() > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    """Where tensors must be for the default group's collectives: the current CUDA device for NCCL, else CPU."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_equal(values: Sequence[int]) -> bool:
    """Whether every rank passed the same integers (e.g. dataset size and fingerprint); True for one process."""
    if not is_active() or dist.get_world_size() == 1:
        return True
    dev = _comm_device()
    length = torch.tensor([len(values), -len(values)], dtype=torch.int64, device=dev)
    dist.all_reduce(length, op=dist.ReduceOp.MAX)
    if int(length[0]) != -int(length[1]):
        return False
    lo = torch.tensor(list(values), dtype=torch.int64, device=dev)
    hi = lo.clone()
    dist.all_reduce(lo, op=dist.ReduceOp.MIN)
    dist.all_reduce(hi, op=dist.ReduceOp.MAX)
    return bool(torch.equal(lo, hi))


def any_rank(flag: bool) -> bool:
    """Whether ``flag`` is true on some rank (e.g. one rank hit an input error: every rank then stops, none hangs)."""
    if not is_active() or dist.get_world_size() == 1:
        return bool(flag)
    t = torch.tensor([int(bool(flag))], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def broadcast_ints(values: Sequence[int] | None, src: int = 0) -> list[int]:
    """Rank ``src``'s list of integers on every rank (others pass None), e.g. the shard states rank 0 scanned."""
    if not is_active() or dist.get_world_size() == 1:
        return list(values or [])
    dev = _comm_device()
    mine = dist.get_rank() == src
    length = torch.tensor([len(values) if mine and values is not None else 0], dtype=torch.int64, device=dev)
    dist.broadcast(length, src)
    data = (torch.tensor(list(values), dtype=torch.int64, device=dev) if mine and values is not None
            else torch.empty(int(length), dtype=torch.int64, device=dev))
    if int(length):
        dist.broadcast(data, src)
    return [int(v) for v in data.cpu()]


T = TypeVar("T")


def together(step: Callable[[], T]) -> T:
    """Run ``step`` on every rank; an error on any rank then stops every rank (none is left waiting at a merge that
    never comes). The failing rank raises its own error, the others an input error pointing to it."""
    if not is_active() or dist.get_world_size() == 1:
        return step()
    failed: Exception | None = None
    try:
        out = step()
    except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks before it is raised here
        failed, out = exc, None
    if any_rank(failed is not None):
        raise failed or InputError("another rank stopped on an error (its message is above); fix the input and rerun")
    return out  # type: ignore[return-value]
