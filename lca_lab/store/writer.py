""":class:`RunWriter`: the run file's writer, a facade over the layout (:mod:`.layout`), the row buffer
(:mod:`.buffer`) and the transport that takes flushed rows to the file (:mod:`.transport`)."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .buffer import RowBuffer, StagingPool, check_len
from .files import create_file, read_row_counts, reopen_file, set_attrs, write_array
from .layout import Layout, resolve_path
from .transport import open_transport


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

    Pieces: ``layout`` (:class:`~.layout.Layout`), ``buffer`` (:class:`~.buffer.RowBuffer`), ``transport``
    (:class:`~.transport.Inline` or :class:`~.transport.WriterThread`, with its ``sink``).
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
        if any(not 0 <= int(i) < len(layer_names) for i in param_layer):
            raise ValueError(f"param_layer entries must index layer_names (0..{len(layer_names) - 1})")
        if flush_every < 1:
            raise ValueError("flush_every must be >= 1")
        self.path = resolve_path(path)
        self.param_names = [str(n) for n in param_names]
        self.param_shapes = [tuple(int(s) for s in shape) for shape in param_shapes]
        self.param_layer = [int(i) for i in param_layer]
        self.layer_names = [str(n) for n in layer_names]
        self.n_params = int(sum(math.prod(s) for s in self.param_shapes))
        self.n_layers = len(self.layer_names)
        self.per_param = bool(per_param)
        self.trajectory = bool(trajectory)
        self.n_classes = int(n_classes) if n_classes else None
        self.flush_every = int(flush_every)
        self.expected_rows = expected_rows
        self.layout = Layout(self.n_params, self.n_layers, self.n_classes, self.per_param, self.trajectory)
        self._closed = False
        offsets = self._open(attrs, overwrite, resume)
        self._initial_written = offsets.get("train/loss", 0) > 0
        # float64 per-parameter rows handed over fresh (copy=False) wait for the flush uncast when a
        # flush's worth of them is small: one cast kernel per flush instead of one per row.
        defer = self.flush_every * self.n_params * 4 <= self.DEFER_CAST_BYTES
        staging = StagingPool() if background else None
        self.buffer = RowBuffer(self.layout, self.flush_every, staging, defer, offsets)
        # eval series the file holds: a later eval row without one of them writes NaN there
        self.buffer.eval_names.update({n[len("eval/") :] for n in self._known if n.startswith("eval/")})
        self.buffer.eval_names.discard("iteration")
        # shared memory for one flush's large rows (per-parameter LCA, the trajectory)
        arena = (self.per_param + self.trajectory) * (self.flush_every + 1) * self.n_params * 4
        self.transport = open_transport(self.path, self._known, expected_rows, background=background,
                                        file_process=file_process, arena_bytes=arena)  # fmt: skip

    # -- the file -----------------------------------------------------------------------------------------

    def _open(self, attrs: Mapping[str, Any], overwrite: bool, resume: Mapping[str, int] | None) -> dict:
        """Create the file, or truncate it for ``resume`` → rows already in it per dataset (offsets)."""
        tables = {"params/names": self.param_names, "params/shapes": [str(s) for s in self.param_shapes],
                  "params/layer": self.param_layer, "layers/names": self.layer_names}  # fmt: skip
        if resume is None:
            self._known = create_file(self.path, self.layout, tables, attrs, overwrite, self.expected_rows)
            return {}
        self._known = reopen_file(self.path, self.layout, tables, resume)
        return {n: int(resume[n]) for n in self._known}

    def committed_rows(self) -> dict[str, int]:
        """Flush, then return the row count of every resizable dataset in the file: what a checkpoint
        records so that :class:`RunWriter` with ``resume=`` can truncate the file back to this point."""
        self.flush()
        self.wait()  # with the writer thread: every queued row on disk before it is counted
        return read_row_counts(self.path)

    # -- rows ---------------------------------------------------------------------------------------------

    @property
    def n_rows(self) -> int:
        """LCA rows appended so far (flushed or still buffered)."""
        return self.buffer.offsets.get("lca/iteration", 0) + self.buffer.n_lca

    def write_initial(self, loss0: Any, theta0: Any = None) -> None:
        """Row 0 of ``train/loss`` (L(θ) before the first LCA row, scalar) and of ``trajectory/theta``
        (θ as a flat vector [K]; required when the writer stores the trajectory). Written at once."""
        self._check_open()
        if self._initial_written:
            raise RuntimeError("write_initial was already called")
        if self.trajectory:
            if theta0 is None:
                raise ValueError("theta0 is required when trajectory=True")
            check_len("theta0", theta0, self.n_params)
        self.buffer.add_initial(loss0, theta0)
        self._initial_written = True
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
        self._check_row(layer, param, theta_next, class_layer)
        values = {"total": total, "error": error, "splits": splits, "converged": converged, "layer": layer,
                  "param": param, "class_layer": class_layer}  # fmt: skip
        self.buffer.add_lca(iteration, loss_next, theta_next, copy, **values)
        if self.buffer.n_lca >= self.flush_every:
            self.flush()

    def _check_row(self, layer: Any, param: Any, theta_next: Any, class_layer: Any) -> None:
        """Every array the layout stores is given, with its number of elements (metadata only)."""
        check_len("layer", layer, self.n_layers)
        if self.per_param:
            if param is None:
                raise ValueError("param is required: the writer stores per-parameter LCA (per_param=True)")
            check_len("param", param, self.n_params)
        if self.trajectory:
            if theta_next is None:
                raise ValueError("theta_next is required when trajectory=True")
            check_len("theta_next", theta_next, self.n_params)
        if self.n_classes:
            if class_layer is None:
                raise ValueError("class_layer is required when n_classes is set")
            check_len("class_layer", class_layer, self.n_classes * self.n_layers)

    def append_eval(self, iteration: int, **scalars: Any) -> None:
        """Buffer one evaluation row: ``eval/iteration`` and one ``eval/<name>`` float64 per keyword
        (e.g. ``test_loss=…, test_acc=…``). Datasets appear on first use; rows missing a name hold NaN."""
        self._check_open()
        self.buffer.add_eval(iteration, scalars)
        if len(self.buffer.eval) >= self.flush_every:
            self.flush()

    def append_dataset(self, name: str, value: Any, dtype: Any = None, copy: bool = True) -> None:
        """Buffer one row of a free-form per-row series ``name`` (e.g. ``test/loss``); the row shape is
        taken from the first value, ``dtype`` defaults to the value's (float64 for Python floats);
        ``copy=False`` as in :meth:`append`."""
        self._check_open()
        if name in self.layout.specs() or name.startswith(("eval/", "params/", "layers/")):
            raise ValueError(f"{name!r} is managed by the store; use append/append_eval")
        self.buffer.add_series(name, value, dtype, copy)
        if len(self.buffer.series[name][1]) >= self.flush_every:
            self.flush()

    # -- flushing -----------------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write every buffered row to the file and close it again (see the package doc on crash safety).

        Rows go to absolute offsets kept by the buffer, so a flush that failed half-way (disk full) can
        simply be retried: it rewrites the same rows instead of appending them twice. With
        ``background=True`` the write happens in the writer thread and this returns at once; an error
        of an earlier background write is raised here (its rows stay queued for the next try).
        """
        if self._closed:
            return
        self.transport.raise_error()
        self.transport.submit(self.buffer.take())

    def wait(self) -> None:
        """Return once every flushed row is in the file; re-raise a write error (after one retry here)."""
        self.transport.wait()

    # -- attributes, arrays, closing ------------------------------------------------------------------------

    def set_attr(self, name: str, value: Any) -> None:
        """Set a root attribute now (e.g. a W&B run id)."""
        self.set_attrs({name: value})

    def set_attrs(self, attrs: Mapping[str, Any]) -> None:
        """Set root attributes now, in one open of the file."""
        self.wait()
        set_attrs(self.path, attrs)

    def set_status(self, status: str) -> None:
        """Set the ``status`` attribute (``running``, ``complete`` or ``failed: …``)."""
        self.set_attr("status", str(status))

    def write_array(self, name: str, array: Any) -> None:
        """Write a whole array once (e.g. ``data/train_index``), replacing an earlier one of that name."""
        if isinstance(array, torch.Tensor):
            array = array.detach().cpu().numpy()
        self.wait()
        write_array(self.path, name, np.asarray(array))

    def close(self, status: str = "complete") -> None:
        """Flush buffered rows, set ``status`` and stop accepting rows. Idempotent.

        If the final flush fails the status becomes ``failed: …`` instead, and the error propagates.
        """
        if self._closed:
            return
        try:
            self.flush()
            self.wait()  # every row on disk before the status says so
        except BaseException as err:
            self.transport.drop()  # the status records the loss; do not retry the same failure again
            self._finish(f"failed: {type(err).__name__} while flushing: {err}")
            raise
        self._finish(status)

    def _finish(self, status: str) -> None:
        self._closed = True
        try:
            self.set_status(status)
        finally:
            self.transport.close()

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
            self.wait()
        except Exception as err:
            self.transport.drop()  # keep the original exception; record that rows were lost too
            status += f" (flushing buffered rows failed too: {type(err).__name__}: {err})"
        self._finish(status)
