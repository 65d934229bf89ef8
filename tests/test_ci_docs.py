"""The CI recipes of docs/ci.md run as written: the commands are parsed out of docs/ci/github-workflow.yml,
docs/ci/gitlab-ci.yml and the "Make the baseline" block, and run on the bundled checkpoints (not copied here).

Skipped, because they need the network or a CI service: installs (``pip install``), the pull-request comment
(``gh``) and the ``uses:`` actions (checkout, setup-python, the JUnit publisher, the artifact upload).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import xmlschema
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
SCHEMA = xmlschema.XMLSchema(Path(__file__).parent / "data" / "junit.xsd")
CHECKPOINTS = ROOT / "fixtures" / "checkpoints"


def runnable(command: str) -> bool:
    return "pip install" not in command and not command.lstrip().startswith("gh ")


def baseline_commands() -> str:
    text = (DOCS / "ci.md").read_text()
    match = re.search(r"<!-- ci-baseline -->\s*```bash\n(.*?)```", text, re.S)
    assert match, "docs/ci.md lost its marked 'Make the baseline' block"
    return match.group(1)


def github_job() -> tuple[dict[str, str], list[dict]]:
    workflow = yaml.safe_load((DOCS / "ci" / "github-workflow.yml").read_text())
    (job,) = workflow["jobs"].values()
    return {k: str(v) for k, v in job["env"].items()}, job["steps"]


def gitlab_job() -> dict:
    (job,) = yaml.safe_load((DOCS / "ci" / "gitlab-ci.yml").read_text()).values()
    return job


def shell(command: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess:
    """``command`` as CI runs it: bash, stopping at the first failing command."""
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"  # this environment's ncaudit
    python_path = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    full = {**os.environ, **env, "PATH": path, "PYTHONPATH": python_path, "HF_HUB_OFFLINE": "1"}
    return subprocess.run(["bash", "-e", "-o", "pipefail", "-c", command], cwd=cwd, env=full, capture_output=True,
                          text=True)


def condition_holds(condition: str | None, failed: bool, cwd: Path) -> bool:
    """The few GitHub expressions the workflow uses, on a push event: !cancelled(), hashFiles('F') != '',
    github.event_name == 'pull_request'; without a condition a step runs only while nothing failed."""
    if not condition:
        return not failed
    expr = condition.strip().removeprefix("${{").removesuffix("}}").strip()
    known = r"!cancelled\(\)|hashFiles\('[^']+'\) != ''|github\.event_name == 'pull_request'"
    terms = [t.strip() for t in expr.split("&&")]
    assert all(re.fullmatch(known, t) for t in terms), f"teach this test the expression {condition!r}"
    holds = {"!cancelled()": True, "github.event_name == 'pull_request'": False}
    return all(holds[t] if t in holds else (cwd / re.search(r"'([^']+)'", t).group(1)).exists() for t in terms)


def checkout(target: Path) -> Path:
    """A fresh checkout of a project: the bundled fixtures (linked)."""
    target.mkdir(parents=True, exist_ok=True)
    (target / "fixtures").symlink_to(ROOT / "fixtures")
    return target


@pytest.fixture(scope="module")
def baseline(tmp_path_factory) -> Path:
    """The committed baseline, made by docs/ci.md's commands on the epoch-50 checkpoint (the last accepted model)."""
    cwd = checkout(tmp_path_factory.mktemp("accepted"))
    env, _ = github_job()
    accepted = {**env, "CHECKPOINT": str(CHECKPOINTS / "test_resnet_digits_e050.safetensors")}
    res = shell(baseline_commands(), cwd, accepted)
    assert res.returncode == 0, res.stderr
    assert json.loads((cwd / env["BASELINE"]).read_text())["schema"] == "ncaudit.report/1"
    return cwd / env["BASELINE"]


@pytest.fixture
def workspace(tmp_path, baseline) -> Path:
    """A job's fresh checkout with the baseline committed."""
    cwd = checkout(tmp_path / "project")
    env, _ = github_job()
    (cwd / env["BASELINE"]).parent.mkdir(parents=True)
    (cwd / env["BASELINE"]).write_bytes(baseline.read_bytes())
    return cwd


def test_the_two_jobs_share_their_settings():
    env, _ = github_job()
    assert {k: str(v) for k, v in gitlab_job()["variables"].items()} == env
    assert (ROOT / env["CHECKPOINT"]).exists() and (ROOT / env["DATA"] / env["SPLIT"]).is_dir()
    assert "docs/ci.md" in (ROOT / "README.md").read_text()


def test_github_workflow_passes_a_better_model(workspace):
    env, steps = github_job()
    summary = workspace / "step-summary.md"
    summary.write_text("")
    failed, ran = False, []
    for step in steps:
        if "run" not in step or not runnable(step["run"]) or not condition_holds(step.get("if"), failed, workspace):
            continue
        res = shell(step["run"], workspace, {**env, **{k: str(v) for k, v in step.get("env", {}).items()},
                                             "GITHUB_STEP_SUMMARY": str(summary)})
        ran.append(step["name"])
        assert res.returncode == 0, (step["name"], res.stderr)
    assert ran == ["Extract the features", "Gate against the baseline", "Job summary"]
    text = summary.read_text()
    assert text.startswith("### ncaudit report · ✅ all 2 checks passed")
    assert "baseline `ci/ncaudit-baseline.json`" in text
    SCHEMA.validate(str(workspace / "ncaudit-junit.xml"))
    report = json.loads((workspace / "ncaudit-report.json").read_text())
    baseline = json.loads((workspace / env["BASELINE"]).read_text())
    assert [c["baseline"] for c in report["checks"]] == [baseline["metrics"]["nc1"], baseline["metrics"]["accuracy"]]
    assert report["metrics"]["nc1"] < baseline["metrics"]["nc1"]  # epoch 200 against epoch 50


def test_gitlab_job_fails_a_regression_and_keeps_its_reports(workspace):
    job = gitlab_job()
    variables = {k: str(v) for k, v in job["variables"].items()}
    regressed = {**variables, "CHECKPOINT": str(CHECKPOINTS / "test_resnet_digits_e005.safetensors")}
    assert all(not runnable(c) for c in job["before_script"])
    res = shell("\n".join(c for c in job["script"] if runnable(c)), workspace, regressed)
    assert res.returncode == 1, res.stderr  # the job fails ...
    for artifact in [*job["artifacts"]["paths"], job["artifacts"]["reports"]["junit"]]:
        assert (workspace / artifact).stat().st_size > 0, artifact  # ... and still has every artifact
    assert job["artifacts"]["when"] == "always"
    SCHEMA.validate(str(workspace / "ncaudit-junit.xml"))
    junit = (workspace / "ncaudit-junit.xml").read_text()  # epoch 5 against epoch 50 on the test split:
    assert junit.count("<failure") == 1 and 'tests="2"' in junit  # NC1 regressed, accuracy within 0.01
    assert re.search(r'name="nc1 &gt; baseline \* 1.2" time="0">\s*<failure message="nc1 = ', junit), junit
    assert "❌ 1 of 2 checks failed" in (workspace / "ncaudit-summary.md").read_text()
