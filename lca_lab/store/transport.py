"""How flushed rows reach the run file: written on the caller's thread, by a writer thread, or (from that
thread) by a child process.

:class:`Sink` is the file: it creates datasets seen for the first time and writes a :class:`~.buffer.Job`
with one SWMR open, in this process (h5py) or in a :class:`~lca_lab.file_process.FileProcess`.
:class:`Inline` and :class:`WriterThread` queue jobs and hand them to a sink; a job leaves the queue only
once written, so a failed write is retried with the next flush. Both take an ``on_write`` hook (wall time
of each run of the writer, in seconds: what ``bench --writer-pauses`` measures).
"""

from __future__ import annotations

import collections
import time
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..file_process import FileProcess, write_all, write_rows
from .buffer import Job
from .files import new_rows_dataset, open_plain_write
from .layout import EVAL_ITERATION


class Sink:
    """The run file's side of a flush: ``path``, the datasets it holds (``known``), how rows are written.

    ``process``: a child process doing the HDF5 calls (None: this process). Called from one thread at a
    time (the caller's or the writer thread).
    """

    def __init__(self, path: Path, known: set[str], expected_rows: int | None,
                 process: FileProcess | None = None) -> None:  # fmt: skip
        self.path = path
        self.known = known
        self.expected_rows = expected_rows
        self.process = process

    def write(self, job: Job) -> None:
        writes = job.resolve()
        self._create_missing({name: arr for name, _, arr in writes})
        if self.process is not None:
            self.process.write(self.path, writes)
            return
        try:
            write_all(self.path, writes, write_rows)
        except OSError as err:
            if "already open for read-only" not in str(err):
                raise
            raise RuntimeError(
                f"cannot flush {self.path}: this process holds it open read-only (a RunFile or h5py.File); "
                "HDF5 cannot also open it for writing in the same process. Close the reader first; "
                "the buffered rows are kept and the next flush writes them."
            ) from err

    def _create_missing(self, arrays: Mapping[str, np.ndarray]) -> None:
        """Create datasets seen for the first time. SWMR cannot create objects, so this takes a brief
        plain open; it happens once per new name, not per flush."""
        missing = {k: (arr.dtype, arr.shape[1:]) for k, arr in arrays.items() if k not in self.known}
        if not missing:
            return
        with open_plain_write(self.path) as f:
            # eval/iteration first, so that value series created later can be NaN-padded to its length.
            for k in sorted(missing, key=lambda k: k != EVAL_ITERATION):
                if k in f:  # created by an earlier flush that then failed
                    self.known.add(k)
                    continue
                dtype, row_shape = missing[k]
                is_value = k.startswith("eval/") and k != EVAL_ITERATION
                new_rows_dataset(f, k, dtype, tuple(row_shape), self.expected_rows,
                                 fillvalue=np.nan if is_value else None)  # fmt: skip
                if is_value:
                    f[k].resize(f[EVAL_ITERATION].shape[0], axis=0)  # earlier eval rows lack k: NaN
                self.known.add(k)

    def close(self) -> None:
        if self.process is not None:
            self.process.close()


class Inline:
    """Jobs written at once, on the caller's thread (CPU runs: nothing to overlap).

    ``pending``: jobs not yet (completely) written, oldest first; ``on_write(seconds)``, if set, is called
    after each run of the writer with its wall time.
    """

    def __init__(self, sink: Sink) -> None:
        self.sink = sink
        self.pending: collections.deque[Job] = collections.deque()
        self.on_write: Callable[[float], None] | None = None

    def submit(self, job: Job | None) -> None:
        """Queue ``job`` (None: nothing new) and write what is queued."""
        if job is not None:
            self.pending.append(job)
        if self.pending:
            self._write_pending()

    def _write_pending(self) -> None:
        """Write queued jobs in order; a job leaves the queue only once written (retried on failure)."""
        t0 = time.perf_counter()
        while self.pending:
            self.sink.write(self.pending[0])
            self.pending.popleft().release()  # its rows are in the file: staging buffers may be reused
        if self.on_write is not None:
            self.on_write(time.perf_counter() - t0)

    def raise_error(self) -> None:
        """Re-raise an error of an earlier background write (none here: errors raise in :meth:`submit`)."""

    def wait(self) -> None:
        """Return once every queued job is in the file (retrying failed ones here)."""
        if self.pending:
            self._write_pending()

    def drop(self) -> None:
        """Forget the queued jobs (their loss is recorded elsewhere: a failed status)."""
        self.pending.clear()

    def close(self) -> None:
        self.sink.close()


class WriterThread(Inline):
    """Jobs written by a writer thread, so the training thread never waits for the disk (GPU runs).

    An error of the thread surfaces at the next :meth:`submit` (or :meth:`wait`), its job still queued.
    """

    def __init__(self, sink: Sink) -> None:
        super().__init__(sink)
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="lca-writer")
        self.future: Future | None = None

    def submit(self, job: Job | None) -> None:
        if job is not None:
            self.pending.append(job)
        if self.pending and (self.future is None or self.future.done()):
            self.future = self._pool.submit(self._write_pending)

    def raise_error(self) -> None:
        if self.future is not None and self.future.done():
            fut, self.future = self.future, None
            fut.result()  # re-raises the writer thread's error; its job is still queued

    def wait(self) -> None:
        """Wait until the thread is idle; a job it failed to write is retried here (a second failure
        propagates)."""
        if self.future is not None:
            fut, self.future = self.future, None
            try:
                fut.result()
            except Exception:
                pass
        super().wait()

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        super().close()


def open_transport(path: Path, known: set[str], expected_rows: int | None, *, background: bool,
                   file_process: bool, arena_bytes: int) -> Inline:  # fmt: skip
    """The transport for a writer: :class:`Inline`, or :class:`WriterThread` (``background``) whose sink
    writes through a child process (``file_process``; ``arena_bytes`` of shared memory for one flush's
    wide rows). Without shared memory or a subprocess the thread writes itself (a warning says so)."""
    process = None
    if background and file_process:
        try:
            process = FileProcess(arena_bytes)
        except OSError as err:
            warnings.warn(f"{err}; the run file is written by the writer thread instead", stacklevel=3)
    sink = Sink(path, known, expected_rows, process)
    return WriterThread(sink) if background else Inline(sink)
