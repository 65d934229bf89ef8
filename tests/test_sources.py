"""Every dataset format ``extract`` reads gives the ImageFolder's features and labels: tar files, WebDataset shards,
Hugging Face datasets (built here from the bundled digits), torchvision datasets; ImageNet-style synset folders map
by synset; splits are recorded from the dataset."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from extract_fixtures import make_image_folder, make_synset_folder, timm_model

from ncaudit.cache import FeatureCache
from ncaudit.data import dataset_family, map_labels, open_samples, stratified_order
from ncaudit.errors import InputError
from ncaudit.extract import extract
from ncaudit.models import imagenet_classes

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
CHECKPOINT = FIXTURES / "checkpoints" / "test_resnet_digits_e200.safetensors"
PER_CLASS = 6  # a few real digits of each class keep every extraction well under a second
RUN = {"workers": 0, "progress": False, "batch_size": 32, "precision": "fp32", "device": "cpu"}


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An ImageFolder of the first images of each class of the bundled test digits."""
    root = tmp_path_factory.mktemp("digits") / "test"
    for cls in sorted((FIXTURES / "digits" / "test").iterdir()):
        (root / cls.name).mkdir(parents=True)
        for png in sorted(cls.glob("*.png"))[:PER_CLASS]:
            (root / cls.name / png.name).write_bytes(png.read_bytes())
    return root


def _samples(root: Path) -> list[tuple[int, str, bytes]]:
    return [(int(p.parent.name), p.name, p.read_bytes()) for p in sorted(root.glob("*/*.png"))]


def _read(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r", locking=False) as f:
        return {k: f[k][()] for k in ("features", "labels", "logits")}


@pytest.fixture(scope="module")
def reference(digits: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, np.ndarray]:
    out = tmp_path_factory.mktemp("ref") / "folder.h5"
    extract("test_resnet", CHECKPOINT, digits, out, **RUN)
    got = _read(out)
    assert list(got["labels"]) == [c for c in range(10) for _ in range(PER_CLASS)]
    return got


def _same_as_reference(reference: dict[str, np.ndarray], out: Path) -> dict[str, object]:
    got = _read(out)
    np.testing.assert_array_equal(got["labels"], reference["labels"])
    np.testing.assert_array_equal(got["features"], reference["features"])
    np.testing.assert_array_equal(got["logits"], reference["logits"])
    with FeatureCache(out) as cache:
        return dict(cache.info.attrs)


def test_tar_file_and_directory_of_tars(digits: Path, reference: dict[str, np.ndarray], tmp_path: Path) -> None:
    with tarfile.open(tmp_path / "digits.tar", "w") as tf:  # <class>/<image>, stored out of order
        for label, name, data in reversed(_samples(digits)):
            info = tarfile.TarInfo(f"test/{label}/{name}")
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    extract("test_resnet", CHECKPOINT, tmp_path / "digits.tar", tmp_path / "tar.h5", **RUN)
    attrs = _same_as_reference(reference, tmp_path / "tar.h5")
    assert attrs["dataset"] == "tar" and "ReaderImageInTar" in attrs["reader"]
    per_class = tmp_path / "per_class"
    per_class.mkdir()
    for label in range(10):  # one tar per class: the tar's name is the class
        with tarfile.open(per_class / f"{label}.tar", "w") as tf:
            for _, name, data in (s for s in _samples(digits) if s[0] == label):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    extract("test_resnet", CHECKPOINT, per_class, tmp_path / "tars.h5", **RUN)
    _same_as_reference(reference, tmp_path / "tars.h5")


def _write_shards(digits: Path, root: Path, n_shards: int = 3) -> list[str]:
    import webdataset as wds
    samples = _samples(digits)
    names = []
    for shard, part in enumerate(np.array_split(np.arange(len(samples)), n_shards)):  # consecutive runs of samples
        name = f"digits-test-{shard:04d}.tar"
        with wds.TarWriter(str(root / name)) as sink:
            for label, png, data in (samples[i] for i in part):
                sink.write({"__key__": f"{label}_{Path(png).stem}", "png": data, "cls": label})
        names.append(name)
    return names


def test_webdataset_shards(digits: Path, reference: dict[str, np.ndarray], tmp_path: Path) -> None:
    pytest.importorskip("webdataset")
    names = _write_shards(digits, tmp_path)
    lengths = []
    for name in names:
        with tarfile.open(tmp_path / name) as tf:
            lengths.append(sum(1 for m in tf.getnames() if m.endswith(".png")))
    (tmp_path / "_info.json").write_text(json.dumps({"name": "digits", "splits": {"test": {
        "name": "test", "num_samples": sum(lengths), "filenames": names, "shard_lengths": lengths}}}))
    extract("test_resnet", CHECKPOINT, tmp_path, tmp_path / "wds.h5", dataset="wds/digits", split="test", **RUN)
    attrs = _same_as_reference(reference, tmp_path / "wds.h5")
    assert attrs["dataset"] == "wds/digits" and attrs["split"] == "test" and "ReaderWds" in attrs["reader"]
    (tmp_path / "_info.json").unlink()  # a brace pattern instead of the info file
    extract("test_resnet", CHECKPOINT, tmp_path, tmp_path / "wds2.h5", dataset="wds/digits",
            split="digits-test-{0000..0002}.tar", **RUN)
    _same_as_reference(reference, tmp_path / "wds2.h5")
    with pytest.raises(InputError, match="no split 'validation': there is no _info.json .*shard pattern") as err:
        open_samples(tmp_path, dataset="wds/digits", split="validation")
    assert "dict_keys" not in str(err.value)
    (tmp_path / "_info.json").write_text(json.dumps({"name": "digits", "splits": {"test": {
        "name": "test", "num_samples": sum(lengths), "filenames": names, "shard_lengths": lengths}}}))
    with pytest.raises(InputError, match="no split 'val': the info file lists test;"):
        open_samples(tmp_path, dataset="wds/digits", split="val")


def _hf_dataset(digits: Path):  # type: ignore[no-untyped-def]
    datasets = pytest.importorskip("datasets")
    samples = _samples(digits)
    features = datasets.Features({"image": datasets.Image(),
                                  "label": datasets.ClassLabel(names=[str(c) for c in range(10)])})
    return datasets.Dataset.from_dict({"image": [{"bytes": data, "path": name} for _, name, data in samples],
                                       "label": [label for label, _, _ in samples]}, features=features)


def test_hugging_face_datasets(digits: Path, reference: dict[str, np.ndarray], tmp_path: Path) -> None:
    ds = _hf_dataset(digits)
    repo = tmp_path / "digits_hf"  # laid out as a dataset repository: data/<split>-*.parquet
    (repo / "data").mkdir(parents=True)
    ds.to_parquet(str(repo / "data" / "test-00000-of-00001.parquet"))
    extract("test_resnet", CHECKPOINT, tmp_path / "cache", tmp_path / "hf.h5", dataset=f"hfds/{repo}", **RUN)
    attrs = _same_as_reference(reference, tmp_path / "hf.h5")
    assert attrs["split"] == "test" and "ReaderHfds" in attrs["reader"]  # validation absent: test is the default
    with FeatureCache(tmp_path / "hf.h5") as cache:
        assert cache.info.class_names == [str(c) for c in range(10)]
    ds.save_to_disk(str(tmp_path / "saved"))  # what save_to_disk writes, which load_dataset does not read
    extract("test_resnet", CHECKPOINT, None, tmp_path / "hf2.h5", dataset=f"hfds/{tmp_path / 'saved'}", **RUN)
    _same_as_reference(reference, tmp_path / "hf2.h5")
    with pytest.raises(InputError, match="hfds/.*cannot load"):
        open_samples(None, dataset="hfds/nobody/no_such_dataset")


def test_imagenet_subset_maps_by_synset(tmp_path: Path) -> None:
    from timm.data import ImageNetInfo
    info = ImageNetInfo()
    synsets = [info.index_to_label_name(i) for i in (1, 281, 999)]  # goldfish, tabby, toilet tissue
    data = make_synset_folder(tmp_path / "val", synsets)
    torch.save(timm_model(num_classes=1000).state_dict(), tmp_path / "in1k.pth")
    extract("test_resnet", tmp_path / "in1k.pth", data, tmp_path / "sub.h5", **RUN)
    got = _read(tmp_path / "sub.h5")
    assert sorted(set(got["labels"].tolist())) == [1, 281, 999]  # sorted folder order would say 0, 1, 2
    with FeatureCache(tmp_path / "sub.h5") as cache:
        names, attrs = cache.info.class_names, cache.info.attrs
    assert len(names) == 1000 and names[281].startswith(f"{synsets[1]} tabby")
    assert "by synset" in attrs["label_mapping"] and attrs["split"] == "val"
    assert got["logits"].shape == (len(got["labels"]), 1000)  # every output of the model, not the 3 classes
    # torchvision's ImageNet layout (meta.bin + val/<synset>/...) through torch/imagenet maps the same way
    torch.save(({s: (info.label_name_to_description(s),) for s in info.label_names()}, []), tmp_path / "meta.bin")
    src = open_samples(tmp_path, dataset="torch/imagenet", split="validation")
    assert src.split == "val" and src.dataset_classes == synsets and "ImageNet" in src.reader
    map_labels(src, model_classes=("imagenet-1k", *imagenet_classes("imagenet-1k")))
    np.testing.assert_array_equal(src.labels, got["labels"])
    (tmp_path / "val" / synsets[0]).rename(tmp_path / "val" / "n00000000")  # not an ImageNet-1k class
    with pytest.raises(InputError, match="n00000000 is not one of the model's 1000 imagenet-1k classes"):
        extract("test_resnet", tmp_path / "in1k.pth", data, tmp_path / "bad.h5", **RUN)


def test_split_is_recorded_from_the_dataset(digits: Path, tmp_path: Path) -> None:
    src = open_samples(digits)  # .../test, no --split
    assert src.split == "test" and src.kind == "folder"
    assert open_samples(digits.parent, split="test").root == digits
    (tmp_path / "validation" / "a").mkdir(parents=True)  # --split val finds validation/, as timm does
    (tmp_path / "validation" / "a" / "x.png").write_bytes(_samples(digits)[0][2])
    assert open_samples(tmp_path, split="val").root.name == "validation"


def test_dataset_names_and_text_class_map(digits: Path, tmp_path: Path) -> None:
    assert dataset_family("cifar10") == ("torch", "cifar10") and dataset_family("torch/ImageNet") == (
        "torch", "imagenet")
    assert dataset_family("hfds/ILSVRC/imagenet-1k") == ("hfds", "ILSVRC/imagenet-1k")
    assert dataset_family("") == ("folder", "")
    with pytest.raises(InputError, match="streaming"):
        dataset_family("hfids/x")
    with pytest.raises(InputError, match="torch/NAME"):
        dataset_family("parquet")
    (tmp_path / "map.txt").write_text("\n".join(str(c) for c in reversed(range(10))) + "\n")
    extract("test_resnet", CHECKPOINT, digits, tmp_path / "m.h5", class_map=tmp_path / "map.txt", limit=PER_CLASS,
            **RUN)
    dataset_labels = open_samples(digits).labels
    expected = 9 - dataset_labels[stratified_order(dataset_labels)[:PER_CLASS]]  # class "0" is output 9 in this map
    np.testing.assert_array_equal(_read(tmp_path / "m.h5")["labels"], expected)


def test_natural_and_plain_order_differ_is_said(tmp_path: Path) -> None:
    make_image_folder(tmp_path / "d", per_class=1)
    for old, new in zip(sorted(p.name for p in (tmp_path / "d").iterdir()), ("class2", "class10", "class3")):
        (tmp_path / "d" / old).rename(tmp_path / "d" / new)
    src = open_samples(tmp_path / "d")
    assert src.dataset_classes == ["class10", "class2", "class3"] and "natural order" in src.notes[0]


def test_a_root_of_split_folders_needs_a_split_that_it_has(digits: Path, tmp_path: Path) -> None:
    """train/ and test/ are splits, not two classes: no --split, or one the root lacks, is one line naming them."""
    import shutil

    from typer.testing import CliRunner

    from ncaudit.cli import app

    root = tmp_path / "ds"
    for split in ("train", "test"):
        shutil.copytree(digits, root / split)
    with pytest.raises(InputError, match=r"holds the split folders test, train, not class folders; pass --split test "
                                         r"or --split train"):
        open_samples(root)
    with pytest.raises(InputError, match=r"--split val: .* has no such split folder \(it has test, train\)"):
        open_samples(root, split="val")
    with pytest.raises(InputError, match="--split test: .* has no split folder 'test'"):
        open_samples(root / "train", split="test")
    assert open_samples(root, split="train").split == "train" and len(open_samples(root, split="test")) == 60
    assert open_samples(root / "train", split="training").root == root / "train"  # the folder is that split
    res = CliRunner().invoke(app, ["extract", "-m", "test_resnet", "--random-init", "-d", str(root), "-o",
                                   str(tmp_path / "x.h5")])
    assert res.exit_code == 2 and "pass --split test or --split train" in res.stderr
    assert "Traceback" not in res.stderr and not (tmp_path / "x.h5").exists()
