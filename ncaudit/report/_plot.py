"""Trajectory plots in the style of the PNAS figures (optional extra: ``pip install 'ncaudit[plot]'``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ncaudit.audit import TRAIN_SPLITS, TrajectoryRow
from ncaudit.audit._trajectory import dataset_of, split_order
from ncaudit.errors import InputError

#: (title, [(metric key, legend)], log scale, y-axis label) per panel.
PANELS: list[tuple[str, list[tuple[str, str]], bool, str]] = [
    ("accuracy", [("accuracy", "classifier"), ("ncc_accuracy", "nearest class mean")], False, "accuracy"),
    ("NC1: tr(Σ_W Σ_B†)/C", [("nc1", "NC1")], True, "within / between-class spread"),
    ("NC2: equinorm (std/mean)", [("nc2_equinorm_means", "means"), ("nc2_equinorm_classifier", "classifier")], True,
     "std / mean of the norms"),
    ("NC2: equiangle (std cos)", [("nc2_equiangle_means", "means"), ("nc2_equiangle_classifier", "classifier")],
     True, "std of the pairwise cosines"),
    ("NC3: ‖W/‖W‖ − M/‖M‖‖²", [("nc3", "NC3")], True, "squared distance"),
    ("NC4: classifier ≠ nearest class mean", [("nc4", "NC4")], False, "fraction of samples"),
    ("central path: ‖W − W_LS‖/‖W_LS‖", [("ls_distance", "LS distance")], True, "relative distance"),
    ("MSE term (B) = L(W, b) − L(W_LS, b_LS)", [("mse_term_b", "term (B)")], True, "loss"),
]
#: Rows and columns of the figure's panels.
GRID = (2, 4)
#: File types of ``--plot`` (matplotlib chooses the format by the suffix).
PLOT_SUFFIXES = (".png", ".pdf", ".svg")


def _matplotlib() -> Any:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib, which is not installed; pip install 'ncaudit[plot]' "
                         "(or drop --plot)") from None
    return plt


def _x_axis(ax: Any, rows: Sequence[TrajectoryRow], xs: list[float], use_epochs: bool) -> None:
    """Ticks at the checkpoints themselves (few of them), a symlog scale when epochs span decades from 0 or 1."""
    if not use_epochs:
        ax.set_xticks(xs, [r.label for r in rows], rotation=30 if len(xs) > 3 else 0, fontsize=7)
        ax.set_xlim(min(xs) - 0.5, max(xs) + 0.5)
        return
    ax.set_xlabel("epoch")
    lo, hi = min(xs), max(xs)
    positive = sorted(x for x in xs if x > 0)
    if len(xs) >= 3 and lo >= 0 and positive and hi > 20 * positive[0]:
        ax.set_xscale("symlog", linthresh=1)  # epochs 0, 1, 5, 50, 200 all visible
        ax.set_xlim(lo, hi * 1.3)
    else:
        pad = 0.05 * (hi - lo) if hi > lo else 1.0
        ax.set_xlim(lo - pad, hi + pad)
    if len(xs) <= 10:  # label the checkpoints themselves, nothing in between
        from matplotlib.ticker import NullLocator
        ax.set_xticks(xs, [f"{x:g}" for x in xs])
        ax.xaxis.set_minor_locator(NullLocator())


def _log_y(ax: Any, values: list[float]) -> None:
    """A log axis from the decade below the smallest point to the decade above the largest, so that every point,
    the last and smallest included, sits between labelled ticks."""
    from matplotlib.ticker import LogFormatterSciNotation, LogLocator
    ax.set_yscale("log")
    lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    hi = max(hi, lo + 1)
    ax.set_ylim(10.0 ** lo, 10.0 ** hi)
    ax.yaxis.set_major_locator(LogLocator(base=10, numticks=hi - lo + 2))
    if hi - lo <= 2:  # few decades: label 2 and 5 as well
        ax.yaxis.set_minor_locator(LogLocator(base=10, subs=(2.0, 5.0), numticks=12))
        ax.yaxis.set_minor_formatter(LogFormatterSciNotation(labelOnlyBase=False, minor_thresholds=(3, 3)))


def _shade(ax: Any, uncertainty: list[tuple[float, float | None]], pts: list[tuple[float, float]], log: bool,
           color: str) -> None:
    """Shade value ± its relative uncertainty (``details.uncertainty``) around a series, where one is stated and
    visible (above 1e-3); on a log axis the band is [v / (1 + u), v (1 + u)]."""
    stated = dict(uncertainty)
    band = [(x, v, stated.get(x)) for x, v in pts]
    if not any(u is not None and u > 1e-3 for _, _, u in band):
        return
    lo = [v / (1 + (u or 0.0)) if log else v - abs(v) * (u or 0.0) for _, v, u in band]
    hi = [v * (1 + (u or 0.0)) if log else v + abs(v) * (u or 0.0) for _, v, u in band]
    ax.fill_between([x for x, _, _ in band], lo, hi, color=color, alpha=0.2, linewidth=0)


def trajectory_figure(rows: Sequence[TrajectoryRow], title: str | None = None) -> Any:
    """The figure: one panel per NC property and two for the least-squares classifier against the epoch (or
    checkpoint); train solid, other splits dashed; each value's uncertainty shaded where it is visible.

    Raises
    ------
    InputError
        matplotlib is not installed.
    """
    plt = _matplotlib()
    use_epochs = all(r.epoch is not None for r in rows) and len({r.epoch for r in rows}) == len(rows)
    xs = [float(r.epoch) if use_epochs else float(i) for i, r in enumerate(rows)]  # type: ignore[arg-type]
    splits = split_order(rows)
    fig, axes = plt.subplots(*GRID, figsize=(17, 7), constrained_layout=True)
    for ax, (panel_title, series, log, ylabel) in zip(axes.flat, PANELS):
        plotted: list[float] = []
        for key, legend in series:
            # Classifier-only metrics do not depend on the split: one line.
            for split in (splits[:1] if key.endswith("_classifier") else splits):
                pts = [(x, r.splits[split].metrics.get(key)) for x, r in zip(xs, rows) if split in r.splits]
                pts = [(x, v) for x, v in pts if v is not None and math.isfinite(v) and (v > 0 or not log)]
                if not pts:
                    continue
                style = "-" if split in TRAIN_SPLITS or len(splits) == 1 else "--"
                label = f"{legend} ({split})" if len(splits) > 1 and not key.endswith("_classifier") else legend
                line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", markersize=4,
                                label=label)
                _shade(ax, [(x, r.uncertainty(f"{split}.{key}")) for x, r in zip(xs, rows) if split in r.splits],
                       pts, log, line.get_color())
                plotted += [p[1] for p in pts]
        ax.set_title(panel_title, fontsize=10)
        ax.set_ylabel(ylabel, fontsize=9)
        if log and plotted:
            _log_y(ax, plotted)
        _x_axis(ax, rows, xs, use_epochs)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    return fig


def provenance_title(rows: Sequence[TrajectoryRow]) -> str:
    """A title from what the caches record: ``MODEL on DATA: Neural Collapse across training (train, test)``."""
    sources = [result.source for row in rows for result in row.splits.values()]
    models = list(dict.fromkeys(str(s["model"]) for s in sources if s.get("model")))
    data = list(dict.fromkeys(name for name in map(dataset_of, sources) if name))
    what = " / ".join(models) or "features"
    where = f" on {' / '.join(data)}" if data else ""
    return f"{what}{where}: Neural Collapse across training ({', '.join(split_order(rows))})"


def plot_path(path: str | Path) -> Path:
    """Where ``--plot PATH`` writes: PATH itself for a .png, .pdf or .svg; ``PATH/trajectory.png`` for an existing
    directory (or a path ending in a separator); ``PATH.png`` for a name without a suffix.

    Raises
    ------
    InputError
        Another suffix.
    """
    text = str(path)
    out = Path(path)
    if out.is_dir() or text.endswith(("/", "\\")):
        return out / "trajectory.png"
    if not out.suffix:
        return out.with_name(out.name + ".png")
    if out.suffix.lower() not in PLOT_SUFFIXES:
        raise InputError(f"--plot {path}: a plot is written as {', '.join(PLOT_SUFFIXES)}; give a file name with one "
                         "of those suffixes (or a directory, to write trajectory.png in it)")
    return out


def plot_trajectory(rows: Sequence[TrajectoryRow], path: str | Path, title: str | None = None) -> Path:
    """Draw :func:`trajectory_figure` into the file :func:`plot_path` gives for ``path``, and return that file.

    Raises
    ------
    InputError
        matplotlib is not installed, a suffix other than .png, .pdf or .svg, or the file cannot be written.
    """
    out = plot_path(path)
    fig = trajectory_figure(rows, title)
    plt = _matplotlib()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    except OSError as exc:
        raise InputError(f"cannot write the plot to {out}: {exc.strerror or exc}; choose a writable path") from None
    finally:
        plt.close(fig)
    return out
