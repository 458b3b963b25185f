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
the Simpson points k (weights w_k) the estimate used: for examples by forward-mode products along Δ
restricted to each layer (``torch.func.jvp``, vmap-ed over the layers), for BN nets' chunks from each
chunk's own backward pass. With the finite-population correction,

    SE² = Σ_h (N_h / C)² (1 − n_h / N_h) s_h² / n_h,

s_h² the sample variance of the a_i in stratum h (for the total: of Σ_l a_{i,l}). A subset equal to the
whole split gives SE = 0 and the exact path's numbers (to float rounding).

The engine, :class:`lca_lab.subset_engine.SubsetEngine`, reuses a step's start point θ_t from the
previous step's end point where that gives the same numbers (fresh draws of examples: the previous
draw's ∇L̂ moved per layer onto this draw's forward-mode sums; fresh draws of BN chunks: overlapping
halves; a fixed subset: as it is), so a step costs 2 gradient points over the subset (2.5 for halves)
against the exact path's 2 over the split.

Which subset an iteration used is reproducible: row t's seed is stored (``estimate/seed``) and
``SubsetPlan.draw(seed).examples`` returns its example indices (the plan is rebuilt from the data, the
chunk size and ``lca.subset``, see :meth:`SubsetPlan.build`). Seeds: :func:`iteration_seed`.

Intervals: a draw's SE has ``df`` = Σ_h (n_h − 1) degrees of freedom over the strata sampled in part
(:func:`draw_df`; n − 2 for halves); the 95 % interval is ± t_{0.975, df} · SE (:func:`interval_q`: 2.31
for 9 chunks, 1.97 for 450 examples in 10 classes), the run total's with ``df`` × rows for fresh draws
and ``df`` for a fixed subset (:func:`run_df`).

This module imports torch, numpy and scipy only.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.stats
import torch

from .lca import FullBatchLoss

ESTIMATES = ("exact", "subset")


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


def draw_df(plan: SubsetPlan, halves: bool = False) -> int:
    """Degrees of freedom of one draw's SE: Σ_h (n_h − 1) over the strata drawn in part (a stratum taken
    whole, or of one unit, adds no variance and no degree of freedom); 0: no sampling error. Overlapping
    halves (``halves``): n − 2, one degree of freedom less per half."""
    if halves:
        return int(plan.n_drawn - 2)
    return int(sum(a - 1 for s, a in zip(plan.strata, plan.alloc) if 2 <= a < len(s)))


def run_df(df_draw: int, n_rows: int, fixed: bool) -> int:
    """Degrees of freedom of the run total's SE: the draw's for a fixed subset, the sum over the rows'
    independent draws otherwise."""
    return int(df_draw if fixed else df_draw * max(int(n_rows), 1))


def interval_q(df: float, level: float = 0.95) -> float:
    """The half-width of the ``level`` interval in SEs: Student's t quantile with ``df`` degrees of freedom
    (the normal one where df is 0, meaning no sampling error, or infinite)."""
    p = 0.5 + level / 2
    if not df or not math.isfinite(df):
        return float(scipy.stats.norm.ppf(p))
    return float(scipy.stats.t.ppf(p, df))


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

    def half(self, seed: int, size: int) -> np.ndarray:
        """A half-draw of overlapping-halves subsets: ``size`` units of the (single) stratum without
        replacement, sorted (numpy's PCG64 seeded with ``seed``)."""
        rng = np.random.default_rng(int(seed))
        ids = self.strata[0]
        return np.sort(ids[rng.choice(len(ids), size, replace=False)])

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
    a: torch.Tensor,
    strata: Sequence[torch.Tensor],
    sizes: Sequence[int],
    n_counted: int,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """Standard error of Σ_h W_h Σ_{i∈S_h} a_i / C over the draw, each S_h a simple random sample of n_h of
    N_h units: per-unit totals ``a`` [n, ...] (float64), ``strata`` the row indices of each sample's units
    in ``a``, ``sizes`` N_h, ``n_counted`` C, ``weights`` W_h (default N_h / n_h: strata).

    SE² = Σ_h (W_h/C)² n_h (1 − n_h/N_h) s_h² (s_h²: sample variance, n_h − 1 denominator; a sample of a
    whole stratum, or of one unit, adds 0); with W_h = N_h/n_h that is Σ_h (N_h/C)² (1 − n_h/N_h) s_h²/n_h
    → [...] float64."""
    var = torch.zeros(a.shape[1:], dtype=torch.float64, device=a.device)
    for h, (rows, N_h) in enumerate(zip(strata, sizes)):
        n_h = len(rows)
        if n_h < 2 or n_h >= N_h:
            continue
        w = N_h / n_h if weights is None else weights[h]
        var += (w / n_counted) ** 2 * n_h * (1.0 - n_h / N_h) * a[rows].var(0, correction=1)
    return var.sqrt()


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
