"""Throughput of ``ncaudit extract`` against a bare forward loop of the same model, batch and precision.

Both read the same synthetic images held in memory (no decoding), so the ratio measures what extraction adds:
hooks, the device-to-host copy, the writer thread and HDF5. Targets: >= 0.9x on CPU (a small model) and on CUDA
(resnet50, batch 256, bf16; run only when a GPU is present).

Usage::

    python bench/extract.py                 # CPU case, and the CUDA case when CUDA is available
    python bench/extract.py --cpu-only --n 512 --img 64 --model resnet18 --batch 64 --repeat 3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from ncaudit.data import tensor_source  # noqa: E402
from ncaudit.extract import autocast_context, extract  # noqa: E402


def bare_loop(model: torch.nn.Module, images: torch.Tensor, batch: int, device: torch.device, precision: str,
              channels_last: bool) -> float:
    """Images/s of ``model(x)`` over ``images`` in batches (inputs copied to the device, logits back to the host)."""
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    pin = device.type == "cuda"
    src = images.pin_memory() if pin else images
    with torch.inference_mode():
        x = src[:batch].to(device)
        with autocast_context(precision, device):
            model(x)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for start in range(0, len(src), batch):
            x = src[start:start + batch].to(device, non_blocking=pin)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast_context(precision, device):
                out = model(x)
            out.float().cpu()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return len(src) / (time.perf_counter() - t0)


def run_case(model_name: str, n: int, img: int, batch: int, device: str, precision: str, classes: int = 10,
             repeat: int = 3) -> None:
    """Alternate bare loop and extract ``repeat`` times (a shared machine is noisy) and print the best of each."""
    import timm
    dev = torch.device(device)
    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False, num_classes=classes).eval()
    images = torch.randn(n, 3, img, img)
    labels = torch.arange(n) % classes
    src = tensor_source(images, labels)
    bare_nchw = bare_loop(model, images, batch, dev, precision, channels_last=False)
    bare, ours, walls = [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(tmp) / "w.pth"
        torch.save(model.state_dict(), ckpt)
        for _ in range(repeat):
            bare.append(bare_loop(model, images, batch, dev, precision, channels_last=True))
            t0 = time.perf_counter()
            summary = extract(model_name, ckpt, src, Path(tmp) / "f.h5", device=device, precision=precision,
                              batch_size=batch, workers=0, progress=False, precision_check=0, overwrite=True)
            walls.append(n / (time.perf_counter() - t0))
            ours.append(summary.images_per_s)
    threads = torch.get_num_threads()
    print(f"{model_name} {img}px batch {batch} {precision} on {device} ({threads} threads), {n} images, "
          f"best of {repeat} alternated runs:")
    print(f"  bare loop          {max(bare):8.1f} img/s (channels_last; NCHW: {bare_nchw:.1f})")
    print(f"  ncaudit extract    {max(ours):8.1f} img/s (loop incl. first-batch check; {max(walls):.1f} img/s "
          "incl. model load)")
    ratios = sorted(o / b for o, b in zip(ours, bare))
    print(f"  ratio extract/bare {max(ours) / max(bare):8.2f}x best vs best, {ratios[len(ratios) // 2]:.2f}x median of "
          "the alternated pairs; per pair: " + ", ".join(f"{o / b:.2f}" for o, b in zip(ours, bare)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="resnet18")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--img", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--cpu-only", action="store_true")
    args = parser.parse_args()
    run_case(args.model, args.n, args.img, args.batch, "cpu", "fp32", repeat=args.repeat)
    if torch.cuda.is_available() and not args.cpu_only:
        run_case("resnet50", 256 * 40, 224, 256, "cuda", "bf16", classes=1000)
    else:
        print("CUDA case (resnet50, batch 256, bf16): not run, no CUDA device")


if __name__ == "__main__":
    main()
