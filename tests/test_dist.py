"""L's passes sharded over processes (gloo on the CPU) give one process's numbers."""

from __future__ import annotations

import socket

import pytest
import torch
import torch.multiprocessing as mp

from lca_lab.dist import SINGLE, shard_chunks
from tests import dist_workers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("whole", [False, True])
@pytest.mark.parametrize("n, chunk, world", [(23, 4, 2), (23, 4, 3), (10, 6, 3), (5, 10, 2), (100, 7, 8)])
def test_shards_cover_every_example_once_in_order(n, chunk, world, whole):
    seen = []
    for r in range(world):
        ranges = shard_chunks(n, chunk, world, r, whole)
        assert all(0 < e - s <= chunk for s, e in ranges)
        seen += [i for s, e in ranges for i in range(s, e)]
    assert seen == list(range(n))  # no padding, no duplicate, no gap
    if whole:  # the single process's own chunks, none cut
        single = shard_chunks(n, chunk, 1, 0, True)
        assert sorted(c for r in range(world) for c in shard_chunks(n, chunk, world, r, True)) == single


@pytest.fixture(scope="module")
def single():
    return dist_workers.evaluate_all(SINGLE)


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_passes_equal_one_process(tmp_path, single, world):
    mp.spawn(dist_workers.worker, args=(world, _free_port(), str(tmp_path)), nprocs=world, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(world)]
    for name, ref in single.items():
        for r, got in enumerate(ranks):
            for key, want in ref.items():
                have = got[name][key]
                if key == "splits":
                    assert have == want, (name, r)  # the same refinement decisions
                elif key == "param":  # per-parameter LCA: products of the same float64 numbers
                    torch.testing.assert_close(
                        have, want, rtol=1e-10, atol=1e-15, msg=f"{name} rank {r} {key}"
                    )
                else:
                    torch.testing.assert_close(
                        have, want, rtol=1e-12, atol=1e-15, msg=f"{name} rank {r} {key}"
                    )
        # every rank holds the same bits (the all-reduce's result)
        for got in ranks[1:]:
            assert torch.equal(got[name]["g"], ranks[0][name]["g"])


# -- whole runs under torchrun (gloo, CPU) ----------------------------------------------------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
RUN = ["data=synthetic", "data.size=120", "batch_size=20", "epochs=1", "logger=none",
       "figures=false", "lca.tolerance=1e-4"]  # fmt: skip


def _launch(tmp_path, ranks: int, *args: str, env: dict | None = None):
    import os
    import subprocess
    import sys

    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]
    dev = [] if any(a.startswith("device=") for a in args) else ["device=cpu"]
    cmd = [*(launcher if ranks > 1 else [sys.executable]), "-m", "lca_lab", *RUN, *dev, *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _rows(run_dir):
    import h5py

    with h5py.File(run_dir / "lca.h5", "r") as f:
        keys = ("lca/param", "lca/total", "lca/splits", "train/loss", "trajectory/theta", "lca/class_layer")
        return {k: f[k][()] for k in keys if k in f} | {"attrs": dict(f.attrs)}


def test_torchrun_two_ranks_give_the_single_process_run(tmp_path):
    import numpy as np

    one = _launch(
        tmp_path, 1, f"hydra.run.dir={tmp_path / 'one'}", "store.trajectory=true", "lca.per_class=true"
    )
    assert one.returncode == 0, one.stderr[-2000:]
    two = _launch(
        tmp_path, 2, f"hydra.run.dir={tmp_path / 'two'}", "store.trajectory=true", "lca.per_class=true"
    )
    assert two.returncode == 0, two.stderr[-3000:]
    a, b = _rows(tmp_path / "one"), _rows(tmp_path / "two")
    assert b["attrs"]["dist_world_size"] == 2 and b["attrs"]["dist_backend"] == "gloo"
    assert a["attrs"]["dist_world_size"] == 1
    np.testing.assert_array_equal(b["trajectory/theta"], a["trajectory/theta"])  # the same trajectory
    np.testing.assert_array_equal(b["lca/splits"], a["lca/splits"])  # the same refinement decisions
    # float32 chunk sums in another grouping: float rounding only
    np.testing.assert_allclose(b["lca/param"], a["lca/param"], rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(b["lca/total"], a["lca/total"], rtol=1e-5, atol=1e-8)
    np.testing.assert_allclose(b["lca/class_layer"], a["lca/class_layer"], rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(b["train/loss"], a["train/loss"], rtol=1e-6)
    assert sorted(p.name for p in (tmp_path / "two").iterdir()) == [
        ".hydra",
        ".lock",
        "__main__.log",
        "lca.h5",
    ]
    assert two.stdout.count("run file          :") == 1  # one summary, rank 0's


def test_a_killed_rank_fails_the_run_and_it_resumes_with_another_number_of_ranks(tmp_path):
    import numpy as np

    run_dir = tmp_path / "run"
    killed = _launch(
        tmp_path, 2, f"hydra.run.dir={run_dir}", "checkpoint.every=2",
        env={"LCA_LAB_TEST_SIGKILL_AT_ITERATION": "4", "LCA_LAB_TEST_SIGKILL_RANK": "1"},
    )  # fmt: skip
    assert killed.returncode != 0
    before = _rows(run_dir)
    assert before["attrs"]["status"].startswith("failed: ")
    assert 4 <= len(before["lca/total"]) < 6  # every committed row kept
    assert (run_dir / "checkpoint.pt").exists()
    resumed = _launch(tmp_path, 1, f"hydra.run.dir={run_dir}")  # one process continues the two's run
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming" in resumed.stderr + resumed.stdout
    assert _launch(tmp_path, 1, f"hydra.run.dir={tmp_path / 'whole'}").returncode == 0
    a, b = _rows(tmp_path / "whole"), _rows(run_dir)
    assert b["attrs"]["status"] == "complete"
    np.testing.assert_allclose(b["lca/param"], a["lca/param"], rtol=1e-4, atol=1e-8)
    np.testing.assert_allclose(b["train/loss"], a["train/loss"], rtol=1e-6)


def test_torchrun_recompute_shares_the_passes_and_gives_one_process_rows(tmp_path):
    import os
    import subprocess
    import sys

    import numpy as np

    train = _launch(tmp_path, 1, f"hydra.run.dir={tmp_path / 'run'}", "store.trajectory=true", "lca=off")
    assert train.returncode == 0, train.stderr[-2000:]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    outs = {}
    for ranks in (1, 2):
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc-per-node={ranks}",
        ]
        head = launcher if ranks > 1 else [sys.executable]
        cmd = [
            *head,
            "-m",
            "lca_lab.recompute",
            str(tmp_path / "run"),
            f"out_dir={tmp_path / f'r{ranks}'}",
            "device=cpu",
        ]
        r = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, r.stderr[-3000:]
        assert r.stdout.count("merged run file") == 1  # rank 0 alone reports and merges
        outs[ranks] = _rows(tmp_path / f"r{ranks}")
    a, b = outs[1], outs[2]
    np.testing.assert_array_equal(b["lca/splits"], a["lca/splits"])
    np.testing.assert_allclose(b["lca/param"], a["lca/param"], rtol=1e-4, atol=1e-8)
    assert sorted(p.name for p in (tmp_path / "r2").iterdir() if p.suffix == ".h5") == [
        "lca.h5", "shard-00-of-01.h5"
    ]  # fmt: skip


def test_bench_ranks_reports_scaling_and_refuses_bad_options(tmp_path):
    import json
    import subprocess
    import sys

    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = tmp_path / "ranks.json"
    cmd = [
        sys.executable,
        "-m",
        "lca_lab.bench",
        "--ranks",
        "2",
        "--nets",
        "fc",
        "--n-train",
        "64",
        "--iters",
        "1",
    ]
    r = subprocess.run([*cmd, "--json", str(out)], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    row = json.loads(out.read_text())["scaling"][0]
    assert row["ranks"] == 2 and row["backend"] == "gloo" and row["allreduce_bytes"] == 8 * (row["K"] + 1)
    assert row["efficiency"] == pytest.approx(row["pass_s_1"] / (2 * row["pass_s_N"]))
    assert 0 < row["allreduce_share"] < 1 and "efficiency" in r.stdout
    bad = subprocess.run([*cmd[:4], "1"], env=env, capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "--ranks must be ≥ 2" in bad.stderr


def test_projection_counts_whole_chunks_on_the_slowest_rank():
    from lca_lab.bench_ranks import project

    # 9 BatchNorm chunks: 8 ranks leave one rank with 2 (efficiency ≈ 9/16), 9 ranks with 1 each
    assert project(1.0, 10, 8, 9, latency_s=0.0)["efficiency"] == pytest.approx(9 / 16, rel=1e-4)
    assert project(1.0, 10, 9, 9, latency_s=0.0)["efficiency"] == pytest.approx(1.0, rel=1e-4)
    assert project(1.0, 10, 8, None, latency_s=0.0)["efficiency"] == pytest.approx(1.0, rel=1e-4)
    r = project(1.0, 272_474, 8, None, bus_gb_s=100.0, latency_s=0.0)
    assert r["allreduce_s"] == pytest.approx(2 * 7 / 8 * 8 * 272_475 / 100e9)


def test_world_comes_from_torchrun_or_slurm(monkeypatch):
    from lca_lab.dist import rank_device, world_from_env

    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID"):
        monkeypatch.delenv(k, raising=False)
    assert world_from_env() == (0, 1, 0)
    monkeypatch.setenv("SLURM_NTASKS", "8")
    monkeypatch.setenv("SLURM_PROCID", "5")
    monkeypatch.setenv("SLURM_LOCALID", "1")
    assert world_from_env() == (5, 8, 1)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert rank_device("cpu") == "cpu" and rank_device("cuda") == "cuda:1"
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert rank_device("cuda") == "cuda:0"  # ranks sharing one GPU (gloo)
    monkeypatch.setenv("RANK", "2")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert world_from_env() == (2, 4, 0)  # torchrun's own variables first


@pytest.mark.slow
def test_a_hanging_rank_ends_the_run_after_dist_timeout(tmp_path):
    import time

    t0 = time.perf_counter()
    hung = _launch(
        tmp_path, 2, f"hydra.run.dir={tmp_path / 'run'}", "dist_timeout=5",
        env={"LCA_LAB_TEST_SIGKILL_AT_ITERATION": "3", "LCA_LAB_TEST_SIGKILL_RANK": "1",
             "LCA_LAB_TEST_SIGNAL": "SIGSTOP"},
    )  # fmt: skip
    assert hung.returncode != 0
    rows = _rows(tmp_path / "run")
    assert rows["attrs"]["status"].startswith("failed: ") and len(rows["lca/total"]) >= 3
    assert time.perf_counter() - t0 < 120


@pytest.mark.gpu
def test_two_ranks_on_cuda_give_the_single_process_run(tmp_path):
    import numpy as np

    for ranks in (1, 2):  # on one GPU the two ranks share it through gloo (NCCL needs a GPU per rank)
        r = _launch(
            tmp_path, ranks, f"hydra.run.dir={tmp_path / str(ranks)}", "device=cuda", "store.trajectory=true"
        )
        assert r.returncode == 0, r.stderr[-3000:]
    a, b = _rows(tmp_path / "1"), _rows(tmp_path / "2")
    np.testing.assert_array_equal(b["lca/splits"], a["lca/splits"])
    np.testing.assert_allclose(b["lca/param"], a["lca/param"], rtol=1e-4, atol=1e-7)
