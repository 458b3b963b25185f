"""Whole runs through ``train.run`` on real (mnist5k) and small data: conservation, overrides, invariance."""

from pathlib import Path

import h5py
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lca_lab.config import ConfigError
from lca_lab.train import format_summary, run

CONF = Path(__file__).resolve().parents[1] / "conf"


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["device=cpu", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def test_conservation_on_real_digits(tmp_path):
    # mnist5k: 4,500 real digits, batch 40 → 113 iterations per epoch.
    s = run(_cfg("data=mnist5k", "batch_size=40", "epochs=1", "opt.lr=0.05", "eval_every=1000"), tmp_path)
    assert s["lca_rows"] >= 100
    with h5py.File(tmp_path / "lca.h5", "r") as f:
        err = f["lca/error"][:]
        converged = f["lca/converged"][:]
        loss = f["train/loss"][:]
        total = f["lca/total"][:]
        layer = f["lca/layer"][:]
        param = f["lca/param"][:]
        plays = f["params/layer"][:]
        sizes = [int(np.prod(eval(s.decode() if isinstance(s, bytes) else s))) for s in f["params/shapes"][:]]
        assert f.attrs["status"] == "complete"
        assert f.attrs["data_source"] == "mnist5k"
    # Every iteration within tolerance, or flagged as not converged at max splits.
    assert np.all((np.abs(err) <= 1e-3) | ~converged)
    assert converged.mean() > 0.95
    np.testing.assert_allclose(total - np.diff(loss), err, atol=1e-12)
    cum = abs(err.sum()) / abs(loss[-1] - loss[0])
    assert cum < 0.01, cum
    assert s["cumulative_rel_error"] == pytest.approx(cum, rel=1e-6)
    np.testing.assert_allclose(layer.sum(1), total, atol=1e-9)
    np.testing.assert_allclose(param.astype(np.float64).sum(1), total, rtol=1e-4, atol=1e-5)
    # each layer's LCA (the engine's, from the product that gives the total) = its entries' stored LCA
    entry = np.repeat(plays, sizes)
    by_layer = np.stack([param[:, entry == j].astype(np.float64).sum(1) for j in range(layer.shape[1])], 1)
    np.testing.assert_allclose(by_layer, layer, rtol=1e-4, atol=1e-6)
    assert loss[-1] < loss[0] - 1.0  # it learned
    assert 0.4 < s["frac_helping"] < 0.8
    # The endpoint gradient is reused every iteration: passes per iteration = Simpson splits (2 → midpoint
    # and new endpoint), never one more.
    assert s["grad_passes_per_iter"] == pytest.approx(s["mean_splits"])
    assert s["frac_helping"] + s["frac_hurting"] + s["frac_zero"] == pytest.approx(1.0)
    nonzero = (param != 0).sum(1)
    assert s["pct_helping_nonzero"] == pytest.approx(100 * np.mean((param < 0).sum(1) / nonzero), rel=1e-3)
    assert s["frac_zero"] == pytest.approx(np.mean(param == 0), abs=1e-3)
    # Every LCA iteration timed (training step to stored row); the median is reported.
    assert s["lca_iters_timed"] == s["lca_rows"] and 0 < s["lca_s_per_iter"] < 60
    line = f"median {1e3 * s['lca_s_per_iter']:.2f} ms over {s['lca_rows']} in this process"
    assert line in format_summary(s)


def test_lca_does_not_change_the_trajectory(tmp_path):
    # Dropout (lenet) draws from the global RNG during training: LCA must neither draw from it nor
    # touch BN statistics, so the final θ — and everything evaluated from it — is bit-identical.
    common = [
        "data=synthetic",
        "data.size=128",
        "net=lenet",
        "batch_size=32",
        "epochs=1",
        "opt.lr=0.01",
        "lca.max_splits=4",
        "eval_every=2",
    ]
    run(_cfg(*common, "store.trajectory=true"), tmp_path / "on")
    run(_cfg(*common, "lca=off"), tmp_path / "off")
    with h5py.File(tmp_path / "on" / "lca.h5") as a, h5py.File(tmp_path / "off" / "lca.h5") as b:
        assert a["lca/total"].shape[0] == 4
        assert "lca/total" not in b or b["lca/total"].shape[0] == 0
        for name in ["test_loss", "test_acc", "train_loss", "train_acc"]:
            ea, eb = a[f"eval/{name}"][:], b[f"eval/{name}"][:]
            ea, eb = ea[~np.isnan(ea)], eb[~np.isnan(eb)]
            assert len(ea) > 0 and np.array_equal(ea, eb), name


@pytest.mark.parametrize("net", ["resnet20", "lenet"])
def test_bn_and_dropout_nets_conserve(tmp_path, net):
    extra = ["net.width=4"] if net == "resnet20" else []
    shape = "cifar10" if net == "resnet20" else "mnist"
    s = run(
        _cfg(
            "data=synthetic",
            f"data.shape={shape}",
            "data.size=200",
            f"net={net}",
            *extra,
            "batch_size=50",
            "epochs=2",
            "lca.chunk_size=100",
            "opt.lr=0.01",
        ),
        tmp_path,
    )
    assert s["lca_rows"] == 8
    with h5py.File(tmp_path / "lca.h5") as f:
        err, conv, loss = f["lca/error"][:], f["lca/converged"][:], f["train/loss"][:]
    # On 200 examples ReLU/max-pool kinks make the first, large steps hard; an iteration either meets
    # the tolerance or is flagged, and the run as a whole conserves to < 1 %.
    assert np.all((np.abs(err) <= 1e-3) | ~conv)
    assert conv.mean() >= 0.5
    assert abs(err.sum()) / abs(loss[-1] - loss[0]) < 0.01
    assert s["not_converged"] == int((~conv).sum())


def test_frozen_layer_has_exactly_zero_lca_in_run_file(tmp_path):
    run(_cfg("data=synthetic", "data.size=200", "batch_size=50", "epochs=1", "layers=freeze_last"), tmp_path)
    with h5py.File(tmp_path / "lca.h5") as f:
        layer = f["lca/layer"][:]
        names = [n.decode() if isinstance(n, bytes) else n for n in f["layers/names"][:]]
        plays = f["params/layer"][:]
        shapes = [eval(s.decode() if isinstance(s, bytes) else s) for s in f["params/shapes"][:]]
        param = f["lca/param"][:]
    assert np.all(layer[:, -1] == 0.0) and np.all(layer[:, 0] != 0.0)
    n_last = sum(int(np.prod(s)) for s, l in zip(shapes, plays) if l == len(names) - 1)
    assert np.all(param[:, -n_last:] == 0.0)


def test_window_limits_rows(tmp_path):
    s = run(
        _cfg("data=synthetic", "data.size=200", "batch_size=20", "epochs=1", "lca.window=[3,7]"), tmp_path
    )
    assert s["lca_rows"] == 4
    with h5py.File(tmp_path / "lca.h5") as f:
        assert f["lca/iteration"][:].tolist() == [3, 4, 5, 6]
        assert f["train/loss"].shape == (5,)


def test_size_budget_refuses_before_training(tmp_path):
    cfg = _cfg(
        "data=synthetic", "data.size=200", "batch_size=50", "store.per_param=true", "store.max_gb=1e-4"
    )
    with pytest.raises(ConfigError, match="store.per_param=false"):
        run(cfg, tmp_path)
    assert not (tmp_path / "lca.h5").exists()


def test_cuda_graph_on_cpu_is_refused_before_training(tmp_path):
    with pytest.raises(ConfigError, match="lca.cuda_graph=false"):
        cfg = _cfg("device=cpu", "data=synthetic", "data.size=200", "batch_size=20", "lca.cuda_graph=true")
        run(cfg, tmp_path)
    assert not (tmp_path / "lca.h5").exists()


def test_a_failed_cuda_graph_recording_is_recorded_and_the_run_completes(tmp_path, monkeypatch):
    import lca_lab.train as train_mod

    class Forced(train_mod.FullBatchLoss):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            self.cuda_graph = True  # as if on a GPU: recording fails on the CPU, the eager path runs

    cfg = _cfg("device=cpu", "data=synthetic", "data.size=200", "batch_size=20")
    plain = run(cfg, tmp_path / "plain")
    monkeypatch.setattr(train_mod, "FullBatchLoss", Forced)
    with pytest.warns(RuntimeWarning, match="continuing without it"):
        s = run(cfg, tmp_path / "forced")
    assert s["cuda_graph_error"] and "cuda_graph_error" not in plain
    with h5py.File(tmp_path / "forced" / "lca.h5") as f, h5py.File(tmp_path / "plain" / "lca.h5") as g:
        assert f.attrs["summary/cuda_graph_error"] == s["cuda_graph_error"]
        assert f.attrs["status"] == "complete"
        np.testing.assert_array_equal(f["lca/total"][:], g["lca/total"][:])  # the eager path, unchanged


def test_unknown_layer_fails_before_training(tmp_path):
    with pytest.raises(ValueError, match="fc"):
        run(
            _cfg(
                "data=synthetic",
                "data.size=200",
                "batch_size=50",
                "+layers.x.select=conv7",
                "+layers.x.freeze=true",
            ),
            tmp_path,
        )
    assert not (tmp_path / "lca.h5").exists()


def test_divergence_stops_with_failed_status_and_keeps_rows(tmp_path):
    # Regression: a non-finite loss used to be refined up to max_splits before anyone noticed.
    with pytest.raises(FloatingPointError, match="iteration"):
        run(
            _cfg(
                "data=synthetic",
                "data.size=200",
                "batch_size=20",
                "epochs=3",
                "opt.lr=1e12",
                "store.flush_every=1",
            ),
            tmp_path,
        )
    with h5py.File(tmp_path / "lca.h5") as f:
        assert f.attrs["status"].startswith("failed: FloatingPointError")
        n = f["lca/total"].shape[0]
        assert n >= 1  # rows before the divergence are kept
        assert f["train/loss"].shape[0] == n + 1
        assert np.all(np.isfinite(f["lca/total"][:]))


@pytest.mark.slow
@pytest.mark.parametrize(
    "net,extra", [("lenet", []), ("resnet20", ["net.width=8"]), ("allcnn", ["net.width=0.25"])]
)
def test_real_digits_conserve_for_conv_nets(tmp_path, net, extra):
    """Conv nets with dropout / BatchNorm on the 4,500 real digits: every iteration within tolerance or
    flagged, and the cumulative error under 1 % (a few minutes each on 2 CPU cores)."""
    s = run(
        _cfg("data=mnist5k", f"net={net}", *extra, "epochs=1", "lca.window=[0,12]", "lca.chunk_size=1500"),
        tmp_path,
    )
    with h5py.File(tmp_path / "lca.h5") as f:
        err, conv, loss = f["lca/error"][:], f["lca/converged"][:], f["train/loss"][:]
    assert len(err) == 12
    assert np.all((np.abs(err) <= 1e-3) | ~conv)
    assert abs(err.sum()) / abs(loss[-1] - loss[0]) < 0.01
    assert s["L_end"] < s["L_start"]


EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml"))


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_a_few_iterations(tmp_path, experiment):
    # the image experiments on small synthetic images; the transformer's on a few windows of its text
    small = (
        ["data.max_bytes=2048", "data.window=16", "net.width=16", "net.heads=2"]
        if experiment == "transformer"
        else ["data=synthetic", "data.size=64"]
    )
    cfg = _cfg(
        f"experiment={experiment}", *small, "batch_size=32", "epochs=1", "lca.window=[0,2]", "figures=false"
    )
    if experiment != "transformer":
        assert cfg["data"]["_target_"] == "lca_lab.data.synthetic"
    if "width" in cfg["net"] and experiment != "transformer":
        cfg["net"]["width"] = 4 if cfg["net"]["_target_"] == "lca_lab.nets.resnet20" else 0.1
    s = run(cfg, tmp_path)
    assert s["lca_rows"] == 2
    assert s["max_abs_error"] <= 1e-3 or s["not_converged"] > 0


def test_existing_run_file_is_never_overwritten(tmp_path):
    run(_cfg("data=synthetic", "data.size=64", "batch_size=32", "epochs=1", "figures=false"), tmp_path)
    before = (tmp_path / "lca.h5").read_bytes()
    with pytest.raises(ConfigError, match="already exists"):
        run(_cfg("data=synthetic", "data.size=64", "batch_size=32", "epochs=1"), tmp_path)
    assert (tmp_path / "lca.h5").read_bytes() == before


def test_unwritable_run_dir_fails_before_training(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(ConfigError, match="cannot write to the run directory"):
        run(_cfg("data=synthetic", "data.size=64", "batch_size=32"), blocker / "run")


def test_an_error_in_the_next_training_step_keeps_the_launched_steps_rows(tmp_path, monkeypatch):
    """Step t's LCA is recorded after step t+1's training step (pipelining); an error there must not lose
    step t's row: it is recorded before the error propagates."""
    import torch

    calls = {"n": 0}
    real_step = torch.optim.SGD.step

    def step(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:
            raise KeyboardInterrupt
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    with pytest.raises(KeyboardInterrupt):
        run(_cfg("data=synthetic", "data.size=200", "batch_size=20", "store.flush_every=1"), tmp_path)
    with h5py.File(tmp_path / "lca.h5") as f:
        assert f["lca/total"].shape[0] == 3  # iterations 0, 1, 2: the third was launched, not yet recorded
        assert f["train/loss"].shape[0] == 4
        dl = np.diff(f["train/loss"][:])
        np.testing.assert_allclose(f["lca/total"][:] - dl, f["lca/error"][:], atol=1e-12)


@pytest.mark.slow
def test_compiled_passes_give_the_runs_numbers_to_rounding(tmp_path):
    """lca.compile=true (torch.compile's CPU backend here): the eager run's rows, to float32 rounding."""
    over = ["data=synthetic", "data.size=200", "batch_size=20", "lca.chunk_size=100"]
    plain = run(_cfg(*over), tmp_path / "plain")
    s = run(_cfg(*over, "lca.compile=true"), tmp_path / "compiled")
    assert "compile_error" not in s and "compile_error" not in plain
    with h5py.File(tmp_path / "compiled" / "lca.h5") as f, h5py.File(tmp_path / "plain" / "lca.h5") as g:
        assert bool(f.attrs["lca_compile"]) and not bool(g.attrs["lca_compile"])
        np.testing.assert_allclose(f["train/loss"][:], g["train/loss"][:], rtol=1e-5)
        np.testing.assert_allclose(f["lca/total"][:], g["lca/total"][:], rtol=1e-3, atol=1e-6)
        np.testing.assert_array_equal(f["lca/splits"][:], g["lca/splits"][:])


def test_a_failed_compile_is_recorded_and_the_run_completes(tmp_path, monkeypatch):
    """lca.compile=true where torch.compile cannot work: a warning, the reason in the run file, the eager
    numbers (the same as a run without lca.compile)."""
    import lca_lab.lca as lca_mod

    def broken(fn, **kw):
        def call(*a, **k):
            raise RuntimeError("no C++ compiler")

        return call

    over = ["data=synthetic", "data.size=200", "batch_size=20"]
    plain = run(_cfg(*over), tmp_path / "plain")
    monkeypatch.setattr(lca_mod.torch, "compile", broken)
    with pytest.warns(RuntimeWarning, match="lca.compile: compiling the full-data pass failed"):
        s = run(_cfg(*over, "lca.compile=true"), tmp_path / "forced")
    assert "no C++ compiler" in s["compile_error"] and "compile_error" not in plain
    with h5py.File(tmp_path / "forced" / "lca.h5") as f, h5py.File(tmp_path / "plain" / "lca.h5") as g:
        assert f.attrs["summary/compile_error"] == s["compile_error"] and f.attrs["status"] == "complete"
        np.testing.assert_array_equal(f["lca/total"][:], g["lca/total"][:])
