"""`python -m lca_lab.analyze` on a small sweep written by real runs."""

import json
import shutil
import subprocess
import sys

import h5py
import numpy as np
import pytest
from test_train import _cfg

from lca_lab.analyze import analyze
from lca_lab.train import run


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    root = tmp_path_factory.mktemp("sweep")
    common = ["data=synthetic", "data.size=600", "batch_size=100", "epochs=1", "lca.per_class=true"]
    for layers in ("none", "freeze_last"):
        for seed in (0, 1, 2):
            run(_cfg(*common, f"layers={layers}", f"seed={seed}"), root / f"{layers}_{seed}")
    # An interrupted run: analyze must list and skip it.
    shutil.copytree(root / "none_0", root / "broken")
    with h5py.File(root / "broken" / "lca.h5", "a") as f:
        f.attrs["status"] = "running"
    return root


def test_report_groups_runs_and_tests_effects(sweep):
    rep = analyze(sweep, repeats=200)
    assert rep["n_runs"] == 6
    assert [s["status"] for s in rep["skipped"]] == ["running"]
    labels = sorted(g["label"] for g in rep["groups"])
    assert labels == [
        "(defaults)",
        "layers.last.freeze=True, layers.last.freeze_from=0, layers.last.select=-1",
    ]
    for g in rep["groups"]:
        assert g["n"] == 3
        assert len(g["layer_effects"]) == 3
        assert 40 < g["pct_helping"]["mean"] < 90
        assert g["moments"]["per_class"] and g["moments"]["repeats"] == 200
        assert "helping" in g["heavy_tails"]
    frozen = next(g for g in rep["groups"] if "freeze" in g["label"])
    last = frozen["layer_effects"][-1]
    assert last["mean"] == 0.0 and last["direction"] == "n.s."  # frozen: exactly zero LCA
    first = frozen["layer_effects"][0]
    assert first["direction"] == "helps" and first["p_adj"] < 0.05  # fc1 helps in every seed
    (comp,) = rep["comparisons"]
    assert "final_train_loss" in comp and len(comp["layers"]) == 3
    for name in (
        "report.md",
        "report.json",
        "layer_totals.png",
        "g0_moments_of_learning.png",
        "g0_helping_over_training.png",
        "g0_lca_distribution.png",
    ):
        assert (sweep / name).exists(), name
    data = json.loads((sweep / "report.json").read_text())
    assert data["n_runs"] == 6
    md = (sweep / "report.md").read_text()
    assert "Skipped runs" in md and "broken" in md and "Welch" in md


def test_cli_prints_tables(sweep, tmp_path):
    p = subprocess.run(
        [
            sys.executable,
            "-m",
            "lca_lab.analyze",
            str(sweep),
            "--out",
            str(tmp_path),
            "--repeats",
            "50",
            "--no-figures",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    assert "% helping (Table 1)" in p.stdout and (tmp_path / "report.md").exists()
    bad = subprocess.run(
        [sys.executable, "-m", "lca_lab.analyze", str(tmp_path / "nope")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "does not exist" in bad.stderr


def test_swept_numeric_setting_is_regressed(tmp_path):
    common = ["data=synthetic", "data.size=300", "batch_size=100", "epochs=1", "layers=last_momentum_delay"]
    for d in (0, 4, 9):
        run(_cfg(*common, f"layers.last.momentum_delay={d}"), tmp_path / f"d{d}")
    rep = analyze(tmp_path, repeats=20, animation_frames=0)
    regs = rep["regressions"]
    assert [r["layer"] for r in regs] == ["fc1", "fc2", "fc3"]
    assert all(r["setting"] == "layers.last.momentum_delay" and r["n"] == 3 for r in regs)
    assert (tmp_path / "layer_vs_value.png").exists()
    assert (
        "Regression of total layer LCA on layers.last.momentum_delay" in (tmp_path / "report.md").read_text()
    )


def test_statistics_exist_without_per_parameter_rows(tmp_path):
    run(
        _cfg("data=synthetic", "data.size=300", "batch_size=100", "epochs=1", "store.per_param=false"),
        tmp_path,
    )
    with h5py.File(tmp_path / "lca.h5") as f:
        assert "lca/param" not in f
    rep = analyze(tmp_path, repeats=20, animation_frames=0)
    (g,) = rep["groups"]
    assert 0 < g["pct_helping"]["mean"] < 100 and np.isfinite(g["motion_period"]["mean"])
    assert "heavy_tails" not in g  # needs the per-parameter rows
    assert (tmp_path / "g0_helping_over_training.png").exists()


def test_report_values_become_strict_json():
    import math

    import numpy as np

    from lca_lab.jsonable import jsonable

    report = {"p": np.float64(float("nan")), "t": (np.int64(3), float("inf")), "a": np.array([1.5, -np.inf])}
    out = jsonable(report)
    assert out == {"p": None, "t": [3, None], "a": [1.5, None]}
    assert type(out["t"][0]) is int
    text = json.dumps(out, allow_nan=False)  # raises on NaN/inf left over
    assert not math.isnan(json.loads(text)["a"][0]) and json.loads(text)["p"] is None


@pytest.mark.parametrize(("groups", "expected"), [
    (["sweep_a", "sweep_a", ""], "group sweep_a"),
    (["", ""], "no group (the analysed runs had none)"),
])  # fmt: skip
def test_wandb_analysis_line_names_the_group_or_says_there_is_none(groups, expected, monkeypatch, capsys):
    """The analysis run joins the analysed runs' most common W&B group; runs without one (a single
    `python -m lca_lab` run) get no group, and the line says so instead of "group None"."""
    import contextlib
    import types

    from lca_lab import analyze as an
    from lca_lab import tracking

    runs = [f"run{i}" for i in range(len(groups))]
    attrs = {r: {"wandb_project": "lca_lab", "wandb_group": g} for r, g in zip(runs, groups)}
    monkeypatch.setattr(
        an, "open_run", lambda p: contextlib.nullcontext(types.SimpleNamespace(attrs=attrs[p]))
    )
    seen = {}

    def fake_log(rep, out, mode, project, group):
        seen["group"] = group
        return "abc123"

    monkeypatch.setattr(tracking, "log_analysis", fake_log)
    an._log_to_wandb({"groups": [{"runs": runs}]}, None, "offline")
    assert seen["group"] == (expected.split()[1] if groups[0] else None)
    assert capsys.readouterr().out.strip() == f"W&B analysis run abc123 in project lca_lab, {expected}"
