"""The one training/LCA loop: a pipelined driver, the recorder of a step's results, and the run's summary.

Used by ``python -m lca_lab`` (:mod:`lca_lab.train`), by the offline recompute (:mod:`lca_lab.recompute`),
and by the benchmark's engine rows (:func:`lca_lab.bench.engine_loop`), so that all three run, record and
time the same loop.

Pipelining: step t's LCA is launched (its passes queued on the GPU), then the host trains step t+1, whose
kernels queue behind those passes, and only then reads step t's result and records it. The host's work
(training step, reducers, rows, tracker) thus overlaps the GPU's passes instead of alternating with them.
The numbers are those of the plain order; on the CPU only the order of the work changes. The driver holds
at most one launched step not yet recorded; it records it ("drains") before anything that needs every row
so far: the end of the LCA window, an evaluation, a checkpoint, a kill test, a signal (each a
:class:`Boundary`), the end of the loop and an error (the launched step's rows are kept: nothing already
computed is lost).

The driver takes its steps from one of three sources:

* a training step (:meth:`LCADriver.train`): iteration t runs ``step(t)`` (the optimizer update),
  launches the LCA of θ_t → θ_{t+1} and records step t−1;
* a sequence of points θ_0, θ_1, … (:meth:`LCADriver.follow`): the LCA of each consecutive pair,
  launched and recorded in the same order;
* steps already computed (:meth:`LCADriver.computed`), e.g. a recompute's batched steps.

Only the recorder reads from the device, and only what the engine already read for its refinement
decision (``StepLCA.host_loss1``, ``StepLCA.host_error``): no host synchronisation per iteration otherwise.
Units: losses and LCA in nats; θ flat [K] vectors in the model's dtype.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from .lca import LCAEngine, PendingStep, StepLCA
from .reducers import LCAReducer

__all__ = [
    "Boundary",
    "Computed",
    "LCADriver",
    "Launched",
    "RunningSums",
    "StepRecorder",
    "lca_summary",
]


# ----------------------------------------------------------------------------------------------------------
# one step in flight


class Computed:
    """A step already computed, in the shape of a :class:`~lca_lab.lca.PendingStep` (``result()``)."""

    def __init__(self, step: StepLCA):
        self._step = step

    def result(self) -> StepLCA:
        return self._step


@dataclass
class Launched:
    """A step whose LCA is launched and not yet recorded.

    Attributes:
        t: the row's iteration (``lca/iteration``): the training iteration of θ_t → θ_{t+1}.
        handle: ``result()`` → :class:`~lca_lab.lca.StepLCA` (a ``PendingStep`` or :class:`Computed`).
        theta1: θ_{t+1}, flat [K] (stored with the row when the trajectory is kept), or None.
        batch_loss: the training step's mini-batch loss, 0-d device tensor (for the tracker), or None.
    """

    t: int
    handle: PendingStep | Computed
    theta1: torch.Tensor | None = None
    batch_loss: torch.Tensor | None = None


class Recorder(Protocol):
    """What the driver needs of a recorder (:class:`StepRecorder`, or a test's collector)."""

    def start(self, loss0: Any, theta0: Any = None, class_loss0: Any = None, test_loss0: Any = None) -> None:
        """The window's first point: L(θ_0) (0-d), θ_0 [K], per-class [C] and held-out parts."""

    def record(self, step: Launched) -> StepLCA:
        """Finish one step and keep its results."""


class Boundary(Protocol):
    """Work between iterations that needs every row so far (the driver drains before calling it)."""

    def due(self, it: int) -> bool:
        """Whether to run at the boundary before iteration ``it`` (after ``it`` training steps)."""

    def __call__(self, it: int) -> None:
        """Run it (may raise to stop the loop, e.g. on a signal)."""


# ----------------------------------------------------------------------------------------------------------
# the running sums and the summary


@dataclass
class RunningSums:
    """Sums over the recorded LCA rows, for the summary; kept in a checkpoint (``state_dict``).

    Attributes:
        counts: [4] float64, summed over rows: fraction of entries helping, hurting, zero, and helping
            among the non-zero ones (the paper's Table 1); on the run's device (no per-row read).
        layer_total: [n_layers] float64 LCA per layer (nats) summed over rows, on the run's device; or None.
        max_abs_err: max over rows of |Σ LCA − ΔL| (nats).
        not_converged: rows whose error stayed over the tolerance.
        total_splits, passes: Simpson sub-intervals and gradient passes, summed over rows.
        loss_start, loss_end: L at the window's first point and at the last recorded row (nats).
        cum_err: Σ over rows of (Σ LCA − ΔL) (nats).
    """

    counts: torch.Tensor
    layer_total: torch.Tensor | None
    max_abs_err: float = 0.0
    not_converged: int = 0
    total_splits: int = 0
    passes: int = 0
    loss_start: float = 0.0
    loss_end: float = 0.0
    cum_err: float = 0.0

    SCALARS = (
        "max_abs_err", "not_converged", "total_splits", "passes", "loss_start", "loss_end", "cum_err",
    )  # fmt: skip

    @classmethod
    def zeros(cls, n_layers: int, device: torch.device) -> RunningSums:
        return cls(
            torch.zeros(4, dtype=torch.float64, device=device),
            torch.zeros(n_layers, dtype=torch.float64, device=device),
        )

    def add(self, st: StepLCA, loss1: float, err: float) -> None:
        """One row's host scalars: L(θ_{t+1}), its error, and the step's splits and passes."""
        self.loss_end = loss1
        self.cum_err += err
        self.max_abs_err = max(self.max_abs_err, abs(err))
        self.not_converged += int(not st.converged)
        self.total_splits += st.splits
        self.passes += st.passes

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``loop`` entry (CPU tensors and Python numbers; its keys are fixed)."""
        out: dict[str, Any] = {"counts": self.counts.cpu(), "layer_total": self.layer_total.cpu()}
        return out | {k: getattr(self, k) for k in self.SCALARS}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.counts.copy_(state["counts"])
        self.layer_total.copy_(state["layer_total"])
        self.max_abs_err, self.not_converged = float(state["max_abs_err"]), int(state["not_converged"])
        self.total_splits, self.passes = int(state["total_splits"]), int(state["passes"])
        self.loss_start, self.loss_end = float(state["loss_start"]), float(state["loss_end"])
        self.cum_err = float(state["cum_err"])

    @classmethod
    def from_rows(cls, rows: dict[str, np.ndarray]) -> RunningSums:
        """The same sums from stored rows (a merged recompute): ``loss`` [T+1], ``error``, ``splits``,
        ``converged``, ``passes``, ``fh``, ``fu``, ``fz`` (the reduce/frac_* rows) [T]."""
        fh, fu, fz, err, loss = rows["fh"], rows["fu"], rows["fz"], rows["error"], rows["loss"]
        helping_nonzero = fh / np.maximum(fh + fu, 1e-300)
        counts = torch.tensor([fh.sum(), fu.sum(), fz.sum(), helping_nonzero.sum()], dtype=torch.float64)
        return cls(
            counts, None, float(np.abs(err).max()), int((~rows["converged"].astype(bool)).sum()),
            int(rows["splits"].sum()), int(rows["passes"].sum()), float(loss[0]), float(loss[-1]),
            float(err.sum()),
        )  # fmt: skip


def lca_summary(sums: RunningSums, n_rows: int, layer_names: Sequence[str] | None = None) -> dict[str, Any]:
    """The LCA part of a run's summary (``summary/*`` attrs) from its running sums over ``n_rows`` rows.

    Keys: ``L_start``, ``L_end`` (nats); ``frac_helping``, ``frac_hurting``, ``frac_zero`` (mean over rows
    of the fraction of entries); ``pct_helping_nonzero`` (%, zeros ignored: the paper's Table 1);
    ``layer_lca`` ({layer: nats}, when ``layer_names`` are given); ``max_abs_error``, ``cumulative_error``
    (nats), ``cumulative_rel_error`` (of |L_end − L_start|), ``not_converged``, ``mean_splits``,
    ``grad_passes_per_iter``.
    """
    c = (sums.counts / n_rows).tolist()
    dl = sums.loss_end - sums.loss_start
    out: dict[str, Any] = {
        "L_start": sums.loss_start,
        "L_end": sums.loss_end,
        "frac_helping": c[0],
        "frac_hurting": c[1],
        "frac_zero": c[2],
        "pct_helping_nonzero": 100 * c[3],
    }
    if layer_names is not None:
        out["layer_lca"] = dict(zip(layer_names, sums.layer_total.tolist()))
    return out | {
        "max_abs_error": sums.max_abs_err,
        "cumulative_error": sums.cum_err,
        "cumulative_rel_error": abs(sums.cum_err) / abs(dl) if dl != 0 else math.inf,
        "not_converged": sums.not_converged,
        "mean_splits": sums.total_splits / n_rows,
        "grad_passes_per_iter": sums.passes / n_rows,
    }


# ----------------------------------------------------------------------------------------------------------
# the recorder


class StepRecorder:
    """Records one step's results: the reducers, the run file's rows, the tracker, the running sums.

    Args:
        reducer: the run's :class:`~lca_lab.reducers.LCAReducer` (its ``layer_sums`` sum per-class and
            held-out LCA by layer).
        writer: a :class:`~lca_lab.store.RunWriter` (or None: no rows, e.g. a benchmark's loop without
            storage).
        per_param: store each row's per-parameter LCA [K].
        trajectory: store θ_{t+1} [K] with each row (and θ_0 with the first point).
        tracker: ``log_iteration(t, **values)`` with device tensors it buffers, or None.
        layer_names: [n_layers] names, for the tracker's per-layer values.
        bar: a tqdm bar whose postfix shows L, the error and the splits, or None.
        fresh: the step's tensors are fresh and never modified, so the writer keeps them without a copy.
        passes_row: also store the gradient passes of each row (``recompute/passes`` [T] int32).
        divergence_hint: the fix named when L(θ_{t+1}) is not finite (a FloatingPointError); None: no
            check (the rows of a diverged stored trajectory are recorded as they are).
    """

    def __init__(
        self,
        reducer: LCAReducer,
        writer: Any = None,
        *,
        per_param: bool = True,
        trajectory: bool = False,
        tracker: Any = None,
        layer_names: Sequence[str] = (),
        bar: Any = None,
        fresh: bool = True,
        passes_row: bool = False,
        divergence_hint: str | None = "lower opt.lr",
    ):
        self.reducer, self.writer, self.tracker, self.bar = reducer, writer, tracker, bar
        self.per_param, self.trajectory, self.fresh, self.passes_row = (
            per_param,
            trajectory,
            fresh,
            passes_row,
        )
        self.layer_names, self.divergence_hint = list(layer_names), divergence_hint
        self.layer_sums = reducer.layer_sums  # [..., K] → [..., n_layers] float64
        self.sums = RunningSums.zeros(reducer.n_layers, reducer.index.device)
        # a subset estimate's engine (lca_lab.subset_engine.SubsetEngine): its run totals' standard errors go
        # into the summary; None on the exact path
        self.estimator: Any = None

    def start(self, loss0: Any, theta0: Any = None, class_loss0: Any = None, test_loss0: Any = None) -> None:
        """Row 0 of the point series: L(θ_0) (0-d or float; read to the host once), θ_0 [K] when the
        trajectory is stored, per-class parts [C] and the held-out loss when those are on."""
        self.sums.loss_start = self.sums.loss_end = loss0 = float(loss0)
        if self.writer is None:
            return
        self.writer.write_initial(loss0, theta0 if self.trajectory else None)
        if class_loss0 is not None:
            self.writer.append_dataset("class/loss", class_loss0)
        if test_loss0 is not None:
            self.writer.append_dataset("test/loss", test_loss0)

    def record(self, step: Launched) -> StepLCA:
        """Finish ``step`` (the one host read, made by the engine) and keep its results → its StepLCA."""
        st = step.handle.result()
        loss1, err = self._host_scalars(st)
        if self.divergence_hint is not None and not math.isfinite(loss1):
            raise FloatingPointError(
                f"training loss became {loss1} at iteration {step.t}; {self.divergence_hint}"
            )
        self.sums.layer_total += st.layer  # [n_layers], from the engine's product that gave the total
        views = self.reducer.update(st.param, st.delta, st.grad0)
        fh, fu = views["frac_helping"], views["frac_hurting"]
        # helping, hurting, zero; then helping among non-zero entries (the paper's Table 1)
        self.sums.counts += torch.stack([fh, fu, views["frac_zero"], fh / (fh + fu).clamp_min(1e-300)])
        if self.writer is not None:
            self._write_rows(step, st, views, loss1, err)
        self.sums.add(st, loss1, err)
        if self.tracker is not None:
            self._track(step, st, views, loss1, err)
        if self.bar is not None:
            self.bar.set_postfix(L=f"{loss1:.4f}", err=f"{err:+.1e}", splits=st.splits, refresh=False)
        return st

    @staticmethod
    def _host_scalars(st: StepLCA) -> tuple[float, float]:
        """L(θ_{t+1}) and the error as floats: the engine's own read, or one read for a batched step."""
        if st.host_error is not None and st.host_loss1 is not None:
            return st.host_loss1, st.host_error
        loss1, err = torch.stack([st.loss1, st.error]).tolist()
        return loss1, err

    def _write_rows(self, step: Launched, st: StepLCA, views: dict, loss1: float, err: float) -> None:
        """The step's rows of the run file (per-row series first, then the LCA row that commits them)."""
        w, copy = self.writer, not self.fresh
        for name, v in views.items():
            w.append_dataset(f"reduce/{name}", v, copy=copy)  # fresh views, never modified
        class_layer = None
        if st.class_param is not None:
            class_layer = self.layer_sums(st.class_param)  # [n_classes, n_layers]
            w.append_dataset("class/loss", st.class_loss1)
        if st.test_param is not None:
            w.append_dataset("test/loss", st.test_loss1)
            w.append_dataset("lca_test/layer", self.layer_sums(st.test_param))
            w.append_dataset("lca_test/total", st.test_param.sum())
            w.append_dataset("lca_test/error", st.test_error)
        if self.passes_row:
            w.append_dataset("recompute/passes", st.passes, np.int32)
        if st.total_se is not None:  # a subset estimate (lca_lab.estimate): its sampling errors and subset
            w.append_dataset("lca/total_se", st.total_se, np.float64)
            w.append_dataset("lca/layer_se", st.layer_se, np.float64)
            w.append_dataset("estimate/seed", st.subset_seed, np.int64)
            w.append_dataset("estimate/passes", st.passes, np.int32)
            if st.cov_prev is not None:  # overlapping halves: rows t − 1 and t share half their chunks
                w.append_dataset("estimate/cov_prev", st.cov_prev, np.float64)
        w.append(
            step.t, loss1, st.total, err, st.splits, st.converged, st.layer,
            st.param if self.per_param else None,
            step.theta1 if self.trajectory else None,
            class_layer=class_layer,
            copy=copy,  # fresh: every tensor here is new this iteration and never modified (θ_{t+1} neither)
        )  # fmt: skip

    def _track(self, step: Launched, st: StepLCA, views: dict, loss1: float, err: float) -> None:
        """Device tensors to the tracker, which copies them in batches."""
        se = {} if st.total_se is None else {"lca_total_se": st.total_se}
        self.tracker.log_iteration(
            step.t, loss=loss1, lca_total=st.total, lca_error=err, splits=st.splits, **se,
            frac_helping=views["frac_helping"], frac_hurting=views["frac_hurting"],
            frac_zero=views["frac_zero"], batch_loss=step.batch_loss,
            layer_lca=dict(zip(self.layer_names, st.layer)),
        )  # fmt: skip

    def theta_row(self, theta: torch.Tensor, t: int) -> None:
        """One row of the θ-only trajectory of a run with LCA off (read by ``lca_lab.recompute``):
        ``trajectory/theta`` [T+1, K] float32 and ``trajectory/iteration`` [T+1] int64 (θ after t steps).
        With LCA on, θ is stored with the LCA rows instead (``trajectory/theta`` aligned with
        ``train/loss``)."""
        self.writer.append_dataset("trajectory/theta", theta, np.float32)
        self.writer.append_dataset("trajectory/iteration", t, np.int64)  # after θ: its length commits the row

    def write_counters(self) -> None:
        """The reducer's per-parameter counters ``reduce/param_helped`` … [K] int32 (once, at the end)."""
        for name, arr in self.reducer.result().items():
            self.writer.write_array(f"reduce/{name}", arr.cpu().numpy())

    def summary(self, n_rows: int) -> dict[str, Any]:
        """:func:`lca_summary` of the rows recorded so far (``n_rows`` of them, resumed ones included)."""
        out = lca_summary(self.sums, n_rows, self.layer_names)
        if self.estimator is not None:
            total_se, layer_se = self.estimator.run_se()
            out["lca_estimate"] = "subset"
            out["lca_total"] = float(self.sums.layer_total.sum())
            out["lca_total_se"] = total_se  # of the run's summed LCA (nats)
            out["layer_lca_se"] = dict(zip(self.layer_names, layer_se.tolist()))
            out["lca_interval_q"] = self.estimator.run_q(n_rows)  # 95 % interval: ± q · SE
            out["grad_passes_per_iter"] = self.estimator.points_per_step(n_rows)  # over the subset
        return out

    def state_dict(self) -> dict[str, Any]:
        """The checkpoint's ``reducer`` and ``loop`` entries."""
        return {"reducer": self.reducer.state_dict(), "loop": self.sums.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reducer.load_state_dict(state["reducer"])
        self.sums.load_state_dict(state["loop"])


# ----------------------------------------------------------------------------------------------------------
# the driver


class LCADriver:
    """The pipelined loop over an LCA window: step t launched, then step t−1 recorded.

    Args:
        engine: the :class:`~lca_lab.lca.LCAEngine`, or None (LCA off: the loop only trains).
        recorder: a :class:`StepRecorder` (or anything with its ``start`` and ``record``).
        flat: ``flat()`` → θ, a fresh flat [K] copy of the model's trainable parameters (training sources).
        window: ``(lo, hi)``: LCA of the steps lo ≤ t < hi; default every step.
        theta_only: LCA off but θ_t kept for t = lo..hi (``recorder.theta_row``), for an offline recompute.
        pipelined: record step t−1 after launching step t (False: record step t at once; several ranks).

    ``iter_s``: wall time (s) of every training iteration with LCA (training step t, launching its LCA,
    recording step t−1's): reading step t−1's error makes each iteration wait for the GPU work queued
    before it, so in the steady state these are the throughput, and the host clock is honest.
    """

    def __init__(
        self,
        engine: LCAEngine | None,
        recorder: Recorder,
        flat: Callable[[], torch.Tensor] | None = None,
        window: tuple[int, int] | None = None,
        theta_only: bool = False,
        pipelined: bool = True,
    ):
        self.engine, self.recorder, self.flat = engine, recorder, flat
        # Several ranks: each step is recorded in its own iteration, so every rank runs its collectives (the
        # passes' all-reduces, the step's broadcast) in one order, whatever boundaries rank 0 alone has.
        self.pipelined = pipelined
        self.lo, self.hi = window if window is not None else (0, math.inf)
        self.theta_only = theta_only
        self.pending: Launched | None = None
        self.iter_s: list[float] = []
        # θ_{t+1} of the last step is θ_t of the next: reusing the tensor lets the engine reuse its endpoint
        # gradient without comparing values.
        self._theta: torch.Tensor | None = None

    # -- the pipeline ---------------------------------------------------------------------------------------

    def push(self, launched: Launched) -> None:
        """Hand over a launched step; record the one before it (its passes were queued first)."""
        self.drain()
        self.pending = launched

    def drain(self) -> None:
        """Record the launched step, if any: before anything that needs every row so far."""
        if self.pending is not None:
            done, self.pending = self.pending, None
            self.recorder.record(done)

    def __enter__(self) -> LCADriver:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        """Drain at the end; on an error, too (nothing computed is lost), and the error propagates."""
        if exc_type is None:
            self.drain()
            return
        with contextlib.suppress(Exception):
            self.drain()

    # -- training steps -------------------------------------------------------------------------------------

    def start(self) -> torch.Tensor:
        """Prime the engine at the current θ (the window's first point) and record that point → θ."""
        theta = self._theta = self.flat()
        loss0 = self.engine.prime(theta)
        point = self.engine.cached_point
        self.recorder.start(loss0, theta, point.get("Lc"), point.get("Lt"))
        return theta

    def resume(self) -> None:
        """Recompute the engine's cached endpoint gradient at the current θ (not in a checkpoint; the same
        function of the same θ, so the same bits on the CPU)."""
        self._theta = self.flat()
        self.engine.prime(self._theta)

    def iteration(self, t: int, step: Callable[[int], torch.Tensor]) -> Launched | None:
        """Training iteration t: ``step(t)`` (the update θ_t → θ_{t+1}; returns the mini-batch loss, 0-d),
        then, inside the window, the launch of its LCA and the record of step t−1 → the launched step."""
        t_iter = time.perf_counter()
        do_lca = self.engine is not None and self.lo <= t < self.hi
        if not do_lca:
            self._theta = None
        elif self._theta is None:
            self._theta = self.start() if t == self.lo else self.flat()
        if self.theta_only and t == self.lo:
            self.recorder.theta_row(self.flat(), t)
        theta0 = self._theta
        batch_loss = step(t)
        if self.theta_only and self.lo <= t < self.hi:
            self.recorder.theta_row(self.flat(), t + 1)
        launched = None
        if do_lca:
            theta1 = self._theta = self.flat()
            launched = Launched(t, self.engine.launch(theta0, theta1), theta1, batch_loss.detach())
            self.push(launched)
            if not self.pipelined:
                self.drain()
            self.iter_s.append(time.perf_counter() - t_iter)
        if t + 1 >= self.hi:
            self.drain()  # the end of the window
        return launched

    def train(
        self,
        iterations: Iterable[int],
        step: Callable[[int], torch.Tensor],
        boundaries: Sequence[Boundary] = (),
        after: Callable[[int, Launched | None], None] | None = None,
    ) -> None:
        """Run ``iteration(t, step)`` for each t, then ``after(t + 1, launched)``, then each boundary due
        before iteration t + 1 (drained first, in the order given); drain at the end and on an error."""
        with self:
            for t in iterations:
                launched = self.iteration(t, step)
                if after is not None:
                    after(t + 1, launched)
                for boundary in boundaries:
                    if boundary.due(t + 1):
                        self.drain()
                        boundary(t + 1)

    # -- other sources --------------------------------------------------------------------------------------

    def run(self, steps: Iterable[Launched], after: Callable[[Launched], None] | None = None) -> None:
        """Record launched (or computed) steps in the pipelined order; drain at the end and on an error."""
        with self:
            for launched in steps:
                self.push(launched)
                if after is not None:
                    after(launched)

    def follow(self, points: Iterable[torch.Tensor], t0: int = 0) -> Iterator[Launched]:
        """Launches of the LCA of each consecutive pair of ``points`` (θ_t0, θ_t0+1, … flat [K]), for
        :meth:`run`; the first point's gradient is computed by the first step (not primed)."""
        it = iter(points)
        theta0 = next(it, None)
        for t, theta1 in enumerate(it, start=t0):
            yield Launched(t, self.engine.launch(theta0, theta1), theta1)
            theta0 = theta1

    def computed(self, steps: Iterable[tuple[int, StepLCA]]) -> Iterator[Launched]:
        """Steps already computed, ``(t, StepLCA)`` in order, for :meth:`run`; the first one's starting
        point (L(θ_0), per-class and held-out parts) is recorded before it."""
        first = True
        for t, st in steps:
            if first:
                self.recorder.start(st.loss0, None, st.class_loss0, st.test_loss0)
                first = False
            yield Launched(t, Computed(st))
