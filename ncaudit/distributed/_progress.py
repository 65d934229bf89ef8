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

import contextlib
import copy
import datetime as _dt
import os
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, Self, TypeVar

import torch
import torch.distributed as dist

from ncaudit._device import resolve_device
from ncaudit.errors import InputError
from ncaudit.cache._shards import split_rows

#: How long a collective (a barrier after uneven extraction slices included) may wait before the run fails.
DEFAULT_TIMEOUT = _dt.timedelta(minutes=60)

#: The commands that run distributed under torchrun; the others refuse to start with more than one rank.
WIRED_COMMANDS: frozenset[str] = frozenset({"extract", "report"})


# ---------------------------------------------------------------------------------------------------------------------
# Launch environment
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Launch:
    """Where this process stands in a torchrun launch (rank 0 of 1 without one)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _int_var(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None:
        if default is None:
            raise InputError(f"{name} is not set but WORLD_SIZE is: launch ncaudit with torchrun, which sets RANK, "
                             "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT")
        return default
    try:
        return int(value)
    except ValueError:
        raise InputError(f"{name}={value!r} is not an integer; launch ncaudit with torchrun") from None


def launch_env(environ: Mapping[str, str] | None = None) -> Launch:
    """Read the variables torchrun sets (RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT).

    Raises
    ------
    InputError
        Inconsistent variables, or several Slurm tasks started without torchrun (they would all write the same
        files): launch one ``torchrun`` per node instead.
    """
    env = os.environ if environ is None else environ
    if "RANK" not in env and "WORLD_SIZE" not in env:
        tasks = env.get("SLURM_STEP_NUM_TASKS", "1")
        if tasks.isdigit() and int(tasks) > 1 and "SLURM_PROCID" in env:
            raise InputError(f"started by srun as {tasks} tasks without torchrun: each would do the whole job; run "
                             "`srun --ntasks-per-node=1 torchrun --nproc_per_node=K ... -m ncaudit ...`")
        return Launch()
    world = _int_var(env, "WORLD_SIZE")
    rank = _int_var(env, "RANK")
    if world < 1 or not 0 <= rank < world:
        raise InputError(f"RANK={rank}, WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE; launch with torchrun")
    local = _int_var(env, "LOCAL_RANK", 0 if world == 1 else None)
    local_world = _int_var(env, "LOCAL_WORLD_SIZE", max(local + 1, 1))
    addr, port = env.get("MASTER_ADDR"), env.get("MASTER_PORT")
    if world > 1 and (not addr or not port):
        raise InputError("MASTER_ADDR / MASTER_PORT are not set: launch ncaudit with torchrun, which sets them")
    return Launch(rank, world, local, local_world, addr or None, _int_var(env, "MASTER_PORT") if port else None)


def check_launch(command: str, environ: Mapping[str, str] | None = None) -> None:
    """Refuse to run ``command`` with several ranks unless it is in :data:`WIRED_COMMANDS` (they would clobber files).

    Raises
    ------
    InputError
        Launched by torchrun with WORLD_SIZE > 1 for a command that runs as one process only.
    """
    launch = launch_env(environ)
    if launch.distributed and command not in WIRED_COMMANDS:
        raise InputError(f"`ncaudit {command}` runs as one process (WORLD_SIZE is {launch.world_size}): launch it "
                         "without torchrun")


def backend_for(device: torch.device) -> str:
    """NCCL for ranks on CUDA devices (when built in), gloo otherwise."""
    return "nccl" if device.type == "cuda" and dist.is_nccl_available() else "gloo"


def local_device(device: str | torch.device = "auto", launch: Launch | None = None) -> torch.device:
    """This rank's device: ``auto`` / ``cuda`` give ``cuda:LOCAL_RANK`` (``auto``: CPU without CUDA), else as given.

    Raises
    ------
    InputError
        CUDA asked for without one, or LOCAL_RANK beyond the CUDA devices this node sees.
    """
    launch = launch or launch_env()
    resolved = resolve_device(device)
    if str(device) not in ("auto", "cuda") or resolved.type != "cuda":
        return resolved  # an explicit device, or auto without CUDA
    count = torch.cuda.device_count()
    if launch.local_rank >= count:
        raise InputError(f"LOCAL_RANK {launch.local_rank} but this node sees {count} CUDA device(s): launch at most "
                         f"{count} processes per node (--nproc_per_node={count})")
    return resolve_device(f"cuda:{launch.local_rank}")


# ---------------------------------------------------------------------------------------------------------------------
# Process group
# ---------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DistContext:
    """This process in the group: rank, world size, local rank, its device and the backend (None for one process)."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def rows(self, n_rows: int) -> range:
        """This rank's contiguous slice of ``n_rows`` rows (:func:`rank_rows`)."""
        return split_rows(n_rows, self.world_size)[self.rank]


@contextlib.contextmanager
def process_group(device: str | torch.device = "auto", *,
                  timeout: _dt.timedelta = DEFAULT_TIMEOUT) -> Iterator[DistContext]:
    """Join the torchrun process group for the block (NCCL on CUDA, gloo on CPU) and leave it after.

    One process (no torchrun, or WORLD_SIZE = 1) starts no group. A group that is already initialised (by the
    caller) is used as is and left alone.

    Raises
    ------
    InputError
        The launch variables are inconsistent, the device is unavailable, or the group cannot start.
    """
    launch = launch_env()
    dev = local_device(device, launch)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not launch.distributed:
        yield DistContext(0, 1, launch.local_rank, dev, None)
        return
    if is_active():
        yield DistContext(dist.get_rank(), dist.get_world_size(), launch.local_rank, dev, dist.get_backend())
        return
    backend = backend_for(dev)
    try:
        dist.init_process_group(backend, init_method="env://", rank=launch.rank, world_size=launch.world_size,
                                timeout=timeout)
    except (RuntimeError, ValueError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise InputError(f"cannot start the {backend} process group at {launch.master_addr}:{launch.master_port} "
                         f"({first}); check that every rank reaches MASTER_ADDR:MASTER_PORT") from None
    try:
        yield DistContext(launch.rank, launch.world_size, launch.local_rank, dev, backend)
    finally:
        dist.destroy_process_group()


def is_active() -> bool:
    """Whether a process group is initialised in this process."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (from the group, else from the launch variables; 0 alone)."""
    return dist.get_rank() if is_active() else launch_env().rank


def world_size() -> int:
    """Number of ranks (from the group, else from the launch variables; 1 alone)."""
    return dist.get_world_size() if is_active() else launch_env().world_size


def is_main() -> bool:
    """Rank 0: the one that prints, joins shards and writes reports."""
    return rank() == 0


def barrier() -> None:
    """Wait until every rank gets here (no-op for one process)."""
    if is_active() and dist.get_world_size() > 1:
        dist.barrier()


def rank_rows(n_rows: int, rank_: int | None = None, world: int | None = None) -> range:
    """The contiguous rows [start, stop) of ``n_rows`` that rank ``rank_`` of ``world`` handles (default: this one).

    Slices are balanced (sizes differ by at most one) and never pad or repeat a row; concatenated in rank order they
    are exactly [0, n_rows).
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return split_rows(n_rows, world)[rank_]


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


# ---------------------------------------------------------------------------------------------------------------------
# Global progress
# ---------------------------------------------------------------------------------------------------------------------
class GlobalProgress:
    """Rows done by all ranks together, for one progress display (rank 0) with the global images/s.

    Each rank calls :meth:`advance` as it goes. With several ranks a background thread on every rank all-reduces
    (rows done, ranks finished) over a gloo group of its own every ``interval`` seconds until every rank has
    closed, so the collectives always match whatever each rank's pace, and never touch the main group. ``on_update``
    is called (from that thread) with each new global total. One process needs no thread: the total is its own.

    Parameters
    ----------
    initial
        Rows already done before this run (a resumed extraction), counted in :attr:`total`.
    interval
        Seconds between reductions.
    on_update
        Called with the global total after each reduction (e.g. ``lambda n: bar.update(task, completed=n)``).

    Notes
    -----
    Every rank must construct it at the same point (creating the gloo group is collective). :meth:`close` returns
    once every rank has closed: it acts as a barrier, after which :attr:`total` is the exact global count.
    """

    def __init__(self, initial: int = 0, *, interval: float = 0.5,
                 on_update: Callable[[int], None] | None = None) -> None:
        self.initial = initial
        self.interval = interval
        self.on_update = on_update
        self._local = 0
        self._global = 0
        self._closing = False
        self._error: BaseException | None = None
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._world = dist.get_world_size() if is_active() else 1
        if self._world > 1:
            self._group = dist.new_group(backend="gloo")
            self._thread = threading.Thread(target=self._run, name="ncaudit-progress", daemon=True)
            self._thread.start()

    def advance(self, n: int) -> None:
        """Count ``n`` more rows done by this rank."""
        self._local += n
        if self._world == 1 and self.on_update is not None:
            self.on_update(self.total)

    @property
    def local(self) -> int:
        """Rows this rank has done in this run."""
        return self._local

    @property
    def total(self) -> int:
        """Rows done by all ranks (as of the last reduction), plus ``initial``."""
        return self.initial + (self._global if self._world > 1 else self._local)

    def _run(self) -> None:
        try:
            while True:
                finished = self._closing  # read before the count: a rank that has closed reports its final count
                counts = torch.tensor([self._local, int(finished)], dtype=torch.int64)
                dist.all_reduce(counts, group=self._group)
                self._global = int(counts[0])
                if self.on_update is not None:
                    self.on_update(self.total)
                if int(counts[1]) == self._world:
                    return
                self._wake.wait(self.interval)
        except Exception as exc:  # noqa: BLE001 - any error (a peer died) is handed to close()
            self._error = exc

    def close(self) -> None:
        """Report this rank finished and wait for every rank (then :attr:`total` is final)."""
        self._closing = True
        self._wake.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self._error is None:
                dist.destroy_process_group(self._group)
        if self._error is not None:
            raise RuntimeError(f"progress reduction failed: {self._error}") from self._error

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
