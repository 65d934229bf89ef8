"""``ncaudit extract`` end to end on tiny in-process models and a few dozen PNGs (CPU; CUDA tests skip without one)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from extract_fixtures import (
    CLASSES,
    FAST,
    N_IMAGES,
    last_error_line,
    make_image_folder,
    timm_model,
    torchvision_model,
)
from typer.testing import CliRunner

from ncaudit import cache as store
from ncaudit.cache import FeatureCache
from ncaudit.cli import app
from ncaudit.data import open_samples, stratified_order
from ncaudit.errors import InputError
from ncaudit.extract import extract
from ncaudit.models import Weights


def _read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", locking=False) as f:
        return {k: f[k][()] for k in ("features", "labels", "logits", "classifier/weight", "classifier/bias")}


def _model_inputs(images: Path, model: torch.nn.Module) -> tuple[torch.Tensor, list[int]]:
    from torchvision.datasets import ImageFolder

    from ncaudit.data import build_transform, transform_config
    tf = build_transform(transform_config(model, "timm", img_size=32))
    folder = ImageFolder(str(images))
    xs = [tf(folder.loader(p)) for p, _ in folder.samples]
    return torch.stack(xs), [t for _, t in folder.samples]


def test_features_are_the_models_own(images: Path, reference: Path) -> None:
    model = timm_model()
    x, targets = _model_inputs(images, model)
    with torch.inference_mode():
        pre = model.forward_head(model.forward_features(x), pre_logits=True).numpy()
        out = model(x).numpy()
    got = _read(reference)
    np.testing.assert_allclose(got["features"], pre, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["logits"], out, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(got["labels"], targets)
    assert list(got["labels"][:3]) == [0, 0, 0] and sorted(set(got["labels"])) == [0, 1, 2]
    np.testing.assert_array_equal(got["classifier/weight"], model.fc.weight.detach().numpy())
    with FeatureCache(reference) as cache:
        info = cache.info
        assert info.complete and info.n_samples == N_IMAGES and info.n_features == 96 and info.num_classes == 3
        assert info.class_names == sorted(CLASSES) and info.n_reference == 0
        attrs = info.attrs
    for key in ("model", "checkpoint", "checkpoint_sha256", "ema", "dataset", "split", "precision", "transform",
                "created", "ncaudit_version", "classifier_source"):
        assert key in attrs, key
    assert attrs["precision"] == "fp32" and attrs["ema"] in (False, 0)
    assert json.loads(attrs["transform"])["input_size"] == [3, 32, 32]


def test_each_checkpoint_form_gives_identical_features(images: Path, reference: Path, tmp_path: Path) -> None:
    from safetensors.torch import save_file
    sd = timm_model().state_dict()
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "a.pth")
    save_file({f"_orig_mod.{k}": v.contiguous() for k, v in sd.items()}, str(tmp_path / "b.safetensors"))
    want = _read(reference)["features"]
    for name in ("a.pth", "b.safetensors"):
        extract("test_resnet", tmp_path / name, images, tmp_path / f"{name}.h5", **FAST)
        np.testing.assert_array_equal(_read(tmp_path / f"{name}.h5")["features"], want)


def test_ema_picks_the_right_weights(images: Path, tmp_path: Path) -> None:
    plain, ema = timm_model(seed=0).state_dict(), timm_model(seed=1).state_dict()
    torch.save({"state_dict": plain, "state_dict_ema": ema}, tmp_path / "both.pth")
    s = extract("test_resnet", Weights(checkpoint=tmp_path / "both.pth", ema=True), images, tmp_path / "e.h5",
                limit=8, **FAST)
    assert s.n_samples == 8
    with FeatureCache(tmp_path / "e.h5") as cache:
        w, _ = cache.classifier()
        assert cache.info.attrs["ema"] in (True, 1)
    np.testing.assert_allclose(w, ema["fc.weight"].numpy())


def _limited(reference: Path, n: int) -> np.ndarray:
    """The rows of the full extraction ``reference`` that ``--limit n`` keeps, in the order it keeps them."""
    return stratified_order(_read(reference)["labels"])[:n]


def test_limit_and_float16_storage(images: Path, ckpt: Path, reference: Path, tmp_path: Path) -> None:
    s = extract("test_resnet", ckpt, images, tmp_path / "l.h5", limit=5, store_dtype="float16", **FAST)
    assert s.n_samples == 5
    got = _read(tmp_path / "l.h5")
    assert got["features"].dtype == np.float16 and got["features"].shape == (5, 96)
    rows = _limited(reference, 5)
    np.testing.assert_allclose(got["features"], _read(reference)["features"][rows], rtol=2e-3, atol=1e-3)
    np.testing.assert_array_equal(got["labels"], _read(reference)["labels"][rows])


def test_limit_is_a_stratified_seeded_sample(images: Path, ckpt: Path, reference: Path, tmp_path: Path) -> None:
    """--limit N draws classes in proportion (every class once N >= C), the same rows on every run, and a larger N
    keeps the rows of a smaller one; the first N files in class order (one class only) are not what it takes."""
    labels = _read(reference)["labels"]
    for n in (3, 4, 9, 17):
        rows = stratified_order(labels)[:n]
        counts = np.bincount(labels[rows], minlength=3)
        assert counts.min() >= 1 and np.abs(counts - n * np.bincount(labels) / len(labels)).max() <= 1.0, (n, counts)
    assert np.array_equal(stratified_order(labels), stratified_order(labels.copy()))
    assert len(set(labels[stratified_order(labels)[:2]].tolist())) == 2  # fewer rows than classes: distinct classes
    a = extract("test_resnet", ckpt, images, tmp_path / "a.h5", limit=9, **FAST)
    b = extract("test_resnet", ckpt, images, tmp_path / "b.h5", limit=9, **FAST)
    assert a.n_samples == b.n_samples == 9
    np.testing.assert_array_equal(_read(tmp_path / "a.h5")["features"], _read(tmp_path / "b.h5")["features"])
    # Other batch companions than in the full run: equal to float32 rounding of the convolutions.
    np.testing.assert_allclose(_read(tmp_path / "a.h5")["features"],
                               _read(reference)["features"][_limited(reference, 9)], rtol=1e-4, atol=1e-6)
    res = CliRunner().invoke(app, ["report", str(tmp_path / "a.h5"), "--json", "-q"])  # every class has samples
    assert res.exit_code == 0, res.stderr


def test_resume_after_interruption_equals_uninterrupted(images: Path, ckpt: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    full, part = tmp_path / "full.h5", tmp_path / "part.h5"
    opts = dict(FAST, chunk_rows=8, precision="bf16", precision_check=6)
    extract("test_resnet", ckpt, images, full, **opts)
    real_write = store.CacheWriter.write
    calls = {"n": 0}

    def crashing_write(self: store.CacheWriter, *args: object, **kwargs: object) -> None:
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        real_write(self, *args, **kwargs)

    monkeypatch.setattr(store.CacheWriter, "write", crashing_write)
    with pytest.raises(KeyboardInterrupt):
        extract("test_resnet", ckpt, images, part, **opts)
    monkeypatch.setattr(store.CacheWriter, "write", real_write)
    with h5py.File(part, "r", locking=False) as f:
        assert not f.attrs["complete"] and f.attrs["n_written"] == 16
    with pytest.raises(InputError, match="report|allow-partial|incomplete"):
        FeatureCache(part)
    with pytest.raises(InputError, match="--resume"):
        extract("test_resnet", ckpt, images, part, **opts)
    with pytest.raises(InputError, match="another precision"):
        extract("test_resnet", ckpt, images, part, resume=True, **dict(opts, precision="fp32"))
    s = extract("test_resnet", ckpt, images, part, resume=True, **opts)
    assert s.resumed_from == 16 and s.n_reference == 6
    a, b = _read(full), _read(part)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    with h5py.File(full, "r", locking=False) as f, h5py.File(part, "r", locking=False) as g:
        np.testing.assert_array_equal(f["reference_fp32/features"][()], g["reference_fp32/features"][()])
    with pytest.raises(InputError, match="complete.*--overwrite"):
        extract("test_resnet", ckpt, images, part, **opts)


def _nc1_floor(path: Path) -> float:
    """(1/C) tr(Sigma_Delta Sigma_B^+) of the spec, from the reference rows (test-local, plain NumPy)."""
    with FeatureCache(path) as cache:
        ref = cache.reference_fp32()
        f, y = _read(path)["features"].astype(np.float64), _read(path)["labels"]
    idx, stored, ref32 = ref
    delta = stored.astype(np.float64) - ref32
    sigma_d = delta.T @ delta / len(idx)
    mu_g = f.mean(0)
    m = np.stack([f[y == c].mean(0) - mu_g for c in range(3)], 1)
    sigma_b = m @ m.T / 3
    return float(np.trace(sigma_d @ np.linalg.pinv(sigma_b, rcond=1e-10, hermitian=True)) / 3)


def test_precision_floor_zero_for_fp32_positive_for_bf16(images: Path, ckpt: Path, reference: Path,
                                                         tmp_path: Path) -> None:
    from ncaudit.data import build_transform, open_dataset, transform_config
    from ncaudit.extract._single import _reference_features
    from ncaudit.models import PenultimateModel, load_model
    # fp32: no reference rows are needed; recomputing them gives exactly the stored features (delta = 0)
    loaded = load_model("test_resnet", ckpt)
    src = open_dataset(images, transform=build_transform(transform_config(loaded.model, "timm", img_size=32)))
    pm = PenultimateModel(loaded)
    ref32 = _reference_features(pm, src, 10, 8, 0, torch.device("cpu"), False)
    np.testing.assert_array_equal(ref32, _read(reference)["features"][:10])
    out = tmp_path / "bf16.h5"
    s = extract("test_resnet", ckpt, images, out, precision="bf16", precision_check=12, **FAST)
    assert s.n_reference == 12 and s.precision == "bf16"
    with FeatureCache(out) as cache:
        idx, stored, ref = cache.reference_fp32()
    np.testing.assert_array_equal(idx, np.arange(12))
    np.testing.assert_allclose(ref, _read(reference)["features"][:12], rtol=1e-5, atol=1e-5)
    assert np.abs(stored - ref).max() > 0
    assert _nc1_floor(out) > 0


def test_no_preprocessing_warning_names_what_came_from_defaults(images: Path, ckpt: Path, tmp_path: Path) -> None:
    """A checkpoint that records no preprocessing: the warning names the values taken from the model's defaults, and
    is not given when a flag sets every one of them."""
    from ncaudit.data import TransformOverrides

    fast = {k: v for k, v in FAST.items() if k != "transform"}
    notes: list[str] = []
    extract("test_resnet", ckpt, images, tmp_path / "a.h5", limit=3, log=notes.append, **FAST)
    (warning,) = [n for n in notes if "records no preprocessing" in n]
    assert "interpolation, mean, std, crop_pct, crop_mode from the" in warning and "input_size" not in warning
    every = TransformOverrides(img_size=32, mean="0.5,0.5,0.5", std="0.25,0.25,0.25", crop_pct=1.0,
                               interpolation="bilinear", crop_mode="center")
    notes.clear()
    extract("test_resnet", ckpt, images, tmp_path / "b.h5", limit=3, log=notes.append, transform=every, **fast)
    assert not [n for n in notes if "records no preprocessing" in n], notes


def test_torchvision_models_and_class_map(images: Path, tmp_path: Path) -> None:
    for name in ("resnet18", "mobilenet_v3_small"):
        model = torchvision_model(name)
        torch.save({"model": model.state_dict()}, tmp_path / f"{name}.pth")
        s = extract(f"torchvision:{name}", tmp_path / f"{name}.pth", images, tmp_path / f"{name}.h5", limit=6,
                    **FAST)
        last = model.fc if name == "resnet18" else model.classifier[-1]
        assert s.n_features == last.in_features
        got = _read(tmp_path / f"{name}.h5")
        np.testing.assert_array_equal(got["classifier/weight"], last.weight.detach().numpy())
    (tmp_path / "map.json").write_text(json.dumps(["c_eel", "b_cat", "a_dog"]))
    extract("torchvision:resnet18", tmp_path / "resnet18.pth", images, tmp_path / "m.h5", limit=6,
            class_map=tmp_path / "map.json", **FAST)
    dataset_labels = open_samples(images).labels  # a_dog, b_cat, c_eel = 0, 1, 2; the map reverses them
    np.testing.assert_array_equal(_read(tmp_path / "m.h5")["labels"], 2 - dataset_labels[stratified_order(
        dataset_labels)[:6]])
    with FeatureCache(tmp_path / "m.h5") as cache:
        assert cache.info.class_names == ["c_eel", "b_cat", "a_dog"]


def test_layers_are_pooled_and_refused_when_too_big(images: Path, ckpt: Path, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "layers.h5"
    notes: list[str] = []
    said: list[str] = []
    extract("test_resnet", ckpt, images, out, layers="layer4,1", limit=10, log=notes.append, info=said.append, **FAST)
    assert any("projected cache size" in n for n in said)  # information, not a warning
    assert not any("projected cache size" in n for n in notes)
    with FeatureCache(out) as cache:
        assert cache.info.layers == {"layer1": 32, "layer4": 96}  # network order, feature_info index 1 = layer1
        (_, f, _, extra), = cache.iter_batches(100, layers=["layer1", "layer4"])
    np.testing.assert_allclose(extra["layer4"], f, rtol=1e-6, atol=1e-6)  # resnet: pre-logits = pooled layer4
    with pytest.raises(InputError, match="no such module.*layer1, layer2"):
        extract("test_resnet", ckpt, images, tmp_path / "x.h5", layers="nope", **FAST)
    import shutil
    from collections import namedtuple
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(shutil, "disk_usage", lambda path: usage(1 << 30, 1 << 30, 1000))
    with pytest.raises(InputError, match="but only 1000 bytes is free"):
        extract("test_resnet", ckpt, images, tmp_path / "y.h5", layers="layer3", **FAST)
    assert not (tmp_path / "y.h5").exists()


def _write_fake_mnist(root: Path, n: int = 12) -> None:
    """torchvision's MNIST layout (raw idx files) with n random 28x28 digits; labels 0..9 cycling."""
    import struct
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = (np.arange(n) % 10).astype(np.uint8)
    for split in ("t10k", "train"):  # torchvision checks that all four files exist
        (raw / f"{split}-images-idx3-ubyte").write_bytes(struct.pack(">IIII", 2051, n, 28, 28) + images.tobytes())
        (raw / f"{split}-labels-idx1-ubyte").write_bytes(struct.pack(">II", 2049, n) + labels.tobytes())


def test_torchvision_dataset_on_disk_and_absent(tmp_path: Path) -> None:
    _write_fake_mnist(tmp_path / "ds")
    ckpt10 = tmp_path / "k10.pth"
    torch.save(timm_model(num_classes=10).state_dict(), ckpt10)
    s = extract("test_resnet", ckpt10, tmp_path / "ds", tmp_path / "mnist.h5", dataset="mnist", split="test",
                **FAST)
    assert s.n_samples == 12
    with FeatureCache(tmp_path / "mnist.h5") as cache:
        assert cache.info.class_names[0].startswith("0") and cache.info.attrs["split"] == "test"
    assert list(_read(tmp_path / "mnist.h5")["labels"]) == [i % 10 for i in range(12)]
    with pytest.raises(InputError, match="cifar-10-batches-py.*never downloads"):
        extract("test_resnet", ckpt10, tmp_path / "ds", tmp_path / "c.h5", dataset="cifar10", **FAST)
    assert not (tmp_path / "c.h5").exists()


def _cli(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(app, ["extract", *args])
    return result.exit_code, result.stdout, result.stderr


def _assert_usage_error(code: int, out: str, err: str, pattern: str) -> None:
    """Exit 2, nothing on stdout, and one error line, the last one (what was loaded may be said before it)."""
    assert code == 2, err
    assert out == ""
    assert pattern in last_error_line(err), err


def test_cli_bad_inputs_exit_2_with_one_line(images: Path, ckpt: Path, tmp_path: Path) -> None:
    base = ["--img-size", "32", "-j", "0", "--no-progress"]
    out = str(tmp_path / "o.h5")
    code, o, e = _cli("-m", "test_resnet", "-c", str(tmp_path / "nope.pth"), "-d", str(images), "-o", out, *base)
    _assert_usage_error(code, o, e, "no such checkpoint")
    empty = tmp_path / "empty" / "cls"
    empty.mkdir(parents=True)
    code, o, e = _cli("-m", "test_resnet", "-c", str(ckpt), "-d", str(empty.parent), "-o", out, *base)
    _assert_usage_error(code, o, e, "no images")
    bad = tmp_path / "bad"
    make_image_folder(bad, per_class=2)
    png = (bad / "a_dog" / "00.png").read_bytes()
    (bad / "a_dog" / "00.png").write_bytes(png[: len(png) // 2])
    code, o, e = _cli("-m", "test_resnet", "-c", str(ckpt), "-d", str(bad), "-o", out, *base)
    _assert_usage_error(code, o, e, "00.png")
    assert not Path(out).exists()
    (bad / "a_dog" / "00.png").write_bytes(png)  # fixed; now a bad image after the first batch: the partial file stays
    (bad / "c_eel" / "01.png").write_bytes(b"\x89PNG garbage")
    code, o, e = _cli("-m", "test_resnet", "-c", str(ckpt), "-d", str(bad), "-o", out, "-b", "2", *base)
    _assert_usage_error(code, o, e, "c_eel/01.png")
    assert "--resume" in e
    with pytest.raises(InputError, match="incomplete"):
        FeatureCache(out)
    Path(out).unlink()
    two = tmp_path / "two.pth"
    torch.save(timm_model(num_classes=2).state_dict(), two)
    code, o, e = _cli("-m", "test_resnet", "-c", str(two), "-d", str(images), "-o", out, *base)
    _assert_usage_error(code, o, e, "3 classes but the model's head has 2 outputs")
    sq = tmp_path / "sq.pth"
    torch.save(torchvision_model("squeezenet1_1").state_dict(), sq)
    code, o, e = _cli("-m", "torchvision:squeezenet1_1", "-c", str(sq), "-d", str(images), "-o", out, *base)
    _assert_usage_error(code, o, e, "no nn.Linear")
    code, o, e = _cli("-m", "test_resnet", "-c", str(ckpt), "-d", str(images), "-o", out, "--limit", "4", *base)
    assert code == 0, e
    code, o, e = _cli("-m", "test_resnet", "-c", str(ckpt), "-d", str(images), "-o", out, "--limit", "4", *base)
    _assert_usage_error(code, o, e, "--overwrite")
    code, o, e = _cli("-m", "test_resnet", "-c", str(ckpt), "-d", str(images), "-o", out + "2", "--mean", "x", *base)
    _assert_usage_error(code, o, e, "--mean")


def test_help_is_fast_and_imports_no_torch() -> None:
    code = "import sys, ncaudit.cli; assert 'torch' not in sys.modules and 'timm' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])
    result = CliRunner().invoke(app, ["extract", "--help"])
    assert result.exit_code == 0 and "float16" in result.stdout


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_bf16_matches_cpu_reference(images: Path, ckpt: Path, reference: Path, tmp_path: Path) -> None:
    out = tmp_path / "cuda.h5"
    s = extract("test_resnet", ckpt, images, out, device="cuda", precision="bf16", precision_check=16,
                **dict(FAST, workers=2))
    assert s.device == "cuda" and s.n_reference == 16
    got, want = _read(out), _read(reference)
    np.testing.assert_array_equal(got["labels"], want["labels"])
    np.testing.assert_allclose(got["features"], want["features"], rtol=0.05, atol=0.05)
    with FeatureCache(out) as cache:
        _, _, ref = cache.reference_fp32()
    np.testing.assert_allclose(ref, want["features"][:16], rtol=1e-4, atol=1e-4)


def test_extract_takes_its_arguments_by_keyword(images: Path, ckpt: Path, reference: Path, tmp_path: Path) -> None:
    """The writer-lock wrapper passes every argument through, by name too (``weights=``, ``data=``, ``out=``)."""
    out = tmp_path / "kw.h5"
    s = extract("test_resnet", weights=ckpt, data=images, out=out, limit=4, **FAST)
    assert s.out == out and s.n_samples == 4
    np.testing.assert_allclose(_read(out)["features"], _read(reference)["features"][_limited(reference, 4)],
                               rtol=1e-4, atol=1e-6)
    with pytest.raises(InputError, match="is a directory"):
        extract(model_name="test_resnet", weights=ckpt, data=images, out=tmp_path, **FAST)


def test_refused_sharded_resume_leaves_the_single_file_untouched(images: Path, ckpt: Path, reference: Path,
                                                                 tmp_path: Path) -> None:
    """With shards beside it, ``--resume`` turns a single-file ``--out`` into the shard of its rows only once the
    checks pass: a refused resume (other options, other row count) leaves ``--out`` where and as it was."""
    from ncaudit.cache._shards import shard_path

    out = tmp_path / "out.h5"
    extract("test_resnet", ckpt, images, out, limit=8, **FAST)  # one process, rows 0-8, fp32
    with store.CacheWriter(shard_path(out, 8, 16), n_samples=8, n_features=96, num_classes=3, weight=None):
        pass  # a shard with nothing written: the run is sharded
    before = out.read_bytes()
    with pytest.raises(InputError, match=r"out\.h5 was written with another precision"):
        extract("test_resnet", ckpt, images, out, limit=16, resume=True, **dict(FAST, precision="bf16"))
    with pytest.raises(InputError, match="reaches row 8 but this run has 4 rows"):
        extract("test_resnet", ckpt, images, out, limit=4, resume=True, **FAST)
    assert out.read_bytes() == before and not shard_path(out, 0, 8).exists()
    s = extract("test_resnet", ckpt, images, out, limit=16, resume=True, **FAST)  # the same job: rows 0-8 are kept
    assert s.resumed_from == 8
    with FeatureCache(out) as cache:
        assert cache.info.complete and cache.info.n_samples == 16
    np.testing.assert_allclose(_read(out)["features"], _read(reference)["features"][_limited(reference, 16)],
                               rtol=1e-4, atol=1e-6)


def test_overwrite_removes_a_damaged_shard(images: Path, ckpt: Path, tmp_path: Path) -> None:
    """``--overwrite`` removes the shard files beside ``--out`` by name, unreadable ones too."""
    from ncaudit.cache._shards import shard_path

    out = tmp_path / "out.h5"
    shard_path(out, 0, 8).write_bytes(b"not an HDF5 file")
    with pytest.raises(InputError, match="unreadable shard file"):
        extract("test_resnet", ckpt, images, out, limit=4, resume=True, **FAST)
    s = extract("test_resnet", ckpt, images, out, limit=4, overwrite=True, **FAST)
    assert s.n_samples == 4 and not shard_path(out, 0, 8).exists()
    shard_path(out, 4, 8).mkdir()  # named as a shard but not a file: one clear line, not a traceback
    with pytest.raises(InputError, match="cannot remove this shard"):
        extract("test_resnet", ckpt, images, out, limit=4, overwrite=True, **FAST)
