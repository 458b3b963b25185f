"""The run file's writer process: HDF5 writes outside the training process, so they never take its GIL.

h5py 3.16 releases the GIL around its HDF5 calls, so a writer *thread* hands the GIL back and forth with
the training thread at every call (a flush of the run file's ~10 per-row datasets makes dozens of them).
Where the training loop is bound by the host (small nets on a GPU: the loop is the Python thread
launching kernels), each hand-over is a pause of that thread. Here the training process's writer thread
only copies the large arrays into a shared arena (``numpy.copyto``, one GIL release) and sends the list of
writes down a pipe; this process opens the file in SWMR mode, writes, closes it and answers.
``python -m lca_lab.bench --writer-pauses --writer both`` measures what each way costs a busy Python loop
per flush of MNIST-FC's 50 rows: 13.4 ms with the writer thread against 0.9 ms with this process on a
2-core VM, 7.2 against 4.9 ms on an H200's host (2026-11-27; README, run F).

Protocol (pickle over the child's stdin/stdout): a request is ``(path, [(dataset, row offset, array)])``
where an array is a numpy array or ``("arena", byte offset, dtype str, shape)``, written in list order;
the answer is ``None`` or the exception raised. ``None`` as a request ends the process, as does the end
of its stdin (the training process died). The child ignores SIGINT, SIGTERM, SIGHUP, SIGUSR1 and SIGUSR2:
a Ctrl-C or a preemption signal is the training process's to handle, and that process still needs its
writer to save the rows it holds.

This module imports numpy and h5py only (no torch): the child starts in a fraction of a second.
"""

from __future__ import annotations

import mmap
import os
import pickle
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import NoReturn

import h5py
import numpy as np

# Arrays below this size travel inside the request (pickled); larger ones through the arena.
INLINE_BYTES = 64 << 10
_ALIGN = 64


def open_swmr_write(path: str | os.PathLike) -> h5py.File:
    """Open an existing run file for appending, directly in SWMR-write mode.

    Opening with ``ACC_SWMR_WRITE`` (rather than ``r+`` then ``swmr_mode = True``) marks the file as
    SWMR-written from the first byte written, so there is no instant at which a kill leaves the file
    flagged as a plain, possibly inconsistent write. File locking is off because a reader that holds
    the file open (a notebook) must never make the training run fail at its next flush.
    """
    fapl = h5py.h5p.create(h5py.h5p.FILE_ACCESS)
    fapl.set_libver_bounds(h5py.h5f.LIBVER_V110, h5py.h5f.LIBVER_LATEST)
    fapl.set_file_locking(False, True)
    # No chunk cache: every flush writes whole new rows, so caching chunks only adds a memcpy (and a
    # read-modify-write of partly filled chunks); uncached uncompressed chunks are written in place.
    fapl.set_cache(0, 0, 0, 0.75)
    fid = h5py.h5f.open(os.fsencode(path), h5py.h5f.ACC_RDWR | h5py.h5f.ACC_SWMR_WRITE, fapl=fapl)
    return h5py.File(fid)


def write_rows(ds: h5py.Dataset, offset: int, arr: np.ndarray) -> None:
    """Write ``arr`` as rows ``offset:offset+len(arr)`` of ``ds``, growing it as needed."""
    end = offset + arr.shape[0]
    if ds.shape[0] < end:
        ds.resize(end, axis=0)
    # Slabs of ≤ 8 MB: a writer thread must not keep the training thread from launching kernels for longer
    # than one slab takes where h5py holds the GIL during a write (older h5py builds; 3.16 releases it).
    row_bytes = max(arr[:1].nbytes, 1)
    step = max(1, (8 << 20) // row_bytes)
    for s0 in range(0, arr.shape[0], step):
        ds[offset + s0 : min(offset + s0 + step, end)] = arr[s0 : s0 + step]


def write_all(
    path: str | os.PathLike,
    writes: Sequence[tuple[str, int, np.ndarray]],
    rows: Callable[[h5py.Dataset, int, np.ndarray], None] = write_rows,
) -> None:
    """One SWMR open of ``path``, the ``writes`` (dataset name, first row, rows) in order, one close."""
    with open_swmr_write(path) as f:
        for name, offset, arr in writes:
            rows(f[name], offset, arr)


# ----------------------------------------------------------------------------------------------------------
# the child


def _as_sendable(err: BaseException) -> BaseException:
    try:
        pickle.loads(pickle.dumps(err))
        return err
    except Exception:
        return RuntimeError(f"{type(err).__name__}: {err}")


def main(arena_fd: int, arena_bytes: int) -> None:
    """The child's loop (``python -c`` entry, see :class:`FileProcess`)."""
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, signal.SIG_IGN)
    requests = sys.stdin.buffer
    answers = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)  # stray prints (HDF5's error stack, warnings) go to stderr, never into the protocol
    arena = mmap.mmap(arena_fd, arena_bytes) if arena_bytes else None
    while True:
        try:
            request = pickle.load(requests)
        except EOFError:
            return
        if request is None:
            return
        path, items = request
        answer: BaseException | None = None
        try:
            writes = []
            for name, offset, arr in items:
                if isinstance(arr, tuple):
                    _, start, dtype, shape = arr
                    arr = np.ndarray(shape, np.dtype(dtype), buffer=arena, offset=start)
                writes.append((name, offset, arr))
            write_all(path, writes)
        except BaseException as err:  # noqa: BLE001 - every failure goes back to the training process
            answer = _as_sendable(err)
        pickle.dump(answer, answers)
        answers.flush()


# ----------------------------------------------------------------------------------------------------------
# the training process's side


class FileProcess:
    """A child process that writes run-file rows: :meth:`write` sends one flush and waits for it.

    Called from one thread at a time (the run writer's thread). ``arena_bytes``: shared memory for the
    arrays of one flush (per-parameter rows, the trajectory); it is created anonymous (unlinked at once
    from ``/dev/shm`` or the temp dir, so a killed run leaves nothing behind) and reserved with
    ``posix_fallocate``, so a full ``/dev/shm`` is an error here, not a SIGBUS later. A flush that needs
    more starts a new child with a bigger arena. If the child dies, :meth:`write` raises and the next
    call starts a new one: the caller keeps the rows and retries.
    """

    def __init__(self, arena_bytes: int) -> None:
        self._proc: subprocess.Popen | None = None
        self._arena: mmap.mmap | None = None
        self._fd = -1
        self._size = 0
        self._want = max(int(arena_bytes), 0)
        self._start(self._want)

    @property
    def pid(self) -> int | None:
        return None if self._proc is None else self._proc.pid

    def _start(self, size: int) -> None:
        self.close()
        size = -(-size // mmap.PAGESIZE) * mmap.PAGESIZE
        if size:
            shm = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
            fd, name = tempfile.mkstemp(prefix="lca-arena-", dir=shm)
            os.unlink(name)
            try:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, size)
                else:
                    os.ftruncate(fd, size)
                self._arena = mmap.mmap(fd, size)
            except OSError as err:
                os.close(fd)
                where = shm or tempfile.gettempdir()
                raise OSError(
                    err.errno,
                    f"cannot reserve {size / 2**20:.1f} MiB of shared memory in {where} "
                    f"for the run file's writer process ({err.strerror}); free space there, or lower "
                    "store.flush_every",
                ) from err
            self._fd = fd
        self._size = size
        root = str(Path(__file__).resolve().parents[1])
        code = (
            f"import sys; sys.path.insert(0, {root!r}); from lca_lab.file_process import main; "
            f"main({self._fd}, {size})"
        )
        self._proc = subprocess.Popen(
            [sys.executable, "-c", code],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            pass_fds=(self._fd,) if size else (),
            start_new_session=True,  # a terminal's Ctrl-C goes to the training process only
        )

    def write(self, path: str | os.PathLike, writes: Sequence[tuple[str, int, np.ndarray]]) -> None:
        """Write ``writes`` (dataset name, first row, rows) to ``path`` in order, in the child; raise what
        the child raised (the rows are then not, or not all, on disk: the caller retries them)."""
        big = [np.ascontiguousarray(a) for _, _, a in writes]
        starts, need = [], 0
        for a in big:
            if a.nbytes >= INLINE_BYTES:
                starts.append(need)
                need += -(-a.nbytes // _ALIGN) * _ALIGN
            else:
                starts.append(None)
        if self._proc is not None and self._proc.poll() is not None:
            # Died between flushes (killed, out of memory): say so, as when it dies during a write,
            # rather than replace it unnoticed; the caller keeps the rows for the next flush.
            self._raise_exited(self._proc, path, None)
        if need > self._size or self._proc is None:
            self._start(max(need, self._want))
        items = []
        for (name, offset, _), a, start in zip(writes, big, starts, strict=True):
            if start is None:
                items.append((name, offset, a))
            else:
                view = np.ndarray(a.shape, a.dtype, buffer=self._arena, offset=start)
                np.copyto(view, a)  # releases the GIL for large arrays
                items.append((name, offset, ("arena", start, a.dtype.str, a.shape)))
        proc = self._proc
        assert proc is not None and proc.stdin is not None and proc.stdout is not None
        try:
            pickle.dump((os.fspath(path), items), proc.stdin)
            proc.stdin.flush()
            answer = pickle.load(proc.stdout)
        except (BrokenPipeError, EOFError, OSError) as err:
            self._raise_exited(proc, path, err)
        if answer is not None:
            raise answer

    def _raise_exited(
        self, proc: subprocess.Popen, path: str | os.PathLike, err: BaseException | None
    ) -> NoReturn:
        """Free the dead child's resources and raise the error a flush reports (its rows stay queued)."""
        code = proc.poll()
        self.close()
        raise RuntimeError(
            f"the run file's writer process (pid {proc.pid}) exited"
            + (f" with code {code}" if code is not None else "")
            + f" before writing to {path}; the rows are kept and the next flush starts a new one"
        ) from err

    def close(self) -> None:
        """End the child (it finishes the write in progress) and free the arena. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                if proc.poll() is None and proc.stdin is not None:
                    pickle.dump(None, proc.stdin)
                    proc.stdin.flush()
            except OSError:
                pass
            for stream in (proc.stdin, proc.stdout):
                if stream is not None:
                    try:
                        stream.close()
                    except OSError:
                        pass
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._arena is not None:
            self._arena.close()
            self._arena = None
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        self._size = 0

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass
