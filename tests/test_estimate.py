"""Subset estimates of LCA (lca.estimate=subset, lca_lab.estimate) against float64 exact references."""

import os
import subprocess
import sys

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from test_recompute import CONF
from torch import nn

from lca_lab import recompute as rc
from lca_lab.config import ConfigError, validate
from lca_lab.estimate import (
    SubsetError,
    SubsetPlan,
    check_estimate,
    draw_df,
    interval_q,
    iteration_seed,
    run_df,
    stratified_se,
    subset_plan_for,
)
from lca_lab.lca import FullBatchLoss, LayerSums, LCAEngine
from lca_lab.nets import entry_layer_index
from lca_lab.store import open_run
from lca_lab.subset_engine import SubsetEngine
from lca_lab.train import run


def _problem(n_per_class=30, bn=False, seed=0):
    """A float64 3-class problem, a small net (BN: a BatchNorm1d in the middle), θ0 → θ1 a random step."""
    g = torch.Generator().manual_seed(seed)
    n = 3 * n_per_class
    y = torch.arange(3).repeat_interleave(n_per_class)[torch.randperm(n, generator=g)]
    x = torch.randn(n, 4, generator=g, dtype=torch.float64) + 0.8 * nn.functional.one_hot(y, 4).double()
    torch.manual_seed(seed)
    mid = [nn.BatchNorm1d(6)] if bn else []
    model = nn.Sequential(nn.Linear(4, 6), *mid, nn.Tanh(), nn.Linear(6, 3)).double()
    idx = entry_layer_index(model)
    ls = LayerSums(idx, int(idx.max()) + 1)
    fbl = FullBatchLoss(model, x, y, chunk_size=10 if bn else 32)
    th0 = fbl.flat_params()
    th1 = th0 + 0.3 * torch.randn(th0.shape, generator=g, dtype=torch.float64)
    return fbl, ls, th0, th1


def _engines(fbl, ls, subset, adaptive=True, tol=1e-6, **kw):
    exact = LCAEngine(fbl, "rk4", tol, 32, adaptive=adaptive, layer_sums=ls)
    est = SubsetEngine(fbl, subset_plan_for(fbl, subset), ls, "rk4", tol, 32, adaptive=adaptive, **kw)
    return exact, est


@pytest.mark.parametrize("bn", [False, True])
def test_whole_split_reproduces_the_exact_path(bn):
    fbl, ls, th0, th1 = _problem(bn=bn)
    exact, est = _engines(fbl, ls, 1.0, tol=1e-10)
    th2 = th1 + 0.2 * (th1 - th0)
    for a, b in ((th0, th1), (th1, th2)):
        e, s = exact.step(a, b), est.step(a, b)
        assert s.splits == e.splits and s.splits > 2  # refined, on the same decisions
        for name in ("param", "layer", "total", "loss0", "loss1", "error"):
            torch.testing.assert_close(getattr(s, name), getattr(e, name), rtol=1e-10, atol=1e-13)
        assert float(s.total_se) == 0.0 and s.layer_se.abs().max() == 0.0  # whole strata: no sampling error
        assert s.subset_examples == len(fbl.examples)


def test_subset_conserves_its_own_loss():
    fbl, ls, th0, th1 = _problem()
    _, est = _engines(fbl, ls, 0.3)
    st = est.step(th0, th1)
    assert abs(st.host_error) <= 1e-6  # refined on the subset's L̂ to the tolerance
    assert float(st.total - (st.loss1 - st.loss0)) == pytest.approx(st.host_error, abs=1e-15)
    torch.testing.assert_close(st.layer.sum(), st.total, rtol=1e-12, atol=1e-15)


def test_unbiased_total_layers_and_parameters():
    """Fixed quadrature (no refinement): every draw uses the exact path's points, so E[Â] = A exactly."""
    fbl, ls, th0, th1 = _problem()
    exact, est = _engines(fbl, ls, 0.2, adaptive=False)
    ref = exact.step(th0, th1)
    totals, layers, params, ses = [], [], [], []
    for _ in range(300):
        s = est.step(th0, th1)
        totals.append(float(s.total))
        layers.append(s.layer.numpy())
        params.append(s.param.numpy())
        ses.append(float(s.total_se))
    n = len(totals)
    for est_rows, exact_val in ((np.array(totals), float(ref.total)), (np.array(layers), ref.layer.numpy())):
        z = (est_rows.mean(0) - exact_val) / (est_rows.std(0, ddof=1) / np.sqrt(n))
        assert np.all(np.abs(z) < 4), z
    P = np.array(params)
    sd = P.std(0, ddof=1)
    z = (P.mean(0) - ref.param.numpy())[sd > 0] / (sd[sd > 0] / np.sqrt(n))
    assert np.abs(z).max() < 5, np.abs(z).max()
    # the reported SE is the spread of the estimate over draws (its mean within 15 %)
    assert np.mean(ses) == pytest.approx(np.std(totals, ddof=1), rel=0.15)


def test_intervals_cover_the_exact_value():
    fbl, ls, th0, th1 = _problem(n_per_class=60)
    exact, est = _engines(fbl, ls, 0.25)
    ref = exact.step(th0, th1)
    hits, layer_hits, n = 0, np.zeros(2), 300
    for _ in range(n):
        s = est.step(th0, th1)
        hits += abs(float(s.total - ref.total)) <= 1.96 * float(s.total_se)
        layer_hits += (np.abs((s.layer - ref.layer).numpy()) <= 1.96 * s.layer_se.numpy()).astype(float)
    # 95 % intervals over 300 draws (deterministic seeds): binomial sd 1.3 %, band about ±3.5 sd
    assert 0.90 <= hits / n <= 0.99, hits / n
    assert np.all((0.90 <= layer_hits / n) & (layer_hits / n <= 0.99)), layer_hits / n


def test_small_draws_get_student_t_intervals():
    """4 chunks per draw: the SE has 3 degrees of freedom, so ± 1.96 SE undercovers; ± t_{0.975,3} SE
    (3.18) is the 95 % interval (over 400 draws of one BN step)."""
    fbl, ls, th0, th1 = _problem(bn=True)  # 9 chunks of 10
    exact, est = _engines(fbl, ls, 40, adaptive=False)
    assert est.plan.n_drawn == 4 and draw_df(est.plan) == 3
    q = interval_q(draw_df(est.plan))
    assert q == pytest.approx(3.182446, rel=1e-6) and interval_q(0) == pytest.approx(1.959964, rel=1e-6)
    ref = exact.step(th0, th1)
    z = []
    for _ in range(400):
        s = est.step(th0, th1)
        z.append(np.abs(np.append((s.layer - ref.layer).numpy(), float(s.total - ref.total))))
        z[-1] /= np.append(s.layer_se.numpy(), float(s.total_se))
    z = np.array(z)
    cover_t, cover_z = (z <= q).mean(0), (z <= 1.96).mean(0)
    assert np.all((0.90 <= cover_t) & (cover_t <= 0.99)), cover_t
    assert np.all(cover_z < cover_t - 0.03), (cover_z, cover_t)
    # degrees of freedom: Σ (n_h − 1) over strata drawn in part; a run's: × rows for fresh draws
    y = np.repeat(np.arange(3), [40, 30, 2])
    plan = SubsetPlan.build(len(y), 0.5, labels=y)
    assert plan.alloc == [19, 15, 2]  # the 2-example class is taken whole: no variance, no df
    assert draw_df(plan) == 18 + 14 and run_df(32, 10, fixed=False) == 320 and run_df(32, 10, True) == 32


def test_stratified_draw():
    y = np.repeat(np.arange(4), [50, 30, 15, 5])
    plan = SubsetPlan.build(len(y), 0.2, labels=y)
    assert plan.n_drawn == 20 and plan.alloc == [9, 6, 3, 2]  # ∝ size (10, 6, 3, 1), ≥ 2, sum 20
    d = plan.draw(123)
    assert [len(u) for u in d.units] == plan.alloc
    for h, u in enumerate(d.units):
        assert np.all(y[u] == h) and len(np.unique(u)) == len(u)
    assert np.array_equal(d.examples, np.sort(np.concatenate(d.units)))
    assert np.array_equal(plan.draw(123).examples, d.examples)  # a seed is its subset
    assert not np.array_equal(plan.draw(124).examples, d.examples)
    with pytest.raises(SubsetError, match="2 per class"):
        SubsetPlan.build(len(y), 5, labels=y)


def test_batchnorm_nets_draw_whole_chunks():
    fbl, ls, th0, th1 = _problem(bn=True)  # 90 examples in chunks of 10
    plan = subset_plan_for(fbl, 0.3)
    assert plan.unit == "chunk" and plan.n_units == 9 and plan.n_drawn == 3
    est = SubsetEngine(fbl, plan, ls)
    st = est.step(th0, th1)
    d = plan.draw(st.subset_seed)
    assert len(d.examples) == 30 and st.subset_examples == 30
    for c in d.units[0]:
        assert set(range(10 * c, 10 * c + 10)) <= set(d.examples.tolist())
    g = est._gather(0)
    assert all(len(y) == 10 for _, y in g.parts)  # each part is one of L's chunks, BN over its 10 examples
    assert float(st.total_se) > 0
    # a count is rounded up to whole chunks
    assert SubsetPlan.build(90, 25, chunk=10).n_drawn == 3


def test_se_formula_and_finite_population_correction():
    a = torch.tensor([[1.0], [3.0], [2.0], [6.0]], dtype=torch.float64)
    rows = [torch.tensor([0, 1]), torch.tensor([2, 3])]
    se = stratified_se(a, rows, [10, 4], n_counted=14)
    # stratum 0: s² = 2, (10/14)²(1 − 2/10)·2/2; stratum 1: s² = 8, (4/14)²(1 − 2/4)·8/2
    want = np.sqrt((10 / 14) ** 2 * 0.8 * 1.0 + (4 / 14) ** 2 * 0.5 * 4.0)
    assert float(se[0]) == pytest.approx(want, rel=1e-12)
    assert float(stratified_se(a, rows, [2, 2], 4)[0]) == 0.0


def test_fixed_subset_and_seeds():
    fbl, ls, th0, th1 = _problem()
    _, est = _engines(fbl, ls, 0.3, fixed=True, base_seed=7)
    seeds = {est.step(th0, th1).subset_seed for _ in range(3)}
    assert seeds == {iteration_seed(7, None)}
    _, fresh = _engines(fbl, ls, 0.3, base_seed=7, start=5)
    assert [fresh.step(th0, th1).subset_seed for _ in range(2)] == [
        iteration_seed(7, 5),
        iteration_seed(7, 6),
    ]
    total, layer = est.run_se()  # per-unit run sums of a fixed subset
    assert total > 0 and layer.shape == (2,)


@pytest.mark.parametrize(
    "estimate,subset,fixed,needle",
    [
        ("sampled", 0.1, False, "lca.estimate"),
        ("subset", 1.5, False, "fraction must be in (0, 1]"),
        ("subset", 0, False, "lca.subset=0"),
        ("subset", 1, False, "count must be ≥ 2"),
        ("subset", "ten", False, "lca.subset='ten'"),
        ("subset", True, False, "lca.subset=True"),
        ("subset", 0.1, "yes", "lca.subset_fixed"),
    ],
)
def test_bad_settings_are_refused_in_one_line(estimate, subset, fixed, needle):
    with pytest.raises(SubsetError) as e:
        check_estimate(estimate, subset, fixed)
    assert needle in str(e.value) and "\n" not in str(e.value)


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["device=cpu", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


COMMON = [
    "data=synthetic", "data.size=160", "batch_size=16", "epochs=1", "+net.hidden=[32,16]",
    "lca.tolerance=3e-3", "store.trajectory=true", "figures=false", "eval_every=4", "logger.mode=disabled",
]  # fmt: skip


def test_config_refuses_subset_with_per_class():
    with pytest.raises(ConfigError, match="lca.per_class=false"):
        validate(_cfg("lca.estimate=subset", "lca.per_class=true"))
    with pytest.raises(ConfigError, match="fraction"):
        validate(_cfg("lca.estimate=subset", "lca.subset=2.5"))


@pytest.fixture(scope="module")
def subset_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("subset")
    summary = run(_cfg(*COMMON, "lca.estimate=subset", "lca.subset=0.25"), d)
    return d, summary


def test_run_writes_estimates_with_their_errors(subset_run):
    d, summary = subset_run
    with open_run(d / "lca.h5") as rf:  # the run-file checks of the reader
        T, n_layers = rf.n_rows, len(rf.layer_names)
        f = rf.h5
        assert f.attrs["lca_estimate"] == "subset" and f.attrs["lca_subset_size"] == 40
        assert f.attrs["lca_subset_unit"] == "example" and f.attrs["lca_subset_strata"] > 1
        df = int(f.attrs["lca_subset_df"])
        assert df == 40 - f.attrs["lca_subset_strata"]
        assert f["lca/total_se"].shape == (T,) and f["lca/total_se"].dtype == np.float64
        assert f["lca/layer_se"].shape == (T, n_layers) and f["lca/layer_se"].dtype == np.float64
        assert np.all(f["lca/total_se"][:] > 0)
        seeds = f["estimate/seed"][:]
        assert len(set(seeds.tolist())) == T  # a fresh draw per iteration
        assert seeds[3] == iteration_seed(0, int(f["lca/iteration"][3]))  # run seed 0
    assert summary["lca_total_se"] > 0 and set(summary["layer_lca_se"]) == set(summary["layer_lca"])
    assert summary["lca_interval_q"] == pytest.approx(interval_q(df * T))


def test_recompute_reproduces_the_recorded_subsets(subset_run):
    d, _ = subset_run
    res = rc.recompute(d, progress=False, lca={"estimate": "subset", "subset": 0.25})
    with h5py.File(res["merged"]) as m, h5py.File(d / "lca.h5") as o:
        for name in ("estimate/seed", "lca/total", "lca/layer", "lca/total_se", "lca/layer_se", "lca/param"):
            np.testing.assert_array_equal(m[name][()], o[name][()], err_msg=name)
        assert m.attrs["lca_estimate"] == "subset"
        assert m.attrs["summary/lca_total_se"] == pytest.approx(np.sqrt((o["lca/total_se"][:] ** 2).sum()))


def test_analyze_shows_intervals(subset_run):
    from lca_lab.analyze import analyze

    d, _ = subset_run
    rep = analyze(d, out=d / "report", make_figures=False)
    text = (d / "report" / "report.md").read_text()
    assert "run totals (95 % interval)" in text and "subset" in text
    with open_run(d / "lca.h5") as rf:
        T, df = rf.n_rows, int(rf.attrs["lca_subset_df"])
        total, se = np.asarray(rf.lca_layer).sum(0), np.asarray(rf.h5["lca/layer_se"][:]) ** 2
    q = interval_q(df * T)
    row = rep["groups"][0]["estimate"][0]["run totals (95 % interval)"]
    assert row == f"{total[0]:+.4g} ± {q * np.sqrt(se[:, 0].sum()):.2g}"


def test_cli_refuses_a_bad_subset_in_one_line(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "lca_lab", "data=synthetic", "lca.estimate=subset", "lca.subset=-3",
         f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=str(CONF.parent)),  # this checkout's lca_lab, whatever is installed
    )  # fmt: skip
    assert p.returncode == 2
    assert "lca.subset=-3" in p.stderr and "Traceback" not in p.stderr
    assert not (tmp_path / "run" / "lca.h5").exists()


@pytest.mark.parametrize("bn,fixed", [(False, True), (True, True), (False, False), (True, False)])
def test_the_start_point_reuses_the_previous_end_point(bn, fixed):
    """θ_{t+1}'s gradient serves the next step's start: a fixed subset's as it is (per-unit parts from the
    chunks' kept gradients or by forward mode); fresh draws of examples take L̂ and the per-unit parts on
    the new draw by forward mode and the previous draw's ∇L̂ moved within each layer onto this draw's
    per-layer sums, so totals, layers, SEs and the residual are those of a gradient on the new draw. Fresh
    draws of chunks evaluate the start point (a chunk's backward is cheaper than its forward-mode parts)."""
    fbl, ls, th0, th1 = _problem(bn=bn)
    th2 = th1 + 0.5 * (th1 - th0)
    _, reuse = _engines(fbl, ls, 0.3, fixed=fixed)
    _, anew = _engines(fbl, ls, 0.3, fixed=fixed)
    a = [reuse.step(th0, th1), reuse.step(th1, th2)]
    b = [anew.step(th0, th1)]
    anew.reset()
    b.append(anew.step(th1, th2))
    reused = fixed or not bn
    assert a[1].passes == b[1].passes - reused  # one gradient point fewer where reused
    assert reuse.examples_evaluated == anew.examples_evaluated - reused * a[1].subset_examples
    names = ["total", "layer", "total_se", "layer_se", "loss0", "loss1", "error"]
    for x, y in zip(a, b):
        for name in names + (["param"] if fixed or bn else []):
            torch.testing.assert_close(getattr(x, name), getattr(y, name), rtol=1e-9, atol=1e-13)
    if not reused or fixed:
        return
    # fresh examples: the per-parameter LCA differs (another draw's gradient at θ_1) but sums per layer to
    # the same layer values and conserves
    assert not torch.allclose(a[1].param, b[1].param)
    torch.testing.assert_close(ls(a[1].param), a[1].layer, rtol=1e-10, atol=1e-14)
    assert abs(float(a[1].param.sum() - (a[1].loss1 - a[1].loss0))) <= 1e-6


def test_reused_start_keeps_every_parameter_unbiased():
    """Fresh draws over 300 seeds, two steps each: the second step's per-parameter LCA (start gradient from
    the first step's draw, moved per layer) averages to the exact per-parameter LCA within its SE."""
    fbl, ls, th0, th1 = _problem()
    th2 = th1 + 0.5 * (th1 - th0)
    exact = LCAEngine(fbl, "rk4", 1e-6, 32, adaptive=False, layer_sums=ls)
    exact.step(th0, th1)
    ref = exact.step(th1, th2).param.numpy()
    params = []
    for seed in range(300):
        plan = subset_plan_for(fbl, 0.2)
        est = SubsetEngine(fbl, plan, ls, "rk4", 1e-6, 32, adaptive=False, base_seed=seed)
        est.step(th0, th1)
        st = est.step(th1, th2)
        assert st.passes == 2
        params.append(st.param.numpy())
    P = np.array(params)
    sd = P.std(0, ddof=1)
    z = (P.mean(0) - ref)[sd > 0] / (sd[sd > 0] / np.sqrt(len(P)))
    assert np.abs(z).max() < 5, np.abs(z).max()


def test_bench_estimate_smoke(tmp_path, capsys):
    import json

    from lca_lab.bench import main

    out = tmp_path / "b.json"
    argv = ["--estimate", "--nets", "fc", "--iters", "3", "--subsets", "0.5", "--draws", "fixed"]
    assert main([*argv, "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    (sub,) = res["nets"][0]["subsets"]
    assert sub["examples_per_draw"] == 2250 and sub["draw"] == "fixed"
    assert 0 <= sub["coverage_total"] <= 1 and len(sub["coverage_layer"]) == 3
    assert "| fc | 0.5 | fixed |" in capsys.readouterr().out


@pytest.mark.parametrize("fixed", [False, True])
def test_preempted_subset_run_resumes_identically(tmp_path, monkeypatch, fixed):
    import signal as _signal

    import lca_lab.train as train_mod
    from lca_lab.checkpoint import PreemptionSignals, RunPreempted

    class SignalNow(PreemptionSignals):  # as if SIGUSR1 arrived before the first iteration
        def __enter__(self):
            super().__enter__()
            self.signum = _signal.SIGUSR1
            return self

    args = [*COMMON, "lca.estimate=subset", "lca.subset=0.25", f"lca.subset_fixed={str(fixed).lower()}"]
    ref = run(_cfg(*args), tmp_path / "ref")
    d = tmp_path / "run"
    monkeypatch.setattr(train_mod, "PreemptionSignals", SignalNow)
    with pytest.raises(RunPreempted):
        run(_cfg(*args), d)
    monkeypatch.undo()
    s = run(_cfg(*args, "resume=true"), d)
    assert s["lca_total_se"] == pytest.approx(ref["lca_total_se"], rel=1e-12)
    with h5py.File(d / "lca.h5") as a, h5py.File(tmp_path / "ref" / "lca.h5") as b:
        for name in ("estimate/seed", "lca/total", "lca/total_se", "lca/layer_se", "estimate/run_layer_se"):
            np.testing.assert_array_equal(a[name][()], b[name][()], err_msg=name)


def test_streamed_split_draws_examples_from_its_dataset():
    from torch.utils.data import TensorDataset

    from lca_lab.examples import StreamedExamples

    fbl, ls, th0, th1 = _problem()
    streamed = StreamedExamples(TensorDataset(fbl.x, fbl.y), "cpu", len(fbl.y), len(fbl.y), ())
    f2 = FullBatchLoss(fbl.model, streamed, None, 32)
    plan = subset_plan_for(f2, 1.0)
    assert plan.unit == "example" and len(plan.strata) == 1  # targets not held: simple random sampling
    exact = LCAEngine(fbl, "rk4", 1e-6, 32, layer_sums=ls).step(th0, th1)
    st = SubsetEngine(f2, plan, ls, "rk4", 1e-6, 32).step(th0, th1)
    torch.testing.assert_close(st.param, exact.param, rtol=1e-10, atol=1e-13)
    assert float(st.total_se) == 0.0
    st = SubsetEngine(f2, subset_plan_for(f2, 0.3), ls, "rk4", 1e-6, 32).step(th0, th1)
    assert st.subset_examples == 27 and float(st.total_se) > 0


def _three_steps(fbl, ls):
    th0 = fbl.flat_params()
    g = torch.Generator().manual_seed(5)
    th1 = th0 + 0.3 * torch.randn(th0.shape, generator=g, dtype=torch.float64)
    th2 = th1 + 0.5 * (th1 - th0)
    return [(th0, th1), (th1, th2), (th2, th2 - 0.3 * (th1 - th0))]


def test_batchnorm_fresh_draws_are_overlapping_halves():
    """Fresh draws of 5 chunks: S_t = H_t ∪ H_{t+1}, halves of 3 and 2 chunks. Over 300 seeds: every
    row's total and the per-parameter LCA unbiased; the run total's reported variance (with the adjacent
    rows' covariance) matches its spread over the seeds. The start point evaluates only the new half."""
    fbl, ls, _, _ = _problem(n_per_class=100, bn=True)  # 30 chunks of 10
    steps = _three_steps(fbl, ls)
    exact = LCAEngine(fbl, "rk4", 1e-6, 32, adaptive=False, layer_sums=ls)
    refs = [exact.step(a, b) for a, b in steps]
    plan = subset_plan_for(fbl, 50)
    totals, runs, run_var, params = [], [], [], []
    for seed in range(300):
        est = SubsetEngine(fbl, plan, ls, "rk4", 1e-6, 32, adaptive=False, base_seed=seed)
        sts = [est.step(a, b) for a, b in steps]
        if seed == 0:
            assert est.halves and est.df == 3 and [len(u) for u in est._gather(0).draw.units] == [3, 2]
            assert [s.passes for s in sts] == [3, 2, 2]
            assert est.examples_evaluated == 150 + (30 + 100) + (20 + 100)  # the start: the new half only
            assert float(sts[0].cov_prev.abs().max()) == 0.0 and float(sts[1].cov_prev.abs().max()) > 0
        totals.append([float(s.total) for s in sts])
        params.append(sts[1].param.numpy())
        runs.append(sum(totals[-1]))
        run_var.append(est.run_se()[0] ** 2)
    T = np.array(totals)
    z = (T.mean(0) - [float(r.total) for r in refs]) / (T.std(0, ddof=1) / np.sqrt(len(T)))
    assert np.all(np.abs(z) < 4), z
    P = np.array(params)
    sd = P.std(0, ddof=1)
    zp = (P.mean(0) - refs[1].param.numpy())[sd > 0] / (sd[sd > 0] / np.sqrt(len(P)))
    assert np.abs(zp).max() < 5, np.abs(zp).max()
    # the variance of a sample variance of 300 draws: about ±8 % (1 sd)
    assert np.mean(run_var) == pytest.approx(np.var(runs, ddof=1), rel=0.25)
    # 5 of 9 chunks (f ≥ 2/7): a draw of n chunks gives the smaller variance per gradient: no halves
    fbl9, ls9, _, _ = _problem(bn=True)
    assert not SubsetEngine(fbl9, subset_plan_for(fbl9, 50), ls9).halves


def test_halves_start_equals_a_start_evaluated_anew_and_resumes():
    fbl, ls, _, _ = _problem(n_per_class=100, bn=True)
    steps = _three_steps(fbl, ls)
    plan = subset_plan_for(fbl, 50)
    a = SubsetEngine(fbl, plan, ls, base_seed=3)
    ra = [a.step(x, y) for x, y in steps]
    b = SubsetEngine(fbl, plan, ls, base_seed=3)
    rb = [b.step(*steps[0])]
    b.reset()  # no kept chunks: the start point is evaluated on all of S_1
    rb.append(b.step(*steps[1]))
    assert rb[1].passes == ra[1].passes + 1
    for name in ("total", "layer", "param", "total_se", "layer_se", "cov_prev", "loss0", "error"):
        torch.testing.assert_close(getattr(ra[1], name), getattr(rb[1], name), rtol=1e-9, atol=1e-13)
    # a resumed engine (state after step 0, primed at θ_1) continues with the same bits
    c = SubsetEngine(fbl, plan, ls, base_seed=3)
    c.step(*steps[0])
    state = c.state_dict()
    d = SubsetEngine(fbl, plan, ls, base_seed=3)
    d.load_state_dict(state)
    d.prime(steps[1][0])
    rd = [d.step(x, y) for x, y in steps[1:]]
    for x, y in zip(ra[1:], rd):
        for name in ("total", "param", "total_se", "layer_se", "cov_prev"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
    assert a.run_se()[0] == d.run_se()[0]
    # primed at θ_0 (as a run starts), the first step reuses all of S_0's chunks: 2 gradient points
    e = SubsetEngine(fbl, plan, ls, base_seed=3)
    e.prime(steps[0][0])
    re = [e.step(x, y) for x, y in steps]
    assert [r.passes for r in re] == [ra[0].passes - 1, ra[1].passes, ra[2].passes]
    assert e.examples_evaluated == a.examples_evaluated  # S_0's start point moved into the priming pass
    for x, y in zip(ra, re):
        torch.testing.assert_close(x.param, y.param, rtol=1e-9, atol=1e-13)
    assert d.examples_evaluated == a.examples_evaluated + 50  # the resume's priming pass over S_0 at θ_1


def test_batchnorm_run_stores_the_covariance_and_recompute_merges_it(tmp_path):
    from lca_lab.analyze import analyze

    args = [
        "data=synthetic", "data.size=160", "batch_size=16", "epochs=1", "net=allcnn", "net.width=0.1",
        "lca.chunk_size=8", "lca.tolerance=3e-3", "store.trajectory=true", "figures=false",
        "eval_every=4", "logger.mode=disabled", "lca.estimate=subset", "lca.subset=0.25",
    ]  # fmt: skip
    s = run(_cfg(*args), tmp_path)
    with h5py.File(tmp_path / "lca.h5") as f:
        T, n_layers = f["lca/layer"].shape
        assert f.attrs["lca_subset_halves"] and f.attrs["lca_subset_df"] == f.attrs["lca_subset_units"] - 2
        cov = f["estimate/cov_prev"][()]
        assert cov.shape == (T, n_layers + 1) and np.all(cov[0] == 0) and np.any(cov[1:] != 0)
        se2 = (f["lca/total_se"][()] ** 2).sum() + 2 * cov[:, -1].sum()
        assert f["estimate/run_total_se"][0] == pytest.approx(np.sqrt(se2), rel=1e-9)
        passes = f["estimate/passes"][()].mean()
    # the start point: reused whole in row 0 (the priming pass), half of it evaluated after (halves of 3, 2)
    assert s["grad_passes_per_iter"] == pytest.approx(passes + 0.5 * (T - 1) / T, abs=0.06)
    assert s["lca_total_se"] == pytest.approx(np.sqrt(se2), rel=1e-9)
    res = rc.recompute(tmp_path, progress=False, lca={"estimate": "subset", "subset": 0.25})
    with h5py.File(res["merged"]) as m, h5py.File(tmp_path / "lca.h5") as o:
        for name in ("estimate/seed", "lca/total", "lca/param", "lca/total_se", "estimate/cov_prev"):
            np.testing.assert_array_equal(m[name][()], o[name][()], err_msg=name)
        assert m.attrs["summary/lca_total_se"] == pytest.approx(np.sqrt(se2), rel=1e-9)
    rep = analyze(tmp_path, out=tmp_path / "report", make_figures=False)
    assert "estimate" in rep["groups"][0]


def test_fresh_example_draws_resume_with_the_same_bits():
    """A resumed engine primes θ_t on the previous iteration's draw, as the online end point was."""
    fbl, ls, _, _ = _problem()
    steps = _three_steps(fbl, ls)
    plan = subset_plan_for(fbl, 0.3)
    a = SubsetEngine(fbl, plan, ls, base_seed=4)
    ra = [a.step(x, y) for x, y in steps]
    c = SubsetEngine(fbl, plan, ls, base_seed=4)
    c.step(*steps[0])
    d = SubsetEngine(fbl, plan, ls, base_seed=4)
    d.load_state_dict(c.state_dict())
    d.prime(steps[1][0])
    for x, (t0, t1) in zip(ra[1:], steps[1:]):
        y = d.step(t0, t1)
        for name in ("total", "param", "total_se", "layer_se", "grad0"):
            assert torch.equal(getattr(x, name), getattr(y, name)), name
