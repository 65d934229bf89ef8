"""Launch detection (what ``torchrun`` sets), the process group, and each rank's contiguous rows."""

from __future__ import annotations

import contextlib
import datetime as _dt
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ncaudit._device import resolve_device
from ncaudit.cache._shards import split_rows
from ncaudit.errors import InputError

if TYPE_CHECKING:
    import torch

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
    import torch.distributed as dist

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
    import torch

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
    import torch
    import torch.distributed as dist

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
    """Whether a process group is initialised in this process (none can be before torch is imported)."""
    if "torch" not in sys.modules:
        return False
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (from the group, else from the launch variables; 0 alone)."""
    if is_active():
        import torch.distributed as dist

        return dist.get_rank()
    return launch_env().rank


def world_size() -> int:
    """Number of ranks (from the group, else from the launch variables; 1 alone)."""
    if is_active():
        import torch.distributed as dist

        return dist.get_world_size()
    return launch_env().world_size


def is_main() -> bool:
    """Rank 0: the one that prints, joins shards and writes reports."""
    return rank() == 0


def rank_rows(n_rows: int, rank_: int | None = None, world: int | None = None) -> range:
    """The contiguous rows [start, stop) of ``n_rows`` that rank ``rank_`` of ``world`` handles (default: this one).

    Slices are balanced (sizes differ by at most one) and never pad or repeat a row; concatenated in rank order they
    are exactly [0, n_rows).
    """
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    return split_rows(n_rows, world)[rank_]
