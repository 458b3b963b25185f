"""LCA from a random subset of the training split, with standard errors (``lca.estimate=subset``).

For data too big for full passes. Per LCA iteration a subset S of the training split is drawn (a fresh
draw per iteration, or one draw for the whole run with ``lca.subset_fixed=true``); the same quadrature as
the exact path (:class:`lca_lab.lca.LCAEngine`: Simpson points, refinement against ``lca.tolerance``) is
run on the subset's scaled loss

    L̂(θ) = Σ_h (N_h / n_h) Σ_{i ∈ S_h} ℓ_i(θ) / C,

where ℓ_i is the summed loss of sampling unit i over its counted targets, h runs over the strata (N_h
units, n_h of them drawn) and C is the number of counted targets of the *whole* split (known, so no ratio
estimator is needed). L̂, ∇L̂ and hence every LCA value (per parameter, per layer, total) are unbiased for
the exact ones at every Simpson point; the quadrature's residual Σ Â − (L̂(θ_{t+1}) − L̂(θ_t)) is measured
on the same subset and stored as the usual ``lca/error``.

Units of sampling:

* examples (an example's tokens together), stratified by class with proportional allocation where every
  example has one class index and the data are held in memory; otherwise (language models, streamed data)
  one stratum (simple random sampling);
* whole ``chunk_size`` chunks of the split's fixed chunking for BatchNorm nets, whose L is defined by
  those chunks (one stratum).

Standard errors: a unit's contribution to the LCA of layer l is a_{i,l} = Σ_k w_k (∇ℓ_i(θ_k) ⊙ Δ)_l over
the Simpson points k (weights w_k) the estimate used. They come from the per-unit gradients, which the
estimate needs anyway: one ``vmap``-ed per-example gradient pass per chunk of examples (no forward-mode
product per layer: one pass gives every layer, and the subset's gradient is their weighted sum), or one
ordinary backward pass per chunk for BN nets. With the finite-population correction,

    SE² = Σ_h (N_h / C)² (1 − n_h / N_h) s_h² / n_h,

s_h² the sample variance of the a_i in stratum h (for the total: of Σ_l a_{i,l}). A subset equal to the
whole split gives SE = 0 and the exact path's numbers (to float rounding).

Which subset an iteration used is reproducible: row t's seed is stored (``estimate/seed``) and
``SubsetPlan.draw(seed).examples`` returns its example indices (the plan is rebuilt from the data, the
chunk size and ``lca.subset``, see :meth:`SubsetPlan.build`). Seeds: :func:`iteration_seed`.

This module imports torch and numpy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

import numpy as np
import torch
from torch.func import jvp, vmap

from .examples import tree_map
from .lca import FullBatchLoss, LayerSums, StepLCA, _point, check_engine_options

ESTIMATES = ("exact", "subset")
# Per-example gradients are held [m, K] in float32 per vmap-ed pass: m = max(1, PER_EXAMPLE_FLOATS // K).
PER_EXAMPLE_FLOATS = 1 << 24


class SubsetError(ValueError):
    """A bad ``lca.subset``/``lca.estimate`` setting (the message names the fix)."""


def check_estimate(estimate: Any, subset: Any, fixed: Any = False) -> None:
    """Raise :class:`SubsetError` (one line naming the fix) for a bad ``lca.estimate`` / ``lca.subset``."""
    if estimate not in ESTIMATES:
        raise SubsetError(f"lca.estimate={estimate!r} is not one of {list(ESTIMATES)}")
    if not isinstance(fixed, bool):
        raise SubsetError(f"lca.subset_fixed must be true or false, got {fixed!r}")
    if estimate == "exact":
        return
    if isinstance(subset, bool) or not isinstance(subset, (int, float)) or not math.isfinite(subset):
        raise SubsetError(
            f"lca.subset={subset!r}: give a fraction of the training split in (0, 1] (e.g. 0.1) "
            "or a count of examples ≥ 2 (e.g. 5000)"
        )
    if isinstance(subset, float) and not subset.is_integer() and not 0 < subset <= 1:
        raise SubsetError(
            f"lca.subset={subset}: a fraction must be in (0, 1] (e.g. 0.1); a count an integer ≥ 2"
        )
    if subset <= 0:
        raise SubsetError(f"lca.subset={subset}: use a fraction in (0, 1] (e.g. 0.1) or a count ≥ 2")
    if not (isinstance(subset, float) and subset <= 1) and subset < 2:
        raise SubsetError(f"lca.subset={subset}: a count must be ≥ 2 (a standard error needs two units)")


def subset_count(subset: float | int, n_units: int, unit_size: int = 1) -> int:
    """Units to draw for ``lca.subset`` (a fraction of the split, or a count of *examples*; for chunk units
    the count is rounded up to whole chunks of ``unit_size`` examples); at least 2, at most ``n_units``."""
    if isinstance(subset, float) and subset <= 1:
        n = math.ceil(subset * n_units - 1e-9)
    else:
        n = math.ceil(int(subset) / unit_size)
    return int(min(n_units, max(2, n)))


def iteration_seed(base: int, t: int | None) -> int:
    """The seed of the subset of iteration ``t`` (None: the one subset of ``lca.subset_fixed=true``) for
    a run whose ``lca.subset_seed`` (default: the run's seed) is ``base``: a non-negative int63."""
    key = [int(base) & 0xFFFFFFFF, 0x5EB5E7] + ([] if t is None else [int(t) + 1])
    return int(np.random.SeedSequence(key).generate_state(1, np.uint64)[0] >> np.uint64(1))


@dataclass
class Draw:
    """One subset: the seed, the drawn units per stratum (sorted unit ids) and the example indices."""

    seed: int
    units: list[np.ndarray]
    examples: np.ndarray  # sorted example indices [n_examples] int64


@dataclass
class SubsetPlan:
    """How subsets are drawn from a split (independent of θ).

    Attributes:
        n_examples: examples in the split.
        chunk: units are whole chunks of this many examples (BN nets), or None: units are examples.
        strata: unit ids of each stratum (int64 arrays; one stratum: all units).
        alloc: units drawn per stratum (n_h).
    """

    n_examples: int
    chunk: int | None
    strata: list[np.ndarray]
    alloc: list[int]

    @classmethod
    def build(
        cls,
        n_examples: int,
        subset: float | int,
        labels: torch.Tensor | np.ndarray | None = None,
        chunk: int | None = None,
    ) -> SubsetPlan:
        """The plan for ``lca.subset`` = ``subset`` over ``n_examples`` examples.

        ``chunk``: BN nets: units are the split's chunks of ``chunk`` examples (the last may be shorter),
        one stratum. Otherwise units are examples, stratified by ``labels`` [N] (one class per example)
        when given, with proportional allocation (largest remainders) and at least 2 per stratum (all of a
        stratum of fewer than 2), else one stratum.
        """
        N = int(n_examples)
        if chunk is not None:
            n_units = -(-N // int(chunk))
            strata = [np.arange(n_units, dtype=np.int64)]
            return cls(N, int(chunk), strata, [subset_count(subset, n_units, int(chunk))])
        n = subset_count(subset, N)
        if labels is None:
            return cls(N, None, [np.arange(N, dtype=np.int64)], [n])
        lab = np.asarray(labels.cpu() if isinstance(labels, torch.Tensor) else labels).reshape(-1)
        order = np.argsort(lab, kind="stable")
        classes, starts, counts = np.unique(lab[order], return_index=True, return_counts=True)
        strata = [np.sort(order[s : s + c]).astype(np.int64) for s, c in zip(starts, counts)]
        sizes = counts.astype(np.int64)
        floor = np.minimum(sizes, 2)
        if n < floor.sum():
            raise SubsetError(
                f"lca.subset gives {n} examples, fewer than 2 per class for {len(sizes)} classes; "
                f"use lca.subset ≥ {int(floor.sum())}"
            )
        alloc = _proportional(sizes, n, floor)
        return cls(N, None, strata, alloc.tolist())

    @property
    def n_units(self) -> int:
        return sum(len(s) for s in self.strata)

    @property
    def n_drawn(self) -> int:
        """Units per draw."""
        return int(sum(self.alloc))

    @property
    def unit(self) -> str:
        return "example" if self.chunk is None else "chunk"

    def unit_examples(self, u: np.ndarray) -> np.ndarray:
        """Example indices of units ``u`` (sorted ids)."""
        if self.chunk is None:
            return u
        parts = [np.arange(c * self.chunk, min((c + 1) * self.chunk, self.n_examples)) for c in u]
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def draw(self, seed: int) -> Draw:
        """The subset of ``seed``: n_h units of each stratum without replacement (numpy's PCG64 generator
        seeded with ``seed``; strata in order) → :class:`Draw`."""
        rng = np.random.default_rng(int(seed))
        units = []
        for ids, n_h in zip(self.strata, self.alloc):
            pick = ids if n_h >= len(ids) else ids[rng.choice(len(ids), n_h, replace=False)]
            units.append(np.sort(pick))
        ex = np.sort(self.unit_examples(np.concatenate(units)))
        return Draw(int(seed), units, ex)

    def weights(self) -> np.ndarray:
        """N_h / n_h of each stratum [H] float64."""
        return np.array([len(s) / a for s, a in zip(self.strata, self.alloc)], dtype=np.float64)


def _proportional(sizes: np.ndarray, n: int, floor: np.ndarray) -> np.ndarray:
    """n split over strata of ``sizes`` ∝ size: n·N_h/N rounded down, raised to ``floor``, then units added
    where the shortfall from n·N_h/N is largest (or taken where the excess is, ties: the largest stratum)
    until they sum to n; each within [floor, size]."""
    ideal = n * sizes / sizes.sum()
    alloc = np.minimum(np.maximum(floor, np.floor(ideal).astype(np.int64)), sizes)
    while alloc.sum() < n:
        gap = np.where(alloc < sizes, ideal - alloc, -np.inf)
        alloc[int(np.argmax(gap))] += 1
    while alloc.sum() > n:
        excess = np.where(alloc > floor, alloc - ideal + sizes * 1e-12, -np.inf)
        alloc[int(np.argmax(excess))] -= 1
    return alloc


def stratified_se(
    a: torch.Tensor, strata: Sequence[torch.Tensor], sizes: Sequence[int], n_counted: int
) -> torch.Tensor:
    """Standard error of Σ_h (N_h/n_h) Σ_{i∈S_h} a_i / C over the draw: per-unit totals ``a`` [n, ...]
    (float64), ``strata`` the row indices of each stratum's units in ``a``, ``sizes`` N_h, ``n_counted`` C.

    SE² = Σ_h (N_h/C)² (1 − n_h/N_h) s_h² / n_h (s_h²: sample variance, n_h − 1 denominator; a stratum
    taken whole, or of one unit, adds 0) → [...] float64."""
    var = torch.zeros(a.shape[1:], dtype=torch.float64, device=a.device)
    for rows, N_h in zip(strata, sizes):
        n_h = len(rows)
        if n_h < 2 or n_h >= N_h:
            continue
        s2 = a[rows].var(0, correction=1)
        var += (N_h / n_counted) ** 2 * (1.0 - n_h / N_h) * s2 / n_h
    return var.sqrt()


class _Gathered:
    """The drawn units' data, held for the iteration (or the run, with a fixed subset)."""

    def __init__(self, loss: FullBatchLoss, plan: SubsetPlan, draw: Draw):
        dev = loss.device
        w = plan.weights()
        self.draw = draw
        self.parts: list[tuple[Any, torch.Tensor]] = []  # (inputs, targets) per chunk of evaluation
        weights: list[np.ndarray] = []
        stratum: list[np.ndarray] = []
        for h, u in enumerate(draw.units):
            stratum.append(np.full(len(u), h))
            weights.append(np.full(len(u), w[h]))
        self.unit_stratum = np.concatenate(stratum)
        self.unit_weight = torch.tensor(np.concatenate(weights), dtype=torch.float64, device=dev)
        units = np.concatenate(draw.units)
        self.sizes = [len(s) for s in plan.strata]
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
        self.next_t = int(start)
        self.per_class, self.test_loss = False, None
        self._fixed: _Gathered | None = None
        self._none_ok: bool | None = None  # the loss takes reduction="none" (decided at the first pass)
        self._cache: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None
        self.examples_evaluated = 0  # example-gradients so far (points × examples of the subset)
        n_l = layer_sums.n_layers
        dev = loss.device
        # run sums: Σ_t SE_t² (fresh draws); per-unit run sums of a_i (fixed subset)
        self.se2_total = torch.zeros((), dtype=torch.float64, device=dev)
        self.se2_layer = torch.zeros(n_l, dtype=torch.float64, device=dev)
        self.unit_run: torch.Tensor | None = None  # [n_units, n_layers + 1] with a fixed subset

    # -- the draw -----------------------------------------------------------------------------------------

    def seed_of(self, t: int) -> int:
        return iteration_seed(self.base_seed, None if self.fixed else t)

    def _gather(self, t: int) -> _Gathered:
        if self.fixed:
            if self._fixed is None:
                self._fixed = _Gathered(self.loss, self.plan, self.plan.draw(self.seed_of(t)))
            return self._fixed
        return _Gathered(self.loss, self.plan, self.plan.draw(self.seed_of(t)))

    # -- one point ----------------------------------------------------------------------------------------

    def _eval(self, theta: torch.Tensor, g: _Gathered, delta: torch.Tensor | None) -> dict[str, torch.Tensor]:
        """L̂(θ) (0-d), ∇L̂(θ) [K], and per-unit ∇ℓ_i·Δ by layer U [n_units, n_layers] (with ``delta``)."""
        fb = self.loss
        K, C = fb.n_params, fb.n_counted
        dev = fb.device
        grad = torch.zeros(K, dtype=torch.float64, device=dev)
        total = torch.zeros((), dtype=torch.float64, device=dev)
        U = torch.zeros(g.n_units, self.layer_sums.n_layers, dtype=torch.float64, device=dev)
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
                        U[row : row + m] = self._unit_jvps(theta.detach(), xb, yb, delta)
                    row += m
            else:
                leaf = theta.detach().requires_grad_(True)
                params = fb.unflatten(leaf)
                for xb, yb in g.parts:
                    loss_sum = fb._chunk_loss(params, xb, yb)
                    (gc,) = torch.autograd.grad(loss_sum, leaf)
                    w = g.unit_weight[row]
                    grad.add_(gc.double(), alpha=float(w))
                    total += w * loss_sum.detach().double()
                    if delta is not None:
                        U[row] = self.layer_sums(gc.double() * delta)
                    row += 1
        self.examples_evaluated += len(g.draw.examples)
        return {"L": total / C, "g": grad / C, "U": U}

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

    def _units_along(self, theta: torch.Tensor, g: _Gathered, delta: torch.Tensor) -> torch.Tensor:
        """U [n_units, n_layers] at θ by forward-mode products only (a reused endpoint of a fixed subset)."""
        fb = self.loss
        with torch.enable_grad(), _eval_mode(fb):
            if self.plan.chunk is None:
                return torch.cat([self._unit_jvps(theta.detach(), xb, yb, delta) for xb, yb in g.parts])
            rows = []
            for xb, yb in g.parts:

                def f(th: torch.Tensor, xb: Any = xb, yb: torch.Tensor = yb) -> torch.Tensor:
                    return fb._chunk_loss(fb.unflatten(th, layout=False), xb, yb).reshape(1)

                rows.append(self._layer_jvps(f, theta.detach(), delta)[0])
            return torch.stack(rows)

    def _layer_jvps(self, f: Any, theta: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """f: θ → [m]; → [m, n_layers] float64, ∂f/∂θ along Δ restricted to each layer (forward mode)."""
        n_l, K = self.layer_sums.n_layers, self.loss.n_params
        idx = self.layer_sums._index
        d = delta.to(theta.dtype)
        group = max(1, PER_EXAMPLE_FLOATS // max(K, 1))
        out = []

        def dd(tan: torch.Tensor) -> torch.Tensor:
            return jvp(f, (theta,), (tan,))[1]

        for l0 in range(0, n_l, group):
            ls = torch.arange(l0, min(l0 + group, n_l), device=idx.device)
            tangents = torch.where(idx[None, :] == ls[:, None], d[None, :], torch.zeros((), dtype=d.dtype))
            out.append(vmap(dd)(tangents).double())  # [g, m]
        return torch.cat(out).T

    # -- the engine's interface ---------------------------------------------------------------------------

    def reset(self) -> None:
        self._cache = None

    def prime(self, theta: torch.Tensor) -> torch.Tensor:
        """L̂(θ) on the subset of the next iteration (the run's first ``train/loss`` row is an estimate)."""
        p = self._eval(theta, self._gather(self.next_t), None)
        self._cache = (theta, p)
        return p["L"]

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
                pts[f] = self._eval(th, g, delta)
            return pts[f]

        # A fixed subset reuses L̂ and ∇L̂ at θ_t from the previous step (the same subset); the per-unit parts
        # along this step's Δ are forward-mode products only (no gradient pass).
        reused = 0
        if self.fixed and self._cache is not None:
            c0, cp = self._cache
            if c0 is theta0 or torch.equal(c0, theta0):
                pts[Fraction(0)] = {"L": cp["L"], "g": cp["g"], "U": self._units_along(theta0, g, delta)}
                reused = 1
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
        C = self.loss.n_counted
        a = torch.cat([ubar, ubar.sum(1, keepdim=True)], 1)  # [n_units, n_layers + 1] per-unit LCA
        se = stratified_se(a, g.strata_rows, g.sizes, C)
        layer_se, total_se = se[:-1], se[-1]
        if self.fixed:
            self.unit_run = a.clone() if self.unit_run is None else self.unit_run.add_(a)
        self.se2_total += total_se**2
        self.se2_layer += layer_se**2
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
        self._cache = (theta1, p1)
        return st

    # -- run totals and checkpoints -----------------------------------------------------------------------

    def run_se(self) -> tuple[float, np.ndarray]:
        """Standard errors of the run's total and per-layer LCA (sums over the rows so far): with fresh
        draws sqrt(Σ_t SE_t²) (independent draws); with a fixed subset, from the spread of the per-unit run
        sums (the rows' errors are correlated, so sqrt(Σ SE²) would be wrong)."""
        if self.fixed and self.unit_run is not None:
            g = self._fixed
            se = stratified_se(self.unit_run, g.strata_rows, g.sizes, self.loss.n_counted)
            return float(se[-1]), se[:-1].cpu().numpy()
        return float(self.se2_total.sqrt()), self.se2_layer.sqrt().cpu().numpy()

    def state_dict(self) -> dict[str, Any]:
        return {
            "next_t": self.next_t,
            "se2_total": self.se2_total.cpu(),
            "se2_layer": self.se2_layer.cpu(),
            "unit_run": None if self.unit_run is None else self.unit_run.cpu(),
            "examples_evaluated": self.examples_evaluated,
        }

    def load_state_dict(self, s: dict[str, Any]) -> None:
        self.next_t = int(s["next_t"])
        self.se2_total.copy_(s["se2_total"])
        self.se2_layer.copy_(s["se2_layer"])
        ur = s.get("unit_run")
        self.unit_run = None if ur is None else ur.to(self.loss.device)
        self.examples_evaluated = int(s.get("examples_evaluated", 0))

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


def subset_plan_for(loss: FullBatchLoss, subset: float | int, stratify: bool = True) -> SubsetPlan:
    """The plan a run with ``lca.subset`` = ``subset`` draws from ``loss``'s split: whole chunks for BN
    nets; else examples, stratified by class when the split is held in memory with one class index per
    example (``stratify``), else one stratum."""
    ex = loss.examples
    if loss.has_bn:
        return SubsetPlan.build(len(ex), subset, chunk=loss.chunk_size)
    labels = None
    if stratify and not ex.streamed and ex.targets.dim() == 1 and not ex.has_ignored:
        labels = ex.targets
    return SubsetPlan.build(len(ex), subset, labels=labels)


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
        "lca_subset_fixed": engine.fixed,
        "lca_subset_seed": engine.base_seed,
    }
