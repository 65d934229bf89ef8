"""Train timm's ``test_resnet`` on the bundled handwritten digits and follow Neural Collapse while it trains.

Every epoch the network in memory is audited on the training and the test images, and one row goes to a trajectory
file that ``ncaudit trajectory`` reads and plots:

* the training set through :func:`ncaudit.audit_model` (two passes over an evaluation loader, no cache file);
* the test set through an :class:`ncaudit.AuditAccumulator` riding along the evaluation loop the script runs anyway
  (a forward hook hands it the classifier's input), plus the one more pass it asks for.

Run from the repository root (a CPU is enough)::

    python examples/train_digits.py --epochs 30 --out digits-run
    ncaudit trajectory digits-run/trajectory.jsonl --plot digits-run/trajectory.png

``--subset`` trains on part of the images (the test suite runs ``--epochs 2 --subset 300 --test-subset 150``).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # timm builds test_resnet locally; nothing is downloaded

import torch  # noqa: E402
from PIL import Image  # noqa: E402

import ncaudit  # noqa: E402

DIGITS = Path(__file__).resolve().parents[1] / "fixtures" / "digits"


def load_split(root: Path, subset: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The PNGs of one split as the bundled checkpoints were trained on them: grayscale -> RGB, 32 px, mean 0.5,
    std 0.25 (timm's evaluation transform); ``subset`` images spread evenly over the classes."""
    from timm.data import create_transform

    transform = create_transform(input_size=(3, 32, 32), interpolation="bilinear", mean=(0.5,) * 3, std=(0.25,) * 3,
                                 crop_pct=1.0, is_training=False)
    paths = [(path, int(c.name)) for c in sorted(p for p in root.iterdir() if p.is_dir())
             for path in sorted(c.glob("*.png"))]
    if subset is not None and subset < len(paths):
        paths = [paths[int(i)] for i in torch.linspace(0, len(paths) - 1, subset).round().long()]
    xs = []
    for path, _ in paths:
        with Image.open(path) as img:
            xs.append(transform(img.convert("RGB")))
    return torch.stack(xs), torch.tensor([label for _, label in paths])


def audit_test_set(model: torch.nn.Module, loader: torch.utils.data.DataLoader, epoch: int
                   ) -> tuple[ncaudit.AuditResult, float]:
    """The evaluation loop a training script runs anyway, with the audit's statistics riding along (pass 1); the
    sample-level metrics take one more pass (rarely more: the accumulator says). Returns the audit and the accuracy
    the loop measured itself."""
    fc = model.get_classifier()
    acc = ncaudit.AuditAccumulator(10, fc.weight, fc.bias, attrs={"split": "test", "epoch": epoch})
    captured: dict[str, torch.Tensor] = {}
    handle = fc.register_forward_pre_hook(lambda module, args: captured.update(h=args[0]))
    model.eval()
    correct = seen = 0
    try:
        with torch.no_grad():
            for x, y in loader:  # the usual evaluation ...
                correct += int((model(x).argmax(1) == y).sum())
                seen += len(y)
                acc.update(captured["h"], y)  # ... and the audit's statistics, on the same forward pass
            while acc.end_pass():  # the passes the audit still wants
                for x, y in loader:
                    model(x)
                    acc.update(captured["h"], y)
    finally:
        handle.remove()
    return acc.compute(), correct / seen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--subset", type=int, default=None, help="train on this many images (default: all 1,438)")
    parser.add_argument("--test-subset", type=int, default=None, help="test on this many (default: all 359)")
    parser.add_argument("--out", type=Path, default=Path("digits-run"))
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--weight-decay", type=float, default=5e-3)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    args = parser.parse_args(argv)

    import timm

    torch.manual_seed(args.seed)
    x_train, y_train = load_split(DIGITS / "train", args.subset)
    x_test, y_test = load_split(DIGITS / "test", args.test_subset)
    train_eval = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_train, y_train), batch_size=256)
    test_loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x_test, y_test), batch_size=256)

    model = timm.create_model("test_resnet", pretrained=False, num_classes=10)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(args.epochs, 1))
    loss_fn = torch.nn.CrossEntropyLoss()
    shuffle = torch.Generator().manual_seed(args.seed)

    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / "trajectory.jsonl"
    with ncaudit.TrajectoryWriter(path, overwrite=True) as log:
        for epoch in range(args.epochs + 1):
            if epoch > 0:  # epoch 0 is the initialisation
                model.train()
                order = torch.randperm(len(y_train), generator=shuffle)
                for i in range(0, len(order), args.batch_size):
                    idx = order[i:i + args.batch_size]
                    optimizer.zero_grad(set_to_none=True)
                    loss_fn(model(x_train[idx]), y_train[idx]).backward()
                    optimizer.step()
                scheduler.step()
            t0 = time.perf_counter()
            train = ncaudit.audit_model(model, train_eval, attrs={"split": "train", "epoch": epoch})
            test, test_accuracy = audit_test_set(model, test_loader, epoch)
            log.write(epoch, train=train, test=test)  # on disk when this returns
            seconds = time.perf_counter() - t0
            print(f"epoch {epoch:3d}  train acc {train.metrics['accuracy']:.3f}  NC1 {train.metrics['nc1']:.3g}  "
                  f"NC3 {train.metrics['nc3']:.3g}  |  test acc {test_accuracy:.3f}  NC1 {test.metrics['nc1']:.3g}  "
                  f"(audits {seconds:.2f} s)", flush=True)

    rows = ncaudit.read_trajectory(path)
    print(f"wrote {path}: {len(rows)} rows (epochs {rows[0].epoch}..{rows[-1].epoch})")
    if not args.no_plot:
        from ncaudit.report import plot_trajectory

        plot_trajectory(rows, args.out / "trajectory.png", title="test_resnet on the digits, audited while training")
        print(f"wrote {args.out / 'trajectory.png'}")
    print(f"see it with: ncaudit trajectory {path} --wide")
    return 0


if __name__ == "__main__":
    sys.exit(main())
