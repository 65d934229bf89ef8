"""Reader: WebDataset shards (``wds/NAME``), indexed once and read at member offsets."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import tarfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ncaudit.data._source import DataSource, _Samples, _TarMembers
from ncaudit.errors import InputError


@contextlib.contextmanager
def _quiet(logger: str) -> Iterator[None]:
    """Silence a library logger's warnings (timm's WebDataset reader warns when there is no info file)."""
    log = logging.getLogger(logger)
    level = log.level
    log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _wds_shards(root: Path, name: str, split: str | None) -> tuple[list[str], int, str]:
    """``(shard files, samples announced by the info file or 0, split)`` from timm's ``ReaderWds``: ``split`` is a
    split of ``root/_info.json`` (``info.json``) or a brace pattern such as ``digits-test-{0000..0003}.tar``."""
    try:
        import webdataset  # noqa: F401
        from timm.data.readers.reader_wds import ReaderWds
    except ImportError:
        raise InputError("--dataset wds/...: needs the webdataset package: pip install 'ncaudit[wds]'") from None
    errors: list[str] = []
    for candidate in ([split] if split else ["validation", "val", "test"]):
        try:
            with _quiet("timm.data.readers.reader_wds"):
                reader = ReaderWds(root=str(root), name=name, split=candidate)
        except (RuntimeError, KeyError, ValueError) as exc:
            errors.append(_reader_error(exc, candidate))
            continue
        files = [str(root / f) for f in reader.split_info.filenames]
        missing = [f for f in files if not os.path.isfile(f)]
        if missing:
            raise InputError(f"--dataset wds/{name}: shard {missing[0]} not found ({len(missing)} of {len(files)} "
                             "missing); ncaudit reads local shards only")
        return files, int(reader.split_info.num_samples or 0), reader.split_info.name or str(candidate)
    raise InputError(f"--dataset wds/{name}: {errors[-1] if errors else 'no split'}; give --split as a split of "
                     f"{root}/_info.json or a shard pattern such as 'NAME-{{0000..0009}}.tar'")


def _reader_error(exc: BaseException, split: str) -> str:
    """timm's error for a split it cannot find, in words (its message shows a Python ``dict_keys([...])``)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    listed = re.search(r"dict_keys\(\[(.*)\]\)", text)
    if listed is None:
        return text
    names = [n.strip().strip("'\"") for n in listed.group(1).split(",") if n.strip()]
    if not names:
        return f"no split {split!r}: there is no _info.json (or info.json) listing splits"
    return f"no split {split!r}: the info file lists {', '.join(names)}"


#: Image extensions of WebDataset samples, in timm's order of preference (its ``input_key``), plus jpeg.
_WDS_IMAGES = ("jpg", "png", "webp", "jpeg")


def _index_shard(path: str) -> Iterator[tuple[str, str, int, int, int]]:
    """``(key, member, offset, size, label)`` per sample of a WebDataset shard, in shard order: members grouped by
    key as webdataset does, the image by extension preference, the label from the ``.cls`` member."""
    from webdataset.tariterators import base_plus_ext

    def emit(key: str, group: dict[str, tarfile.TarInfo], tf: tarfile.TarFile) -> tuple[str, str, int, int, int]:
        image = next((group[e] for e in _WDS_IMAGES if e in group), None)
        if image is None or "cls" not in group:
            raise InputError(f"{path}: sample {key!r} has {', '.join(sorted(group))}; a WebDataset sample needs an "
                             "image (.jpg/.png/.webp) and a class index (.cls)")
        fh = tf.extractfile(group["cls"])
        try:
            label = int((fh.read() if fh else b"").decode().strip())
        except ValueError:
            raise InputError(f"{path}: sample {key!r}: its .cls member is not an integer class index") from None
        return key, image.name, image.offset_data, image.size, label

    try:
        with tarfile.open(path, "r:") as tf:
            key, group = None, {}
            for ti in tf:
                parts = base_plus_ext(ti.name) if ti.isfile() else None
                if not parts or parts[0] is None:
                    continue
                if parts[0] != key and group:
                    yield emit(key, group, tf)  # type: ignore[arg-type]
                    group = {}
                key = parts[0]
                group[parts[1].lower()] = ti
            if group:
                yield emit(key, group, tf)  # type: ignore[arg-type]
    except tarfile.TarError as exc:
        raise InputError(f"{path}: not a readable tar shard ({exc}); fix or replace the file") from None


def _open_wds(name: str, root: Path, split: str | None) -> DataSource:
    files, announced, split = _wds_shards(root, name, split)
    rows = [(i, *row) for i, f in enumerate(files) for row in _index_shard(f)]
    if not rows:
        raise InputError(f"--dataset wds/{name}: the shards of split {split} hold no samples")
    raw = np.asarray([r[5] for r in rows], dtype=np.int64)
    if int(raw.min()) < 0:
        raise InputError(f"--dataset wds/{name}: some .cls labels are negative (unlabelled samples); pick a labelled "
                         "split")
    images = _TarMembers(files, np.asarray([r[0] for r in rows]), np.asarray([r[3] for r in rows], dtype=np.int64),
                         np.asarray([r[4] for r in rows], dtype=np.int64), [r[2] for r in rows])
    digest = hashlib.sha256("".join(f"{os.path.basename(files[r[0]])}:{r[1]}\t{r[5]}\n" for r in rows).encode())
    notes = [f"the info file announces {announced} samples but the shards hold {len(rows)}"] \
        if announced and announced != len(rows) else []
    return DataSource(dataset=_Samples(images, raw, None), kind=f"wds/{name}", split=split, root=root, labels=raw,
                      dataset_classes=[str(i) for i in range(int(raw.max()) + 1)], class_names=None,
                      fingerprint=digest.hexdigest(), reader="timm ReaderWds split info + shard index", notes=notes)
