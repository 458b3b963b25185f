"""Checkpoint and resume: a run killed (SIGKILL) or preempted (SIGUSR1) at a random iteration and
continued ends bit-identical to an uninterrupted run (CPU, deterministic)."""

import os
import pickle
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lca_lab import train as train_mod
from lca_lab.analyze import analyze
from lca_lab.checkpoint import CHECKPOINT_NAME, PREEMPTED_EXIT_CODE, PreemptionSignals, RunPreempted
from lca_lab.config import ConfigError
from lca_lab.store import open_run
from lca_lab.train import TEST_KILL_ENV, run

CONF = Path(__file__).resolve().parents[1] / "conf"
ROOT = Path(__file__).resolve().parents[1]
# Small, but with every piece of loop state: momentum, an LR decay in the middle, a frozen-later layer,
# evaluations, per-class and test LCA, the trajectory, per-parameter rows. 2 epochs × 5 iterations.
ARGS = [
    "data=synthetic",
    "data.size=200",
    "batch_size=40",
    "epochs=2",
    "device=cpu",
    "deterministic=true",
    "figures=false",
    "eval_every=3",
    "opt.lr_decay_epochs=[1]",
    "opt.lr_decay_factor=0.5",
    "+layers.f.select=0",
    "+layers.f.freeze=true",
    "+layers.f.freeze_from=7",
    "lca.per_class=true",
    "lca.test=true",
    "store.trajectory=true",
    "store.flush_every=1",
    "checkpoint.every=3",
]
T = 10


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*ARGS, *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def _cli(run_dir, *extra, env=None, **kw):
    return subprocess.run(
        [sys.executable, "-m", "lca_lab", *ARGS, *extra, f"hydra.run.dir={run_dir}"],
        cwd=ROOT,
        env=dict(os.environ, **(env or {})),
        capture_output=True,
        text=True,
        timeout=600,
        **kw,
    )


def _datasets(path):
    out = {}
    with h5py.File(path, "r") as f:
        f.visititems(lambda n, o: out.__setitem__(n, o[()]) if isinstance(o, h5py.Dataset) else None)
        # Everything but the path and the wall-clock timing of this process's iterations.
        skip = ("summary/run_file", "summary/lca_s_per_iter", "summary/lca_iters_timed")
        summary = {k: f.attrs[k] for k in f.attrs if k.startswith("summary/") and k not in skip}
    return out, summary


def _assert_identical(a, b):
    da, sa = _datasets(a)
    db, sb = _datasets(b)
    assert sorted(da) == sorted(db)
    for k in da:
        assert da[k].shape == db[k].shape, k
        assert np.array_equal(da[k], db[k], equal_nan=da[k].dtype.kind == "f"), k
    assert sa == sb


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    d = tmp_path_factory.mktemp("ref")
    run(_cfg(), d)
    assert not (d / CHECKPOINT_NAME).exists()  # a complete run leaves no checkpoint behind
    return d / "lca.h5"


@pytest.mark.parametrize("kill_at", [6, None])  # 6: on a checkpoint boundary (regression); None: random
def test_sigkill_at_random_iteration_then_resume_is_bit_identical(tmp_path, reference, kill_at):
    k = kill_at or random.Random().randint(1, T - 1)  # mostly not a checkpoint boundary
    d = tmp_path / "run"
    p = _cli(d, env={TEST_KILL_ENV: str(k)})
    assert p.returncode == -signal.SIGKILL, f"k={k}: {p.stderr[-2000:]}"
    # The killed run's file is readable, has every row up to the kill and says it is not complete.
    with open_run(d) as r:
        assert r.status == "running" and r.n_rows == k, k
    rep = analyze(d, make_figures=False)
    assert [s["status"] for s in rep["skipped"]] == ["running"] and not rep["groups"]
    # checkpoint.every=3; the kill at the boundary before iteration k comes before that boundary's
    # checkpoint, so the last one on disk is at the largest multiple of 3 below k.
    last_ck = (k - 1) // 3 * 3
    has_ck = last_ck > 0
    assert (d / CHECKPOINT_NAME).exists() == has_ck
    # The same command again continues from the checkpoint; before the first checkpoint, resume=true
    # starts the run again (without it the existing file is refused, see test_existing_file_...).
    p = _cli(d) if has_ck else _cli(d, "resume=true")
    assert p.returncode == 0, f"k={k}: {p.stderr[-3000:]}"
    assert (f"from its checkpoint at iteration {last_ck}" in p.stdout) == has_ck
    _assert_identical(reference, d / "lca.h5")
    assert not (d / CHECKPOINT_NAME).exists()


def test_sigusr1_checkpoints_stops_and_resumes(tmp_path, reference):
    d = tmp_path / "run"
    # checkpoints only on the signal; the signal is sent once a random number of rows is on disk.
    k = random.Random().randint(2, 6)
    proc = subprocess.Popen(
        [sys.executable, "-m", "lca_lab", *ARGS, "checkpoint.every=null", "checkpoint.seconds=null",
         f"hydra.run.dir={d}"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline, rows = time.time() + 300, 0
    while time.time() < deadline and rows < k and proc.poll() is None:
        time.sleep(0.05)
        try:
            with h5py.File(d / "lca.h5", "r") as f:
                rows = f["lca/iteration"].shape[0]
        except (OSError, KeyError):
            pass
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=300)
    if rows >= T:
        pytest.skip("the run finished before the signal (machine too fast for this test)")
    assert proc.returncode == PREEMPTED_EXIT_CODE, err[-2000:]
    assert "checkpoint saved at iteration" in err and "Traceback" not in err
    with open_run(d) as r:
        assert r.status.startswith("preempted: SIGUSR1 at iteration")
        stopped = r.n_rows
    assert rows <= stopped < T and (d / CHECKPOINT_NAME).exists()
    # Resuming in-process with resume=true (the CLI path is covered above).
    s = run(_cfg("resume=true", "checkpoint.every=null", "checkpoint.seconds=null"), d)
    assert s["lca_rows"] == T
    _assert_identical(reference, d / "lca.h5")


class _SignalNow(PreemptionSignals):
    """As if SIGUSR1 had arrived before the first iteration: the run stops after it."""

    def __enter__(self):
        super().__enter__()
        self.signum = signal.SIGUSR1
        return self


def _preempted_run(d, monkeypatch):
    monkeypatch.setattr(train_mod, "PreemptionSignals", _SignalNow)
    with pytest.raises(RunPreempted, match="iteration 1"):
        run(_cfg(), d)
    monkeypatch.undo()


def test_resume_refuses_a_changed_config_naming_the_keys(tmp_path, monkeypatch):
    _preempted_run(tmp_path, monkeypatch)
    with pytest.raises(ConfigError, match=r"opt\.lr: 0\.1 → 0\.2.*seed: 0 → 1") as e:
        run(_cfg("opt.lr=0.2", "seed=1"), tmp_path)
    assert "\n" not in str(e.value)
    run(_cfg("figures=true", "store.flush_every=5"), tmp_path)  # keys that do not change numbers may
    with open_run(tmp_path) as r:
        assert r.is_complete and r.n_rows == T


def test_a_checkpoint_from_before_a_new_speed_key_continues_with_its_implied_value(tmp_path, monkeypatch):
    """Regression: a key added to the config after a checkpoint was written (lca.cudnn_benchmark) made
    every such run refuse to continue ("None → False"). Missing there, it means the value the run used."""
    import yaml

    from lca_lab.checkpoint import IMPLIED_IN_OLDER, load_checkpoint, save_checkpoint

    _preempted_run(tmp_path, monkeypatch)
    ck = load_checkpoint(tmp_path / CHECKPOINT_NAME)
    old = yaml.safe_load(ck["config"])
    for key in IMPLIED_IN_OLDER:
        section, name = key.split(".")
        del old[section][name]
    ck["config"] = yaml.safe_dump(old, sort_keys=False)
    save_checkpoint(tmp_path, {k: v for k, v in ck.items() if k != "format_version"})
    with pytest.raises(ConfigError, match=r"lca\.cudnn_benchmark: False → True"):
        run(_cfg("lca.cudnn_benchmark=true", "deterministic=false"), tmp_path)
    run(_cfg(), tmp_path)
    with open_run(tmp_path) as r:
        assert r.is_complete and r.n_rows == T


def test_existing_file_without_checkpoint(tmp_path, monkeypatch):
    _preempted_run(tmp_path, monkeypatch)
    (tmp_path / CHECKPOINT_NAME).unlink()
    with pytest.raises(ConfigError, match="no checkpoint.*resume=true"):
        run(_cfg(), tmp_path)
    s = run(_cfg("resume=true"), tmp_path)  # starts it again from iteration 0
    assert s["lca_rows"] == T
    with pytest.raises(ConfigError, match="already exists and is complete"):
        run(_cfg("resume=true"), tmp_path)


class _Evil:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


def test_checkpoint_is_loaded_weights_only(tmp_path, monkeypatch):
    _preempted_run(tmp_path, monkeypatch)
    with open(tmp_path / CHECKPOINT_NAME, "wb") as fh:
        pickle.dump({"model": _Evil()}, fh, protocol=2)
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match="cannot be loaded as an lca_lab checkpoint"):
        run(_cfg(), tmp_path)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.slow
def test_submitit_local_preemption_requeues_and_resumes(tmp_path):
    """SIGUSR2 (submitit's preemption signal) to a job of a submitit_local multirun: the run checkpoints,
    submitit's handler requeues the job, and the requeued job continues in the same job directory."""
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(
        [sys.executable, "-m", "lca_lab", "-m", "hydra/launcher=submitit_local", *ARGS[:6], "epochs=6",
         "store.flush_every=1", f"hydra.sweep.dir={sweep}", "hydra.sweep.subdir=job0"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline, rows, lock = time.time() + 400, 0, None
    while time.time() < deadline and rows < 3:
        time.sleep(0.2)
        files = list(sweep.glob("*/lca.h5"))
        if files:
            lock = files[0].parent / ".lock"
            try:
                with h5py.File(files[0], "r") as f:
                    rows = f["lca/iteration"].shape[0]
            except (OSError, KeyError):
                pass
    assert rows >= 3 and lock is not None
    pid = int(lock.read_text().split()[1])
    os.kill(pid, signal.SIGUSR2)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    with open_run(lock.parent) as r:
        assert r.is_complete and r.n_rows == 30
        assert r.attrs["resumed"].startswith("from iteration ")
    logs = "".join(p.read_text() for p in sweep.glob(".submitit/*/*_log.*"))
    assert "Requeued job" in logs


def _offline_ids(run_dir):
    """Run ids of the offline W&B runs under ``run_dir`` (killed ones included: no wait for their end)."""
    from wandb_offline import _read_run, offline_runs

    return [_read_run(p)["id"] for p in offline_runs(run_dir)]


def test_preempted_and_resumed_run_continues_its_wandb_run(tmp_path, monkeypatch):
    """Both halves of an interrupted run log to one W&B run: the resume passes the id its run file
    recorded (resume="allow"), through a tracker factory as the CLI builds it."""
    from lca_lab.tracking import WandbTracker

    made = []

    def factory(**kw):
        cfg = _cfg()
        made.append(WandbTracker(cfg["logger"], cfg, tmp_path, **kw))
        return made[-1]

    monkeypatch.setattr(train_mod, "PreemptionSignals", _SignalNow)
    with pytest.raises(RunPreempted):
        run(_cfg(), tmp_path, tracker=factory)
    first = made[-1].attrs["wandb_run_id"]
    made[-1].finish(PREEMPTED_EXIT_CODE)
    monkeypatch.undo()
    run(_cfg(), tmp_path, tracker=factory)
    second = made[-1].attrs["wandb_run_id"]
    made[-1].finish(0)
    assert first == second and _offline_ids(tmp_path) == [first, first]
    with open_run(tmp_path) as r:
        assert r.attrs["wandb_run_id"] == first and r.status == "complete"


@pytest.mark.slow
def test_sigkilled_cli_run_resumes_into_the_same_wandb_run(tmp_path):
    """`python -m lca_lab` killed (SIGKILL) and run again: one W&B run id in both halves (offline)."""
    d = tmp_path / "run"
    p = _cli(d, env={TEST_KILL_ENV: "5"})
    assert p.returncode == -signal.SIGKILL, p.stderr[-2000:]
    with open_run(d) as r:
        first = r.attrs["wandb_run_id"]
    p = _cli(d)
    assert p.returncode == 0 and "from its checkpoint at iteration 3" in p.stdout, p.stderr[-3000:]
    assert _offline_ids(d) == [first, first]
    with open_run(d) as r:
        assert r.attrs["wandb_run_id"] == first and r.status == "complete"
