"""report --baseline and compare A B through the command line: checks relative to a saved report or a cache, the
baseline's value in the JSON, one-line refusals (schema, classes, width), the direction of every metric."""

from __future__ import annotations

import json

import numpy as np
import pytest
from extract_fixtures import only_error_line
from reference import planted
from typer.testing import CliRunner

from ncaudit.audit import DIRECTIONS, METRIC_KEYS, AuditOptions, audit, compare, read_report, verdict
from ncaudit.cache import write_cache
from ncaudit.cli import app

runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def cache(path, *, C=4, p=6, sigma=1e-2, seed=40, model="planted"):
    h, y, etf = planted(C=C, p=p, n=30, sigma=sigma, offset=5.0, seed=seed)
    return write_cache(path, h, y, weight=etf, bias=-etf @ np.full(p, 5.0), attrs={"model": model, "split": "train"})


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """An old (less collapsed) and a new cache, the old one's saved report, and caches of another shape."""
    tmp = tmp_path_factory.mktemp("baseline")
    old, new = cache(tmp / "old.h5", sigma=0.05, seed=1), cache(tmp / "new.h5", sigma=0.01, seed=2)
    res = invoke("report", old, "-q", "--output", tmp / "old.json")
    assert res.exit_code == 0, res.stderr
    return {"tmp": tmp, "old": old, "new": new, "old.json": tmp / "old.json",
            "classes": cache(tmp / "c5.h5", C=5), "width": cache(tmp / "p7.h5", p=7)}


def report_json(*args):
    res = invoke("report", *args, "--json", "-q")
    return res, (json.loads(res.stdout) if res.exit_code in (0, 1) else None)


def test_baseline_checks_record_the_baseline(files):
    saved = json.loads(files["old.json"].read_text())
    for baseline in (files["old.json"], files["old"]):  # a saved report, or the cache audited
        res, rep = report_json(files["new"], "--baseline", baseline, "--fail-if", "nc1 > baseline * 1.2",
                               "--fail-if", "accuracy < baseline - 0.01", "--fail-if", "NC3 > baseline")
        assert res.exit_code == 0, res.stderr
        nc1, acc, nc3 = rep["checks"]
        assert nc1["baseline"] == pytest.approx(saved["metrics"]["nc1"], rel=1e-12)
        assert nc1["threshold"] == pytest.approx(1.2 * saved["metrics"]["nc1"], rel=1e-12)
        assert nc1["value"] == rep["metrics"]["nc1"] < nc1["threshold"] and nc1["outcome"] == "passed"
        assert acc["threshold"] == pytest.approx(saved["metrics"]["accuracy"] - 0.01)
        assert nc3["expression"] == "nc3 > baseline" and nc3["metric"] == "nc3"
        assert rep["baseline"]["path"] == str(baseline) and rep["baseline"]["model"] == "planted"
        assert rep["baseline"]["source"] == str(files["old"])
    # the other way round: the less collapsed cache against the new one's report fails
    invoke("report", files["new"], "-q", "--output", files["tmp"] / "new.json")
    res, rep = report_json(files["old"], "--baseline", files["tmp"] / "new.json", "--fail-if", "nc1 > baseline * 1.2")
    assert res.exit_code == 1 and rep["checks"][0]["outcome"] == "failed" and rep["passed"] is False


def test_a_saved_report_reads_back_as_it_was(files):
    old = read_report(files["old.json"])
    direct = audit(files["old"], AuditOptions(device="cpu"))
    assert {k for k, v in old.metrics.items() if v is None} == {k for k, v in direct.metrics.items() if v is None}
    assert {k: v for k, v in old.metrics.items() if v is not None} == pytest.approx(
        {k: v for k, v in direct.metrics.items() if v is not None}, rel=1e-12)
    assert (old.n_classes, old.n_features, old.n_samples) == (4, 6, 120)


def test_refused_baselines(files):
    tmp = files["tmp"]
    new = files["new"]
    only_error_line(invoke("report", new, "--fail-if", "nc1 > baseline"), "compares with a baseline", "--baseline")
    only_error_line(invoke("report", new, "--baseline", tmp / "none.json"), "no such file")
    only_error_line(invoke("report", new, "--baseline", tmp), "is a directory")
    (tmp / "text.json").write_text("nc1 = 0.3\n")
    only_error_line(invoke("report", new, "--baseline", tmp / "text.json"), "neither a feature cache", "JSON report")
    saved = json.loads(files["old.json"].read_text())
    for schema, needle in (("ncaudit.report/2", "schema ncaudit.report/2, and this ncaudit reads ncaudit.report/1"),
                           ("ncaudit.trajectory/1", "is a trajectory"), ("other/1", "'other/1' is not")):
        (tmp / "v.json").write_text(json.dumps({**saved, "schema": schema}))
        only_error_line(invoke("report", new, "--baseline", tmp / "v.json"), needle)
    (tmp / "nan.json").write_text(files["old.json"].read_text().replace('"nc1": ', '"nc1": NaN, "x": ', 1))
    only_error_line(invoke("report", new, "--baseline", tmp / "nan.json"), "NaN is not strict JSON")
    (tmp / "bad.json").write_text(json.dumps({**saved, "metrics": {"nc1": "high"}}))
    only_error_line(invoke("report", new, "--baseline", tmp / "bad.json"), "metrics.nc1 is 'high'")
    (tmp / "u.json").write_text(json.dumps({**saved, "details": {"uncertainty": [0.1]}}))
    only_error_line(invoke("report", new, "--baseline", tmp / "u.json"), "details.uncertainty is not an object")
    (tmp / "u.json").write_text(json.dumps({**saved, "details": {"uncertainty": {"nc1": "big"}}}))
    only_error_line(invoke("compare", tmp / "u.json", files["old.json"]), "details.uncertainty is not an object")
    (tmp / "nometrics.json").write_text(json.dumps({k: v for k, v in saved.items() if k != "metrics"}))
    only_error_line(invoke("report", new, "--baseline", tmp / "nometrics.json"), "has no 'metrics'")
    only_error_line(invoke("report", new, "--baseline", files["classes"]), "has 5 classes and this audit 4")
    only_error_line(invoke("report", new, "--baseline", files["width"]), "has 7 features and this audit 6")
    only_error_line(invoke("report", new, "--normalize", "--baseline", files["old.json"]),
                   "audited without --normalize and this audit with it")
    only_error_line(invoke("report", new, "--baseline", files["old.json"], "-o", files["old.json"]), "is the input")


def test_softer_differences_are_warnings(files):
    res, rep = report_json(files["new"], "--ridge", "0.1", "--baseline", files["old.json"])
    assert res.exit_code == 0
    assert any("--ridge 0.0, this audit with 0.1" in w for w in rep["warnings"]), rep["warnings"]
    assert "--ridge" in res.stderr


def with_uncertainty(path, target, uncertainty):
    data = json.loads(path.read_text())
    data["details"]["uncertainty"] = uncertainty
    target.write_text(json.dumps(data))
    return target


def test_undetermined_through_the_baselines_uncertainty(files):
    """The rule reads the baseline report's details.uncertainty: a regression that the baseline's own uncertainty
    could explain is undetermined, exit 1."""
    tmp = files["tmp"]
    res, rep = report_json(files["new"], "--baseline", files["old.json"])
    new_nc1, old_nc1 = rep["metrics"]["nc1"], json.loads(files["old.json"].read_text())["metrics"]["nc1"]
    factor = new_nc1 / old_nc1 * 0.99  # the new value lies 1 % above the threshold: fails when exact
    check = f"nc1 > baseline * {factor!r}"
    res, rep = report_json(files["new"], "--baseline", files["old.json"], "--fail-if", check)
    assert res.exit_code == 1 and rep["checks"][0]["outcome"] == "failed"
    fuzzy = with_uncertainty(files["old.json"], tmp / "fuzzy.json", {"nc1": 0.05})
    res, rep = report_json(files["new"], "--baseline", fuzzy, "--fail-if", check)
    assert res.exit_code == 1 and rep["checks"][0]["outcome"] == "undetermined" and rep["passed"] is False
    assert rep["checks"][0]["uncertainty"] == pytest.approx(0.05 * factor * old_nc1)
    table = invoke("report", files["new"], "-q", "--baseline", fuzzy, "--fail-if", check)
    assert table.exit_code == 1 and "undetermined" in table.stdout
    markdown = invoke("report", files["new"], "-q", "--baseline", fuzzy, "--fail-if", check, "--format", "markdown")
    assert markdown.exit_code == 1 and "| undetermined | undetermined within its uncertainty (±" in markdown.stdout


def saved(path, metrics, uncertainty=None, *, n_classes=4, n_features=6):
    data = {"schema": "ncaudit.report/1", "source": {"path": f"{path.stem}.h5", "model": "m"}, "n_samples": 100,
            "n_features": n_features, "n_classes": n_classes, "class_counts": [25] * n_classes,
            "metrics": {k: metrics.get(k) for k in METRIC_KEYS}, "details": {"uncertainty": uncertainty or {}},
            "per_class": [], "layers": {}, "warnings": [], "checks": [], "passed": True}
    path.write_text(json.dumps(data))
    return path


def test_every_metric_has_a_direction():
    missing = [k for k in METRIC_KEYS if k not in DIRECTIONS]
    assert not missing, f"give these metrics a direction in ncaudit/audit/_directions.py: {missing}"
    assert set(DIRECTIONS.values()) <= {"lower", "higher", None}
    for key in METRIC_KEYS:  # a "→ 0" metric improves downwards, an accuracy upwards
        assert verdict(key, 0.5, 0.25) in {"better", "worse", "changed"}
    assert DIRECTIONS["nc1"] == "lower" and DIRECTIONS["accuracy"] == "higher" and DIRECTIONS["ls_cosine"] == "higher"


def test_verdicts():
    assert verdict("nc1", 0.5, 0.25) == "better" and verdict("nc1", 0.25, 0.5) == "worse"
    assert verdict("accuracy", 0.9, 0.95) == "better" and verdict("accuracy", 0.95, 0.9) == "worse"
    assert verdict("nc1", 0.5, 0.5) == "same" and verdict("nc1", 0.5, 0.51, margin=0.02) == "same"
    assert verdict("nc1", 0.5, None) == "n/a" and verdict("nc1_precision_floor", 1e-6, 2e-6) == "changed"
    assert verdict("a_newer_metric", 1.0, 2.0) == "changed"


def test_compare_reports(tmp_path):
    a = saved(tmp_path / "a.json", {"nc1": 0.5, "accuracy": 0.9, "nc4": 0.0, "ls_cosine": 0.5, "nc3": 0.2},
              {"nc3": 0.1})
    b = saved(tmp_path / "b.json", {"nc1": 0.25, "accuracy": 0.85, "nc4": 0.0, "ls_cosine": 0.6, "nc3": 0.21})
    res = invoke("compare", a, b, "--json")
    assert res.exit_code == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["schema"] == "ncaudit.compare/1" and list(out["metrics"]) == list(METRIC_KEYS)
    nc1, acc, nc4 = out["metrics"]["nc1"], out["metrics"]["accuracy"], out["metrics"]["nc4"]
    assert (nc1["a"], nc1["b"], nc1["change"], nc1["relative_change"]) == (0.5, 0.25, -0.25, -0.5)
    assert nc1["verdict"] == "better" and nc1["better"] == "lower"
    assert acc["verdict"] == "worse" and acc["better"] == "higher" and acc["change"] == pytest.approx(-0.05)
    assert nc4["verdict"] == "same" and nc4["relative_change"] == 0
    assert out["metrics"]["ls_cosine"]["verdict"] == "better"
    assert out["metrics"]["nc3"]["verdict"] == "same"  # 0.2 → 0.21 lies within A's ±10 %
    assert out["metrics"]["nc3"]["uncertainty"] == pytest.approx(0.02)
    assert out["metrics"]["cdnv"] == {"a": None, "b": None, "change": None, "relative_change": None,
                                      "better": "lower", "verdict": "n/a", "uncertainty": 0.0}
    assert out["a"]["name"] == str(a) and out["b"]["n_classes"] == 4 and out["passed"] is True
    table = invoke("compare", a, b)
    assert table.exit_code == 0
    line = next(row for row in table.stdout.splitlines() if row.startswith("accuracy"))
    assert line.split()[1:] == ["0.9", "0.85", "-0.05", "-5.56", "%", "worse"]


def test_compare_gates_b_against_a(tmp_path):
    a = saved(tmp_path / "a.json", {"nc1": 0.5, "accuracy": 0.9}, {"nc1": 0.01})
    b = saved(tmp_path / "b.json", {"nc1": 0.57, "accuracy": 0.95}, {"nc1": 0.01})
    res = invoke("compare", a, b, "--json", "--fail-if", "nc1 > baseline * 1.3", "--fail-if", "accuracy < 0.9")
    assert res.exit_code == 0, res.stdout
    res = invoke("compare", a, b, "--json", "--fail-if", "nc1 > baseline * 1.15", "--fail-if", "nc1 > baseline")
    checks = json.loads(res.stdout)["checks"]
    assert res.exit_code == 1 and [c["outcome"] for c in checks] == ["undetermined", "failed"]
    # 0.57 ± 0.0057 against 0.575 ± 0.00575: within the band
    assert checks[0]["uncertainty"] == pytest.approx(0.0057 + 0.00575) and checks[0]["baseline"] == 0.5
    assert checks[1]["threshold"] == 0.5


def test_compare_refuses_and_notes(tmp_path, files):
    a = saved(tmp_path / "a.json", {"nc1": 0.5})
    only_error_line(invoke("compare", a, saved(tmp_path / "c.json", {"nc1": 0.5}, n_classes=5)),
                   "has 4 classes and B 5")
    res = invoke("compare", a, saved(tmp_path / "w.json", {"nc1": 0.5}, n_features=8), "--json")
    assert res.exit_code == 0 and "6 features against 8 in B" in json.loads(res.stdout)["warnings"][0]
    only_error_line(invoke("compare", a, tmp_path / "none.json"), "B", "no such file")
    only_error_line(invoke("compare", a, a, "--fail-if", "nc1 < baseline / 2"), "is not of the form")
    only_error_line(invoke("compare", a, a, "--json", "--format", "markdown"), "--json and --format markdown")
    # a cache and a saved report of the same cache compare as equal
    res = invoke("compare", files["old.json"], files["old"], "--json", "-q")
    assert res.exit_code == 0
    verdicts = {m["verdict"] for m in json.loads(res.stdout)["metrics"].values()}
    assert verdicts <= {"same", "n/a"}, verdicts


def test_compare_in_memory(files):
    old = read_report(files["old.json"])
    new = audit(files["new"], AuditOptions(device="cpu"))
    comparison = compare(old, new, "old", "new")
    by_key = {c.key: c for c in comparison.changes}
    assert by_key["nc1"].verdict == "better" and by_key["nc1"].change == pytest.approx(
        new.metrics["nc1"] - old.metrics["nc1"])
