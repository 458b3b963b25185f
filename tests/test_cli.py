"""The real command line in a subprocess, as a user runs it."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import pytest

ROOT = Path(__file__).resolve().parents[1]
REQUIRED = [
    "train/loss",
    "lca/param",
    "lca/layer",
    "lca/total",
    "lca/error",
    "lca/splits",
    "params/names",
    "params/shapes",
    "params/layer",
    "layers/names",
    "data/train_index",
]
ATTRS = [
    "config",
    "lca_lab_version",
    "git_sha",
    "torch_version",
    "device",
    "data_source",
    "created",
    "status",
]


def _cli(tmp_path, *args, timeout=300):
    env = dict(os.environ, LCA_LAB_DATA=str(tmp_path / "data"))
    return subprocess.run(
        [sys.executable, "-m", "lca_lab", *args, f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_cli_writes_a_complete_run_file(tmp_path):
    p = _cli(tmp_path, "data=mnist5k", "batch_size=500", "epochs=1", "device=cpu", "store.trajectory=true")
    assert p.returncode == 0, p.stderr[-3000:]
    path = tmp_path / "run" / "lca.h5"
    assert str(path) in p.stdout
    for needle in [
        "final train loss",
        "final test loss",
        "helping",
        "max |Σ LCA − ΔL|",
        "cumulative error",
        "fc1",
    ]:
        assert needle in p.stdout, needle
    with h5py.File(path) as f:
        for name in REQUIRED + ["trajectory/theta"]:
            assert name in f, name
        for a in ATTRS:
            assert a in f.attrs, a
        assert f.attrs["status"] == "complete"
        T = f["lca/total"].shape[0]
        assert T == 9 and f["train/loss"].shape == (T + 1,) and f["trajectory/theta"].shape[0] == T + 1
        K = f["lca/param"].shape[1]
        assert K == 784 * 100 + 100 + 100 * 50 + 50 + 50 * 10 + 10
        assert "net:" in f.attrs["config"]
        assert len(f["data/train_index"]) == 4500


def test_offline_mnist_falls_back_to_bundled_digits(tmp_path):
    # tests never download: LCA_LAB_DATA is an empty folder and downloading is switched off.
    p = _cli(tmp_path, "data.download=false", "batch_size=1000", "epochs=1", "device=cpu", "lca.window=[0,2]")
    assert p.returncode == 0, p.stderr[-3000:]
    out = p.stdout + p.stderr
    assert "mnist5k" in out and "data.fallback" in out
    with h5py.File(tmp_path / "run" / "lca.h5") as f:
        assert f.attrs["data_source"] == "mnist5k"


@pytest.mark.parametrize(
    "override,needle",
    [
        ("lca.method=bogus", "lca.method"),
        ("lca.tolerance=0", "lca.tolerance"),
        ("lca.chunk_size=0", "lca.chunk_size"),
        ("device=gpu0", "device"),
    ],
)
def test_invalid_values_fail_before_training(tmp_path, override, needle):
    p = _cli(tmp_path, "data=synthetic", override, timeout=120)
    assert p.returncode != 0
    assert needle in p.stderr
    assert "Traceback" not in p.stderr
    assert not (tmp_path / "run" / "lca.h5").exists()


def test_interrupted_run_keeps_completed_rows(tmp_path):
    env = dict(os.environ, LCA_LAB_DATA=str(tmp_path / "data"))
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lca_lab",
            "data=mnist5k",
            "batch_size=20",
            "device=cpu",
            "figures=false",
            "store.flush_every=1",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    path = tmp_path / "run" / "lca.h5"
    deadline = time.time() + 120
    rows = 0
    while time.time() < deadline and rows < 3:
        time.sleep(0.5)
        try:
            with h5py.File(path, "r") as f:
                rows = f["lca/total"].shape[0]
        except (OSError, KeyError):
            pass
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert rows >= 3
    assert proc.returncode == 130, err[-2000:]
    assert "interrupted" in err and "Traceback" not in err
    with h5py.File(path, "r") as f:
        assert f.attrs["status"] == "failed: KeyboardInterrupt: "
        n = f["lca/total"].shape[0]
        assert n >= rows and f["train/loss"].shape[0] == n + 1
