"""The ``ncaudit`` command line: thin wrappers that parse options, call the library and map errors to exit codes.

Exit codes: 0 every check passed, 1 a ``--fail-if`` check failed (the report is still printed), 2 bad input or usage,
130 interrupted (Ctrl-C), 143 terminated (SIGTERM, handled like Ctrl-C). stdout carries the report only; progress
bars, warnings and errors go to stderr. torch and timm are imported inside the commands that need them, so
``ncaudit --help`` answers at once.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, NoReturn

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperArgument, TyperCommand, TyperGroup

from ncaudit import __version__
from ncaudit.errors import InputError, Terminated

# The report's passes alternate torch's OpenMP threads (elementwise work) with the BLAS threads of its products; OpenMP
# threads that spin after each parallel region take the cores the BLAS needs (measured: a batch of pass 1 took 1.3x
# longer). Read when torch is first imported, which the commands do lazily; a value the user set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

_TYPE_NAMES = {"str": "TEXT", "int": "INTEGER", "float": "FLOAT", "Path": "PATH", "PosixPath": "PATH"}


def _value_type(param: Any, ctx: Any) -> str | None:
    """The value column of ``--help``: nothing for a switch, the metavar when given, else TEXT, INTEGER, FLOAT or
    PATH; arguments show their metavar in the name column."""
    if getattr(param, "is_flag", False) or isinstance(param, TyperArgument):
        return None
    if param.metavar:
        return str(param.metavar)
    bare = param.bare_type() if hasattr(param, "bare_type") else ""
    return None if bare == "bool" else _TYPE_NAMES.get(bare, str(bare).upper() or None)


def _readable(params: list[Any]) -> list[Any]:
    for param in params:
        param.display_type_rich = functools.partial(_value_type, param)  # shadows the method on this instance
    return params


class _Command(TyperCommand):
    """A command whose help shows readable value types (see :func:`_value_type`)."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _readable(super().get_params(ctx))


class _Group(TyperGroup):
    """The top-level group, with the same readable help."""

    def get_params(self, ctx: Any) -> list[Any]:
        return _readable(super().get_params(ctx))


app = typer.Typer(
    name="ncaudit",
    cls=_Group,
    help="Audit trained image classifiers for Neural Collapse: NC1-NC4, the least-squares classifier and MSE term (B).",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

stderr = Console(stderr=True, highlight=False)
PLOT_EXTRA = escape("pip install 'ncaudit[plot]'")  # rich markup would take [plot] for a tag


def _unwrap(doc: str | None) -> str:
    """A docstring as help text: paragraphs kept, the line breaks inside them removed (the terminal wraps)."""
    paragraphs = inspect.cleandoc(doc or "").split("\n\n")
    return "\n\n".join(" ".join(line.strip() for line in p.splitlines()) for p in paragraphs)


def command(**kwargs: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """``app.command`` with readable help: unwrapped docstring paragraphs, readable value types."""
    def register(fn: Callable[..., Any]) -> Callable[..., Any]:
        return app.command(cls=_Command, help=_unwrap(fn.__doc__), **kwargs)(fn)
    return register


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
                      preface: str | None = None, wide: bool = False) -> None:
    """The trajectory on stdout: JSON, or the table (with an optional preface) and the checks' outcome."""
    from ncaudit.report import fmt, render_trajectory_json, trajectory_table

    if json_out:
        typer.echo(render_trajectory_json(rows, outcome))
        return
    console = Console(highlight=False)
    prose_width = console.width
    if not console.is_terminal:  # a log or a pipe: no terminal width to respect, so do not truncate cells
        console, prose_width = Console(highlight=False, width=200), 100
    if preface:
        console.print(escape(preface) + "\n", width=prose_width)
    console.print(trajectory_table(rows, layers=layers, wide=wide))
    for c in outcome:
        style = "green" if c["passed"] else "bold red"
        console.print(f"[{style}]{c['outcome']}[/]: fails if {escape(c['expression'])} (last row: "
                      f"{fmt(c['value'])})")


def _version(value: bool) -> None:
    if value:
        typer.echo(f"ncaudit {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    """Audit trained image classifiers for Neural Collapse.

    Typical use: `ncaudit extract` a model over a dataset into an HDF5 cache, then `ncaudit report` it.
    """
    if os.environ.get("WORLD_SIZE", "1") != "1" and ctx.invoked_subcommand:  # launched by torchrun
        from ncaudit.distributed import check_launch

        try:
            check_launch(ctx.invoked_subcommand)
        except InputError as exc:
            fail(str(exc))


@command()
def extract(
    model: str = typer.Option(..., "--model", "-m", help="timm model name, with a pretrained tag for --pretrained "
                              "(resnet50, resnet50.a1_in1k, convnext_tiny.fb_in1k, ...), hf-hub:ORG/NAME, or "
                              "torchvision:NAME (torchvision:resnet50, torchvision:vit_b_16, ...)."),
    checkpoint: str | None = typer.Option(None, "--checkpoint", "-c", help="Local .pth/.pt/.bin (a bare state_dict "
                                          "or one under state_dict, model, state_dict_ema or model_ema; loaded with "
                                          "weights_only=True) or .safetensors. One of --checkpoint, --pretrained, "
                                             "--random-init is required."),
    pretrained: bool = typer.Option(False, "--pretrained", help="The library's published weights, loaded as the "
                                    "library does: timm create_model(NAME, pretrained=True) through the Hugging Face "
                                    "cache (HF_HOME / HF_HUB_CACHE), torchvision weights enums (--weights) through "
                                    "TORCH_HOME. Missing weights are downloaded, unless HF_HUB_OFFLINE=1."),
    weights: str | None = typer.Option(None, "--weights", metavar="ENUM", help="torchvision weights: a member of "
                                          "the model's weights enum, e.g. IMAGENET1K_V2, or DEFAULT (the default). "
                                          "Implies --pretrained."),
    random_init: bool = typer.Option(False, "--random-init", help="An untrained network (torch.manual_seed(0)) with "
                                     "as many classes as the dataset: the epoch-0 row of a trajectory."),
    data: str | None = typer.Option(None, "--data", "-d", help="An image folder (one sub-directory per class, as "
                                       "ImageNet's train/ and val/ synset folders), a .tar of <class>/<image> files "
                                       "or a directory of <class>.tar files, a torchvision dataset root, a directory "
                                       "of WebDataset shards; for hfds/ the datasets cache (optional)."),
    out: str = typer.Option(..., "--out", "-o", help="Feature cache to write (HDF5, schema 1)."),
    dataset: str = typer.Option("folder", "--dataset", help="folder (image folders and tar files), torch/NAME "
                                "(torch/cifar10, torch/mnist, torch/imagenet, ...; never downloaded), hfds/NAME (a "
                                "Hugging Face dataset: a local directory, or a hub name in its cache) or wds/NAME "
                                "(WebDataset shards under --data; pip install 'ncaudit\\[wds]')."),
    split: str | None = typer.Option(None, "--split", help="folder: the sub-directory DATA/SPLIT (or a synonym: "
                                        "val, validation, ...) when it exists; torch/: train, else the eval split "
                                        "(default); hfds/: a split (default validation, else test); wds/: a split "
                                        "of DATA/_info.json or a shard pattern such as 'x-{0000..0009}.tar'."),
    class_map: str | None = typer.Option(None, "--class-map", help="JSON list (or .txt, one name a line) of "
                                            "class names in model order: maps dataset class names to model indices. "
                                            "Without it ImageNet synset folders map by synset for ImageNet models, "
                                            "other datasets keep their own label order."),
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
    img_size: int | None = typer.Option(None, "--img-size", help="Input N x N, keeping the crop ratio (default, "
                                           "as for every transform value: what the weights record, else the "
                                           "model's default)."),
    mean: str | None = typer.Option(None, "--mean", help="Normalisation mean, e.g. 0.5,0.5,0.5."),
    std: str | None = typer.Option(None, "--std", help="Normalisation std, e.g. 0.5,0.5,0.5."),
    crop_pct: float | None = typer.Option(None, "--crop-pct", help="Centre-crop fraction (1 = resize only)."),
    crop_mode: str | None = typer.Option(None, "--crop-mode", help="center, squash or border (timm)."),
    interpolation: str | None = typer.Option(None, "--interpolation", help="bilinear, bicubic, nearest, "
                                                "lanczos, box or hamming."),
    resume: bool = typer.Option(False, "--resume", help="Continue a partial cache written with the same weights "
                                "(sha256), data and options."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing cache."),
    layers: str | None = typer.Option(None, "--layers", metavar="NAMES", help="Also store these layers, "
                                      "NAME[,NAME...]: module names (layer3, stages.2, blocks.11, features.7) or, for "
                                      "timm, feature_info indices (0,1,2). Spatial maps are average-pooled, token "
                                      "sequences give the class token. The projected file size is printed; a cache "
                                      "larger than the free space is refused."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bar on stderr."),
) -> None:
    """Stream a dataset through a model and cache penultimate features, labels, logits and (W, b) in HDF5.

    The weights come from a local checkpoint, the library's published weights (timm tags, hf-hub:, torchvision weights
    enums) or a random init. Images are prepared as the weights record (safetensors metadata, a timm train.py
    checkpoint's args, the published config), flags override; the first lines of output say where each value came
    from. The features are the exact input of the final affine map; W h + b is checked against the model's own
    logits on the first batch, and the command stops when it does not match. Interrupted runs continue with --resume.
    """
    from ncaudit.data import TransformOverrides
    from ncaudit.extract import extract as run_extract
    from ncaudit.models import Weights

    with _command(f"{out} is left partial (complete=false) with the rows written so far: rerun with --resume to "
                  "continue"):
        chosen = Weights.from_flags(checkpoint, pretrained=pretrained, random_init=random_init, weights=weights,
                                    ema=ema)
        with _ranks(device) as group:
            main = group is None or group.is_main
            summary = run_extract(
                model, chosen, data, out, dataset=dataset, split=split, class_map=class_map, device=device,
                precision=precision, batch_size=batch_size, workers=workers, limit=limit, store_dtype=store_dtype,
                precision_check=precision_check, resume=resume, overwrite=overwrite, progress=not no_progress,
                layers=layers,
                transform=TransformOverrides(img_size=img_size, mean=mean, std=std, crop_pct=crop_pct,
                                             interpolation=interpolation, crop_mode=crop_mode),
                log=lambda msg: stderr.print(f"[yellow]warning:[/] {escape(msg)}", soft_wrap=True) if main else None,
                info=lambda msg: stderr.print(escape(msg), overflow="fold") if main else None,
                group=group,
            )
    if not main:
        return
    rate = f", {summary.images_per_s:,.0f} images/s" if summary.images_per_s == summary.images_per_s else ""
    stderr.print(escape(f"wrote {summary.out}: {summary.n_samples} samples x {summary.n_features} features, "
                        f"{summary.num_classes} classes, {summary.precision} on {summary.device}{rate}; classifier: "
                        f"{summary.classifier_source}"), soft_wrap=True)


@command()
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
    rcond: float | None = typer.Option(None, help="Relative eigenvalue cut-off of Σ_T† (default p·eps)."),
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
    output: Path | None = typer.Option(None, "--output", "-o", help="Also write the JSON report to this file "
                                          "(written only once every metric is computed)."),
    quiet: bool = typer.Option(False, "--quiet", "-q",
                               help="No progress bars (they are drawn only when stderr is a terminal)."),
) -> None:
    """Compute every Neural Collapse metric of a feature cache and gate on thresholds.

    Two streaming passes over the file (statistics, then per-sample decisions); memory does not grow with the
    number of samples. Exit codes: 0 every check passed, 1 a --fail-if check failed, 2 bad input.
    """
    from ncaudit.report._atomic import check_output, write_text_atomic
    from ncaudit.audit import METRIC_KEYS, AuditOptions, evaluate, parse_checks
    from ncaudit.report import render_json, render_table

    with _command("nothing was written"):
        checks = parse_checks(fail_if, METRIC_KEYS)
        if output is not None:
            check_output(output, [cache])
        options = AuditOptions(
            batch_size=batch_size, device=device, ridge=ridge, rcond=rcond, allow_partial=allow_partial,
            drop_empty_classes=drop_empty_classes, normalize=normalize, layers=[] if layers else None,
        )
        result = _audit_on_ranks(cache, options, quiet)
    if result is None:  # a rank other than 0 under torchrun: rank 0 reports
        return
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



@contextlib.contextmanager
def _ranks(device: str) -> Iterator[Any]:
    """The torch.distributed process group of a torchrun launch (NCCL on CUDA, gloo on CPU), None for one process."""
    from ncaudit.distributed import launch_env, process_group

    if not launch_env().distributed:
        yield None
        return
    with process_group(device) as group:
        yield group


def _audit_on_ranks(cache: Path, options: Any, quiet: bool) -> Any:
    """``audit`` in one process, or on every rank of a torchrun launch (None on ranks other than 0)."""
    from ncaudit._progress import RichProgress
    from ncaudit.audit import audit

    with _ranks(options.device) as group:
        main = group is None or group.is_main
        result = audit(cache, options, RichProgress(stderr, enabled=False if quiet or not main else None), group)
    return result if main else None


@command()
def trajectory(
    caches: list[Path] = typer.Argument(..., metavar="CACHE.h5...", help="Caches in training order (e.g. one per "
                                        "checkpoint and split).", show_default=False),
    json_out: bool = typer.Option(False, "--json", help="Print the trajectory as JSON on stdout (every metric)."),
    wide: bool = typer.Option(False, "--wide", help="Every column in the table (NC2 of the classifier, NC4 of each "
                              "split, term B, LS distance, precision floor); the default fits 80 columns."),
    plot: Path | None = typer.Option(None, "--plot", metavar="FILE.png", help="Draw the trajectory (PNG) as the "
                                        f"PNAS figures do; needs matplotlib: {PLOT_EXTRA}."),
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
    from ncaudit._progress import RichProgress
    from ncaudit.audit import AuditOptions, audit, build_rows, gate_last_row

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
            from ncaudit.report._plot import plot_trajectory

            plot_trajectory(rows, plot)
            stderr.print(escape(f"plot written to {plot}"))
    _print_trajectory(rows, outcome, json_out=json_out, layers=layers, wide=wide)
    if not all(c["passed"] for c in outcome):
        raise typer.Exit(code=1)


@command()
def demo(
    out: Path | None = typer.Option(None, "--out", "-o", help="Keep the caches, JSON reports and plot in this "
                                       "directory (default: a temporary one, removed at the end)."),
    json_out: bool = typer.Option(False, "--json", help="Print the trajectory as JSON on stdout (every metric)."),
    wide: bool = typer.Option(False, "--wide", help="Every column in the table; the default fits 80 columns."),
    fail_if: list[str] = typer.Option(None, "--fail-if", metavar="EXPR", help="Gate on the last checkpoint, as "
                                      "trajectory does (e.g. 'nc1>0.01')."),
    device: str = typer.Option("cpu", help="cpu, cuda or auto."),
    fixtures: Path | None = typer.Option(None, "--fixtures", help="Fixtures directory (default: the bundled "
                                            "fixtures/ of a source checkout, or $NCAUDIT_FIXTURES)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No step-by-step progress on stderr."),
) -> None:
    """Run the real pipeline on the bundled digits: extract every checkpoint (train and test), report, trajectory.

    A small timm network trained into its terminal phase on real handwritten digits: watch NC1 fall by orders of
    magnitude and NC4 reach zero. No GPU, no network, no data of your own; 20 s to a minute on 2 CPU cores (mostly
    the network's forward passes over 9,000 images).
    """
    import tempfile

    from ncaudit.audit import gate_last_row
    from ncaudit._demo import EXPLANATION, run_demo

    say = (lambda line: None) if quiet else (lambda line: stderr.print(escape(line), soft_wrap=True))
    with tempfile.TemporaryDirectory(prefix="ncaudit-demo-") as tmp:
        target = out if out is not None else Path(tmp)
        with _command("the demo stopped"):
            result = run_demo(target, fixtures=fixtures, device=device, progress=say)
            rows = result.rows
            outcome = gate_last_row(rows, fail_if)
    _print_trajectory(rows, outcome, json_out=json_out, preface=EXPLANATION, wide=wide)
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
