"""Formats CI systems render: --format markdown parsed by a markdown parser (tables, failed checks first, nothing in
the data read as markup), --junit validated against the JUnit schema GitLab and Jenkins read, written atomically."""

from __future__ import annotations

import json
import os
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest
import xmlschema
from markdown_it import MarkdownIt
from reference import planted
from typer.testing import CliRunner

from ncaudit.audit import METRIC_KEYS, evaluate, parse_checks
from ncaudit.cache import write_cache
from ncaudit.cli import app
from ncaudit.report import render_junit
from ncaudit.report._markdown import md_code

runner = CliRunner()
SCHEMA = xmlschema.XMLSchema(Path(__file__).parent / "data" / "junit.xsd")
#: A model name, a path and class names that try every trick: table cells, HTML, mentions, code fences, controls.
HOSTILE = "a|b <img src=x onerror=alert(1)> @here `tick` **bold** [link](http://x) $x$ \x07\u2028end"


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def caches(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ci")
    out = {}
    for name, sigma, split in (("e1", 0.05, "train"), ("e2", 0.01, "train"), ("e2t", 0.02, "test")):
        h, y, etf = planted(C=4, p=6, n=30, sigma=sigma, offset=5.0, seed=len(name))
        out[name] = write_cache(tmp / f"{name}.h5", h, y, weight=etf, bias=-etf @ np.full(6, 5.0),
                                class_names=["a", "b|c", "<b>", "`d`"],
                                attrs={"model": HOSTILE, "split": split, "checkpoint": f"/runs/{name[:2]}.pth",
                                       "checkpoint_sha256": name[:2]})
    return out


def parse_markdown(text: str):
    md = MarkdownIt("commonmark").enable("table")
    return md, md.parse(text)


def tables(tokens) -> list[list[list[str]]]:
    """Each table as rows of cell texts (inline content as rendered text), header row first."""
    out, rows, row, cell = [], None, None, None
    for tok in tokens:
        if tok.type == "table_open":
            rows = []
        elif tok.type == "tr_open":
            row = []
        elif tok.type in ("th_open", "td_open"):
            cell = ""
        elif tok.type == "inline" and cell is not None:
            cell = "".join(child.content for child in tok.children or [])
        elif tok.type in ("th_close", "td_close"):
            row.append(cell)
            cell = None
        elif tok.type == "tr_close":
            rows.append(row)
        elif tok.type == "table_close":
            out.append(rows)
    return out


def assert_safe_html(html: str):
    """Nothing of the data became markup: no tag but the table's, the folded block's and code spans."""
    for bad in ("<img", "<b>", "<strong>bold", "<a ", "<em"):
        assert bad not in html, bad
    assert "\x07" not in html


def test_report_markdown(caches, tmp_path):
    res = invoke("report", caches["e2"], "-q", "--format", "markdown", "--fail-if", "nc1 > 1",
                 "--fail-if", "nc1 < 1e-9", "--fail-if", "accuracy < 2", "--fail-if", "ncc_accuracy < 0.5")
    assert res.exit_code == 1, res.stderr
    md, tokens = parse_markdown(res.stdout)
    html = md.render(res.stdout)
    assert_safe_html(html)
    assert res.stdout.startswith("### ncaudit report · ❌ 1 of 4 checks failed")
    checks, headline, every = tables(tokens)
    assert checks[0] == ["", "check (fails if)", "outcome", "why"]
    assert [r[1] for r in checks[1:]] == ["accuracy < 2", "nc1 > 1", "nc1 < 1e-09", "ncc_accuracy < 0.5"]
    assert [r[2] for r in checks[1:]] == ["failed", "passed", "passed", "passed"]  # the failed check first
    assert checks[1][3].startswith("accuracy = 1 < 2")
    assert headline[0] == ["acc", "NC1", "NC2 norm μ", "NC2 angle μ", "NC3", "NC4"] and len(headline) == 2
    assert [r[0] for r in every[1:]] == list(METRIC_KEYS) and all(len(r) == 3 for r in every)
    assert any("mean |cos + 1/(C−1)|" in r[2] for r in every)  # a pipe in a cell stays in its cell
    assert "<details>" in html
    # the hostile model name is one code span: its pipe, tag, mention and backticks are text, shown as written
    assert "<code>a|b &lt;img src=x onerror=alert(1)&gt; @here `tick` **bold** [link](http://x) $x$" in html


def test_per_class_markdown(caches):
    res = invoke("report", caches["e2"], "-q", "--format", "markdown", "--per-class")
    md, tokens = parse_markdown(res.stdout)
    assert_safe_html(md.render(res.stdout))
    per_class = tables(tokens)[-1]
    assert per_class[0] == ["class", "name", "n", "NC1", "acc", "NCC acc"]
    assert [r[:3] for r in per_class[1:]] == [["0", "a", "30"], ["1", "b|c", "30"], ["2", "<b>", "30"],
                                              ["3", "`d`", "30"]]  # class names shown as written


def test_no_checks_and_json_alias(caches):
    res = invoke("report", caches["e2"], "-q", "--format", "markdown")
    assert res.exit_code == 0 and res.stdout.startswith("### ncaudit report\n")
    assert len(tables(parse_markdown(res.stdout)[1])) == 2  # no checks table
    a, b = invoke("report", caches["e2"], "-q", "--json"), invoke("report", caches["e2"], "-q", "--format", "json")
    assert json.loads(a.stdout)["metrics"] == json.loads(b.stdout)["metrics"]
    assert invoke("report", caches["e2"], "-q", "--json", "--format", "json").exit_code == 0
    res = invoke("report", caches["e2"], "-q", "--json", "--format", "table")
    assert res.exit_code == 2 and "--json and --format table" in res.stderr
    assert invoke("report", caches["e2"], "-q", "--format", "html").exit_code == 2


def test_md_code_spans():
    md = MarkdownIt("commonmark").enable("table")
    for text in ("plain", "a`b", "``x``", " lead", "a|b", "x\ny", "`", "@team"):
        cell = md_code(text)
        rendered = md.render(f"| h |\n|---|\n| {cell} |\n")
        assert rendered.count("<code>") == 1, (text, cell, rendered)
    assert md_code("") == "" and md_code("\x00") == ""


def validate(path: Path) -> ET.Element:
    SCHEMA.validate(str(path))  # raises on any departure from the structure
    root = ET.parse(path).getroot()
    for suite in root.iter("testsuite"):
        cases = suite.findall("testcase")
        assert int(suite.get("tests")) == len(cases)
        assert int(suite.get("failures")) == sum(c.find("failure") is not None for c in cases)
    assert int(root.get("tests")) == sum(int(s.get("tests")) for s in root.iter("testsuite"))
    return root


def test_report_junit(caches, tmp_path):
    fuzzy = tmp_path / "fuzzy.json"
    invoke("report", caches["e1"], "-q", "-o", fuzzy)
    data = json.loads(fuzzy.read_text())
    data["details"]["uncertainty"] = {"nc1": 2.0}  # the baseline's NC1 is known to a factor of 3
    fuzzy.write_text(json.dumps(data))
    junit = tmp_path / "out" / "junit.xml"
    res = invoke("report", caches["e2"], "-q", "--baseline", fuzzy, "--junit", junit, "--fail-if", "nc1 > 1",
                 "--fail-if", "accuracy < 2", "--fail-if", "nc1 > baseline * 0.2",
                 "--fail-if", "nc1_precision_floor > 1")
    assert res.exit_code == 1, res.stderr
    root = validate(junit)
    cases = {c.get("name"): c for c in root.iter("testcase")}
    assert list(cases) == ["nc1 > 1", "accuracy < 2", "nc1 > baseline * 0.2", "nc1_precision_floor > 1"]
    assert cases["nc1 > 1"].find("failure") is None
    failed = cases["accuracy < 2"].find("failure")
    assert failed.get("type") == "failed" and failed.get("message").startswith("accuracy = 1 < 2")
    report = json.loads(invoke("report", caches["e2"], "-q", "--json", "--baseline", fuzzy,
                               "--fail-if", "nc1 > baseline * 0.2").stdout)
    assert report["checks"][0]["outcome"] == "undetermined"
    undetermined = cases["nc1 > baseline * 0.2"].find("failure")
    assert undetermined.get("type") == "undetermined"
    assert undetermined.get("message").startswith("undetermined within its uncertainty (±")
    assert "baseline:" in undetermined.text
    assert cases["nc1_precision_floor > 1"].find("failure").get("type") == "not available"
    props = {p.get("name"): p.get("value") for p in root.iter("property")}
    assert props["n_classes"] == "4" and props["baseline"] == str(fuzzy)
    assert props["model"] == HOSTILE.replace("\x07", "\\x07")  # a control character XML cannot hold, spelled out
    assert root.find("testsuite").get("name") == f"ncaudit report {caches['e2']}"
    assert {c.get("classname") for c in cases.values()} == {"ncaudit report"}


def test_junit_of_no_checks_and_of_hostile_names():
    checks = evaluate(parse_checks(["nc1 > 0.1"], METRIC_KEYS), {"nc1": 0.5})
    xml = render_junit("suite \x00\ud800 <&>", checks, properties={"x": "\x1b[31mred", "none": None},
                       warnings=["w1", "w2 \x0c"])
    root = ET.fromstring(xml.encode())
    SCHEMA.validate(xml)
    assert root.find("testsuite").get("name") == "suite \\x00\\ud800 <&>"
    assert [p.get("name") for p in root.iter("property")] == ["x"]
    assert root.find("testsuite/system-out").text == "w1\nw2 \\x0c"
    empty = render_junit("nothing", [])
    SCHEMA.validate(empty)
    assert ET.fromstring(empty.encode()).find("testsuite").get("tests") == "0"


def test_junit_is_written_atomically(caches, tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text("previous")
    one = invoke("report", caches["e2"], "-q", "--junit", junit, "--fail-if", "nc1 > 1")
    assert one.exit_code == 0 and validate(junit) is not None
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".junit.xml.")]  # no temporary file left
    before = junit.read_bytes()
    bad = invoke("report", caches["e2"], "-q", "--junit", junit, "--fail-if", "nc1 > baseline")
    assert bad.exit_code == 2 and junit.read_bytes() == before  # bad input: nothing written
    same = invoke("report", caches["e2"], "-q", "--junit", junit, "-o", junit)
    assert same.exit_code == 2 and "--output and --junit name the same file" in same.stderr
    assert invoke("report", caches["e2"], "-q", "--junit", caches["e1"]).exit_code == 2  # a cache is never replaced
    assert caches["e1"].stat().st_size > 1000
    if os.geteuid() != 0:  # root writes anywhere
        locked = tmp_path / "locked"
        locked.mkdir()
        locked.chmod(0o500)
        res = invoke("report", caches["e2"], "-q", "--junit", locked / "j.xml")
        assert res.exit_code == 2 and "cannot write --junit" in res.stderr


def test_trajectory_and_compare_formats(caches, tmp_path):
    paths = [caches["e1"], caches["e2"], caches["e2t"]]
    res = invoke("trajectory", *paths, "-q", "--format", "markdown", "--fail-if", "nc1 > 1e-9",
                 "--fail-if", "test.accuracy < 0.5", "--junit", tmp_path / "t.xml")
    assert res.exit_code == 1
    md, tokens = parse_markdown(res.stdout)
    assert_safe_html(md.render(res.stdout))
    checks, rows = tables(tokens)
    assert [r[2] for r in checks[1:]] == ["failed", "passed"]
    assert rows[0][:3] == ["checkpoint", "acc train", "acc test"] and [r[0] for r in rows[1:]] == ["epoch 1", "epoch 2"]
    assert all(len(r) == len(rows[0]) for r in rows)
    root = validate(tmp_path / "t.xml")
    assert root.find("testsuite").get("failures") == "1"
    res = invoke("compare", caches["e1"], caches["e2"], "-q", "--format", "markdown", "--fail-if",
                 "nc1 > baseline", "--fail-if", "nc1 < baseline * 0.5", "--junit", tmp_path / "c.xml")
    assert res.exit_code == 1
    md, tokens = parse_markdown(res.stdout)
    assert_safe_html(md.render(res.stdout))
    checks, table = tables(tokens)
    assert [r[1] for r in checks[1:]] == ["nc1 < baseline * 0.5", "nc1 > baseline"]
    assert table[0] == ["metric", "A", "B", "change", "relative", "verdict"]
    assert [r[0] for r in table[1:]] == list(METRIC_KEYS)
    nc1 = table[1]
    assert nc1[5] == "better" and nc1[3].startswith("-") and nc1[4].endswith("%")
    validate(tmp_path / "c.xml")
    assert res.stdout.startswith("### ncaudit compare: ")
