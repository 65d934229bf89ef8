"""The in-memory audit under torch.distributed: every rank feeds its own shard (audit_features, AuditAccumulator,
audit_model) and every rank ends with the report one process gives for all the rows (2 gloo CPU ranks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import dist_audit_worker as worker
import pytest
import torch
from test_api import same_report

import ncaudit
from ncaudit import audit_features, audit_model

ROOT = Path(__file__).resolve().parents[1]
TORCHRUN_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
#: Details that count how the work was split, not what it found: the rounding-error bound grows with the number of
#: merged products (and the Sigma_T cut-off may be that bound); the batch size is the caller's.
SPLIT_DEPENDENT = ("/details/sigma_t_error_bound", "/details/sigma_t_cutoff", "/details/batch_size",
                   "/details/mse_check/relative_discrepancy", "/details/world_size")


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist_audit")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), str(ROOT / "tests"),
                                                        os.environ.get("PYTHONPATH", "")]), "OMP_NUM_THREADS": "1"}
    for key in TORCHRUN_VARS:
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", "--nproc_per_node=2",
           str(ROOT / "tests" / "dist_audit_worker.py"), str(out)]
    run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300, check=False)
    log = (run.stdout + run.stderr).strip()
    if not all((out / f"started.{r}").exists() for r in (0, 1)):
        pytest.skip("the gloo process group could not start in this environment: " + " | ".join(log.splitlines()[-3:]))
    assert run.returncode == 0, log[-4000:]
    return out


def _rank_result(out: Path, name: str, rank: int) -> ncaudit.AuditResult:
    return ncaudit.audit.result_from_json(json.loads((out / f"{name}.rank{rank}.json").read_text()))


@pytest.mark.parametrize("name", ["features", "accumulator", "model"])
def test_every_rank_gets_the_one_process_report(two_ranks, name):
    h, y, w, b, ood = worker.data()
    if name == "features":
        one = audit_features(h, y, w, b, batch_size=32, ood_features=ood)
    elif name == "accumulator":
        one = worker.accumulate(h, y, w, b, ood)
    else:
        x, labels = worker.images()
        # the ranks' batches, one after the other (rows 0-15, 16-29 | 30-45, 46-59), on one thread as the ranks ran:
        # the network's own arithmetic then gives the same features, so only the merge is compared
        batches = [range(0, 16), range(16, 30), range(30, 46), range(46, 60)]
        loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, labels), batch_sampler=batches)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            one = audit_model(worker.model(), loader)
        finally:
            torch.set_num_threads(threads)
    for rank in (0, 1):
        got = _rank_result(two_ranks, name, rank)
        diff = [d for d in same_report(one, got, rtol=1e-10) if not d.startswith(SPLIT_DEPENDENT)]
        assert not diff, (rank, diff)
        assert (one.details["world_size"], got.details["world_size"]) == (1, 2)
        assert got.n_samples == len(y) if name != "model" else got.n_samples == 60
    if name != "model":
        assert _rank_result(two_ranks, name, 0).metrics["nc5"] is not None


def test_a_bad_label_on_one_rank_stops_every_rank(two_ranks):
    messages = [(two_ranks / f"bad.rank{r}.txt").read_text() for r in (0, 1)]
    assert "label 7 at row" in messages[1] and "on rank 1" in messages[1]
    # every rank stops; rank 0 reports the failing rank's own message (ncaudit.distributed.together)
    assert messages[0].startswith("rank 1: ") and "label 7 at row" in messages[0]
