"""Statistics on LCA results: the tests and summaries behind the paper's claims.

Lan et al., NeurIPS 2019 ("LCA: Loss Change Allocation for Neural Network Training"):

* Section 3 -- "learning is very noisy": :func:`percent_helping` (Table 1), :func:`mean_std`
  (the "mean ± std over runs" summaries), :func:`oscillation_period` ("weights change direction
  every 6.7 iterations") and :func:`heavy_tails` (Weibull shape k < 1; tail contributions ≈ 3x a
  Gaussian's).
* Section 4 -- "some layers hurt overall": :func:`layer_effects` (one-sample t-test of each layer's
  total LCA against 0 across seeds), :func:`welch` / :func:`layer_welch` (configuration A vs B, e.g.
  last layer frozen or not) and :func:`regression` (last-layer LCA vs momentum delay, Figure 5).
* Section 5 -- "learning is synchronized across layers": :func:`moments_of_learning`,
  :func:`synchronized_moments` and the random-shift baseline :func:`shift_baseline` (Figure 6).

Conventions: LCA is in nats (a change of the mean training-set cross-entropy). Negative LCA =
"helping" (the parameter/layer reduced the loss), positive = "hurting". Every public function
returns plain Python ``float``/``int``/``str``/``bool``/``list``/``dict`` (except
:func:`moments_of_learning`, which returns an index array) so results can go straight to JSON;
undefined quantities are ``float("nan")`` (``json.dumps`` writes ``NaN``) and an infinite period is
``float("inf")``.

Only numpy and scipy are imported here on purpose: this module must be usable to analyse stored
results on a machine without torch.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from scipy import stats

__all__ = [
    "adjust_pvalues",
    "heavy_tails",
    "layer_effects",
    "layer_welch",
    "mean_std",
    "moments_of_learning",
    "oscillation_period",
    "percent_helping",
    "regression",
    "shift_baseline",
    "synchronized_moments",
    "welch",
]

_CORRECTIONS = ("holm", "bh", "none")


def _f(x) -> float:
    """Plain Python float (numpy scalars are not JSON-serialisable by the stdlib)."""
    return float(x)


# --------------------------------------------------------------------------------------------------
# Multiple comparisons
# --------------------------------------------------------------------------------------------------


def adjust_pvalues(p, correction: str = "holm") -> np.ndarray:
    """Adjust a family of p-values for multiple comparisons.

    Args:
        p: [m] raw p-values. NaN entries (untestable layers, e.g. fewer than 2 seeds or zero
            variance) are left NaN and do not count towards the family size m.
        correction: ``"holm"`` (Holm-Bonferroni step-down; controls the family-wise error rate, the
            conservative choice for "this layer hurts" claims), ``"bh"`` (Benjamini-Hochberg false
            discovery rate, via ``scipy.stats.false_discovery_control``) or ``"none"``.

    Returns:
        [m] adjusted p-values (float64, in [0, 1]); compare them directly with alpha.
    """
    if correction not in _CORRECTIONS:
        raise ValueError(f"correction must be one of {_CORRECTIONS}, got {correction!r}")
    p = np.asarray(p, dtype=np.float64)
    out = np.full(p.shape, np.nan)
    ok = np.isfinite(p)
    q = p[ok]
    if q.size == 0:
        return out
    if correction == "none":
        out[ok] = q
    elif correction == "bh":
        out[ok] = stats.false_discovery_control(q, method="bh")
    else:
        # Holm: the j-th smallest p (0-based) is multiplied by (m - j); the running maximum keeps the
        # adjusted values monotone in the raw ones. scipy has no Holm routine, hence this one.
        m = q.size
        order = np.argsort(q, kind="stable")
        scaled = np.minimum(1.0, (m - np.arange(m)) * q[order])
        adj = np.empty(m)
        adj[order] = np.maximum.accumulate(scaled)
        out[ok] = adj
    return out


# --------------------------------------------------------------------------------------------------
# Section 4: does a layer help or hurt? Does a configuration change help?
# --------------------------------------------------------------------------------------------------


def _ttest_1samp(x: np.ndarray) -> tuple[float, float]:
    """(t, p) of a two-sided one-sample t-test against 0; NaN when it is undefined.

    Undefined cases are handled here rather than left to scipy, which warns (and, for zero
    variance, may return ±inf) -- a frozen layer has total LCA exactly 0 in every seed and must
    come out as "n.s.", not as an error or a spurious infinite t.
    """
    if x.size < 2 or not np.ptp(x) > 0:
        return math.nan, math.nan
    res = stats.ttest_1samp(x, 0.0)
    return _f(res.statistic), _f(res.pvalue)


def layer_effects(
    totals, layer_names: Sequence[str], alpha: float = 0.05, correction: str = "holm"
) -> list[dict]:
    """Per layer, test whether its total LCA differs from 0 across seeds (paper Section 4).

    Args:
        totals: [n_seeds, n_layers] total LCA (nats, summed over all iterations and all parameters
            of the layer) per seed and layer. NaN entries (missing runs) are dropped per layer.
        layer_names: [n_layers] names, used for the ``layer`` key.
        alpha: significance level applied to the *adjusted* p-values.
        correction: multiple-comparison correction across layers, see :func:`adjust_pvalues`.

    Returns:
        One dict per layer, in input order, with keys ``layer`` (str), ``n`` (int, seeds used),
        ``mean`` and ``std`` (nats; std with ddof=1, NaN for n < 2), ``t``, ``p`` (two-sided
        one-sample t-test against 0), ``p_adj`` (corrected across layers), ``significant``
        (``p_adj < alpha``) and ``direction``: ``"helps"`` (significant, mean < 0 -- the layer
        reduced the loss), ``"hurts"`` (significant, mean > 0) or ``"n.s."``.
    """
    totals = np.asarray(totals, dtype=np.float64)
    if totals.ndim != 2:
        raise ValueError(f"totals must be [n_seeds, n_layers], got shape {totals.shape}")
    if len(layer_names) != totals.shape[1]:
        raise ValueError(f"{len(layer_names)} layer names for {totals.shape[1]} layers")
    rows = []
    for j, name in enumerate(layer_names):
        x = totals[:, j]
        x = x[np.isfinite(x)]
        t, p = _ttest_1samp(x)
        s = mean_std(x)
        rows.append({"layer": str(name), "n": s["n"], "mean": s["mean"], "std": s["std"], "t": t, "p": p})
    p_adj = adjust_pvalues([r["p"] for r in rows], correction)
    for r, pa in zip(rows, p_adj):
        r["p_adj"] = _f(pa)
        r["significant"] = bool(pa < alpha)  # NaN < alpha is False: untestable -> not significant
        r["direction"] = ("helps" if r["mean"] < 0 else "hurts") if r["significant"] else "n.s."
    return rows


def welch(a, b, alpha: float = 0.05) -> dict:
    """Welch (unequal-variance) two-sample t-test between two configurations.

    Welch rather than Student because configurations (e.g. last layer frozen vs trained) can change
    the run-to-run spread, and the seed counts may differ; Student's pooled variance is then
    miscalibrated.

    Args:
        a: [n_a] one scalar per seed for configuration A (e.g. final train loss in nats, or a
            layer's total LCA in nats). NaNs are dropped.
        b: [n_b] the same quantity for configuration B.
        alpha: significance level for ``significant``.

    Returns:
        dict with ``n_a``, ``n_b`` (int), ``mean_a``, ``mean_b``, ``std_a``, ``std_b`` (ddof=1),
        ``diff`` (= mean_b - mean_a), ``t`` (Welch t of B minus A, so it has the sign of ``diff``),
        ``p`` (two-sided), ``significant`` (p < alpha) and ``direction``: ``"b lower"`` /
        ``"b higher"`` when significant, else ``"n.s."``. t and p are NaN when either side has
        fewer than 2 values or both sides have zero variance.
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    a, b = a[np.isfinite(a)], b[np.isfinite(b)]
    sa, sb = mean_std(a), mean_std(b)
    t = p = math.nan
    if a.size >= 2 and b.size >= 2 and (np.ptp(a) > 0 or np.ptp(b) > 0):
        res = stats.ttest_ind(b, a, equal_var=False)
        t, p = _f(res.statistic), _f(res.pvalue)
    diff = sb["mean"] - sa["mean"]
    significant = bool(p < alpha)
    return {
        "n_a": sa["n"],
        "n_b": sb["n"],
        "mean_a": sa["mean"],
        "mean_b": sb["mean"],
        "std_a": sa["std"],
        "std_b": sb["std"],
        "diff": diff,
        "t": t,
        "p": p,
        "significant": significant,
        "direction": ("b lower" if diff < 0 else "b higher") if significant else "n.s.",
    }


def layer_welch(
    totals_a, totals_b, layer_names: Sequence[str], alpha: float = 0.05, correction: str = "holm"
) -> list[dict]:
    """Per-layer Welch test of total LCA between configurations A and B, corrected across layers.

    Args:
        totals_a: [n_a, n_layers] total LCA per seed and layer (nats) for configuration A.
        totals_b: [n_b, n_layers] the same for configuration B (same layer order).
        layer_names: [n_layers] names.
        alpha: significance level applied to ``p_adj``.
        correction: see :func:`adjust_pvalues`.

    Returns:
        One dict per layer: ``layer`` plus every key of :func:`welch` (``diff`` = mean_b - mean_a,
        nats; negative = the layer helps more in B), then ``p_adj``; ``significant`` and
        ``direction`` are based on ``p_adj``.
    """
    totals_a = np.asarray(totals_a, dtype=np.float64)
    totals_b = np.asarray(totals_b, dtype=np.float64)
    if totals_a.ndim != 2 or totals_b.ndim != 2 or totals_a.shape[1] != totals_b.shape[1]:
        raise ValueError(f"need [n_a, L] and [n_b, L] arrays, got {totals_a.shape} and {totals_b.shape}")
    if len(layer_names) != totals_a.shape[1]:
        raise ValueError(f"{len(layer_names)} layer names for {totals_a.shape[1]} layers")
    rows = [
        {"layer": str(name), **welch(totals_a[:, j], totals_b[:, j], alpha)}
        for j, name in enumerate(layer_names)
    ]
    p_adj = adjust_pvalues([r["p"] for r in rows], correction)
    for r, pa in zip(rows, p_adj):
        r["p_adj"] = _f(pa)
        r["significant"] = bool(pa < alpha)
        r["direction"] = ("b lower" if r["diff"] < 0 else "b higher") if r["significant"] else "n.s."
    return rows


def regression(x, y) -> dict:
    """Ordinary least-squares line y = slope·x + intercept (``scipy.stats.linregress``).

    Used for Figure 5: a layer's total LCA (nats) against a swept setting such as the last layer's
    momentum delay (delay = momentum / (1 - momentum)); the paper calls the relation "fairly linear".

    Args:
        x: [n] swept values (one per run; repeated x for several seeds is fine).
        y: [n] responses (e.g. total LCA in nats). Pairs with a NaN in either are dropped.

    Returns:
        dict with ``slope`` (units of y per unit of x), ``intercept``, ``r2`` (squared Pearson r),
        ``p`` (two-sided test of slope = 0), ``stderr`` (standard error of the slope),
        ``intercept_stderr`` and ``n`` (int).
    """
    x = np.asarray(x, dtype=np.float64).ravel()
    y = np.asarray(y, dtype=np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y differ in length: {x.size} vs {y.size}")
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if x.size < 3:
        # Two points always fit exactly; there is no residual to estimate a p-value from.
        raise ValueError(f"regression needs at least 3 finite points, got {x.size}")
    res = stats.linregress(x, y)
    return {
        "slope": _f(res.slope),
        "intercept": _f(res.intercept),
        "r2": _f(res.rvalue) ** 2,
        "p": _f(res.pvalue),
        "stderr": _f(res.stderr),
        "intercept_stderr": _f(res.intercept_stderr),
        "n": int(x.size),
    }


# --------------------------------------------------------------------------------------------------
# Section 3: how noisy is learning?
# --------------------------------------------------------------------------------------------------


def mean_std(values) -> dict:
    """Across-seed summary "mean ± std".

    Args:
        values: any shape, flattened; one value per run (e.g. :func:`percent_helping` per seed).

    Returns:
        dict with ``mean``, ``std`` (sample std, ddof=1; NaN when n < 2) and ``n`` (int). The mean is
        NaN for n = 0.
    """
    v = np.asarray(values, dtype=np.float64).ravel()
    n = int(v.size)
    mean = _f(v.mean()) if n else math.nan
    std = _f(v.std(ddof=1)) if n >= 2 else math.nan
    return {"mean": mean, "std": std, "n": n}


def percent_helping(param_lca) -> float:
    """Percentage of helping parameters for one run (the paper's Table 1 quantity).

    Per iteration t: 100 · #(LCA[t] < 0) / #(LCA[t] ≠ 0) -- parameters with exactly zero LCA (e.g.
    first-layer weights on always-off MNIST pixels, frozen layers) are neither helping nor hurting
    and are excluded from the denominator, as in the paper. The per-iteration percentages are then
    averaged with equal weight per iteration; iterations where every entry is zero are skipped.

    Args:
        param_lca: [T, K] LCA per iteration and parameter (nats).

    Returns:
        Percentage in [0, 100] (float); NaN if every iteration is all zeros. Average over seeds with
        :func:`mean_std`.
    """
    a = np.asarray(param_lca)
    if a.ndim != 2:
        raise ValueError(f"param_lca must be [T, K], got shape {a.shape}")
    helping = np.count_nonzero(a < 0, axis=1)
    nonzero = np.count_nonzero(a, axis=1)
    ok = nonzero > 0
    if not ok.any():
        return math.nan
    return _f(np.mean(100.0 * helping[ok] / nonzero[ok]))


def oscillation_period(n_changes, n_iterations) -> float:
    """Mean number of iterations between direction changes ("every 6.7 iterations", Section 3).

    For a single count this is ``n_iterations / n_changes``. For per-parameter counts it is the
    pooled ratio ``Σ n_iterations / Σ n_changes`` (total parameter-iterations divided by total
    changes) -- *not* the mean of per-parameter ratios, which would be infinite as soon as one
    parameter never changes direction (e.g. a weight that never moves).

    Args:
        n_changes: scalar or [K] (any shape) number of direction changes (sign flips of the update,
            or of the gradient) per parameter.
        n_iterations: scalar T, or an array broadcastable to ``n_changes`` (iterations observed per
            parameter).

    Returns:
        Iterations per direction change (float); ``inf`` if there are no changes at all.
    """
    c = np.asarray(n_changes, dtype=np.float64)
    t = np.broadcast_to(np.asarray(n_iterations, dtype=np.float64), c.shape)
    if np.any(c < 0) or np.any(t < 0):
        raise ValueError("counts must be non-negative")
    total = c.sum()
    if total == 0:
        return math.inf
    return _f(t.sum() / total)


def _tail_side(x: np.ndarray, sigmas: float, max_fit: int, rng: np.random.Generator) -> dict:
    """Weibull fit and Gaussian tail comparison for positive magnitudes x (see :func:`heavy_tails`)."""
    n = int(x.size)
    gauss_frac = math.exp(-0.5 * sigmas**2)
    out = {
        "n": n,
        "mean": math.nan,
        "rms": math.nan,
        "weibull_k": math.nan,
        "weibull_scale": math.nan,
        "tail_mass_fraction": math.nan,
        "gaussian_tail_mass_fraction": gauss_frac,
        "tail_ratio": math.nan,
    }
    if n == 0:
        return out
    rms = math.sqrt(float(np.mean(np.square(x))))
    thr = sigmas * rms
    frac = float(x[x > thr].sum() / x.sum())
    out.update(mean=_f(x.mean()), rms=rms, tail_mass_fraction=frac, tail_ratio=frac / gauss_frac)
    if n >= 2 and np.ptp(x) > 0:
        fit = x if n <= max_fit else rng.choice(x, size=max_fit, replace=False)
        # LCA magnitudes are ~1e-8..1e-4 nats; fitting in units of the RMS keeps the optimiser in a
        # well-scaled region. The shape k is scale-free; the scale is mapped back to nats.
        k, _, scale = stats.weibull_min.fit(fit / rms, floc=0)
        out.update(weibull_k=_f(k), weibull_scale=_f(scale) * rms)
    return out


def heavy_tails(values, gaussian_sigmas: float = 3.0, max_fit: int = 200_000, seed: int = 0) -> dict:
    """How heavy-tailed are helping and hurting LCA? (Section 3, Figure 3b / S10.)

    ``values`` is flattened and exact zeros are dropped (they neither help nor hurt). The two sides
    are analysed separately as positive magnitudes: helping x = -v for v < 0, hurting x = v for v > 0.
    For each side:

    * **Weibull fit**: ``scipy.stats.weibull_min.fit(x, floc=0)`` (MLE with location fixed at 0) on
      at most ``max_fit`` entries drawn without replacement with ``np.random.default_rng(seed)``
      (the fit is iterative; a subsample of 200k already pins k to about ±0.003). Shape k < 1 means
      heavier-than-exponential tails; the paper finds k < 1 for both sides.
    * **Tail mass vs a Gaussian**: with σ = sqrt(mean(x²)) (the RMS, i.e. the standard deviation of a
      zero-mean distribution with the same second moment) and c = ``gaussian_sigmas``,
      ``tail_mass_fraction`` = Σ x[x > cσ] / Σ x, the share of the side's total |LCA| carried by
      entries beyond c standard deviations. For the magnitude of a zero-mean Gaussian with the same
      second moment (a half-normal) the same share is analytic:
      E[|Z|; |Z| > c] / E|Z| = 2φ(c) / 2φ(0) = exp(-c²/2) (0.0111 for c = 3), reported as
      ``gaussian_tail_mass_fraction``. ``tail_ratio`` = their quotient: "the tail contributes X
      times what a Gaussian would" (paper: about 3). It is 1 for Gaussian LCA, larger for heavy tails.
      Computed on all entries of the side (cheap), not on the subsample.

    Args:
        values: LCA entries, any shape (nats).
        gaussian_sigmas: c, the tail threshold in standard deviations.
        max_fit: largest number of entries per side passed to the Weibull fit.
        seed: seed of the subsampling generator (results are reproducible).

    Returns:
        dict with ``gaussian_sigmas``, ``n_zero`` (int, entries ignored) and ``helping`` /
        ``hurting`` dicts with keys ``n`` (int), ``mean`` and ``rms`` (nats, of the magnitudes),
        ``weibull_k``, ``weibull_scale`` (nats), ``tail_mass_fraction``,
        ``gaussian_tail_mass_fraction`` and ``tail_ratio``. A side with no entries has n = 0 and NaN
        statistics; the fit is NaN for fewer than 2 distinct values.
    """
    if max_fit < 2:
        raise ValueError("max_fit must be at least 2")
    v = np.asarray(values, dtype=np.float64).ravel()
    v = v[np.isfinite(v)]
    rng = np.random.default_rng(seed)
    return {
        "gaussian_sigmas": _f(gaussian_sigmas),
        "n_zero": int(np.count_nonzero(v == 0)),
        "helping": _tail_side(-v[v < 0], gaussian_sigmas, max_fit, rng),
        "hurting": _tail_side(v[v > 0], gaussian_sigmas, max_fit, rng),
    }


# --------------------------------------------------------------------------------------------------
# Section 5: moments of learning and their synchronisation across layers
# --------------------------------------------------------------------------------------------------


def moments_of_learning(curve, k: int = 20) -> np.ndarray:
    """Indices of the k strongest "moments of learning" of one LCA curve.

    A moment of learning is a strict local minimum of the instantaneous LCA curve at an interior
    iteration: ``curve[t] < curve[t-1]`` and ``curve[t] < curve[t+1]`` for 1 ≤ t ≤ T-2 -- an
    iteration where the loss decreased more than on the iteration before or after. Endpoints never
    count (they have only one neighbour); flat-bottomed minima (equal neighbours) do not count; NaN
    neighbours make a comparison false. Of all moments, the k with the most negative LCA (largest
    learning) are kept -- ties broken towards the earlier iteration -- whatever their sign.

    Args:
        curve: [T] LCA per iteration (nats) of one layer, or one class × layer.
        k: how many moments to keep (the paper uses 20); fewer are returned if fewer exist.

    Returns:
        [min(k, #minima)] int64 iteration indices, sorted ascending.
    """
    c = np.asarray(curve, dtype=np.float64)
    if c.ndim != 1:
        raise ValueError(f"curve must be 1-D [T], got shape {c.shape}")
    if k < 0:
        raise ValueError("k must be non-negative")
    if c.size < 3 or k == 0:
        return np.zeros(0, dtype=np.int64)
    mid = c[1:-1]
    idx = np.flatnonzero((mid < c[:-2]) & (mid < c[2:])) + 1
    strongest = idx[np.argsort(c[idx], kind="stable")[:k]]
    return np.sort(strongest).astype(np.int64)


def _as_groups(curves) -> tuple[np.ndarray, bool]:
    """[n_groups, n_layers, T] view of the input, and whether it was per-class (3-D)."""
    c = np.asarray(curves, dtype=np.float64)
    if c.ndim == 2:
        return c[None], False
    if c.ndim == 3:
        return c, True
    raise ValueError(f"curves must be [n_layers, T] or [n_classes, n_layers, T], got shape {c.shape}")


def _moment_table(groups: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Moments of every (group, layer) curve padded to k: indices [G, L, k] and validity mask [G, L, k]."""
    g, n_layers, _ = groups.shape
    idx = np.zeros((g, n_layers, k), dtype=np.int64)
    valid = np.zeros((g, n_layers, k), dtype=bool)
    for i in range(g):
        for j in range(n_layers):
            m = moments_of_learning(groups[i, j], k)
            idx[i, j, : m.size] = m
            valid[i, j, : m.size] = True
    return idx, valid


def _count_synchronized(idx: np.ndarray, valid: np.ndarray, shifts: np.ndarray, T: int) -> np.ndarray:
    """Number of synchronised moments for each row of shifts.

    Args:
        idx, valid: [G, L, k] moment table (see :func:`_moment_table`).
        shifts: [R, G, L] integer offset added to every moment of that group and layer.
        T: curve length; shifted moments outside the interior 1..T-2 are dropped.

    Returns:
        [R] int64: Σ over groups of #iterations at which every layer has a (shifted) moment.

    Counting is done against layer 0's moments: each of them is synchronised iff every other layer
    has a moment at the same iteration. Moments within one layer are distinct, so nothing is double
    counted. The work is R·G·(L-1)·k² comparisons, independent of T, and is chunked over R to keep
    the temporaries near 16M elements.
    """
    r_total, g, n_layers = shifts.shape
    k = idx.shape[-1]
    counts = np.zeros(r_total, dtype=np.int64)
    if k == 0 or g == 0:
        return counts
    chunk = max(1, (1 << 24) // max(1, g * max(1, n_layers - 1) * k * k))
    for s in range(0, r_total, chunk):
        sh = shifts[s : s + chunk]
        pos = idx[None] + sh[..., None]  # [r, G, L, k]
        ok = valid[None] & (pos >= 1) & (pos <= T - 2)
        base, base_ok = pos[:, :, 0], ok[:, :, 0]  # [r, G, k]
        if n_layers > 1:
            hit = (base[:, :, None, :, None] == pos[:, :, 1:, None, :]) & ok[:, :, 1:, None, :]
            sync = base_ok & hit.any(axis=-1).all(axis=2)
        else:
            sync = base_ok  # one layer is trivially synchronised with itself
        counts[s : s + chunk] = sync.sum(axis=(1, 2))
    return counts


def synchronized_moments(curves, k: int = 20) -> dict:
    """Iterations at which every layer has a moment of learning (paper Section 5, red dots in Fig. 6).

    Args:
        curves: [n_layers, T] per-layer LCA curves (nats per iteration), or
            [n_classes, n_layers, T] per-class per-layer curves (the LCA of each class's share of the
            training loss). Per-class input is analysed class by class and the counts summed.
        k: moments kept per curve (see :func:`moments_of_learning`).

    Returns:
        dict with ``count`` (int, total synchronised moments), ``iterations`` (ascending list of
        ints for 2-D input; for 3-D input one such list per class) and ``per_class`` (list of ints,
        the count of each class; a single entry for 2-D input).
    """
    groups, per_class = _as_groups(curves)
    iters = []
    for g in groups:
        common = None
        for layer in g:
            m = set(moments_of_learning(layer, k).tolist())
            common = m if common is None else common & m
        iters.append(sorted(common or ()))
    per = [len(x) for x in iters]
    return {"count": int(sum(per)), "iterations": iters if per_class else iters[0], "per_class": per}


def shift_baseline(
    curves, k: int = 20, max_shift: int = 2, repeats: int = 1000, seed: int = 0, keep_counts: bool = True
) -> dict:
    """Random-shift baseline for the number of synchronised moments (Section 5, Figure 6).

    Null model of the paper: if layers learned independently, moving each layer's moments by a
    small random offset should not change how often they line up. Each repeat draws, for every
    class and every layer independently, an offset uniformly from {-max_shift, ..., max_shift}
    (the paper: -2..2) and counts synchronised moments as in :func:`synchronized_moments`.

    What is shifted: the *detected moment indices* (top-k per curve, found once on the unshifted
    curves), not the curves. This equals shifting the curve itself except at the edges: a moment
    shifted outside the interior 1..T-2 is dropped (as a moment of an edge-padded shifted curve
    could not sit on an endpoint) and is not replaced by the (k+1)-th strongest minimum. With
    max_shift ≪ T this affects only moments within max_shift of an end.

    The p-value is the usual permutation-style one, (1 + #{repeats with count ≥ actual}) /
    (repeats + 1); it is never 0, so with repeats = 1000 the smallest possible value is ≈ 0.001.
    Resolution limit: a draw that gives every layer of a class the *same* offset only translates
    that class's moments, so it reproduces the class's actual count (up to edge effects). If that
    happens in every class at once, the repeat's count equals the actual count, which puts a floor
    under the p-value of about ``p_floor`` = (2·max_shift + 1) ** (-(n_layers - 1) · n_classes).
    For a single group of 3 layers with max_shift = 2 that is 1/25 = 0.04: however strong the
    synchronisation, per-layer curves of one run cannot reach p < 0.04 -- use the per-class curves
    (the paper's Figure 6 has 10 classes, floor 25**-10) or several runs stacked as groups for a
    stronger test. The same effect makes the test slightly conservative under the null.

    Args:
        curves: [n_layers, T] or [n_classes, n_layers, T] LCA curves (nats per iteration).
        k: moments kept per curve.
        max_shift: largest absolute offset, in iterations.
        repeats: number of random shift draws.
        seed: seed for ``np.random.default_rng``.
        keep_counts: include the per-repeat counts in the result.

    Returns:
        dict with ``actual`` (int), ``baseline_mean``, ``baseline_std`` (ddof=0 over repeats),
        ``p_value``, ``p_floor`` (see above), ``repeats`` (int), ``max_shift`` (int), ``k`` (int) and,
        if ``keep_counts``, ``counts`` ([repeats] list of ints).

    Cost: O(repeats · n_classes · n_layers · k²) integer comparisons, vectorised; repeats = 1000 on
    [10, 3, 500] takes a few tens of milliseconds.
    """
    if repeats < 1:
        raise ValueError("repeats must be at least 1")
    if max_shift < 0:
        raise ValueError("max_shift must be non-negative")
    groups, _ = _as_groups(curves)
    g, n_layers, T = groups.shape
    idx, valid = _moment_table(groups, k)
    actual = int(_count_synchronized(idx, valid, np.zeros((1, g, n_layers), dtype=np.int64), T)[0])
    rng = np.random.default_rng(seed)
    shifts = rng.integers(-max_shift, max_shift + 1, size=(repeats, g, n_layers))
    counts = _count_synchronized(idx, valid, shifts, T)
    out = {
        "actual": actual,
        "baseline_mean": _f(counts.mean()),
        "baseline_std": _f(counts.std()),
        "p_value": _f((1 + np.count_nonzero(counts >= actual)) / (repeats + 1)),
        "p_floor": _f((2.0 * max_shift + 1.0) ** (-(n_layers - 1) * g)),
        "repeats": int(repeats),
        "max_shift": int(max_shift),
        "k": int(k),
    }
    if keep_counts:
        out["counts"] = counts.tolist()
    return out
