"""Multirun as a user runs it (subprocess): W&B groups, failed jobs, launchers; W&B sweep files."""

import itertools
import os
import subprocess
import sys
from pathlib import Path

import h5py
import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf
from test_tracking import history_matches_run_file
from wandb_offline import offline_runs, read_run

from lca_lab.config import validate
from lca_lab.sweep import FAILED_MARKER, FailureReport, failed_jobs

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
TINY = ["data=synthetic", "data.size=64", "batch_size=32", "epochs=1", "figures=false", "device=cpu",
        "lca.max_splits=2"]  # fmt: skip


def _lca_lab(tmp_path, *args, module="lca_lab", timeout=600):
    env = dict(os.environ, LCA_LAB_DATA=str(tmp_path / "data"), PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-m", module, *args], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=timeout)  # fmt: skip


def _sweep_values(s: str) -> list:
    """A Hydra sweep string (``0,1,2``, ``range(10)``) as its list of values."""
    (o,) = OverridesParser.create().parse_overrides([f"k={s}"])
    if not o.is_sweep_override():
        return [o.value()]
    return [yaml.safe_load(str(v)) for v in o.sweep_string_iterator()]


@pytest.mark.slow
def test_failed_jobs_do_not_stop_the_multirun_and_are_reported(tmp_path):
    # job 0 runs, job 1 diverges (FloatingPointError), job 2 is a config error (before any compute)
    sweep = tmp_path / "sweep"
    p = _lca_lab(tmp_path, "-m", *TINY, "opt.lr=0.05,1e30,-1", f"hydra.sweep.dir={sweep}")
    assert p.returncode == 1, p.stderr[-3000:]
    jobs = sorted(sweep.glob("[0-9]_*"))
    assert len(jobs) == 3
    assert "2 job(s) of the multirun" in p.stderr and str(jobs[1]) in p.stderr and str(jobs[2]) in p.stderr
    with h5py.File(jobs[0] / "lca.h5") as f:
        assert f.attrs["status"] == "complete"
    with h5py.File(jobs[1] / "lca.h5") as f:
        assert f.attrs["status"].startswith("failed: FloatingPointError")
    assert not (jobs[0] / "job_failed.txt").exists()
    assert "opt.lr" in (jobs[2] / "job_failed.txt").read_text()
    (ok,) = offline_runs(jobs[0])
    (bad,) = offline_runs(jobs[1])
    assert read_run(ok)["exit_code"] == 0 and read_run(bad)["exit_code"] == 1  # W&B run state: failed
    assert read_run(ok)["group"] == read_run(bad)["group"] == f"sweep_{tmp_path.name}_sweep"
    a = _lca_lab(tmp_path, str(sweep), "--no-figures", "--repeats", "20", "--wandb", "off",
                 module="lca_lab.analyze")  # fmt: skip
    assert a.returncode == 0, a.stderr[-3000:]
    assert "2 run(s) failed or incomplete" in a.stderr
    report = (sweep / "report.md").read_text()
    assert "FloatingPointError" in report and "failed before the run file" in report and "opt.lr" in report


def test_failure_report_lists_failed_jobs_and_exits_1(tmp_path, capsys):
    ok, bad, early = (tmp_path / n for n in ("0_ok", "1_bad", "2_early"))
    for d, status in ((ok, "complete"), (bad, "failed: FloatingPointError: diverged")):
        d.mkdir()
        with h5py.File(d / "lca.h5", "w") as f:
            f.attrs["status"] = status
    early.mkdir()
    (early / FAILED_MARKER).write_text("error: opt.lr must be > 0\nexit code 2\n")
    assert failed_jobs(tmp_path) == [(str(bad), "failed: FloatingPointError: diverged"),
                                     (str(early), "error: opt.lr must be > 0")]  # fmt: skip
    with pytest.raises(SystemExit) as e:
        FailureReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    err = capsys.readouterr().err
    assert e.value.code == 1 and "2 job(s)" in err and "1 other job(s) completed" in err
    (bad / "lca.h5").unlink()
    (early / FAILED_MARKER).unlink()
    FailureReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))


def test_every_job_failed_is_said_and_listed_in_job_order(tmp_path, capsys):
    # Regression: the list was sorted as text (0, 10, 11, 1, 2, …) and said "the other jobs finished" and
    # analyze said only "no lca.h5 run files" when every job had failed before writing one.
    for j in range(12):
        d = tmp_path / f"{j}_opt.lr=-{j}"
        d.mkdir()
        (d / FAILED_MARKER).write_text(f"error: opt.lr must be > 0, got -{j}\nexit code 2\n")
    assert [Path(d).name.split("_")[0] for d, _ in failed_jobs(tmp_path)] == [str(j) for j in range(12)]
    with pytest.raises(SystemExit):
        FailureReport().on_multirun_end(OmegaConf.create({"hydra": {"sweep": {"dir": str(tmp_path)}}}))
    err = capsys.readouterr().err
    assert "12 job(s)" in err and "No job completed" in err and "other job" not in err
    assert err.index("/2_opt.lr=-2:") < err.index("/10_opt.lr=-10:")
    from lca_lab.analyze import main as analyze_main

    assert analyze_main([str(tmp_path), "--no-figures", "--wandb", "off"]) == 2
    err = capsys.readouterr().err
    assert "no lca.h5 run files" in err and "12 job(s) failed before writing one" in err
    assert "opt.lr must be > 0, got -11" in err and err.index("got -2\n") < err.index("got -10\n")


@pytest.mark.slow
def test_two_seeds_by_two_delays_on_mnist5k_in_one_wandb_group(tmp_path):
    # The "done when": 4 offline W&B runs in one group, their HDF5 files, and an analysis run.
    sweep = tmp_path / "multirun" / "2026-01-01" / "00-00-00"
    p = _lca_lab(tmp_path, "-m", "data=mnist5k", "seed=0,1", "layers=last_momentum_delay",
                 "layers.last.momentum_delay=0,1", "epochs=1", "batch_size=1500", "figures=false",
                 "device=cpu", f"hydra.sweep.dir={sweep}")  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = sorted(sweep.glob("[0-9]_*"))
    assert len(jobs) == 4
    groups = set()
    for j in jobs:
        (d,) = offline_runs(j)
        wb = read_run(d)
        history_matches_run_file(wb, j / "lca.h5")
        assert wb["exit_code"] == 0 and wb["job_type"] == "train"
        assert wb["name"].startswith(j.name.split("_")[0] + ":") and "seed=" in wb["name"]
        groups.add(wb["group"])
    assert groups == {"sweep_2026-01-01_00-00-00"}
    a = _lca_lab(tmp_path, str(sweep), "--no-figures", "--repeats", "20", module="lca_lab.analyze")
    assert a.returncode == 0, a.stderr[-3000:]
    (d,) = offline_runs(sweep / "wandb")
    wb = read_run(d)
    assert wb["group"] == "sweep_2026-01-01_00-00-00" and wb["job_type"] == "analysis"
    assert wb["summary"]["n_runs"] == 4 and "analysis/groups/_type" in wb["summary"]


@pytest.mark.slow
def test_submitit_local_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    p = _lca_lab(tmp_path, "-m", "hydra/launcher=local", *TINY, "seed=0,1", f"hydra.sweep.dir={sweep}")
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = sorted(sweep.glob("[0-9]_*"))
    assert len(jobs) == 2 and (sweep / ".submitit").is_dir()
    for j in jobs:
        with h5py.File(j / "lca.h5") as f:
            assert f.attrs["status"] == "complete"
        (d,) = offline_runs(j)
        assert read_run(d)["exit_code"] == 0


def _compose(overrides, hydra_cfg=False):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides), return_hydra_config=hydra_cfg)


@pytest.mark.parametrize("launcher", ["parallel", "local", "slurm"])
def test_launcher_configs_compose(launcher):
    cfg = _compose([f"hydra/launcher={launcher}", "hydra.launcher.partition=gpu"] if launcher == "slurm"
                   else [f"hydra/launcher={launcher}"], hydra_cfg=True)  # fmt: skip
    lc = cfg.hydra.launcher
    target = {"parallel": "JoblibLauncher", "local": "LocalLauncher", "slurm": "SlurmLauncher"}[launcher]
    assert lc._target_.endswith(target)
    if launcher == "slurm":
        assert lc.partition == "gpu" and lc.gpus_per_node == 1 and lc.array_parallelism > 0
        assert lc.timeout_min > 0


SWEEPS = sorted((ROOT / "sweeps").glob("*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_wandb_sweep_matches_its_experiment_and_composes(path):
    sw = yaml.safe_load(path.read_text())
    assert sw["command"] == ["${env}", "${interpreter}", "-m", "lca_lab", "${args_no_hyphens}"]
    assert sw["method"] == "grid"
    params = sw["parameters"]
    exp = params["experiment"]["value"]
    grid = {k: v["values"] for k, v in params.items() if k != "experiment"}
    # the same grid as the experiment's Hydra sweep
    hydra_params = _compose([f"experiment={exp}"], hydra_cfg=True).hydra.sweeper.params
    assert {k: _sweep_values(str(v)) for k, v in hydra_params.items()} == grid
    # ${args_no_hyphens} gives key=value: every corner of the grid composes as Hydra overrides
    keys = list(grid)
    for combo in itertools.product(*[(v[0], v[-1]) for v in grid.values()]):
        overrides = [f"experiment={exp}", *[f"{k}={v}" for k, v in zip(keys, combo)]]
        cfg = OmegaConf.to_container(_compose(overrides), resolve=True)
        validate(cfg)
        for k, v in zip(keys, combo):
            node = OmegaConf.select(OmegaConf.create(cfg), k)
            if k in ("net", "opt"):
                own = OmegaConf.to_container(_compose([f"{k}={v}"]), resolve=True)[k]  # the group file's
                assert cfg[k]["_target_"] == own["_target_"] and (
                    v != "sgd_nomomentum" or cfg["opt"]["momentum"] == 0.0
                )
                same = {n: x for n, x in cfg[k].items() if n != "lr"}
                assert same == {n: x for n, x in own.items() if n != "lr"}  # the experiment sets only lr
            elif k == "layers":
                assert _compose([f"layers={v}"]).layers == cfg["layers"]
            else:
                assert node == v, (k, node, v)
