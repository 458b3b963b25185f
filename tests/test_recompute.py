"""Offline and sharded LCA (``lca_lab.recompute``) against the online computation of the same run.

Tolerance: none. The recompute rebuilds the same network and data, reads the same float32 θ the online
run held, primes the engine at the first θ of its range (the online run computed that gradient at the
same point with the same code as the endpoint of the previous step) and so evaluates the same functions
at bit-identical inputs with the same kernels, in the same process and thread count: every stored
number must be *equal*, and refinement decisions (``lca/splits``) with it. A mismatch in the last bit
would signal a real difference (another θ, another chunking, another data split), not rounding.
The CLI test runs jobs in other processes, where the thread count could differ: there it allows
1e-12 relative (float64 rounding of re-ordered sums), still far below any LCA value.
"""

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import h5py
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lca_lab import recompute as rc
from lca_lab.train import run

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
# 160 synthetic examples, batch 16 → 10 iterations; a small FC net and a loose tolerance (about two
# gradient passes per step, still refining on some) keep each run a few seconds.
COMMON = [
    "data=synthetic", "data.size=160", "batch_size=16", "epochs=1", "+net.hidden=[32,16]",
    "lca.tolerance=3e-3", "store.trajectory=true", "figures=false", "eval_every=4", "store.flush_every=3",
]  # fmt: skip
# Datasets that must agree between the online run file and the recomputed one.
COMPARED = [
    "train/loss", "lca/param", "lca/layer", "lca/total", "lca/error", "lca/splits", "lca/converged",
    "lca/iteration", "reduce/frac_helping", "reduce/frac_hurting", "reduce/frac_zero",
    "reduce/layer_frac_helping", "reduce/layer_frac_hurting", "reduce/param_helped", "reduce/param_hurt",
    "reduce/motion_changes", "reduce/grad_sign_changes", "eval/iteration", "eval/test_loss",
    "data/train_index", "params/names", "layers/names",
]  # fmt: skip
# The online run also has per-class and held-out LCA, recomputed and merged like the rest.
EXTRA = ["lca.per_class=true", "lca.test=true"]
COMPARED_EXTRA = [
    "lca/class_layer", "class/loss", "test/loss", "lca_test/layer", "lca_test/total", "lca_test/error",
]  # fmt: skip


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["device=cpu", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


@pytest.fixture(scope="module")
def online(tmp_path_factory):
    """A small run with online LCA and the trajectory stored (trained once for the module)."""
    d = tmp_path_factory.mktemp("online")
    run(_cfg(*COMMON, *EXTRA), d)
    return d


def _assert_same(a_path, b_path, names=COMPARED, rtol=0.0):
    with h5py.File(a_path, "r") as a, h5py.File(b_path, "r") as b:
        assert a["lca/total"].shape[0] > 5  # a real comparison, not of empty arrays
        for name in names:
            x, y = a[name][()], b[name][()]
            assert x.shape == y.shape, name
            if rtol and x.dtype.kind == "f":
                np.testing.assert_allclose(y, x, rtol=rtol, atol=0, err_msg=name)
            else:
                np.testing.assert_array_equal(y, x, err_msg=name)


def test_recompute_equals_online(online):
    res = rc.recompute(online, progress=False)
    merged = Path(res["merged"])
    assert merged == online / "recompute" / "lca.h5"
    _assert_same(online / "lca.h5", merged, COMPARED + COMPARED_EXTRA)
    with h5py.File(merged, "r") as f, h5py.File(online / "lca.h5", "r") as o:
        assert f.attrs["status"] == "complete"
        assert "trajectory/theta" not in f
        for k in ("cumulative_error", "max_abs_error", "mean_splits", "frac_helping", "L_end"):
            assert f.attrs[f"summary/{k}"] == pytest.approx(o.attrs[f"summary/{k}"], rel=1e-12), k
        assert f.attrs["summary/grad_passes_per_iter"] == o.attrs["summary/grad_passes_per_iter"]
        assert OmegaConf.create(f.attrs["config"]).lca.enabled is True
        splits = f["lca/splits"][:]
        assert splits.min() == 2 and splits.max() > 2  # refinement decisions were taken, and agree


def test_two_shards_merge_equal_online_and_rerun(online, tmp_path, monkeypatch):
    out = tmp_path / "rc"
    first = rc.recompute(online, 1, 2, out_dir=out, progress=False)
    assert first["merged"] is None  # shard 0 still missing: nothing merged
    missing = r"shard 0 of 2 is missing \(never started\); rerun it with: .* shard=0 num_shards=2"
    with pytest.raises(rc.RecomputeError, match=missing):
        rc.merge_shards(online, out_dir=out)
    # A shard that fails mid-way: its partial file keeps status failed, the final name never appears,
    # and merging names it.
    real = rc.recompute_range

    def dies_after_two(*args):
        for k, row in enumerate(real(*args)):
            if k == 2:
                raise RuntimeError("node lost")
            yield row

    monkeypatch.setattr(rc, "recompute_range", dies_after_two)
    with pytest.raises(RuntimeError, match="node lost"):
        rc.recompute(online, 0, 2, out_dir=out, progress=False)
    monkeypatch.undo()
    assert not rc.shard_path(out, 0, 2).exists()
    with h5py.File(rc.shard_path(out, 0, 2, partial=True), "r") as f:
        assert f.attrs["status"].startswith("failed: RuntimeError: node lost")
    with pytest.raises(rc.RecomputeError, match=r"shard 0 of 2 is incomplete \(status 'failed: Runt"):
        rc.merge_shards(online, out_dir=out)
    second = rc.recompute(online, 0, 2, out_dir=out, progress=False)  # the last shard merges
    merged = Path(second["merged"])
    _assert_same(online / "lca.h5", merged, COMPARED + COMPARED_EXTRA)
    with h5py.File(rc.shard_path(out, 0, 2), "r") as s0, h5py.File(rc.shard_path(out, 1, 2), "r") as s1:
        assert s0["lca/total"].shape[0] + s1["lca/total"].shape[0] == 10
        assert s1["lca/iteration"][0] == s0["lca/iteration"][-1] + 1
        # The boundary matters for the oscillation counters: the shards alone miss changes there.
        alone = s0["reduce/motion_changes"][:].sum() + s1["reduce/motion_changes"][:].sum()
    with h5py.File(merged, "r") as f:
        ids = json.loads(f.attrs["recompute/shard_ids"])
        assert f["reduce/motion_changes"][:].sum() > alone
    # Rerunning one shard replaces only that shard and merges again (new shard id in the merged file).
    before = rc.shard_path(out, 0, 2).stat().st_mtime_ns
    again = rc.recompute(online, 1, 2, out_dir=out, progress=False)
    assert rc.shard_path(out, 0, 2).stat().st_mtime_ns == before
    with h5py.File(again["merged"], "r") as f:
        new_ids = json.loads(f.attrs["recompute/shard_ids"])
        assert new_ids[0] == ids[0] and new_ids[1] != ids[1]
    _assert_same(online / "lca.h5", again["merged"])
    # The merge command builds the same file again from the shards on disk.
    _assert_same(online / "lca.h5", rc.merge_shards(online, out_dir=out))


def test_merge_refuses_missing_shard_and_names_the_command(online, tmp_path):
    out = tmp_path / "rc"
    rc.recompute(online, 0, 3, out_dir=out, progress=False)
    rc.recompute(online, 2, 3, out_dir=out, progress=False)
    with pytest.raises(rc.RecomputeError) as e:
        rc.merge_shards(online, 3, out_dir=out)
    msg = str(e.value)
    assert "\n" not in msg and "shard 1 of 3 is missing" in msg
    assert f"python -m lca_lab.recompute {online} shard=1 num_shards=3" in msg
    assert "shard 0" not in msg and "shard 2" not in msg
    assert not (out / "lca.h5").exists()
    rc.recompute(online, 1, 3, out_dir=out, progress=False)
    _assert_same(online / "lca.h5", out / "lca.h5")


def test_recompute_of_a_run_trained_without_lca(online, tmp_path):
    run(_cfg(*COMMON, "lca=off"), tmp_path)
    with h5py.File(tmp_path / "lca.h5", "r") as f, h5py.File(online / "lca.h5", "r") as o:
        assert f["lca/total"].shape == (0,)
        # Same seed: the same trajectory as the run with LCA on (LCA does not touch training).
        np.testing.assert_array_equal(f["trajectory/theta"][:], o["trajectory/theta"][:])
        np.testing.assert_array_equal(f["trajectory/iteration"][:], np.arange(11))
    # The online run had per-class and held-out LCA (which change the float summation order): ask for them.
    extra = {"per_class": True, "test": True}
    res = rc.recompute(tmp_path, 0, 2, lca=extra, progress=False)
    assert res["merged"] is None
    res = rc.recompute(tmp_path, 1, 2, lca=extra, progress=False)
    _assert_same(online / "lca.h5", res["merged"], COMPARED + COMPARED_EXTRA)


def test_settings_override_and_clear_errors(online, tmp_path):
    res = rc.recompute(online, out_dir=tmp_path / "fo", lca={"method": "first_order"}, progress=False)
    with h5py.File(res["merged"], "r") as f, h5py.File(online / "lca.h5", "r") as o:
        np.testing.assert_array_equal(f["train/loss"][:], o["train/loss"][:])  # L does not depend on it
        assert np.all(f["lca/splits"][:] == 1)
        assert not np.array_equal(f["lca/total"][:], o["lca/total"][:])
        # First order never refines, but its rows over lca.tolerance (3e-3 here) are flagged, not all True.
        err, conv = f["lca/error"][:], f["lca/converged"][:]
        np.testing.assert_array_equal(conv, np.abs(err) <= 3e-3)
        assert not conv.all()
    with pytest.raises(rc.RecomputeError, match=r"num_shards=11 is more than the 10 stored steps"):
        rc.compute_shard(online, 0, 11)
    with pytest.raises(rc.RecomputeError, match=r"shard must be an integer in 0..1"):
        rc.compute_shard(online, 2, 2)
    with pytest.raises(rc.RecomputeError, match="no run file"):
        rc.compute_shard(tmp_path / "nowhere")


def test_data_warning_is_one_line(online, tmp_path, monkeypatch, capsys):
    # Regression: the offline MNIST fallback's warning came out in Python's file:line form with its source.
    import lca_lab.parts

    real = lca_lab.parts.build_data

    def warn_then_load(dcfg, device, **kw):
        warnings.warn("MNIST could not be downloaded; this run uses the bundled digits", stacklevel=1)
        return real(dcfg, device, **kw)

    monkeypatch.setattr(lca_lab.parts, "build_data", warn_then_load)
    rc.recompute(online, out_dir=tmp_path / "w", lca={"method": "first_order"}, progress=False)
    err = capsys.readouterr().err
    assert "WARNING: MNIST could not be downloaded; this run uses the bundled digits\n" in err
    assert "UserWarning" not in err and "warnings.warn" not in err


def test_recomputed_file_is_labelled_by_its_own_lca_settings(online, tmp_path):
    # Regression: the merged file kept the training command's overrides, so analyze labelled an LCA
    # result "lca=off" (the trajectory-only run's setting).
    import shutil

    src = tmp_path / "traj"
    shutil.copytree(online, src)
    with h5py.File(src / "lca.h5", "r+") as f:
        f.attrs["overrides"] = json.dumps(["lca=off", "store.trajectory=true", "+lca.extra=1", "seed=1"])
    lca = {"method": "first_order", "test": None}
    res = rc.recompute(src, out_dir=tmp_path / "fo", lca=lca, progress=False)
    with h5py.File(res["merged"], "r") as f:
        got = json.loads(f.attrs["overrides"])
    assert got == ["store.trajectory=true", "seed=1", "lca.method=first_order"]
    assert rc._recompute_overrides(None, {"method": "rk4"}) == {}  # a run not started from the CLI
    assert rc._recompute_overrides('["net=lenet"]', {"per_class": True}) == {
        "overrides": '["net=lenet", "lca.per_class=true"]'
    }


def test_cuda_graph_setting_on_the_cpu(online, tmp_path):
    """lca.cuda_graph: asked for on the CPU, refused before any output; inherited from a GPU run, dropped
    (a pure speed setting); shards that differ only in it still merge."""
    with pytest.raises(rc.RecomputeError, match=r"lca.cuda_graph=true records CUDA graphs, but this "
                       r"recompute runs on cpu; set lca.cuda_graph=false or device=cuda"):  # fmt: skip
        rc.recompute(online, out_dir=tmp_path / "no", lca={"cuda_graph": True}, device="cpu", progress=False)
    assert not (tmp_path / "no").exists()
    with pytest.raises(rc.RecomputeError, match="lca.cuda_graph must be true or false"):
        rc.recompute(online, out_dir=tmp_path / "no", lca={"cuda_graph": "yes"}, progress=False)
    # A run file as a GPU run with lca.cuda_graph=true writes it.
    gpu_run = tmp_path / "gpu_run"
    gpu_run.mkdir()
    with h5py.File(online / "lca.h5", "r") as src, h5py.File(gpu_run / "lca.h5", "w") as dst:
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        for name in src:
            src.copy(src[name], dst, name)
        cfg = OmegaConf.create(src.attrs["config"])
        cfg.lca.cuda_graph = True
        dst.attrs["config"] = OmegaConf.to_yaml(cfg)
    out = tmp_path / "rc"
    rc.recompute(gpu_run, 0, 2, out_dir=out, device="cpu", progress=False)
    with h5py.File(rc.shard_path(out, 0, 2), "r+") as f:
        settings = json.loads(f.attrs["recompute/settings"])
        assert settings["cuda_graph"] is False  # not used here, so not recorded as used
        settings["cuda_graph"] = True  # as a shard computed on a GPU would record it
        f.attrs["recompute/settings"] = json.dumps(settings, sort_keys=True)
    res = rc.recompute(gpu_run, 1, 2, out_dir=out, device="cpu", progress=False)
    _assert_same(online / "lca.h5", res["merged"], COMPARED + COMPARED_EXTRA)
    # Any other setting that differs still refuses the merge.
    with h5py.File(rc.shard_path(out, 0, 2), "r+") as f:
        settings["tolerance"] = 1.0
        f.attrs["recompute/settings"] = json.dumps(settings, sort_keys=True)
    with pytest.raises(rc.RecomputeError, match="recompute/settings"):
        rc.merge_shards(gpu_run, out_dir=out)


def test_cudnn_benchmark_setting(online, tmp_path):
    """lca.cudnn_benchmark: the run's value (false where an older run file lacks the key), overridable,
    checked before any output."""
    with pytest.raises(rc.RecomputeError, match="lca.cudnn_benchmark must be true or false"):
        rc.recompute(online, out_dir=tmp_path / "no", lca={"cudnn_benchmark": "yes"}, progress=False)
    assert not (tmp_path / "no").exists()
    with h5py.File(online / "lca.h5", "r") as f:
        run_cfg = OmegaConf.to_container(OmegaConf.create(f.attrs["config"]))
    assert run_cfg["lca"]["cudnn_benchmark"] == "auto"  # the default since lca_lab.speed: passed on as auto
    assert rc.engine_settings(run_cfg, None)["cudnn_benchmark"] == "auto"  # decided for the device (_build)
    run_cfg["lca"]["cudnn_benchmark"] = False  # a run file from before the auto default
    assert rc.engine_settings(run_cfg, None)["cudnn_benchmark"] is False
    run_cfg["lca"].pop("cudnn_benchmark", None)
    assert rc.engine_settings(run_cfg, None)["cudnn_benchmark"] is False
    assert rc.engine_settings(run_cfg, {"cudnn_benchmark": True})["cudnn_benchmark"] is True
    run_cfg["lca"]["cudnn_benchmark"] = True
    assert rc.engine_settings(run_cfg, None)["cudnn_benchmark"] is True
    assert rc.engine_settings(run_cfg, {"compile": True})["compile"] is True
    with pytest.raises(rc.RecomputeError, match="set one of them to false"):
        rc.engine_settings(run_cfg, {"compile": True, "cuda_graph": True})


def test_clear_error_without_trajectory(online, tmp_path):
    # A run file as store.trajectory=false writes it: everything but trajectory/theta.
    with h5py.File(online / "lca.h5", "r") as src, h5py.File(tmp_path / "lca.h5", "w") as dst:
        for k, v in src.attrs.items():
            dst.attrs[k] = v
        for name in src:
            if name != "trajectory":
                src.copy(src[name], dst, name)
    with pytest.raises(rc.RecomputeError, match=r"no stored trajectory.*store\.trajectory=true"):
        rc.recompute(tmp_path, progress=False)
    assert not (tmp_path / "recompute").exists()  # refused before creating anything
    p = subprocess.run(
        [sys.executable, "-m", "lca_lab.recompute", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=_env(),
    )  # fmt: skip
    assert p.returncode == 2
    err_lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(err_lines) == 1 and err_lines[0].startswith("error: ") and "store.trajectory=true" in p.stderr


def test_rewrite_argv_positional_run_dir(tmp_path):
    d = tmp_path / "0_lr=0.1,seed=1"  # Hydra multirun job directories contain '=' and ','
    d.mkdir()
    argv = rc.rewrite_argv(["prog", "-m", str(d), "shard=0,1", "num_shards=2"])
    assert argv == ["prog", "-m", f"run_dir='{d}'", "shard=0,1", "num_shards=2"]
    assert rc.rewrite_argv(["prog", "run_dir=x", "shard=1"]) == ["prog", "run_dir=x", "shard=1"]
    assert rc.rewrite_argv(["prog", "-cn", "recompute", "merge=true"])[2] == "recompute"


def _env():
    return dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))


@pytest.mark.slow
def test_cli_two_shards_submitit_local(online, tmp_path):
    """The issue's command: a Hydra multirun over two shards on the submitit_local launcher."""
    out = tmp_path / "rc"
    p = subprocess.run(
        [
            sys.executable, "-m", "lca_lab.recompute", "-m", str(online), "shard=0,1", "num_shards=2",
            f"out_dir={out}", "device=cpu", "hydra/launcher=submitit_local",
        ],
        cwd=tmp_path, capture_output=True, text=True, timeout=600, env=_env(),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert rc.shard_path(out, 0, 2).exists() and rc.shard_path(out, 1, 2).exists()
    _assert_same(online / "lca.h5", out / "lca.h5", rtol=1e-12)
    # The merge command works on its own and reports the file.
    p = subprocess.run(
        [sys.executable, "-m", "lca_lab.recompute", str(online), "merge=true", f"out_dir={out}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300, env=_env(),
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    assert f"merged run file   : {out / 'lca.h5'}" in p.stdout


def test_batched_recompute_matches_online(tmp_path):
    """lca.batch_points > 1 (vmap over the points of several steps) gives the online numbers up to the
    float32 rounding of the batched kernels: same refinement decisions, totals and errors to 1e-5 nats
    (float32 L over 144 examples is good to ~1e-7), per-parameter rows in ‖·‖₂ to 1e-2 (a ReLU
    pre-activation within rounding of zero may switch sides; see tests/test_gpu.py)."""
    d = tmp_path / "run"
    run(_cfg(*COMMON, "lca.method=trapezoid"), d)
    res = rc.recompute(d, out_dir=tmp_path / "out", lca={"batch_points": 4}, progress=False)
    with h5py.File(d / "lca.h5", "r") as a, h5py.File(res["merged"], "r") as b:
        assert a["lca/total"].shape[0] == b["lca/total"].shape[0] > 5
        np.testing.assert_array_equal(b["lca/splits"][()], a["lca/splits"][()])
        assert a["lca/splits"][()].max() > 1  # some steps escalated past the trapezoid
        for name in ("lca/total", "lca/error", "train/loss"):
            np.testing.assert_allclose(b[name][()], a[name][()], rtol=0, atol=1e-5, err_msg=name)
        p, q = a["lca/param"][()].astype(np.float64), b["lca/param"][()].astype(np.float64)
        assert np.linalg.norm(p - q) <= 1e-2 * np.linalg.norm(p)
