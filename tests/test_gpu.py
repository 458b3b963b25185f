"""CUDA checks (skipped without a GPU): the device path agrees with the float64 CPU reference."""

import copy
import dataclasses
import json
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from pipelined import pipelined_steps

from lca_lab import nets
from lca_lab.lca import FullBatchLoss, LCAEngine
from lca_lab.train import run

pytestmark = pytest.mark.gpu
CONF = Path(__file__).resolve().parents[1] / "conf"


def build_net(name, input_shape, n_classes, **kwargs):
    """The built-in net ``lca_lab.nets.<name>`` (as ``net=<name>`` builds it)."""
    return getattr(nets, name)(input_shape=input_shape, n_classes=n_classes, **kwargs)


def test_cuda_engine_matches_cpu_float64_reference():
    """One step from a random perturbation: GPU float32 (fp32 convolutions) vs CPU float64."""
    torch.manual_seed(0)
    model = build_net("resnet20", (3, 32, 32), 10, width=8)
    x, y = torch.randn(512, 3, 32, 32), torch.randint(0, 10, (512,))
    ref = FullBatchLoss(copy.deepcopy(model).double(), x.double(), y, chunk_size=128)
    gpu = FullBatchLoss(copy.deepcopy(model).cuda(), x.cuda(), y.cuda(), chunk_size=128)
    t0 = ref.flat_params()
    t1 = t0 + 1e-3 * torch.randn_like(t0)
    from lca_lab.lca import matmul_precision

    with matmul_precision("fp32"):  # PyTorch's default runs cuDNN convolutions in TF32
        a = LCAEngine(gpu, tolerance=1e-5).step(t0.float().cuda(), t1.float().cuda())
    b = LCAEngine(ref, tolerance=1e-8).step(t0, t1)
    assert abs(float(a.total) - float(b.total)) < 1e-4
    assert _rel(a.param, b.param) < REL  # see REL: ReLU kinks, not rounding, set this tolerance


def test_resnet20_trajectory_on_cuda_matches_cpu_float64(device="cuda"):
    """A short SGD trajectory of a (narrow) ResNet-20 with BatchNorm in chunks: the GPU engine in float32
    (channels-last, fp32 convolutions, as train.py runs it) vs the CPU float64 reference, step by step:
    same refinement decisions, per-parameter LCA within REL, totals within 2e-4 relative (float32
    BatchNorm over chunks of 200: on the CPU, float32 against float64 gave up to 5e-5 relative)."""
    from lca_lab.lca import matmul_precision

    torch.manual_seed(0)
    model = build_net("resnet20", (3, 32, 32), 10, width=8).to(device)
    x, y = torch.randn(400, 3, 32, 32), torch.randint(0, 10, (400,))
    with matmul_precision("fp32"):
        th = _sgd_trajectory(model, x.to(device), y.to(device), 3, lr=0.02)
        fbl = FullBatchLoss(model, x.to(device), y.to(device), 200, channels_last=True)
        got = [LCAEngine(fbl, "rk4").step(a, b) for a, b in zip(th[:-1], th[1:])]
    m64 = copy.deepcopy(model).double().cpu()
    ref = LCAEngine(FullBatchLoss(m64, x.double(), y, 200), "rk4")
    for a, b, s in zip(th[:-1], th[1:], got):
        r = ref.step(a.double().cpu(), b.double().cpu())
        assert s.splits == r.splits
        assert abs(float(s.total) - float(r.total)) < 2e-4 * abs(float(r.total))
        assert _rel(s.param, r.param) < REL


def test_resnet20_run_on_cuda_conserves(tmp_path):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "device=cuda",
                "net=resnet20",
                "data=synthetic",
                "data.shape=cifar10",
                "data.size=2000",
                "batch_size=128",
                "epochs=1",
                "opt.lr=0.05",
            ],
        )
    s = run(OmegaConf.to_container(cfg, resolve=True), tmp_path)
    with h5py.File(tmp_path / "lca.h5") as f:
        err, conv = f["lca/error"][:], f["lca/converged"][:]
        assert "cuda" in f.attrs["device"]
    assert np.all((np.abs(err) <= 1e-3) | ~conv)
    assert s["cumulative_rel_error"] < 0.01


def _rel(a, b):
    """‖a − b‖₂ / ‖b‖₂ of per-parameter LCA vectors (on the CPU, float64)."""
    a, b = a.double().cpu(), b.double().cpu()
    return float((a - b).norm() / b.norm())


# float32 vs float64 per-parameter LCA of ReLU nets. float32 rounding alone gives ~1e-6 relative, but a
# pre-activation within ~1e-6 of zero can fall on the other side of the ReLU kink in another precision
# or kernel; that one example's gradient then moves to or from that unit. Seen on the CPU (torch 2.14,
# 4,000 examples): one such example moved the mean gradient by 0.7 % and the step's LCA by 0.2 % in
# ‖·‖₂. Hence 1e-2 in ‖·‖₂ for float32 vectors, with totals (where one example's share is diluted by N)
# held to 1e-6 nats and the refinement decisions to equality. The fast-path equalities below run in
# float64, where no kink is crossed differently, and are held to 1e-9.
REL = 1e-2


def _sgd_trajectory(model, x, y, n, lr=0.05, batch=64, seed=0):
    """θ_0 … θ_n of a few SGD steps (flat float32 vectors on the model's device)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    flat = lambda: torch.cat([p.detach().reshape(-1) for p in model.parameters()])  # noqa: E731
    out = [flat()]
    for _ in range(n):
        idx = torch.randint(0, len(x), (batch,), generator=g).to(x.device)
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
        out.append(flat())
    return out


@pytest.mark.parametrize("method", ["rk4", "trapezoid"])
def test_fc_trajectory_on_cuda_matches_cpu_float64(method):
    """GPU float32 (whole set in one chunk, fp32 matmuls) vs the CPU float64 reference, step by step
    (tolerances: see REL)."""
    from lca_lab.lca import matmul_precision

    torch.manual_seed(0)
    x, y = torch.randn(4000, 1, 28, 28), torch.randint(0, 10, (4000,))
    model = build_net("fc", (1, 28, 28), 10).cuda()
    with matmul_precision("fp32"):
        th = _sgd_trajectory(model, x.cuda(), y.cuda(), 6)
        gpu = LCAEngine(FullBatchLoss(model, x.cuda(), y.cuda(), 4000), method, tolerance=1e-4)
        got = [gpu.step(a, b) for a, b in zip(th[:-1], th[1:])]
    m64 = copy.deepcopy(model).double().cpu()
    ref = LCAEngine(FullBatchLoss(m64, x.double(), y, 4000), method, tolerance=1e-4)
    for a, b, s in zip(th[:-1], th[1:], got):
        r = ref.step(a.double().cpu(), b.double().cpu())
        assert s.splits == r.splits
        assert _rel(s.param, r.param) < REL
        assert abs(float(s.total) - float(r.total)) < 1e-6


def test_vmap_batched_recompute_on_cuda_equals_step_by_step():
    torch.manual_seed(0)
    x, y = torch.randn(4000, 1, 28, 28).double().cuda(), torch.randint(0, 10, (4000,)).cuda()
    model = build_net("fc", (1, 28, 28), 10).double().cuda()
    th = _sgd_trajectory(model, x, y, 20)
    fbl = FullBatchLoss(model, x, y, 4000)
    seq = list(LCAEngine(fbl, "trapezoid", tolerance=1e-4).steps(th, batch_points=1))
    bat = list(LCAEngine(fbl, "trapezoid", tolerance=1e-4).steps(torch.stack(th), batch_points=8))
    for a, b in zip(seq, bat):
        assert a.splits == b.splits
        assert _rel(b.param, a.param) < 1e-9
        assert abs(float(a.error) - float(b.error)) < 1e-12


def test_channels_last_resnet_on_cuda_equals_nchw():
    from lca_lab.lca import matmul_precision

    torch.manual_seed(0)
    model = build_net("resnet20", (3, 32, 32), 10, width=8).double().cuda()
    x, y = torch.randn(1000, 3, 32, 32).double().cuda(), torch.randint(0, 10, (1000,)).cuda()
    with matmul_precision("fp32"):
        th = _sgd_trajectory(model, x, y, 3)
        a = [LCAEngine(FullBatchLoss(model, x, y, 500), "rk4").step(p, q) for p, q in zip(th[:-1], th[1:])]
        cl = FullBatchLoss(model, x, y, 500, channels_last=True)
        b = [LCAEngine(cl, "rk4").step(p, q) for p, q in zip(th[:-1], th[1:])]
    for s, t in zip(a, b):
        assert _rel(t.param, s.param) < 1e-9  # different cuDNN kernels, float64
        assert abs(float(s.total) - float(t.total)) < 1e-12


def test_cudnn_benchmark_resnet_on_cuda_equals_default():
    """lca.cudnn_benchmark: cuDNN's autotuned algorithms give the numbers of its heuristic ones (float64,
    where only rounding can differ), and the process's flag is back afterwards."""
    from lca_lab.lca import matmul_precision

    torch.manual_seed(0)
    model = build_net("resnet20", (3, 32, 32), 10, width=8).double().cuda()
    x, y = torch.randn(1000, 3, 32, 32).double().cuda(), torch.randint(0, 10, (1000,)).cuda()
    saved = torch.backends.cudnn.benchmark
    with matmul_precision("fp32"):
        th = _sgd_trajectory(model, x, y, 3)
        a = [LCAEngine(FullBatchLoss(model, x, y, 500), "rk4").step(p, q) for p, q in zip(th[:-1], th[1:])]
        bm = FullBatchLoss(model, x, y, 500, channels_last=True, cudnn_benchmark=True)
        b = [LCAEngine(bm, "rk4").step(p, q) for p, q in zip(th[:-1], th[1:])]
    assert torch.backends.cudnn.benchmark == saved
    for s, t in zip(a, b):
        assert s.splits == t.splits
        assert _rel(t.param, s.param) < 1e-9
        assert abs(float(s.total) - float(t.total)) < 1e-12


def test_bench_cudnn_benchmark_rows_on_resnet20():
    """`--cudnn-benchmark on` on the GPU: the limit is timed with the autotuner, the naive baseline runs in a
    fresh process (PyTorch's default algorithms, not the ones the engine's autotuned passes cached in this
    one) on the engine's trajectory and agrees with it, and the row conserves. `both` is refused on CUDA."""
    from lca_lab import bench

    o = bench.BenchOptions(
        nets=["resnet20"], device="cuda", iters=2, warmup=1, n_train=600, limit_repeats=2, naive_iters=1,
        methods=["rk4"], recompute_iters=0, run=False, precisions=["fp32"], cudnn_benchmarks=[True],
        channels_last="off",
    )  # fmt: skip
    (row,) = bench.run_bench(o)["rows"]
    assert row["cudnn_benchmark"] is True and row["channels_last"] is False
    # One autotuner setting: the chunked pass is timed with it alone, and the limit is the best pass.
    assert row["limit_chunk_bm_s"] is None and row["limit_chunk_s"] > 0
    assert row["limit_s"] == min(row["limit_chunk_s"], row["limit_whole_s"] or 1e9)
    assert row["naive_fresh_process"] is True and row["naive_s_per_it"] > 0
    # Where the naive replayed the engine's trajectory, the totals agree to float32 rounding of L (measured
    # on an H200 on the same trajectory: 1.2e-6 … 1.2e-5, totals 0.02–0.3, L ≈ 2.5); 1e-4 is a tenth of the
    # tolerance, while a wrong point or weight is off by the quadrature error.
    assert row["naive_same_trajectory"] is True
    assert row["naive_max_abs_diff"] < 1e-4
    assert row["max_abs_error"] <= o.tolerance
    with pytest.raises(ValueError, match="--cudnn-benchmark both on CUDA"):
        bench.check_options(dataclasses.replace(o, cudnn_benchmarks=[False, True]))


@pytest.mark.parametrize("net,shape,chunk", [("fc", (1, 28, 28), 4000), ("resnet20", (3, 32, 32), 500)])
def test_cuda_graph_pass_equals_eager_and_rerecords_on_precision_change(net, shape, chunk):
    """The recorded pass replays the same kernels: equal to the eager pass (float64 on the device, several
    chunks for resnet20 so that the unrolled chunk loop and BatchNorm are inside the graph)."""
    from lca_lab.lca import matmul_precision

    torch.manual_seed(0)
    kw = {"width": 8} if net == "resnet20" else {}
    model = build_net(net, shape, 10, **kw).double().cuda()
    n = 4000 if net == "fc" else 1000
    x, y = torch.randn(n, *shape).double().cuda(), torch.randint(0, 10, (n,)).cuda()
    with matmul_precision("fp32"):
        th = _sgd_trajectory(model, x, y, 4)
        eager = FullBatchLoss(model, x, y, chunk)
        graph = FullBatchLoss(model, x, y, chunk, cuda_graph=True)
        for t in th:
            (la, ga), (lb, gb) = eager.loss_and_grad(t), graph.loss_and_grad(t)
            assert graph.graph_error is None and graph._graph is not None
            torch.testing.assert_close(lb, la, rtol=1e-12, atol=1e-14)
            torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-14)
        a = [LCAEngine(eager, "rk4", tolerance=1e-5).step(p, q) for p, q in zip(th[:-1], th[1:])]
        b = [LCAEngine(graph, "rk4", tolerance=1e-5).step(p, q) for p, q in zip(th[:-1], th[1:])]
        for s, t in zip(a, b):
            assert s.splits == t.splits
            assert _rel(t.param, s.param) < 1e-9
        first = graph._graph[1]
    with matmul_precision("tf32"):
        graph.loss_and_grad(th[0])
        assert graph._graph[1] is not first  # recorded again for the new flags


def test_cuda_graph_online_run_conserves_and_matches_eager(tmp_path):
    """An online fc run with lca.cuda_graph=true writes the same LCA as without (float32, same kernels)."""
    files = {}
    for flag in ("false", "true"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(
                config_name="config",
                overrides=[
                    "device=cuda", "net=fc", "data=synthetic", "data.size=3000", "batch_size=100",
                    "epochs=1", "logger=none", f"lca.cuda_graph={flag}",
                ],
            )  # fmt: skip
        d = tmp_path / flag
        d.mkdir()
        s = run(OmegaConf.to_container(cfg, resolve=True), d)
        assert s["cumulative_rel_error"] < 0.01
        with h5py.File(d / "lca.h5") as f:
            files[flag] = f["lca/total"][:], f["lca/splits"][:]
            assert bool(f.attrs["lca_cuda_graph"]) == (flag == "true")
    np.testing.assert_array_equal(files["true"][1], files["false"][1])
    # Training itself may differ by float rounding between the two runs (no deterministic mode here).
    np.testing.assert_allclose(files["true"][0], files["false"][0], rtol=1e-4, atol=1e-8)


def test_recompute_of_a_cuda_graph_run_replays_graphs_and_equals_online(tmp_path):
    """A run trained with lca.cuda_graph=true, recomputed on the GPU: the setting is inherited, the
    passes go point by point through the graph (batch_points defaults to 1), and the numbers are the
    online run's (same θ, same recorded kernels)."""
    from lca_lab import recompute as rc

    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "device=cuda", "net=fc", "data=synthetic", "data.size=2000", "batch_size=100",
                "epochs=1", "logger=none", "figures=false", "lca.cuda_graph=true", "store.trajectory=true",
            ],
        )  # fmt: skip
    run(OmegaConf.to_container(cfg, resolve=True), tmp_path)
    res = rc.recompute(tmp_path, device="cuda", progress=False)
    with h5py.File(tmp_path / "lca.h5") as a, h5py.File(res["merged"]) as b:
        assert json.loads(b.attrs["recompute/settings"])["cuda_graph"] is True
        np.testing.assert_array_equal(b["lca/splits"][:], a["lca/splits"][:])
        np.testing.assert_allclose(b["lca/total"][:], a["lca/total"][:], rtol=1e-6, atol=1e-10)
        np.testing.assert_allclose(b["train/loss"][:], a["train/loss"][:], rtol=1e-6)


def test_bench_graph_rows_measure_a_graph_limit_and_graphed_recompute():
    """`--cuda-graph both`: the limit includes a graph-replayed pass; graph rows give the same LCA totals
    (same kernels) and their step-by-step recompute replays graphs."""
    from lca_lab import bench

    o = bench.BenchOptions(
        nets=["fc"], device="cuda", iters=4, warmup=1, n_train=2000, limit_repeats=3, naive_iters=2,
        methods=["rk4"], recompute_iters=8, batch_points=4, cuda_graphs=[False, True], precisions=["fp32"],
    )  # fmt: skip
    rows = bench.run_bench(o)["rows"]
    assert [r["cuda_graph"] for r in rows] == [False, True]
    for r in rows:
        assert r["limit_graph_s"] is not None and r["limit_graph_s"] > 0
        assert r["limit_s"] == min(r["limit_chunk_s"], r["limit_graph_s"], r["limit_whole_s"] or 1e9)
        assert r["recompute_max_abs_diff"] < 1e-6
    np.testing.assert_allclose(rows[1]["engine_total"], rows[0]["engine_total"], rtol=1e-5, atol=1e-9)


def test_reducer_on_cuda_equals_cpu():
    """The per-iteration views and per-parameter counters, on the device and on the CPU, agree exactly."""
    from lca_lab.reducers import LCAReducer

    g = torch.Generator().manual_seed(0)
    T, K = 12, 1000
    param, delta, grad = (torch.randn(T, K, generator=g, dtype=torch.float64) for _ in range(3))
    param[param.abs() < 0.3] = 0.0
    delta[:, :10] = 0.0
    index = torch.arange(K) * 4 // K
    cpu, gpu = LCAReducer(index, 4), LCAReducer(index.cuda(), 4)
    for t in range(T):
        a = cpu.update(param[t], delta[t], grad[t])
        b = gpu.update(param[t].cuda(), delta[t].cuda(), grad[t].cuda())
        for k in a:
            assert torch.equal(a[k], b[k].cpu()), k
    for k, v in cpu.result().items():
        assert torch.equal(v, gpu.result()[k].cpu()), k


def test_pipelined_launch_on_cuda_equals_step():
    """LCAEngine.launch: the error's non-blocking copy to pinned memory and its event, read after the next
    step was launched (as train.py does), give the numbers and decisions of plain step calls."""
    from lca_lab.lca import matmul_precision

    torch.manual_seed(0)
    x, y = torch.randn(4000, 1, 28, 28).cuda(), torch.randint(0, 10, (4000,)).cuda()
    model = build_net("fc", (1, 28, 28), 10).cuda()
    with matmul_precision("fp32"):
        th = _sgd_trajectory(model, x, y, 8)
        fbl = FullBatchLoss(model, x, y, 4000)
        ref = LCAEngine(fbl, "trapezoid", tolerance=1e-4)
        plain = [ref.step(a, b) for a, b in zip(th[:-1], th[1:])]
        got, _ = pipelined_steps(LCAEngine(fbl, "trapezoid", tolerance=1e-4), th)
    assert [s.splits for s in got] == [s.splits for s in plain] and max(s.splits for s in plain) > 1
    for s, p in zip(got, plain):
        assert s.host_error == float(s.error) and s.host_loss1 == float(s.loss1)
        assert torch.equal(s.param, p.param) and s.host_error == p.host_error


def test_compiled_resnet_passes_on_cuda_equal_eager():
    """lca.compile on the GPU (Triton kernels for BatchNorm/ReLU, cuDNN convolutions): L and ∇L of a narrow
    ResNet-20, channels-last, float64, equal the eager ones to rounding; an RK4 step decides alike."""
    from lca_lab.lca import matmul_precision

    torch.manual_seed(0)
    model = build_net("resnet20", (3, 32, 32), 10, width=8).double().cuda()
    x, y = torch.randn(1000, 3, 32, 32).double().cuda(), torch.randint(0, 10, (1000,)).cuda()
    with matmul_precision("fp32"):
        th = _sgd_trajectory(model, x, y, 2)
        eager = FullBatchLoss(model, x, y, 500, channels_last=True)
        comp = FullBatchLoss(model, x, y, 500, channels_last=True, compile=True)
        a = [LCAEngine(eager, "rk4").step(p, q) for p, q in zip(th[:-1], th[1:])]
        b = [LCAEngine(comp, "rk4").step(p, q) for p, q in zip(th[:-1], th[1:])]
    assert comp.compile_error is None
    for s, t in zip(a, b):
        assert s.splits == t.splits
        assert _rel(t.param, s.param) < 1e-9
        assert abs(float(s.total) - float(t.total)) < 1e-12


@pytest.mark.parametrize("net", ["fc", "resnet20"])
def test_layer_sums_on_cuda_match_float64_reference(net):
    """Per-layer sums on the device against the CPU float64 sums, for a net's real layer index, one row and
    per-class rows; 0/1 counts exactly. FC's index is small enough for the one-kernel membership matrix,
    ResNet-20's takes prefix sums: both ways on the GPU."""
    from lca_lab.lca import LayerSums
    from lca_lab.nets import entry_layer_index, layer_groups

    shape = (1, 28, 28) if net == "fc" else (3, 32, 32)
    model = build_net(net, shape, 10)
    groups = layer_groups(model)
    index = entry_layer_index(model)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, index.numel(), generator=g)
    ref = torch.zeros(10, len(groups), dtype=torch.float64).index_add_(1, index, x.double())
    sums = LayerSums(index.cuda(), len(groups))
    assert sums.strategy == ("dense" if net == "fc" else "prefix")
    torch.testing.assert_close(sums(x.cuda()).cpu(), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(sums(x[3].cuda()).cpu(), ref[3], rtol=1e-12, atol=1e-12)
    b = (x > 0).to(torch.int8)
    counts = torch.zeros(10, len(groups), dtype=torch.float64).index_add_(1, index, b.double())
    assert torch.equal(sums(b.cuda()).cpu(), counts)
    layer, total = sums.with_total((x > 0).cuda())  # the reducer's rows are bool
    assert torch.equal(layer.cpu(), counts) and torch.equal(total.cpu(), counts.sum(1))
    # with_total (the engine's total and per-layer LCA from one product): the same sums, and the rows' sums
    x64 = x.double()  # the engine's per-parameter LCA is float64
    layer, total = sums.with_total(x64[3].cuda())
    torch.testing.assert_close(layer.cpu(), ref[3], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total.cpu(), x64[3].sum(), rtol=1e-12, atol=1e-12)
    layer, total = sums.with_total(x64.cuda())
    torch.testing.assert_close(layer.cpu(), ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(total.cpu(), x64.sum(1), rtol=1e-12, atol=1e-12)
