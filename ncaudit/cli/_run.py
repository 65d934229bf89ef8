"""``ncaudit run``."""

from __future__ import annotations

from pathlib import Path

import typer
from rich.markup import escape

from ncaudit.cli._app import PLOT_EXTRA, _command, command, stderr
from ncaudit.cli._output import exit_on_checks
from ncaudit.cli._trajectory import _print_trajectory, say_written

_DATA, _OUTPUT, _RUN = "Model and data", "What is written and shown", "How it runs"


class _Lines:
    """What a run says on stderr: each step, what the first extraction loaded (the others load the same but for the
    checkpoint), each distinct warning once."""

    def __init__(self, quiet: bool) -> None:
        self.quiet, self.extractions, self.seen = quiet, 0, set[str]()

    def step(self, line: str) -> None:
        self.extractions += ": extract" in line
        if not self.quiet:
            stderr.print(escape(line), soft_wrap=True)

    def info(self, line: str) -> None:
        if not self.quiet and self.extractions <= 1:
            stderr.print(escape(line), overflow="fold")

    def warning(self, line: str) -> None:
        if line not in self.seen:
            self.seen.add(line)
            stderr.print(f"[yellow]warning:[/] {escape(line)}", soft_wrap=True)


@command()
def run(
    model: str = typer.Option(..., "--model", "-m", help="The architecture of every checkpoint: a timm name "
                              "(resnet50), hf-hub:ORG/NAME or torchvision:NAME.", rich_help_panel=_DATA),
    checkpoints: list[str] = typer.Option(..., "--checkpoints", "-c", metavar="GLOB", help="The run's checkpoints: "
                                          "a quoted glob pattern ('runs/r50/epoch_*.pth'), a directory or files; "
                                          "repeatable. Ordered by file name, numbers read as numbers (epoch_5 "
                                          "before epoch_50).", rich_help_panel=_DATA),
    data: str = typer.Option(..., "--data", "-d", help="The dataset root that holds the splits (an image folder "
                             "with train/ and val/ or test/, a torchvision root, ...).", rich_help_panel=_DATA),
    splits: str = typer.Option("train,test", "--splits", help="The splits to extract, comma-separated (DATA/SPLIT "
                               "or a synonym, as extract --split).", rich_help_panel=_DATA),
    out: Path = typer.Option(..., "--out", "-o", help="Directory for caches/, reports/, trajectory.json, "
                             "trajectory.csv and trajectory.png (created when missing).", rich_help_panel=_OUTPUT),
    dataset: str = typer.Option("folder", "--dataset", help="folder, torch/NAME, hfds/NAME or wds/NAME, as for "
                                "extract.", rich_help_panel=_DATA),
    limit: int | None = typer.Option(None, "--limit", help="Extract a class-stratified sample of N images of each "
                                     "split (seeded: the same images every run and every checkpoint).",
                                     rich_help_panel=_DATA),
    class_map: str | None = typer.Option(None, "--class-map", help="Class names in model order (JSON list or "
                                         ".txt), as for extract.", rich_help_panel=_DATA),
    img_size: int | None = typer.Option(None, "--img-size", help="Input N x N (default: what the checkpoints "
                                        "record, else the model's default).", rich_help_panel=_DATA),
    mean: str | None = typer.Option(None, "--mean", help="Normalisation mean, e.g. 0.5,0.5,0.5.",
                                    rich_help_panel=_DATA),
    std: str | None = typer.Option(None, "--std", help="Normalisation std, e.g. 0.5,0.5,0.5.", rich_help_panel=_DATA),
    train_means: bool = typer.Option(True, "--train-means/--no-train-means", help="Also measure NCC accuracy, NC4 "
                                     "and CDNV of the other splits against the training split's class means.",
                                     rich_help_panel=_OUTPUT),
    title: str | None = typer.Option(None, "--title", help="The plot's title (default: the model and data the "
                                     f"caches record). The plot needs matplotlib: {PLOT_EXTRA}.",
                                     rich_help_panel=_OUTPUT),
    json_out: bool = typer.Option(False, "--json", help="Print the trajectory as JSON on stdout (every metric).",
                                  rich_help_panel=_OUTPUT),
    wide: bool = typer.Option(False, "--wide", help="Every column in the table.", rich_help_panel=_OUTPUT),
    fail_if: list[str] = typer.Option(None, "--fail-if", metavar="EXPR", help="Gate on the last checkpoint, as "
                                      "trajectory does (e.g. 'nc1>0.01', 'test.accuracy<0.9').",
                                      rich_help_panel=_OUTPUT),
    overwrite: bool = typer.Option(False, "--overwrite", help="Extract every cache again (by default a finished "
                                   "cache of the same checkpoint, split, data and --limit is kept and a partial one "
                                   "resumed; pass it after changing preprocessing flags).", rich_help_panel=_RUN),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cuda or cpu.",
                               rich_help_panel=_RUN),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32, "
                                  "bf16 or fp16.", rich_help_panel=_RUN),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per batch.", rich_help_panel=_RUN),
    workers: int | None = typer.Option(None, "--workers", "-j", help="DataLoader worker processes (default: the "
                                       "CPU cores available).", rich_help_panel=_RUN),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress on stderr.", rich_help_panel=_RUN),
) -> None:
    """Audit a training run: every checkpoint on every split, extracted, reported and lined up as a trajectory.

    What demo does for the bundled run, for your own: one cache per checkpoint and split under OUT/caches (rerun
    the same command to continue: finished caches are kept, partial ones resumed), one JSON report each under
    OUT/reports, the trajectory table on stdout and as OUT/trajectory.json, OUT/trajectory.csv and the plot
    OUT/trajectory.png (titled from the caches' provenance, with a central-path panel).
    """
    from ncaudit._progress import RichProgress
    from ncaudit._run import audit_run, find_checkpoints
    from ncaudit.audit import AuditOptions
    from ncaudit.data import TransformOverrides

    lines = _Lines(quiet)
    with _command(f"the caches under {out / 'caches'} are kept (a partial one is marked incomplete): rerun the same "
                  "command to continue"):
        found = find_checkpoints(checkpoints)
        result = audit_run(
            model, found, data, out, splits=[s.strip() for s in splits.split(",") if s.strip()],
            extract_options={
                "dataset": dataset, "limit": limit, "class_map": class_map, "device": device, "precision": precision,
                "batch_size": batch_size, "workers": workers, "progress": not quiet,
                "transform": TransformOverrides(img_size=img_size, mean=mean, std=std),
                "log": lines.warning, "info": lines.info,
            },
            audit_options=AuditOptions(device=device), train_means=train_means, overwrite=overwrite, title=title,
            fail_if=fail_if, progress=lines.step, audit_progress=RichProgress(stderr, enabled=False if quiet else None),
        )
    for warning in result.warnings:
        stderr.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    _print_trajectory(result.rows, result.checks, output_format="json" if json_out else "table", wide=wide)
    say_written(result, out)
    exit_on_checks(result.checks)
