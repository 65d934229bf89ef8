"""The report as a rich table: metric groups, per class, per layer, checks."""

from __future__ import annotations

from typing import Any

from rich import box
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from ncaudit._text import printable
from ncaudit.audit import TRAIN_SPLITS, AuditResult
from ncaudit.report._checks import checks_table_of
from ncaudit.report._format import column_format, fmt, fmt_uncertain
from ncaudit.report._layout import MIN_KEY_WIDTH, Column, Fitted, FittedTable

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
    ("GNC  hyperspherical energy, Liu et al. 2023", [
        ("energy_log_means", "mean log(1/‖u_c − u_c'‖), unit centred μ"),
        ("energy_log_classifier", "mean log(1/‖u_c − u_c'‖), unit rows of W"),
        ("energy_riesz_means", "mean ‖u_c − u_c'‖^−(p−2), unit centred μ"),
        ("energy_riesz_classifier", "mean ‖u_c − u_c'‖^−(p−2), unit rows of W"),
    ]),
    ("NC5  orthogonality to out-of-distribution data", [
        ("nc5", "mean |cos(μ_c, μ_G of the OOD data)| → 0"),
    ]),
]

_ORTHOGONALITY = {"nc2_orthogonality_means", "nc2_orthogonality_classifier"}
#: Rows shown only when they have a value (they need input the audit may not have).
_ONLY_WITH_A_VALUE = {"nc1_precision_floor", "nc5"}


#: Below this width the meanings go on a line of their own under each metric, so the values keep their room.
_MEANING_BESIDE = 64


def metrics_table(result: AuditResult) -> Fitted:
    """The grouped metric table (NC1 / NC2 / NC3 / NC4 / least squares), each value with its meaning and with the
    digits its uncertainty (``details.uncertainty``) leaves; at any width the keys and values are whole (the meanings
    wrap, or go under their metric when the width is short)."""
    return Fitted(lambda width: _metrics_table(result, width))


def _metric_rows(result: AuditResult) -> list[tuple[str, str, list[tuple[str, str]]]]:
    """``(group, its meaning, [(metric key, meaning)])`` of the metrics shown."""
    m = result.metrics
    show_orth = not result.details.get("has_bias", True)
    means_from = (result.details.get("means_from") or {}).get("metrics", ())
    groups = []
    for title, rows in GROUPS:
        shown = [(k, text) for k, text in rows if k in m  # an audit of chosen --metrics holds only those
                 and (m.get(k) is not None or (k not in _ORTHOGONALITY and k not in _ONLY_WITH_A_VALUE))]
        if not show_orth:
            shown = [(k, t) for k, t in shown if k not in _ORTHOGONALITY]
        shown = [(k, f"{t} (training means)" if k in means_from else t) for k, t in shown]
        if shown:
            short, _, long = title.partition("  ")
            groups.append((short, long, shown))
    return groups


def _metrics_table(result: AuditResult, width: int) -> Table:
    m = result.metrics
    uncertainty = result.details.get("uncertainty") or {}
    groups = _metric_rows(result)
    beside = width >= _MEANING_BESIDE
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, expand=False)
    if beside:
        table.add_column("metric", style="bold", no_wrap=True)
    else:  # the key column also holds the meanings, which wrap under their metric; keys keep their full width
        keys = max(len(key) for _, _, shown in groups for key, _ in shown) + 2
        table.add_column("metric", style="bold", min_width=keys, overflow="fold")
    table.add_column("value", justify="right", no_wrap=True)
    if beside:
        table.add_column("meaning", style="dim", min_width=12)
    for short, long, shown in groups:
        if beside:
            table.add_row(Text(short, style="bold cyan"), "", Text(long, style="bold cyan"))
        else:
            table.add_row(Text(f"{short}  {long}", style="bold cyan"), "")
        for key, text in shown:
            table.add_row(f"  {key}", fmt_uncertain(m.get(key), uncertainty.get(key)), *([text] if beside else []))
            if not beside:
                table.add_row(Text(f"    {text}", style="dim"), "")
        table.add_section()
    return table


#: Class names longer than this are abbreviated (the class index beside them says which class).
NAME_WIDTH = 32


def per_class_table(result: AuditResult, limit: int | None = None) -> Fitted:
    """One row per class: count, mean norm, classifier norm, variance, per-class NC1, accuracies. Long class names
    are abbreviated (to a third of the width at most) beside their index; numbers are never cut (the columns stack
    when the width is short)."""
    rows = result.per_class if limit is None else result.per_class[:limit]
    has_names = any("name" in r for r in rows)
    ncc = "NCC acc" + ("\ntrain μ" if "ncc_accuracy" in (result.details.get("means_from") or {}).get("metrics", ())
                       else "")
    values = [("count", "n"), ("mean_norm", "‖μ−μ_G‖"), ("classifier_norm", "‖w‖"), ("variance", "Var"),
              ("nc1", "NC1"), ("accuracy", "acc"), ("ncc_accuracy", ncc)]
    values = [(key, label) for key, label in values if any(key in r for r in rows)]  # not computed: no column
    formats = {key: column_format([r.get(key) for r in rows]) for key, _ in values if key != "count"}
    table_rows = []
    for r in rows:  # plain-string cells are shown as written: a class name such as "[bold]x" is never read as markup
        key_cells = [printable(r.get("class", ""))] + ([printable(r.get("name", ""))] if has_names else [])
        table_rows.append((key_cells, [str(r.get("count", "")) if key == "count" else formats[key](r.get(key))
                                       for key, _ in values]))

    def keys(width: int) -> list[Column]:
        name = Column("name", justify="left", fit="abbreviate", max_width=min(NAME_WIDTH, max(MIN_KEY_WIDTH,
                                                                                               width // 3)))
        return [Column("class"), *([name] if has_names else [])]

    columns = [Column(label) for _, label in values]
    return Fitted(lambda width: FittedTable(keys(width), columns, table_rows, title="per class"))


#: The per-layer columns: (metric key, header).
LAYER_COLUMNS = [("nc1", "NC1"), ("cdnv", "CDNV"), ("nc2_equinorm_means", "equinorm μ"),
                 ("nc2_equiangle_means", "equiangle μ"), ("ncc_accuracy", "NCC acc")]


def layers_table(result: AuditResult, title: str = "per layer (network order)") -> FittedTable:
    """One row per layer in network order: NC1, CDNV, NC2 of the means, NCC accuracy (the columns an audit of
    chosen ``--metrics`` computed)."""
    columns = [(k, header) for k, header in LAYER_COLUMNS
               if k in result.metrics or any(k in block for block in result.layers.values())]
    rows = [([printable(name)], [str(block["n_features"]), *(fmt(block.get(k)) for k, _ in columns)])
            for name, block in result.layers.items()]
    rows.append((["(final)"], [str(result.n_features), *(fmt(result.metrics.get(k)) for k, _ in columns)]))
    return FittedTable([Column("layer", justify="left", fit="fold")],
                       [Column("p"), *(Column(header) for _, header in columns)], rows, title=title)


def checks_table(result: AuditResult) -> Group:
    """The report's checks, failed first, each that did not pass with the message that says why."""
    return checks_table_of(result.checks)


def render_table(result: AuditResult, console: Console, *, per_class: bool = False) -> None:
    """Print the human-readable report: header, metric groups, optional per-class and per-layer tables, checks."""
    src = result.source
    header = Text.assemble(
        ("ncaudit report  ", "bold"), (printable(src.get("path") or src.get("source") or ""), "cyan"),
        f"\nN = {result.n_samples}   p = {result.n_features}   C = {result.n_classes}",
    )
    extras = [printable(src[k]) for k in ("model", "dataset", "split") if src.get(k)]
    if extras:
        header.append("   " + " · ".join(extras), style="dim")
    if result.details.get("normalized"):
        header.append("   (normalized features and classifier)", style="yellow")
    if result.baseline:
        header.append(f"\nbaseline {result.baseline.get('path')}", style="dim")
    means = result.details.get("means_from")
    if means:
        header.append(f"\nclass means of NCC accuracy, NC4 and CDNV: the training set's, from {means['path']}",
                      style="magenta")
    elif src.get("split") and str(src["split"]).lower() not in TRAIN_SPLITS:
        header.append("\nclass means: this split's own (NCC accuracy and NC4 read its labels); --means-from "
                      "TRAIN.h5 measures against the training means", style="dim")
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
