"""One rank of the 2-process gloo test of the in-memory audit (tests/test_training_distributed.py runs it under
``torch.distributed.run``): every rank audits its own shard with ``audit_features``, ``AuditAccumulator`` and
``audit_model``, and writes the JSON report it gets to ``OUT/<name>.rank<r>.json``; the test compares them with one
process auditing every row."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import torch
from reference import planted

N_OOD = 90


def data() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Features in dataset order (classes straddle the rank boundary), float32, a classifier, OOD rows."""
    h, y, etf = planted(C=5, p=12, n=70, sigma=0.2, offset=3.0, seed=71)
    rng = np.random.default_rng(72)
    w, b = etf + 0.2 * rng.standard_normal(etf.shape), 0.1 * rng.standard_normal(5)
    return h.astype(np.float32), y, w, b, (rng.standard_normal((N_OOD, 12)) + 0.5).astype(np.float32)


def images() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(73)
    return torch.randn(60, 3, 32, 32, generator=gen), torch.arange(60) % 3


def model() -> torch.nn.Module:
    import timm

    torch.manual_seed(74)
    return timm.create_model("test_resnet", pretrained=False, num_classes=3).eval()


def accumulate(h: np.ndarray, y: np.ndarray, w: np.ndarray, b: np.ndarray, ood: np.ndarray, **kw: object):
    from ncaudit import AuditAccumulator

    acc = AuditAccumulator(5, w, b, **kw)
    acc.update_ood(ood)
    while True:
        for i in range(0, len(y), 32):
            acc.update(torch.from_numpy(h[i:i + 32]), torch.from_numpy(y[i:i + 32]))
        if not acc.end_pass():
            break
    return acc.compute()


def main(out: Path) -> None:
    from ncaudit import audit_features, audit_model
    from ncaudit import distributed as nd
    from ncaudit.errors import InputError

    with nd.process_group("cpu") as ctx:
        (out / f"started.{ctx.rank}").write_text("ok")
        h, y, w, b, ood = data()
        rows, ood_rows = ctx.rows(len(y)), ctx.rows(N_OOD)
        results = {
            "features": audit_features(h[rows.start:rows.stop], y[rows.start:rows.stop], w, b, batch_size=32,
                                       ood_features=ood[ood_rows.start:ood_rows.stop]),
            "accumulator": accumulate(h[rows.start:rows.stop], y[rows.start:rows.stop], w, b,
                                      ood[ood_rows.start:ood_rows.stop]),
        }
        x, labels = images()
        part = ctx.rows(len(labels))
        dataset = torch.utils.data.TensorDataset(x, labels)
        loader = torch.utils.data.DataLoader(torch.utils.data.Subset(dataset, part), batch_size=16)
        results["model"] = audit_model(model(), loader)
        for name, result in results.items():
            (out / f"{name}.rank{ctx.rank}.json").write_text(json.dumps(result.to_json()))
        bad = y.copy()
        bad[300] = 7  # in rank 1's rows only: every rank must stop, none may wait at a merge
        try:
            audit_features(h[rows.start:rows.stop], bad[rows.start:rows.stop], w, b)
            message = ""
        except InputError as exc:
            message = str(exc)
        (out / f"bad.rank{ctx.rank}.txt").write_text(message)
        nd.barrier()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
