"""The ``ncaudit`` command line: thin wrappers that parse options, call the library and map errors to exit codes.

Exit codes: 0 every check passed, 1 a ``--fail-if`` check failed (the report is still printed), 2 bad input or usage,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM, handled like Ctrl-C). stdout carries the report only; progress
bars, warnings and errors go to stderr. torch and timm are imported inside the commands that need them, so
``ncaudit --help`` answers at once.
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NoReturn, Optional

import typer
from rich.console import Console
from rich.markup import escape

from ncaudit import __version__
from ncaudit.errors import InputError, Terminated

app = typer.Typer(
    name="ncaudit",
    help="Audit trained image classifiers for Neural Collapse: NC1-NC4, the least-squares classifier and MSE term (B).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

stderr = Console(stderr=True, highlight=False)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one line to stderr and exit (2: bad input or usage)."""
    stderr.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True)
    raise typer.Exit(code=code)


@contextlib.contextmanager
def terminate_as_interrupt() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`~ncaudit.errors.Terminated` (a KeyboardInterrupt) in the main
    thread, so a terminated command unwinds as Ctrl-C does (files closed, partial caches left resumable). The previous
    handler is restored after the block."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum: int, frame: Any) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def _command(after_interrupt: str) -> Iterator[None]:
    """A command's body: an InputError exits 2 with one line; Ctrl-C exits 130 and SIGTERM 143, each with one line
    ending in ``after_interrupt`` (what is left behind)."""
    with terminate_as_interrupt():
        try:
            yield
        except InputError as exc:
            fail(str(exc))
        except Terminated:
            fail(f"terminated (SIGTERM); {after_interrupt}", code=143)
        except KeyboardInterrupt:
            fail(f"interrupted; {after_interrupt}", code=130)


def _print_trajectory(rows: list, outcome: list[dict], *, json_out: bool, layers: bool = False,
                      preface: str | None = None) -> None:
    """The trajectory on stdout: JSON, or the table (with an optional preface) and the checks' outcome."""
    from ncaudit.report import render_trajectory_json, trajectory_table

    if json_out:
        typer.echo(render_trajectory_json(rows, outcome))
        return
    console = Console(highlight=False)
    if not console.is_terminal:  # a log or a pipe: no terminal width to respect, so do not truncate cells
        console = Console(highlight=False, width=200)
    if preface:
        console.print(preface + "\n")
    console.print(trajectory_table(rows, layers=layers))
    for c in outcome:
        style = "green" if c["passed"] else "bold red"
        console.print(f"[{style}]{c['outcome']}[/]: fails if {escape(c['expression'])} (last row: {c['value']})")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ncaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Audit trained image classifiers for Neural Collapse.

    Typical use: `ncaudit extract` a checkpoint over a dataset into an HDF5 cache, then `ncaudit report` it.
    """


@app.command()
def extract(
    model: str = typer.Option(..., "--model", "-m", help="timm model name (resnet50, vit_small_patch16_224, ...) or "
                              "torchvision:NAME (torchvision:resnet18, torchvision:vgg11, ...)."),
    checkpoint: str = typer.Option(..., "--checkpoint", "-c", help="Local .pth/.pt/.bin (bare state_dict or under "
                                   "state_dict/model/state_dict_ema/model_ema; loaded with weights_only=True) or "
                                   ".safetensors. Nothing is ever downloaded."),
    data: str = typer.Option(..., "--data", "-d", help="ImageFolder root (one sub-directory per class), or the root "
                             "of a torchvision dataset already on disk (see --dataset)."),
    out: str = typer.Option(..., "--out", "-o", help="Feature cache to write (HDF5, schema 1)."),
    dataset: str = typer.Option("imagefolder", "--dataset", help="imagefolder, cifar10, cifar100, mnist or "
                                "fashionmnist (torchvision's, never downloaded)."),
    split: str | None = typer.Option(None, "--split", help="train or test for torchvision datasets (default test); "
                                     "for an ImageFolder, the sub-directory DATA/SPLIT when it exists."),
    class_map: str | None = typer.Option(None, "--class-map", help="JSON list of class names in model order; maps "
                                         "dataset class names to model indices."),
    ema: bool | None = typer.Option(None, "--ema/--no-ema", help="Use the EMA or the plain weights when the "
                                    "checkpoint holds both (default: plain)."),
    device: str = typer.Option("auto", "--device", help="auto (CUDA when present), cuda or cpu."),
    precision: str = typer.Option("auto", "--precision", help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32, "
                                  "bf16 or fp16."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", help="Images per batch."),
    workers: int | None = typer.Option(None, "--workers", "-j", help="DataLoader worker processes (default: the "
                                       "CPU cores available). Image decoding runs at ~150-300 images/s per core."),
    limit: int | None = typer.Option(None, "--limit", help="Only the first N samples (a quick look)."),
    store_dtype: str = typer.Option("float32", "--store-dtype", help="float32 or float16 for /features. float16 "
                                    "halves the file but rounds each feature by up to 2^-11 (5e-4) of its value, "
                                    "which adds about 5e-8 x (C-1)/p x |h|^2/|mu_c - mu_G|^2 to NC1: negligible unless "
                                    "NC1 is below ~1e-5 or the features carry a large common offset. Keep float32 "
                                    "to audit strongly collapsed networks."),
    precision_check: int = typer.Option(512, "--precision-check", help="When the precision is not fp32, recompute "
                                        "the first K samples in float32 (no autocast, TF32 off) into /reference_fp32, "
                                        "so that report can give the NC1 floor the precision causes. 0: off."),
    img_size: int | None = typer.Option(None, "--img-size", help="Input N x N (keeps the crop ratio)."),
    mean: str | None = typer.Option(None, "--mean", help="Normalisation mean, e.g. 0.5,0.5,0.5 (default: the "
                                    "model's)."),
    std: str | None = typer.Option(None, "--std", help="Normalisation std, e.g. 0.5,0.5,0.5 (default: the model's)."),
    crop_pct: float | None = typer.Option(None, "--crop-pct", help="Centre-crop fraction (1 = resize only)."),
    interpolation: str | None = typer.Option(None, "--interpolation", help="bilinear, bicubic, nearest, lanczos, "
                                             "box or hamming."),
    resume: bool = typer.Option(False, "--resume", help="Continue a partial cache written with the same checkpoint "
                                "(sha256), data and options."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing cache."),
    layers: str | None = typer.Option(None, "--layers", help="Also store these layers, NAME[,NAME...]: module names "
                                      "(layer3, stages.2, blocks.11, features.7) or, for timm, feature_info indices "
                                      "(0,1,2). Spatial maps are average-pooled, token sequences give the class token. "
                                      "The projected file size is printed; a cache larger than the free space is "
                                      "refused."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr."),
) -> None:
    """Stream a dataset through a checkpoint and cache penultimate features, labels, logits and (W, b) in HDF5.

    The features are the exact input of the final affine map; W h + b is checked against the model's own logits on
    the first batch, and the command stops when it does not match. Interrupted runs continue with --resume.
    """
    from ncaudit.extract import extract as run_extract

    with _command(f"{out} is left partial (complete=false) with the rows written so far: rerun with --resume to "
                  "continue"):
        summary = run_extract(
            model, checkpoint, data, out, dataset=dataset, split=split, class_map=class_map, ema=ema, device=device,
            precision=precision, batch_size=batch_size, workers=workers, limit=limit, store_dtype=store_dtype,
            precision_check=precision_check, img_size=img_size, mean=mean, std=std, crop_pct=crop_pct,
            interpolation=interpolation, resume=resume, overwrite=overwrite, progress=progress, layers=layers,
            log=lambda msg: stderr.print(f"[yellow]warning:[/] {escape(msg)}", soft_wrap=True),
        )
    rate = f", {summary.images_per_s:,.0f} images/s" if summary.images_per_s == summary.images_per_s else ""
    stderr.print(escape(f"wrote {summary.out}: {summary.n_samples} samples x {summary.n_features} features, "
                        f"{summary.num_classes} classes, {summary.precision} on {summary.device}{rate}; classifier: "
                        f"{summary.classifier_source}"), soft_wrap=True)


@app.command()
def report(
    cache: Path = typer.Argument(..., help="Feature cache (.h5, schema 1) written by `ncaudit extract` or any tool.",
                                 show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print the JSON report (schema ncaudit.report/1) on stdout "
                                  "instead of the table; nothing else goes to stdout."),
    fail_if: list[str] = typer.Option(None, "--fail-if", metavar="EXPR",
                                      help="Fail (exit 1) when EXPR holds, e.g. 'nc1>0.05' or 'accuracy<0.9'. "
                                           "Repeatable. EXPR is METRIC OP NUMBER, OP one of < <= > >=."),
    device: str = typer.Option("auto", help="cpu, cuda or auto (CUDA when available). Same numbers either way."),
    batch_size: int = typer.Option(4096, "--batch-size", min=1, help="Rows per streamed batch (memory only)."),
    ridge: float = typer.Option(0.0, help="Ridge λ ≥ 0 of the least-squares classifier W_LS = Σ_YH (Σ_T + λI)†."),
    rcond: Optional[float] = typer.Option(None, help="Relative eigenvalue cut-off of Σ_T† (default p·eps)."),
    allow_partial: bool = typer.Option(False, "--allow-partial",
                                       help="Audit the rows written so far of an incomplete cache."),
    drop_empty_classes: bool = typer.Option(False, "--drop-empty-classes",
                                            help="Leave out classes without samples and their classifier rows "
                                                 "(audit a subset of the classes)."),
    per_class: bool = typer.Option(False, "--per-class", help="Add the per-class table (always in the JSON)."),
    normalize: bool = typer.Option(False, "--normalize", help="Audit h/‖h‖ and w_c/‖w_c‖ with b = 0 (feature-"
                                   "normalised or cosine-classifier models)."),
    layers: bool = typer.Option(False, "--layers", help="Also audit the earlier layers stored under /layers "
                                "(NC1, CDNV, NC2 of the means, NCC accuracy per layer)."),
    output: Optional[Path] = typer.Option(None, "--output", "-o", help="Also write the JSON report to this file "
                                          "(written only once every metric is computed)."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="No progress bars (they are drawn only when stderr is a terminal)."),
) -> None:
    """Compute every Neural Collapse metric of a feature cache and gate on thresholds.

    Two streaming passes over the file (statistics, then per-sample decisions); memory does not grow with the
    number of samples. Exit codes: 0 every check passed, 1 a --fail-if check failed, 2 bad input.
    """
    from ncaudit.atomic import check_output, write_text_atomic
    from ncaudit.audit import METRIC_KEYS, AuditOptions, audit
    from ncaudit.checks import evaluate, parse_checks
    from ncaudit.progress import RichProgress
    from ncaudit.report import render_json, render_table

    with _command("nothing was written"):
        checks = parse_checks(fail_if, METRIC_KEYS)
        if output is not None:
            check_output(output, [cache])
        options = AuditOptions(
            batch_size=batch_size, device=device, ridge=ridge, rcond=rcond, allow_partial=allow_partial,
            drop_empty_classes=drop_empty_classes, normalize=normalize, layers=[] if layers else None,
        )
        result = audit(cache, options, RichProgress(stderr, enabled=False if quiet else None))
    result.checks = evaluate(checks, result.metrics)
    for warning in result.warnings:
        stderr.print(f"[yellow]warning:[/] {escape(warning)}", soft_wrap=True)
    text = render_json(result)
    if output is not None:
        with _command(f"{output} is unchanged"):
            write_text_atomic(output, text + "\n")
    if json_out:
        typer.echo(text)
    else:
        render_table(result, Console(highlight=False), per_class=per_class)
    if not result.passed:
        raise typer.Exit(code=1)



@app.command()
def trajectory(
    caches: list[Path] = typer.Argument(..., help="Caches in training order (e.g. one per checkpoint and split).",
                                        show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print the trajectory as JSON on stdout."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Draw the trajectory (PNG) as the PNAS figures do; "
                                        "needs matplotlib: pip install 'ncaudit[plot]'."),
    fail_if: list[str] = typer.Option(None, "--fail-if", metavar="EXPR",
                                      help="Gate on the LAST row: fail (exit 1) when EXPR holds, e.g. 'nc1>0.01' "
                                           "(train split, else the only one) or 'test.accuracy<0.9'."),
    layers: bool = typer.Option(False, "--layers", help="Also show the per-layer NC1 of the last cache."),
    device: str = typer.Option("auto", help="cpu, cuda or auto."),
    batch_size: int = typer.Option(4096, "--batch-size", min=1, help="Rows per streamed batch."),
    normalize: bool = typer.Option(False, "--normalize", help="Audit normalised features and classifier rows."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No progress bars."),
) -> None:
    """Follow collapse across checkpoints: one row per checkpoint, train and test side by side.

    Rows keep the order given; each is labelled by the checkpoint's epoch when its provenance records one.
    """
    from ncaudit.audit import AuditOptions, audit
    from ncaudit.progress import RichProgress
    from ncaudit.trajectory import build_rows, gate_last_row

    with _command("nothing was written"):
        progress = RichProgress(stderr, enabled=False if quiet else None)
        results = []
        for i, path in enumerate(caches):
            last_with_layers = layers and i == len(caches) - 1
            options = AuditOptions(batch_size=batch_size, device=device, normalize=normalize,
                                   layers=[] if last_with_layers else None)
            results.append(audit(path, options, progress))
        rows = build_rows(results)
        outcome = gate_last_row(rows, fail_if)
        if plot is not None:
            from ncaudit.plot import plot_trajectory

            plot_trajectory(rows, plot)
            stderr.print(escape(f"plot written to {plot}"))
    _print_trajectory(rows, outcome, json_out=json_out, layers=layers)
    if not all(c["passed"] for c in outcome):
        raise typer.Exit(code=1)


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Keep the caches, JSON reports and plot in this "
                                       "directory (default: a temporary one, removed at the end)."),
    json_out: bool = typer.Option(False, "--json", help="Print the trajectory as JSON on stdout."),
    fail_if: list[str] = typer.Option(None, "--fail-if", metavar="EXPR", help="Gate on the last checkpoint, as "
                                      "trajectory does (e.g. 'nc1>0.01')."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    fixtures: Optional[Path] = typer.Option(None, "--fixtures", help="Fixtures directory (default: the bundled "
                                            "fixtures/ of a source checkout, or $NCAUDIT_FIXTURES)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No step-by-step progress on stderr."),
) -> None:
    """Run the real pipeline on the bundled digits: extract every checkpoint (train and test), report, trajectory.

    A small timm network trained into its terminal phase on real handwritten digits: watch NC1 fall by orders of
    magnitude and NC4 reach zero. No GPU, no network, no data of your own; well under a minute on 2 CPU cores.
    """
    import tempfile

    from ncaudit.demo import EXPLANATION, run_demo
    from ncaudit.trajectory import gate_last_row

    say = (lambda line: None) if quiet else (lambda line: stderr.print(escape(line), soft_wrap=True))
    with tempfile.TemporaryDirectory(prefix="ncaudit-demo-") as tmp:
        target = out if out is not None else Path(tmp)
        with _command("the demo stopped"):
            result = run_demo(target, fixtures=fixtures, device=device, progress=say)
            rows = result.rows
            outcome = gate_last_row(rows, fail_if)
    _print_trajectory(rows, outcome, json_out=json_out, preface=EXPLANATION)
    if out is None:
        stderr.print("pass --out DIR to keep the caches, JSON reports and trajectory plot", soft_wrap=True)
    else:
        plot_note = f", plot {result.plot}" if result.plot else " (no plot: pip install 'ncaudit[plot]')"
        stderr.print(escape(f"caches in {out / 'caches'}, JSON reports in {out / 'reports'}{plot_note}"),
                     soft_wrap=True)
    if not all(c["passed"] for c in outcome):
        raise typer.Exit(code=1)


def main() -> None:
    """Console-script entry point: run the app, turning input errors into one line and exit code 2."""
    try:
        app(standalone_mode=True)
    except InputError as exc:  # raised outside a command's own handler
        stderr.print(f"[bold red]error:[/] {escape(str(exc))}", soft_wrap=True)
        sys.exit(2)
