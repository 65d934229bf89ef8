"""Trajectory plots in the style of the PNAS figures (optional extra: ``pip install 'ncaudit[plot]'``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from ncaudit.errors import InputError
from ncaudit.trajectory import TrajectoryRow, split_order

#: (title, [(metric key, legend)], log scale) per panel.
PANELS: list[tuple[str, list[tuple[str, str]], bool]] = [
    ("accuracy", [("accuracy", "classifier"), ("ncc_accuracy", "nearest class mean")], False),
    ("NC1: tr(Σ_W Σ_B†)/C", [("nc1", "NC1")], True),
    ("NC2: equinorm (std/mean)", [("nc2_equinorm_means", "means"), ("nc2_equinorm_classifier", "classifier")], True),
    ("NC2: equiangle (std cos)", [("nc2_equiangle_means", "means"), ("nc2_equiangle_classifier", "classifier")],
     True),
    ("NC3: ‖W/‖W‖ − M/‖M‖‖²", [("nc3", "NC3")], True),
    ("NC4: classifier ≠ NCC", [("nc4", "NC4")], False),
]


def plot_trajectory(rows: Sequence[TrajectoryRow], path: str | Path, title: str | None = None) -> Path:
    """Draw one panel per NC property against the epoch (or checkpoint index); train solid, other splits dashed.

    Raises
    ------
    InputError
        matplotlib is not installed, or the file cannot be written.
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise InputError("--plot needs matplotlib, which is not installed; pip install 'ncaudit[plot]' "
                         "(or drop --plot)") from None
    use_epochs = all(r.epoch is not None for r in rows) and len({r.epoch for r in rows}) == len(rows)
    xs = [r.epoch if use_epochs else i for i, r in enumerate(rows)]
    splits = split_order(rows)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), constrained_layout=True)
    for ax, (panel_title, series, log) in zip(axes.flat, PANELS):
        for key, legend in series:
            # Classifier-only metrics do not depend on the split: one line.
            for split in (splits[:1] if key.endswith("_classifier") else splits):
                pts = [(x, r.splits[split].metrics.get(key)) for x, r in zip(xs, rows) if split in r.splits]
                pts = [(x, v) for x, v in pts if v is not None and math.isfinite(v) and (v > 0 or not log)]
                if not pts:
                    continue
                style = "-" if split in ("train", "training") or len(splits) == 1 else "--"
                label = f"{legend} ({split})" if len(splits) > 1 and not key.endswith("_classifier") else legend
                ax.plot([p[0] for p in pts], [p[1] for p in pts], style, marker="o", markersize=3, label=label)
        ax.set_title(panel_title, fontsize=10)
        if log:
            ax.set_yscale("log")
        if use_epochs:
            ax.set_xlabel("epoch")
            if min(xs) >= 0 and max(xs) > 10 * max(1, sorted(xs)[1] if len(xs) > 1 else 1):
                ax.set_xscale("symlog", linthresh=1)  # epochs 0, 1, 5, 50, 200 all visible
            if len(set(xs)) > 1:
                ax.set_xlim(min(xs) - 0.05 * (max(xs) - min(xs)) if min(xs) < 0 else min(xs), max(xs) * 1.15)
        else:
            ax.set_xticks(xs, [r.label for r in rows], rotation=30, fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    out = Path(path)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(out, dpi=110)
    except OSError as exc:
        raise InputError(f"cannot write the plot to {out}: {exc.strerror or exc}; choose a writable path") from None
    finally:
        plt.close(fig)
    return out
