"""--fail-if: the grammar (absolute and baseline thresholds), metric names in any case, the nearest-key hint, and the
uncertainty rule (spec rule 7: a check whose outcome the uncertainty could flip fails as undetermined)."""

from __future__ import annotations

import math

import pytest

from ncaudit.audit import METRIC_KEYS, evaluate, parse_checks, require_baseline
from ncaudit.audit._checks import nearest_key
from ncaudit.errors import InputError
from ncaudit.report import check_message


def one(text: str):
    return parse_checks([text], METRIC_KEYS)[0]


@pytest.mark.parametrize(("text", "expression", "baseline", "threshold"), [
    ("nc1>0.05", "nc1 > 0.05", None, 0.05),
    ("  accuracy   <=  .9 ", "accuracy <= 0.9", None, 0.9),
    ("nc1 > 1e-9", "nc1 > 1e-09", None, 1e-9),
    ("nc1 > 0.0123456789", "nc1 > 0.0123456789", None, 0.0123456789),
    ("ls_cosine < -0.5", "ls_cosine < -0.5", None, -0.5),
    ("nc1 > baseline", "nc1 > baseline", 0.4, 0.4),
    ("nc1 > baseline * 1.2", "nc1 > baseline * 1.2", 0.4, 0.48),
    ("nc1>baseline*1.2", "nc1 > baseline * 1.2", 0.4, 0.48),
    ("accuracy < baseline - 0.01", "accuracy < baseline - 0.01", 0.97, 0.96),
    ("accuracy < baseline − 0.01", "accuracy < baseline - 0.01", 0.97, 0.96),  # a typographic minus
    ("nc4 >= baseline + 1e-3", "nc4 >= baseline + 0.001", 0.01, 0.011),
    ("NC1 > BASELINE * 2", "nc1 > baseline * 2", 0.5, 1.0),
    ("Accuracy<0.9", "accuracy < 0.9", None, 0.9),
])
def test_grammar(text, expression, baseline, threshold):
    check = one(text)
    assert check.expression == expression
    assert check.relative == (baseline is not None)
    assert check.threshold_for(baseline) == pytest.approx(threshold, rel=1e-15)
    assert one(check.expression) == check  # the canonical text parses back to the same check


@pytest.mark.parametrize("text", [
    "nc1 ~ 3", "nc1 > ", "nc1 > baseline / 2", "nc1 > baseline * -1", "nc1 > 2 * baseline", "nc1 > baseline +",
    "nc1 > baseline ± 0.1", "nc1 >> 3", "1 < nc1", "nc1 > base", "nc1 > 0.1 + 0.2",
])
def test_grammar_refuses_other_forms(text):
    with pytest.raises(InputError, match="is not of the form 'METRIC OP NUMBER' or 'METRIC OP baseline"):
        one(text)


@pytest.mark.parametrize(("name", "nearest"), [
    ("nc9", "nc1"), ("acuracy", "accuracy"), ("ncc", "ncc_accuracy"), ("term_b", "mse_term_b"),
    ("NC2", "nc2_equinorm_means"), ("ls_cos", "ls_cosine"),
])
def test_unknown_metric_names_the_nearest_key(name, nearest):
    assert nearest_key(name, METRIC_KEYS) == nearest
    with pytest.raises(InputError) as err:
        one(f"{name} > 1")
    message = str(err.value)
    assert "\n" not in message and f"unknown metric {name!r}; did you mean {nearest!r}?" in message


def test_unknown_metric_without_a_near_one():
    with pytest.raises(InputError) as err:
        one("zzzz > 1")
    assert "did you mean" not in str(err.value) and "metric keys: nc1, cdnv" in str(err.value)


def test_trajectory_keys_in_any_case_and_their_hint():
    known = list(METRIC_KEYS) + [f"{s}.{k}" for s in ("test", "train") for k in METRIC_KEYS]
    assert parse_checks(["TEST.Accuracy < 0.9"], known)[0].metric == "test.accuracy"
    with pytest.raises(InputError, match=r"did you mean 'test.accuracy'\?.*prefix a split"):
        parse_checks(["test.acuracy < 0.9"], known)


def test_baseline_checks_need_a_baseline():
    checks = parse_checks(["nc1 > 0.1", "nc1 > baseline * 1.2"], METRIC_KEYS)
    require_baseline(checks[:1], False)
    with pytest.raises(InputError, match="'nc1 > baseline \\* 1.2' compares with a baseline, and there is none: "
                                         "give --baseline"):
        require_baseline(checks, False)
    require_baseline(checks, True)
    with pytest.raises(InputError, match="compares with a baseline"):
        evaluate(checks, {"nc1": 0.1})


def outcome(text, value, u=None, base=None, u_base=None):
    check = one(text)
    [result] = evaluate([check], {check.metric: value}, uncertainty=None if u is None else {check.metric: u},
                        baseline=None if not check.relative else {check.metric: base},
                        baseline_uncertainty=None if u_base is None else {check.metric: u_base})
    return result


def test_outcomes_without_uncertainty():
    assert outcome("nc1 > 0.1", 0.41)["outcome"] == "failed"
    assert outcome("nc1 > 0.1", 0.05)["outcome"] == "passed"
    assert outcome("nc1 > 0.1", 0.1)["outcome"] == "passed"  # exact: the operator decides at the threshold
    assert outcome("nc1 >= 0.1", 0.1)["outcome"] == "failed"
    assert outcome("nc1 > 0.1", None)["outcome"] == "failed: metric not available"
    assert outcome("nc1 > 0.1", math.nan)["outcome"] == "failed: metric not available"
    base = outcome("nc1 > baseline * 1.2", 0.5, base=0.4)
    assert base["outcome"] == "failed" and base["baseline"] == 0.4 and base["threshold"] == pytest.approx(0.48)
    assert outcome("nc1 > baseline * 1.2", 0.45, base=0.4)["passed"] is True
    missing = outcome("nc1 > baseline", 0.5, base=None)
    assert missing["outcome"] == "failed: baseline not available" and missing["baseline"] is None
    assert all(outcome("nc1 > 0.1", 0.41)[k] is not None for k in ("expression", "metric", "op", "threshold"))


def test_uncertainty_rule_on_an_absolute_threshold():
    # nc1 = 0.5 known to ±10 %: [0.45, 0.55]
    assert outcome("nc1 > 0.52", 0.5, u=0.1)["outcome"] == "undetermined"  # would pass on the point value
    assert outcome("nc1 > 0.48", 0.5, u=0.1)["outcome"] == "undetermined"  # would fail on the point value
    assert outcome("nc1 > 0.45", 0.5, u=0.1)["outcome"] == "undetermined"  # the band is closed
    assert outcome("nc1 > 0.56", 0.5, u=0.1)["outcome"] == "passed"
    assert outcome("nc1 > 0.44", 0.5, u=0.1)["outcome"] == "failed"
    assert outcome("nc1 > 0.52", 0.5, u=0.0)["outcome"] == "passed"  # u = 0 is exact
    assert outcome("nc1 > 0.52", 0.5, u=None)["outcome"] == "passed"  # not stated: 0
    undetermined = outcome("nc1 > 0.52", 0.5, u=0.1)
    assert undetermined["passed"] is False and undetermined["uncertainty"] == pytest.approx(0.05)
    assert check_message(undetermined).startswith("undetermined within its uncertainty (±0.05)")
    assert outcome("nc1 > 0.56", 0.5, u=0.1)["uncertainty"] == pytest.approx(0.05)


def test_an_unbounded_uncertainty_never_passes():
    for u in (math.inf, math.nan, "garbage"):
        assert outcome("nc1 > 1e9", 0.5, u=u)["outcome"] == "undetermined"
    assert outcome("nc4 > 0.5", 0.0, u=math.inf)["outcome"] == "undetermined"  # |v| = 0 but nothing is known
    assert outcome("nc1 > 1e9", 0.5, u=-0.1)["outcome"] == "passed"  # a sign slip: |u| = 0.1


def test_uncertainty_rule_widens_by_the_baselines_own():
    # threshold 1.2 b = 0.48 with b = 0.4 known to ±5 %: ±0.024; value 0.5 known to ±1 %: ±0.005
    assert outcome("nc1 > baseline * 1.2", 0.5, u=0.01, base=0.4)["outcome"] == "failed"  # |0.5-0.48| > 0.005
    widened = outcome("nc1 > baseline * 1.2", 0.5, u=0.01, base=0.4, u_base=0.05)
    assert widened["outcome"] == "undetermined" and widened["uncertainty"] == pytest.approx(0.005 + 0.024)
    # baseline ± NUMBER moves with b itself (slope 1): 0.97 ± 5 % is ±0.0485 around 0.96
    assert outcome("accuracy < baseline - 0.01", 0.95, base=0.97, u_base=0.05)["outcome"] == "undetermined"
    assert outcome("accuracy < baseline - 0.01", 0.95, base=0.97, u_base=0.001)["outcome"] == "failed"
    # the baseline's uncertainty does not enter an absolute check
    assert outcome("nc1 > 0.48", 0.5, u=0.01, u_base=0.5)["outcome"] == "failed"


def test_uncertainty_is_looked_up_per_metric():
    checks = parse_checks(["nc1 > 0.52", "nc3 > 0.52"], METRIC_KEYS)
    results = evaluate(checks, {"nc1": 0.5, "nc3": 0.5}, uncertainty={"nc1": 0.1})
    assert [r["outcome"] for r in results] == ["undetermined", "passed"]
