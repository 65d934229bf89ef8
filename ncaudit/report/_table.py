"""The report as a rich table: metric groups, per class, per layer, checks."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ncaudit.audit import AuditResult
from ncaudit.report._format import column_format, fmt, fmt_uncertain

#: (group title, [(metric key, one-line meaning)]) in table order.
GROUPS: list[tuple[str, list[tuple[str, str]]]] = [
    ("NC1  within-class variability collapse", [
        ("nc1", "tr(Σ_W Σ_B†)/C, within/between spread → 0"),
        ("cdnv", "class-distance normalised variance → 0"),
        ("nc1_precision_floor", "NC1 from extraction rounding alone"),
    ]),
    ("NC2  convergence to a simplex ETF", [
        ("nc2_equinorm_means", "std/mean of class-mean norms → 0"),
        ("nc2_equinorm_classifier", "std/mean of classifier-row norms → 0"),
        ("nc2_equiangle_means", "std of cosines between means → 0"),
        ("nc2_equiangle_classifier", "std of cosines between rows → 0"),
        ("nc2_maxangle_means", "mean |cos + 1/(C−1)|, means → 0"),
        ("nc2_maxangle_classifier", "mean |cos + 1/(C−1)|, rows → 0"),
        ("nc2_orthogonality_means", "mean |cos|, uncentred means → 0"),
        ("nc2_orthogonality_classifier", "mean |cos|, rows → 0 (orthogonal)"),
    ]),
    ("NC3  self-duality of classifier and means", [
        ("nc3", "‖Wᵀ/‖W‖ − M/‖M‖‖²_F → 0"),
    ]),
    ("NC4  simplification to nearest class mean", [
        ("nc4", "classifier ≠ nearest class mean → 0"),
        ("accuracy", "argmax(Wh + b) = y"),
        ("ncc_accuracy", "nearest class mean = y"),
    ]),
    ("LS  least-squares classifier, MSE decomposition", [
        ("mse_loss", "(1/2N) Σ ‖Wh + b − e_y‖²"),
        ("mse_term_a", "term (A): loss of W_LS, b_LS"),
        ("mse_term_b", "term (B) = L(W,b) − L(W_LS,b_LS) ≥ 0"),
        ("ls_distance", "‖W − W_LS‖/‖W_LS‖ → 0 (central path)"),
        ("ls_cosine", "cos(W, W_LS) → 1"),
    ]),
]

_ORTHOGONALITY = {"nc2_orthogonality_means", "nc2_orthogonality_classifier"}


def metrics_table(result: AuditResult) -> Table:
    """The grouped metric table (NC1 / NC2 / NC3 / NC4 / least squares), each value with its meaning and with the
    digits its uncertainty (``details.uncertainty``) leaves."""
    m = result.metrics
    uncertainty = result.details.get("uncertainty") or {}
    show_orth = not result.details.get("has_bias", True)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False)
    table.add_column("metric", style="bold", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("meaning", style="dim")
    for title, rows in GROUPS:
        shown = [(k, text) for k, text in rows
                 if m.get(k) is not None or (k not in _ORTHOGONALITY and k != "nc1_precision_floor")]
        if not show_orth:
            shown = [(k, t) for k, t in shown if k not in _ORTHOGONALITY]
        if not shown:
            continue
        short, _, long = title.partition("  ")
        table.add_row(Text(short, style="bold cyan"), "", Text(long, style="bold cyan"))
        for key, text in shown:
            table.add_row(f"  {key}", fmt_uncertain(m.get(key), uncertainty.get(key)), text)
        table.add_section()
    return table


def per_class_table(result: AuditResult, limit: int | None = None) -> Table:
    """One row per class: count, mean norm, classifier norm, variance, per-class NC1, accuracies."""
    rows = result.per_class if limit is None else result.per_class[:limit]
    table = Table(title="per class", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
    has_names = any("name" in r for r in rows)
    columns = [("class", "class"), ("name", "name"), ("count", "n"), ("mean_norm", "‖μ−μ_G‖"),
               ("classifier_norm", "‖w‖"), ("variance", "Var"), ("nc1", "NC1"), ("accuracy", "acc"),
               ("ncc_accuracy", "NCC acc")]
    if not has_names:
        columns = [c for c in columns if c[0] != "name"]
    for key, label in columns:
        if key == "name":
            table.add_column(label, justify="left", overflow="ellipsis", max_width=32, no_wrap=True)
        else:
            table.add_column(label, justify="right", no_wrap=True)
    formats = {key: column_format([r.get(key) for r in rows]) for key, _ in columns}
    for r in rows:  # Text cells: a class name such as "[bold]x" is shown as written, never read as markup
        table.add_row(*(Text(str(r.get(key, ""))) if key in ("class", "name", "count") else formats[key](r.get(key))
                        for key, _ in columns))
    return table


def layers_table(result: AuditResult, title: str = "per layer (network order)") -> Table:
    """One row per layer in network order: NC1, CDNV, NC2 of the means, NCC accuracy."""
    table = Table(title=title, box=box.SIMPLE_HEAD, show_edge=False)
    for col in ("layer", "p", "NC1", "CDNV", "equinorm μ", "equiangle μ", "NCC acc"):
        table.add_column(col, justify="left" if col == "layer" else "right", no_wrap=True)
    for name, block in result.layers.items():
        table.add_row(Text(name), str(block["n_features"]), *(fmt(block[k]) for k in (
            "nc1", "cdnv", "nc2_equinorm_means", "nc2_equiangle_means", "ncc_accuracy")))
    table.add_row("(final)", str(result.n_features), *(fmt(result.metrics[k]) for k in (
        "nc1", "cdnv", "nc2_equinorm_means", "nc2_equiangle_means", "ncc_accuracy")))
    return table


def checks_table(result: AuditResult) -> Table:
    table = Table(title="checks (--fail-if)", box=box.SIMPLE_HEAD, show_edge=False)
    for col in ("fails if", "value", "outcome"):
        table.add_column(col)
    for c in result.checks:
        style = "green" if c["passed"] else "bold red"
        table.add_row(c["expression"], fmt(c["value"]), Text(c["outcome"], style=style))
    return table


def render_table(result: AuditResult, console: Console, *, per_class: bool = False) -> None:
    """Print the human-readable report: header, metric groups, optional per-class and per-layer tables, checks."""
    src = result.source
    header = Text.assemble(
        ("ncaudit report  ", "bold"), (str(src.get("path", "")), "cyan"),
        f"\nN = {result.n_samples}   p = {result.n_features}   C = {result.n_classes}",
    )
    extras = [str(src[k]) for k in ("model", "dataset", "split") if src.get(k)]
    if extras:
        header.append("   " + " · ".join(extras), style="dim")
    if result.details.get("normalized"):
        header.append("   (normalized features and classifier)", style="yellow")
    partial = result.details.get("partial")
    if partial:
        header.append(f"\npartial: {partial['rows']} of {partial['of']} rows", style="bold yellow")
    parts: list[Any] = [header, metrics_table(result)]
    if per_class:
        parts.append(per_class_table(result))
    if result.layers:
        parts.append(layers_table(result))
    if result.checks:
        parts.append(checks_table(result))
    console.print(Group(*parts))
    verdict = "all checks passed" if result.passed else "a check failed"
    if result.checks:
        console.print(Text(verdict, style="green" if result.passed else "bold red"))
