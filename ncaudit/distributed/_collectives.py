"""Small collectives that are no-ops in one process: barriers, agreement checks, broadcasts, and ``together``
(an error on one rank stops every rank)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

import torch
import torch.distributed as dist

from ncaudit.distributed._launch import is_active
from ncaudit.errors import InputError, MirroredError


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
    never comes).

    The lowest failing rank's message reaches every rank: that rank raises its own error; rank 0, when it is not
    the one, raises the message as an :class:`~ncaudit.errors.InputError` (so it is printed once, by rank 0), and
    every other rank a quiet :class:`~ncaudit.errors.MirroredError` (exit 2, nothing printed).
    """
    if not is_active() or dist.get_world_size() == 1:
        return step()
    failed: Exception | None = None
    try:
        out = step()
    except Exception as exc:  # noqa: BLE001 - every failure must reach the other ranks before it is raised here
        failed, out = exc, None
    world, me = dist.get_world_size(), dist.get_rank()
    first = torch.tensor([me if failed is not None else world], dtype=torch.int64, device=_comm_device())
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    source = int(first.item())
    if source == world:
        return out  # type: ignore[return-value]
    text = "" if failed is None else (str(failed) if isinstance(failed, InputError)
                                      else f"{type(failed).__name__}: {failed}")
    data = broadcast_ints(list(text.encode("utf-8", "replace")) if me == source else None, src=source)
    message = bytes(data).decode("utf-8", "replace") or "a rank stopped on an error"
    if me == source and failed is not None and (me == 0 or not isinstance(failed, InputError)):
        raise failed  # its own error (a failure that is not an input error keeps its traceback on its rank)
    if me == 0:
        raise InputError(f"rank {source}: {message}")
    raise MirroredError(f"rank {source}: {message}")
