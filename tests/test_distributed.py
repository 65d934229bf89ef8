"""ncaudit.distributed: launch detection, one-process fallbacks, and 2 CPU ranks on gloo merging exactly.

The 2-rank checks run ``tests/dist_worker.py`` once under ``python -m torch.distributed.run --standalone
--nproc_per_node=2`` (a free port, one process per rank) and compare every rank's merged result with one process
accumulating the same rows in the same order. They skip, saying why, when the gloo group cannot start here.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dist_worker as w
import numpy as np
import pytest
import torch
from typer.testing import CliRunner

from ncaudit import distributed as nd
from ncaudit import metrics
from ncaudit.cli import app
from ncaudit.distributed import _launch as nd_launch
from ncaudit.errors import InputError
from ncaudit.stats import ClassStatistics

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "node0",
            "MASTER_PORT": "29500"}


# ---------------------------------------------------------------------------------------------------------------------
# Launch environment and one-process behaviour (in this process)
# ---------------------------------------------------------------------------------------------------------------------
def test_launch_env_reads_torchrun_variables():
    assert nd.launch_env({}) == nd.Launch()
    launch = nd.launch_env(TORCHRUN)
    assert launch == nd.Launch(1, 4, 1, 2, "node0", 29500) and launch.distributed
    assert nd.launch_env({"RANK": "0", "WORLD_SIZE": "1"}) == nd.Launch()


@pytest.mark.parametrize("env, message", [
    ({**TORCHRUN, "RANK": "4"}, "0 <= RANK < WORLD_SIZE"),
    ({**TORCHRUN, "WORLD_SIZE": "two"}, "not an integer"),
    ({k: v for k, v in TORCHRUN.items() if k != "RANK"}, "RANK is not set"),
    ({k: v for k, v in TORCHRUN.items() if k != "LOCAL_RANK"}, "LOCAL_RANK is not set"),
    ({k: v for k, v in TORCHRUN.items() if k != "MASTER_PORT"}, "MASTER_ADDR / MASTER_PORT"),
    ({"SLURM_PROCID": "0", "SLURM_STEP_NUM_TASKS": "8"}, "without torchrun"),
])
def test_launch_env_refuses_inconsistent_launches(env, message):
    with pytest.raises(InputError, match=message):
        nd.launch_env(env)


def test_commands_not_wired_refuse_several_ranks(monkeypatch):
    nd.check_launch("trajectory", {})
    nd.check_launch("report", TORCHRUN)
    with pytest.raises(InputError, match="runs as one process"):
        nd.check_launch("trajectory", TORCHRUN)
    monkeypatch.setattr(nd_launch, "WIRED_COMMANDS", frozenset({"trajectory"}))
    nd.check_launch("trajectory", TORCHRUN)
    with pytest.raises(InputError):
        nd.check_launch("demo", TORCHRUN)


def test_cli_refuses_an_unwired_command_under_torchrun(tmp_path):
    result = CliRunner().invoke(app, ["trajectory", str(tmp_path / "x.h5")], env=TORCHRUN)
    assert result.exit_code == 2
    assert "runs as one process" in result.output


def test_devices(monkeypatch):
    assert nd.local_device("cpu") == torch.device("cpu")
    assert nd.backend_for(torch.device("cpu")) == "gloo"
    if not torch.cuda.is_available():
        assert nd.local_device("auto", nd.Launch(1, 2, 1)) == torch.device("cpu")
        with pytest.raises(InputError, match="no CUDA device"):
            nd.local_device("cuda")
    else:
        assert nd.local_device("auto", nd.Launch(0, 1, 0)) == torch.device("cuda:0")
        with pytest.raises(InputError, match="processes per node"):
            nd.local_device("cuda", nd.Launch(0, 2, torch.cuda.device_count()))


def test_one_process_needs_no_group(monkeypatch):
    for key in TORCHRUN:
        monkeypatch.delenv(key, raising=False)
    with nd.process_group("cpu") as ctx:
        assert (ctx.rank, ctx.world_size, ctx.backend, ctx.is_main, ctx.distributed) == (0, 1, None, True, False)
        assert ctx.rows(10) == range(10)
        assert (nd.rank(), nd.world_size(), nd.is_main()) == (0, 1, True)
        nd.barrier()
        assert nd.all_equal([1, 2]) and nd.broadcast_ints([5, 6]) == [5, 6]
        assert nd.any_rank(True) and not nd.any_rank(False)
        acc = ClassStatistics(3, 2)
        acc.update(np.ones((4, 2)), np.array([0, 1, 2, 0]))
        before = acc.state_dict()
        assert nd.merge_states(acc) is acc
        assert all(torch.equal(before[k], v) for k, v in acc.state_dict().items())
        seen = []
        with nd.GlobalProgress(initial=3, on_update=seen.append) as progress:
            progress.advance(4)
            progress.advance(5)
        assert progress.total == 12 and seen == [7, 12] and progress.local == 9


def test_rank_rows_are_contiguous_and_never_padded():
    parts = [nd.rank_rows(10, r, 4) for r in range(4)]
    assert parts == [range(3), range(3, 6), range(6, 8), range(8, 10)]
    assert nd.rank_rows(3, 3, 4) == range(3, 3)  # more ranks than rows: empty slices, no duplicates


def test_spawn_is_an_independent_empty_twin():
    rng = np.random.default_rng(0)
    acc = ClassStatistics(3, 4, normalize=True)
    acc.update(rng.standard_normal((10, 4)), rng.integers(0, 3, 10))
    before = {k: v.clone() for k, v in acc.state_dict().items()}
    twin = nd.spawn(acc)
    assert (twin.num_classes, twin.num_features, twin.normalize) == (3, 4, True)
    assert float(twin.count.sum()) == 0.0
    twin.update(rng.standard_normal((5, 4)), rng.integers(0, 3, 5))
    assert all(torch.equal(before[k], v) for k, v in acc.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------------
# Two ranks on gloo
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run tests/dist_worker.py on 2 CPU ranks once; the per-rank results (skip when gloo cannot start here)."""
    out = tmp_path_factory.mktemp("dist")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"), os.environ.get("PYTHONPATH",
                                                                                                       "")]),
           "OMP_NUM_THREADS": "1"}
    for key in TORCHRUN:
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_worker.py"), str(out)]
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    except subprocess.TimeoutExpired:
        pytest.fail("the 2-rank run did not finish in 300 s")
    log = (run.stdout + run.stderr).strip()
    if not all((out / f"started.{r}").exists() for r in (0, 1)):
        last = log.splitlines()[-3:] if log else ["no output"]
        pytest.skip("the gloo process group could not start in this environment: " + " | ".join(last))
    assert run.returncode == 0, log[-4000:]
    ranks = [dict(np.load(out / f"rank{r}.npz")) for r in (0, 1)]
    metas = [json.loads((out / f"meta{r}.json").read_text()) for r in (0, 1)]
    return ranks, metas


def one_process(kind: str) -> dict[str, np.ndarray]:
    """The same rows accumulated by one process, in the same order and batches."""
    h, y = w.dataset(kind)
    rows = range(len(y))
    stats = w.accumulate(h, y, rows).compute()
    geo = metrics.pair_geometry(stats.centred_means, variances=stats.variances)
    return w.summary(stats, w.decide(stats, h, y, rows), geo)


def rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.max(np.abs(np.asarray(a, float) - b)) / max(np.max(np.abs(b)), np.finfo(float).tiny))


@pytest.mark.parametrize("kind, tol", [("f64_sorted", 1e-10), ("f64_shuffled", 1e-10), ("f32_shuffled", 1e-7)])
def test_two_ranks_merge_to_the_one_process_statistics(two_ranks, kind, tol):
    ranks, _ = two_ranks
    ref = one_process(kind)
    for r, got in enumerate(ranks):
        np.testing.assert_array_equal(got[f"{kind}/counts"], ref["counts"])
        for key in ("means", "centred_means", "sigma_w", "variances"):
            assert rel(got[f"{kind}/{key}"], ref[key]) <= tol, (r, key, rel(got[f"{kind}/{key}"], ref[key]))
        for key in ("cdnv", "equiangle", "maxangle", "orthogonality"):
            i = ("cdnv", "equiangle", "maxangle", "orthogonality").index(key)
            assert rel(got[f"{kind}/pairs"][i], ref["pairs"][i]) <= tol, (r, key)
    for key in ("means", "sigma_w", "variances"):  # rank 0 broadcast the merged state: both ranks hold the same bits
        np.testing.assert_array_equal(ranks[0][f"{kind}/{key}"], ranks[1][f"{kind}/{key}"])


@pytest.mark.parametrize("kind, tol", [("f64_sorted", 1e-10), ("f64_shuffled", 1e-10), ("f32_shuffled", 1e-7)])
def test_two_ranks_merge_to_the_one_process_decisions(two_ranks, kind, tol):
    ranks, _ = two_ranks
    ref = one_process(kind)
    got = ranks[0]  # everywhere=False: the total is on rank 0
    for key in ("dec_counts", "correct", "ncc_correct", "disagree"):
        np.testing.assert_array_equal(got[f"{kind}/{key}"], ref[key])
    assert rel(got[f"{kind}/squared_error"], ref["squared_error"]) <= tol
    assert rel(got[f"{kind}/whitened_scatter"], ref["whitened_scatter"]) <= tol
    assert int(ref["dec_counts"].sum()) == w.N and int(ranks[1][f"{kind}/dec_counts"].sum()) < w.N


def test_two_ranks_helpers(two_ranks):
    ranks, metas = two_ranks
    assert [m["rank"] for m in metas] == [0, 1] and {m["world"] for m in metas} == {2}
    assert [m["is_main"] for m in metas] == [True, False] and {m["backend"] for m in metas} == {"gloo"}
    assert ranks[0]["rank_rows"].tolist() == [0, 251] and ranks[1]["rank_rows"].tolist() == [251, 501]
    for r, got in enumerate(ranks):
        assert got["progress_total"] == 5 + 100 + 37 and got["progress_seen_monotonic"]
        assert got["all_equal_same"] and not got["all_equal_differ"] and not got["all_equal_lengths"]
        assert got["broadcast"].tolist() == [3, 1, 4] and got["any_rank"].tolist() == [True, False]
        assert got["mismatch_refused"]
    assert ranks[0]["own_count"] == w.N  # rank 0: the merged total
    assert ranks[1]["own_count"] == ranks[1]["local_count"] == w.N - 251  # rank 1 kept its own rows


# ---------------------------------------------------------------------------------------------------------------------
# `torchrun -m ncaudit report`: 2 ranks give the 1-process report
# ---------------------------------------------------------------------------------------------------------------------
def _torchrun_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    for key in TORCHRUN:
        env.pop(key, None)
    return env


def _torchrun(args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1",
                           "--nproc_per_node=2", *args], env=_torchrun_env(), capture_output=True, text=True,
                          timeout=300)


@pytest.mark.parametrize("dtype, tol", [(np.float64, 1e-10), (np.float32, 1e-7)])
def test_torchrun_report_equals_one_process(tmp_path, dtype, tol):
    from reference import planted

    from ncaudit.cache import write_cache

    h, y, etf = planted(C=7, p=20, n=90, sigma=0.3, offset=5.0, seed=61)
    order = np.random.default_rng(62).permutation(len(y))  # shuffled: every rank sees every class
    rng = np.random.default_rng(63)
    path = write_cache(tmp_path / "c.h5", h[order].astype(dtype), y[order], weight=etf + 0.2 * rng.standard_normal(
        etf.shape), bias=0.1 * rng.standard_normal(7), layers={"early": (h[order] ** 2).astype(dtype)})
    args = ["-m", "ncaudit", "report", str(path), "--json", "-q", "--layers", "--batch-size", "64"]
    env = _torchrun_env()
    one = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr
    two = _torchrun(args)
    if two.returncode != 0 and "process group" in two.stderr:
        pytest.skip("the gloo process group could not start in this environment")
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = json.loads(one.stdout), json.loads(two.stdout)  # rank 0 alone prints
    assert a["class_counts"] == b["class_counts"]
    assert (a["details"]["world_size"], b["details"]["world_size"]) == (1, 2)
    for key, value in a["metrics"].items():
        if value is None:
            assert b["metrics"][key] is None
        else:
            assert b["metrics"][key] == pytest.approx(value, rel=tol, abs=1e-300), key
    for row_a, row_b in zip(a["per_class"], b["per_class"]):
        assert row_b["nc1"] == pytest.approx(row_a["nc1"], rel=tol)
    assert b["layers"]["early"]["nc1"] == pytest.approx(a["layers"]["early"]["nc1"], rel=tol)


def test_torchrun_report_stops_every_rank_on_bad_input(tmp_path):
    """A bad label in rank 1's rows: every rank exits (exit 2 from the failing one), none hangs at a merge."""
    from ncaudit.cache import write_cache

    y = np.arange(200) % 4
    y[150] = 9  # outside [0, 4): only rank 1 (rows 100..199) sees it
    path = write_cache(tmp_path / "bad.h5", np.random.default_rng(0).standard_normal((200, 6)), y, num_classes=4)
    run = _torchrun(["-m", "ncaudit", "report", str(path), "-q"])
    if "process group" in run.stderr and "label" not in run.stderr:
        pytest.skip("the gloo process group could not start in this environment")
    assert run.returncode != 0
    assert "label 9 at row 150" in run.stderr


# ---------------------------------------------------------------------------------------------------------------------
# `torchrun -m ncaudit extract`: 2 ranks write the 1-process cache; an interrupted run resumes with 1 rank
# ---------------------------------------------------------------------------------------------------------------------
CHECKPOINT = ROOT / "fixtures" / "checkpoints" / "test_resnet_digits_e200.safetensors"


def _extract_cmd(data: Path, out: Path, *extra: str) -> list[str]:
    return ["-m", "ncaudit", "extract", "-m", "test_resnet", "-c", str(CHECKPOINT), "-d", str(data), "--split",
            "train", "-o", str(out), "--workers", "0", "--no-progress", "--device", "cpu", *extra]


def _arrays(path: Path) -> dict[str, np.ndarray]:
    import h5py

    with h5py.File(path, "r") as f:
        assert bool(f.attrs["complete"]) and int(f.attrs["n_written"]) == f["labels"].shape[0]
        return {key: f[key][()] for key in ("features", "labels", "logits")}


@pytest.fixture(scope="module")
def one_process_cache(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "one.h5"
    run = subprocess.run([sys.executable, *_extract_cmd(ROOT / "fixtures" / "digits", out)], env=_torchrun_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    return _arrays(out)


def test_torchrun_extract_equals_one_process(tmp_path, one_process_cache):
    out = tmp_path / "two.h5"
    run = _torchrun(_extract_cmd(ROOT / "fixtures" / "digits", out))
    if run.returncode != 0 and "process group" in run.stderr:
        pytest.skip("the gloo process group could not start in this environment")
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stderr.count("wrote ") == 1  # rank 0 alone reports
    shards = sorted(p.name for p in tmp_path.glob("two.rows-*.h5"))
    assert len(shards) == 2  # one contiguous slice per rank, beside --out, joined by rank 0
    two = _arrays(out)
    for key, value in one_process_cache.items():  # row for row, bit for bit (slices start on batch boundaries)
        np.testing.assert_array_equal(two[key], value, err_msg=key)


def test_interrupted_torchrun_extract_resumes_with_one_process(tmp_path, one_process_cache):
    """Rank 1 stops on a broken image after writing part of its slice; once the image is fixed, a one-process
    --resume keeps every row on disk, computes the rest and joins the same cache."""
    import shutil

    from ncaudit.data._reader_folder import _image_folder

    data = tmp_path / "digits"
    shutil.copytree(ROOT / "fixtures" / "digits", data)
    _, paths, _ = _image_folder(data / "train")
    victim = Path(paths[1300])  # in rank 1's slice (rows 704..1437), after two written chunks of 256 rows
    good = victim.read_bytes()
    victim.write_bytes(b"not an image")
    out = tmp_path / "resumed.h5"
    run = _torchrun(_extract_cmd(data, out))
    if "process group" in run.stderr and "image" not in run.stderr:
        pytest.skip("the gloo process group could not start in this environment")
    assert run.returncode != 0 and victim.name in run.stderr
    assert not out.exists()
    from ncaudit.cache._shards import scan_shards

    states = scan_shards(out)  # rank 0's slice complete, rank 1's partial with its chunks on disk
    assert [(s.start, s.stop) for s in states] == [(0, 704), (704, 1438)]
    assert states[0].complete and 0 < states[1].n_written < 1300 - 704
    victim.write_bytes(good)
    again = subprocess.run([sys.executable, *_extract_cmd(data, out, "--resume")], env=_torchrun_env(),
                           capture_output=True, text=True, timeout=300)
    assert again.returncode == 0, again.stderr
    resumed = _arrays(out)
    for key, value in one_process_cache.items():
        np.testing.assert_array_equal(resumed[key], value, err_msg=key)
