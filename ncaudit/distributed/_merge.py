"""Exact merges of accumulator states across ranks, in rank order, sent as tensors (no pickles)."""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping
from typing import Any, Protocol, TypeVar

import torch
import torch.distributed as dist

from ncaudit.distributed._collectives import _comm_device, all_equal
from ncaudit.distributed._launch import is_active


# ---------------------------------------------------------------------------------------------------------------------
# Exact merge of accumulator states
# ---------------------------------------------------------------------------------------------------------------------
class Mergeable(Protocol):
    """What :func:`merge_states` needs of an accumulator (both of :mod:`ncaudit.stats` have it)."""

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Any: ...

    def merge(self, other: Any) -> Any: ...

    def reset(self) -> None: ...


A = TypeVar("A", bound=Mergeable)


def spawn(acc: A) -> A:
    """An empty twin of ``acc``: same shape, constants and options, no state tensor shared with it.

    A shallow copy whose :meth:`reset` gives it fresh state tensors (the constants, e.g. the class means of a
    ``SampleDecisions``, are shared read-only).
    """
    twin = copy.copy(acc)
    twin.reset()
    return twin


def _to_wire(t: torch.Tensor, dev: torch.device) -> torch.Tensor:
    """A contiguous 1-D copy for the wire (bool as uint8: not every backend moves bool)."""
    t = t.to(torch.uint8) if t.dtype == torch.bool else t
    return t.reshape(-1).to(dev).contiguous()


def _from_wire(buf: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return buf.reshape(like.shape).to("cpu", like.dtype)


def _empty_wire(like: torch.Tensor, dev: torch.device) -> torch.Tensor:
    dtype = torch.uint8 if like.dtype == torch.bool else like.dtype
    return torch.empty(like.numel(), dtype=dtype, device=dev)


def _layout(state: Mapping[str, torch.Tensor]) -> list[int]:
    """Names, shapes and dtypes of a state as integers (to check that every rank holds the same kind of state)."""
    out = [len(state)]
    for name in sorted(state):
        t = state[name]
        out += [sum(map(ord, name)), t.ndim, *t.shape, t.element_size(), int(t.is_floating_point())]
    return out


def merge_states(acc: A, *, everywhere: bool = True) -> A:
    """Replace ``acc``'s state by the merge of every rank's state, in rank order (exact); return ``acc``.

    Parameters
    ----------
    acc
        This rank's accumulator (its rows: this rank's contiguous slice).
    everywhere
        Every rank ends with the merged state (True: e.g. pass 1 before pass 2 needs the class means everywhere);
        False: only rank 0 does, the others keep their own.

    Notes
    -----
    A binary tree in rank order: at level s, rank r (r multiple of 2s) receives the merged state of ranks
    [r + s, r + 2s) and merges it into its own (ranks [r, r + s)), so rank 0 ends with the states of ranks
    0, 1, ..., W-1 concatenated in that order, after log2(W) rounds holding two states at a time; rank 0 then
    broadcasts it. ``merge`` is exact algebra (sums, and ``ClassStatistics``' re-expression of the other state
    around this one's shifts), and a class keeps the shift of its first sample in rank order as one process would,
    so the result equals one process's accumulation of the same rows in the same order to rounding. Tensors travel
    with send / recv / broadcast of known shapes (checked first on every rank): no pickles.

    Raises
    ------
    ValueError
        The ranks hold accumulators of different kinds or shapes.
    """
    if not is_active() or dist.get_world_size() == 1:
        return acc
    r, w = dist.get_rank(), dist.get_world_size()
    dev = _comm_device()
    template = acc.state_dict()
    names = sorted(template)
    if not all_equal(_layout(template)):
        raise ValueError("the ranks hold accumulators of different kinds or shapes; every rank must build the same one")
    total = spawn(acc).load_state_dict(template)
    step = 1
    while step < w:
        if r % (2 * step):  # this rank's block is merged into the block on its left: send it and stop
            state = total.state_dict()
            for name in names:
                dist.send(_to_wire(state[name], dev), r - step)
            break
        if r + step < w:
            received = {}
            for name in names:
                buf = _empty_wire(template[name], dev)
                dist.recv(buf, r + step)
                received[name] = _from_wire(buf, template[name])
            total.merge(spawn(acc).load_state_dict(received))
        step *= 2
    if everywhere:
        state = total.state_dict() if r == 0 else template
        merged = {}
        for name in names:
            buf = _to_wire(state[name], dev) if r == 0 else _empty_wire(template[name], dev)
            dist.broadcast(buf, 0)
            merged[name] = _from_wire(buf, template[name])
        acc.load_state_dict(merged)
    elif r == 0:
        acc.load_state_dict(total.state_dict())
    return acc


def merge_all(accs: Iterable[Mergeable | None], *, everywhere: bool = True) -> None:
    """:func:`merge_states` of every accumulator given (None entries are skipped), in the same order on every rank."""
    for acc in accs:
        if acc is not None:
            merge_states(acc, everywhere=everywhere)
