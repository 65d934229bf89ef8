"""The report command end to end through Typer's CliRunner: JSON schema, gating exit codes, every bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest
from extract_fixtures import only_error_line
from reference import planted
from typer.testing import CliRunner

from ncaudit.audit import METRIC_KEYS
from ncaudit.cache import write_cache
from ncaudit.cli import app
from ncaudit.report import fmt

runner = CliRunner()


@pytest.fixture
def good(tmp_path):
    h, y, etf = planted(C=4, p=6, n=30, sigma=1e-2, offset=100.0, seed=40)
    return write_cache(tmp_path / "good.h5", h, y, weight=etf, bias=-etf @ np.full(6, 100.0),
                       class_names=["a", "b", "c", "d"], attrs={"model": "planted", "split": "train"})


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_json_report_schema(good):
    res = invoke("report", good, "--json", "-q")
    assert res.exit_code == 0, res.stderr
    report = json.loads(res.stdout)  # stdout holds the JSON alone
    for key in ("schema", "ncaudit_version", "source", "n_samples", "n_features", "n_classes", "class_counts",
                "metrics", "details", "checks", "passed", "per_class"):
        assert key in report
    assert report["schema"] == "ncaudit.report/1"
    assert set(report["metrics"]) == set(METRIC_KEYS)
    assert report["n_samples"] == 120 and report["n_classes"] == 4 and report["class_counts"] == [30] * 4
    assert report["source"]["model"] == "planted"
    assert report["metrics"]["nc1_precision_floor"] is None
    assert report["per_class"][2]["name"] == "c"
    assert report["details"]["rank_sigma_b"] == 3
    assert "NaN" not in res.stdout and "Infinity" not in res.stdout


def test_gating_exit_codes(good, tmp_path):
    ok = invoke("report", good, "--json", "-q", "--fail-if", "nc1>0.5", "--fail-if", "accuracy < 0.5")
    assert ok.exit_code == 0, ok.stderr
    checks = json.loads(ok.stdout)["checks"]
    assert [c["passed"] for c in checks] == [True, True]
    bad = invoke("report", good, "--json", "-q", "--fail-if", "nc1>1e-9", "-o", tmp_path / "r.json")
    assert bad.exit_code == 1
    report = json.loads(bad.stdout)  # the report is still printed
    assert report["passed"] is False and report["checks"][0]["outcome"] == "failed"
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False
    # A failed check is one line on stderr in every mode (the JSON on stdout says it too).
    for mode in (["--json"], []):
        failed = invoke("report", good, "-q", *mode, "--fail-if", "nc1>1e-9", "--fail-if", "accuracy<0.5")
        assert failed.exit_code == 1
        value = fmt(report["metrics"]["nc1"])
        assert failed.stderr.strip().splitlines() == [f"check failed: nc1 > 1e-09 (value: {value})"]
    table = invoke("report", good, "-q", "--fail-if", "nc1>1e-9")
    assert table.exit_code == 1 and "nc1 > 1e-09" in table.stdout
    null_metric = invoke("report", good, "--json", "-q", "--fail-if", "nc1_precision_floor>1")
    assert null_metric.exit_code == 1


def test_table_output(good):
    res = invoke("report", good, "--per-class")
    assert res.exit_code == 0
    for text in ("NC1", "NC2", "NC3", "NC4", "LS", "nc1", "mse_term_b", "per class"):
        assert text in res.stdout
    assert "pass 1/2" not in res.stdout  # progress goes to stderr


def write_raw(path, **datasets):
    with h5py.File(path, "w") as f:
        attrs = datasets.pop("attrs", {})
        for k, v in attrs.items():
            f.attrs[k] = v
        for k, v in datasets.items():
            f.create_dataset(k, data=v)
    return path


def test_bad_inputs(tmp_path, good):
    h, y, etf = planted(C=3, p=4, n=5, seed=41)
    only_error_line(invoke("report", tmp_path / "missing.h5"), "no such file")
    (tmp_path / "text.h5").write_text("not hdf5")
    only_error_line(invoke("report", tmp_path / "text.h5"), "not a readable HDF5 file")
    only_error_line(invoke("report", write_raw(tmp_path / "nofeat.h5", labels=y)), "/features")
    only_error_line(invoke("report", write_raw(tmp_path / "nolab.h5", features=h)), "/labels")
    y_bad = y.copy()
    y_bad[7] = 3
    only_error_line(invoke("report", write_raw(tmp_path / "range.h5", features=h, labels=y_bad,
                                              attrs={"num_classes": 3})), "label 3 at row 7")
    h_nan = h.copy()
    h_nan[4, 2] = np.nan
    only_error_line(invoke("report", write_raw(tmp_path / "nan.h5", features=h_nan, labels=y,
                                              attrs={"num_classes": 3})), "row 4", "NaN")
    h_inf = h.copy()
    h_inf[9, 0] = np.inf
    only_error_line(invoke("report", write_raw(tmp_path / "inf.h5", features=h_inf, labels=y,
                                              attrs={"num_classes": 3})), "row 9")
    only_error_line(invoke("report", write_raw(tmp_path / "wshape.h5", features=h, labels=y,
                                              **{"classifier/weight": etf[:, :3]})), "expected [C, p]")
    y_gap = np.where(y == 1, 2, y)
    gap = write_raw(tmp_path / "empty.h5", features=h, labels=y_gap, attrs={"num_classes": 3},
                    **{"classifier/weight": etf})
    only_error_line(invoke("report", gap), "no samples", "--drop-empty-classes")
    dropped = invoke("report", gap, "--json", "-q", "--drop-empty-classes")
    assert dropped.exit_code == 0, dropped.stderr
    report = json.loads(dropped.stdout)
    assert report["n_classes"] == 2 and report["details"]["dropped_classes"] == [1]
    assert [r["class"] for r in report["per_class"]] == [0, 2]
    partial = write_raw(tmp_path / "partial.h5", features=h, labels=y,
                        attrs={"num_classes": 3, "complete": False, "n_written": 12})
    only_error_line(invoke("report", partial), "incomplete", "--allow-partial")
    allowed = invoke("report", partial, "--json", "-q", "--allow-partial", "--drop-empty-classes")
    assert allowed.exit_code == 0 and json.loads(allowed.stdout)["n_samples"] == 12
    only_error_line(invoke("report", good, "--fail-if", "nc1 ~ 3"), "METRIC OP NUMBER")
    only_error_line(invoke("report", good, "--fail-if", "nc9>3"), "unknown metric 'nc9'; did you mean 'nc")
    nearest = only_error_line(invoke("report", good, "--fail-if", "acuracy<3"), "did you mean 'accuracy'?")
    assert "cdnv" not in nearest  # the nearest key, not the whole list
    cased = invoke("report", good, "--json", "-q", "--fail-if", "NC1>0.5", "--fail-if", "Accuracy<0.5")
    assert cased.exit_code == 0 and [c["metric"] for c in json.loads(cased.stdout)["checks"]] == ["nc1", "accuracy"]
    only_error_line(invoke("report", good, "--ridge", "-1"), "--ridge")


def test_help_is_fast_and_imports_no_torch():
    code = "import sys, ncaudit.cli; sys.exit(1 if 'torch' in sys.modules or 'timm' in sys.modules else 0)"
    assert subprocess.run([sys.executable, "-c", code]).returncode == 0
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "ncaudit", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "report" in out.stdout
    assert time.perf_counter() - start < 5.0


def test_interrupt_exits_130(good, monkeypatch):
    import ncaudit.audit

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ncaudit.audit, "audit", interrupted)
    res = invoke("report", good, "--json", "-q")
    assert res.exit_code == 130 and "interrupted" in res.stderr and res.stdout == ""


def test_feature_magnitude_limit_is_exact_at_the_boundary():
    """The magnitude check compares in the features' dtype: the float32 value nearest the limit passes, the next one
    up is one clear error, and NaN / Inf name their row (no IndexError between the fast and the slow path)."""
    import torch

    from ncaudit._validate import SQUARABLE, check_finite
    from ncaudit.errors import InputError

    at = torch.tensor(SQUARABLE["float32"], dtype=torch.float32)
    above = torch.nextafter(at, torch.tensor(float("inf")))
    check_finite(torch.stack([torch.zeros(3), torch.full((3,), float(at))]), 0, "w")
    check_finite(-torch.full((2, 3), float(at)), 0, "w")
    with pytest.raises(InputError, match="row 6 reaches"):
        check_finite(torch.stack([torch.zeros(3), torch.full((3,), float(above))]), 5, "w")
    with pytest.raises(InputError, match="row 5 reaches"):
        check_finite(torch.stack([-torch.full((3,), float(above)), torch.zeros(3)]), 5, "w")
    for bad in (float("nan"), float("inf"), float("-inf")):
        with pytest.raises(InputError, match="row 8 holds NaN or Inf"):
            check_finite(torch.tensor([[1.0, 2.0], [3.0, bad]]), 7, "w")
