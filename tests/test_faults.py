"""Failure behaviour: disk full, a second writer, malformed run files, bad config values (one line each)."""

import errno
import os
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lca_lab.analyze import analyze
from lca_lab.checkpoint import RunDirLock
from lca_lab.config import ConfigError
from lca_lab.store import MalformedRunFileError, RunWriter, open_run, transport
from lca_lab.train import StorageError, run

CONF = Path(__file__).resolve().parents[1] / "conf"
ROOT = Path(__file__).resolve().parents[1]
SMALL = ["data=synthetic", "data.size=120", "batch_size=20", "epochs=1", "device=cpu", "figures=false"]


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*SMALL, *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def test_disk_full_gives_clear_error_and_keeps_committed_rows(tmp_path, monkeypatch):
    ref = run(_cfg("store.flush_every=2"), tmp_path / "ref")
    assert ref["lca_rows"] == 6
    real, calls, calls_ok = transport.write_rows, {"n": 0}, {"rows": 0}

    def full_disk(ds, offset, arr):  # from the 3rd flush of LCA rows on, the disk is full
        if ds.name == "/lca/total":
            calls["n"] += 1
            if calls["n"] >= 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            calls_ok["rows"] = offset + len(arr)
        real(ds, offset, arr)

    monkeypatch.setattr(transport, "write_rows", full_disk)
    with pytest.raises(StorageError, match="No space left on device.*keeps every row committed") as e:
        run(_cfg("store.flush_every=2"), tmp_path / "full")
    assert "\n" not in str(e.value)
    monkeypatch.undo()
    with open_run(tmp_path / "full") as r, open_run(tmp_path / "ref") as good:
        assert r.status.startswith("failed: OSError")
        n = r.n_rows  # the rows of the two flushes before the disk filled up
        assert n == calls_ok["rows"] and 1 <= n < 6
        np.testing.assert_array_equal(r.lca_total, good.lca_total[:n])
        np.testing.assert_array_equal(r.param_lca(), good.param_lca(slice(0, n)))
        np.testing.assert_array_equal(r.train_loss, good.train_loss[: n + 1])


def test_second_process_on_the_same_run_dir_is_refused(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c",
         "import sys, time; from lca_lab.checkpoint import RunDirLock; "
         f"l = RunDirLock({str(tmp_path)!r}).acquire(); print('locked', flush=True); time.sleep(60)"],
        cwd=ROOT, stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ConfigError, match=f"in use by pid {holder.pid} on"):
            run(_cfg(), tmp_path)
        assert not (tmp_path / "lca.h5").exists()
    finally:
        holder.kill()
        holder.wait()
    RunDirLock(tmp_path).acquire().release()  # the lock died with its holder: no stale lock


def _good_file(path):
    with RunWriter(
        path, param_names=["w", "b"], param_shapes=[(3, 2), (3,)], param_layer=[0, 0], layer_names=["fc"],
        attrs={"config": "seed: 0\n"}, trajectory=True,
    ) as w:  # fmt: skip
        w.write_initial(1.0, np.zeros(9))
        for t in range(3):
            w.append(t, 1.0 - t / 10, -0.1, 0.0, 2, True, [-0.1], np.zeros(9), np.zeros(9))
    return path


@pytest.mark.parametrize(
    "damage,needle",
    [
        (lambda f: f.__delitem__("params/shapes"), "params/shapes is missing"),
        (lambda f: f["params/layer"].__setitem__(1, 5), "params/layer has indices outside 0..0"),
        (lambda f: _replace(f, "params/names", np.array(["w"], dtype=object)), "one per tensor"),
        (lambda f: _replace(f, "params/shapes", np.array(["(3, 2)", "three"], dtype=object)), "'three'"),
        (lambda f: _replace(f, "lca/param", np.zeros((3, 8), "f4")), "K = 9"),
        (lambda f: _replace(f, "trajectory/theta", np.zeros((4, 10), "f4")), "trajectory/theta"),
        (lambda f: _replace(f, "lca/layer", np.zeros((3, 2))), "lca/layer has 2 columns"),
        (lambda f: _replace(f, "lca/total", np.zeros(2)), "lca/total has 2 rows but lca/iteration has 3"),
        (lambda f: _replace(f, "lca/iteration", np.array([0, 2, 1])), "not increasing"),
    ],
)
def test_malformed_run_file_is_rejected_with_clear_message(tmp_path, damage, needle):
    path = _good_file(tmp_path / "lca.h5")
    with open_run(path) as r:
        assert r.n_rows == 3  # the undamaged file reads
    with h5py.File(path, "r+") as f:
        damage(f)
    with pytest.raises(MalformedRunFileError, match="not a valid lca_lab run file") as e:
        open_run(path)
    assert needle in str(e.value)
    rep = analyze(tmp_path, make_figures=False)  # analyze lists it and goes on
    assert rep["skipped"][0]["status"].startswith("unreadable") and needle in rep["skipped"][0]["status"]


def _replace(f, name, data):
    del f[name]
    if data.dtype == object:
        f.create_dataset(name, data=data, dtype=h5py.string_dtype())
    else:
        f.create_dataset(name, data=data, maxshape=(None, *data.shape[1:]))


def test_not_an_hdf5_file_is_rejected(tmp_path):
    (tmp_path / "lca.h5").write_text("hello")
    with pytest.raises(MalformedRunFileError, match="not an HDF5 file"):
        open_run(tmp_path)


@pytest.mark.parametrize(
    "override,needle",
    [
        ("opt.lr=-0.1", "opt.lr must be > 0"),
        ("opt.momentum=1.0", "opt.momentum must be < 1"),
        ("opt.momentum=-0.5", "opt.momentum must be ≥ 0"),
        ("+layers.x.select=-1 +layers.x.momentum_delay=-2", "layers.x.momentum_delay must be ≥ 0"),
        ("+layers.x.select=-1 +layers.x.momentum=1.5", "layers.x.momentum must be in [0, 1)"),
        ("+layers.x.select=7 +layers.x.freeze=true", "layers.x.select: layer index out of range"),
        ("+layers.x.select=-1 +layers.x.freeze=maybe", "layers.x.freeze must be true or false"),
        ("batch_size=500", "batch_size=500 is larger than the training set"),
        ("seed=abc", "seed must be an integer"),
        ("epochs=1.5", "epochs must be an integer"),
        ("deterministic=3", "deterministic must be true or false"),
        ("checkpoint.every=0", "checkpoint.every must be an integer ≥ 1"),
    ],
)
def test_bad_values_fail_with_one_line(tmp_path, override, needle):
    with pytest.raises(ConfigError) as e:
        run(_cfg(*override.split()), tmp_path)
    assert needle in str(e.value) and "\n" not in str(e.value)
    assert not (tmp_path / "lca.h5").exists()


def test_batch_larger_than_real_training_set_fails_before_training(tmp_path):
    with pytest.raises(ConfigError, match=r"batch_size=5000 is larger than the training set \(4500"):
        with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
            cfg = compose(config_name="config", overrides=["data=mnist5k", "batch_size=5000", "device=cpu"])
        run(OmegaConf.to_container(cfg, resolve=True), tmp_path)
    assert not (tmp_path / "lca.h5").exists()


@pytest.mark.parametrize(
    "args,needle",
    [
        (["experiment=nope"], "experiment=nope does not exist; choose one of: layer_interventions"),
        pytest.param(["-m", "net=fc,resnet21"], "net=resnet21 does not exist", marks=pytest.mark.slow),
        # regression: a layer index checked in run() once started a W&B run before failing
        (["+layers.x.select=9", "+layers.x.freeze=true"], "layers.x.select: layer index"),
    ],
)
def test_cli_bad_input_is_one_line(tmp_path, args, needle):
    t0 = time.time()
    p = subprocess.run(
        [sys.executable, "-m", "lca_lab", *SMALL, *args, f"hydra.run.dir={tmp_path / 'run'}",
         f"hydra.sweep.dir={tmp_path / 'sweep'}"],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ),
    )  # fmt: skip
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr[-2000:]
    assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], p.stderr
    assert time.time() - t0 < 300
    assert not (tmp_path / "run" / "lca.h5").exists()
    assert not (tmp_path / "run" / "wandb").exists()  # no W&B run for a config that cannot run
