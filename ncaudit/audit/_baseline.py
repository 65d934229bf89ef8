"""Baselines: a saved JSON report (schema ``ncaudit.report/1``) read back as an :class:`AuditResult`, or a cache
audited; and whether two results may be held against each other (the same schema, classes and feature width).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from ncaudit.audit._checks import Check
from ncaudit.audit._result import METRIC_KEYS, REPORT_SCHEMA, AuditResult
from ncaudit.errors import InputError

#: The largest JSON report read back (a report of 21,843 classes with per-class rows is ~10 MB).
MAX_REPORT_BYTES = 512 * 2**20
_SAVE = "save one with `ncaudit report OLD.h5 --output OLD.json`, or give the cache itself"


def _is_hdf5(path: Path) -> bool:
    import h5py

    try:
        return bool(h5py.is_hdf5(path))
    except OSError:
        return False


def load_result(path: Path, audit_cache: Callable[[Path], AuditResult], flag: str = "--baseline") -> AuditResult:
    """The result that ``path`` holds: a saved JSON report read back, or a feature cache audited by ``audit_cache``.

    Raises
    ------
    InputError
        No such file, neither HDF5 nor a JSON report, a report of another schema version or a malformed one.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{flag} {path}: no such file; give a saved report (JSON) or a feature cache")
    if path.is_dir():
        raise InputError(f"{flag} {path}: is a directory; give a saved report (JSON) or a feature cache")
    if _is_hdf5(path):
        return audit_cache(path)
    return read_report(path, flag)


def read_report(path: Path, flag: str = "--baseline") -> AuditResult:
    """A JSON report written by ``ncaudit report --json`` / ``--output``, as an :class:`AuditResult`.

    Raises
    ------
    InputError
        Too large, not JSON, another schema (a trajectory, another version), or a field of the wrong type.
    """
    size = path.stat().st_size
    if size > MAX_REPORT_BYTES:
        raise InputError(f"{flag} {path}: {size} bytes is more than a report holds ({MAX_REPORT_BYTES} at most); "
                         "give a saved report (JSON) or a feature cache")
    try:
        data = json.loads(path.read_bytes().decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, json.JSONDecodeError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise InputError(f"{flag} {path}: neither a feature cache (HDF5) nor a JSON report ({reason}); {_SAVE}") \
            from None
    except OSError as exc:
        raise InputError(f"{flag} {path}: cannot read it ({exc.strerror or exc})") from None
    return result_from_json(data, f"{flag} {path}")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not strict JSON")


def result_from_json(data: Any, where: str = "the report") -> AuditResult:
    """The inverse of :func:`~ncaudit.audit.result_to_json`: an :class:`AuditResult` from its JSON report (schema
    ``ncaudit.report/1``: a saved report, a row of a trajectory file), checked field by field; the checks are read
    back, ``passed`` follows from them. ``where`` names the report in error messages.

    Raises
    ------
    InputError
        Not a report of this schema, or a field of the wrong type.
    """
    if not isinstance(data, dict):
        raise InputError(f"{where}: is JSON but not an ncaudit report (not an object); {_SAVE}")
    schema = data.get("schema")
    if schema != REPORT_SCHEMA:
        if isinstance(schema, str) and schema.startswith("ncaudit.trajectory/"):
            raise InputError(f"{where}: is a trajectory ({schema}), not a report of one cache; {_SAVE}")
        if isinstance(schema, str) and schema.startswith("ncaudit.report/"):
            raise InputError(f"{where}: is a report of schema {schema}, and this ncaudit reads {REPORT_SCHEMA}: "
                             "re-create it with this version (`ncaudit report OLD.h5 --output OLD.json`), or give the "
                             "cache itself")
        raise InputError(f"{where}: schema {schema!r} is not {REPORT_SCHEMA}; {_SAVE}")
    metrics = _field(data, "metrics", dict, where)
    for key, value in metrics.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise InputError(f"{where}: metrics.{key} is {value!r}, not a number or null; {_SAVE}")
    details = _field(data, "details", dict, where, {})
    uncertainty = details.get("uncertainty", {})
    if not isinstance(uncertainty, dict) or any(
            v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))) for v in uncertainty.values()):
        raise InputError(f"{where}: details.uncertainty is not an object of numbers (metric key -> relative "
                         f"uncertainty); {_SAVE}")
    return AuditResult(
        source=_field(data, "source", dict, where, {}),
        n_samples=_count(data, "n_samples", where, minimum=0),
        n_features=_count(data, "n_features", where),
        n_classes=_count(data, "n_classes", where),
        class_counts=_field(data, "class_counts", list, where, []),
        # A report of chosen --metrics (details.computed) holds those keys only: the others stay absent
        metrics={k: (None if v is None or not math.isfinite(v) else float(v))
                 for k, v in {**({} if "computed" in details else dict.fromkeys(METRIC_KEYS)), **metrics}.items()},
        details=details,
        per_class=_field(data, "per_class", list, where, []),
        layers=_field(data, "layers", dict, where, {}),
        warnings=_field(data, "warnings", list, where, []),
        checks=_field(data, "checks", list, where, []),
    )


_MISSING = object()


def _field(data: dict[str, Any], key: str, kind: type, where: str, default: Any = _MISSING) -> Any:
    value = data.get(key, default)
    if value is _MISSING:
        raise InputError(f"{where}: has no {key!r}: not an ncaudit report; {_SAVE}")
    if not isinstance(value, kind):
        raise InputError(f"{where}: {key!r} is a {type(value).__name__}, not a {kind.__name__}; {_SAVE}")
    return value


def _count(data: dict[str, Any], key: str, where: str, minimum: int = 1) -> int:
    value = _field(data, key, int, where)
    if isinstance(value, bool) or value < minimum:
        raise InputError(f"{where}: {key!r} is {value!r}, not a whole number >= {minimum}; {_SAVE}")
    return value


def check_comparable(new: AuditResult, old: AuditResult, where: str, *, same_width: bool = True,
                     this: str = "this audit") -> list[str]:
    """Refuse a baseline that audits other classes, another feature width (unless ``same_width`` is False) or
    features normalised otherwise; return notes on softer differences (ridge, rcond, feature width). ``where``
    names the baseline in messages (``--baseline OLD.json``), ``this`` the audit held against it.

    Raises
    ------
    InputError
        Another class count, feature width or normalisation.
    """
    if new.n_classes != old.n_classes:
        raise InputError(f"{where}: has {old.n_classes} classes and {this} {new.n_classes}; compare audits of "
                         "the same classes (the same head and label set)")
    if same_width and new.n_features != old.n_features:
        raise InputError(f"{where}: has {old.n_features} features and {this} {new.n_features}; a baseline must "
                         "have the same feature width (the same penultimate layer)")
    if bool(new.details.get("normalized")) != bool(old.details.get("normalized")):
        which, other = ("with", "without") if old.details.get("normalized") else ("without", "with")
        raise InputError(f"{where}: was audited {which} --normalize and {this} {other} it; audit both the same way")
    notes = []
    if new.n_features != old.n_features:
        notes.append(f"{where}: {old.n_features} features against {new.n_features} in {this}")
    for key, flag in (("ridge", "--ridge"), ("rcond", "--rcond")):
        a, b = old.details.get(key), new.details.get(key)
        if a != b:
            notes.append(f"{where}: audited with {flag} {a}, {this} with {b}: the least-squares metrics differ "
                         "by construction")
    return notes


def baseline_info(path: Path, old: AuditResult) -> dict[str, Any]:
    """What a report records of its baseline: the file and the provenance of the cache it audits."""
    src = old.source
    return {"path": str(path), "source": src.get("path"), "n_samples": old.n_samples,
            **{k: src[k] for k in ("model", "checkpoint", "checkpoint_sha256", "split") if src.get(k) is not None}}


def require_baseline_metrics(checks: Sequence[Check], old: AuditResult, where: str) -> None:
    """Refuse a baseline check whose metric the baseline did not compute (a report made with other ``--metrics``).

    Raises
    ------
    InputError
        The first such check, naming what the baseline computed and the fix.
    """
    for check in checks:
        if check.relative and check.metric not in old.metrics:
            computed = old.details.get("computed")
            what = f"it was made with --metrics {','.join(map(str, computed))}" if isinstance(computed, list) else \
                "it has no such key"
            raise InputError(f"--fail-if {check.expression!r}: {where} holds no {check.metric} ({what}); give a "
                             f"baseline that computed {check.metric} (a full report, or the cache itself)")
