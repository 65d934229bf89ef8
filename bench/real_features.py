"""Least-squares geometry on the features of a trained network: timm convnext_atto (LayerNorm head) on the digits.

Usage::

    python bench/real_features.py                 # train 30 epochs (seeded, ~5-10 min on 2 cores), extract, report
    python bench/real_features.py --epochs 5 --out /tmp/convnext-digits

Trains convnext_atto from scratch on the bundled digits (train split, 32 px, the fixtures' normalisation, SGD with
momentum 0.9, lr 0.05, weight decay 5e-3, cosine schedule, batch 128), extracts its penultimate features with
``ncaudit extract`` and compares ``ncaudit report``'s least-squares quantities with an SVD solve on the samples
(``np.linalg.lstsq`` on the centred rows, eigenvalues of Sigma_T below p eps lambda_max cut), next to what a float32
scatter (the scheme of 0.1.0) gives. Prints the spectrum of Sigma_T and one row per scheme.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))


def train(out: Path, epochs: int, seed: int = 0) -> Path:
    import timm
    from torchvision import datasets, transforms

    from ncaudit._demo import default_fixtures, load_manifest

    fixtures = default_fixtures()
    t = load_manifest(fixtures)["transform"]
    tf = transforms.Compose([transforms.Grayscale(3), transforms.Resize(t["img_size"]), transforms.ToTensor(),
                             transforms.Normalize(t["mean"], t["std"])])
    data = datasets.ImageFolder(str(fixtures / "digits" / "train"), transform=tf)
    x = torch.stack([img for img, _ in data])
    y = torch.tensor([label for _, label in data])
    torch.manual_seed(seed)
    model = timm.create_model("convnext_atto", pretrained=False, num_classes=10)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-3)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs)
    g = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(y), generator=g)
        t0, total = time.perf_counter(), 0.0
        for i in range(0, len(y), 128):
            idx = order[i:i + 128]
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss) * len(idx)
        sched.step()
        print(f"epoch {epoch + 1}/{epochs}: loss {total / len(y):.4f} ({time.perf_counter() - t0:.1f} s)",
              file=sys.stderr)
    ckpt = out / "convnext_atto_digits.pth"
    torch.save(model.state_dict(), ckpt)
    return ckpt


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--out", type=Path, default=Path("/tmp/ncaudit-convnext-digits"))
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    from reference import reference_metrics

    from ncaudit import metrics
    from ncaudit._demo import default_fixtures, load_manifest
    from ncaudit.audit import AuditOptions, audit
    from ncaudit.cache import FeatureCache
    from ncaudit.data import TransformOverrides
    from ncaudit.extract import extract
    from ncaudit.stats import ClassStatistics

    ckpt = args.out / "convnext_atto_digits.pth"
    if not ckpt.exists():
        ckpt = train(args.out, args.epochs)
    fixtures = default_fixtures()
    t = load_manifest(fixtures)["transform"]
    cache = args.out / "convnext_atto_digits_train.h5"
    extract("convnext_atto", ckpt, fixtures / "digits", cache, split="train", device="cpu", precision="fp32",
            workers=0, progress=False, overwrite=True, transform=TransformOverrides(
                img_size=t["img_size"], mean=t["mean"], std=t["std"], crop_pct=t["crop_pct"],
                interpolation=t["interpolation"]))
    with FeatureCache(cache) as fc:
        h = np.concatenate([b[1] for b in fc.iter_batches(1 << 16)])
        y = np.concatenate([b[2] for b in fc.iter_batches(1 << 16)])
        w, b = fc.classifier()
    ref = reference_metrics(h.astype(np.float64), y, w, b)
    lam = np.linalg.eigvalsh(np.cov(h.astype(np.float64).T, bias=True))[::-1]
    print(f"N = {len(y)}, p = {h.shape[1]}; eigenvalues of Sigma_T above 1e-7, 1e-11, 1e-13 of the largest: "
          + ", ".join(str(int(np.sum(lam > f * lam[0]))) for f in (1e-7, 1e-11, 1e-13)))
    acc = ClassStatistics(len(w), h.shape[1], gemm_dtype=torch.float32)
    acc.update(h, y)
    st = acc.compute()
    ls = metrics.least_squares(st)
    old = {"mse_term_a": metrics.ls_loss(st, ls), "mse_term_b": metrics.mse_term_b(st, w, b, ls),
           "ls_cosine": metrics.ls_cosine(w, ls), "w_ls_norm": float(np.linalg.norm(ls.weight)), "rank": ls.rank}
    result = audit(cache, AuditOptions(device="cpu"))
    new = {k: result.metrics[k] for k in ("mse_term_a", "mse_term_b", "ls_cosine")}
    new.update(w_ls_norm=result.details["w_ls_norm"], rank=result.details["rank_sigma_t"])
    reference = {"mse_term_a": ref["mse_term_a"], "mse_term_b": ref["mse_term_b"], "ls_cosine": ref["ls_cosine"],
                 "w_ls_norm": float(np.linalg.norm(ref["w_ls"])), "rank": int(np.linalg.matrix_rank(
                     h.astype(np.float64) - h.astype(np.float64).mean(0), tol=None))}
    print(f"{'':28s} {'term A':>12s} {'term B':>12s} {'ls_cosine':>12s} {'w_ls_norm':>12s} {'rank':>5s}")
    for name, row in (("reference (lstsq on rows)", reference), ("float32 scatter, honest cut", old),
                      ("ncaudit report", new)):
        print(f"{name:28s} {row['mse_term_a']:12.6g} {row['mse_term_b']:12.6g} {row['ls_cosine']:12.6g} "
              f"{row['w_ls_norm']:12.6g} {row['rank']:5d}")
    print("report details:", json.dumps({k: result.details[k] for k in ("least_squares", "mse_check", "gemm_dtype")}))
    print("warnings:", result.warnings)


if __name__ == "__main__":
    main()
