"""Compute what is asked (``report --metrics``, ``AuditOptions.metrics``): every value a selection computes equals the
full report's, the keys not asked for are absent, only the passes and closed forms the chosen metrics need run, the
``--fail-if`` keys are always computed, and every renderer, baseline and comparison copes with absent keys."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import numpy as np
import pytest
from reference import planted
from test_exact_ls import planted_decades
from typer.testing import CliRunner

from ncaudit import metrics as nc_metrics
from ncaudit.audit import (
    METRIC_KEYS,
    AuditAccumulator,
    AuditOptions,
    audit_cache,
    audit_features,
    build_rows,
    compare,
    comparison_to_json,
    make_plan,
    result_from_json,
    result_to_json,
)
from ncaudit.cache import write_cache
from ncaudit.cli import app
from ncaudit.errors import InputError
from ncaudit.report import render_compare_markdown, render_json, render_markdown, render_text

RTOL = 1e-12

#: Selections that exercise each branch of the plan.
SELECTIONS = [
    ["nc1"],
    ["CDNV", "nc2_equiangle_means"],
    ["nc2_equinorm_means", "nc2_orthogonality_means"],
    ["energy_riesz_means", "energy_log_classifier"],
    ["nc2_maxangle_classifier", "nc2_equinorm_classifier", "nc3"],
    ["accuracy"],
    ["ncc_accuracy"],
    ["nc4", "nc1"],
    ["mse_loss"],
    ["mse_term_a"],
    ["mse_term_b", "ls_distance", "ls_cosine"],
    ["nc1_precision_floor"],
]


class Titles:
    """A progress tracker that records the title of every pass."""

    def __init__(self) -> None:
        self.titles: list[str] = []

    @contextlib.contextmanager
    def task(self, description, total):
        self.titles.append(description)
        yield lambda n: None


def _data():
    h, y, etf = planted(C=7, p=20, n=60, sigma=0.3, offset=5.0, seed=61)
    rng = np.random.default_rng(62)
    w, b = etf + 0.2 * rng.standard_normal(etf.shape), 0.1 * rng.standard_normal(7)
    layers = {"early": (rng.standard_normal((len(y), 9)) + 0.5 * y[:, None]).astype(np.float32)}
    return h.astype(np.float32), y, w, b, layers


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    """A planted float16 cache with a classifier, a layer and float32 reference rows (the precision floor)."""
    h, y, w, b, layers = _data()
    idx = np.arange(0, len(y), 5)
    return write_cache(tmp_path_factory.mktemp("select") / "a.h5", h.astype(np.float16), y, weight=w, bias=b,
                       layers=layers, reference=(idx, h[idx]), class_names=[f"c{i}" for i in range(7)],
                       attrs={"precision": "fp16"})


@pytest.fixture(scope="module")
def full(cache):
    return audit_cache(cache, AuditOptions(device="cpu", layers=[]))


def _close(a, b) -> bool:
    if a is None or b is None:
        return a is None and b is None
    return abs(a - b) <= RTOL * max(abs(a), abs(b), 1e-300)


def test_default_is_every_metric(full):
    """No ``metrics``: every key (null where it cannot be computed), no ``details.computed``."""
    assert list(full.metrics) == list(METRIC_KEYS)
    assert "computed" not in full.details
    assert make_plan(None).full


@pytest.mark.parametrize("chosen", SELECTIONS, ids=lambda s: ",".join(s))
def test_selection_equals_the_full_report(cache, full, chosen):
    """Each chosen value (and its uncertainty) is the full report's to 1e-12; the rest is absent, not null."""
    result = audit_cache(cache, AuditOptions(device="cpu", metrics=chosen, layers=[]))
    keys = [k for k in METRIC_KEYS if k in {c.lower() for c in chosen}]
    assert list(result.metrics) == keys
    assert result.details["computed"] == keys
    for key in keys:
        assert _close(result.metrics[key], full.metrics[key]), key
    unc, full_unc = result.details["uncertainty"], full.details["uncertainty"]
    assert set(unc) <= set(keys) | {"w_ls_norm"}
    assert {k for k in full_unc if k in keys} <= set(unc)
    for key, value in unc.items():
        assert _close(value, full_unc[key]), key
    for block, full_block in zip(result.layers.values(), full.layers.values()):
        for key in set(block) - {"n_features", "rank_sigma_b"}:
            assert key in keys and _close(block[key], full_block[key]), key
    json.loads(render_json(result))  # strict JSON


@pytest.mark.parametrize("chosen,passes,ls,pairs", [
    (["nc1"], ["pass 1/1: class statistics"], False, False),
    (["cdnv"], ["pass 1/1: class statistics"], False, True),
    (["mse_loss", "nc3"], ["pass 1/1: class statistics"], False, False),
    (["mse_term_a"], ["pass 1/1: class statistics"], True, False),
    (["accuracy"], ["pass 1/2: class statistics", "pass 2/2: decisions"], False, False),
    (None, ["pass 1/2: class statistics", "pass 2/2: decisions"], True, True),
])
def test_only_the_passes_asked_for_run(cache, monkeypatch, chosen, passes, ls, pairs):
    """``--metrics nc1`` reads the samples once and runs no least squares and no pair geometry."""
    calls = {"least_squares": 0, "pair_geometry": 0}
    for name in calls:
        original = getattr(nc_metrics, name)

        def counted(*args, _name=name, _original=original, **kwargs):
            calls[_name] += 1
            return _original(*args, **kwargs)

        monkeypatch.setattr(nc_metrics, name, counted)
    titles = Titles()
    audit_cache(cache, AuditOptions(device="cpu", metrics=chosen), titles)
    assert titles.titles == passes
    assert (calls["least_squares"] > 0) == ls
    assert (calls["pair_geometry"] > 0) == pairs


def test_decisions_without_the_classifier_for_ncc_accuracy(cache, full):
    """NCC accuracy alone scores the class means only: no classifier decisions, no per-class NC1 traces."""
    result = audit_cache(cache, AuditOptions(device="cpu", metrics=["ncc_accuracy"]))
    assert _close(result.metrics["ncc_accuracy"], full.metrics["ncc_accuracy"])
    assert "mse_check" not in result.details
    assert all("accuracy" not in row and "nc1" not in row for row in result.per_class)
    assert [row["ncc_accuracy"] for row in result.per_class] == [row["ncc_accuracy"] for row in full.per_class]


def test_per_class_values_of_the_chosen_metrics(cache, full):
    """``per_class`` adds the per-class NC1 (taking pass 2); without it nc1 runs one pass and the rows keep the
    pass-1 values only."""
    titles = Titles()
    with_rows = audit_cache(cache, AuditOptions(device="cpu", metrics=["nc1"], per_class=True), titles)
    assert len(titles.titles) == 2
    for row, ref in zip(with_rows.per_class, full.per_class):
        assert set(row) == {"class", "name", "count", "mean_norm", "classifier_norm", "variance", "nc1"}
        assert _close(row["nc1"], ref["nc1"])
    without = audit_cache(cache, AuditOptions(device="cpu", metrics=["nc1"]))
    assert set(without.per_class[0]) == {"class", "name", "count", "mean_norm", "classifier_norm", "variance"}


def test_refinement_without_pass_2(cache_path):
    """An ill-conditioned Sigma_T: ``mse_term_a`` refines W_LS in passes of their own, to the full report's value."""
    h, y, w, b = planted_decades("top", 1.0, 1)
    path = write_cache(cache_path(), h, y, weight=w, bias=b)
    full = audit_cache(path, AuditOptions(device="cpu", batch_size=512))
    titles = Titles()
    part = audit_cache(path, AuditOptions(device="cpu", batch_size=512, metrics=["mse_term_a", "ls_cosine"]), titles)
    steps = full.details["least_squares"]["refinement_steps"]
    assert steps >= 1 and part.details["least_squares"]["refinement_steps"] == steps
    assert not any("decisions" in t for t in titles.titles)
    assert sum("refinement" in t for t in titles.titles) == steps
    for key in ("mse_term_a", "ls_cosine"):
        assert _close(part.metrics[key], full.metrics[key]), key


def test_training_means_and_ood_only_when_asked(cache, tmp_path):
    """``--means-from`` is read only for NCC accuracy, NC4 or CDNV; ``--ood`` only for NC5."""
    h, _, _, _, _ = _data()
    ood = write_cache(tmp_path / "ood.h5", h[::3] * -1.0, np.arange(len(h[::3])) % 2)
    options = dict(device="cpu", means_from=cache)
    full = audit_cache(cache, AuditOptions(**options), ood=ood)
    titles = Titles()
    nc1 = audit_cache(cache, AuditOptions(**options, metrics=["nc1"]), titles, ood=ood)
    assert titles.titles == ["pass 1/1: class statistics"]
    assert "means_from" not in nc1.details and "ood" not in nc1.details
    part = audit_cache(cache, AuditOptions(**options, metrics=["ncc_accuracy", "nc5"]), ood=ood)
    assert part.details["means_from"]["metrics"] == ["ncc_accuracy"]
    assert list(part.details["means_from"]["own_means"]) == ["ncc_accuracy"]
    for key in ("ncc_accuracy", "nc5"):
        assert _close(part.metrics[key], full.metrics[key]), key
    cdnv = audit_cache(cache, AuditOptions(**options, metrics=["cdnv"]))
    assert _close(cdnv.metrics["cdnv"], full.metrics["cdnv"])


def test_api_and_cli_agree(cache_path):
    """``audit_features(..., metrics=...)`` and ``report --metrics`` give the same values and keys."""
    h, y, w, b, _ = _data()
    path = write_cache(cache_path(), h, y, weight=w, bias=b)
    api = audit_features(h, y, w, b, metrics="nc1,ACCURACY", device="cpu")
    run = CliRunner().invoke(app, ["report", str(path), "--metrics", "nc1, accuracy", "--json", "-q",
                                   "--device", "cpu"])
    assert run.exit_code == 0, run.output
    cli = json.loads(run.stdout)
    assert list(api.metrics) == list(cli["metrics"]) == ["nc1", "accuracy"]
    assert cli["details"]["computed"] == ["nc1", "accuracy"]
    for key in api.metrics:
        assert abs(api.metrics[key] - cli["metrics"][key]) <= 1e-10 * abs(cli["metrics"][key])


def test_accumulator_takes_one_pass_for_nc1():
    h, y, w, b, _ = _data()
    acc = AuditAccumulator(7, w, b, metrics=["nc1"])
    acc.update(h, y)
    assert acc.end_pass() is False and acc.done
    result = acc.compute()
    full = audit_features(h, y, w, b, device="cpu")
    assert list(result.metrics) == ["nc1"] and _close(result.metrics["nc1"], full.metrics["nc1"])
    two = AuditAccumulator(7, w, b, metrics=["accuracy"])
    two.update(h, y)
    assert two.end_pass() is True
    assert two.compute().details["pending"] == {"pass": 2, "metrics": ["accuracy"]}
    two.update(h, y)
    assert two.end_pass() is False
    assert _close(two.compute().metrics["accuracy"], full.metrics["accuracy"])


def test_fail_if_keys_are_computed(cache):
    run = CliRunner().invoke(app, ["report", str(cache), "--metrics", "nc1", "--fail-if", "ncc_accuracy<0.01",
                                   "--json", "-q", "--device", "cpu"])
    assert run.exit_code == 0, run.output
    out = json.loads(run.stdout)
    assert list(out["metrics"]) == ["nc1", "ncc_accuracy"]
    assert out["checks"][0]["outcome"] == "passed"


def test_unknown_key(cache):
    run = CliRunner().invoke(app, ["report", str(cache), "--metrics", "nc1,acuracy", "-q"])
    assert run.exit_code == 2
    assert "--metrics" in run.output and "did you mean 'accuracy'" in run.output
    assert len(run.output.strip().splitlines()) == 1
    with pytest.raises(InputError, match="unknown metric 'ncl'; did you mean 'nc1'"):
        audit_cache(cache, AuditOptions(metrics=["ncl"]))
    with pytest.raises(InputError, match="names no metric"):
        AuditAccumulator(3, metrics=[" , "])


def test_a_check_on_a_metric_not_computed(cache):
    """``result.check`` on a key the audit did not compute fails, saying so (not 'null')."""
    result = audit_cache(cache, AuditOptions(device="cpu", metrics=["nc1"]))
    assert result.check(["accuracy < 0.5"]) is False
    assert result.checks[0]["outcome"] == "failed: metric not computed"
    text = render_text(result)
    assert "not computed" in text and "None" not in text


def test_renderers_and_readers_with_absent_keys(cache, full, tmp_path):
    """Table, markdown, JSON read back, comparison, trajectory: no crash, no 'None', absent keys stay absent."""
    part = audit_cache(cache, AuditOptions(device="cpu", metrics=["cdnv", "accuracy"], layers=[], per_class=True))
    for text in (render_text(part, per_class=True), render_markdown(part, per_class=True)):
        assert "None" not in text and "cdnv" in text and "nc3" not in text
    back = result_from_json(result_to_json(part))
    assert list(back.metrics) == ["cdnv", "accuracy"]
    old = result_from_json(result_to_json(full))
    assert list(old.metrics) == list(METRIC_KEYS)
    comparison = compare(old, back, "full", "part")
    assert [c.key for c in comparison.changes] == list(METRIC_KEYS)
    assert {c.key: c.verdict for c in comparison.changes}["cdnv"] == "same"
    json.dumps(comparison_to_json(comparison))
    assert "None" not in render_compare_markdown(comparison)
    from ncaudit.report import render_trajectory_csv, render_trajectory_markdown, trajectory_table

    rows = build_rows([back, back])
    assert "None" not in render_trajectory_markdown(rows, [])
    render_trajectory_csv(rows)
    from rich.console import Console

    console = Console(record=True, width=100)
    console.print(trajectory_table(rows, layers=True))
    assert "NC1" not in console.export_text().split("per-layer")[0]
    pytest.importorskip("matplotlib")
    from ncaudit.report import plot_trajectory

    assert plot_trajectory(rows, tmp_path / "t.png").stat().st_size > 0


def test_baseline_without_the_metric(cache, tmp_path):
    """A baseline check on a key the baseline report did not compute: one line, exit 2."""
    saved = tmp_path / "old.json"
    run = CliRunner().invoke(app, ["report", str(cache), "--metrics", "ncc_accuracy", "-o", str(saved), "-q",
                                   "--json", "--device", "cpu"])
    assert run.exit_code == 0, run.output
    run = CliRunner().invoke(app, ["report", str(cache), "--fail-if", "nc1 > baseline * 1.2", "--baseline",
                                   str(saved), "-q", "--metrics", "nc1", "--device", "cpu"])
    assert run.exit_code == 2
    assert "holds no nc1" in run.output and "--metrics ncc_accuracy" in run.output
    run = CliRunner().invoke(app, ["compare", str(saved), str(cache), "--fail-if", "nc1 > baseline", "-q"])
    assert run.exit_code == 2 and "holds no nc1" in run.output
    run = CliRunner().invoke(app, ["compare", str(saved), str(cache), "--metrics", "ncc_accuracy", "--json", "-q",
                                   "--device", "cpu"])
    assert run.exit_code == 0, run.output
    assert list(json.loads(run.stdout)["metrics"]) == ["ncc_accuracy"]


def test_trajectory_metrics(cache, full, tmp_path):
    """``trajectory --metrics``: the caches are audited for those keys and the split-prefixed --fail-if ones."""
    run = CliRunner().invoke(app, ["trajectory", str(cache), str(cache), "--metrics", "nc1", "--fail-if",
                                   "data.ncc_accuracy<0.01", "--json", "-q", "--device", "cpu"])
    assert run.exit_code == 0, run.output
    row = json.loads(run.stdout)["trajectory"][-1]
    assert list(row["splits"]["data"]["metrics"]) == ["nc1", "ncc_accuracy"]
    assert _close(row["nc1"], full.metrics["nc1"])
    jsonl = tmp_path / "run.jsonl"
    jsonl.write_text("")
    run = CliRunner().invoke(app, ["trajectory", str(jsonl), "--metrics", "nc1", "-q"])
    assert run.exit_code == 2 and "trajectory file" in run.output
