"""The subset estimate's engine (``lca.estimate=subset``): :class:`SubsetEngine` runs the exact path's
quadrature on a subset's scaled loss, with per-unit parts for the standard errors and the start point
reused where that gives the same numbers. The estimator, the draws and the SE formulas:
:mod:`lca_lab.estimate` and docs/estimates.md.

This module imports torch and numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch.func import jvp, vmap

from .estimate import (
    Draw,
    SubsetError,
    SubsetPlan,
    draw_df,
    interval_q,
    iteration_seed,
    run_df,
    stratified_se,
    subset_plan_for,
)
from .examples import tree_map
from .lca import FullBatchLoss, LayerSums, StepLCA, _point, check_engine_options

# Per-example gradients are held [m, K] in float32 per vmap-ed pass: m = max(1, PER_EXAMPLE_FLOATS // K).
PER_EXAMPLE_FLOATS = 1 << 24
# Chunk units keep chunk gradients at θ_{t+1} for step t+1's start ([r, K] floats, at most this many):
# all of a fixed subset's (its per-chunk parts along the next Δ are then dot products, not forward-mode
# passes), H_{t+1}'s of overlapping halves (the start point then evaluates only the new half).
KEEP_UNIT_GRADS = 1 << 26


def uses_halves(plan: SubsetPlan, fixed: bool) -> bool:
    """Fresh draws of chunks as overlapping halves: where at least 4 chunks are drawn (2 per half) and the
    draw is under 2/7 of the split. Halves cost 2.5 gradient points per step against 3 for a draw of n
    chunks, and their variance has the finite-population factor 1 − f/2 instead of 1 − f (f = n/N), so
    they give the smaller variance per gradient evaluated exactly where 2.5 (1 − f/2) < 3 (1 − f)."""
    f = plan.n_drawn / plan.n_units
    return plan.chunk is not None and not fixed and plan.n_drawn >= 4 and f < 2 / 7


class _Gathered:
    """The drawn units' data, held for the iteration (or the run, with a fixed subset)."""

    def __init__(
        self,
        loss: FullBatchLoss,
        plan: SubsetPlan,
        draw: Draw,
        weights: Sequence[float] | None = None,
        sizes: Sequence[int] | None = None,
    ):
        """``weights``, ``sizes``: W_h and N_h of each of ``draw.units`` (default: the plan's strata)."""
        dev = loss.device
        w = plan.weights() if weights is None else np.asarray(weights, dtype=np.float64)
        self.weights = None if weights is None else [float(v) for v in w]
        self.draw = draw
        self.parts: list[tuple[Any, torch.Tensor]] = []  # (inputs, targets) per chunk of evaluation
        weights: list[np.ndarray] = []
        stratum: list[np.ndarray] = []
        for h, u in enumerate(draw.units):
            stratum.append(np.full(len(u), h))
            weights.append(np.full(len(u), w[h]))
        self.unit_stratum = np.concatenate(stratum)
        self.unit_weight_host = np.concatenate(weights)  # read per chunk without a device sync
        self.unit_weight = torch.tensor(self.unit_weight_host, dtype=torch.float64, device=dev)
        units = np.concatenate(draw.units)
        self.sizes = [len(s) for s in plan.strata] if sizes is None else list(sizes)
        self.strata_rows = [
            torch.tensor(np.nonzero(self.unit_stratum == h)[0], device=dev) for h in range(len(self.sizes))
        ]
        if plan.chunk is None:
            idx = torch.as_tensor(units, device=dev if not loss.examples.streamed else "cpu")
            x, y = loss.examples.take(idx)
            m = loss.chunk_size
            for s in range(0, len(units), m):
                self.parts.append((tree_map(lambda t, s=s: t[s : s + m], x), y[s : s + m]))
        else:
            for c in units:
                lo, hi = int(c) * plan.chunk, min((int(c) + 1) * plan.chunk, plan.n_examples)
                self.parts.append(loss.examples.take(torch.arange(lo, hi, device=_take_device(loss))))
        self.n_units = len(units)
        self.first, self.second_seed = 0, None  # overlapping halves: H_{t+1}'s first row and seed


def _take_device(loss: FullBatchLoss) -> torch.device:
    return torch.device("cpu") if loss.examples.streamed else loss.device


class SubsetEngine:
    """:class:`lca_lab.lca.LCAEngine`'s interface (``prime``, ``cached_point``, ``launch``, ``step``,
    ``reset``, ``loss``, ``layer_sums``) for subset estimates; every step also carries ``total_se``,
    ``layer_se``, ``subset_seed`` and ``subset_units`` (see the module's docstring).

    Args:
        loss: the exact :class:`FullBatchLoss` (its data, net, loss function, chunk size and C); its passes
            are used only for ``prime`` (the run's L(θ_0) on the whole split is not computed: ``prime``
            returns L̂(θ_0) on the first iteration's subset).
        plan: the :class:`SubsetPlan`.
        method, tolerance, max_splits, adaptive: as for LCAEngine; refinement is decided on the
            subset's own residual.
        layer_sums: the per-layer sums (required: the SEs are per layer).
        fixed: one subset for the whole run (seed :func:`iteration_seed` (base, None)).
        base_seed: ``lca.subset_seed`` (default the run's seed).
        start: the training iteration of the first step (seeds are per iteration).

    Fresh draws of chunks (BN nets, at least 4 chunks per draw) are *overlapping halves*: independent
    half-draws H_k (simple random samples of ⌈n/2⌉ chunks for even k, ⌊n/2⌋ for odd k, seed
    :func:`iteration_seed` (base, k)), and iteration t's subset is S_t = H_t ∪ H_{t+1} (a chunk in both
    counts twice), weight N/n per unit. Each S_t is a new random draw, unbiased as any; H_t's chunk
    gradients at θ_t were computed at the previous step's end point and are kept, so the start point
    evaluates only H_{t+1}: ⌈n/2⌉ or ⌊n/2⌋ chunk gradients instead of n. Adjacent rows share H_t, so their
    estimates covary; the covariance is estimated from H_t's chunks (``cov_prev`` of each step) and enters
    the run totals' SEs.
    """

    def __init__(
        self,
        loss: FullBatchLoss,
        plan: SubsetPlan,
        layer_sums: LayerSums,
        method: str = "rk4",
        tolerance: float = 1e-3,
        max_splits: int = 32,
        adaptive: bool = True,
        fixed: bool = False,
        base_seed: int = 0,
        start: int = 0,
    ):
        check_engine_options(method, tolerance, max_splits)
        if loss.shard.active:
            raise SubsetError("lca.estimate=subset does not shard its passes; run it in one process")
        if loss.mask_ignored:
            raise SubsetError(
                "lca.estimate=subset needs a loss that skips -100 targets itself (ignore_index=-100)"
            )
        self.loss, self.plan, self.layer_sums = loss, plan, layer_sums
        self.method, self.tolerance, self.max_splits = method, float(tolerance), int(max_splits)
        self.adaptive, self.fixed, self.base_seed = bool(adaptive), bool(fixed), int(base_seed)
        self.halves = uses_halves(plan, self.fixed)
        self.df = draw_df(plan, self.halves)
        self._pending: tuple[int, torch.Tensor] | None = None  # (seed of H_{t+1}, its per-unit a at row t)
        self.next_t = int(start)
        self.per_class, self.test_loss = False, None
        self._fixed: _Gathered | None = None
        self._none_ok: bool | None = None  # the loss takes reduction="none" (decided at the first pass)
        self._cache: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self.examples_evaluated = 0  # example-gradients so far (gradient points × examples of the subset)
        self.example_jvps = 0  # forward-mode products so far (examples × layer tangents)
        self.priming_examples = 0  # example-gradients of priming passes (not a step's)
        n_l = layer_sums.n_layers
        dev = loss.device
        # run sums: Σ_t SE_t² (fresh draws); per-unit run sums of a_i (fixed subset)
        self.se2_total = torch.zeros((), dtype=torch.float64, device=dev)
        self.se2_layer = torch.zeros(n_l, dtype=torch.float64, device=dev)
        self.unit_run: torch.Tensor | None = None  # [n_units, n_layers + 1] with a fixed subset

    # -- the draw -----------------------------------------------------------------------------------------

    def seed_of(self, t: int) -> int:
        return iteration_seed(self.base_seed, None if self.fixed else t)

    def half_size(self, k: int) -> int:
        """Chunks in half-draw H_k (overlapping halves): ⌈n/2⌉ for even k, ⌊n/2⌋ for odd k."""
        n = self.plan.n_drawn
        return (n + 1) // 2 if k % 2 == 0 else n // 2

    def _draw(self, t: int) -> Draw:
        """Iteration t's subset, without its data: the plan's draw, or H_t ∪ H_{t+1} (overlapping halves)."""
        if not self.halves:
            return self.plan.draw(self.seed_of(t))
        p = self.plan
        halves = [p.half(self.seed_of(k), self.half_size(k)) for k in (t, t + 1)]
        return Draw(self.seed_of(t), halves, np.sort(p.unit_examples(np.concatenate(halves))))

    def _gather(self, t: int) -> _Gathered:
        """Iteration t's subset with its data (a fixed subset's once). Overlapping halves: rows [0, first)
        are H_t, the rest H_{t+1}, weight N/n per unit."""
        if self.fixed:
            if self._fixed is None:
                self._fixed = _Gathered(self.loss, self.plan, self._draw(t))
            return self._fixed
        if not self.halves:
            return _Gathered(self.loss, self.plan, self._draw(t))
        d = self._draw(t)
        N, n = self.plan.n_units, self.plan.n_drawn
        g = _Gathered(self.loss, self.plan, d, weights=[N / n] * 2, sizes=[N, N])
        g.first, g.second_seed = len(d.units[0]), self.seed_of(t + 1)
        return g

    # -- one point ----------------------------------------------------------------------------------------

    def _kept_rows(self, g: _Gathered, own: bool = False) -> range:
        """The chunks whose gradients at an end point serve the next step's start: all of a fixed subset's,
        H_{t+1}'s of overlapping halves, or all of them where the next step draws this same subset
        (``own``: the first priming pass); none otherwise, or where they would exceed KEEP_UNIT_GRADS."""
        if self.fixed or own and self.halves:
            rows = range(g.n_units)
        else:
            rows = range(g.first, g.n_units) if self.halves else range(0)
        return (
            rows
            if self.plan.chunk is not None and len(rows) * self.loss.n_params <= KEEP_UNIT_GRADS
            else range(0)
        )

    def _eval(
        self,
        theta: torch.Tensor,
        g: _Gathered,
        delta: torch.Tensor | None,
        keep: bool = False,
        rows: range | None = None,
        own: bool = False,
    ) -> dict[str, torch.Tensor]:
        """L̂(θ) (0-d), ∇L̂(θ) [K], and per-unit ∇ℓ_i·Δ by layer U [n_units, n_layers] (with ``delta``).

        ``keep``: an end point: keep the gradient ``G`` [r, K] and summed loss ``l`` [r] of the chunks of
        :meth:`_kept_rows` (the next step's start). ``rows``: chunk units only, evaluate these rows only
        (the others' entries of L̂, ∇L̂ and U are left out)."""
        fb = self.loss
        K, C = fb.n_params, fb.n_counted
        dev = fb.device
        grad = torch.zeros(K, dtype=torch.float64, device=dev)
        total = torch.zeros((), dtype=torch.float64, device=dev)
        U = torch.zeros(g.n_units, self.layer_sums.n_layers, dtype=torch.float64, device=dev)
        keep_rows = self._kept_rows(g, own) if keep else range(0)
        kept: list[torch.Tensor] = []
        kept_l: list[torch.Tensor] = []
        rows = range(g.n_units) if rows is None else rows
        row = 0
        with torch.enable_grad(), _eval_mode(fb):
            if self.plan.chunk is None:
                leaf = theta.detach().requires_grad_(True)
                for xb, yb in g.parts:
                    ls = self._per_example(leaf, xb, yb)  # [m] summed loss of each example
                    m = len(ls)
                    w = g.unit_weight[row : row + m]
                    s = (w * ls.double()).sum()
                    (gc,) = torch.autograd.grad(s, leaf)
                    grad += gc.double()
                    total += s.detach()
                    if delta is not None:
                        U[row : row + m] = self._unit_jvps(theta.detach(), xb, yb, delta)[1]
                    row += m
            else:
                leaf = theta.detach().requires_grad_(True)
                params = fb.unflatten(leaf)
                for row in rows:
                    xb, yb = g.parts[row]
                    loss_sum = fb._chunk_loss(params, xb, yb)
                    (gc,) = torch.autograd.grad(loss_sum, leaf)
                    w = float(g.unit_weight_host[row])
                    grad.add_(gc.double(), alpha=w)
                    total += w * loss_sum.detach().double()
                    if delta is not None:
                        U[row] = self.layer_sums(gc.double() * delta)
                    if row in keep_rows:
                        kept.append(gc.detach().clone())
                        kept_l.append(loss_sum.detach().double())
                    self.examples_evaluated += len(yb)
        if self.plan.chunk is None:
            self.examples_evaluated += len(g.draw.examples)
            if delta is not None:
                self.example_jvps += len(g.draw.examples) * self.layer_sums.n_layers
        out = {"L": total / C, "g": grad / C, "U": U}
        if kept:
            # whose chunks they are: all of this draw's, or H_{t+1}'s
            seed = g.draw.seed if len(kept) == g.n_units else g.second_seed
            out |= {"G": torch.stack(kept), "l": torch.stack(kept_l), "G_seed": seed}
        return out

    def _per_example(self, theta: torch.Tensor, xb: Any, yb: torch.Tensor) -> torch.Tensor:
        """θ → the summed loss of each example of the chunk [m] (an example's tokens together): one batched
        pass with ``reduction="none"``, or, for a loss without it, the net vmap-ed over single examples
        (any loss with ``reduction="sum"`` serves)."""
        fb = self.loss
        params = fb.unflatten(theta, layout=False)
        m = len(yb)
        if self._none_ok is not False:
            try:
                per = fb._target_loss(fb._forward(params, xb), yb, reduction="none")
                if per.numel() != yb.numel():
                    raise ValueError("reduction='none' did not give one loss per target")
                self._none_ok = True
                return per.reshape(m, -1).sum(1)
            except (TypeError, ValueError, RuntimeError):
                if self._none_ok:
                    raise
                self._none_ok = False

        def one(x: Any, y: torch.Tensor) -> torch.Tensor:
            return fb._target_loss(fb._forward(params, tree_map(lambda t: t.unsqueeze(0), x)), y.unsqueeze(0))

        return vmap(one)(xb, yb)

    def _unit_jvps(self, theta: torch.Tensor, xb: Any, yb: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """∇ℓ_i(θ)·Δ_l for every example i of the chunk and layer l → [m, n_layers] float64: one forward-mode
        product (``torch.func.jvp``) along Δ restricted to each layer, vmap-ed over groups of layers."""
        return self._layer_jvps(lambda th: self._per_example(th, xb, yb), theta, delta)

    def _units_along(
        self, theta: torch.Tensor, g: _Gathered, delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """L̂(θ) (0-d) and U [n_units, n_layers] at θ by forward-mode products, without a gradient pass
        (a start point whose gradient is reused)."""
        fb = self.loss
        C = fb.n_counted
        with torch.enable_grad(), _eval_mode(fb):
            if self.plan.chunk is None:
                parts = [self._unit_jvps(theta.detach(), xb, yb, delta) for xb, yb in g.parts]
                self.example_jvps += len(g.draw.examples) * self.layer_sums.n_layers
                losses, U = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            else:
                rows = []
                for xb, yb in g.parts:

                    def f(th: torch.Tensor, xb: Any = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                        return fb._chunk_loss(fb.unflatten(th, layout=False), xb, yb).reshape(1)

                    rows.append(self._layer_jvps(f, theta.detach(), delta))
                self.example_jvps += len(g.draw.examples) * self.layer_sums.n_layers
                losses, U = torch.cat([r[0] for r in rows]), torch.cat([r[1] for r in rows])
        return (g.unit_weight * losses).sum() / C, U

    def _layer_jvps(
        self, f: Any, theta: torch.Tensor, delta: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """f: θ → [m]; → f(θ) [m] and [m, n_layers] float64, ∂f/∂θ along Δ restricted to each layer
        (forward mode)."""
        n_l, K = self.layer_sums.n_layers, self.loss.n_params
        idx = self.layer_sums._index
        d = delta.to(theta.dtype)
        group = max(1, PER_EXAMPLE_FLOATS // max(K, 1))
        out = []

        def dd(tan: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            return jvp(f, (theta,), (tan,))

        value = None
        for l0 in range(0, n_l, group):
            ls = torch.arange(l0, min(l0 + group, n_l), device=idx.device)
            tangents = torch.where(idx[None, :] == ls[:, None], d[None, :], torch.zeros((), dtype=d.dtype))
            primal, tangent = vmap(dd)(tangents)  # [g, m] each (the primal repeated)
            value = primal[0].double()
            out.append(tangent.double())
        return value, torch.cat(out).T

    # -- the engine's interface ---------------------------------------------------------------------------

    def reset(self) -> None:
        self._cache = None

    def prime(self, theta: torch.Tensor) -> torch.Tensor:
        """L̂(θ) and ∇L̂(θ) for the next step's start point: on the subset of iteration ``next_t`` − 1, whose
        end point θ was online (fresh draws; iteration 0: its own subset, which gives the run's first
        ``train/loss`` row), or on the fixed subset. A resumed run thus continues with the same bits."""
        own = self.fixed or self.next_t <= 0
        t = self.next_t if own else self.next_t - 1
        before = self.examples_evaluated
        p = self._eval(theta, self._gather(t), None, keep=True, own=own)
        self.priming_examples += self.examples_evaluated - before
        self._cache = (theta, p)
        return p["L"]

    def points_per_step(self, n_rows: int) -> float:
        """Gradient points per step over the subset, from the example-gradients of ``n_rows`` steps (a start
        point reused whole counts 0, a half-evaluated one of overlapping halves ½; priming passes left out,
        as for the exact path)."""
        per_draw = float(np.mean([len(self._draw(t).examples) for t in range(2)]))
        return (self.examples_evaluated - self.priming_examples) / max(n_rows, 1) / per_draw

    @property
    def cached_point(self) -> dict[str, torch.Tensor]:
        if self._cache is None:
            raise RuntimeError("no endpoint computed yet: call prime() or step() first")
        return self._cache[1]

    def launch(self, theta0: torch.Tensor, theta1: torch.Tensor) -> _Done:
        return _Done(self.step(theta0, theta1))

    def step(self, theta0: torch.Tensor, theta1: torch.Tensor) -> StepLCA:
        """The subset estimate of the LCA of θ0 → θ1 (training iteration ``next_t``; then ``next_t`` + 1)."""
        t = self.next_t
        self.next_t += 1
        g = self._gather(t)
        delta = theta1.double() - theta0
        pts: dict[Fraction, dict[str, torch.Tensor]] = {}

        def at(f: Fraction) -> dict[str, torch.Tensor]:
            if f not in pts:
                th = theta0 if f == 0 else theta1 if f == 1 else _point(theta0, delta, float(f))
                pts[f] = self._eval(th, g, delta, keep=f == 1)
            return pts[f]

        reused = 0
        start = self._reused_start(theta0, g, delta)
        if start is not None:
            pts[Fraction(0)], reused = start, 1
        p0, p1 = at(Fraction(0)), at(Fraction(1))
        dloss = p1["L"] - p0["L"]

        def combine(weights: dict[Fraction, float]) -> tuple[torch.Tensor, torch.Tensor]:
            gbar = sum(w * at(f)["g"] for f, w in weights.items())
            ubar = sum(w * at(f)["U"] for f, w in weights.items())
            return gbar, ubar

        def simpson(s: int) -> dict[Fraction, float]:
            return {Fraction(j, s): (1 if j in (0, s) else 4 if j % 2 else 2) / (3 * s) for j in range(s + 1)}

        splits = 1
        if self.method == "first_order":
            weights = {Fraction(0): 1.0}
        elif self.method == "trapezoid":
            weights = {Fraction(0): 0.5, Fraction(1): 0.5}
        else:
            splits, weights = 2, simpson(2)
        while True:
            gbar, ubar = combine(weights)
            param = gbar * delta
            layer, total = self.layer_sums.with_total(param)
            err = float(total - dloss)
            if self.method == "first_order" or not self.adaptive or not math.isfinite(err):
                break
            if abs(err) <= self.tolerance or splits >= self.max_splits:
                break
            splits = 2 if self.method == "trapezoid" and splits == 1 else splits * 2
            weights = simpson(splits)
        a = torch.cat([ubar, ubar.sum(1, keepdim=True)], 1)  # [n_units, n_layers + 1] per-unit LCA
        se = stratified_se(a, g.strata_rows, g.sizes, self.loss.n_counted, g.weights)
        layer_se, total_se = se[:-1], se[-1]
        cov = self._cov_prev(a, g)
        if self.fixed:
            self.unit_run = a.clone() if self.unit_run is None else self.unit_run.add_(a)
        var = se**2 + (0.0 if cov is None else 2.0 * cov)  # this row's share of the run total's variance
        self.se2_total += var[-1]
        self.se2_layer += var[:-1]
        st = StepLCA(
            param, total, p0["L"], p1["L"], total - dloss, splits, abs(err) <= self.tolerance,
            len(pts) - reused, grad0=p0["g"], delta=delta, layer=layer,
        )  # fmt: skip
        st.host_error, st.host_loss1 = err, float(p1["L"])
        st.total_se, st.layer_se, st.subset_seed, st.subset_examples = (
            total_se,
            layer_se,
            g.draw.seed,
            len(g.draw.examples),
        )
        st.cov_prev = cov
        self._cache = (theta1, p1)
        return st

    def _cov_prev(self, a: torch.Tensor, g: _Gathered) -> torch.Tensor | None:
        """Overlapping halves: the covariance [n_layers + 1] of this row's estimate with the previous row's,
        which share H_t: (W/C)² m (1 − m/N) times the sample covariance over H_t's chunks of their parts in
        the two rows (0 where the previous row was not the step before); None for other draws. Keeps
        H_{t+1}'s parts for the next row."""
        if not self.halves:
            return None
        m, N = g.first, g.sizes[0]
        cov = torch.zeros(a.shape[1], dtype=torch.float64, device=a.device)
        if self._pending is not None and self._pending[0] == g.draw.seed and m >= 2:
            prev, now = self._pending[1], a[:m]
            c = ((prev - prev.mean(0)) * (now - now.mean(0))).sum(0) / (m - 1)
            cov = (g.weights[0] / self.loss.n_counted) ** 2 * m * (1.0 - m / N) * c
        self._pending = (g.second_seed, a[m:].clone())
        return cov

    def _reused_start(
        self, theta0: torch.Tensor, g: _Gathered, delta: torch.Tensor
    ) -> dict[str, torch.Tensor] | None:
        """The start point θ_t from the previous step's end point, without a gradient pass (None: evaluate
        it). The per-layer parts (hence total, per-layer LCA, SEs and residual) are always this draw's own.

        * Fixed subset: L̂ and ∇L̂ are the same subset's; U along this Δ from the chunks' kept gradients
          (BN nets), else by forward-mode products.
        * Fresh draws of examples: L̂ and U by forward-mode products on this draw (they are needed for the SEs
          anyway); the per-parameter ∇L̂(θ_t) is the previous draw's, which is unbiased too, moved within each
          layer l along Δ_l by c_l Δ_l, c_l = (Δ_l·∇_l L̂_now − Δ_l·∇_l L̂_prev) / |Δ_l|², so that every layer's
          per-parameter sum is this draw's (conservation holds as for a gradient on this draw; E[c_l] = 0).
        * Fresh draws of chunks as overlapping halves: H_t's kept chunk gradients and a pass over H_{t+1}'s
          (:meth:`_halves_start`). A chunk draw taken whole: None, because a chunk's backward pass gives its
          per-layer parts faster than forward-mode products per layer do (measured, docs/estimates.md).
        """
        if self._cache is None or self.plan.chunk is not None and not (self.fixed or self.halves):
            return None
        c0, cp = self._cache
        if not (c0 is theta0 or torch.equal(c0, theta0)):
            return None
        if self.halves:
            return self._halves_start(theta0, g, delta, cp)
        if self.fixed:
            if "G" in cp:
                U = self.layer_sums(cp["G"].double() * delta)  # [n_units, n_layers]
            else:
                U = self._units_along(theta0, g, delta)[1]
            return {"L": cp["L"], "g": cp["g"], "U": U}
        L0, U = self._units_along(theta0, g, delta)
        C = self.loss.n_counted
        now = (g.unit_weight[:, None] * U).sum(0) / C  # [n_layers] Δ_l·∇_l L̂ on this draw
        prev = self.layer_sums(cp["g"] * delta)
        sq = self.layer_sums(delta * delta)
        c = torch.where(sq > 0, (now - prev) / torch.where(sq > 0, sq, 1.0), torch.zeros_like(sq))
        return {"L": L0, "g": cp["g"] + c[self.layer_sums._index] * delta, "U": U}

    def _halves_start(
        self, theta0: torch.Tensor, g: _Gathered, delta: torch.Tensor, cp: dict
    ) -> dict[str, torch.Tensor] | None:
        """Overlapping halves: θ_t on S_t from H_t's chunks kept at the previous end point and a gradient
        pass over H_{t+1}'s chunks only (None where H_t's were not kept)."""
        G, kept = cp.get("G", ()), len(cp.get("G", ()))
        if cp.get("G_seed") != g.draw.seed or kept not in (g.first, g.n_units):
            return None
        new = self._eval(theta0, g, delta, rows=range(kept, g.n_units))  # H_{t+1}'s chunks (none: all kept)
        w = g.weights[0] / self.loss.n_counted
        U = new["U"]
        U[:kept] = self.layer_sums(G.double() * delta)
        grad = new["g"] + w * G.double().sum(0)
        return {"L": new["L"] + w * cp["l"].sum(), "g": grad, "U": U}

    # -- run totals and checkpoints -----------------------------------------------------------------------

    def run_se(self) -> tuple[float, np.ndarray]:
        """Standard errors of the run's total and per-layer LCA (sums over the rows so far): with fresh
        draws sqrt(Σ_t SE_t² + 2 Σ_t cov_t) (independent draws: cov 0; overlapping halves: the covariance of
        adjacent rows, which share a half); with a fixed subset, from the spread of the per-unit run sums
        (every pair of rows is correlated)."""
        if self.fixed and self.unit_run is not None:
            g = self._fixed
            se = stratified_se(self.unit_run, g.strata_rows, g.sizes, self.loss.n_counted)
            return float(se[-1]), se[:-1].cpu().numpy()
        return float(self.se2_total.clamp(min=0).sqrt()), self.se2_layer.clamp(min=0).sqrt().cpu().numpy()

    def run_q(self, n_rows: int) -> float:
        """The run totals' 95 % interval half-width in SEs (:func:`interval_q` of :func:`run_df`)."""
        return interval_q(run_df(self.df, n_rows, self.fixed))

    def state_dict(self) -> dict[str, Any]:
        return {
            "next_t": self.next_t,
            "se2_total": self.se2_total.cpu(),
            "se2_layer": self.se2_layer.cpu(),
            "unit_run": None if self.unit_run is None else self.unit_run.cpu(),
            "examples_evaluated": self.examples_evaluated,
            "example_jvps": self.example_jvps,
            "priming_examples": self.priming_examples,
            "pending": None if self._pending is None else (self._pending[0], self._pending[1].cpu()),
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.next_t = int(s["next_t"])
        self.se2_total.copy_(s["se2_total"])
        self.se2_layer.copy_(s["se2_layer"])
        ur = s.get("unit_run")
        self.unit_run = None if ur is None else ur.to(self.loss.device)
        self.examples_evaluated = int(s.get("examples_evaluated", 0))
        self.example_jvps = int(s.get("example_jvps", 0))
        self.priming_examples = int(s.get("priming_examples", 0))
        pend = s.get("pending")
        self._pending = None if pend is None else (int(pend[0]), pend[1].to(self.loss.device))

    @property
    def graph_error(self) -> None:
        return None


class _Done:
    """A computed step in the shape of :class:`lca_lab.lca.PendingStep`."""

    def __init__(self, st: StepLCA):
        self._st = st

    def result(self) -> StepLCA:
        return self._st


def _eval_mode(fb: FullBatchLoss):
    from .lca import lca_eval_mode

    return lca_eval_mode(fb.model, fb._mode_modules)


def subset_engine(fbl: FullBatchLoss, engine: Any, lcfg: Any, seed: int, start: int = 0) -> SubsetEngine:
    """The :class:`SubsetEngine` of an ``lca`` config (``subset``, ``subset_fixed``, ``subset_seed``) in place
    of the exact ``engine`` (an :class:`lca_lab.lca.LCAEngine`, whose method, tolerance, refinement and layer
    sums it takes over) on ``fbl``'s split; ``seed``: the run's seed (the default ``subset_seed``)."""
    plan = subset_plan_for(fbl, lcfg.get("subset", 0.1))
    base = lcfg.get("subset_seed")
    return SubsetEngine(
        fbl, plan, engine.layer_sums, engine.method, engine.tolerance, engine.max_splits, engine.adaptive,
        fixed=bool(lcfg.get("subset_fixed", False)), base_seed=seed if base is None else int(base),
        start=start,
    )  # fmt: skip


def subset_attrs(engine: SubsetEngine) -> dict[str, Any]:
    """The run file's attributes of a subset estimate (``lca_estimate`` = ``subset`` and the subset)."""
    p = engine.plan
    per_draw = len(p.unit_examples(np.concatenate([s[:a] for s, a in zip(p.strata, p.alloc)])))
    return {
        "lca_estimate": "subset",
        "lca_subset_unit": p.unit,  # example | chunk (whole chunk_size chunks: BatchNorm nets)
        "lca_subset_units": p.n_drawn,  # units per draw
        "lca_subset_units_total": p.n_units,  # units in the split
        "lca_subset_size": per_draw,  # examples per draw (chunk units: the last chunk may be shorter)
        "lca_subset_strata": len(p.strata),  # classes (stratified) or 1
        "lca_subset_df": engine.df,  # degrees of freedom of a row's SE (95 % interval: ± t_0.975,df · SE)
        "lca_subset_halves": engine.halves,  # fresh draws of chunks as overlapping halves (H_t ∪ H_{t+1})
        "lca_subset_fixed": engine.fixed,
        "lca_subset_seed": engine.base_seed,
    }
