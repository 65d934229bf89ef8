"""JUnit XML: each ``--fail-if`` check as a test case, for the test reports of GitLab, Jenkins, Azure and GitHub.

The structure those tools read (``tests/data/junit.xsd`` holds it as a schema)::

    <testsuites name tests failures errors skipped time>
      <testsuite name tests failures errors skipped time timestamp>
        <properties><property name value/>...</properties>      what was audited (path, model, split, N, p, C)
        <testcase classname name time>                            one per check; name = its expression
          <failure message type>details</failure>                 a failed or undetermined check
        </testcase>
        <system-out>warnings</system-out>
      </testsuite>
    </testsuites>

A failed check and an undetermined one (its uncertainty could flip it) are both ``<failure>``s, with
``type="failed"`` or ``type="undetermined"`` and the message that says why; a metric that could not be computed is
a failure too (``type="not available"``). No check is an ``<error>`` or ``<skipped>``: bad input exits 2 before any
report is written.
"""

from __future__ import annotations

import datetime as _dt
import re
import xml.etree.ElementTree as ET
from collections.abc import Mapping, Sequence
from typing import Any

from ncaudit.report._checks import check_message
from ncaudit.report._format import fmt

_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def xml_text(value: Any) -> str:
    """A string that XML 1.0 can hold: characters it forbids (control characters, lone surrogates) as ``\\xNN`` /
    ``\\uNNNN``."""
    return _NOT_XML.sub(lambda m: f"\\x{n:02x}" if (n := ord(m.group())) < 256 else f"\\u{n:04x}", str(value))


def _type(check: dict[str, Any]) -> str:
    outcome = str(check.get("outcome", "failed"))
    return "not available" if "not available" in outcome else outcome


def _details(check: dict[str, Any]) -> str:
    lines = [f"value: {fmt(check.get('value'))}", f"threshold: {fmt(check.get('threshold'))}"]
    if "baseline" in check:
        lines.append(f"baseline: {fmt(check.get('baseline'))}")
    if check.get("uncertainty"):
        lines.append(f"uncertainty: ±{fmt(check.get('uncertainty'))}")
    return "\n".join(lines)


def render_junit(
    suite: str,
    checks: Sequence[dict[str, Any]],
    *,
    properties: Mapping[str, Any] | None = None,
    warnings: Sequence[str] = (),
    time: float = 0.0,
    classname: str = "ncaudit report",
    timestamp: _dt.datetime | None = None,
) -> str:
    """The checks as one JUnit test suite (an XML document, UTF-8 declared).

    Parameters
    ----------
    suite : the suite's name (``ncaudit report model-train.h5``).
    checks : evaluated checks (``ncaudit.audit.evaluate``); each becomes a test case named by its expression.
    properties : what was audited, as ``<property>`` elements (None values left out).
    warnings : the audit's warnings, as the suite's ``<system-out>``.
    time : seconds the command took (the suite's and the document's ``time``).
    classname : the test cases' class name (GitLab shows it as the suite).
    timestamp : when the suite ran (default: now, UTC).
    """
    failures = sum(not c.get("passed") for c in checks)
    counts = {"tests": str(len(checks)), "failures": str(failures), "errors": "0", "skipped": "0",
              "time": f"{max(time, 0.0):.3f}"}
    root = ET.Element("testsuites", {"name": "ncaudit", **counts})
    when = (timestamp or _dt.datetime.now(_dt.timezone.utc)).replace(microsecond=0, tzinfo=None)
    node = ET.SubElement(root, "testsuite", {"name": xml_text(suite), **counts, "timestamp": when.isoformat()})
    props = {k: v for k, v in (properties or {}).items() if v is not None}
    if props:
        holder = ET.SubElement(node, "properties")
        for key, value in props.items():
            ET.SubElement(holder, "property", {"name": xml_text(key), "value": xml_text(value)})
    for check in checks:
        case = ET.SubElement(node, "testcase", {"classname": xml_text(classname),
                                                "name": xml_text(check.get("expression", "")), "time": "0"})
        if not check.get("passed"):
            failure = ET.SubElement(case, "failure", {"message": xml_text(check_message(check)),
                                                      "type": _type(check)})
            failure.text = xml_text(_details(check))
    if warnings:
        ET.SubElement(node, "system-out").text = xml_text("\n".join(warnings))
    ET.indent(root)
    return '<?xml version="1.0" encoding="UTF-8"?>\n' + ET.tostring(root, encoding="unicode") + "\n"
