"""Known-answer tests for lca_lab.stats (numpy/scipy only; the whole file runs in a few seconds)."""

import json
import math
import time

import numpy as np
import pytest
from scipy import stats as sps

from lca_lab import stats

# --------------------------------------------------------------------------------------------------
# multiple comparisons
# --------------------------------------------------------------------------------------------------


def test_adjust_pvalues_hand_computed():
    p = [0.01, 0.04, 0.03, 0.005]
    # Holm, sorted: .005*4=.02, .01*3=.03, .03*2=.06, .04*1=.04 -> running max keeps .06
    np.testing.assert_allclose(stats.adjust_pvalues(p, "holm"), [0.03, 0.06, 0.06, 0.02])
    # BH, sorted: p*m/rank = .02, .02, .04, .04 (already monotone)
    np.testing.assert_allclose(stats.adjust_pvalues(p, "bh"), [0.02, 0.04, 0.04, 0.02])
    np.testing.assert_allclose(stats.adjust_pvalues(p, "none"), p)
    # NaN (untestable layer) stays NaN and does not enlarge the family: m = 2 here
    np.testing.assert_allclose(stats.adjust_pvalues([0.02, np.nan, 0.01], "holm"), [0.02, np.nan, 0.02])
    assert np.all(stats.adjust_pvalues([0.9, 0.8, 0.7], "holm") <= 1.0)
    with pytest.raises(ValueError):
        stats.adjust_pvalues(p, "bonferroni")


# --------------------------------------------------------------------------------------------------
# Section 4: layer effects, Welch, regression
# --------------------------------------------------------------------------------------------------


def test_layer_effects_planted_effect_power_and_false_positives():
    rng = np.random.default_rng(0)
    reps, found, false_pos = 200, 0, 0
    for _ in range(reps):
        totals = np.column_stack([rng.normal(-1.0, 0.3, 10), rng.normal(0.0, 0.3, 10)])
        rows = stats.layer_effects(totals, ["conv1", "fc"], alpha=0.05, correction="holm")
        found += rows[0]["direction"] == "helps" and rows[0]["p_adj"] < 0.05
        false_pos += rows[1]["significant"]
    assert found >= 0.95 * reps
    # Holm keeps the null layer's rate <= alpha = 5%; 10% leaves binomial slack (P(X>=20 | 5%) ≈ 1e-3)
    assert false_pos <= 0.10 * reps


def test_layer_effects_fields_hurts_and_untestable():
    totals = np.array([[1.0, -2.0, 0.0], [1.2, -2.1, 0.0], [0.9, -1.8, 0.0], [1.1, -2.2, 0.0]])
    rows = stats.layer_effects(totals, ["first", "mid", "frozen"], correction="bh")
    assert [r["layer"] for r in rows] == ["first", "mid", "frozen"]
    assert set(rows[0]) == {"layer", "n", "mean", "std", "t", "p", "p_adj", "significant", "direction"}
    x = totals[:, 0]
    res = sps.ttest_1samp(x, 0.0)
    assert rows[0]["n"] == 4
    assert rows[0]["mean"] == pytest.approx(x.mean())
    assert rows[0]["std"] == pytest.approx(x.std(ddof=1))
    assert rows[0]["t"] == pytest.approx(res.statistic) and rows[0]["p"] == pytest.approx(res.pvalue)
    assert rows[0]["direction"] == "hurts" and rows[1]["direction"] == "helps"
    # a frozen layer (exactly 0 every seed) is untestable -> NaN p, not significant, no warning/error
    assert math.isnan(rows[2]["p"]) and rows[2]["direction"] == "n.s." and rows[2]["significant"] is False
    json.dumps(rows)  # plain Python types only
    with pytest.raises(ValueError):
        stats.layer_effects(totals, ["a", "b"])


def test_welch_detects_known_difference():
    rng = np.random.default_rng(1)
    a = rng.normal(0.50, 0.02, 10)  # e.g. final train loss, regular runs
    b = rng.normal(0.45, 0.02, 10)  # last layer frozen: lower
    r = stats.welch(a, b)
    assert r["significant"] and r["p"] < 1e-4 and r["direction"] == "b lower"
    assert r["diff"] == pytest.approx(b.mean() - a.mean()) and r["t"] < 0  # t has the sign of diff
    assert r["p"] == pytest.approx(sps.ttest_ind(a, b, equal_var=False).pvalue)
    assert (r["n_a"], r["n_b"]) == (10, 10) and r["std_a"] == pytest.approx(a.std(ddof=1))
    assert stats.welch(b, a)["direction"] == "b higher"
    json.dumps(r)


def test_welch_null_pvalues_uniform_with_unequal_variances():
    # Same mean, very different spread and size: Welch is calibrated, Student's pooled t is not
    # (its p-values pile up near 0 here), so this also pins equal_var=False.
    rng = np.random.default_rng(2)
    ps = np.array([stats.welch(rng.normal(0, 3, 5), rng.normal(0, 1, 30))["p"] for _ in range(300)])
    assert sps.kstest(ps, "uniform").pvalue > 0.001
    assert np.mean(ps < 0.05) < 0.1


def test_layer_welch_planted_layer():
    rng = np.random.default_rng(3)
    a = rng.normal(0.0, 0.1, (10, 3))
    b = rng.normal(0.0, 0.1, (8, 3))
    b[:, 2] += 1.0  # only the last layer changes (e.g. it hurts when given a fresher momentum)
    rows = stats.layer_welch(a, b, ["l0", "l1", "l2"], correction="holm")
    assert [r["direction"] for r in rows] == ["n.s.", "n.s.", "b higher"]
    assert all(r["p_adj"] >= r["p"] for r in rows)
    assert rows[2]["n_a"] == 10 and rows[2]["n_b"] == 8 and rows[2]["layer"] == "l2"
    json.dumps(rows)


def test_regression_linear():
    rng = np.random.default_rng(4)
    x = np.repeat(np.arange(10.0), 3)  # momentum delay 0..9, 3 seeds each
    y = 2.0 * x + 1.0 + rng.normal(0, 0.1, x.size)
    r = stats.regression(x, y)
    assert r["slope"] == pytest.approx(2.0, abs=0.02) and r["intercept"] == pytest.approx(1.0, abs=0.1)
    assert r["r2"] > 0.95 and r["p"] < 1e-6 and r["n"] == 30 and r["stderr"] < 0.01
    json.dumps(r)
    with pytest.raises(ValueError):
        stats.regression([1.0, 2.0], [3.0, 4.0])


# --------------------------------------------------------------------------------------------------
# Section 3: percent helping, oscillations, heavy tails
# --------------------------------------------------------------------------------------------------


def test_percent_helping_hand_computed():
    m = np.array(
        [
            [-1.0, 2.0, 0.0, -3.0],  # 2 helping of 3 nonzero -> 66.67%
            [0.0, 0.0, 0.0, 0.0],  # all zero: skipped
            [1.0, 1.0, -1.0, 1.0],  # 1 of 4 -> 25%
            [-1.0, 0.0, 0.0, 0.0],  # 1 of 1 -> 100%
        ]
    )
    assert stats.percent_helping(m) == pytest.approx((200 / 3 + 25 + 100) / 3)
    assert math.isnan(stats.percent_helping(np.zeros((2, 3))))


def test_mean_std():
    assert stats.mean_std([50.1, 50.5, 50.9]) == pytest.approx({"mean": 50.5, "std": 0.4, "n": 3})
    one = stats.mean_std([3.0])
    assert one["mean"] == 3.0 and math.isnan(one["std"]) and one["n"] == 1


def test_oscillation_period():
    assert stats.oscillation_period(15, 100) == pytest.approx(100 / 15)
    assert stats.oscillation_period(0, 100) == math.inf
    # pooled over parameters: 3 params x 100 iterations / (10 + 20 + 0) changes; a never-changing
    # parameter must not make it infinite
    assert stats.oscillation_period(np.array([10, 20, 0]), 100) == pytest.approx(10.0)
    assert stats.oscillation_period(np.array([10, 20]), np.array([100, 50])) == pytest.approx(5.0)


def test_heavy_tails_weibull_fit_and_tail_ratio():
    rng = np.random.default_rng(5)
    help_mag = 2e-6 * rng.weibull(0.5, 20_000)
    hurt_mag = 1e-6 * rng.weibull(0.5, 20_000)
    values = np.concatenate([-help_mag, hurt_mag, np.zeros(500)])
    r = stats.heavy_tails(values)
    assert r["n_zero"] == 500
    for side, scale in (("helping", 2e-6), ("hurting", 1e-6)):
        s = r[side]
        assert s["n"] == 20_000
        assert s["weibull_k"] == pytest.approx(0.5, abs=0.05)
        assert s["weibull_scale"] == pytest.approx(scale, rel=0.1)
        assert s["gaussian_tail_mass_fraction"] == pytest.approx(math.exp(-4.5))
        # analytic for k = 0.5 (X = E^2, E ~ Exp(1)): beyond 3*sqrt(24) the share is ≈ 0.26, 24x Gaussian
        assert s["tail_ratio"] > 1.5 and s["tail_ratio"] == pytest.approx(23.7, rel=0.3)
    json.dumps(r)


def test_heavy_tails_gaussian_has_ratio_one_and_subsampling():
    rng = np.random.default_rng(6)
    mag = 1e-6 * np.abs(rng.normal(size=200_000))
    r = stats.heavy_tails(-mag, max_fit=20_000)  # all helping
    s = r["helping"]
    assert s["tail_ratio"] == pytest.approx(1.0, abs=0.2)
    assert s["rms"] == pytest.approx(1e-6, rel=0.01)
    assert 1.1 < s["weibull_k"] < 1.5  # a half-normal is not heavy-tailed: k > 1
    assert r["hurting"]["n"] == 0 and math.isnan(r["hurting"]["tail_ratio"])
    assert stats.heavy_tails(-mag, max_fit=20_000) == r  # fixed-seed subsample: reproducible


# --------------------------------------------------------------------------------------------------
# Section 5: moments of learning and synchronisation
# --------------------------------------------------------------------------------------------------


def test_moments_of_learning_hand_made():
    #                 0    1    2    3    4    5    6    7    8    9
    c = np.array([-9.0, 0.0, -1.0, 0.0, -3.0, -3.0, 0.0, -2.0, 0.5, -8.0])
    # index 0 and 9 are the two most negative values but endpoints; 4/5 is a flat bottom (no strict
    # minimum); strict interior minima are 2 (-1) and 7 (-2)
    np.testing.assert_array_equal(stats.moments_of_learning(c, k=20), [2, 7])
    np.testing.assert_array_equal(stats.moments_of_learning(c, k=1), [7])  # strongest only
    d = np.array([0.0, -5.0, 0.0, -1.0, 0.0, -4.0, 0.0, -2.0, 0.0])
    np.testing.assert_array_equal(stats.moments_of_learning(d, k=3), [1, 5, 7])  # sorted by iteration
    assert stats.moments_of_learning(d, k=0).size == 0
    assert stats.moments_of_learning([1.0, 0.0], k=5).size == 0
    assert stats.moments_of_learning(d, k=3).dtype == np.int64


def test_synchronized_moments_hand_made():
    base = np.zeros(12)
    curves = np.tile(base, (3, 1))
    curves[:, 3] = -1.0  # all three layers: synchronised
    curves[:2, 6] = -1.0  # only two layers
    curves[:, 9] = -1.0  # all three
    r = stats.synchronized_moments(curves, k=5)
    assert r["count"] == 2 and r["iterations"] == [3, 9] and r["per_class"] == [2]
    per_class = np.stack([curves, np.roll(curves, 1, axis=-1)])
    per_class[1, 2, :] = 0.0  # class 1: one layer without moments -> nothing synchronised
    r = stats.synchronized_moments(per_class, k=5)
    assert r["count"] == 2 and r["iterations"] == [[3, 9], []] and r["per_class"] == [2, 0]
    json.dumps(r)


def _planted(rng, n_layers=3, T=500, n_spikes=15):
    curves = rng.normal(0.0, 1.0, (n_layers, T))
    at = rng.choice(np.arange(10, T - 10, 20), size=n_spikes, replace=False)  # well separated
    curves[:, at] -= 8.0
    return curves, np.sort(at)


def test_shift_baseline_planted_synchronisation_single_group():
    curves, at = _planted(np.random.default_rng(7))  # [3 layers, 500]
    sync = stats.synchronized_moments(curves, k=20)
    assert set(at.tolist()) <= set(sync["iterations"])
    r = stats.shift_baseline(curves, k=20, max_shift=2, repeats=1000, seed=0)
    assert r["actual"] == sync["count"] and r["actual"] >= 10
    assert r["baseline_mean"] < 3
    counts = np.array(r["counts"])
    assert len(counts) == 1000 and r["repeats"] == 1000
    assert r["p_value"] == pytest.approx((1 + np.sum(counts >= r["actual"])) / 1001)
    assert r["baseline_mean"] == pytest.approx(counts.mean())
    # One group of 3 layers: 1 draw in 25 shifts all layers alike and reproduces the actual count,
    # so even perfect synchronisation gives p ≈ p_floor = 0.04, not p < 0.01 (see the docstring).
    assert r["p_floor"] == pytest.approx(1 / 25)
    assert 0.02 < r["p_value"] < 0.07
    json.dumps(r)


def test_shift_baseline_planted_synchronisation_per_class():
    rng = np.random.default_rng(11)
    curves = np.stack([_planted(rng)[0] for _ in range(4)])  # [4 classes, 3 layers, 500]
    r = stats.shift_baseline(curves, k=20, max_shift=2, repeats=1000, seed=0)
    assert r["actual"] >= 4 * 10 and r["baseline_mean"] < 10
    assert r["p_value"] < 0.01 and r["p_value"] == pytest.approx(1 / 1001)


def test_shift_baseline_null_is_not_anticonservative():
    # Independent layers: actual counts look like the baseline. Per-class input with 2 layers and
    # k = 40 of T = 400 gives ~20 chance coincidences, so p-values are not stuck at 1.
    rng = np.random.default_rng(8)
    ps = np.array(
        [
            stats.shift_baseline(rng.normal(size=(5, 2, 400)), k=40, repeats=200, seed=i)["p_value"]
            for i in range(100)
        ]
    )
    assert np.mean(ps < 0.05) <= 0.12
    assert np.mean(ps < 0.5) >= 0.2  # not all large


def test_shift_baseline_edges_and_zero_shift():
    # max_shift = 0 reproduces the actual count exactly
    curves, _ = _planted(np.random.default_rng(9))
    r = stats.shift_baseline(curves, max_shift=0, repeats=5, keep_counts=True)
    assert r["counts"] == [r["actual"]] * 5 and r["p_value"] == 1.0
    # a synchronised moment at iteration 1: shifting it left leaves the interior and drops it, so a
    # baseline count can never exceed the actual count of 1, and never goes negative
    c = np.zeros((2, 8))
    c[:, 1] = -1.0
    r = stats.shift_baseline(c, k=3, max_shift=2, repeats=200, seed=1)
    assert r["actual"] == 1 and set(r["counts"]) <= {0, 1} and "counts" in r
    assert "counts" not in stats.shift_baseline(c, repeats=3, keep_counts=False)


def test_shift_baseline_fast_on_paper_size():
    curves = np.random.default_rng(10).normal(size=(10, 3, 500))  # 10 classes x 3 layers x 500 its
    stats.shift_baseline(curves, repeats=10)  # warm-up
    t0 = time.perf_counter()
    r = stats.shift_baseline(curves, k=20, repeats=1000)
    assert time.perf_counter() - t0 < 1.0
    assert r["repeats"] == 1000 and 0 < r["p_value"] <= 1
