"""The ``ncaudit`` command line: thin wrappers that parse options, call the library and map errors to exit codes.

Exit codes: 0 every check passed, 1 a ``--fail-if`` check failed (the report is still printed), 2 bad input or usage,
130 interrupted. stdout carries the report only; progress bars, warnings and errors go to stderr. torch and timm
are imported inside the commands that need them, so ``ncaudit --help`` answers at once.
"""

from __future__ import annotations

import sys
from typing import NoReturn

import typer
from rich.console import Console

from ncaudit import __version__
from ncaudit.errors import InputError

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
    stderr.print(f"[bold red]error:[/] {message}", soft_wrap=True)
    raise typer.Exit(code=code)


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

    try:
        summary = run_extract(
            model, checkpoint, data, out, dataset=dataset, split=split, class_map=class_map, ema=ema, device=device,
            precision=precision, batch_size=batch_size, workers=workers, limit=limit, store_dtype=store_dtype,
            precision_check=precision_check, img_size=img_size, mean=mean, std=std, crop_pct=crop_pct,
            interpolation=interpolation, resume=resume, overwrite=overwrite, progress=progress, layers=layers,
            log=lambda msg: stderr.print(f"[yellow]warning:[/] {msg}", soft_wrap=True),
        )
    except InputError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail(f"interrupted; {out} is left partial (complete=false): rerun with --resume to continue", code=130)
    rate = f", {summary.images_per_s:,.0f} images/s" if summary.images_per_s == summary.images_per_s else ""
    stderr.print(f"wrote {summary.out}: {summary.n_samples} samples x {summary.n_features} features, "
                 f"{summary.num_classes} classes, {summary.precision} on {summary.device}{rate}; classifier: "
                 f"{summary.classifier_source}", soft_wrap=True)


def main() -> None:
    """Console-script entry point: run the app, turning input errors into one line and exit code 2."""
    try:
        app(standalone_mode=True)
    except InputError as exc:  # raised outside a command's own handler
        stderr.print(f"[bold red]error:[/] {exc}", soft_wrap=True)
        sys.exit(2)
