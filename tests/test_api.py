"""The audit from Python without a cache: `audit_features` and `audit_model` agree with `extract` + `report` to 1e-10
on every metric and detail, render as `report` does, take the loader as many times as documented, and leave the
caller's model as it was."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from extract_fixtures import timm_model, torchvision_model
from reference import planted
from typer.testing import CliRunner

import ncaudit
from ncaudit import AuditOptions, audit_cache, audit_features, audit_model, render_json, render_text
from ncaudit.cache import FeatureCache, write_cache
from ncaudit.cli import app
from ncaudit.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
CHECKPOINT = ROOT / "fixtures" / "checkpoints" / "test_resnet_digits_e200.safetensors"
#: Blocks of the JSON report compared between two audits of the same features (``source`` says where they came from).
BLOCKS = ("n_samples", "n_features", "n_classes", "class_counts", "metrics", "details", "per_class", "layers",
          "warnings", "checks", "passed")


def differences(a: Any, b: Any, rtol: float = 1e-10, path: str = "") -> list[str]:
    """Every place where two JSON values differ beyond ``rtol`` (floats) or at all (anything else)."""
    if isinstance(a, dict) and isinstance(b, dict):
        out = [f"{path}/{k}: only in one" for k in set(a) ^ set(b)]
        return out + [d for k in set(a) & set(b) for d in differences(a[k], b[k], rtol, f"{path}/{k}")]
    if isinstance(a, list) and isinstance(b, list):
        if len(a) != len(b):
            return [f"{path}: {len(a)} vs {len(b)} items"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, rtol, f"{path}[{i}]")]
    if isinstance(a, float) and isinstance(b, float):
        return [] if abs(a - b) <= rtol * max(abs(a), abs(b)) else [f"{path}: {a!r} vs {b!r}"]
    return [] if a == b else [f"{path}: {a!r} vs {b!r}"]


def same_report(a: ncaudit.AuditResult, b: ncaudit.AuditResult, rtol: float = 1e-10) -> list[str]:
    ja, jb = a.to_json(), b.to_json()
    return differences({k: ja[k] for k in BLOCKS}, {k: jb[k] for k in BLOCKS}, rtol)


# ---------------------------------------------------------------------------------------------------------------------
# audit_features == report on the same rows
# ---------------------------------------------------------------------------------------------------------------------
def _case(kind: str) -> dict[str, Any]:
    h, y, etf = planted(C=7, p=20, n=60, sigma=0.3, offset=5.0, seed=61)
    rng = np.random.default_rng(62)
    order = rng.permutation(len(y))
    h, y = h[order], y[order]
    w, b = etf + 0.2 * rng.standard_normal(etf.shape), 0.1 * rng.standard_normal(7)
    case: dict[str, Any] = {"h": h, "y": y, "w": w, "b": b, "options": {}, "layers": None}
    if kind == "float32":
        case["h"] = h.astype(np.float32)
    elif kind == "float16+reference":  # half-precision features with their float32 recomputation
        case["h"] = h.astype(np.float16)
        case["reference"] = (np.arange(50), h[:50].astype(np.float32))
    elif kind == "layers+normalize":
        case["layers"] = {"early": (h[:, :9] ** 2).astype(np.float32), "mid": np.tanh(h).astype(np.float32)}
        case["options"] = {"normalize": True}
    elif kind == "ridge, no bias":
        case["b"] = None
        case["options"] = {"ridge": 1e-3}
    elif kind == "drop empty":
        keep = y != 3
        case.update(h=h[keep], y=y[keep], options={"drop_empty_classes": True})
    elif kind == "no classifier":
        case.update(w=None, b=None)
    return case


@pytest.mark.parametrize("kind", ["float64", "float32", "float16+reference", "layers+normalize", "ridge, no bias",
                                  "drop empty", "no classifier"])
def test_audit_features_equals_report(tmp_path, kind):
    case = _case(kind)
    h, y, w, b = case["h"], case["y"], case["w"], case["b"]
    path = write_cache(tmp_path / "c.h5", h, y, weight=w, bias=b, num_classes=7, layers=case["layers"])
    if "reference" in case:
        from ncaudit.cache import CacheWriter

        with CacheWriter.resume(path) as writer:
            writer.write_reference(*case["reference"])
    options = dict(case["options"])
    report = audit_cache(path, AuditOptions(device="cpu", batch_size=64, layers=[] if case["layers"] else None,
                                            **options))
    got = audit_features(h, y, w, b, num_classes=7, layers=case["layers"], reference=case.get("reference"),
                         batch_size=64, **options)
    assert not same_report(report, got), same_report(report, got)
    assert got.source == {"path": None, "source": "features in memory"}
    if kind == "float16+reference":
        assert got.metrics["nc1_precision_floor"] is not None
    # torch tensors, any batch size: the same numbers to rounding
    tensors = audit_features(torch.from_numpy(np.ascontiguousarray(h)), torch.from_numpy(y),
                             None if w is None else torch.from_numpy(w), None if b is None else torch.from_numpy(b),
                             num_classes=7, layers=None if case["layers"] is None else
                             {k: torch.from_numpy(v) for k, v in case["layers"].items()},
                             reference=case.get("reference"), batch_size=50, **options)
    # (the batch size itself, the rounding-error bound that grows with it and the Sigma_T cut-off it may set, and a
    # discrepancy at rounding level differ)
    run_dependent = ("/details/batch_size", "/details/sigma_t_error_bound", "/details/sigma_t_cutoff",
                     "/details/mse_check/relative_discrepancy")
    diff = [d for d in same_report(report, tensors, rtol=1e-8) if not d.startswith(run_dependent)]
    assert not diff, diff


def test_audit_features_refuses_bad_input():
    h, y, etf = planted(C=4, p=6, n=10, seed=2)
    with pytest.raises(InputError, match=r"label 7 at row 13 is outside \[0, 4\)"):
        audit_features(h, np.where(np.arange(len(y)) == 13, 7, y), etf)
    bad = h.copy()
    bad[21, 2] = np.nan
    with pytest.raises(InputError, match="features row 21 holds NaN or Inf"):
        audit_features(bad, y, etf)
    with pytest.raises(InputError, match="labels must have shape"):
        audit_features(h, y[:-1], etf)
    with pytest.raises(InputError, match="classifier weight must have shape"):
        audit_features(h, y, etf[:, :5])
    with pytest.raises(InputError, match="OOD features have 5 dimensions"):
        audit_features(h, y, etf, ood_features=np.ones((3, 5)))
    with pytest.raises(InputError, match="class"):
        audit_features(h[y != 2], y[y != 2], etf)  # an empty class without drop_empty_classes


# ---------------------------------------------------------------------------------------------------------------------
# The result renders as `report` does; checks in Python
# ---------------------------------------------------------------------------------------------------------------------
def test_result_renders_and_checks_as_report(tmp_path):
    h, y, etf = planted(C=5, p=8, n=30, sigma=0.05, offset=0.0, seed=5)
    path = write_cache(tmp_path / "c.h5", h, y, weight=etf, bias=np.zeros(5))
    res = CliRunner().invoke(app, ["report", str(path), "-q", "--per-class"], env={"COLUMNS": "100"})
    assert res.exit_code == 0, res.stderr
    result = audit_cache(path, AuditOptions(device="cpu"))
    assert render_text(result, per_class=True, width=100) == res.stdout
    js = CliRunner().invoke(app, ["report", str(path), "--json", "-q", "--fail-if", "nc1>0.1",
                                  "--fail-if", "accuracy<0.5"])
    assert result.check(["nc1>0.1", "accuracy<0.5"]) is True
    assert render_json(result) + "\n" == js.stdout
    assert result.check(["nc1<1"]) is False and not result.passed
    assert result.to_json()["checks"][0]["outcome"] == "failed"
    assert result.check(["nc5<0.1"]) is False  # not computed (no OOD data): a failed check, as in the CLI
    with pytest.raises(InputError, match="unknown metric"):
        result.check(["nc9<1"])
    restored = ncaudit.audit.result_from_json(json.loads(render_json(result)))
    assert render_text(restored, per_class=True) == render_text(result, per_class=True)


# ---------------------------------------------------------------------------------------------------------------------
# audit_model == extract + report on the bundled network and digits
# ---------------------------------------------------------------------------------------------------------------------
class CountingLoader:
    """A loader that counts how many times it is iterated."""

    def __init__(self, loader: Any) -> None:
        self.loader, self.iterations = loader, 0
        self.batch_size = getattr(loader, "batch_size", None)

    def __iter__(self):
        self.iterations += 1
        return iter(self.loader)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """``extract`` of the bundled e200 network on the test digits (batches of 64, no channels-last), the same images
    as a DataLoader built from the cache's recorded transform, and the network itself."""
    from ncaudit.data import build_transform, open_dataset
    from ncaudit.extract import extract
    from ncaudit.models import Weights, load_model

    out = tmp_path_factory.mktemp("digits") / "test.h5"
    extract("test_resnet", CHECKPOINT, ROOT / "fixtures" / "digits", out, split="test", workers=0, progress=False,
            batch_size=64, channels_last=False, layers="layer2")
    with FeatureCache(out) as cache:
        attrs = cache.info.attrs
        cfg = json.loads(attrs["transform"]) if isinstance(attrs["transform"], str) else attrs["transform"]
        names = cache.info.class_names
    data = open_dataset(ROOT / "fixtures" / "digits", split="test", transform=build_transform(cfg))
    loader = torch.utils.data.DataLoader(data.dataset, batch_size=64, shuffle=False)
    model = load_model("test_resnet", Weights("checkpoint", checkpoint=CHECKPOINT)).model
    return out, loader, model, names


def test_audit_model_equals_extract_and_report(digits):
    path, loader, model, names = digits
    model.train()  # as in a training loop: audit_model switches to eval and back
    counting = CountingLoader(loader)
    got = audit_model(model, counting, layers=["layer2"], class_names=names)
    report = audit_cache(path, AuditOptions(device="cpu", batch_size=64, layers=[]))
    assert not same_report(report, got), same_report(report, got)
    assert counting.iterations == 2  # pass 1 (with the first batch's W, b check) and pass 2
    assert got.source["classifier_source"].startswith("fc (nn.Linear)")
    assert got.source["logit_check_max_rel_error"] < 1e-4 and got.metrics["accuracy"] > 0.99
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_pre_hooks or m._forward_hooks for m in model.modules())  # no hook left behind


def test_audit_model_reads_the_loader_once_for_nc1(digits):
    """``metrics=["nc1", "cdnv"]``: one pass over the loader, the values of the full report on the same network."""
    path, loader, model, _ = digits
    counting = CountingLoader(loader)
    got = audit_model(model, counting, metrics=["nc1", "cdnv"])
    assert counting.iterations == 1
    report = audit_cache(path, AuditOptions(device="cpu", batch_size=64))
    assert list(got.metrics) == ["nc1", "cdnv"]
    for key in got.metrics:
        assert abs(got.metrics[key] - report.metrics[key]) <= 1e-10 * abs(report.metrics[key])


def test_audit_model_nc5_and_energy_on_real_features(digits):
    """The bundled network's features: the energies against the float64 reference, NC5 with noise images as OOD
    data (one more pass, over the OOD loader only)."""
    from reference import reference_energy, reference_nc5

    path, loader, model, _ = digits
    images = torch.rand(96, 3, 32, 32, generator=torch.Generator().manual_seed(0)) * 4 - 2
    noise = torch.utils.data.TensorDataset(images)
    ood_loader = CountingLoader(torch.utils.data.DataLoader(noise, batch_size=32))
    counting = CountingLoader(loader)
    got = audit_model(model, counting, ood_loader=ood_loader)
    assert counting.iterations == 2 and ood_loader.iterations == 1
    with FeatureCache(path) as cache:
        h = np.concatenate([b[1] for b in cache.iter_batches(4096)])
        y = np.concatenate([b[2] for b in cache.iter_batches(4096)])
        w, _ = cache.classifier()
    with torch.inference_mode():
        ood = audit_model_features(model, noise.tensors[0])
    assert got.metrics["nc5"] == pytest.approx(reference_nc5(h, y, ood), rel=1e-9)
    means = np.stack([h[y == c].astype(np.float64).mean(0) for c in range(10)])
    ref_means = reference_energy(means - h.astype(np.float64).mean(0))
    ref_rows = reference_energy(w)
    assert got.metrics["energy_log_means"] == pytest.approx(ref_means["log_mean"], rel=1e-10)
    assert got.metrics["energy_riesz_means"] == pytest.approx(math.exp(ref_means["riesz_log_mean"]), rel=1e-9)
    assert got.metrics["energy_log_classifier"] == pytest.approx(ref_rows["log_mean"], rel=1e-10)
    assert got.details["energy"]["energy_riesz_classifier"]["log_mean"] == pytest.approx(ref_rows["riesz_log_mean"],
                                                                                          rel=1e-10)


def audit_model_features(model: torch.nn.Module, x: torch.Tensor) -> np.ndarray:
    """The classifier's input for ``x``, through a hook of its own (independent of ncaudit)."""
    captured = []
    handle = model.get_classifier().register_forward_pre_hook(lambda m, a: captured.append(a[0]))
    model.eval()
    model(x)
    handle.remove()
    return captured[0].double().numpy()


def test_audit_model_mixed_precision_torchvision_and_refusals():
    """A torchvision network with bf16 autocast: the first rows are recomputed in float32 (the NC1 precision floor);
    a head that is not one affine map is refused in one line, with the model left as it was."""
    model = torchvision_model("resnet18", num_classes=3)
    gen = torch.Generator().manual_seed(1)
    x, y = torch.randn(48, 3, 32, 32, generator=gen), torch.arange(48) % 3
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)
    result = audit_model(model, loader, precision="bf16", precision_check=20)
    assert result.source["precision"] == "bf16" and result.details["precision_floor_rows"] == 20
    assert result.metrics["nc1_precision_floor"] is not None and result.metrics["nc1_precision_floor"] > 0
    mlp = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 16), torch.nn.ReLU(),
                              torch.nn.Linear(16, 3))
    mlp.train()
    with pytest.raises(InputError, match="classifier"):
        audit_model(mlp, loader, classifier="1")  # the first Linear is not what feeds the logits
    assert mlp.training and not any(m._forward_pre_hooks for m in mlp.modules())
    with pytest.raises(InputError, match="no module named"):
        audit_model(mlp, loader, classifier="head")
    with pytest.raises(InputError, match="no such module"):
        audit_model(timm_model(), loader, layers=["nope"])
    with pytest.raises(InputError, match=r"\(images, labels\)"):
        audit_model(model, [torch.zeros(2, 3, 32, 32)])
    with pytest.raises(InputError, match="no batches"):
        audit_model(model, [])


def test_audit_model_in_fp32_inside_a_callers_autocast_region(digits):
    """A training loop's mixed-precision region around the audit does not lower the fp32 features."""
    path, loader, model, names = digits
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = audit_model(model, loader, class_names=names)
    report = audit_cache(path, AuditOptions(device="cpu", batch_size=64))
    assert got.metrics["nc1"] == pytest.approx(report.metrics["nc1"], rel=1e-10)


def test_audit_model_refuses_a_loader_that_changes_between_passes():
    model = timm_model(num_classes=3)

    class Shrinking:
        """Yields fewer samples on the second pass (drop_last with shuffling does this)."""

        def __init__(self) -> None:
            self.n = 0

        def __iter__(self):
            self.n += 1
            k = 30 if self.n == 1 else 27
            x = torch.randn(k, 3, 32, 32, generator=torch.Generator().manual_seed(0))
            yield x[:15], torch.arange(15) % 3
            yield x[15:], torch.arange(15, k) % 3

    with pytest.raises(InputError, match="every pass must iterate the same samples"):
        audit_model(model, Shrinking())


def test_import_of_the_audit_loads_no_model_library():
    import subprocess
    import sys

    code = ("import sys, ncaudit.audit, ncaudit.cli._report, ncaudit.report; "
            "bad = [m for m in sys.modules if m.split('.')[0] in ('timm', 'torchvision') or m == 'ncaudit.models']; "
            "assert not bad, bad")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
