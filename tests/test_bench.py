"""The benchmark (python -m lca_lab.bench) on tiny CPU data: fields, sanity, and the naive baseline's LCA
equal to the engine's on the same trajectory (and both equal to a float64 reference)."""

import copy
import dataclasses
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from lca_lab import bench

ROOT = Path(__file__).resolve().parents[1]
N = 128  # examples in the in-process tests (the CLI smoke test uses 512)
ROW_FIELDS = {
    "net", "precision", "method", "channels_last", "n_train", "chunk_size", "limit_s", "limit_chunk_s",
    "limit_whole_s", "engine_s_per_it", "passes_per_it", "efficiency", "naive_s_per_it", "speedup",
    "naive_max_abs_diff", "max_abs_error", "cum_rel_error", "peak_mib",
}  # fmt: skip


@pytest.fixture(scope="module", params=["fc", pytest.param("lenet", marks=pytest.mark.slow)])
def result(request):
    # max_splits=2: every RK4 iteration is plain Simpson 1-4-1, the naive baseline's integrator, so the
    # two must agree parameter by parameter (and lenet stays fast: two passes per iteration). 128 examples
    # in 2 chunks: a LeNet pass costs ~1.5 s per 512 examples on 2 cores.
    o = bench.BenchOptions(
        nets=[request.param], device="cpu", iters=3, warmup=1, n_train=N, chunk_size=N // 2, max_splits=2,
        limit_repeats=1, naive_iters=3, keep_param=True, methods=["rk4"], recompute_iters=6, batch_points=4,
    )  # fmt: skip
    return bench.run_bench(o)


def test_rows_have_the_fields_and_sane_values(result):
    assert {"device", "torch", "date", "options", "rows"} <= set(result)
    assert result["device"].startswith("cpu")
    net = result["options"]["nets"][0]
    assert [(r["net"], r["precision"], r["method"]) for r in result["rows"]] == [(net, "fp32", "rk4")]
    for r in result["rows"]:
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert r["n_train"] == N and r["chunk_size"] == N // 2
        assert math.isfinite(r["efficiency"]) and r["efficiency"] > 0
        assert r["passes_per_it"] == 2.0  # midpoint + endpoint, the start gradient reused
        assert r["limit_s"] == min(r["limit_chunk_s"], r["limit_whole_s"])
        assert r["limit_graph_s"] is None  # measured only with --cuda-graph on/both (CUDA)
        assert r["efficiency"] == pytest.approx(r["passes_per_it"] * r["limit_s"] / r["engine_mean_s_per_it"])
        assert r["speedup"] == pytest.approx(r["naive_s_per_it"] / r["engine_s_per_it"])
        assert r["L_end"] < r["L_start"]  # the teacher labels are learnable: SGD lowers L
        assert r["peak_mib"] is None  # CPU
        # batched recompute of a stored trajectory (nets without BN): same totals as step by step
        # two passes per step, plus the first point's gradient (not cached in a fresh engine) over 6 steps
        assert r["recompute_batched_s_per_it"] > 0
        assert r["recompute_batched_passes_per_it"] == pytest.approx(2.0 + 1 / 6)
        assert r["recompute_max_abs_diff"] < 1e-6
        # The real training loop (train.run) on synthetic data of the shape: every LCA iteration timed.
        assert r["run_iters"] == 1 + 3 and 0 < r["run_s_per_it"] < 60
        assert r["run_passes_per_it"] >= 2.0
    table = bench.format_table(result)
    assert net in table and "engine ms/it" in table
    assert f"{result['rows'][0]['run_s_per_it'] * 1e3:.2f}" in table
    r = result["rows"][0]
    # batch_points=4: batched and step-by-step recompute were timed separately, both shown
    both = f"{r['recompute_batched_s_per_it'] * 1e3:.2f}/{r['recompute_sequential_s_per_it'] * 1e3:.2f}"
    assert both in table


def test_naive_totals_equal_engine_totals(result):
    for r in result["rows"]:
        # Same float32 passes over the same chunks, float64 sums: only the order of float32 gradient
        # additions differs (2 chunks), ~1e-7 relative; 1e-5 relative leaves a wide margin while a wrong
        # weight or point would be off by the quadrature error (≫ 1e-5 of steps this large).
        assert r["naive_max_abs_diff"] <= 1e-5 * max(abs(t) for t in r["engine_total"]), r["net"]
        np.testing.assert_allclose(r["naive_total"], r["engine_total"][:3], rtol=1e-5)


@pytest.mark.parametrize("net", ["fc", pytest.param("lenet", marks=pytest.mark.slow)])
def test_naive_per_parameter_lca_equals_engine_and_float64_reference(net):
    o = bench.BenchOptions(
        nets=[net], iters=3, warmup=1, n_train=N, chunk_size=N // 2, max_splits=2, keep_param=True
    )
    x, y = bench.make_data("mnist", N, seed=0)
    eng = bench.engine_loop(net, x, y, "rk4", o, channels_last=False)
    thetas = eng["thetas"]
    naive = bench.naive_replay(eng["model"], thetas, x, y, N // 2, "simpson", keep_param=True)
    model64, thetas64 = copy.deepcopy(eng["model"]).double(), [t.double() for t in thetas]
    ref = bench.naive_replay(model64, thetas64, x, y, N // 2, "simpson", keep_param=True)
    first = bench.naive_replay(eng["model"], thetas, x, y, N // 2, "first_order", keep_param=True)
    a_eng, a_naive, a_ref = eng["param"], naive["param"], ref["param"]
    n_params = sum(p.numel() for p in eng["model"].parameters())
    assert a_eng.shape == a_naive.shape == a_ref.shape == (3, n_params)
    scale = np.abs(a_ref).max()
    # Engine vs naive, both float32 passes: per-parameter A = ḡ_i Δ_i differs only by float32 rounding of
    # the gradients (relative ~1e-7 × a few additions), so 1e-5 of the largest entry is ~100× that.
    np.testing.assert_allclose(a_naive, a_eng, rtol=0, atol=1e-5 * scale)
    # Both vs the float64 reference: float32 forward/backward over 64-example chunks has relative
    # gradient error ~1e-6 (accumulated rounding); 1e-4 of the largest entry leaves a wide margin.
    np.testing.assert_allclose(a_eng, a_ref, rtol=0, atol=1e-4 * scale)
    np.testing.assert_allclose(a_naive, a_ref, rtol=0, atol=1e-4 * scale)
    # The check can fail: a different quadrature (first order) on the same points is far outside it.
    assert np.abs(first["param"] - a_ref).max() > 10 * 1e-4 * scale
    # Totals and the float64 sums: cumulative per-parameter LCA sums to the cumulative total.
    assert naive["cum_param"].sum() == pytest.approx(naive["cum_total"], abs=1e-12)
    # float32 vs float64 totals: relative gradient error ~1e-6..1e-5 (LeNet's first steps move L by nats)
    np.testing.assert_allclose(naive["total"], ref["total"], rtol=1e-4)


def test_net_specs_match_conf():
    for net, spec in bench.NET_SPECS.items():
        conf = yaml.safe_load((ROOT / "conf" / "net" / f"{net}.yaml").read_text())
        kwargs = {k: v for k, v in conf.items() if k != "_target_"}
        assert spec["kwargs"] == kwargs, net
        assert conf["_target_"] == f"lca_lab.nets.{net}", net
        (lr_file,) = (ROOT / "conf" / "experiment" / "lr").glob(f"table1*/{net}_sgd.yaml")
        assert spec["lr"] == yaml.safe_load(lr_file.read_text())["lr"], net


@pytest.mark.skipif(not hasattr(torch.backends, "cudnn"), reason="no cudnn backend module")
def test_bench_precision_switch_sets_and_restores_both_flags():
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
    try:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = True, True
        with bench.matmul_precision("fp32"):
            assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = False, False
        with bench.matmul_precision("tf32"):
            assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def test_cudnn_benchmark_rows_tune_the_engine_and_leave_the_naive_baseline_at_the_default(monkeypatch):
    """`--cudnn-benchmark both`: a row per setting, the limit timed with both, the engine's passes with the
    row's setting, the naive baseline with PyTorch's default (off) whatever the global flag, which is
    left as it was."""
    seen = {"naive": set(), "engine": []}
    point = bench.naive_point

    def spy(*a, **k):
        seen["naive"].add(torch.backends.cudnn.benchmark)
        return point(*a, **k)

    monkeypatch.setattr(bench, "naive_point", spy)
    loss = bench.FullBatchLoss.loss_and_grad

    def engine_spy(self, theta):
        with self._flags():
            seen["engine"].append(torch.backends.cudnn.benchmark)
        return loss(self, theta)

    monkeypatch.setattr(bench.FullBatchLoss, "loss_and_grad", engine_spy)
    o = bench.BenchOptions(nets=["fc"], iters=2, warmup=1, n_train=N, chunk_size=N, naive_iters=1,
                           limit_repeats=1, methods=["rk4"], recompute_iters=0, run=False,
                           cudnn_benchmarks=[False, True])  # fmt: skip
    saved = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = True
    try:
        result = bench.run_bench(o)
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = saved
    rows = result["rows"]
    assert [r["cudnn_benchmark"] for r in rows] == [False, True]
    assert seen["naive"] == {False}
    assert seen["engine"][0] is False and False not in seen["engine"][-4:]  # first row off, last row on
    for r in rows:
        assert r["limit_chunk_bm_s"] > 0
        assert r["limit_s"] == min(r["limit_chunk_s"], r["limit_chunk_bm_s"], r["limit_whole_s"] or 1e9)
    assert rows[0]["engine_total"] == rows[1]["engine_total"]  # no cuDNN on the CPU: the same numbers
    table = bench.format_table(result).splitlines()
    assert "fp32/bm" in table[-1] and "/bm" not in table[-2]
    assert f"{rows[0]['limit_chunk_bm_s'] * 1e3:.2f}b" in table[-1]
    # naive_point itself, called directly with the autotuner on in the process: its passes run without.
    model = torch.nn.Linear(4, 3)
    inside = []
    model.register_forward_pre_hook(lambda m, a: inside.append(torch.backends.cudnn.benchmark))
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(torch.randn(8, 4), torch.randint(0, 3, (8,))), batch_size=4
    )
    torch.backends.cudnn.benchmark = True
    try:
        point(model, torch.zeros(15), loader, 8, torch.device("cpu"))
        assert torch.backends.cudnn.benchmark is True
    finally:
        torch.backends.cudnn.benchmark = saved
    assert inside == [False, False]


def test_cached_naive_baseline_is_compared_only_on_its_own_trajectory(monkeypatch):
    """Regression: on an H200 the second of two resnet20 rows trained another trajectory (cuDNN's backward
    is not bitwise reproducible) and its |naive−eng| compared the naive totals of the first row's
    trajectory against its own. A row whose trajectory differs from the cached baseline's reports no
    comparison; its time ratio stays."""
    real = bench.engine_loop
    calls = []

    def engine_loop(*args, **kwargs):
        out = real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 2:  # the second row's training went another way by one float32 step
            out["thetas"] = [out["thetas"][0]] + [t.nextafter(t + 1) for t in out["thetas"][1:]]
        return out

    monkeypatch.setattr(bench, "engine_loop", engine_loop)
    o = bench.BenchOptions(nets=["fc"], iters=2, warmup=1, n_train=N, chunk_size=N, naive_iters=2,
                           limit_repeats=1, methods=["rk4"], recompute_iters=0, run=False,
                           cudnn_benchmarks=[False, True])  # fmt: skip
    rows = bench.run_bench(o)["rows"]
    assert rows[0]["naive_same_trajectory"] is True
    assert rows[0]["naive_max_abs_diff"] is not None and rows[0]["naive_vs_engine_max_abs"] is not None
    assert rows[1]["naive_same_trajectory"] is False
    assert rows[1]["naive_max_abs_diff"] is None and rows[1]["naive_vs_engine_max_abs"] is None
    assert rows[1]["naive_total"] == rows[0]["naive_total"] and rows[1]["speedup"] > 0  # measured once


def test_storage_stall_is_measured(tmp_path):
    o = bench.BenchOptions(nets=["fc"], iters=3, warmup=1, n_train=N, chunk_size=N, naive=False,
                           storage=True, flush_every=2, limit_repeats=1, storage_repeats=3)  # fmt: skip
    result = bench.run_bench(o)
    r = result["rows"][0]
    assert math.isfinite(r["storage_stall_pct"]) and r["storage_on_mean_s_per_it"] > 0
    assert len(r["storage_stall_pct_pairs"]) == 3
    assert r["storage_stall_pct"] == sorted(r["storage_stall_pct_pairs"])[1]  # the median pair
    assert r["storage_stall_median_pct"] == sorted(r["storage_stall_median_pct_pairs"])[1]
    cell = f"{r['storage_stall_pct']:+.1f}/{r['storage_stall_median_pct']:+.1f}%"
    assert cell in bench.format_table(result)
    assert "naive_s_per_it" not in r


def test_layer_sums_cost_times_both_ways_on_each_nets_index():
    """`--layer-sums`: per net, index_add_ and LayerSums timed on the net's own layer index; the two agree,
    and the result lists them in a table below the rows."""
    assert bench.parse_args(["--device", "cpu", "--layer-sums"]).layer_sums
    o = bench.BenchOptions(nets=["fc", "lenet"], iters=1, warmup=0, n_train=64, naive=False, run=False,
                           recompute_iters=0, limit_repeats=1, methods=["rk4"], layer_sums=True)  # fmt: skip
    result = bench.run_bench(o)
    ls = result["layer_sums"]
    assert [r["net"] for r in ls] == ["fc", "lenet"]
    for r in ls:
        model = bench._build(r["net"], (1, 28, 28), 0, torch.device("cpu"), False)
        assert r["K"] == sum(p.numel() for p in model.parameters()) and r["layers"] >= 3
        assert r["max_abs_diff"] < 1e-9
        ways = ("index_add", "prefix", "dense")  # dense: forced on the CPU, where the default is prefix
        assert all(r[f"{c}{w}_us"] > 0 for w in ways for c in ("", "counts_")) and r["strategy"] == "prefix"
        # a step's total with its layer sums, both ways the engine could take them; the totals agree
        assert r["sum_then_layers_us"] > 0 and r["with_total_us"] > 0 and r["total_abs_diff"] < 1e-9
    table = bench.format_table(result)
    assert "per-layer sums, µs per call (wall time)" in table and f"K={ls[1]['K']}" in table
    assert f"prefix *{ls[0]['prefix_us']:.1f}" in table
    assert f"one product (with_total) {ls[1]['with_total_us']:.1f}" in table
    assert "layer_sums" not in bench.run_bench(dataclasses.replace(o, layer_sums=False, nets=["fc"]))


def test_storage_stall_separates_every_iteration_from_flush_spikes(monkeypatch):
    """Mean-based stall counts the flush iterations; median-based only what every iteration pays."""
    calls = []

    def engine_loop(*args, writer_dir=None, **kwargs):
        calls.append(writer_dir is not None)
        # with the writer: every iteration 10 % slower, one flush iteration 3 s longer
        if writer_dir:
            return {"times": [1.1, 1.1, 1.1, 4.1], "writer_host_s": [0.1, 0.1, 0.1, 3.1]}
        return {"times": [1.0, 1.0, 1.0, 1.0], "writer_host_s": []}

    monkeypatch.setattr(bench, "engine_loop", engine_loop)
    o = bench.BenchOptions(nets=["fc"], storage=True, storage_repeats=2)
    r = bench.storage_stall("fc", None, None, "rk4", o, False, False)
    assert calls == [False, True, True, False]  # off-on, then on-off
    assert r["storage_stall_pct"] == pytest.approx(85.0)  # mean 1.85 against 1.0
    assert r["storage_stall_median_pct"] == pytest.approx(10.0)
    assert r["storage_stall_ms"] == pytest.approx(850.0)
    assert r["storage_stall_pct_pairs"] == pytest.approx([85.0, 85.0])
    assert r["storage_stall_median_pct_pairs"] == pytest.approx([10.0, 10.0])
    assert r["storage_host_ms"] == pytest.approx(850.0) and r["storage_host_median_ms"] == pytest.approx(
        100.0
    )


def test_storage_stall_with_both_writers_runs_them_in_the_same_repeats(monkeypatch):
    """`--writer both` on a GPU: each repeat runs the loop without the writer once and one loop per writer
    kind, in alternating order; each kind is compared with the same repeat's loop without."""
    calls = []
    per_it = {None: 1.0, True: 1.1, False: 1.5}  # without / the child process / the writer thread

    def engine_loop(*args, writer_dir=None, file_process=True, **kwargs):
        kind = None if writer_dir is None else file_process
        calls.append(kind)
        host = [] if kind is None else [0.01 if kind else 0.02] * 4
        return {"times": [per_it[kind]] * 4, "writer_host_s": host}

    monkeypatch.setattr(bench, "engine_loop", engine_loop)
    o = bench.BenchOptions(
        nets=["fc"], storage=True, storage_repeats=2, device="cuda", writers=["process", "thread"]
    )
    r = bench.storage_stall("fc", None, None, "rk4", o, False, False)
    assert calls == [None, True, False, False, True, None]
    assert r["storage_writer"] == "process"
    assert r["storage_stall_pct"] == pytest.approx(10.0) and r["storage_thread_stall_pct"] == pytest.approx(
        50.0
    )
    assert r["storage_thread_stall_pct_pairs"] == pytest.approx([50.0, 50.0])
    assert r["storage_host_ms"] == pytest.approx(10.0) and r["storage_thread_host_ms"] == pytest.approx(20.0)
    # on the CPU train.py writes synchronously: one kind, whatever --writer says
    calls.clear()
    r = bench.storage_stall("fc", None, None, "rk4", dataclasses.replace(o, device="cpu"), False, False)
    assert r["storage_writer"] == "sync" and "storage_thread_stall_pct" not in r and len(calls) == 4
    assert bench.parse_args(["--device", "cpu", "--writer", "both"]).writers == ["process", "thread"]
    assert bench.parse_args(["--device", "cpu"]).writers == ["process"]


def test_writer_pauses_measures_each_writer_kind_on_the_nets_rows():
    """`--writer-pauses`: a busy Python loop appends rows of the net's size through each writer kind and
    without one; the result has the cost per flush and the flush times per kind, and a line in the table."""
    assert bench.parse_args(["--device", "cpu", "--writer-pauses"]).writer_pauses
    o = bench.BenchOptions(nets=["fc"], flush_every=3, writers=["thread", "process"])
    x, _ = bench.make_data("mnist", 8, seed=0)
    r = bench.writer_pauses("fc", x, o, flushes=2, iter_ms=1.0, repeats=1)
    model = bench._build("fc", (1, 28, 28), 0, torch.device("cpu"), False)
    assert r["K"] == sum(p.numel() for p in model.parameters()) and r["flush_every"] == 3
    assert 0.3 < r["none_ms_per_it"] < 30  # the calibrated Python work: about iter_ms per iteration
    for kind in ("thread", "process"):
        assert math.isfinite(r[f"{kind}_ms_per_flush"]) and r[f"{kind}_flush_ms"] > 0
        # both from the same loops: the per-flush cost and the percentage agree in sign
        assert (r[f"{kind}_ms_per_flush"] > 0) == (r[f"{kind}_pct"] > 0)
    table = bench.format_table({"device": "cpu", "torch": "x", "date": "d", "rows": [], "writer_pauses": [r],
                                "options": {"warmup": 0, "iters": 0, "tolerance": 1e-3}})  # fmt: skip
    assert f"process {r['process_ms_per_flush']:+.2f} ms" in table and f"K={r['K']}" in table


def test_engine_loop_with_a_writer_stores_every_row_it_timed(tmp_path):
    import h5py

    o = bench.BenchOptions(nets=["fc"], iters=4, warmup=1, n_train=N, chunk_size=N, flush_every=2)
    x, y = bench.make_data("mnist", N, seed=0)
    res = bench.engine_loop("fc", x, y, "rk4", o, channels_last=False, writer_dir=str(tmp_path))
    with h5py.File(tmp_path / "lca.h5") as f:
        assert f["lca/total"].shape == (5,) and f["lca/param"].shape[0] == 5
        np.testing.assert_allclose(f["lca/total"][1:], res["total"], rtol=1e-12)
    # the writer's path on the training thread, timed for the measured rows only, inside their time
    assert len(res["writer_host_s"]) == 4 and 0 < sum(res["writer_host_s"]) < sum(res["times"])
    assert bench.engine_loop("fc", x, y, "rk4", o, channels_last=False)["writer_host_s"] == []


def test_profile_writes_a_table_per_row(tmp_path):
    o = bench.BenchOptions(nets=["fc"], iters=2, warmup=1, n_train=N, chunk_size=N, naive=False,
                           limit_repeats=1, methods=["rk4"], recompute_iters=0,
                           profile_dir=str(tmp_path))  # fmt: skip
    bench.run_bench(o)
    text = (tmp_path / "fc_fp32_rk4.txt").read_text()
    assert "5 engine iterations" in text and "aten::addmm" in text


def test_profile_with_storage_profiles_the_first_stall_pair_through_a_flush(tmp_path):
    """`--profile DIR --storage`: the first pair's loops without and with the writer are profiled over
    ``flush_every`` further iterations each, so the writer's per-row work and one flush are in the table."""
    o = bench.BenchOptions(nets=["fc"], iters=2, warmup=1, n_train=N, chunk_size=N, naive=False, run=False,
                           limit_repeats=1, methods=["rk4"], recompute_iters=0, storage=True,
                           storage_repeats=2, flush_every=6, profile_dir=str(tmp_path))  # fmt: skip
    bench.run_bench(o)
    off = (tmp_path / "fc_fp32_rk4_storage_off.txt").read_text()
    on = (tmp_path / "fc_fp32_rk4_storage_on.txt").read_text()
    assert off.startswith("6 engine iterations") and "writer" not in off.splitlines()[0]
    assert on.startswith("6 engine iterations") and "with the run-file writer (a flush every 6 rows)" in on
    assert "by host time" in on and "by host time" in off

    def calls(table: str, op: str) -> int:
        lines = table.split("by host time:")[1].splitlines()
        rows = [r.split() for r in lines if r.strip().startswith(op + " ")]
        return int(rows[0][-1]) if rows else 0

    # Both loops take each step's per-layer LCA from the engine (prefix sums on the CPU: one cumsum per
    # allocation); the writer's flush stacks its rows (one cat per series) in the loop with the writer only.
    assert calls(on, "aten::cumsum") == calls(off, "aten::cumsum") >= 6
    assert calls(on, "aten::cat") > calls(off, "aten::cat")


@pytest.mark.parametrize(
    "argv, words",
    [
        (["--nets", "vgg"], "choose from fc,lenet,resnet20,allcnn"),
        (["--device", "cpu", "--precision", "tf32"], "use --precision fp32 on CPU"),
        (["--iters", "0"], "--iters must be"),
        (["--chunk-size", "0"], "--chunk-size must be a positive integer"),
        (["--naive-iters", "0"], "--no-naive"),
        (["--cuda-graph", "both"], "use --cuda-graph off on the CPU"),
        (["--storage-repeats", "0"], "--storage-repeats must be"),
        (["--profile", "/nonexistent/folder"], "not an existing folder"),
    ],
)
def test_bad_options_fail_before_compute_with_the_fix(argv, words, capsys):
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", *argv] if "--device" not in argv else argv)
    assert words in capsys.readouterr().err


def test_cpu_defaults():
    o = bench.parse_args(["--device", "cpu"])
    assert o.nets == ["fc", "lenet"] and o.precisions == ["fp32"] and o.methods == ["rk4", "trapezoid"]
    assert o.iters == 20 and o.warmup == 3 and o.chunk_size == "auto"
    assert o.cuda_graphs == [False] and o.cudnn_benchmarks == [False]
    assert bench.parse_args(["--device", "cpu", "--cudnn-benchmark"]).cudnn_benchmarks == [True]
    assert bench.parse_args(["--device", "cpu", "--cudnn-benchmark", "both"]).cudnn_benchmarks == [
        False,
        True,
    ]
    assert o.compiles == [False] and bench.parse_args(["--device", "cpu", "--compile"]).compiles == [True]
    assert bench.batch_points_for(o) == 1  # as lca_lab.recompute on the CPU
    assert bench.batch_points_for(bench.parse_args(["--device", "cpu", "--batch-points", "8"])) == 8


def test_cli_smoke_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "lca_lab.bench", "--nets", "fc", "--n-train", "512", "--iters", "2",
           "--warmup", "1", "--json", str(out), "--device", "cpu", "--limit-repeats", "1",
           "--recompute-iters", "8", "--batch-points", "4"]  # fmt: skip
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    assert "engine ms/it" in p.stdout and "fc" in p.stdout
    assert "[bench" in p.stderr  # progress on stderr, not in the table
    data = json.loads(out.read_text())
    assert data["torch"] == torch.__version__ and data["device"].startswith("cpu")
    assert [r["method"] for r in data["rows"]] == ["rk4", "trapezoid"]  # the default methods
    for row in data["rows"]:
        assert ROW_FIELDS <= set(row)
        assert row["efficiency"] > 0 and row["speedup"] > 0 and row["n_train"] == 512
        assert row["recompute_batched_s_per_it"] > 0


def test_compile_rows_time_a_compiled_limit_and_give_the_eager_numbers():
    """`--compile both`: a row per setting; the compiled row's limit includes a compiled pass, its engine
    compiled (no fallback), and its LCA is the eager row's to float32 rounding (the same trajectory here)."""
    o = bench.BenchOptions(nets=["fc"], iters=2, warmup=1, n_train=N, chunk_size=N, naive_iters=1,
                           limit_repeats=1, methods=["rk4"], recompute_iters=0, run=False,
                           compiles=[False, True])  # fmt: skip
    result = bench.run_bench(o)
    eager, compiled = result["rows"]
    assert [eager["compile"], compiled["compile"]] == [False, True]
    assert compiled["compile_error"] is None and compiled["limit_compiled_s"] > 0
    assert compiled["limit_s"] == min(
        t for t in (compiled["limit_chunk_s"], compiled["limit_whole_s"], compiled["limit_compiled_s"]) if t
    )
    np.testing.assert_allclose(compiled["engine_total"], eager["engine_total"], rtol=1e-4, atol=1e-7)
    assert compiled["naive_max_abs_diff"] < 1e-5  # the naive baseline agrees with the compiled engine
    table = bench.format_table(result).splitlines()
    assert "fp32/tc" in table[-1] and "/tc" not in table[-2]
    assert f"{compiled['limit_compiled_s'] * 1e3:.2f}c" in table[-1]


def test_compile_and_cuda_graph_rows_are_refused_together():
    o = bench.BenchOptions(device="cuda", compiles=[True], cuda_graphs=[False, True])
    with pytest.raises(ValueError, match="give one of them as off"):
        bench.check_options(o)


def test_cudnn_benchmark_both_is_refused_on_cuda_and_names_the_two_commands():
    """cuDNN keeps the plan the first pass of a shape found for the rest of the process, so on CUDA rows with
    and without the autotuner in one process would time the same algorithms (an H200 run of `both` showed
    1073.64 and 1073.52 ms). On the CPU there is no cuDNN and `both` stays allowed."""
    o = bench.BenchOptions(device="cuda", cudnn_benchmarks=[False, True])
    with pytest.raises(ValueError, match="once with --cudnn-benchmark off and once with --cudnn-benchmark"):
        bench.check_options(o)
    bench.check_options(bench.BenchOptions(device="cuda", cudnn_benchmarks=[True]))
    bench.check_options(bench.BenchOptions(device="cpu", cudnn_benchmarks=[False, True]))
    with pytest.raises(SystemExit):
        bench.parse_args(["--device", "cpu", "--naive-process", "sometimes"])


def test_naive_baseline_in_a_fresh_process_gives_the_in_process_numbers():
    """Regression (H200, ResNet-20 fp32 NCHW): after the engine's autotuned passes the naive baseline reused
    their cuDNN algorithms (4.67 s per iteration instead of 5.15 s). With rows on the autotuner on CUDA it
    now runs in a spawned process: the same LCA on the same trajectory, only its cuDNN cache is empty."""
    assert bench.naive_needs_fresh_process(bench.BenchOptions(device="cuda", cudnn_benchmarks=[True]))
    assert not bench.naive_needs_fresh_process(bench.BenchOptions(device="cuda", cudnn_benchmarks=[False]))
    assert not bench.naive_needs_fresh_process(bench.BenchOptions(device="cpu", cudnn_benchmarks=[True]))
    assert not bench.naive_needs_fresh_process(bench.BenchOptions(device="cuda", naive_process="off",
                                                                  cudnn_benchmarks=[True]))  # fmt: skip
    assert bench.naive_needs_fresh_process(bench.BenchOptions(device="cpu", naive_process="on"))
    rows = {}
    for mode in ("off", "on"):
        o = bench.BenchOptions(nets=["fc"], iters=2, warmup=1, n_train=N, chunk_size=N // 2, naive_iters=2,
                               limit_repeats=1, methods=["rk4"], recompute_iters=0, run=False, max_splits=2,
                               naive_process=mode, keep_param=True)  # fmt: skip
        rows[mode] = bench.run_bench(o)["rows"][0]
    same, fresh = rows["off"], rows["on"]
    assert same["naive_fresh_process"] is False and fresh["naive_fresh_process"] is True
    assert fresh["naive_same_trajectory"] and fresh["naive_max_abs_diff"] < 1e-6
    # The two processes replay one trajectory with one float32 model: the per-parameter LCA agrees to
    # float64 accumulation of the same float32 gradients (a wrong θ or weight would be off by ≥ 1e-6).
    np.testing.assert_allclose(fresh["naive_param"], same["naive_param"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(fresh["naive_total"], same["naive_total"], rtol=0, atol=1e-12)
    assert fresh["naive_s_per_it"] > 0


def test_count_ops_counts_the_training_loops_ops_per_iteration(monkeypatch):
    """`--count-ops`: ops per LCA iteration of python -m lca_lab's loop, from two profiled runs. Three more
    ops in every iteration's reducer update show as exactly three more per iteration."""
    from lca_lab.reducers import LCAReducer

    assert bench.parse_args(["--device", "cpu", "--count-ops"]).count_ops
    o = bench.BenchOptions(
        nets=["fc"], iters=1, warmup=0, n_train=N, naive=False, run=False, recompute_iters=0, limit_repeats=1,
        methods=["rk4"], count_ops=True, flush_every=2,
    )  # fmt: skip
    base = bench.ops_per_iteration("fc", "fp32", "rk4", o, False, iters=2)
    assert set(base) == {"run_ops_per_it"} and 50 < base["run_ops_per_it"] < 500  # CPU: no launch count
    update = LCAReducer.update

    def heavier(self, param, delta, grad0):
        (param.abs() + 1.0).neg()  # three ops
        return update(self, param, delta, grad0)

    monkeypatch.setattr(LCAReducer, "update", heavier)
    more = bench.ops_per_iteration("fc", "fp32", "rk4", o, False, iters=2)
    assert more["run_ops_per_it"] == base["run_ops_per_it"] + 3
    monkeypatch.setattr(LCAReducer, "update", update)
    row = bench.run_bench(o)["rows"][0]
    assert row["run_ops_per_it"] == base["run_ops_per_it"]
