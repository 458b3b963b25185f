"""The HDF5 run file: a buffered, crash-tolerant writer and a read-only reader.

One file per run, ``<run dir>/lca.h5``. The layout is a contract other tools read (see
``shared/design.md``); every name below is fixed once written.

Root attributes
    ``config`` (resolved YAML text), ``lca_lab_version``, ``git_sha`` (if any), ``torch_version``,
    ``device``, ``data_source``, ``created``, ``status`` (``running`` / ``complete`` /
    ``failed: <ExceptionType>: <message>``), plus ``per_param`` and ``trajectory`` (bool) and
    ``layout_version`` (int) written by the store itself.

Datasets (T = number of LCA rows, K = number of trainable scalars, L = number of layers)
    ``params/names`` [n_tensors] str, ``params/shapes`` [n_tensors] str like ``(100, 784)``,
    ``params/layer`` [n_tensors] int64, ``layers/names`` [L] str;
    ``train/loss`` [T+1] float64: ``train/loss[0]`` is L(θ) before the first row, ``train/loss[r+1]``
    is L(θ) after the step of row r (so for a contiguous window it is L(θ_t), t = t0..t0+T);
    ``lca/param`` [T, K] float32 (only with ``per_param``; tensors flattened in C order, concatenated
    in ``params/names`` order); ``lca/layer`` [T, L] float64; ``lca/total`` [T] float64 (Σ_i A[t, i]);
    ``lca/error`` [T] float64 (Σ A − ΔL); ``lca/splits`` [T] int32; ``lca/converged`` [T] bool
    (False where |error| > tolerance: refinement stopped at max splits, or a method that does not
    refine); ``lca/iteration`` [T] int64 (training iteration t of each row: LCA may be computed only
    inside a window);
    ``lca/class_layer`` [T, n_classes, L] float64 (only with ``n_classes``);
    ``trajectory/theta`` [T+1, K] float32 (only with ``trajectory``);
    ``eval/iteration`` [E] int64 and ``eval/<name>`` [E] float64 (NaN where a row lacks the value;
    ``test_loss``, ``test_acc``, ``train_loss``, ``train_acc`` always exist, other names appear on first
    use); any other name passed to :meth:`RunWriter.append_dataset` (e.g. ``test/loss`` [T+1]), one
    row per call;
    arrays written once with :meth:`RunWriter.write_array` (e.g. ``data/train_index``).

Crash safety
    The writer keeps rows in memory and touches the file only in :meth:`RunWriter.flush`, every
    ``flush_every`` rows. The file is *closed* between flushes, so a process killed between flushes
    (SIGKILL, OOM killer) leaves an ordinary, cleanly closed file that ``h5py.File(path, "r")`` opens
    with every flushed row and ``status == "running"``. Appends happen with the file opened directly
    in SWMR-write mode (superblock v3, ``libver=("v110", "latest")``): HDF5 then orders its metadata
    writes so that the file is consistent at every instant, so even a kill in the middle of a flush
    leaves a file that SWMR readers (and :func:`open_run`, which falls back to SWMR) can read. Only the
    rare non-SWMR opens (creating a dataset for a new eval or series name, ``set_attr``/``set_status``,
    ``write_array``) can leave the file flagged "already open for write" if killed mid-way;
    ``h5clear -s lca.h5`` (Debian package ``hdf5-tools``) clears that. A run's committed row count is
    the shortest length among its per-row datasets; ``lca/iteration`` is written last in every flush.

Concurrency
    Readers in other processes may hold the file open while a run writes (file locking is off on both
    sides; call :meth:`RunFile.refresh` to see new rows). In the *same* process HDF5 cannot open a file
    for writing that is open read-only, so close a :class:`RunFile` before the writer's next flush (with
    ``file_process``, as ``train.py`` writes on a GPU, the flushes happen in a child process instead).
"""

from __future__ import annotations

import collections
import math
import os
import re
import threading
import time
import warnings
from collections.abc import Iterable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import h5py
import numpy as np
import torch

from .file_process import FileProcess, write_all
from .file_process import write_rows as _write_rows

__all__ = [
    "EVAL_NAMES",
    "FILE_NAME",
    "MalformedRunFileError",
    "NotStoredError",
    "RunFile",
    "RunWriter",
    "estimate_bytes",
    "open_run",
    "resolve_path",
]

FILE_NAME = "lca.h5"
# Evaluation series created with the file (NaN where never given); other names are created on first use.
EVAL_NAMES = ("test_loss", "test_acc", "train_loss", "train_acc")
LAYOUT_VERSION = 1

# Chunks of about 1 MiB: large enough that HDF5's per-chunk overhead is negligible, small enough that
# reading one layer's columns of lca/param does not pull whole rows of a big network.
_CHUNK_BYTES = 1 << 20
# Without an expected row count, 1-D series get chunks of at most this many rows so a short run does
# not allocate ~1 MiB per scalar series (file size stays predictable by estimate_bytes).
_DEFAULT_ROW_CAP = 4096
# Cost of a run file beyond its chunk data: superblock, object headers, name tables (measured ~30 KiB
# for 60 tensors), chunk indices, and ~2 KiB of metadata space per flush that a reopened file does not
# reuse. Rounded up so that estimates err on the safe side.
_FIXED_OVERHEAD = 64 * 1024
_PER_CHUNK_OVERHEAD = 64
_PER_FLUSH_OVERHEAD = 4096

_STR = h5py.string_dtype("utf-8")
_SWMR_FLAG_ERRORS = ("already open for write", "not already open for SWMR", "unable to lock")


# ----------------------------------------------------------------------------------------------------------
# layout helpers


def resolve_path(path: str | os.PathLike) -> Path:
    """Return the run file for ``path``: ``<path>/lca.h5`` for a directory, else ``path`` itself."""
    p = Path(path)
    return p / FILE_NAME if p.is_dir() else p


def _chunks(row_shape: tuple[int, ...], itemsize: int, expected_rows: int | None) -> tuple[int, ...]:
    """Chunk shape of a dataset of rows with shape ``row_shape`` (elements of ``itemsize`` bytes).

    A 1-D row ``[K]`` wider than one chunk is split along K; otherwise a chunk holds whole rows,
    as many as fit in ``_CHUNK_BYTES`` but no more than the expected number of rows.
    """
    cap = max(1, expected_rows) if expected_rows else _DEFAULT_ROW_CAP
    if len(row_shape) == 1:
        # Equal column blocks: K = 270_000 floats must not become one full block plus one block that is
        # 97 % padding (edge chunks are allocated whole).
        n_col_chunks = max(1, math.ceil(row_shape[0] * itemsize / _CHUNK_BYTES))
        cols = max(1, math.ceil(row_shape[0] / n_col_chunks))
        rows = max(1, min(cap, _CHUNK_BYTES // (cols * itemsize)))
        return (rows, cols)
    row_bytes = max(1, math.prod(row_shape)) * itemsize
    rows = max(1, min(cap, _CHUNK_BYTES // row_bytes))
    return (rows, *row_shape)


def _allocated_bytes(rows: int, row_shape: tuple[int, ...], itemsize: int, expected_rows: int | None) -> int:
    """Bytes HDF5 allocates for ``rows`` rows: uncompressed edge chunks are allocated whole."""
    if rows <= 0:
        return 0
    chunk = _chunks(row_shape, itemsize, expected_rows)
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
    total = _FIXED_OVERHEAD + _PER_FLUSH_OVERHEAD * math.ceil(T / max(1, flush_every))
    total += _allocated_bytes(T + 1, (), 8, er)  # train/loss
    for itemsize in (8, 8, 4, 1, 8):  # lca/total, lca/error, lca/splits, lca/converged, lca/iteration
        total += _allocated_bytes(T, (), itemsize, er)
    total += _allocated_bytes(T, (n_layers,), 8, er)
    if n_classes:
        total += _allocated_bytes(T, (n_classes, n_layers), 8, er)
    if per_param:
        total += _allocated_bytes(T, (K,), 4, er)
    if trajectory:
        total += _allocated_bytes(T + 1, (K,), 4, er)
    return int(total)


def _parse_shape(text: str) -> tuple[int, ...]:
    """``"(100, 784)"`` -> ``(100, 784)``; ``"()"`` -> ``()``; ``"(10,)"`` -> ``(10,)``."""
    inner = text.strip().strip("()").strip()
    return tuple(int(x) for x in inner.split(",") if x.strip())


def _as_attr(value: Any) -> Any:
    """Attribute values as HDF5 can store them: strings stay strings, unknown objects become text."""
    if isinstance(value, (bool, np.generic, np.ndarray)):
        return value
    if isinstance(value, int):
        return int(value)
    if isinstance(value, float):
        return float(value)
    return str(value)  # also turns str subclasses (torch.__version__) into plain str, which h5py stores


def _from_attr(value: Any) -> Any:
    if isinstance(value, bytes):
        return value.decode("utf-8")
    if isinstance(value, np.generic):
        return value.item()
    return value


def _open_plain_write(path: Path) -> h5py.File:
    """Open for structural changes (new datasets, attributes), which SWMR mode does not allow."""
    return h5py.File(path, "r+", libver=("v110", "latest"), locking=False)


# ----------------------------------------------------------------------------------------------------------
# conversion of buffered rows


def _keep(x: Any, dtype: torch.dtype | None = None, copy: bool = True, defer_cast: bool = False) -> Any:
    """Snapshot one value for the buffer without a device sync.

    Tensors are copied on their own device: callers often reuse an accumulator in place, and a buffered
    reference would otherwise change under us. ``copy=False`` keeps the tensor itself (the caller hands
    over a fresh tensor it will not modify): one kernel launch less per value, which counts for small,
    launch-bound nets. Casting to the stored dtype here (float32 for per-parameter rows) halves the
    device memory the buffer holds; ``defer_cast`` (with ``copy=False``) leaves that cast to the flush,
    one kernel for all rows instead of one per row, where the writer judged the memory small.
    """
    if isinstance(x, torch.Tensor):
        if x.requires_grad:  # detach() is itself an op; most rows never required grad
            x = x.detach()
        if dtype is not None and x.dtype != dtype and not (defer_cast and not copy):
            return x.to(dtype=dtype, copy=True)
        return x.clone() if copy else x
    if isinstance(x, np.ndarray):
        return x.copy()
    return x


def _to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.cpu()
        return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()
    return np.asarray(x)


class _StagingPool:
    """Host buffers (pinned where CUDA exists) that rows leave the GPU through, reused from flush to flush.

    Allocating pinned memory (``cudaHostAlloc``; on an H200, 13 calls of about 1.2 ms in a 300-iteration
    MNIST-FC profile, up to 18 ms for one flush's buffers) and freeing it (``cudaFreeHost``, which waits
    for the whole device) on the training thread at every flush was most of the run file's cost per
    iteration there. Buffers are kept per row shape and dtype and hold up to ``rows`` rows; a flush of
    n ≤ rows rows uses the first n (a run's first flush and its last are often shorter). :meth:`reserve`
    allocates them when a series' first row arrives, before the training loop needs them. A buffer comes back
    (``give``) only once the writer thread has written its rows to the file, so a later flush never
    overwrites rows still waiting to be written. ``take`` and ``reserve`` run on the training thread,
    ``give`` on the writer thread.
    """

    KEEP = 4  # free buffers kept per (row shape, dtype) beyond those reserved
    # A series' flushes up to this size get two buffers reserved (one written while the next fills); a
    # bigger one (per-parameter rows of a big net) one, as its flushes are seconds apart.
    SECOND_BELOW = 64 << 20

    def __init__(self) -> None:
        # (row shape, dtype) -> free buffers [capacity, *row shape]
        self._free: dict[tuple[tuple[int, ...], torch.dtype], list[torch.Tensor]] = {}
        self._reserved: collections.Counter = collections.Counter()
        self._lock = threading.Lock()
        self.allocated = 0  # buffers created (not reused), for tests

    def _new(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        self.allocated += 1
        return torch.empty(shape, dtype=dtype, pin_memory=torch.cuda.is_available())

    def reserve(self, row_shape: tuple[int, ...], dtype: torch.dtype, rows: int) -> None:
        """Allocate buffers of ``rows`` rows now (two, or one above ``SECOND_BELOW`` bytes each), and keep
        at least that many from then on."""
        key = (tuple(row_shape), dtype)
        nbytes = rows * math.prod(key[0]) * torch.empty((), dtype=dtype).element_size()
        count = 2 if nbytes <= self.SECOND_BELOW else 1
        bufs = [self._new((rows, *key[0]), dtype) for _ in range(count)]
        with self._lock:
            self._reserved[key] += count
            self._free.setdefault(key, []).extend(bufs)

    def take(self, shape: tuple[int, ...], dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """A buffer for rows of ``shape`` [n, *row shape] → (the buffer, its first n rows)."""
        n, key = shape[0], (tuple(shape[1:]), dtype)
        with self._lock:
            free = self._free.get(key, [])
            fits = [i for i, b in enumerate(free) if b.shape[0] >= n]
            if fits:  # the smallest that holds n rows; by position (== on tensors compares their values)
                buf = free.pop(min(fits, key=lambda i: free[i].shape[0]))
                return buf, buf[:n]
        buf = self._new(tuple(shape), dtype)
        return buf, buf

    def give(self, buf: torch.Tensor) -> None:
        key = (tuple(buf.shape[1:]), buf.dtype)
        with self._lock:
            free = self._free.setdefault(key, [])
            if len(free) < max(self.KEEP, self._reserved[key]):
                free.append(buf)


class _InFlight:
    """Rows on their way from the GPU: a pinned host buffer (from a :class:`_StagingPool`) filled by a
    non-blocking copy.

    ``resolve()`` (called by the writer thread) waits for the copy's CUDA event, never the training
    thread, and returns the numpy array (a view of the buffer); ``release()``, once those rows are in the
    file, returns the buffer to the pool.
    """

    def __init__(self, stacked: torch.Tensor, dtype: Any, pool: _StagingPool) -> None:
        self.pool = pool
        self._buf: torch.Tensor | None
        self._buf, self.host = pool.take(tuple(stacked.shape), stacked.dtype)
        self.host.copy_(stacked, non_blocking=True)
        self.event = None
        if stacked.is_cuda:
            self.event = torch.cuda.Event()
            self.event.record()
        self.dtype = dtype

    def wait(self) -> None:
        """Wait for the copy (and for every copy queued before it on the same stream)."""
        if self.event is not None:
            self.event.synchronize()
            self.event = None

    def resolve(self) -> np.ndarray:
        self.wait()
        return np.ascontiguousarray(self.host.numpy(), dtype=self.dtype)

    def release(self) -> None:
        if self._buf is not None:
            self.pool.give(self._buf)
            self._buf = self.host = None


def _resolve(x: Any) -> np.ndarray:
    return x.resolve() if isinstance(x, _InFlight) else x


def _can_fly(items: Sequence[Any]) -> bool:
    """Rows that leave by a non-blocking copy: all of them CUDA tensors."""
    return bool(items) and all(isinstance(x, torch.Tensor) and x.is_cuda for x in items)


def _staged_dtype(dtype: torch.dtype, stored: Any) -> torch.dtype:
    """The dtype CUDA rows of ``dtype`` leave the device in, for a dataset of numpy dtype ``stored`` (None:
    the rows' own). Floats are cast on the device to a narrower stored float (per-parameter rows buffered
    as float64, stored as float32: half the bytes to copy, nothing left to cast on the writer thread);
    half types leave as float32 (numpy has no bfloat16)."""
    if dtype in (torch.bfloat16, torch.float16):
        return torch.float32
    if stored is not None and dtype.is_floating_point and np.dtype(stored).kind == "f":
        narrower = {4: torch.float32, 8: torch.float64}.get(np.dtype(stored).itemsize)
        if narrower is not None and torch.finfo(narrower).bits < torch.finfo(dtype).bits:
            return narrower
    return dtype


def _stack(items: Sequence[Any], dtype: Any = None, in_flight: _StagingPool | None = None) -> Any:
    """Stack buffered rows into one array ``[n, *row_shape]`` of ``dtype`` (None: the rows' own dtype).

    Device tensors are stacked on the device and moved with one ``.cpu()`` so a flush costs one
    synchronisation, not one per row and field. With a staging pool (``in_flight``) CUDA rows are not
    waited for at all: an :class:`_InFlight` copy is returned for the writer thread to resolve.
    """
    if in_flight is not None and _can_fly(items):
        try:
            stacked = torch.stack(list(items))
            return _InFlight(stacked.to(_staged_dtype(stacked.dtype, dtype)), dtype, in_flight)
        except RuntimeError:  # rows on different devices: fall through to the blocking path
            pass
    if items and all(isinstance(x, torch.Tensor) for x in items):
        try:
            stacked = _to_numpy(torch.stack(list(items)))
        except RuntimeError:  # rows on different devices: move them one by one
            stacked = np.stack([_to_numpy(x) for x in items])
    else:
        stacked = np.stack([_to_numpy(x) for x in items])
    return np.ascontiguousarray(stacked, dtype=dtype)


def _row_counts(f: h5py.File) -> dict[str, int]:
    """Rows of every dataset in ``f`` that grows by rows (first axis resizable without limit)."""
    out: dict[str, int] = {}

    def visit(name: str, obj: Any) -> None:
        if isinstance(obj, h5py.Dataset) and obj.maxshape and obj.maxshape[0] is None:
            out[name] = int(obj.shape[0])

    f.visititems(visit)
    return out


def _check_len(name: str, x: Any, n: int) -> None:
    """Shape check that reads only metadata (no device sync)."""
    size = x.numel() if isinstance(x, torch.Tensor) else np.size(x)
    if size != n:
        raise ValueError(f"{name} has {size} elements, expected {n}")


def _flat(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x if x.dim() == 1 else x.reshape(-1)
    return np.asarray(x).reshape(-1)


# ----------------------------------------------------------------------------------------------------------
# writer

# The per-row ``lca/<field>`` datasets in the order a flush writes them: lca/iteration comes last so that
# a row is visible in it only once every other dataset holds it.
_LCA_FIELDS = ("total", "error", "splits", "converged", "layer", "class_layer", "param", "iteration")


class RunWriter:
    """Writes one run file. Rows are buffered and flushed every ``flush_every`` rows.

    Args:
        path: run file to create (``<dir>/lca.h5`` if ``path`` is an existing directory).
        param_names: one name per trainable tensor, in the order of the flattened parameter vector.
        param_shapes: shape of each tensor (K = sum of their numels).
        param_layer: layer index of each tensor (into ``layer_names``).
        layer_names: aggregation layers, input to output.
        attrs: root attributes (config YAML, versions, device, data source, created, ...).
        per_param: store ``lca/param`` [T, K] float32.
        trajectory: store ``trajectory/theta`` [T+1, K] float32.
        n_classes: if set, store ``lca/class_layer`` [T, n_classes, n_layers] float64.
        flush_every: rows kept in memory (on the device, for tensors) between writes.
        expected_rows: expected T; sizes chunks so short runs stay small. Optional.
        overwrite: replace an existing file instead of refusing (a run file is never lost silently).
        background: write flushed rows from a writer thread. Rows held on a GPU then leave it by a
            non-blocking copy into pinned memory and the training thread never waits for the copy or
            the disk (for GPU runs; the file's contents are identical). A write error surfaces at the
            next flush or at ``close``, and the rows that failed are retried there.
        file_process: with ``background``, the writer thread hands each flush to a child process that
            does the HDF5 writes (:mod:`lca_lab.file_process`), so that h5py's calls never take the
            training process's GIL: where a GPU loop is bound by its Python thread (small nets), every
            GIL hand-over to a writer thread pauses the loop. The file's contents are identical.
        resume: continue an existing file instead of creating one: dataset name -> committed row count,
            as returned by :meth:`committed_rows` when a checkpoint was taken. Every resizable dataset
            is truncated to its count (rows written after the checkpoint are dropped), datasets created
            after it are deleted, ``status`` is set back to ``running``, and appends continue from there.
            ``attrs`` are then not written (the file keeps its own).
    """

    DEFER_CAST_BYTES = 64 << 20  # a flush's float32 per-parameter rows up to which their cast waits

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        param_names: Sequence[str],
        param_shapes: Sequence[Sequence[int]],
        param_layer: Sequence[int],
        layer_names: Sequence[str],
        attrs: Mapping[str, Any],
        per_param: bool = True,
        trajectory: bool = False,
        n_classes: int | None = None,
        flush_every: int = 50,
        expected_rows: int | None = None,
        overwrite: bool = False,
        background: bool = False,
        file_process: bool = False,
        resume: Mapping[str, int] | None = None,
    ) -> None:
        if not (len(param_names) == len(param_shapes) == len(param_layer)):
            raise ValueError("param_names, param_shapes and param_layer must have the same length")
        n_layers = len(layer_names)
        if any(not 0 <= int(i) < n_layers for i in param_layer):
            raise ValueError(f"param_layer entries must index layer_names (0..{n_layers - 1})")
        if flush_every < 1:
            raise ValueError("flush_every must be >= 1")
        self.path = resolve_path(path)
        self.param_names = [str(n) for n in param_names]
        self.param_shapes = [tuple(int(s) for s in shape) for shape in param_shapes]
        self.param_layer = [int(i) for i in param_layer]
        self.layer_names = [str(n) for n in layer_names]
        self.n_params = int(sum(math.prod(s) for s in self.param_shapes))
        self.n_layers = n_layers
        self.per_param = bool(per_param)
        self.trajectory = bool(trajectory)
        self.n_classes = int(n_classes) if n_classes else None
        self.flush_every = int(flush_every)
        # float64 per-parameter rows handed over fresh (copy=False) wait for the flush uncast when a
        # flush's worth of them is small: one cast kernel per flush instead of one per row.
        self._defer_cast = self.flush_every * self.n_params * 4 <= self.DEFER_CAST_BYTES
        self.expected_rows = expected_rows
        self._closed = False
        self._initial_written = False
        # Rows on disk per dataset group; train/loss and trajectory/theta share _n_loss (T+1 rows each).
        self._n_flushed = 0
        self._n_loss = 0
        self._n_eval = 0
        self._n_series: dict[str, int] = {}
        self._rows: dict[str, list[Any]] = {f: [] for f in _LCA_FIELDS}
        self._loss: list[Any] = []  # train/loss rows (row 0 from write_initial)
        self._theta: list[Any] = []  # trajectory/theta rows
        self._eval: list[tuple[int, dict[str, Any]]] = []
        self._series: dict[str, tuple[np.dtype | None, list[Any]]] = {}
        self._eval_names: set[str] = set(EVAL_NAMES)
        self._specs = self._row_specs()
        self._reserved = frozenset(self._specs)
        # datasets that exist in the file
        self._known: set[str] = {*self._reserved, "eval/iteration", *(f"eval/{n}" for n in EVAL_NAMES)}
        # Flushed rows not yet on disk, oldest first; a job leaves only once written (retry on failure).
        self._jobs: collections.deque[dict[str, Any]] = collections.deque()
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lca-writer") if background else None
        self._staging = _StagingPool() if background else None
        self._staged: set[str] = set()  # series whose staging buffers are reserved ("lca": the LCA rows)
        self._future: Future | None = None
        if resume is None:
            self._create(attrs, overwrite)
        else:
            self._reopen(resume)
        self._file_process: FileProcess | None = None
        if background and file_process:
            # shared memory for one flush's large rows (per-parameter LCA, the trajectory)
            wide = self.per_param + self.trajectory
            try:
                self._file_process = FileProcess(wide * (self.flush_every + 1) * self.n_params * 4)
            except OSError as err:  # no shared memory, no subprocess: the writer thread writes itself
                warnings.warn(f"{err}; the run file is written by the writer thread instead", stacklevel=2)

    # -- layout -------------------------------------------------------------------------------------------

    def _row_specs(self) -> dict[str, tuple[np.dtype, tuple[int, ...]]]:
        """Dataset name -> (dtype, row shape) of every per-row dataset of this run."""
        specs: dict[str, tuple[np.dtype, tuple[int, ...]]] = {
            "train/loss": (np.dtype("f8"), ()),
            "lca/total": (np.dtype("f8"), ()),
            "lca/error": (np.dtype("f8"), ()),
            "lca/splits": (np.dtype("i4"), ()),
            "lca/converged": (np.dtype("bool"), ()),
            "lca/layer": (np.dtype("f8"), (self.n_layers,)),
            "lca/iteration": (np.dtype("i8"), ()),
        }
        if self.n_classes:
            specs["lca/class_layer"] = (np.dtype("f8"), (self.n_classes, self.n_layers))
        if self.per_param:
            specs["lca/param"] = (np.dtype("f4"), (self.n_params,))
        if self.trajectory:
            specs["trajectory/theta"] = (np.dtype("f4"), (self.n_params,))
        return specs

    def _new_rows_dataset(
        self, f: h5py.File, name: str, dtype: np.dtype, row_shape: tuple[int, ...], fillvalue: Any = None
    ) -> None:
        f.create_dataset(
            name,
            shape=(0, *row_shape),
            maxshape=(None, *row_shape),
            dtype=dtype,
            chunks=_chunks(row_shape, dtype.itemsize, self.expected_rows),
            fillvalue=fillvalue,
        )

    def _create(self, attrs: Mapping[str, Any], overwrite: bool) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # The low bound v110 keeps the file readable by HDF5 >= 1.10 while allowing SWMR (superblock v3).
        with h5py.File(self.path, "w" if overwrite else "w-", libver=("v110", "latest"), locking=False) as f:
            for k, v in attrs.items():
                if v is not None:
                    f.attrs[k] = _as_attr(v)
            f.attrs["status"] = "running"
            f.attrs["per_param"] = self.per_param
            f.attrs["trajectory"] = self.trajectory
            f.attrs["layout_version"] = LAYOUT_VERSION
            f.create_dataset("params/names", data=np.array(self.param_names, dtype=object), dtype=_STR)
            shapes = np.array([str(s) for s in self.param_shapes], dtype=object)
            f.create_dataset("params/shapes", data=shapes, dtype=_STR)
            f.create_dataset("params/layer", data=np.array(self.param_layer, dtype=np.int64))
            f.create_dataset("layers/names", data=np.array(self.layer_names, dtype=object), dtype=_STR)
            # Every per-row dataset exists from the start: SWMR appends cannot create datasets, and the
            # plain open that creating one later needs is the one moment a kill leaves the file flagged.
            for name, (dtype, row_shape) in self._row_specs().items():
                self._new_rows_dataset(f, name, dtype, row_shape)
            self._new_rows_dataset(f, "eval/iteration", np.dtype("i8"), ())
            for name in EVAL_NAMES:
                self._new_rows_dataset(f, f"eval/{name}", np.dtype("f8"), (), fillvalue=np.nan)

    def _reopen(self, counts: Mapping[str, int]) -> None:
        """Truncate an existing run file to ``counts`` and take over its row offsets (see ``resume``)."""
        if not self.path.exists():
            raise FileNotFoundError(f"cannot resume {self.path}: the file does not exist")
        with _open_plain_write(self.path) as f:
            stored = {
                "params/names": [str(x) for x in f["params/names"].asstr()[()]],
                "params/shapes": [str(x) for x in f["params/shapes"].asstr()[()]],
                "layers/names": [str(x) for x in f["layers/names"].asstr()[()]],
            }
            mine = {
                "params/names": self.param_names,
                "params/shapes": [str(s) for s in self.param_shapes],
                "layers/names": self.layer_names,
            }
            for key, value in mine.items():
                if stored[key] != value:
                    raise ValueError(f"cannot resume {self.path}: its {key} differ from this run's")
            missing = [n for n in self._row_specs() if n not in f or n not in counts]
            if missing:
                raise ValueError(f"cannot resume {self.path}: no committed rows recorded for {missing}")
            resizable = list(_row_counts(f))
            for name in resizable:
                if name in counts:
                    if f[name].shape[0] < int(counts[name]):
                        raise ValueError(
                            f"cannot resume {self.path}: {name} has {f[name].shape[0]} rows, fewer than the "
                            f"{counts[name]} the checkpoint committed"
                        )
                    f[name].resize(int(counts[name]), axis=0)
                else:  # created after the checkpoint (e.g. end-of-run arrays): recreated by the rerun
                    del f[name]
            f.attrs["status"] = "running"
            self._known = {n for n in resizable if n in counts}
        self._n_flushed = int(counts["lca/iteration"])
        self._n_loss = int(counts["train/loss"])
        self._n_eval = int(counts.get("eval/iteration", 0))
        self._eval_names.update(n[len("eval/") :] for n in self._known if n.startswith("eval/"))
        self._eval_names.discard("iteration")
        self._n_series = {
            n: int(counts[n]) for n in self._known if n not in self._reserved and not n.startswith("eval/")
        }
        self._initial_written = self._n_loss > 0

    def committed_rows(self) -> dict[str, int]:
        """Flush, then return the row count of every resizable dataset in the file: what a checkpoint
        records so that :class:`RunWriter` with ``resume=`` can truncate the file back to this point."""
        self.flush()
        self._wait()  # with the writer thread: every queued row on disk before it is counted
        with h5py.File(self.path, "r", locking=False) as f:
            return _row_counts(f)

    # -- rows ---------------------------------------------------------------------------------------------

    @property
    def n_rows(self) -> int:
        """LCA rows appended so far (flushed or still buffered)."""
        return self._n_flushed + len(self._rows["iteration"])

    def write_initial(self, loss0: Any, theta0: Any = None) -> None:
        """Row 0 of ``train/loss`` (L(θ) before the first LCA row, scalar) and of ``trajectory/theta``
        (θ as a flat vector [K]; required when the writer stores the trajectory). Written at once."""
        self._check_open()
        if self._initial_written:
            raise RuntimeError("write_initial was already called")
        if self.trajectory:
            if theta0 is None:
                raise ValueError("theta0 is required when trajectory=True")
            _check_len("theta0", theta0, self.n_params)
            self._theta.append(_keep(_flat(theta0), torch.float32))
        self._loss.append(_keep(loss0))
        self._initial_written = True
        if self._staging is not None:  # train/loss and trajectory/theta: rows 0 here, then one per append
            self._stage("train/loss", self._loss[-1])
            if self.trajectory:
                self._stage("trajectory/theta", self._theta[-1])
        self.flush()

    def append(
        self,
        iteration: int,
        loss_next: Any,
        total: Any,
        error: Any,
        splits: Any,
        converged: Any,
        layer: Any,
        param: Any = None,
        theta_next: Any = None,
        class_layer: Any = None,
        copy: bool = True,
    ) -> None:
        """Buffer one LCA row: the step from θ_t to θ_{t+1} of training iteration ``iteration`` = t.

        Scalars (``loss_next`` = L(θ_{t+1}), ``total`` = Σ_i A[t, i], ``error`` = total − ΔL, ``splits``,
        ``converged``) and arrays (``layer`` [n_layers], ``param`` [K], ``theta_next`` [K],
        ``class_layer`` [n_classes, n_layers]) may be Python numbers, numpy arrays or tensors on any
        device; tensors are not synchronised until the flush. ``param`` is required with
        ``per_param``, ``theta_next`` with ``trajectory``, ``class_layer`` with ``n_classes``.
        ``copy=False``: the tensors are fresh and the caller will not modify them, so they are buffered
        as they are instead of copied. Those that need a cast to the stored dtype (float64 ``param`` or
        ``theta_next`` to float32) are cast at once (a copy), unless a flush's worth of them is at most
        ``DEFER_CAST_BYTES`` as float32: then they wait uncast and the flush casts them all in one kernel.
        """
        self._check_open()
        if not self._initial_written:
            raise RuntimeError("call write_initial(loss0, theta0) before the first append ")
        _check_len("layer", layer, self.n_layers)
        if self.per_param:
            if param is None:
                raise ValueError("param is required: the writer stores per-parameter LCA (per_param=True)")
            _check_len("param", param, self.n_params)
        if self.trajectory:
            if theta_next is None:
                raise ValueError("theta_next is required when trajectory=True")
            _check_len("theta_next", theta_next, self.n_params)
        if self.n_classes:
            if class_layer is None:
                raise ValueError("class_layer is required when n_classes is set")
            _check_len("class_layer", class_layer, self.n_classes * self.n_layers)
        r, defer = self._rows, self._defer_cast
        r["total"].append(_keep(total, copy=copy))
        r["error"].append(_keep(error, copy=copy))
        r["splits"].append(_keep(splits, copy=copy))
        r["converged"].append(_keep(converged, copy=copy))
        r["layer"].append(_keep(_flat(layer), copy=copy))
        if self.n_classes:
            r["class_layer"].append(_keep(_flat(class_layer), copy=copy))
        if self.per_param:
            r["param"].append(_keep(_flat(param), torch.float32, copy=copy, defer_cast=defer))
        r["iteration"].append(int(iteration))
        self._loss.append(_keep(loss_next, copy=copy))
        if self.trajectory:
            self._theta.append(_keep(_flat(theta_next), torch.float32, copy=copy, defer_cast=defer))
        if self._staging is not None and "lca" not in self._staged:
            self._staged.add("lca")
            for f in ("total", "error", "splits", "converged", "layer", "param", "class_layer"):
                if r[f]:
                    row = r[f][-1].reshape(self.n_classes, -1) if f == "class_layer" else r[f][-1]
                    self._stage(f"lca/{f}", row)
        if self._staging is not None and "train/loss" not in self._staged:  # row 0 may not have flown
            self._stage("train/loss", self._loss[-1])
            if self.trajectory:
                self._stage("trajectory/theta", self._theta[-1])
        if len(r["iteration"]) >= self.flush_every:
            self.flush()

    def append_eval(self, iteration: int, **scalars: Any) -> None:
        """Buffer one evaluation row: ``eval/iteration`` and one ``eval/<name>`` float64 per keyword
        (e.g. ``test_loss=…, test_acc=…``). Datasets appear on first use; rows missing a name hold NaN."""
        self._check_open()
        self._eval.append((int(iteration), {k: _keep(v) for k, v in scalars.items()}))
        if len(self._eval) >= self.flush_every:
            self.flush()

    def append_dataset(self, name: str, value: Any, dtype: Any = None, copy: bool = True) -> None:
        """Buffer one row of a free-form per-row series ``name`` (e.g. ``test/loss``); the row shape is
        taken from the first value, ``dtype`` defaults to the value's (float64 for Python floats);
        ``copy=False`` as in :meth:`append`."""
        self._check_open()
        if name in self._reserved or name.startswith(("eval/", "params/", "layers/")):
            raise ValueError(f"{name!r} is managed by the store; use append/append_eval")
        dt, rows = self._series.setdefault(name, (None if dtype is None else np.dtype(dtype), []))
        rows.append(_keep(value, copy=copy))
        if self._staging is not None and name not in self._staged:
            self._stage(name, rows[-1], dt)
        if len(rows) >= self.flush_every:
            self.flush()

    def _stage(self, name: str, row: Any, stored: Any = None) -> None:
        """At series ``name``'s first row that leaves a GPU: its staging buffers
        (:meth:`_StagingPool.reserve`), allocated now instead of in the training loop's flushes.
        ``stored``: the series' numpy dtype (default: the run file's, for the writer's own datasets)."""
        if _can_fly([row]):
            self._staged.add(name)
            stored = self._specs[name][0] if stored is None and name in self._specs else stored
            self._staging.reserve(tuple(row.shape), _staged_dtype(row.dtype, stored), self.flush_every)

    # -- flushing -----------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write every buffered row to the file and close it again (see the module doc on crash safety).

        Rows go to absolute offsets kept by the writer, so a flush that failed half-way (disk full) can
        simply be retried: it rewrites the same rows instead of appending them twice. With
        ``background=True`` the write happens in the writer thread and this returns at once; an error
        of an earlier background write is raised here (its rows stay queued for the next try).
        """
        if self._closed:
            return
        self._raise_background_error()
        job = self._take()
        if job is not None:
            self._jobs.append(job)
        if not self._jobs:
            return
        if self._pool is None:
            self._write_jobs()
        elif self._future is None or self._future.done():
            self._future = self._pool.submit(self._write_jobs)

    def _raise_background_error(self) -> None:
        if self._future is not None and self._future.done():
            fut, self._future = self._future, None
            fut.result()  # re-raises the writer thread's error; its job is still queued

    def _wait(self) -> None:
        """Wait until the writer thread is idle; re-raise its error, retrying the queued rows here."""
        if self._future is not None:
            fut, self._future = self._future, None
            try:
                fut.result()
            except Exception:
                pass  # retried synchronously below; a second failure propagates from there
        if self._jobs:
            self._write_jobs()

    def _take(self) -> dict[str, Any] | None:
        """Move the buffered rows into a write job with fixed file offsets; clear the buffers."""
        bg = self._staging
        lca = self._convert_lca(bg)
        loss = _stack(self._loss, np.float64, bg) if self._loss else None
        theta = _stack(self._theta, np.float32, bg) if self._theta else None
        evals = self._convert_eval()
        series = {k: _stack(rows, dt, bg) for k, (dt, rows) in self._series.items() if rows}
        if loss is None and not lca and not evals and not series:
            return None
        flights = [v for v in (*lca.values(), loss, theta, *series.values()) if isinstance(v, _InFlight)]
        job = {
            "lca": lca, "loss": loss, "theta": theta, "evals": evals, "series": series, "flights": flights,
            "n_lca": self._n_flushed, "n_loss": self._n_loss, "n_eval": self._n_eval,
            "n_series": {k: self._n_series.get(k, 0) for k in series},
        }  # fmt: skip
        self._n_flushed += len(self._rows["iteration"])
        self._n_loss += len(self._loss)
        self._n_eval += len(self._eval)
        for k, (_, rows) in self._series.items():
            if rows:
                self._n_series[k] = self._n_series.get(k, 0) + len(rows)
        for rows in self._rows.values():
            rows.clear()
        self._loss.clear()
        self._theta.clear()
        self._eval.clear()
        for _, rows in self._series.values():
            rows.clear()
        return job

    def _write_jobs(self) -> None:
        """Write queued jobs in order (writer thread or caller); a job is dropped only once written."""
        while self._jobs:
            self._write_job(self._jobs[0])
            job = self._jobs.popleft()
            for flight in job["flights"]:  # its rows are in the file: the staging buffers may be reused
                flight.release()

    def _write_job(self, job: dict[str, Any]) -> None:
        flights = job["flights"]
        if flights:  # copies queued in order on one stream: the last one's event covers them all
            flights[-1].wait()
            for flight in flights[:-1]:
                flight.event = None  # no second wait (each is a round trip of the GIL)
        for group in ("lca", "series"):
            job[group] = {k: _resolve(v) for k, v in job[group].items()}
        for k in ("loss", "theta"):
            job[k] = _resolve(job[k]) if job[k] is not None else None
        lca, evals, series = job["lca"], job["evals"], job["series"]
        self._create_missing(evals, series)
        writes: list[tuple[str, int, np.ndarray]] = []
        if job["loss"] is not None:
            writes.append(("train/loss", job["n_loss"], job["loss"]))
        if job["theta"] is not None:
            writes.append(("trajectory/theta", job["n_loss"], job["theta"]))
        writes += [(k, job["n_series"][k], arr) for k, arr in series.items()]
        # value series first: eval/iteration's length commits the rows
        writes += [(k, job["n_eval"], arr) for k, arr in evals.items() if k != "eval/iteration"]
        if evals:
            writes.append(("eval/iteration", job["n_eval"], evals["eval/iteration"]))
        # lca/iteration last: its length is the committed row count readers trust.
        writes += [(f"lca/{field}", job["n_lca"], lca[field]) for field in _LCA_FIELDS if field in lca]
        if self._file_process is not None:
            self._file_process.write(self.path, writes)
            return
        try:
            write_all(self.path, writes, _write_rows)
        except OSError as err:
            if "already open for read-only" not in str(err):
                raise
            raise RuntimeError(
                f"cannot flush {self.path}: this process holds it open read-only (a RunFile or h5py.File); "
                "HDF5 cannot also open it for writing in the same process. Close the reader first; "
                "the buffered rows are kept and the next flush writes them."
            ) from err

    def _convert_lca(self, in_flight: _StagingPool | None = None) -> dict[str, Any]:
        r = self._rows
        n = len(r["iteration"])
        if n == 0:
            return {}
        # Device scalars (train.py keeps Σ A on the GPU) leave it like the arrays: a blocking .cpu() here
        # would wait for every kernel queued so far, once per flush.
        fields = ("total", "error", "splits", "converged", "layer")
        out = {f: _stack(r[f], self._specs[f"lca/{f}"][0], in_flight) for f in fields}
        out["iteration"] = np.asarray(r["iteration"], dtype=np.int64)
        if self.n_classes:
            rows = [_flat(x).reshape(self.n_classes, -1) for x in r["class_layer"]]
            out["class_layer"] = _stack(rows, self._specs["lca/class_layer"][0], in_flight)
        if self.per_param:
            out["param"] = _stack(r["param"], self._specs["lca/param"][0], in_flight)
        return out

    def _convert_eval(self) -> dict[str, np.ndarray]:
        if not self._eval:
            return {}
        # Every eval series seen so far gets a value (NaN if absent) so all stay aligned with eval/iteration.
        self._eval_names.update(k for _, row in self._eval for k in row)
        names = sorted(self._eval_names)
        out = {"eval/iteration": np.asarray([it for it, _ in self._eval], dtype=np.int64)}
        for k in names:
            vals = [row.get(k, math.nan) for _, row in self._eval]
            out[f"eval/{k}"] = np.asarray([float(v) for v in vals], dtype=np.float64)
        return out

    def _create_missing(self, evals: Mapping[str, np.ndarray], series: Mapping[str, np.ndarray]) -> None:
        """Create datasets seen for the first time. SWMR cannot create objects, so this takes a brief
        plain open; it happens once per new name, not per flush."""
        new = {**evals, **series}
        missing = {k: (arr.dtype, arr.shape[1:]) for k, arr in new.items() if k not in self._known}
        if not missing:
            return
        with _open_plain_write(self.path) as f:
            # eval/iteration first, so that value series created later can be NaN-padded to its length.
            for k in sorted(missing, key=lambda k: k != "eval/iteration"):
                if k in f:  # created by an earlier flush that then failed
                    self._known.add(k)
                    continue
                dtype, row_shape = missing[k]
                is_value = k.startswith("eval/") and k != "eval/iteration"
                self._new_rows_dataset(f, k, dtype, tuple(row_shape), fillvalue=np.nan if is_value else None)
                if is_value:
                    f[k].resize(f["eval/iteration"].shape[0], axis=0)  # earlier eval rows lack k: NaN
                self._known.add(k)

    # -- attributes, arrays, closing ------------------------------------------------------------------------

    def set_attr(self, name: str, value: Any) -> None:
        """Set a root attribute now (e.g. a W&B run id)."""
        self._wait()
        with _open_plain_write(self.path) as f:
            f.attrs[name] = _as_attr(value)

    def set_status(self, status: str) -> None:
        """Set the ``status`` attribute (``running``, ``complete`` or ``failed: …``)."""
        self.set_attr("status", str(status))

    def write_array(self, name: str, array: Any) -> None:
        """Write a whole array once (e.g. ``data/train_index``), replacing an earlier one of that name."""
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        arr = np.asarray(array)
        self._wait()
        with _open_plain_write(self.path) as f:
            if name in f:
                del f[name]
            if arr.dtype.kind in "US" or arr.dtype == object:
                f.create_dataset(name, data=arr.astype(object), dtype=_STR)
            else:
                f.create_dataset(name, data=arr)

    def close(self, status: str = "complete") -> None:
        """Flush buffered rows, set ``status`` and stop accepting rows. Idempotent.

        If the final flush fails the status becomes ``failed: …`` instead, and the error propagates.
        """
        if self._closed:
            return
        try:
            self.flush()
            self._wait()  # every row on disk before the status says so
        except BaseException as err:
            self._jobs.clear()  # the status records the loss; do not retry the same failure again
            self._finish(f"failed: {type(err).__name__} while flushing: {err}")
            raise
        self._finish(status)

    def _finish(self, status: str) -> None:
        self._closed = True
        try:
            self.set_status(status)
        finally:
            if self._pool is not None:
                self._pool.shutdown(wait=True)
            if self._file_process is not None:
                self._file_process.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"RunWriter for {self.path} is closed")

    def __enter__(self) -> RunWriter:
        return self

    def __exit__(self, exc_type: Any, exc: BaseException | None, tb: Any) -> None:
        if exc_type is None:
            self.close("complete")
            return
        if self._closed:
            return
        status = f"failed: {exc_type.__name__}: {exc}"
        try:
            self.flush()  # nothing computed is lost, even on failure
            self._wait()
        except Exception as err:
            self._jobs.clear()  # keep the original exception; record that rows were lost too
            status += f" (flushing buffered rows failed too: {type(err).__name__}: {err})"
        self._finish(status)


# ----------------------------------------------------------------------------------------------------------
# reader


class MalformedRunFileError(ValueError):
    """A file that is not a run file, or whose names and shapes contradict each other."""


_SHAPE_RE = re.compile(r"\(\s*(\d+\s*(,\s*\d+\s*)*,?)?\)")
# Per-row datasets every run file has, with their number of dimensions.
_REQUIRED_ROWS = {
    "train/loss": 1,
    "lca/total": 1,
    "lca/error": 1,
    "lca/splits": 1,
    "lca/converged": 1,
    "lca/iteration": 1,
    "lca/layer": 2,
}


def check_layout(f: h5py.File, path: Path) -> None:
    """Raise :class:`MalformedRunFileError` unless the names and shapes in ``f`` fit together.

    Checked before any array is trusted: the name tables exist, are strings and have one entry per
    tensor; every shape parses; layer indices point into ``layers/names``; ``lca/param`` and
    ``trajectory/theta`` are K wide (K = the sum of the shapes' sizes), ``lca/layer`` is one column per
    layer, ``lca/class_layer`` is [T, n_classes, n_layers]; no per-row dataset has fewer rows than
    ``lca/iteration`` (written last), which must increase.
    """

    def bad(msg: str) -> MalformedRunFileError:
        return MalformedRunFileError(f"{path} is not a valid lca_lab run file: {msg}")

    for name in ("params/names", "params/shapes", "layers/names"):
        if name not in f or not isinstance(f[name], h5py.Dataset):
            raise bad(f"{name} is missing")
        if f[name].ndim != 1 or not h5py.check_string_dtype(f[name].dtype):
            raise bad(f"{name} must be a 1-D string dataset, found {f[name].ndim}-D {f[name].dtype}")
    if "params/layer" not in f or f["params/layer"].ndim != 1 or f["params/layer"].dtype.kind not in "iu":
        raise bad("params/layer is missing or not a 1-D integer dataset")
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
    K = int(sum(math.prod(_parse_shape(s)) for s in shapes))
    for name, ndim in _REQUIRED_ROWS.items():
        if name not in f or not isinstance(f[name], h5py.Dataset):
            raise bad(f"{name} is missing")
        if f[name].ndim != ndim:
            raise bad(f"{name} must be {ndim}-D, found shape {f[name].shape}")
    if f["lca/layer"].shape[1] != n_layers:
        raise bad(f"lca/layer has {f['lca/layer'].shape[1]} columns but layers/names has {n_layers} layers")
    for name in ("lca/param", "trajectory/theta"):
        if name in f and (f[name].ndim != 2 or f[name].shape[1] != K):
            raise bad(f"{name} has shape {f[name].shape}; its rows must be K = {K} wide (from params/shapes)")
    cl = f.get("lca/class_layer")
    if cl is not None and (cl.ndim != 3 or cl.shape[2] != n_layers):
        raise bad(f"lca/class_layer has shape {cl.shape}; expected [T, n_classes, {n_layers}]")
    T = f["lca/iteration"].shape[0]
    for name in ("lca/total", "lca/error", "lca/splits", "lca/converged", "lca/layer", "lca/param",
                 "lca/class_layer"):  # fmt: skip
        if name in f and f[name].shape[0] < T:
            raise bad(f"{name} has {f[name].shape[0]} rows but lca/iteration has {T}")
    for name in ("train/loss", "trajectory/theta"):
        if name in f and T and f[name].shape[0] < T + 1:
            raise bad(f"{name} has {f[name].shape[0]} rows; {T} LCA rows need {T + 1}")
    it = f["lca/iteration"][()]
    if T > 1 and not np.all(np.diff(it) > 0):
        raise bad("lca/iteration is not increasing")
    if "eval/iteration" in f:
        n_eval = f["eval/iteration"].shape[0]
        for name, ds in f["eval"].items():
            if not isinstance(ds, h5py.Dataset) or ds.ndim != 1 or ds.shape[0] < n_eval:
                raise bad(f"eval/{name} must be 1-D with at least the {n_eval} rows of eval/iteration")


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
        return {k: _from_attr(v) for k, v in self._f.attrs.items()}

    @property
    def status(self) -> str:
        return str(_from_attr(self._f.attrs.get("status", "unknown")))

    @property
    def is_complete(self) -> bool:
        return self.status == "complete"

    @property
    def config(self) -> str:
        """Resolved config as YAML text ("" if the writer stored none)."""
        return str(_from_attr(self._f.attrs.get("config", "")))

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
        return [_parse_shape(s) for s in self._strings("params/shapes")]

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
        n = self._f["lca/iteration"].shape[0]
        for name in (
            "lca/total",
            "lca/error",
            "lca/splits",
            "lca/converged",
            "lca/layer",
            "lca/class_layer",
            "lca/param",
        ):
            if name in self._f:
                n = min(n, self._f[name].shape[0])
        for name in ("train/loss", "trajectory/theta"):
            if name in self._f:
                n = min(n, self._f[name].shape[0] - 1)
        return max(n, 0)

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
                "rerun with store.per_param=true to keep it"
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
        n = self._f["eval/iteration"].shape[0]
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
