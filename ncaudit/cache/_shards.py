"""Shard planning for a distributed (or resumed) extraction: which rows each rank writes, into which file.

A multi-rank ``extract`` writes its rows into shard files beside ``--out``, named by the rows they were created for:
``<stem>.rows-<start>-<stop>.h5`` holds rows [start, stop) of the dataset, written in order from ``start``; its
``n_written`` attribute says how far it got. Naming shards by rows rather than by rank lets an interrupted run resume
with any number of ranks, losing and duplicating nothing:

* every existing shard keeps what it has written, rows [start, start + n_written), and is never written again;
* the rows that no shard covers are split into ``world`` contiguous, balanced parts (in row order), and each rank
  writes its part into new shard files, one per gap it touches, so a file is only ever appended by the one rank
  that created it;
* shards with nothing written cover nothing: they are stale (removed, or overwritten by a new shard of that name).

Once every row is covered, :func:`join_pieces` lists the pieces in row order for :func:`ncaudit.cache.join_shards`
(``allow_partial=True``: a kept partial shard contributes its first ``n_written`` rows).

Everything here is pure except :func:`shard_files`, :func:`remove_shards`, :func:`scan_shards` and
:func:`read_shard`, which list, delete or read the shard files on disk.
"""

from __future__ import annotations

import itertools
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import h5py

from ncaudit._validate import regular_file
from ncaudit.errors import InputError

_DIGITS = 12


def split_rows(n_rows: int, world: int) -> list[range]:
    """``world`` contiguous ranges covering [0, n_rows) in order, sizes differing by at most one (larger first).

    Never pads or repeats a row (unlike ``DistributedSampler``): every row belongs to exactly one part.
    """
    if world < 1:
        raise ValueError(f"world size must be at least 1, got {world}")
    if n_rows < 0:
        raise ValueError(f"n_rows must be non-negative, got {n_rows}")
    base, extra = divmod(n_rows, world)
    bounds = [r * base + min(r, extra) for r in range(world + 1)]
    return [range(bounds[r], bounds[r + 1]) for r in range(world)]


def shard_path(out: str | os.PathLike[str], start: int, stop: int) -> Path:
    """The shard file beside ``out`` for rows [start, stop): ``<stem>.rows-<start>-<stop>.h5`` (zero-padded)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.rows-{start:0{_DIGITS}d}-{stop:0{_DIGITS}d}.h5")


def parse_shard_path(out: str | os.PathLike[str], path: str | os.PathLike[str]) -> tuple[int, int] | None:
    """``(start, stop)`` when ``path`` is a shard file name of ``out``, else None."""
    stem = re.escape(Path(out).stem)
    match = re.fullmatch(rf"{stem}\.rows-(\d+)-(\d+)\.h5", Path(path).name)
    if match is None:
        return None
    return int(match.group(1)), int(match.group(2))


@dataclass(frozen=True)
class ShardState:
    """An existing shard file: created for rows [start, stop), of which the first ``n_written`` are on disk."""

    start: int
    stop: int
    n_written: int
    path: Path | None = None

    @property
    def covered(self) -> range:
        """The dataset rows this shard holds: [start, start + n_written)."""
        return range(self.start, self.start + self.n_written)

    @property
    def complete(self) -> bool:
        return self.n_written == self.stop - self.start

    def _where(self) -> str:
        return str(self.path) if self.path is not None else f"shard rows {self.start}-{self.stop}"


@dataclass(frozen=True)
class ShardSpec:
    """A shard to create and fill, rows [start, stop), by one rank."""

    start: int
    stop: int

    @property
    def rows(self) -> range:
        return range(self.start, self.stop)

    def path(self, out: str | os.PathLike[str]) -> Path:
        return shard_path(out, self.start, self.stop)


@dataclass(frozen=True)
class ShardPlan:
    """What a run with ``world`` ranks does to finish ``n_rows`` rows.

    Attributes
    ----------
    kept : shards whose written rows are kept as they are (never written again), in row order.
    assignments : per rank, the new shards it creates and fills, in row order (empty when nothing is left for it).
    stale : existing shards with nothing written; remove them before writing (a new shard may reuse the name).
    """

    n_rows: int
    world: int
    kept: tuple[ShardState, ...]
    assignments: tuple[tuple[ShardSpec, ...], ...]
    stale: tuple[ShardState, ...]

    def rows_of(self, rank: int) -> list[range]:
        """The rows rank ``rank`` computes, one range per shard it writes."""
        return [spec.rows for spec in self.assignments[rank]]

    @property
    def n_todo(self) -> int:
        """Rows left to compute, over all ranks."""
        return sum(spec.stop - spec.start for specs in self.assignments for spec in specs)

    @property
    def n_done(self) -> int:
        """Rows already on disk (in kept shards)."""
        return sum(state.n_written for state in self.kept)


def _checked(n_rows: int, existing: Iterable[ShardState]) -> list[ShardState]:
    """The shards with rows written, in row order, after checking they fit [0, n_rows) and do not overlap."""
    states = list(existing)
    for s in states:
        if not (0 <= s.start < s.stop and 0 <= s.n_written <= s.stop - s.start):
            raise InputError(f"{s._where()}: inconsistent shard (rows {s.start}-{s.stop}, {s.n_written} written); "
                             "remove it or start again with --overwrite")
        if s.stop > n_rows:
            raise InputError(f"{s._where()}: the shard reaches row {s.stop} but this run has {n_rows} rows; resume "
                             "with the same data and --limit, or start again with --overwrite")
    written = sorted((s for s in states if s.n_written > 0), key=lambda s: s.start)
    for a, b in itertools.pairwise(written):
        if b.start < a.start + a.n_written:
            raise InputError(f"{a._where()} and {b._where()} both hold rows from {b.start}: shards of different runs "
                             "are mixed; remove the stray one or start again with --overwrite")
    return written


def _gaps(n_rows: int, written: Sequence[ShardState]) -> list[range]:
    """The rows of [0, n_rows) that no written shard covers, as ranges in order."""
    gaps, pos = [], 0
    for s in written:
        if s.start > pos:
            gaps.append(range(pos, s.start))
        pos = max(pos, s.start + s.n_written)
    if pos < n_rows:
        gaps.append(range(pos, n_rows))
    return gaps


def _pieces(gaps: Sequence[range], first: int, last: int) -> tuple[ShardSpec, ...]:
    """The rows at positions [first, last) of the concatenated gaps, as one spec per gap touched."""
    specs, offset = [], 0
    for gap in gaps:
        lo, hi = max(first - offset, 0), min(last - offset, len(gap))
        if lo < hi:
            specs.append(ShardSpec(gap.start + lo, gap.start + hi))
        offset += len(gap)
    return tuple(specs)


def _aligned(gaps: Sequence[range], position: int, align: int) -> int:
    """The position (in the concatenated gaps) of the row at ``position`` rounded down to a multiple of ``align``,
    but not before the start of its gap."""
    offset = 0
    for gap in gaps:
        if position < offset + len(gap):
            row = gap.start + position - offset
            return offset + max(row - row % align, gap.start) - gap.start
        offset += len(gap)
    return position


def plan(n_rows: int, world: int, existing: Iterable[ShardState] = (), *, align: int = 1) -> ShardPlan:
    """Assign the rows of [0, n_rows) that no existing shard holds to ``world`` ranks.

    Parameters
    ----------
    n_rows
        Rows of the dataset (after ``--limit``).
    world
        Ranks of this run.
    existing
        Shards already on disk (:func:`scan_shards`), possibly from runs with other world sizes.
    align
        Parts start on dataset rows that are multiples of ``align`` (or on the start of a gap): with the batch size
        here, every rank's batches hold the same rows as one process's would, so the features come out bit for bit
        the same (some kernels depend on the batch's size).

    Returns
    -------
    ShardPlan
        Existing shards keep their first ``n_written`` rows; the uncovered rows, in order, are split into ``world``
        contiguous parts of balanced size; rank r's part becomes one new shard per gap it touches. A new shard never
        has the name of a kept one (it starts on a row that no kept shard holds, and names carry the start row).

    Raises
    ------
    InputError
        A shard outside [0, n_rows), inconsistent, or overlapping another (shards of different runs mixed).
    """
    if world < 1:
        raise ValueError(f"world size must be at least 1, got {world}")
    states = list(existing)
    written = _checked(n_rows, states)
    gaps = _gaps(n_rows, written)
    parts = split_rows(sum(len(g) for g in gaps), world)
    bounds = [0] + [_aligned(gaps, part.start, max(1, align)) for part in parts[1:]] + [parts[-1].stop]
    bounds = [max(bounds[:i + 1]) for i in range(len(bounds))]  # rounding down keeps them in order; make sure
    assignments = tuple(_pieces(gaps, lo, hi) for lo, hi in itertools.pairwise(bounds))
    stale = tuple(sorted((s for s in states if s.n_written == 0), key=lambda s: (s.start, s.stop)))
    return ShardPlan(n_rows, world, tuple(written), assignments, stale)


def join_pieces(n_rows: int, states: Iterable[ShardState]) -> list[ShardState]:
    """The shards to join, in row order, once their written rows cover [0, n_rows) exactly once.

    Shards with nothing written are left out. Pass ``[s.path for s in pieces]`` to
    :func:`ncaudit.cache.join_shards` with ``allow_partial=True``.

    Raises
    ------
    InputError
        Some rows are held by no shard (a rank did not finish: rerun with ``--resume``), or by two.
    """
    written = _checked(n_rows, states)
    gaps = _gaps(n_rows, written)
    if gaps:
        missing = sum(len(g) for g in gaps)
        raise InputError(f"{missing} of {n_rows} rows are in no shard (first missing: rows {gaps[0].start}-"
                         f"{gaps[0].stop}); a rank did not finish: rerun extract with --resume")
    return written


def shard_files(out: str | os.PathLike[str]) -> list[Path]:
    """The entries beside ``out`` named as its shard files, in directory order (names only: nothing is read)."""
    out = Path(out)
    parent = out.parent if str(out.parent) else Path(".")
    if not parent.is_dir():
        return []
    return [entry for entry in parent.iterdir() if parse_shard_path(out, entry) is not None]


def remove_shards(out: str | os.PathLike[str]) -> None:
    """Delete the shard files of ``out`` (damaged ones too: nothing is read).

    Raises
    ------
    InputError
        An entry named as a shard that cannot be deleted (e.g. a directory).
    """
    for path in shard_files(out):
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise InputError(f"{path}: cannot remove this shard of {Path(out).name} ({exc.strerror or exc}); "
                             "remove it yourself, then rerun") from None


def read_shard(path: str | os.PathLike[str], start: int, stop: int) -> ShardState:
    """The state of the shard file ``path`` created for rows [start, stop): the rows it has written.

    Raises
    ------
    InputError
        The file cannot be read, or its size disagrees with [start, stop).
    """
    path = Path(path)
    regular_file(path, "a shard file")  # a FIFO named as a shard would block the open
    try:
        with h5py.File(path, "r", locking=False) as f:
            n_file = int(f["features"].shape[0]) if "features" in f else -1
            complete = bool(f.attrs.get("complete", False))
            n_written = n_file if complete else int(f.attrs.get("n_written", 0))
    except (OSError, KeyError, ValueError, TypeError) as exc:
        raise InputError(f"{path}: unreadable shard file ({str(exc).splitlines()[0] if str(exc) else exc}); "
                         "remove it to recompute its rows") from None
    if n_file != stop - start or not 0 <= n_written <= n_file:
        raise InputError(f"{path}: the shard holds {n_file} rows ({n_written} written) but its name says "
                         f"{stop - start}; remove it to recompute its rows")
    return ShardState(start, stop, n_written, path)


def scan_shards(out: str | os.PathLike[str]) -> list[ShardState]:
    """The shard files of ``out`` on disk (beside it), with the rows each has written, in row order.

    Raises
    ------
    InputError
        A shard file that cannot be read, or whose size disagrees with its name.
    """
    states = [read_shard(entry, *parse_shard_path(out, entry)) for entry in shard_files(out)]  # type: ignore[misc]
    return sorted(states, key=lambda s: (s.start, s.stop))
