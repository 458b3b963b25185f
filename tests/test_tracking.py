"""W&B tracking, offline only: what a run logs equals its run file; modes; the offline fallback."""

import sys
import time
import types
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from wandb_offline import offline_runs, read_run

from lca_lab.config import ConfigError
from lca_lab.store import open_run
from lca_lab.sweep import job_device, run_name, wandb_group
from lca_lab.tracking import WandbTracker, has_credentials, resolve_mode
from lca_lab.train import run

CONF = Path(__file__).resolve().parents[1] / "conf"


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["device=cpu", *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def history_matches_run_file(wb: dict, h5: Path) -> None:
    """Every per-iteration and evaluation value W&B got equals the run file's (exactly: both float64)."""
    rows = [h for h in wb["history"] if "lca/total" in h]
    evals = [h for h in wb["history"] if "eval/test_loss" in h]
    with open_run(h5) as r:
        f = r.h5
        it = f["lca/iteration"][:]
        assert [h["iteration"] for h in rows] == it.tolist()
        np.testing.assert_array_equal([h["lca/total"] for h in rows], f["lca/total"][:])
        np.testing.assert_array_equal([h["lca/error"] for h in rows], f["lca/error"][:])
        np.testing.assert_array_equal([h["train/loss"] for h in rows], f["train/loss"][1:])
        np.testing.assert_array_equal([h["lca/splits"] for h in rows], f["lca/splits"][:])
        names = r.layer_names
        layer = np.array([[h[f"lca_layer/{n}"] for n in names] for h in rows])
        np.testing.assert_array_equal(layer, f["lca/layer"][:])
        for k in ("helping", "hurting", "zero"):
            np.testing.assert_allclose([h[f"frac/{k}"] for h in rows], f[f"reduce/frac_{k}"][:], rtol=1e-12)
        assert [h["iteration"] for h in evals] == f["eval/iteration"][:].tolist()
        np.testing.assert_array_equal([h["eval/test_loss"] for h in evals], f["eval/test_loss"][:])
        np.testing.assert_array_equal([h["eval/test_acc"] for h in evals], f["eval/test_acc"][:])
        assert evals[-1]["eval/train_loss"] == f["eval/train_loss"][-1]
        assert r.attrs["wandb_run_id"] == wb["id"]


def test_offline_run_logs_what_the_run_file_holds(tmp_path):
    cfg = _cfg("data=synthetic", "data.size=160", "batch_size=32", "epochs=2", "eval_every=3",
               "figures=false", "logger.log_every=4", "lca.max_splits=4")  # fmt: skip
    tr = WandbTracker(cfg["logger"], cfg, tmp_path, group="g1", name="n1", job_type="train")
    assert tr.mode == "offline"
    s = run(cfg, tmp_path, extra_attrs=tr.attrs, tracker=tr)
    tr.log_summary(s, s["run_file"])
    tr.finish(0)
    (d,) = offline_runs(tmp_path)
    wb = read_run(d)
    assert (wb["group"], wb["name"], wb["job_type"], wb["exit_code"]) == ("g1", "n1", "train", 0)
    assert wb["config"]["data"]["size"] == 160 and wb["config"]["seed"] == 0
    history_matches_run_file(wb, tmp_path / "lca.h5")
    assert len([h for h in wb["history"] if "lca/total" in h]) == 10  # 10 rows, flushed 4 + 4 + 2
    assert sum("perf/iters_per_s" in h for h in wb["history"]) == 2
    for name, v in s["layer_lca"].items():
        assert wb["summary"][f"layer_lca/{name}"] == v
    assert wb["summary"]["pct_helping_nonzero"] == s["pct_helping_nonzero"]
    assert f"lca-run-{wb['id']}" in wb["artifacts"]


class _FakeRun:
    def __init__(self):
        self.logged = []

    def log(self, row):
        self.logged.append(row)


def test_logging_is_batched_and_reads_the_device_once_per_flush(tmp_path, monkeypatch):
    tr = WandbTracker({"mode": "disabled", "log_every": 3}, {}, tmp_path)
    tr.run = _FakeRun()
    reads = []
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(torch.Tensor, "cpu", lambda self, *a, **k: reads.append(1) or real_cpu(self, *a, **k))
    for i in range(5):
        t = torch.tensor(float(i), dtype=torch.float64)
        tr.log_iteration(i, loss=0.5 * i, lca_total=t, layer_lca={"a": t * 2, "b": t * 3})
    assert len(tr.run.logged) == 3 and len(reads) == 1  # one flush after 3 rows, one copy for all
    tr.flush()
    assert len(tr.run.logged) == 5 and len(reads) == 2
    assert tr.run.logged[4] == {"iteration": 4, "train/loss": 2.0, "lca/total": 4.0,
                                "lca_layer/a": 8.0, "lca_layer/b": 12.0}  # fmt: skip


def test_auto_mode_is_offline_without_credentials(tmp_path, monkeypatch):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert not has_credentials() and resolve_mode("auto") == "offline"
    (tmp_path / "netrc").write_text("machine api.wandb.ai login user password " + "k" * 40 + "\n")
    assert has_credentials() and resolve_mode("auto") == "online"
    (tmp_path / "netrc").unlink()
    monkeypatch.setenv("WANDB_API_KEY", "k" * 40)
    assert resolve_mode("auto") == "online"
    monkeypatch.setenv("WANDB_MODE", "offline")  # an explicit environment wins over auto
    assert resolve_mode("auto") == "offline" and resolve_mode("disabled") == "disabled"
    with pytest.raises(ConfigError, match="logger.mode"):
        resolve_mode("sometimes")


def test_auto_without_credentials_prints_the_sync_command(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setenv("NETRC", str(tmp_path / "none"))
    tr = WandbTracker({"mode": "auto"}, {"a": 1}, tmp_path)
    tr.finish(0)
    err = capsys.readouterr().err
    assert tr.mode == "offline" and "wandb sync " + str(tmp_path / "wandb" / "offline-run-") in err


@pytest.mark.parametrize("key", ["k" * 40, "bad"], ids=["unreachable-server", "bad-key"])
def test_online_falls_back_to_offline_quickly(tmp_path, monkeypatch, capsys, key):
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # closed port: connection refused
    monkeypatch.setenv("WANDB_API_KEY", key)
    cfg = _cfg("data=synthetic", "data.size=64", "batch_size=32", "epochs=1", "figures=false",
               "logger.mode=online", "logger.init_timeout=2", "lca.max_splits=2")  # fmt: skip
    t0 = time.perf_counter()
    tr = WandbTracker(cfg["logger"], cfg, tmp_path)
    assert time.perf_counter() - t0 < 20
    assert tr.mode == "offline"
    assert "could not start an online run" in capsys.readouterr().err
    run(cfg, tmp_path, extra_attrs=tr.attrs, tracker=tr)  # the run goes on, logged offline
    tr.finish(0)
    (d,) = offline_runs(tmp_path)
    history_matches_run_file(read_run(d), tmp_path / "lca.h5")


def test_naming_and_gpu_per_job(tmp_path):
    job = tmp_path / "multirun" / "2026-01-02" / "03-04-05" / "1_seed=1"
    assert wandb_group(job, "momentum_delay", True) == "momentum_delay_2026-01-02_03-04-05"
    assert wandb_group(job, None, True) == "sweep_2026-01-02_03-04-05"
    assert wandb_group(job, "table1", False) == "table1" and wandb_group(job, None, False) is None
    assert run_name("seed=1", 3, None) == "3:seed=1" and run_name("", None, "table1") == "table1"
    assert [job_device("auto", k, 2) for k in range(3)] == ["cuda:0", "cuda:1", "cuda:0"]
    assert job_device("auto", 5, 1) == "auto" and job_device("cpu", 1, 4) == "cpu"


class _FakeWandb(types.ModuleType):
    """A ``wandb`` module that records what the tracker asks of it (an online run, without a server)."""

    def __init__(self, run_dir: Path) -> None:
        super().__init__("wandb")
        self.runs: list[SimpleNamespace] = []
        self.run_dir = run_dir

    def init(self, **kw):
        files = self.run_dir / f"run-{len(self.runs)}" / "files"
        files.mkdir(parents=True)
        run = SimpleNamespace(
            id=f"fake{len(self.runs)}", project=kw["project"], group=kw["group"], dir=str(files), init=kw,
            config=SimpleNamespace(data={}, update=lambda d, **_: run.config.data.update(d)), summary={},
            used=[], logged=[], exit_code=None,
        )  # fmt: skip
        run.define_metric = lambda *a, **k: None
        run.log = run.logged.append
        run.use_artifact = run.used.append
        run.finish = lambda exit_code=0: setattr(run, "exit_code", exit_code)
        self.runs.append(run)
        return run

    Settings = dict

    class Table:
        def __init__(self, columns):
            self.rows = []

        def add_data(self, *row):
            self.rows.append(row)


def test_recompute_and_analysis_of_a_tracked_run_use_its_artifact(tmp_path, monkeypatch):
    """The training run's Artifact is named in its run file when it is logged; a recompute and an analysis
    of the run (online) record it as their input with use_artifact, in the training run's project."""
    from lca_lab import analyze as an
    from lca_lab import recompute as rc

    cfg = _cfg("data=synthetic", "data.size=64", "batch_size=32", "epochs=1", "figures=false",
               "lca.max_splits=2", "store.trajectory=true")  # fmt: skip
    d = tmp_path / "run"
    tr = WandbTracker(cfg["logger"], cfg, d, group="g", job_type="train")
    s = run(cfg, d, extra_attrs=tr.attrs, tracker=tr)
    tr.log_summary(s, s["run_file"])
    tr.finish(0)
    (wb_dir,) = offline_runs(d)
    wb = read_run(wb_dir)
    name = f"lca-run-{wb['id']}"
    assert name in wb["artifacts"]
    with open_run(d) as r:
        assert r.attrs["wandb_artifact"] == f"{name}:latest"

    fake = _FakeWandb(tmp_path / "fake")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    monkeypatch.setenv("WANDB_MODE", "online")
    with initialize_config_dir(config_dir=str(Path(rc.__file__).parents[1] / "conf"), version_base="1.3"):
        task = compose(config_name="recompute", overrides=[f"run_dir={d}", "device=cpu"])
    res = rc._main(task)
    assert res["merged"]
    (rec,) = fake.runs
    assert rec.used == [f"{name}:latest"] and rec.config.data["inputs"] == [f"{name}:latest"]
    assert (rec.init["job_type"], rec.project, rec.group, rec.exit_code) == ("recompute", "lca_lab", "g", 0)
    assert rec.init["config"]["training_run_id"] == wb["id"]

    rep = an.analyze(d, out=tmp_path / "report", make_figures=False, repeats=10)
    an._log_to_wandb(rep, tmp_path / "report", "online")
    ana = fake.runs[-1]
    assert ana.init["job_type"] == "analysis" and ana.used == [f"{name}:latest"]


def test_untracked_run_makes_no_recompute_run(tmp_path, monkeypatch):
    from lca_lab.tracking import log_recompute

    cfg = _cfg("data=synthetic", "data.size=64", "batch_size=32", "epochs=1", "figures=false",
               "lca.max_splits=2", "logger=none")  # fmt: skip
    run(cfg, tmp_path)
    fake = _FakeWandb(tmp_path / "fake")
    monkeypatch.setitem(sys.modules, "wandb", fake)
    assert log_recompute(tmp_path / "lca.h5", tmp_path / "lca.h5", mode="online") is None and not fake.runs
