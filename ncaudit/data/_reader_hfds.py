"""Reader: a Hugging Face dataset on disk or in its cache (``hfds/NAME``)."""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ncaudit.data._source import DataSource, _ReaderItems, _Samples
from ncaudit.errors import InputError


class _DiskHfds:
    """A Hugging Face dataset saved with ``save_to_disk`` (which ``load_dataset`` does not read), served like timm's
    ``ReaderHfds``: items are ``(binary file object, label)``, images left undecoded."""

    def __init__(self, path: Path, split: str | None) -> None:
        import datasets
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split is None or split not in ds:
                raise InputError(f"--dataset hfds/{path}: give --split, one of {', '.join(ds)}")
            ds = ds[split]
        self.image_key, self.label_key = _hf_columns(ds.features)
        self.dataset = ds.cast_column(self.image_key, datasets.Image(decode=False))
        self.split = str(ds.split) if ds.split is not None else split
        from timm.data.readers._hfds import get_class_labels
        self.class_to_idx = get_class_labels(ds.info, self.label_key)

    def __getitem__(self, index: int) -> tuple[BinaryIO, int]:
        item = self.dataset[index]
        image = item[self.image_key]
        fileobj = io.BytesIO(image["bytes"]) if image.get("bytes") else open(image["path"], "rb")  # noqa: SIM115
        return fileobj, item[self.label_key]

    def __len__(self) -> int:
        return len(self.dataset)


def _hf_columns(features: Any) -> tuple[str, str]:
    """The image and label columns: ``image`` / ``label`` (timm's defaults) when present, else the first Image and
    the first ClassLabel (or integer) column."""
    import datasets
    names = list(features or {})
    image = "image" if "image" in names else next((n for n in names if isinstance(features[n], datasets.Image)), "")
    label = "label" if "label" in names else next(
        (n for n in names if isinstance(features[n], datasets.ClassLabel)), "")
    if not image or not label:
        raise InputError(f"the Hugging Face dataset has columns {', '.join(names)}; ncaudit needs an Image column and "
                         "a ClassLabel (or integer) label column")
    return image, label


def _hfds_reader(name: str, root: Path | None, split: str | None) -> tuple[Any, str]:
    """timm's ``ReaderHfds`` over a dataset name or local directory (``datasets.load_dataset``, cached under
    ``root`` when given, else HF_DATASETS_CACHE), or the same over a ``save_to_disk`` directory."""
    try:
        import datasets
    except ImportError:
        raise InputError("--dataset hfds/...: needs the Hugging Face datasets package: pip install 'ncaudit[hf]'") \
            from None
    path = Path(name).expanduser()
    if (path / "state.json").is_file() or (path / "dataset_dict.json").is_file():
        return _DiskHfds(path, split), "datasets.load_from_disk"
    from timm.data.readers.reader_hfds import ReaderHfds
    cache = str(root) if root is not None else None
    candidates = [split] if split else ["validation", "test", "train"]
    errors: list[str] = []
    try:
        builder = datasets.load_dataset_builder(name, cache_dir=cache)
        image, label = _hf_columns(builder.info.features) if builder.info.features else ("image", "label")
        for candidate in candidates:
            try:
                return ReaderHfds(name=name, root=cache, split=candidate, input_key=image, target_key=label), \
                    f"timm ReaderHfds (split {candidate})"
            except (ValueError, KeyError) as exc:  # an unknown split (timm/datasets never raise InputError)
                errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except InputError:
        raise
    except (ValueError, KeyError) as exc:  # from the builder: the same for every split
        errors.append(str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
    except Exception as exc:  # noqa: BLE001 - datasets raises many kinds (not found, offline, network)
        raise _hfds_error(name, exc) from None
    raise InputError(f"--dataset hfds/{name}: no split {' / '.join(candidates)} ({errors[-1]}); give --split")


def _hfds_error(name: str, exc: BaseException) -> InputError:
    from datasets import config
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    offline = "HF_HUB_OFFLINE=1 (or HF_DATASETS_OFFLINE=1) is set, so nothing is downloaded; " \
        if config.HF_HUB_OFFLINE else ""
    return InputError(f"--dataset hfds/{name}: cannot load it ({text}); {offline}give a local directory, or a name "
                      f"cached under HF_DATASETS_CACHE ({config.HF_DATASETS_CACHE}) or --data")


def _open_hfds(name: str, root: Path | None, split: str | None) -> DataSource:
    reader, how = _hfds_reader(name, root, split)
    ds, key = reader.dataset, reader.label_key
    if key in ds.column_names:  # one column read by arrow, not row by row
        raw = np.asarray(ds.select_columns([key]).with_format("numpy")[key], dtype=np.int64)
    else:
        raw = np.asarray(list(reader.iter_targets()), dtype=np.int64)
    if raw.size and int(raw.min()) < 0:
        raise InputError(f"--dataset hfds/{name}: some labels are negative (unlabelled samples, e.g. a test split "
                         "without labels); pick a labelled split")
    by_index = sorted(reader.class_to_idx.items(), key=lambda kv: kv[1])
    classes = [str(n) for n, _ in by_index] or [str(i) for i in range(int(raw.max()) + 1 if raw.size else 0)]
    split = getattr(reader, "split", None) or split
    digest = hashlib.sha256(raw.tobytes())
    digest.update(f"{name}|{len(reader)}".encode())
    return DataSource(dataset=_Samples(_ReaderItems(reader, f"hfds/{name}"), raw, None), kind=f"hfds/{name}",
                      split=split, root=Path(name), labels=raw, dataset_classes=classes, class_names=None,
                      fingerprint=digest.hexdigest(), reader=how)
