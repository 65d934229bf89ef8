"""Shard planning: any sequence of interrupted runs with any world sizes covers every row exactly once."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ncaudit.cache import CacheWriter, FeatureCache, join_shards
from ncaudit.cache._shards import (
    ShardSpec,
    ShardState,
    join_pieces,
    parse_shard_path,
    plan,
    scan_shards,
    shard_path,
    split_rows,
)
from ncaudit.errors import InputError


@given(st.integers(0, 10_000), st.integers(1, 64))
def test_split_rows_is_a_balanced_contiguous_partition(n, world):
    parts = split_rows(n, world)
    assert len(parts) == world
    assert [r for part in parts for r in part] == list(range(n))
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    assert sizes == sorted(sizes, reverse=True)


def test_split_rows_rejects_bad_worlds():
    with pytest.raises(ValueError):
        split_rows(10, 0)
    with pytest.raises(ValueError):
        split_rows(-1, 2)


def test_fresh_plan_is_one_contiguous_shard_per_rank():
    p = plan(10, 3)
    assert p.assignments == ((ShardSpec(0, 4),), (ShardSpec(4, 7),), (ShardSpec(7, 10),))
    assert p.kept == () and p.stale == () and p.n_todo == 10 and p.n_done == 0
    assert plan(2, 4).assignments == ((ShardSpec(0, 1),), (ShardSpec(1, 2),), (), ())


def test_resume_with_another_world_size():
    """4 ranks interrupted; 3 ranks resume: kept rows stay, the gaps are split evenly in row order."""
    existing = [ShardState(0, 25, 25), ShardState(25, 50, 10), ShardState(50, 75, 0), ShardState(75, 100, 20)]
    p = plan(100, 3, existing)
    assert [s.start for s in p.kept] == [0, 25, 75]
    assert p.stale == (ShardState(50, 75, 0),)
    # Uncovered: 35..75 (40 rows) and 95..100 (5 rows) = 45 rows, 15 per rank.
    assert p.assignments == ((ShardSpec(35, 50),), (ShardSpec(50, 65),), (ShardSpec(65, 75), ShardSpec(95, 100)))
    assert p.rows_of(2) == [range(65, 75), range(95, 100)]
    assert p.n_todo == 45 and p.n_done == 55


def test_nothing_left_to_do():
    p = plan(30, 2, [ShardState(0, 20, 20), ShardState(20, 30, 10)])
    assert p.n_todo == 0 and p.assignments == ((), ())
    assert [s.start for s in join_pieces(30, p.kept)] == [0, 20]


def test_bad_shards_are_refused():
    with pytest.raises(InputError, match="reaches row 120"):
        plan(100, 2, [ShardState(50, 120, 3)])
    with pytest.raises(InputError, match="both hold rows"):
        plan(100, 2, [ShardState(0, 50, 30), ShardState(20, 60, 5)])
    with pytest.raises(InputError, match="inconsistent"):
        plan(100, 2, [ShardState(0, 10, 11)])
    with pytest.raises(InputError, match="rows are in no shard"):
        join_pieces(100, [ShardState(0, 50, 50), ShardState(50, 100, 49)])


@st.composite
def runs(draw):
    """A dataset size and a sequence of runs: (world size, per new shard the fraction written before the crash)."""
    n = draw(st.integers(0, 300))
    align = draw(st.sampled_from([1, 1, 7, 64]))
    k = draw(st.integers(1, 6))
    sequence = []
    for _ in range(k):
        world = draw(st.integers(1, 9))
        fractions = draw(st.lists(st.sampled_from([0.0, 0.3, 0.5, 0.99, 1.0, 1.0]), min_size=20, max_size=20))
        remove_stale = draw(st.booleans())
        sequence.append((world, fractions, remove_stale))
    return n, align, sequence


@settings(max_examples=200, deadline=None)
@given(runs())
def test_any_sequence_of_interruptions_covers_every_row_once(case):
    n, align, sequence = case
    files: dict[tuple[int, int], ShardState] = {}  # the directory: file name (start, stop) -> state
    for world, fractions, remove_stale in sequence + [(3, [1.0] * 20, True)]:  # a last run that completes
        p = plan(n, world, files.values(), align=align)
        kept_names = {(s.start, s.stop) for s in p.kept}
        new = [spec for specs in p.assignments for spec in specs]
        # The plan: kept rows and new shards partition [0, n) exactly, in row order, balanced over ranks.
        rows = sorted([r for s in p.kept for r in s.covered] + [r for spec in new for r in spec.rows])
        assert rows == list(range(n))
        sizes = [sum(len(r) for r in p.rows_of(rank)) for rank in range(world)]
        assert max(sizes) - min(sizes) <= 1 + 2 * (align - 1)  # balanced, up to the alignment of the boundaries
        gap_starts = {s.start + s.n_written for s in p.kept} | {0}
        for specs in p.assignments[1:]:
            if specs:  # a rank's part starts on a multiple of align, or where a kept shard's rows end
                assert specs[0].start % align == 0 or specs[0].start in gap_starts
        assert all(spec.stop > spec.start for spec in new)
        # One writer per file: new names are distinct and never those of kept shards.
        names = [(spec.start, spec.stop) for spec in new]
        assert len(set(names)) == len(names) and not set(names) & kept_names
        flat = [spec.start for specs in p.assignments for spec in specs]
        assert flat == sorted(flat)  # rank order is row order
        if remove_stale:
            for s in p.stale:
                del files[(s.start, s.stop)]
        # Run: each new shard is created (replacing a stale file of that name) and written up to a fraction.
        for i, spec in enumerate(new):
            size = spec.stop - spec.start
            files[(spec.start, spec.stop)] = ShardState(spec.start, spec.stop, int(fractions[i % 20] * size))
    pieces = join_pieces(n, files.values())
    joined = [r for s in pieces for r in s.covered]
    assert joined == list(range(n))  # every row exactly once, in order


def test_shard_names_round_trip(tmp_path):
    out = tmp_path / "feats.v1.h5"
    path = shard_path(out, 1_280_000, 1_281_167)
    assert path.parent == tmp_path and path.name == "feats.v1.rows-000001280000-000001281167.h5"
    assert parse_shard_path(out, path) == (1_280_000, 1_281_167)
    assert parse_shard_path(out, tmp_path / "feats.v1.h5") is None
    assert parse_shard_path(out, tmp_path / "other.rows-000000000000-000000000001.h5") is None


def _write_shard(out, start, stop, n_written, h, y, weight):
    writer = CacheWriter(shard_path(out, start, stop), n_samples=stop - start, n_features=h.shape[1], num_classes=3,
                         weight=weight, store_logits=False, chunk_rows=4)
    with writer:
        for i in range(start, start + n_written, 4):
            j = min(i + 4, start + n_written)
            writer.write(h[i:j], y[i:j])
        if n_written == stop - start:
            writer.finish()


def test_resumed_shards_join_into_the_same_rows(tmp_path):
    """2 ranks interrupted, 3 ranks resume: the joined cache (partial pieces included) equals the dataset."""
    rng = np.random.default_rng(0)
    n = 37
    h, y = rng.standard_normal((n, 5)).astype(np.float32), rng.integers(0, 3, n)
    weight = rng.standard_normal((3, 5)).astype(np.float32)
    out = tmp_path / "cache.h5"
    first = plan(n, 2)
    for specs, written in zip(first.assignments, (11, 0)):  # rank 0 wrote 11 rows, rank 1 none
        for spec in specs:
            _write_shard(out, spec.start, spec.stop, written, h, y, weight)
    (tmp_path / "unrelated.rows-000000000000-000000000005.h5").write_bytes(b"not ours")
    states = scan_shards(out)
    assert [(s.start, s.stop, s.n_written) for s in states] == [(0, 19, 11), (19, 37, 0)]
    second = plan(n, 3, states)
    assert [s.path for s in second.stale] == [shard_path(out, 19, 37)]
    for s in second.stale:
        s.path.unlink()
    for specs in second.assignments:
        for spec in specs:
            _write_shard(out, spec.start, spec.stop, spec.stop - spec.start, h, y, weight)
    pieces = join_pieces(n, scan_shards(out))
    joined = join_shards(out, [s.path for s in pieces], allow_partial=True)
    with FeatureCache(joined) as cache:
        assert cache.info.n_samples == n and cache.info.complete
        rows = list(cache.iter_batches(5, prefetch=False))
        np.testing.assert_array_equal(np.concatenate([x for _, x, _, _ in rows]), h)
        np.testing.assert_array_equal(np.concatenate([lab for _, _, lab, _ in rows]), y)
        part = list(cache.iter_batches(4, rows=range(10, 23), prefetch=False))
        assert [start for start, *_ in part] == [10, 14, 18, 22]
        np.testing.assert_array_equal(np.concatenate([x for _, x, _, _ in part]), h[10:23])
    with pytest.raises(InputError, match="incomplete"):
        join_shards(tmp_path / "strict.h5", [s.path for s in pieces])  # partial pieces need allow_partial


def test_scan_refuses_a_shard_whose_size_disagrees_with_its_name(tmp_path):
    out = tmp_path / "c.h5"
    rng = np.random.default_rng(1)
    h, y = rng.standard_normal((8, 2)).astype(np.float32), rng.integers(0, 3, 8)
    _write_shard(out, 0, 8, 8, h, y, None)
    shard_path(out, 0, 8).rename(shard_path(out, 0, 9))
    with pytest.raises(InputError, match="its name says 9"):
        scan_shards(out)
    shard_path(out, 0, 9).write_bytes(b"garbage")
    with pytest.raises(InputError, match="unreadable shard"):
        scan_shards(out)
