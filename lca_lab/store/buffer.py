"""Buffering of run-file rows between flushes, and their way off the device.

:class:`RowBuffer` keeps each appended row (a snapshot, on the row's own device) and, at a flush, turns
the rows into one :class:`Job`: a stacked array per dataset with the absolute row offset it goes to.
Rows held on a GPU leave it through :class:`InFlight` non-blocking copies into reusable pinned buffers
of a :class:`StagingPool`, so the training thread never waits for the copy; the job's writer resolves
them. Nothing here opens the file (see :mod:`.transport`).
"""

from __future__ import annotations

import collections
import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .layout import COMMIT, EVAL_ITERATION, Layout, write_order

LCA_ARGS = ("total", "error", "splits", "converged", "layer", "class_layer", "param")  # append()'s rows


# ----------------------------------------------------------------------------------------------------------
# one value


def keep(x: Any, dtype: torch.dtype | None = None, copy: bool = True, defer_cast: bool = False) -> Any:
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


def flat(x: Any) -> Any:
    """A row as a 1-D tensor or array (a view where possible)."""
    if isinstance(x, torch.Tensor):
        return x if x.dim() == 1 else x.reshape(-1)
    return np.asarray(x).reshape(-1)


def check_len(name: str, x: Any, n: int) -> None:
    """Shape check that reads only metadata (no device sync)."""
    size = x.numel() if isinstance(x, torch.Tensor) else np.size(x)
    if size != n:
        raise ValueError(f"{name} has {size} elements, expected {n}")


def to_numpy(x: Any) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.cpu()
        return (x.float() if x.dtype in (torch.bfloat16, torch.float16) else x).numpy()
    return np.asarray(x)


# ----------------------------------------------------------------------------------------------------------
# leaving the device


class StagingPool:
    """Host buffers (pinned where CUDA exists) that rows leave the GPU through, reused from flush to flush.

    Allocating pinned memory (``cudaHostAlloc``; on an H200, 13 calls of about 1.2 ms in a 300-iteration
    MNIST-FC profile, up to 18 ms for one flush's buffers) and freeing it (``cudaFreeHost``, which waits
    for the whole device) on the training thread at every flush was most of the run file's cost per
    iteration there. Buffers are kept per row shape and dtype and hold up to ``rows`` rows; a flush of
    n ≤ rows rows uses the first n (a run's first flush and its last are often shorter). :meth:`reserve`
    allocates them when a series' first row arrives, before the training loop needs them. A buffer comes
    back (``give``) only once the writer has written its rows to the file, so a later flush never
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


class InFlight:
    """Rows on their way from the GPU: a pinned host buffer (from a :class:`StagingPool`) filled by a
    non-blocking copy.

    ``resolve()`` (called by the writer thread) waits for the copy's CUDA event, never the training
    thread, and returns the numpy array (a view of the buffer); ``release()``, once those rows are in the
    file, returns the buffer to the pool.
    """

    def __init__(self, stacked: torch.Tensor, dtype: Any, pool: StagingPool) -> None:
        self.pool = pool
        self._buf: torch.Tensor | None
        self._buf, self.host = pool.take(tuple(stacked.shape), stacked.dtype)
        self.host.copy_(stacked, non_blocking=True)
        self.event = None
        if stacked.is_cuda:
            self.event = torch.cuda.Event()
            self.event.record()
        self.dtype = dtype
        self.rows = int(stacked.shape[0])

    def __len__(self) -> int:
        return self.rows

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


def can_fly(items: Sequence[Any]) -> bool:
    """Rows that leave by a non-blocking copy: all of them CUDA tensors."""
    return bool(items) and all(isinstance(x, torch.Tensor) and x.is_cuda for x in items)


def staged_dtype(dtype: torch.dtype, stored: Any) -> torch.dtype:
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


def stack(items: Sequence[Any], dtype: Any = None, in_flight: StagingPool | None = None) -> Any:
    """Stack buffered rows into one array ``[n, *row_shape]`` of ``dtype`` (None: the rows' own dtype).

    Device tensors are stacked on the device and moved with one ``.cpu()`` so a flush costs one
    synchronisation, not one per row and field. With a staging pool (``in_flight``) CUDA rows are not
    waited for at all: an :class:`InFlight` copy is returned for the writer thread to resolve.
    """
    if in_flight is not None and can_fly(items):
        try:
            stacked = torch.stack(list(items))
            return InFlight(stacked.to(staged_dtype(stacked.dtype, dtype)), dtype, in_flight)
        except RuntimeError:  # rows on different devices: fall through to the blocking path
            pass
    if items and all(isinstance(x, torch.Tensor) for x in items):
        try:
            stacked = to_numpy(torch.stack(list(items)))
        except RuntimeError:  # rows on different devices: move them one by one
            stacked = np.stack([to_numpy(x) for x in items])
    else:
        stacked = np.stack([to_numpy(x) for x in items])
    return np.ascontiguousarray(stacked, dtype=dtype)


# ----------------------------------------------------------------------------------------------------------
# one flush


@dataclass
class Job:
    """One flush's rows: ``arrays`` maps a dataset to its rows ``[n, *row shape]`` (numpy, or
    :class:`InFlight` until :meth:`resolve`), ``offsets`` to the file row its first row goes to. ``order``
    is the write order (value series before the dataset whose length commits them)."""

    arrays: dict[str, Any]
    offsets: dict[str, int]
    order: list[str]
    flights: list[InFlight] = field(default_factory=list)

    def resolve(self) -> list[tuple[str, int, np.ndarray]]:
        """Wait for the rows in flight (once) → the writes (dataset, first row, rows) in write order."""
        if self.flights:  # copies queued in order on one stream: the last one's event covers them all
            self.flights[-1].wait()
            for flight in self.flights[:-1]:
                flight.event = None  # no second wait (each is a round trip of the GIL)
        self.arrays = {k: v.resolve() if isinstance(v, InFlight) else v for k, v in self.arrays.items()}
        return [(k, self.offsets[k], self.arrays[k]) for k in self.order]

    def release(self) -> None:
        """The rows are in the file: their staging buffers may be reused."""
        for flight in self.flights:
            flight.release()


# ----------------------------------------------------------------------------------------------------------
# the buffer


def _counter(name: str) -> str:
    """The dataset whose row count gives ``name``'s next offset: rows of one group are written together
    (every lca/* row with its lca/iteration; θ_t with L(θ_t); each eval value with its eval/iteration, a
    series created later NaN-padded to it)."""
    if name.startswith("lca/"):
        return COMMIT
    if name.startswith("eval/"):
        return EVAL_ITERATION
    return "train/loss" if name == "trajectory/theta" else name


class RowBuffer:
    """Rows appended since the last flush, and the file offset every dataset's next row goes to.

    ``layout``: the run's per-row datasets; ``flush_every``: rows per flush (staging buffers hold that
    many); ``staging``: a pool for rows leaving a GPU without a wait (None: blocking copies at the flush);
    ``defer_cast``: float64 rows of float32 datasets handed over fresh wait uncast for the flush;
    ``offsets``: rows already in the file per dataset (a resumed run's, else none).
    """

    def __init__(self, layout: Layout, flush_every: int, staging: StagingPool | None = None,
                 defer_cast: bool = False, offsets: dict[str, int] | None = None) -> None:  # fmt: skip
        self.layout = layout
        self.specs = layout.specs()
        self.flush_every = flush_every
        self.staging = staging
        self.defer_cast = defer_cast
        self.offsets: dict[str, int] = dict(offsets or {})
        # lca/<name> and the two series with a row at θ_0: train/loss, trajectory/theta
        self.rows: dict[str, list[Any]] = {f: [] for f in (*LCA_ARGS, "iteration", "loss", "theta")}
        self.eval: list[tuple[int, dict[str, Any]]] = []
        self.series: dict[str, tuple[np.dtype | None, list[Any]]] = {}  # free-form: (stored dtype, rows)
        self.eval_names: set[str] = set()
        self._staged: set[str] = set()  # datasets whose staging buffers are reserved

    @property
    def n_lca(self) -> int:
        """LCA rows waiting for the next flush."""
        return len(self.rows["iteration"])

    # -- appending ----------------------------------------------------------------------------------------

    def add_initial(self, loss0: Any, theta0: Any) -> None:
        """Rows 0 of ``train/loss`` and (with the trajectory) ``trajectory/theta``."""
        if self.layout.trajectory:
            self.rows["theta"].append(keep(flat(theta0), torch.float32))
        self.rows["loss"].append(keep(loss0))
        self._stage_loss()

    def add_lca(self, iteration: int, loss_next: Any, theta_next: Any, copy: bool, **values: Any) -> None:
        """One LCA row (training iteration ``iteration``): ``values`` holds :data:`LCA_ARGS`, scalars
        ``total``, ``error`` (nats), ``splits``, ``converged`` and arrays ``layer`` [L], ``class_layer``
        [C, L] or [C·L] and ``param`` [K] (the last two only where the layout stores them); ``loss_next``
        = L(θ_{t+1}) (nats), ``theta_next`` [K] with the trajectory. ``copy``: see :func:`keep`."""
        r, lay = self.rows, self.layout
        for f in ("total", "error", "splits", "converged"):
            r[f].append(keep(values[f], copy=copy))
        r["layer"].append(keep(flat(values["layer"]), copy=copy))
        if lay.n_classes:
            r["class_layer"].append(keep(flat(values["class_layer"]), copy=copy))
        if lay.per_param:
            r["param"].append(
                keep(flat(values["param"]), torch.float32, copy=copy, defer_cast=self.defer_cast)
            )
        r["iteration"].append(int(iteration))
        r["loss"].append(keep(loss_next, copy=copy))
        if lay.trajectory:
            r["theta"].append(keep(flat(theta_next), torch.float32, copy=copy, defer_cast=self.defer_cast))
        if self.staging is not None and "lca" not in self._staged:
            self._staged.add("lca")
            for f in LCA_ARGS:
                if r[f]:
                    row = r[f][-1].reshape(lay.n_classes, -1) if f == "class_layer" else r[f][-1]
                    self._stage(f"lca/{f}", row)
        self._stage_loss()  # row 0 may not have flown

    def add_eval(self, iteration: int, scalars: dict[str, Any]) -> None:
        """One evaluation row: ``eval/<name>`` float64 scalars at training iteration ``iteration``."""
        self.eval.append((int(iteration), {k: keep(v) for k, v in scalars.items()}))

    def add_series(self, name: str, value: Any, dtype: Any, copy: bool) -> None:
        """One row of the free-form series ``name`` (any row shape; ``dtype``: stored numpy dtype, None:
        the rows' own)."""
        dt, rows = self.series.setdefault(name, (None if dtype is None else np.dtype(dtype), []))
        rows.append(keep(value, copy=copy))
        self._stage(name, rows[-1], dt)

    def _stage_loss(self) -> None:
        if self.staging is not None and "train/loss" not in self._staged:
            self._stage("train/loss", self.rows["loss"][-1])
            if self.layout.trajectory:
                self._stage("trajectory/theta", self.rows["theta"][-1])

    def _stage(self, name: str, row: Any, stored: Any = None) -> None:
        """At dataset ``name``'s first row that leaves a GPU: its staging buffers
        (:meth:`StagingPool.reserve`), allocated now instead of in the training loop's flushes.
        ``stored``: the series' numpy dtype (default: the run file's, for the writer's own datasets)."""
        if self.staging is None or name in self._staged or not can_fly([row]):
            return
        self._staged.add(name)
        stored = self.specs[name][0] if stored is None and name in self.specs else stored
        self.staging.reserve(tuple(row.shape), staged_dtype(row.dtype, stored), self.flush_every)

    # -- flushing -----------------------------------------------------------------------------------------

    def take(self) -> Job | None:
        """Move the buffered rows into a :class:`Job` with fixed file offsets; clear the buffers."""
        bg, r = self.staging, self.rows
        arrays: dict[str, Any] = {}
        if r["loss"]:
            arrays["train/loss"] = stack(r["loss"], np.float64, bg)
        if r["theta"]:
            arrays["trajectory/theta"] = stack(r["theta"], np.float32, bg)
        arrays.update({k: stack(rows, dt, bg) for k, (dt, rows) in self.series.items() if rows})
        evals = self._eval_arrays()
        arrays.update({k: v for k, v in evals.items() if k != EVAL_ITERATION})  # values before their commit
        if evals:
            arrays[EVAL_ITERATION] = evals[EVAL_ITERATION]
        arrays.update(self._lca_arrays())  # lca/iteration last: its length is the committed row count
        if not arrays:
            return None
        offsets = {k: self.offsets.get(_counter(k), 0) for k in arrays}
        self.offsets.update({_counter(k): offsets[k] + len(v) for k, v in arrays.items()})
        flights = [v for v in arrays.values() if isinstance(v, InFlight)]
        for rows in (*r.values(), self.eval, *(rows for _, rows in self.series.values())):
            rows.clear()
        return Job(arrays, offsets, list(arrays), flights)

    def _lca_arrays(self) -> dict[str, Any]:
        r = self.rows
        if not r["iteration"]:
            return {}
        # Device scalars (train.py keeps Σ A on the GPU) leave it like the arrays: a blocking .cpu() here
        # would wait for every kernel queued so far, once per flush.
        out = {}
        for name in write_order(self.specs):
            f = name[len("lca/") :]
            if name == COMMIT:
                out[name] = np.asarray(r["iteration"], dtype=np.int64)
            else:
                rows = (
                    [flat(x).reshape(self.layout.n_classes, -1) for x in r[f]] if f == "class_layer" else r[f]
                )
                out[name] = stack(rows, self.specs[name][0], self.staging)
        return out

    def _eval_arrays(self) -> dict[str, np.ndarray]:
        if not self.eval:
            return {}
        # Every eval series seen so far gets a value (NaN if absent) so all stay aligned with eval/iteration.
        self.eval_names.update(k for _, row in self.eval for k in row)
        out = {EVAL_ITERATION: np.asarray([it for it, _ in self.eval], dtype=np.int64)}
        for k in sorted(self.eval_names):
            vals = [row.get(k, math.nan) for _, row in self.eval]
            out[f"eval/{k}"] = np.asarray([float(v) for v in vals], dtype=np.float64)
        return out
