"""Input validation: every check on user data lives here and raises :class:`~ncaudit.errors.InputError`.

Each message names the problem and the fix in one line; the CLI prints it and exits with code 2. Besides the checks
on features, labels and the classifier, this module holds the checks of a cache's root attributes (a malformed
attribute is refused, never guessed at) and of declared sizes against the memory the statistics will allocate.
torch is imported only by the checks on tensors, so that reading a cache's metadata does not need it.
"""

from __future__ import annotations

import math
import os
import stat
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ncaudit.errors import InputError

if TYPE_CHECKING:
    import torch

#: 8-byte numbers the statistics of one feature block hold per p^2 and per C p (accumulators, Sigma_W / Sigma_T,
#: the SVD factor [Sigma_W^1/2, M diag(pi)^1/2] and its factors, the second pass's class means and classifier).
STAT_WORDS_PER_P2 = 8
STAT_WORDS_PER_CP = 10
STAT_WORDS_PER_C = 16


def format_bytes(n: float) -> str:
    """``n`` bytes for a message: GiB from 1 GiB up, else MiB, else KiB or bytes (never "0.00 GiB")."""
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}" if unit in ("TiB", "GiB") else f"{n / size:.1f} {unit}"
    return f"{int(n)} bytes"


_KINDS = ((stat.S_ISFIFO, "a FIFO (named pipe)"), (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
          (stat.S_ISBLK, "a block device"), (stat.S_ISDIR, "a directory"))


def regular_file(path: str | os.PathLike[str], role: str) -> os.stat_result:
    """The ``os.stat`` of ``path`` (links followed) when it is a regular file; anything else is refused before it
    is opened.

    Opening a FIFO blocks until a writer appears (uninterruptibly, inside HDF5 or a Rust reader) and a device or a
    socket is no file to read; ``role`` says what the file was to be (``"the cache"``, ``"a shard"``, ...).

    Raises
    ------
    InputError
        The path is missing, or is a FIFO, a socket, a device or a directory.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        raise InputError(f"{path}: cannot open {role} ({exc.strerror or exc}); check the path") from None
    if stat.S_ISREG(st.st_mode):
        return st
    kind = next((name for test, name in _KINDS if test(st.st_mode)), "not a regular file")
    raise InputError(f"{path}: is {kind}, not a regular file; {role} must be a file on disk (refused before opening: "
                     "a pipe or a device would block or never end)")


#: The largest image side (pixels) a recorded preprocessing value may ask for: larger ones are not an eval transform
#: of an image classifier but a damaged or hostile file (an input of 100000 x 100000 pixels is 120 GB per image).
MAX_IMAGE_SIDE = 8192
#: Keys that record an image size (timm ``input_size`` / ``img_size`` / ``test_input_size``, torchvision reference
#: scripts' ``val_crop_size`` / ``val_resize_size``).
SIZE_KEYS = ("input_size", "img_size", "test_input_size", "val_crop_size", "val_resize_size")


def _number_list(value: Any) -> list[float] | None:
    """Numbers from a number, a list, or text (``[0.5, 0.5]``, ``(224, 224)``, ``0.5,0.5``); None if not numbers."""
    if isinstance(value, str):
        text = value.strip().strip("[]()")
        try:
            value = [float(v) for v in text.split(",") if v.strip()]
        except ValueError:
            return None
    if isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_)):
        value = [value]
    number = (int, float, np.integer, np.floating)
    if isinstance(value, (list, tuple)) and value and all(
            isinstance(v, number) and not isinstance(v, (bool, np.bool_)) for v in value):
        return [float(v) for v in value]
    return None


def check_preprocessing(raw: Any, where: str) -> None:
    """Every preprocessing value a file records (a checkpoint's metadata or training args, a hub ``config.json``)
    within range, before anything is built from it.

    Sizes (:data:`SIZE_KEYS`): N, [H, W] or [C, H, W], whole numbers of 1 to :data:`MAX_IMAGE_SIDE` pixels (and 1
    to 16 channels); ``mean``: finite, at most 1e4 in size; ``std``: finite, from 1e-6 to 1e4 (a zero std divides by
    zero); ``crop_pct``: in (0, 1]. Absent, None and empty values are not recorded values; text values
    (interpolation, crop mode) are checked where they are used.

    Raises
    ------
    InputError
        One line naming the file (``where``), the key and the value.
    """
    if not hasattr(raw, "get"):
        return

    def bad(key: str, value: Any, expected: str) -> InputError:
        shown = repr(value) if len(repr(value)) <= 60 else repr(value)[:57] + "..."
        return InputError(f"{where}: {key} is {shown}; expected {expected}. The file is damaged or not made for this "
                          "tool: fix the value, or use weights whose preprocessing is in range")

    for key in SIZE_KEYS:
        value = raw.get(key)
        if value is None or value == "" or value == []:
            continue
        nums = _number_list(value)
        if nums is None or not 1 <= len(nums) <= 3:
            raise bad(key, value, "an image size: N, [H, W] or [C, H, W]")
        sides, channels = (nums[1:], nums[0]) if len(nums) == 3 else (nums, 3.0)
        if any(not (math.isfinite(v) and v.is_integer() and 1 <= v <= MAX_IMAGE_SIDE) for v in sides):
            raise bad(key, value, f"whole numbers of pixels from 1 to {MAX_IMAGE_SIDE}")
        if not (channels.is_integer() and 1 <= channels <= 16):
            raise bad(key, value, "[C, H, W] with 1 to 16 channels")
    for key, low, high in (("mean", -1e4, 1e4), ("std", 1e-6, 1e4)):
        value = raw.get(key)
        if value is None or value == "" or value == []:
            continue
        nums = _number_list(value)
        if nums is None or not 1 <= len(nums) <= 16 or not all(math.isfinite(v) and low <= v <= high for v in nums):
            raise bad(key, value, f"1 to 16 finite numbers from {low:g} to {high:g}")
    value = raw.get("crop_pct")
    if value is not None and value != "":
        nums = _number_list(value)
        if nums is None or len(nums) != 1 or not (math.isfinite(nums[0]) and 0 < nums[0] <= 1):
            raise bad("crop_pct", value, "one number in (0, 1]")


def _describe(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value[:40]!r}"
    if isinstance(value, (list, tuple)):
        return f"an array of {len(value)} value(s)"
    if isinstance(value, bool):
        return f"the boolean {value}"
    return repr(value)


def attr_int(value: Any, name: str, where: str, *, minimum: int | None = None, maximum: int | None = None) -> int:
    """A root attribute that must be a whole number (an integer, or a float with no fraction) within bounds."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
        raise InputError(f"{where}: the {name} attribute is {_describe(value)}; store an integer")
    if isinstance(value, (float, np.floating)) and not (math.isfinite(value) and float(value).is_integer()):
        raise InputError(f"{where}: the {name} attribute is {value!r}, not a whole number; store an integer")
    number = int(value)
    if minimum is not None and number < minimum or maximum is not None and number > maximum:
        bounds = f"at least {minimum}" if maximum is None else f"between {minimum} and {maximum}"
        raise InputError(f"{where}: the {name} attribute is {number}; it must be {bounds}")
    return number


def attr_bool(value: Any, name: str, where: str) -> bool:
    """A root attribute that must be a boolean (HDF5 bool, or the integers 0 and 1)."""
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and int(value) in (0, 1):
        return bool(value)
    raise InputError(f"{where}: the {name} attribute is {_describe(value)}; store a boolean (true or false)")


def check_schema(value: Any, version: int, where: str) -> None:
    """``ncaudit_schema`` must be the integer ``version``."""
    if isinstance(value, str):
        raise InputError(f"{where}: the ncaudit_schema attribute is {_describe(value)}, not a number; store the "
                         f"integer {version}")
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or int(value) != version:
        raise InputError(f"{where}: ncaudit_schema is {value!r}, this version reads schema {version}; re-extract the "
                         "features or upgrade ncaudit")


def available_memory() -> int:
    """Bytes of memory available to a new allocation (Linux ``MemAvailable``; else the physical memory)."""
    try:
        with open("/proc/meminfo", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return int(os.sysconf("SC_PHYS_PAGES")) * int(os.sysconf("SC_PAGE_SIZE"))
    except (ValueError, OSError, AttributeError):
        return 1 << 62


def statistics_bytes(n_features: int, num_classes: int) -> int:
    """Bytes the statistics of one block of ``n_features`` features over ``num_classes`` classes allocate (float64)."""
    p, c = int(n_features), int(num_classes)
    return 8 * (STAT_WORDS_PER_P2 * p * p + STAT_WORDS_PER_CP * c * p + STAT_WORDS_PER_C * c)


def check_memory(widths: Sequence[int], num_classes: int, where: str) -> None:
    """Refuse, before anything is allocated, statistics over blocks of ``widths`` features that cannot fit in memory."""
    need = sum(statistics_bytes(p, num_classes) for p in widths)
    have = available_memory()
    if need > have:
        shown = ", ".join(str(p) for p in widths[:4]) + (", ..." if len(widths) > 4 else "")
        raise InputError(f"{where}: p = {shown} features and C = {num_classes} classes need about "
                         f"{format_bytes(need)} of statistics (O(p^2 + C p)) but {format_bytes(have)} of memory is "
                         "available; check the declared shapes and num_classes, or reduce the features (fewer "
                         "layers, a projection) first")


def is_tensor(x: Any) -> bool:
    """Whether ``x`` is a torch tensor (without importing torch: no tensor exists before it is imported)."""
    torch = sys.modules.get("torch")
    return torch is not None and isinstance(x, torch.Tensor)


def check_labels(labels: np.ndarray | torch.Tensor, num_classes: int, start: int, where: str) -> None:
    """Labels must lie in [0, C)."""
    values = labels.detach().cpu().numpy() if is_tensor(labels) else np.asarray(labels)
    if values.size == 0:
        return
    lo, hi = int(values.min()), int(values.max())
    if lo < 0 or hi >= num_classes:
        bad = int(np.flatnonzero((values < 0) | (values >= num_classes))[0])
        value = int(values[bad])
        raise InputError(f"{where}: label {value} at row {start + bad} is outside [0, {num_classes}); labels must be "
                         f"class indices below num_classes={num_classes} (fix the labels or the num_classes attribute)")


#: Largest |h| whose products the statistics' GEMMs hold without overflow, per feature dtype in memory: float32
#: GEMMs (float32 and float16 caches) sum up to a batch of squares below 3.4e38; float64 ones below 1.8e308.
SQUARABLE = {"float32": 1e16, "float64": 1e150}


def check_finite(features: np.ndarray | torch.Tensor, start: int, where: str, name: str = "/features") -> None:
    """No NaN or Inf in a batch of features, and no value so large that the statistics' products of it overflow
    (:data:`SQUARABLE`): one min/max reduction (NaN fails its comparisons), then the first bad row is located.
    Every comparison is made in the features' own dtype; NumPy on the host (no torch thread pool woken per batch),
    torch on a device."""
    if is_tensor(features):
        import torch

        if features.device.type == "cpu" and features.dtype in (torch.float16, torch.float32, torch.float64):
            features = features.detach().numpy()
        else:
            _check_finite_device(features, start, where, name)
            return
    values = np.asarray(features)
    if values.size == 0:
        return
    limit = SQUARABLE["float64" if values.dtype == np.float64 else "float32"]
    if values.min() >= -limit and values.max() <= limit:
        return
    bad_rows = np.flatnonzero(~np.isfinite(values).all(axis=1))
    if bad_rows.size:
        raise InputError(_nonfinite(where, name, start + int(bad_rows[0])))
    peak = np.abs(values).max(axis=1)  # finite, but too large
    row = int(np.flatnonzero(peak > limit)[0])
    raise InputError(_too_large(where, name, start + row, float(peak[row]), limit, str(values.dtype)))


def _nonfinite(where: str, name: str, row: int) -> str:
    return (f"{where}: {name} row {row} holds NaN or Inf; the features are corrupt (re-extract them, "
            "e.g. with --precision fp32 if half precision overflowed)")


def _too_large(where: str, name: str, row: int, peak: float, limit: float, dtype: str) -> str:
    fix = "rescale the features" + ("" if dtype == "float64" else " (or store them as float64)")
    return (f"{where}: {name} row {row} reaches {peak:.3g}, beyond the {limit:.0e} whose squares the {dtype} "
            f"statistics hold; {fix}")


def _check_finite_device(features: torch.Tensor, start: int, where: str, name: str) -> None:
    import torch

    if features.numel() == 0:
        return
    limit = SQUARABLE["float64" if features.dtype == torch.float64 else "float32"]
    low, high = torch.aminmax(features)
    if bool(low >= -limit) and bool(high <= limit):
        return
    bad_rows = (~torch.isfinite(features)).any(dim=1).nonzero()
    if bad_rows.numel():
        raise InputError(_nonfinite(where, name, start + int(bad_rows[0, 0])))
    peak = features.abs().amax(dim=1)
    if bool((peak <= limit).all()):  # only the reduction overflowed
        return
    row = int((peak > limit).nonzero()[0, 0])
    raise InputError(_too_large(where, name, start + row, float(peak[row]), limit,
                                str(features.dtype).replace("torch.", "")))


def check_classifier(weight: np.ndarray, bias: np.ndarray | None, where: str) -> None:
    """The classifier must be finite."""
    if not np.isfinite(weight).all():
        raise InputError(f"{where}: /classifier/weight holds NaN or Inf; store the final layer's trained weights")
    if bias is not None and not np.isfinite(bias).all():
        raise InputError(f"{where}: /classifier/bias holds NaN or Inf; store the final layer's trained bias")


def classes_to_keep(counts: np.ndarray, drop_empty: bool, where: str, names: Sequence[str] | None = None) -> np.ndarray:
    """Indices of the classes to audit: all of them, or (with ``drop_empty``) those with samples.

    An empty class is an input error unless the user drops empty classes explicitly; at least 2 classes must remain.
    """
    empty = np.flatnonzero(counts == 0)
    if empty.size and not drop_empty:
        shown = ", ".join(_label(int(c), names) for c in empty[:10]) + (", ..." if empty.size > 10 else "")
        raise InputError(f"{where}: {empty.size} class(es) have no samples ({shown}); pass --drop-empty-classes to "
                         "audit the remaining classes without them")
    keep = np.flatnonzero(counts > 0)
    if keep.size < 2:
        raise InputError(f"{where}: only {keep.size} class(es) have samples; neural-collapse metrics need at least 2")
    return keep


def _label(c: int, names: Sequence[str] | None) -> str:
    return f"{c} ({names[c]})" if names is not None and c < len(names) else str(c)
