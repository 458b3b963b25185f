"""The run file as a whole: creating it from the layout, truncating it for a resume, attributes.

These are the plain (non-SWMR) opens: structural changes that SWMR mode does not allow. Rows are
appended by :mod:`.transport`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import h5py
import numpy as np

from .layout import EVAL_ITERATION, EVAL_NAMES, LAYOUT_VERSION, STR, Layout, chunks, resolve_path


def open_plain_write(path: Path) -> h5py.File:
    """Open for structural changes (new datasets, attributes), which SWMR mode does not allow."""
    return h5py.File(path, "r+", libver=("v110", "latest"), locking=False)


def new_rows_dataset(f: h5py.File, name: str, dtype: np.dtype, row_shape: tuple[int, ...],
                     expected_rows: int | None, fillvalue: Any = None) -> None:  # fmt: skip
    """An empty per-row dataset ``[0, *row_shape]``, unlimited along rows, chunked by :func:`chunks`."""
    f.create_dataset(
        name,
        shape=(0, *row_shape),
        maxshape=(None, *row_shape),
        dtype=dtype,
        chunks=chunks(row_shape, dtype.itemsize, expected_rows),
        fillvalue=fillvalue,
    )


def as_attr(value: Any) -> Any:
    """Attribute values as HDF5 can store them: strings stay strings, unknown objects become text."""
    if isinstance(value, (bool, np.generic, np.ndarray)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)  # also turns str subclasses (torch.__version__) into plain str, which h5py stores


def set_attrs(path: str | os.PathLike, attrs: Mapping[str, Any]) -> None:
    """Set root attributes of a run file that no writer holds (one plain open)."""
    with open_plain_write(resolve_path(path)) as f:
        for k, v in attrs.items():
            f.attrs[k] = as_attr(v)


def write_array(path: Path, name: str, arr: np.ndarray) -> None:
    """Write ``arr`` whole as dataset ``name`` (strings as UTF-8), replacing an earlier one of that name."""
    with open_plain_write(path) as f:
        if name in f:
            del f[name]
        if arr.dtype.kind in "US" or arr.dtype == object:
            f.create_dataset(name, data=arr.astype(object), dtype=STR)
        else:
            f.create_dataset(name, data=arr)


def create_file(path: Path, layout: Layout, tables: Mapping[str, Sequence[Any]], attrs: Mapping[str, Any],
                overwrite: bool, expected_rows: int | None) -> set[str]:  # fmt: skip
    """Create a run file holding ``attrs``, the name ``tables`` (:data:`~.layout.TABLES`) and every
    per-row dataset of ``layout`` and of the eval series, without rows → the datasets created."""
    path.parent.mkdir(parents=True, exist_ok=True)
    # The low bound v110 keeps the file readable by HDF5 >= 1.10 while allowing SWMR (superblock v3).
    with h5py.File(path, "w" if overwrite else "w-", libver=("v110", "latest"), locking=False) as f:
        for k, v in attrs.items():
            if v is not None:
                f.attrs[k] = as_attr(v)
        f.attrs["status"] = "running"
        f.attrs["per_param"] = layout.per_param
        f.attrs["trajectory"] = layout.trajectory
        f.attrs["layout_version"] = LAYOUT_VERSION
        for name, values in tables.items():
            if name == "params/layer":
                f.create_dataset(name, data=np.array(values, dtype=np.int64))
            else:
                f.create_dataset(name, data=np.array([str(v) for v in values], dtype=object), dtype=STR)
        # Every per-row dataset exists from the start: SWMR appends cannot create datasets, and the
        # plain open that creating one later needs is the one moment a kill leaves the file flagged.
        for name, (dtype, row_shape) in layout.specs().items():
            new_rows_dataset(f, name, dtype, row_shape, expected_rows)
        new_rows_dataset(f, EVAL_ITERATION, np.dtype("i8"), (), expected_rows)
        for name in EVAL_NAMES:
            new_rows_dataset(f, f"eval/{name}", np.dtype("f8"), (), expected_rows, fillvalue=np.nan)
    return {*layout.specs(), EVAL_ITERATION, *(f"eval/{n}" for n in EVAL_NAMES)}


def reopen_file(path: Path, layout: Layout, tables: Mapping[str, Sequence[Any]],
                counts: Mapping[str, int]) -> set[str]:  # fmt: skip
    """Truncate an existing run file to a checkpoint's row ``counts`` (dataset → rows; datasets it lacks
    were created after it and are deleted), set ``status`` back to ``running`` → the datasets kept."""
    if not path.exists():
        raise FileNotFoundError(f"cannot resume {path}: the file does not exist")
    with open_plain_write(path) as f:
        for name, values in tables.items():
            if name != "params/layer" and [str(x) for x in f[name].asstr()[()]] != [str(v) for v in values]:
                raise ValueError(f"cannot resume {path}: its {name} differ from this run's")
        missing = [n for n in layout.specs() if n not in f or n not in counts]
        if missing:
            raise ValueError(f"cannot resume {path}: no committed rows recorded for {missing}")
        resizable = list(row_counts(f))
        for name in resizable:
            if name not in counts:  # created after the checkpoint (e.g. end-of-run arrays): recreated
                del f[name]
                continue
            if f[name].shape[0] < int(counts[name]):
                raise ValueError(
                    f"cannot resume {path}: {name} has {f[name].shape[0]} rows, fewer than the "
                    f"{counts[name]} the checkpoint committed"
                )
            f[name].resize(int(counts[name]), axis=0)
        f.attrs["status"] = "running"
    return {n for n in resizable if n in counts}


def row_counts(f: h5py.File) -> dict[str, int]:
    """Rows of every dataset in ``f`` that grows by rows (first axis resizable without limit)."""
    out: dict[str, int] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.maxshape and obj.maxshape[0] is None:
            out[name] = int(obj.shape[0])

    f.visititems(visit)
    return out


def read_row_counts(path: str | os.PathLike) -> dict[str, int]:
    """:func:`row_counts` of the file at ``path``."""
    with h5py.File(path, "r", locking=False) as f:
        return row_counts(f)
