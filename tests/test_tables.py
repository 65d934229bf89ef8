"""Every table renders every value and label whole at 60, 80 and 100 columns: the printed numbers are parsed back
and compared with the result at the printed precision (the report with ImageNet's longest class names, per class
and per layer; the trajectory, narrow and wide, with its test-collapse table and a label longer than the width)."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import pytest
from reference import planted
from rich.console import Console

from ncaudit.audit import AuditOptions, audit, audit_trajectory
from ncaudit.cache import write_cache
from ncaudit.models import imagenet_classes
from ncaudit.report import checks_table, layers_table, metrics_table, per_class_table, trajectory_table
from ncaudit.report._table import LAYER_COLUMNS
from ncaudit.report._trajectory_table import MEANS_COLUMNS, _trajectory_columns

WIDTHS = (60, 80, 100)
C = 12
_NUMBER = re.compile(r"^[-−+]?(\d+)(?:\.(\d+))?(?:e([-−+]?\d+))?$")


def render(renderable: object, width: int) -> list[str]:
    console = Console(width=width, file=io.StringIO(), record=True, color_system=None)
    console.print(renderable)
    lines = console.export_text().splitlines()
    assert all(len(line) <= width for line in lines), [line for line in lines if len(line) > width]
    assert not any(re.search(r"\d…|…\d|\.…", line) for line in lines), "a number was cut"
    return lines


def parse(token: str) -> float | None:
    """A printed value back as a float (None for '—'); an uncertainty suffix (' ±31%') is ignored."""
    token = token.split(" ±")[0].strip()
    if token == "—":
        return None
    assert _NUMBER.match(token), f"not a whole number: {token!r}"
    return float(token.replace("−", "-"))


def agrees(token: str, value: float | None) -> bool:
    """``token`` is ``value`` at the printed precision: within half a unit of its last printed digit."""
    got = parse(token)
    if got is None or value is None:
        return got is None and value is None
    if token == "0":  # written only for an exact zero
        return value == 0
    match = _NUMBER.match(token.split(" ±")[0].strip())
    assert match is not None
    decimals = len(match.group(2) or "")
    exponent = int((match.group(3) or "0").replace("−", "-"))
    half = 0.5 * 10.0 ** (exponent - decimals)
    return abs(got - value) <= half * (1 + 1e-9) + 1e-300


def row_key(rows: dict[str, list[str]], label: str) -> str:
    """The parsed row of ``label``: itself, or the first line of it when it was folded."""
    if label in rows:
        return label
    folded = [k for k in rows if label.startswith(k) and len(k) >= 8]
    assert len(folded) == 1, (label, list(rows))
    return folded[0]


def data_rows(lines: list[str], keys: int) -> dict[str, list[str]]:
    """Each data row of stacked tables: its key fields (joined) -> every value field, block after block in order.
    Fields are separated by two spaces or more; a line of key fields only continues the key of the row above (a
    folded label)."""
    rows: dict[str, list[str]] = {}
    last: str | None = None
    body = False
    for line in lines:
        if set(line.strip()) == {"─"}:
            body = True
            continue
        if not line.strip():
            body, last = False, None
            continue
        if not body:
            continue
        fields = re.split(r"\s{2,}", line.strip())
        if len(fields) <= keys and last is not None:
            continue  # the rest of a folded label (the row is named by its first line)
        key, values = " ".join(fields[:keys]), fields[keys:]
        last = key
        rows.setdefault(key, []).extend(values)
    return rows


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory):
    """A report with the twelve longest ImageNet class names, two earlier layers and a failed check."""
    names, _ = imagenet_classes("imagenet-1k")
    longest = sorted(names, key=len, reverse=True)[:C]
    h, y, etf = planted(C=C, p=16, n=20, sigma=0.02, offset=5.0, seed=1)
    rng = np.random.default_rng(0)
    layers = {"stages.1": h[:, :8] + rng.standard_normal((len(y), 8)), "layer3.conv": h @ rng.standard_normal((16, 24))}
    path = write_cache(tmp_path_factory.mktemp("tables") / "in.h5", h, y, weight=etf * 3.1 + 1e-4 * rng.standard_normal(
        etf.shape), bias=1e-3 * rng.standard_normal(C), class_names=longest, layers=layers, attrs={"model": "planted"})
    out = audit(path, AuditOptions(device="cpu", layers=[]))
    from ncaudit.audit import evaluate, parse_checks
    out.checks = evaluate(parse_checks(["nc1>1e-9", "accuracy<0.5"], ["nc1", "accuracy"]), out.metrics)
    return out


@pytest.mark.parametrize("width", WIDTHS)
def test_metrics_table_round_trips(result, width: int) -> None:
    text = render(metrics_table(result), width)
    found = {}
    for line in text:
        match = re.match(r"^  ([a-z0-9_]+)\s+(\S+)(?:\s|$)", line)
        if match:
            found[match.group(1)] = match.group(2)
    hidden = {"nc2_orthogonality_means", "nc2_orthogonality_classifier"} if result.details["has_bias"] else set()
    shown = [k for k, v in result.metrics.items() if v is not None and k not in hidden]  # (shown for bias-free heads)
    assert set(shown) <= set(found), set(shown) - set(found)
    for key in shown:
        assert agrees(found[key], result.metrics[key]), (key, found[key], result.metrics[key])


@pytest.mark.parametrize("width", WIDTHS)
def test_per_class_table_round_trips_with_imagenet_names(result, width: int) -> None:
    lines = render(per_class_table(result), width)
    rows = data_rows(lines, keys=2)
    columns = ["count", "mean_norm", "classifier_norm", "variance", "nc1", "accuracy", "ncc_accuracy"]
    assert len(rows) == C
    for row in result.per_class:
        key = next(k for k in rows if k.split(" ", 1)[0] == str(row["class"]))
        index, name = key.split(" ", 1)
        assert name.rstrip("…").rstrip() and row["name"].startswith(name.rstrip("…").rstrip())  # abbreviated, kept
        assert len(name) >= 16 or name == row["name"]
        values = rows[key]
        assert len(values) == len(columns), (key, values)
        for column, token in zip(columns, values):
            assert agrees(token, row[column]), (row["class"], column, token, row[column])


@pytest.mark.parametrize("width", WIDTHS)
def test_layers_and_checks_tables_round_trip(result, width: int) -> None:
    rows = data_rows(render(layers_table(result), width), keys=1)
    for name, block in [*result.layers.items(), ("(final)", {**result.metrics, "n_features": result.n_features})]:
        values = rows[name]
        assert int(values[0]) == block["n_features"]
        for (key, _), token in zip(LAYER_COLUMNS, values[1:], strict=True):
            assert agrees(token, block[key]), (name, key, token)
    checks = data_rows(render(checks_table(result), width), keys=1)
    for check in result.checks:
        token, outcome = checks[check["expression"]]
        assert agrees(token, check["value"]) and outcome == check["outcome"]


@pytest.fixture(scope="module")
def trajectory(tmp_path_factory: pytest.TempPathFactory):
    """Five checkpoints on train and test, values from 1e-4 to units; the test caches audited against the training
    means; one checkpoint with a long label (no epoch in its name)."""
    tmp = tmp_path_factory.mktemp("traj")
    paths = []
    stems = ["run_e000", "run_e001", "run_e050", "run_e200", "r50-imagenet-baseline-lr0.1-final-swa-averaged-weights"]
    for i, (stem, sigma) in enumerate(zip(stems, (0.9, 0.5, 0.05, 0.004, 0.0002))):
        h, y, etf = planted(C=5, p=8, n=60, sigma=sigma, offset=3.0, seed=10 * i)  # one network: train = even rows
        for split, rows in (("train", slice(0, None, 2)), ("test", slice(1, None, 2))):
            paths.append(write_cache(tmp / f"{i}_{split}.h5", h[rows], y[rows], weight=etf * 1.1, bias=np.zeros(5),
                                     attrs={"checkpoint": f"/runs/{stem}.pth", "checkpoint_sha256": f"s{i}",
                                            "split": split, "model": "planted"}))
    rows, _ = audit_trajectory(paths, AuditOptions(device="cpu"), train_means=True)
    return rows


@pytest.mark.parametrize("width", WIDTHS)
@pytest.mark.parametrize("wide", [False, True])
def test_trajectory_table_round_trips(trajectory, width: int, wide: bool) -> None:
    from ncaudit.audit._trajectory import split_order

    lines = render(trajectory_table(trajectory, wide=wide), width)
    assert "epoch 200" in "\n".join(lines) and "epoch 2\n" not in "\n".join(lines)
    main = lines[: next(i for i, line in enumerate(lines) if "against the training" in line)]
    rows = data_rows(main, keys=1)
    columns = [(k, s) for k, s, _ in _trajectory_columns(split_order(trajectory), wide)
               if k != "nc1_precision_floor"]
    for row in trajectory:
        key = row_key(rows, row.label)
        values = rows[key]
        assert len(values) == len(columns), (row.label, values)
        for (metric, split), token in zip(columns, values):
            assert agrees(token, row.value(f"{split}.{metric}" if split else metric)), (row.label, metric, token)
    long_label = trajectory[-1].label
    assert len(long_label) > 40 and long_label.replace("-", "") in "".join(
        line.strip().split("  ")[0] for line in main).replace("-", "")  # folded, every character kept


@pytest.mark.parametrize("width", WIDTHS)
def test_test_collapse_table_round_trips(trajectory, width: int) -> None:
    lines = render(trajectory_table(trajectory), width)
    start = next(i for i, line in enumerate(lines) if "against the training" in line)
    rows = data_rows(lines[start:], keys=1)
    for row in trajectory:
        key = row_key(rows, row.label)
        test = row.splits["test"]
        own = test.details["means_from"]["own_means"]
        expected = [v for metric, _ in MEANS_COLUMNS for v in (test.metrics[metric], own[metric])]
        assert len(rows[key]) == len(expected)
        for token, value in zip(rows[key], expected):
            assert agrees(token, value), (row.label, token, value)


def test_agrees_is_strict() -> None:
    assert agrees("8.60e-4", 8.6049e-4) and not agrees("8.60e-4", 8.606e-4)
    assert agrees("0.0131", 0.01314) and not agrees("0.0131", 0.0132)
    assert agrees("16.4", 16.37) and agrees("1", 1.0) and agrees("—", None) and not agrees("0", 1e-20)
    assert math.isclose(parse("−0.016 ±31%"), -0.016)  # type: ignore[arg-type]
