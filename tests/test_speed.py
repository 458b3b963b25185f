"""lca_lab.speed: how L's passes run (auto rules, explicit settings, refusals), its use by train, recompute
and bench, and the bench's defaults by device. The decisions are pure functions of the model's kinds of
modules and the device, so the CUDA rules are checked here without a GPU."""

from pathlib import Path

import h5py
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

from lca_lab import bench
from lca_lab import recompute as rc
from lca_lab.config import ConfigError, validate
from lca_lab.speed import SpeedError, check_settings, net_kind, pass_settings
from lca_lab.train import run

CONF = Path(__file__).resolve().parents[1] / "conf"
CPU, CUDA = torch.device("cpu"), torch.device("cuda")
AUTO = {"channels_last": "auto", "cuda_graph": "auto", "cudnn_benchmark": "auto", "compile": "auto"}


def _fc():
    return nn.Sequential(nn.Flatten(), nn.Linear(784, 100), nn.ReLU(), nn.Linear(100, 10))


def _conv():  # LeNet/All-CNN-like without BatchNorm
    return nn.Sequential(nn.Conv2d(1, 6, 5), nn.ReLU(), nn.Flatten(), nn.Linear(6 * 24 * 24, 10))


def _conv_bn():  # ResNet-20-like
    return nn.Sequential(
        nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 900, 10)
    )


def _switches(ps):
    return (ps.channels_last, ps.cuda_graph, ps.cudnn_benchmark, ps.compile)


def test_net_kinds():
    assert [net_kind(m()) for m in (_fc, _conv, _conv_bn)] == ["dense", "conv", "conv_bn"]


@pytest.mark.parametrize("make", [_fc, _conv, _conv_bn])
@pytest.mark.parametrize("deterministic", [False, True])
def test_auto_on_the_cpu_switches_nothing_on(make, deterministic):
    ps = pass_settings(make(), CPU, {**AUTO, "precision": "fp32"}, deterministic)
    assert _switches(ps) == (False, False, False, False) and ps.reason


@pytest.mark.parametrize(
    "make,precision,expected",
    [
        # (channels_last, cuda_graph, cudnn_benchmark, compile)
        (_fc, "fp32", (False, True, False, False)),  # launch-bound: CUDA graphs
        (_fc, "tf32", (False, True, False, False)),
        (_conv, "fp32", (True, False, False, True)),  # channels-last + compile
        (_conv, "tf32", (True, False, False, True)),
        (_conv_bn, "fp32", (False, False, True, True)),  # NCHW + autotuner + compile (ResNet-20, run G)
        (_conv_bn, "tf32", (True, False, False, True)),  # autotuner/NCHW not measured in TF32
    ],
)
def test_auto_on_a_gpu_takes_the_measured_fastest(make, precision, expected):
    ps = pass_settings(make(), CUDA, {**AUTO, "precision": precision})
    assert _switches(ps) == expected
    assert ps.attrs() == dict(
        zip(["lca_channels_last", "lca_cuda_graph", "lca_cudnn_benchmark", "lca_compile"], expected)
    )


def test_missing_keys_mean_auto_and_precision_fp32():
    assert _switches(pass_settings(_conv_bn(), CUDA, {})) == (False, False, True, True)


def test_deterministic_never_picks_the_autotuner_nor_compile():
    for make in (_conv, _conv_bn):
        ps = pass_settings(make(), CUDA, {**AUTO, "precision": "fp32"}, deterministic=True)
        assert not ps.cudnn_benchmark and not ps.compile and ps.channels_last
    assert pass_settings(_fc(), CUDA, AUTO, deterministic=True).cuda_graph  # same kernels: reproducible


def test_deterministic_refuses_an_explicit_autotuner_naming_the_fix():
    with pytest.raises(SpeedError, match="set lca.cudnn_benchmark=false or deterministic=false"):
        pass_settings(_conv_bn(), CUDA, {**AUTO, "cudnn_benchmark": True}, deterministic=True)
    assert issubclass(SpeedError, ConfigError)  # train and the CLI report it as a config error (exit 2)


def test_explicit_settings_win():
    ps = pass_settings(_conv_bn(), CUDA, {"cudnn_benchmark": False, "compile": False, "precision": "fp32"})
    assert _switches(ps) == (True, False, False, False)  # eager without the autotuner: channels-last
    ps = pass_settings(_conv_bn(), CUDA, {"channels_last": True, "precision": "fp32"})
    assert _switches(ps) == (True, False, True, True)
    ps = pass_settings(_conv(), CUDA, {"cuda_graph": True})
    assert ps.cuda_graph and not ps.compile  # compile's auto gives way to the graph asked for
    ps = pass_settings(_fc(), CUDA, {"compile": True})
    assert ps.compile and not ps.cuda_graph
    ps = pass_settings(_fc(), CUDA, {"cuda_graph": False})
    assert _switches(ps) == (False, False, False, False)
    assert "as set: cuda_graph=false" in ps.reason
    # on the CPU: today's meaning of an explicit value (channels-last for conv nets only, compile and the
    # autotuner's flag as asked)
    ps = pass_settings(_conv(), CPU, {"channels_last": True, "compile": True, "cudnn_benchmark": True})
    assert _switches(ps) == (True, False, True, True)
    assert not pass_settings(_fc(), CPU, {"channels_last": True}).channels_last


def test_batched_points_keep_vmap_instead_of_graphs():
    assert not pass_settings(_fc(), CUDA, AUTO, batched=True).cuda_graph
    assert pass_settings(_fc(), CUDA, {"cuda_graph": True}, batched=True).cuda_graph  # explicit wins


def test_refusals_name_the_fix():
    with pytest.raises(SpeedError, match="set one of them to false"):
        check_settings({"compile": True, "cuda_graph": True})
    check_settings({"compile": True, "cuda_graph": "auto"})
    with pytest.raises(SpeedError, match="lca.cuda_graph=false or run on a GPU"):
        check_settings({"cuda_graph": True}, CPU)
    check_settings({"cuda_graph": "auto"}, CPU)
    with pytest.raises(SpeedError, match=r"lca\.compile must be true or false \(or auto\), got 'yes'"):
        check_settings({"compile": "yes"})


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["device=cpu", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def test_config_defaults_are_auto_and_validate():
    cfg = _cfg()
    assert all(cfg["lca"][k] == "auto" for k in AUTO)
    validate(cfg)
    validate(_cfg("deterministic=true"))  # auto never asks for the autotuner
    with pytest.raises(ConfigError, match="lca.channels_last"):
        validate(_cfg("lca.channels_last=sometimes"))


SMALL = [
    "data=synthetic",
    "data.size=48",
    "batch_size=24",
    "epochs=1",
    "net=lenet",
    "figures=false",
    "logger=none",
]


def test_train_records_the_resolved_settings_on_the_cpu(tmp_path):
    run(_cfg(*SMALL), tmp_path / "auto")
    run(_cfg(*SMALL, "lca.channels_last=true", "lca.cudnn_benchmark=true"), tmp_path / "set")
    with h5py.File(tmp_path / "auto" / "lca.h5") as a, h5py.File(tmp_path / "set" / "lca.h5") as b:
        keys = ["lca_channels_last", "lca_cuda_graph", "lca_cudnn_benchmark", "lca_compile"]
        assert [bool(a.attrs[k]) for k in keys] == [False, False, False, False]
        assert [bool(b.attrs[k]) for k in keys] == [True, False, True, False]
        assert "channels_last: auto" in a.attrs["config"]


def test_recompute_keeps_auto_for_its_own_device():
    run_cfg = _cfg(*SMALL)
    s = rc.engine_settings(run_cfg, None)
    assert s["compile"] == s["cuda_graph"] == s["cudnn_benchmark"] == "auto"
    rc.device_settings(s, None, CPU)  # auto is no CUDA graph to drop or refuse
    assert s["cuda_graph"] == "auto"
    assert rc.engine_settings(run_cfg, {"compile": True})["compile"] is True
    run_cfg["deterministic"] = True
    with pytest.raises(rc.RecomputeError, match="deterministic=true rules out"):
        rc.engine_settings(run_cfg, {"cudnn_benchmark": True})


def test_bench_defaults_by_device(monkeypatch):
    o = bench.parse_args([]) if not torch.cuda.is_available() else bench.parse_args(["--device", "cpu"])
    assert o.device == "cpu" and o.nets == ["fc", "lenet"] and o.precisions == ["fp32"]
    assert o.n_train == 256 and o.recompute_iters == 8 and o.max_splits == 4 and o.naive and o.run
    assert o.cuda_graphs == o.cudnn_benchmarks == o.compiles == [False]  # auto on the CPU: off
    # explicit flags keep their meaning
    e = bench.parse_args(
        ["--device", "cpu", "--n-train", "55000", "--recompute-iters", "128", "--nets", "fc"]
    )
    assert e.n_train == 55000 and e.recompute_iters == 128 and e.nets == ["fc"]
    monkeypatch.setattr(bench, "resolve_device", lambda name: CUDA)  # as on a GPU machine
    g = bench.parse_args([])
    assert g.device == "cuda" and g.nets == ["fc", "lenet", "resnet20", "allcnn"]
    assert g.precisions == ["fp32", "tf32"] and g.n_train is None and g.recompute_iters == 128
    assert g.max_splits == 32
    assert g.cuda_graphs == g.cudnn_benchmarks == g.compiles == [None]  # decided per net (row_settings)
    assert bench.parse_args(["--compile", "off"]).compiles == [False]


def test_bench_rows_take_the_policy_per_net():
    o = bench.BenchOptions(device="cuda", cuda_graphs=[None], cudnn_benchmarks=[None], compiles=[None])
    (fc,) = bench.row_settings(o, "fc", "fp32")
    assert fc.cuda_graph and not fc.compile
    (rn,) = bench.row_settings(o, "resnet20", "fp32")
    assert (rn.channels_last, rn.cudnn_benchmark, rn.compile) == (False, True, True)
    (rn,) = bench.row_settings(o, "resnet20", "tf32")
    assert (rn.channels_last, rn.cudnn_benchmark, rn.compile) == (True, False, True)
    # explicit rows as given; auto's layout for each (compile both: eager channels-last, compiled NCHW)
    o = bench.BenchOptions(device="cuda", cudnn_benchmarks=[True], compiles=[False, True])
    both = bench.row_settings(o, "resnet20", "fp32")
    assert [(r.channels_last, r.compile) for r in both] == [(True, False), (False, True)]
    # --channels-last on keeps its meaning: NHWC inputs for every net
    (fc,) = bench.row_settings(bench.BenchOptions(device="cpu", channels_last="on"), "fc", "fp32")
    assert fc.channels_last and not fc.cuda_graph
    # today's rows with explicit settings on the CPU: unchanged
    (le,) = bench.row_settings(bench.BenchOptions(device="cpu"), "lenet", "fp32")
    assert (le.channels_last, le.cuda_graph, le.cudnn_benchmark, le.compile) == (False, False, False, False)
