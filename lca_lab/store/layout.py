"""The run file's layout, described once: every dataset's name, dtype, row shape and when it exists.

The writer creates the file from :data:`SERIES` and :data:`TABLES`, flushes rows in :func:`write_order`,
the reader counts committed rows with :meth:`Layout.committed`, :func:`check_layout` checks a file
against the same table and :func:`estimate_bytes` sizes it. Symbols in row shapes: ``K`` = trainable
scalars, ``L`` = layers, ``C`` = classes; ``T`` = LCA rows.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import h5py
import numpy as np

FILE_NAME = "lca.h5"
# Evaluation series created with the file (NaN where never given); other names are created on first use.
EVAL_NAMES = ("test_loss", "test_acc", "train_loss", "train_acc")
EVAL_ITERATION = "eval/iteration"
LAYOUT_VERSION = 1
STR = h5py.string_dtype("utf-8")


class MalformedRunFileError(ValueError):
    """A file that is not a run file, or whose names and shapes contradict each other."""


@dataclass(frozen=True)
class Series:
    """A dataset that grows by one row per LCA row (first axis unlimited).

    ``row``: symbolic row shape (``("L",)`` = one float per layer); ``extra``: rows beyond T (1 for a
    value at θ_0 as well: ``train/loss[0]`` = L(θ_0)); ``when``: the run option that stores it
    (``per_param``, ``trajectory``, ``n_classes``), None for datasets every run file has.
    """

    name: str
    dtype: np.dtype
    row: tuple[str, ...] = ()
    extra: int = 0
    when: str | None = None
    doc: str = ""


def _series(name: str, dtype: str, row: tuple[str, ...] = (), extra: int = 0, when: str | None = None,
            doc: str = "") -> Series:  # fmt: skip
    return Series(name, np.dtype(dtype), row, extra, when, doc)


# In creation order (the writer's order since layout version 1).
SERIES: tuple[Series, ...] = (
    _series("train/loss", "f8", extra=1, doc="L(θ_t), t = t0..t0+T: before the first row and after each"),
    _series("lca/total", "f8", doc="Σ_i A[t, i]"),
    _series("lca/error", "f8", doc="Σ A − ΔL"),
    _series("lca/splits", "i4", doc="path-integral splits used"),
    _series("lca/converged", "bool", doc="False where |error| > tolerance"),
    _series("lca/layer", "f8", ("L",), doc="LCA per layer"),
    _series("lca/iteration", "i8", doc="training iteration t of each row; written last: commits rows"),
    _series("lca/class_layer", "f8", ("C", "L"), when="n_classes", doc="LCA per class and layer"),
    _series("lca/param", "f4", ("K",), when="per_param", doc="per-parameter LCA, params/names order"),
    _series("trajectory/theta", "f4", ("K",), extra=1, when="trajectory", doc="θ_t, t = t0..t0+T"),
)
SERIES_BY_NAME = {s.name: s for s in SERIES}
COMMIT = "lca/iteration"  # its length is the committed row count: every flush writes it last
# Name tables written once at creation: name -> numpy dtype kind ("str" for strings).
TABLES = {"params/names": "str", "params/shapes": "str", "params/layer": "int64", "layers/names": "str"}

# Chunks of about 1 MiB: large enough that HDF5's per-chunk overhead is negligible, small enough that
# reading one layer's columns of lca/param does not pull whole rows of a big network.
CHUNK_BYTES = 1 << 20
# Without an expected row count, 1-D series get chunks of at most this many rows so a short run does
# not allocate ~1 MiB per scalar series (file size stays predictable by estimate_bytes).
DEFAULT_ROW_CAP = 4096
# Cost of a run file beyond its chunk data: superblock, object headers, name tables (measured ~30 KiB
# for 60 tensors), chunk indices, and ~2 KiB of metadata space per flush that a reopened file does not
# reuse. Rounded up so that estimates err on the safe side.
_FIXED_OVERHEAD = 64 * 1024
_PER_CHUNK_OVERHEAD = 64
_PER_FLUSH_OVERHEAD = 4096


@dataclass(frozen=True)
class Layout:
    """The per-row datasets of one run: which of :data:`SERIES` exist and their concrete row shapes."""

    n_params: int
    n_layers: int
    n_classes: int | None = None
    per_param: bool = True
    trajectory: bool = False

    def present(self, s: Series) -> bool:
        return s.when is None or bool(getattr(self, s.when))

    def row_shape(self, s: Series) -> tuple[int, ...]:
        size = {"K": self.n_params, "L": self.n_layers, "C": self.n_classes or 0}
        return tuple(size[d] for d in s.row)

    def specs(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Dataset name -> (dtype, row shape) of every per-row dataset of this run, in creation order."""
        return {s.name: (s.dtype, self.row_shape(s)) for s in SERIES if self.present(s)}


def write_order(names: set[str] | dict) -> list[str]:
    """The ``lca/*`` series of ``names`` in the order a flush writes them: :data:`COMMIT` last, so that a
    row counts only once every other dataset holds it."""
    lca = [s.name for s in SERIES if s.name.startswith("lca/") and s.name != COMMIT and s.name in names]
    return lca + ([COMMIT] if COMMIT in names else [])


def committed(f: h5py.File) -> int:
    """Committed LCA rows of an open run file: rows present in every per-row dataset it has."""
    n = f[COMMIT].shape[0]
    for s in SERIES:
        if s.name in f:
            n = min(n, f[s.name].shape[0] - s.extra)
    return max(n, 0)


def resolve_path(path: str | os.PathLike) -> Path:
    """Return the run file for ``path``: ``<path>/lca.h5`` for a directory, else ``path`` itself."""
    p = Path(path)
    return p / FILE_NAME if p.is_dir() else p


def parse_shape(text: str) -> tuple[int, ...]:
    """``"(100, 784)"`` -> ``(100, 784)``; ``"()"`` -> ``()``; ``"(10,)"`` -> ``(10,)``."""
    inner = text.strip().strip("()").strip()
    return tuple(int(x) for x in inner.split(",") if x.strip())


# ----------------------------------------------------------------------------------------------------------
# chunking and size


def chunks(row_shape: tuple[int, ...], itemsize: int, expected_rows: int | None) -> tuple[int, ...]:
    """Chunk shape of a dataset of rows with shape ``row_shape`` (elements of ``itemsize`` bytes).

    A 1-D row ``[K]`` wider than one chunk is split along K; otherwise a chunk holds whole rows,
    as many as fit in ``CHUNK_BYTES`` but no more than the expected number of rows.
    """
    cap = max(1, expected_rows) if expected_rows else DEFAULT_ROW_CAP
    if len(row_shape) == 1:
        # Equal column blocks: K = 270_000 floats must not become one full block plus one block that is
        # 97 % padding (edge chunks are allocated whole).
        n_col_chunks = max(1, math.ceil(row_shape[0] * itemsize / CHUNK_BYTES))
        cols = max(1, math.ceil(row_shape[0] / n_col_chunks))
        rows = max(1, min(cap, CHUNK_BYTES // (cols * itemsize)))
        return (rows, cols)
    row_bytes = max(1, math.prod(row_shape)) * itemsize
    rows = max(1, min(cap, CHUNK_BYTES // row_bytes))
    return (rows, *row_shape)


def allocated_bytes(rows: int, row_shape: tuple[int, ...], itemsize: int, expected_rows: int | None) -> int:
    """Bytes HDF5 allocates for ``rows`` rows: uncompressed edge chunks are allocated whole."""
    if rows <= 0:
        return 0
    chunk = chunks(row_shape, itemsize, expected_rows)
    full = (rows, *row_shape)
    n_chunks = math.prod(math.ceil(n / c) for n, c in zip(full, chunk, strict=True))
    return n_chunks * (math.prod(chunk) * itemsize + _PER_CHUNK_OVERHEAD)


def estimate_bytes(
    K: int,
    T: int,
    per_param: bool = True,
    trajectory: bool = False,
    n_layers: int = 1,
    n_classes: int | None = None,
    expected_rows: int | None = None,
    flush_every: int = 50,
) -> int:
    """Estimated size in bytes of the run file of a run with ``T`` LCA rows and ``K`` parameters.

    Dominated by ``T*K*4`` for ``lca/param`` and ``(T+1)*K*4`` for ``trajectory/theta``; chunk padding
    and metadata are included, so the estimate is within a few percent of the real size (the writer is
    assumed to get ``expected_rows=T``, or the given ``expected_rows``). Arrays written with
    :meth:`RunWriter.write_array` (``data/train_index``: 8 bytes per example) and eval rows are not
    included. Use it to refuse runs over a disk budget before starting.
    """
    er = T if expected_rows is None else expected_rows
    layout = Layout(K, n_layers, n_classes, per_param, trajectory)
    total = _FIXED_OVERHEAD + _PER_FLUSH_OVERHEAD * math.ceil(T / max(1, flush_every))
    for s in SERIES:
        if layout.present(s):
            total += allocated_bytes(T + s.extra, layout.row_shape(s), s.dtype.itemsize, er)
    return int(total)


# ----------------------------------------------------------------------------------------------------------
# checks

_SHAPE_RE = re.compile(r"\(\s*(\d+\s*(,\s*\d+\s*)*,?)?\)")


def check_layout(f: h5py.File, path: Path) -> None:
    """Raise :class:`MalformedRunFileError` unless the names and shapes in ``f`` fit together.

    Checked before any array is trusted: the name tables exist, are strings and have one entry per
    tensor; every shape parses; layer indices point into ``layers/names``; every per-row dataset of
    :data:`SERIES` that the file has (every one without a ``when``) has its kind of dtype (float, integer,
    bool) and row shape (``K`` = the sum of the shapes' sizes, ``L`` = the number of layers); none has
    fewer rows than ``lca/iteration`` (written last) plus its ``extra`` rows; ``lca/iteration``
    increases; eval series are as long as ``eval/iteration``.
    """

    def bad(msg: str) -> MalformedRunFileError:
        return MalformedRunFileError(f"{path} is not a valid lca_lab run file: {msg}")

    K, n_layers = _check_tables(f, bad)
    sizes = {"K": K, "L": n_layers}
    T = f[COMMIT].shape[0] if COMMIT in f and isinstance(f[COMMIT], h5py.Dataset) else 0
    for s in SERIES:
        if s.name not in f or not isinstance(f[s.name], h5py.Dataset):
            if s.when is None:
                raise bad(f"{s.name} is missing")
            continue
        shape, kind = f[s.name].shape, f[s.name].dtype.kind
        if kind != s.dtype.kind and not (kind in "iu" and s.dtype.kind in "iu"):
            raise bad(f"{s.name} has dtype {f[s.name].dtype}; the layout stores {s.dtype}")
        if len(shape) != 1 + len(s.row):
            raise bad(f"{s.name} must be {1 + len(s.row)}-D, found shape {shape}")
        for dim, n in zip(s.row, shape[1:], strict=True):
            if dim in sizes and n != sizes[dim]:
                raise bad(_wrong_width(s, shape, sizes))
        if s.extra and T and shape[0] < T + s.extra:
            raise bad(f"{s.name} has {shape[0]} rows; {T} LCA rows need {T + s.extra}")
        if not s.extra and shape[0] < T:
            raise bad(f"{s.name} has {shape[0]} rows but lca/iteration has {T}")
    it = f[COMMIT][()]
    if T > 1 and not np.all(np.diff(it) > 0):
        raise bad("lca/iteration is not increasing")
    if EVAL_ITERATION in f:
        n_eval = f[EVAL_ITERATION].shape[0]
        for name, ds in f["eval"].items():
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.shape[0] < n_eval:
                raise bad(f"eval/{name} must be 1-D with at least the {n_eval} rows of eval/iteration")


def _wrong_width(s: Series, shape: tuple[int, ...], sizes: dict[str, int]) -> str:
    """What is wrong with a row of ``s`` that has another width than ``sizes`` says."""
    if s.row == ("L",):
        return f"{s.name} has {shape[1]} columns but layers/names has {sizes['L']} layers"
    if s.row == ("K",):
        return f"{s.name} has shape {shape}; its rows must be K = {sizes['K']} wide (from params/shapes)"
    want = ", ".join(str(sizes.get(d, d)) for d in s.row).replace("C", "n_classes")
    return f"{s.name} has shape {shape}; expected [T, {want}]"


def _check_tables(f: h5py.File, bad: Any) -> tuple[int, int]:
    """Check the name tables (:data:`TABLES`) → (K, number of layers)."""
    for name, kind in TABLES.items():
        ds = f.get(name)
        if kind == "str":
            if not isinstance(ds, h5py.Dataset):
                raise bad(f"{name} is missing")
            if ds.ndim != 1 or not h5py.check_string_dtype(ds.dtype):
                raise bad(f"{name} must be a 1-D string dataset, found {ds.ndim}-D {ds.dtype}")
        elif not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.dtype.kind not in "iu":
            raise bad(f"{name} is missing or not a 1-D integer dataset")
    names = [str(x) for x in f["params/names"].asstr()[()]]
    shapes = [str(x) for x in f["params/shapes"].asstr()[()]]
    layer = f["params/layer"][()]
    n_layers = f["layers/names"].shape[0]
    if not len(names) == len(shapes) == len(layer):
        raise bad(
            f"params/names, params/shapes and params/layer have {len(names)}, {len(shapes)} and "
            f"{len(layer)} entries; they must have one per tensor"
        )
    if len(set(names)) != len(names):
        raise bad("params/names has duplicate names")
    for n, s in zip(names, shapes):
        if not _SHAPE_RE.fullmatch(s.strip()):
            raise bad(f"params/shapes entry {s!r} of {n} is not a shape like (100, 784)")
    if len(layer) and (layer.min() < 0 or layer.max() >= n_layers):
        raise bad(f"params/layer has indices outside 0..{n_layers - 1} (layers/names has {n_layers})")
    return int(sum(math.prod(parse_shape(s)) for s in shapes)), int(n_layers)
