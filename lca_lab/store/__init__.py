"""The HDF5 run file: a buffered, crash-tolerant writer and a read-only reader.

In layers: :mod:`.layout` describes every dataset once (names, dtypes, row shapes, when present) and
checks files against it; :mod:`.buffer` holds rows between flushes and takes them off the device;
:mod:`.transport` takes a flush's rows to the file (inline, writer thread, or a child process:
:mod:`lca_lab.file_process`); :mod:`.files` creates, truncates and annotates the file; :mod:`.writer`
(:class:`RunWriter`) composes them; :mod:`.reader` (:class:`RunFile`) reads.

One file per run, ``<run dir>/lca.h5``. The layout is a contract other tools read (see
``shared/design.md``); every name below is fixed once written
(the table of per-row datasets is :data:`.layout.SERIES`).

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

from .buffer import InFlight, RowBuffer, StagingPool
from .files import set_attrs
from .layout import (
    EVAL_NAMES,
    FILE_NAME,
    LAYOUT_VERSION,
    SERIES,
    Layout,
    MalformedRunFileError,
    Series,
    check_layout,
    estimate_bytes,
    resolve_path,
)
from .reader import NotStoredError, RunFile, open_run
from .transport import Inline, Sink, WriterThread
from .writer import RunWriter

__all__ = [
    "EVAL_NAMES",
    "FILE_NAME",
    "LAYOUT_VERSION",
    "SERIES",
    "InFlight",
    "Inline",
    "Layout",
    "MalformedRunFileError",
    "NotStoredError",
    "RowBuffer",
    "RunFile",
    "RunWriter",
    "Series",
    "Sink",
    "StagingPool",
    "WriterThread",
    "check_layout",
    "estimate_bytes",
    "open_run",
    "resolve_path",
    "set_attrs",
]
