"""Hostile archives: tars and WebDataset shards cut short, holding links or the same name twice, named in bytes that
are not UTF-8, labelled with absurd class indices, or pipes where tars should be. Each archive is built with GNU tar
(when it is installed) and with Python's tarfile; every case reads exactly what an extracted folder holds, or is one
line and exit 2.
"""

from __future__ import annotations

import io
import os
import shutil
import subprocess
import tarfile
import threading
from pathlib import Path

import pytest
from extract_fixtures import last_error_line, make_image_folder
from typer.testing import CliRunner

from ncaudit.cli import app
from ncaudit.data import open_samples
from ncaudit.data._reader_folder import _image_folder
from ncaudit.errors import InputError

runner = CliRunner()
GNU_TAR = shutil.which("tar")
needs_tar = pytest.mark.skipif(GNU_TAR is None, reason="GNU tar is not installed")


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("arch") / "data", per_class=3)


def gnu_tar(archive: Path, root: Path, *extra: str) -> Path:
    subprocess.run([GNU_TAR, "-cf", str(archive), *extra, "-C", str(root), "."], check=True, capture_output=True)
    return archive


def py_tar(archive: Path, root: Path) -> Path:
    with tarfile.open(archive, "w") as tf:
        for path in sorted(root.rglob("*")):
            tf.add(path, arcname=str(path.relative_to(root)), recursive=False)
    return archive


def refused(data: Path, *needles: str, dataset: str = "folder", split: str | None = None) -> str:
    result: list[BaseException | None] = []

    def run() -> None:
        try:
            open_samples(data, dataset=dataset, split=split)
            result.append(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            result.append(exc)

    worker = threading.Thread(target=run, daemon=True)  # a blocking open must not hang the suite
    worker.start()
    worker.join(timeout=30)
    assert result, f"{data}: still reading after 30 s"
    exc = result[0]
    assert isinstance(exc, InputError), exc
    for needle in needles:
        assert needle in str(exc), str(exc)
    return str(exc)


def _header_offsets(archive: Path) -> list[tuple[str, int, int]]:
    """``(name, header offset, data offset)`` of the regular files of ``archive``."""
    with tarfile.open(archive) as tf:
        return [(ti.name, ti.offset, ti.offset_data) for ti in tf if ti.isreg()]


def _cut(archive: Path, size: int) -> Path:
    with open(archive, "r+b") as fh:
        fh.truncate(size)
    return archive


# ---------------------------------------------------------------------------------------------------------------------
# 3. Archives read exactly or refuse
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("builder", [pytest.param("gnu", marks=needs_tar), "python"])
def test_a_whole_archive_reads_as_the_folder(folder: Path, tmp_path: Path, builder: str) -> None:
    archive = (gnu_tar if builder == "gnu" else py_tar)(tmp_path / "a.tar", folder)
    src = open_samples(archive)
    assert len(src) == len(open_samples(folder)) == 3 * 3 + 2


@pytest.mark.parametrize("builder", [pytest.param("gnu", marks=needs_tar), "python"])
@pytest.mark.parametrize("where", ["header", "data", "boundary"])
def test_a_truncated_archive_names_the_last_member(folder: Path, tmp_path: Path, builder: str, where: str) -> None:
    archive = (gnu_tar if builder == "gnu" else py_tar)(tmp_path / "a.tar", folder)
    heads = _header_offsets(archive)
    name, offset, data = heads[-4]  # a member well inside the archive
    previous = heads[-5][0]
    cut = {"header": offset + 100, "data": data + 30, "boundary": offset}[where]
    message = refused(_cut(archive, cut), str(archive))
    assert repr(name if where == "data" else previous) in message, message


@needs_tar
def test_gnu_tar_of_linked_images_reads_them_as_the_folder_does(folder: Path, tmp_path: Path) -> None:
    root = tmp_path / "linked"
    shutil.copytree(folder, root)
    first = sorted((root / "a_dog").glob("*.png"))[0]
    os.link(first, root / "a_dog" / "hard.png")
    os.symlink(first.name, root / "a_dog" / "soft.png")
    os.symlink(f"../a_dog/{first.name}", root / "c_eel" / "across.png")
    _, paths, _ = _image_folder(root)
    archive = gnu_tar(tmp_path / "linked.tar", root)
    src = open_samples(archive)
    assert len(src) == len(paths) == 3 * 3 + 2 + 3  # each link is an image, as in the folder
    want = first.read_bytes()
    names = src.dataset.images.names
    for link in ("./a_dog/hard.png", "./a_dog/soft.png", "./c_eel/across.png"):
        i = names.index(link)
        with open(archive, "rb") as fh:
            fh.seek(int(src.dataset.images.offsets[i]))
            assert fh.read(int(src.dataset.images.sizes[i])) == want


@pytest.mark.parametrize("link, needle", [("../../elsewhere.png", "points out of the archive"),
                                          ("/etc/hostname", "points out of the archive"),
                                          ("../b_cat", "points to the directory"),
                                          ("missing.png", "does not hold as a file")])
def test_links_the_folder_scan_would_not_read_the_same_are_refused(folder: Path, tmp_path: Path, link: str,
                                                                    needle: str) -> None:
    archive = py_tar(tmp_path / "a.tar", folder)
    with tarfile.open(archive, "a") as tf:
        info = tarfile.TarInfo("a_dog/link.png")
        info.type, info.linkname = tarfile.SYMTYPE, link
        tf.addfile(info)
    refused(archive, str(archive), "'a_dog/link.png'", needle)


@pytest.mark.parametrize("builder", [pytest.param("gnu", marks=needs_tar), "python"])
def test_duplicate_member_names_are_refused(folder: Path, tmp_path: Path, builder: str) -> None:
    archive = tmp_path / "dup.tar"
    if builder == "gnu":
        gnu_tar(archive, folder)
        subprocess.run([GNU_TAR, "-rf", str(archive), "-C", str(folder), "./a_dog/00.png"], check=True)
    else:
        py_tar(archive, folder)
        with tarfile.open(archive, "a") as tf:
            tf.add(folder / "a_dog" / "00.png", arcname="a_dog/00.png")
    refused(archive, "two members are named", "a_dog/00.png")


def test_a_fifo_among_the_tars_is_refused_at_once(folder: Path, tmp_path: Path) -> None:
    tars = tmp_path / "tars"
    tars.mkdir()
    for name in ("a_dog", "b_cat"):
        py_tar(tars / f"{name}.tar", folder / name)
    os.mkfifo(tars / "c_eel.tar")
    refused(tars, "c_eel.tar", "is a FIFO")
    refused(tars / "c_eel.tar", "c_eel.tar", "is a FIFO")


@needs_tar
def test_non_utf8_class_name_in_a_tar_is_one_line(folder: Path, tmp_path: Path) -> None:
    root = tmp_path / "bytes"
    shutil.copytree(folder, root)
    os.rename(root / "a_dog", os.fsencode(root) + b"/caf\xe9")
    archive = gnu_tar(tmp_path / "latin1.tar", root)
    res = runner.invoke(app, ["extract", "-m", "test_resnet", "--random-init", "-d", str(archive), "-o",
                              str(tmp_path / "o.h5"), "--no-progress"])
    assert res.exit_code == 2, (res.stderr, res.exception)
    assert "not named in valid UTF-8" in last_error_line(res.stderr)


# ---------------------------------------------------------------------------------------------------------------------
# WebDataset shards: the same rules, and labels within reason
# ---------------------------------------------------------------------------------------------------------------------
def _shard(path: Path, samples: list[tuple[str, bytes, bytes]]) -> Path:
    with tarfile.open(path, "w") as tf:
        for key, image, cls in samples:
            for ext, data in (("png", image), ("cls", cls)):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))
    return path


@pytest.fixture(scope="module")
def png(folder: Path) -> bytes:
    return sorted((folder / "a_dog").glob("*.png"))[0].read_bytes()


def test_truncated_webdataset_shard_is_refused(png: bytes, tmp_path: Path) -> None:
    shard = _shard(tmp_path / "s-0000.tar", [(f"k{i:03d}", png, b"1") for i in range(6)])
    assert len(open_samples(tmp_path, dataset="wds/x", split="s-{0000..0000}.tar")) == 6
    name, offset, _ = _header_offsets(shard)[-3]
    _cut(shard, offset + 200)
    refused(tmp_path, str(shard), "'k004.png'", dataset="wds/x", split="s-{0000..0000}.tar")


@pytest.mark.parametrize("key, cls, needle", [
    ("k000", b"99999999999", "above the 999,999 class indices"),
    ("k000", b"1" * 200, "not an integer class index"),
    ("caf\udce9", b"1", "not named in valid UTF-8"),
])
def test_webdataset_labels_and_names_are_one_line(png: bytes, tmp_path: Path, key: str, cls: bytes,
                                                  needle: str) -> None:
    _shard(tmp_path / "s-0000.tar", [(key, png, cls), ("k001", png, b"0")])
    res = runner.invoke(app, ["extract", "-m", "test_resnet", "--random-init", "-d", str(tmp_path), "--dataset",
                              "wds/x", "--split", "s-{0000..0000}.tar", "-o", str(tmp_path / "o.h5"), "--no-progress"])
    assert res.exit_code == 2, (res.stderr, res.exception)
    assert needle in last_error_line(res.stderr)
    assert not (tmp_path / "o.h5").exists()


def test_duplicate_webdataset_member_is_refused(png: bytes, tmp_path: Path) -> None:
    _shard(tmp_path / "s-0000.tar", [("k000", png, b"1"), ("k001", png, b"0"), ("k000", png, b"2")])
    refused(tmp_path, "two members are named", "k000", dataset="wds/x", split="s-{0000..0000}.tar")


def test_a_fifo_named_as_an_image_is_refused(folder: Path, tmp_path: Path) -> None:
    from ncaudit.data import load_image

    root = tmp_path / "data"
    shutil.copytree(folder, root)
    os.mkfifo(root / "a_dog" / "zz.png")
    src = open_samples(root)  # the scan lists it by its name, as torchvision's ImageFolder would
    index = src.dataset.images.paths.index(str(root / "a_dog" / "zz.png"))
    with pytest.raises(InputError, match="zz.png: is a FIFO"):
        load_image(src.dataset.images.paths[index])
