"""``ncaudit extract``."""

from __future__ import annotations

import typer
from rich.markup import escape

from ncaudit.cli._app import _command, _ranks, command, stderr

#: The panels of `extract --help`, the common path first.
_WEIGHTS = "Model and weights: --model and one of --checkpoint, --pretrained, --random-init"
_DATA, _OUT = "Data", "Output"
_PREP = "Preprocessing (default: what the weights record, else the model's default)"
_RUN = "How it runs"


@command()
def extract(
    model: str = typer.Option(
        ..., "--model", "-m", rich_help_panel=_WEIGHTS,
        help="timm model name, with a pretrained tag for --pretrained (resnet50, resnet50.a1_in1k, "
             "convnext_tiny.fb_in1k, ...), hf-hub:ORG/NAME, or torchvision:NAME (torchvision:resnet50, "
             "torchvision:vit_b_16, ...)."),
    checkpoint: str | None = typer.Option(
        None, "--checkpoint", "-c", rich_help_panel=_WEIGHTS,
        help="Local .pth/.pt/.bin (a bare state_dict or one under state_dict, model, state_dict_ema or model_ema; "
             "loaded with weights_only=True) or .safetensors."),
    pretrained: bool = typer.Option(
        False, "--pretrained", rich_help_panel=_WEIGHTS,
        help="The library's published weights, loaded as the library does: timm create_model(NAME, "
             "pretrained=True) through the Hugging Face cache (HF_HOME / HF_HUB_CACHE), torchvision weights enums "
             "(--weights) through TORCH_HOME. Missing weights are downloaded, unless HF_HUB_OFFLINE=1."),
    random_init: bool = typer.Option(
        False, "--random-init", rich_help_panel=_WEIGHTS,
        help="An untrained network (torch.manual_seed(0)) with as many classes as the dataset: the epoch-0 row of "
             "a trajectory."),
    data: str | None = typer.Option(
        None, "--data", "-d", rich_help_panel=_DATA,
        help="An image folder (one sub-directory per class, as ImageNet's train/ and val/ synset folders; a root "
             "of split folders needs --split), a .tar of <class>/<image> files or a directory of <class>.tar "
             "files, a torchvision dataset root, a directory of WebDataset shards; for hfds/ the datasets cache "
             "(optional)."),
    split: str | None = typer.Option(
        None, "--split", rich_help_panel=_DATA,
        help="folder: the sub-directory DATA/SPLIT (or a synonym: val, validation, ...), required when DATA holds "
             "split folders; torch/: train, else the eval split (default); hfds/: a split (default validation, "
             "else test); wds/: a split of DATA/_info.json or a shard pattern such as 'x-{0000..0009}.tar'."),
    out: str = typer.Option(..., "--out", "-o", rich_help_panel=_OUT, help="Feature cache to write (HDF5, schema 1)."),
    dataset: str = typer.Option(
        "folder", "--dataset", rich_help_panel=_DATA,
        help="folder (image folders and tar files), torch/NAME (torch/cifar10, torch/mnist, torch/imagenet, ...; "
             "never downloaded), hfds/NAME (a Hugging Face dataset: a hub name in its cache, or a local directory "
             "as hfds/PATH, written by save_to_disk or holding data files; hfds//abs/path) or wds/NAME (WebDataset "
             "shards under --data; pip install 'ncaudit\\[wds]')."),
    limit: int | None = typer.Option(
        None, "--limit", rich_help_panel=_DATA,
        help="A quick look: N samples drawn class by class (every class once N >= C, the rest in proportion) with "
             "a fixed seed, the same on every run."),
    class_map: str | None = typer.Option(
        None, "--class-map", rich_help_panel=_DATA,
        help="JSON list (or .txt, one name a line) of class names in model order: maps dataset class names to "
             "model indices. Without it ImageNet synset folders map by synset for ImageNet models, other datasets "
             "keep their own label order."),
    weights: str | None = typer.Option(
        None, "--weights", metavar="ENUM", rich_help_panel=_WEIGHTS,
        help="torchvision weights: a member of the model's weights enum, e.g. IMAGENET1K_V2, or DEFAULT (the "
             "default). Implies --pretrained."),
    ema: bool | None = typer.Option(
        None, "--ema/--no-ema", rich_help_panel=_WEIGHTS,
        help="Use the EMA or the plain weights when the checkpoint holds both (default: plain)."),
    resume: bool = typer.Option(
        False, "--resume", rich_help_panel=_OUT,
        help="Continue a partial cache written with the same weights (sha256), data and options."),
    overwrite: bool = typer.Option(False, "--overwrite", rich_help_panel=_OUT, help="Replace an existing cache."),
    layers: str | None = typer.Option(
        None, "--layers", metavar="NAMES", rich_help_panel=_OUT,
        help="Also store these layers, NAME[,NAME...]: module names (layer3, stages.2, blocks.11, features.7) or, "
             "for timm, feature_info indices (0,1,2). Spatial maps are average-pooled, token sequences give the "
             "class token. The projected file size is printed; a cache larger than the free space is refused."),
    store_dtype: str = typer.Option(
        "float32", "--store-dtype", rich_help_panel=_OUT,
        help="float32 or float16 for /features. float16 halves the file but rounds each feature by up to 2^-11 "
             "(5e-4) of its value, which adds about 5e-8 x (C-1)/p x |h|^2/|mu_c - mu_G|^2 to NC1: negligible "
             "unless NC1 is below ~1e-5 or the features carry a large common offset. Keep float32 to audit "
             "strongly collapsed networks."),
    precision_check: int = typer.Option(
        512, "--precision-check", rich_help_panel=_OUT,
        help="When the precision is not fp32, recompute the first K samples in float32 (no autocast, TF32 off) "
             "into /reference_fp32, so that report can give the NC1 floor the precision causes. 0: off."),
    img_size: int | None = typer.Option(
        None, "--img-size", rich_help_panel=_PREP, help="Input N x N, keeping the crop ratio."),
    mean: str | None = typer.Option(None, "--mean", rich_help_panel=_PREP,
                                    help="Normalisation mean, e.g. 0.5,0.5,0.5."),
    std: str | None = typer.Option(None, "--std", rich_help_panel=_PREP, help="Normalisation std, e.g. 0.5,0.5,0.5."),
    crop_pct: float | None = typer.Option(None, "--crop-pct", rich_help_panel=_PREP,
                                          help="Centre-crop fraction (1 = resize only)."),
    crop_mode: str | None = typer.Option(None, "--crop-mode", rich_help_panel=_PREP,
                                         help="center, squash or border (timm)."),
    interpolation: str | None = typer.Option(None, "--interpolation", rich_help_panel=_PREP,
                                             help="bilinear, bicubic, nearest, lanczos, box or hamming."),
    device: str = typer.Option("auto", "--device", rich_help_panel=_RUN, help="auto (CUDA when present), cuda or cpu."),
    precision: str = typer.Option("auto", "--precision", rich_help_panel=_RUN,
                                  help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 or fp16."),
    batch_size: int = typer.Option(64, "--batch-size", "-b", rich_help_panel=_RUN, help="Images per batch."),
    workers: int | None = typer.Option(
        None, "--workers", "-j", rich_help_panel=_RUN,
        help="DataLoader worker processes (default: the CPU cores available). Image decoding runs at ~150-300 "
             "images/s per core."),
    no_progress: bool = typer.Option(False, "--no-progress", rich_help_panel=_RUN, help="No progress bar on stderr."),
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
