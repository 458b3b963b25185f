"""Reading a run file: :func:`open_run` and :class:`RunFile`, clipped to the committed rows."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .layout import EVAL_ITERATION, MalformedRunFileError, check_layout, committed, parse_shape, resolve_path

_SWMR_FLAG_ERRORS = ("already open for write", "not already open for SWMR", "unable to lock")


def from_attr(value: Any) -> Any:
    """An attribute as Python: bytes decoded, numpy scalars as Python numbers."""
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


class NotStoredError(KeyError):
    """The run was stored without the requested data (e.g. ``store.per_param=false``)."""

    def __str__(self) -> str:  # KeyError would print the message quoted
        return str(self.args[0]) if self.args else ""


def _open_read(path: Path, retries: float = 5.0) -> tuple[h5py.File, bool]:
    """Open read-only; fall back to SWMR read when a writer is mid-flush (or was killed mid-flush).

    Returns the file and whether it was opened in SWMR mode. The writer keeps the file closed between
    flushes, so a plain open almost always succeeds; while it is inside a flush the file is flagged
    SWMR-written and only an SWMR reader may open it. ``retries`` seconds cover the short non-SWMR
    opens (dataset creation, attributes).
    """
    deadline = time.monotonic() + retries
    while True:
        try:
            return h5py.File(path, "r", locking=False), False
        except OSError as plain_err:
            if not any(s in str(plain_err) for s in _SWMR_FLAG_ERRORS):
                raise
            try:
                return h5py.File(path, "r", libver=("v110", "latest"), swmr=True, locking=False), True
            except OSError:
                if time.monotonic() > deadline:
                    raise OSError(
                        f"{path} is flagged as open for writing by another process (or one killed while "
                        f"writing attributes); if no writer is running, clear it with `h5clear -s {path}`"
                    ) from plain_err
                time.sleep(0.05)


def open_run(path: str | os.PathLike) -> RunFile:
    """Open a run file (or run directory holding ``lca.h5``) for reading."""
    return RunFile(path)


RowIndex = slice | int | Iterable[int] | None


class RunFile:
    """Read-only view of a run file. Arrays are clipped to the committed rows (``n_rows``).

    Opening works on finished, failed, interrupted (killed) and still-running runs; for a running
    run call :meth:`refresh` to see rows flushed after opening.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = resolve_path(path)
        if not self.path.exists():
            raise FileNotFoundError(f"no run file at {self.path}")
        try:
            self._f, self.swmr = _open_read(self.path)
        except OSError as e:
            if "signature" in str(e) or "not an HDF5" in str(e):
                raise MalformedRunFileError(f"{self.path} is not an HDF5 file (not a run file)") from None
            raise
        try:
            check_layout(self._f, self.path)
        except BaseException:
            self._f.close()
            raise

    # -- file handling ------------------------------------------------------------------------------------

    def refresh(self) -> None:
        """Reopen the file to see rows written since it was opened."""
        self._f.close()
        self._f, self.swmr = _open_read(self.path)

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> RunFile:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def h5(self) -> h5py.File:
        """The open ``h5py.File`` (read-only) for anything this class does not wrap."""
        return self._f

    # -- attributes ---------------------------------------------------------------------------------------

    @property
    def attrs(self) -> dict[str, Any]:
        """All root attributes, strings decoded."""
        return {k: from_attr(v) for k, v in self._f.attrs.items()}

    @property
    def status(self) -> str:
        return str(from_attr(self._f.attrs.get("status", "unknown")))

    @property
    def is_complete(self) -> bool:
        return self.status == "complete"

    @property
    def config(self) -> str:
        """Resolved config as YAML text ("" if the writer stored none)."""
        return str(from_attr(self._f.attrs.get("config", "")))

    @property
    def per_param(self) -> bool:
        return "lca/param" in self._f

    @property
    def has_trajectory(self) -> bool:
        return "trajectory/theta" in self._f

    # -- names --------------------------------------------------------------------------------------------

    def _strings(self, name: str) -> list[str]:
        return [str(s) for s in self._f[name].asstr()[()]]

    @property
    def param_names(self) -> list[str]:
        return self._strings("params/names")

    @property
    def param_shapes(self) -> list[tuple[int, ...]]:
        return [parse_shape(s) for s in self._strings("params/shapes")]

    @property
    def param_layer(self) -> np.ndarray:
        """[n_tensors] int64 layer index of each tensor."""
        return self._f["params/layer"][()]

    @property
    def layer_names(self) -> list[str]:
        return self._strings("layers/names")

    @property
    def param_offsets(self) -> np.ndarray:
        """[n_tensors + 1] int64: tensor j occupies columns ``offsets[j]:offsets[j+1]`` of K."""
        sizes = [math.prod(s) for s in self.param_shapes]
        return np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)]).astype(np.int64)

    @property
    def n_params(self) -> int:
        """K, the number of trainable scalars."""
        return int(self.param_offsets[-1])

    # -- per-row arrays -----------------------------------------------------------------------------------

    @property
    def n_rows(self) -> int:
        """Committed LCA rows: rows present in every per-row dataset (``lca/iteration`` is written last)."""
        return committed(self._f)

    def _rows(
        self, name: str, rows: RowIndex = None, extra: int = 0, cols: slice | None = None
    ) -> np.ndarray:
        """Read ``rows`` (slice, int or index list, negatives from the end) of the first
        ``n_rows + extra`` rows of ``name``, restricted to columns ``cols`` for 2-D datasets."""
        ds = self._f[name]
        n = self.n_rows + extra
        tail = (cols,) if cols is not None else ()
        if rows is None:
            rows = slice(None)
        if isinstance(rows, slice) and (rows.step or 1) > 0:
            start, stop, step = rows.indices(n)
            return ds[(slice(start, stop, step), *tail)]
        if isinstance(rows, (int, np.integer)):
            i = int(rows) + n if rows < 0 else int(rows)
            if not 0 <= i < n:
                raise IndexError(f"row {rows} out of range for {n} rows")
            return ds[(i, *tail)]
        idx = np.arange(n)[rows] if isinstance(rows, slice) else np.asarray(list(rows), dtype=np.int64)
        idx = np.where(idx < 0, idx + n, idx)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"rows out of range for {n} rows")
        if not idx.size:
            return np.empty((0, *ds[(slice(0, 0), *tail)].shape[1:]), ds.dtype)
        # h5py wants strictly increasing indices: read the sorted unique set, then put the order back.
        uniq, inverse = np.unique(idx, return_inverse=True)
        return ds[(uniq, *tail)][inverse]

    @property
    def train_loss(self) -> np.ndarray:
        """[n_rows + 1] float64: L(θ) before the first row and after each row's step."""
        return self._rows("train/loss", extra=1)

    @property
    def lca_total(self) -> np.ndarray:
        """[n_rows] float64: Σ_i A[t, i] of each row."""
        return self._rows("lca/total")

    @property
    def lca_layer(self) -> np.ndarray:
        """[n_rows, n_layers] float64 LCA per layer."""
        return self._rows("lca/layer")

    @property
    def lca_error(self) -> np.ndarray:
        """[n_rows] float64: Σ A − ΔL of each row."""
        return self._rows("lca/error")

    @property
    def lca_splits(self) -> np.ndarray:
        """[n_rows] int32: path-integral splits used."""
        return self._rows("lca/splits")

    @property
    def lca_converged(self) -> np.ndarray:
        """[n_rows] bool: False where |error| > tolerance (max splits reached, or no refinement)."""
        return self._rows("lca/converged")

    @property
    def lca_iteration(self) -> np.ndarray:
        """[n_rows] int64: the training iteration t of each row."""
        return self._rows("lca/iteration")

    @property
    def lca_class_layer(self) -> np.ndarray:
        """[n_rows, n_classes, n_layers] float64 per-class LCA per layer."""
        if "lca/class_layer" not in self._f:
            raise NotStoredError(f"{self.path} has no lca/class_layer: per-class LCA was off for this run")
        return self._rows("lca/class_layer")

    def param_lca(self, rows: RowIndex = None) -> np.ndarray:
        """Per-parameter LCA, [len(rows), K] float32 (or [K] for an int row). Reads only ``rows``."""
        if "lca/param" not in self._f:
            raise NotStoredError(
                f"{self.path} was stored without per-parameter LCA (no lca/param); "
                "rerun with store.per_param=true (and a store.max_gb that holds it) to keep it"
            )
        return self._rows("lca/param", rows)

    def _layer_index(self, layer: str | int) -> int:
        names = self.layer_names
        if isinstance(layer, str):
            if layer not in names:
                raise KeyError(f"no layer {layer!r}; layers are {names}")
            return names.index(layer)
        i = int(layer) + len(names) if int(layer) < 0 else int(layer)
        if not 0 <= i < len(names):
            raise IndexError(f"layer index {layer} out of range for {len(names)} layers")
        return i

    def layer_param_lca(self, layer: str | int, rows: RowIndex = None) -> dict[str, np.ndarray]:
        """Per-parameter LCA of one layer's tensors: tensor name -> [len(rows), *shape] float32.

        Reads only the columns of that layer (chunks are split along K for wide rows).
        """
        self.param_lca(slice(0, 0))  # raises the clear error when per_param was off
        li = self._layer_index(layer)
        offsets = self.param_offsets
        out: dict[str, np.ndarray] = {}
        for j, (name, shape, lay) in enumerate(
            zip(self.param_names, self.param_shapes, self.param_layer, strict=True)
        ):
            if lay != li:
                continue
            block = self._rows("lca/param", rows, cols=slice(int(offsets[j]), int(offsets[j + 1])))
            out[name] = block.reshape(*block.shape[:-1], *shape)
        return out

    def theta(self, rows: RowIndex = None) -> np.ndarray:
        """Trajectory θ, [len(rows), K] float32, rows 0..n_rows (row r+1 = θ after row r's step)."""
        if "trajectory/theta" not in self._f:
            raise NotStoredError(f"{self.path} has no trajectory/theta; rerun with store.trajectory=true")
        return self._rows("trajectory/theta", rows, extra=1)

    # -- eval and other datasets ----------------------------------------------------------------------------

    @property
    def eval_names(self) -> list[str]:
        """Names of the ``eval/<name>`` series (``iteration`` included)."""
        return sorted(self._f["eval"].keys()) if "eval" in self._f else []

    def eval(self, name: str) -> np.ndarray:
        """``eval/<name>`` clipped to the committed eval rows (``eval/iteration`` is written last)."""
        if "eval" not in self._f or name not in self._f["eval"]:
            raise KeyError(f"{self.path} has no eval/{name}; available: {self.eval_names}")
        n = self._f[EVAL_ITERATION].shape[0]
        return self._f[f"eval/{name}"][:n]

    @property
    def train_index(self) -> np.ndarray | None:
        """``data/train_index`` if the writer stored it, else None."""
        return self._f["data/train_index"][()] if "data/train_index" in self._f else None

    def read(self, name: str) -> np.ndarray:
        """Any dataset by name, whole (e.g. ``test/loss`` or ``data/train_index``)."""
        ds = self._f[name]
        return ds.asstr()[()] if h5py.check_string_dtype(ds.dtype) else ds[()]

    def __repr__(self) -> str:
        return f"RunFile({str(self.path)!r}, status={self.status!r}, n_rows={self.n_rows})"
