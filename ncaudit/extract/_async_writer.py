"""The writer thread: batches handed over from the loop, written chunk-aligned to the cache."""

from __future__ import annotations

import queue
import threading
from typing import Any

import numpy as np
import torch

from ncaudit.cache import CacheWriter
from ncaudit.errors import InputError


# ---------------------------------------------------------------------------------------------------------------------
# Writer thread
# ---------------------------------------------------------------------------------------------------------------------
class _AsyncWriter:
    """Write batches to a :class:`CacheWriter` from a background thread, in chunk-aligned blocks of rows.

    Items are ``(event, features, labels, logits)``; ``event`` (a CUDA event or None) is waited on before the
    tensors, copied to the host without blocking, are read.
    """

    def __init__(self, writer: CacheWriter, chunk_rows: int, depth: int = 4) -> None:
        self.writer = writer
        self.chunk_rows = max(1, chunk_rows)
        self.float16 = writer.feature_dtype == np.float16
        self.error: BaseException | None = None
        self._q: queue.Queue[Any] = queue.Queue(maxsize=depth)
        self._thread = threading.Thread(target=self._run, name="ncaudit-writer", daemon=True)
        self._thread.start()

    def put(self, item: tuple[Any, torch.Tensor, np.ndarray, torch.Tensor, dict[str, torch.Tensor]]) -> None:
        if self.error is not None:
            raise self.error
        self._q.put(item)

    def _run(self) -> None:
        feats: list[np.ndarray] = []
        labels: list[np.ndarray] = []
        logits: list[np.ndarray] = []
        extra: dict[str, list[np.ndarray]] = {}
        n = 0

        def flush(rows: int) -> None:
            nonlocal feats, labels, logits, extra, n
            f, y, z = np.concatenate(feats), np.concatenate(labels), np.concatenate(logits)
            e = {name: np.concatenate(parts) for name, parts in extra.items()}
            self.writer.write(f[:rows], y[:rows], z[:rows], {name: v[:rows] for name, v in e.items()})
            feats, labels, logits, n = [f[rows:]], [y[rows:]], [z[rows:]], n - rows
            extra = {name: [v[rows:]] for name, v in e.items()}

        while True:
            item = self._q.get()
            if item is None:
                break
            if self.error is not None:
                continue  # keep draining so the producer never blocks
            try:
                event, f, y, z, layer_feats = item
                if event is not None:
                    event.synchronize()
                fn = f.numpy()
                if self.float16 and not np.all(np.abs(fn) <= 65504):
                    raise InputError(f"features reach {np.abs(fn).max():.3g}, beyond float16's range (65504); use "
                                     "--store-dtype float32")
                feats.append(fn)
                labels.append(y)
                logits.append(z.numpy())
                for name, v in layer_feats.items():
                    extra.setdefault(name, []).append(v.numpy())
                n += len(y)
                if n >= self.chunk_rows:
                    flush(n - n % self.chunk_rows)
            except BaseException as exc:
                self.error = exc
        if self.error is None and n:
            try:
                flush(n)
            except BaseException as exc:
                self.error = exc

    def close(self) -> None:
        """Write what is buffered, stop the thread, re-raise a write error.

        A second Ctrl-C / SIGTERM while the buffered rows are written does not leave the thread writing into a file
        that is being closed: the thread stops after the write in progress, and the interrupt is re-raised then.
        """
        interrupt: BaseException | None = None
        for _ in range(2):
            try:
                if interrupt is not None:
                    self.error = self.error or interrupt  # the thread drops whatever is still queued
                self._q.put(None)
                self._thread.join()
                break
            except KeyboardInterrupt as exc:
                interrupt = exc
        if interrupt is not None:
            raise interrupt
        if self.error is not None:
            raise self.error
