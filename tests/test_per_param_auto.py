"""``store.per_param=auto`` (the default): per-parameter rows when the run file fits ``store.max_gb``,
otherwise per-layer LCA and the reducers only, said in one line at start; ``true`` still refuses a run
over ``store.max_gb``; the schema takes auto / true / false and nothing else."""

import signal
from pathlib import Path
from types import SimpleNamespace

import h5py
import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

import lca_lab.train as train_mod
from lca_lab.analyze import analyze
from lca_lab.checkpoint import PreemptionSignals, RunPreempted, config_diff
from lca_lab.config import ConfigError, validate
from lca_lab.recompute import _per_param
from lca_lab.schema import StoreConfig
from lca_lab.store import estimate_bytes, open_run
from lca_lab.store.sizing import resolve_per_param
from lca_lab.train import run

CONF = Path(__file__).resolve().parents[1] / "conf"
# 200 examples / batch 50 = 4 LCA rows of the fc net (K = 84,060): with per-parameter rows the file is
# about 3.4 MB, without them about 1.4 MB (mostly the reducers' [K] counters).
TINY = ["device=cpu", "data=synthetic", "data.size=200", "batch_size=50", "epochs=1", "figures=false",
        "logger=none", "eval_every=1000"]  # fmt: skip
BETWEEN_GB = 0.002  # 2 MB: the file fits without per-parameter rows, not with them


def _cfg(*overrides: str) -> dict:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[*TINY, *overrides])
    return OmegaConf.to_container(cfg, resolve=True)


def _note_lines(text: str) -> list[str]:
    return [ln for ln in text.splitlines() if "store.per_param=auto" in ln]


# ----------------------------------------------------------------------------------------------------------
# the schema


def test_the_default_is_auto():
    assert StoreConfig().per_param == "auto"
    assert validate(_cfg())["store"]["per_param"] == "auto"


@pytest.mark.parametrize("value,expected", [("auto", "auto"), ("true", True), ("false", False)])
def test_the_schema_takes_auto_true_and_false(value, expected):
    assert validate(_cfg(f"store.per_param={value}"))["store"]["per_param"] == expected


@pytest.mark.parametrize("value", ["maybe", "1", "0", "Auto", "'true'", "null"])
def test_the_schema_refuses_anything_else_in_one_line(value):
    with pytest.raises(ConfigError) as e:
        validate(_cfg(f"store.per_param={value}"))
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("store.per_param must be true or false (or auto), got "), msg


# ----------------------------------------------------------------------------------------------------------
# the decision


def test_resolve_auto_compares_the_estimate_with_per_parameter_rows_to_max_gb():
    sizes = {True: 3_000_000_000, False: 1_000_000_000}
    assert resolve_per_param("auto", 3.0, sizes.__getitem__) == (True, None)  # fits exactly: kept
    pp, note = resolve_per_param("auto", 2.999, sizes.__getitem__)
    assert pp is False
    assert "\n" not in note and "would be 3 GB, over store.max_gb=2.999;" in note
    assert "store.per_param=true store.max_gb=4" in note  # how to force it, with room over the estimate
    assert resolve_per_param("auto", 1, sizes.__getitem__, keep="per_param=true")[1].endswith(
        "(to keep them: per_param=true)"
    )


@pytest.mark.parametrize("setting", [True, False])
def test_resolve_takes_an_explicit_value_as_given(setting):
    def never(per_param: bool) -> int:
        raise AssertionError("an explicit value needs no estimate")

    assert resolve_per_param(setting, 1e-9, never) == (setting, None)


def test_resolve_on_resume_keeps_what_the_file_holds():
    def never(per_param: bool) -> int:
        raise AssertionError("a resumed run does not decide again")

    assert resolve_per_param("auto", 1e-9, never, held=True) == (True, None)
    assert resolve_per_param("auto", 1e9, never, held=False) == (False, None)
    assert resolve_per_param(False, 1e9, never, held=False) == (False, None)
    with pytest.raises(ConfigError, match="run file has no per-parameter rows.*store.per_param=auto"):
        resolve_per_param(True, 1e9, never, held=False)
    with pytest.raises(ConfigError, match="store.per_param=false: the run file has per-parameter rows"):
        resolve_per_param(False, 1e9, never, held=True)
    with pytest.raises(ConfigError, match="store.per_param must be true or false"):
        resolve_per_param("yes", 1e9, never)


# ----------------------------------------------------------------------------------------------------------
# whole runs


def test_auto_keeps_per_parameter_rows_when_the_file_fits(tmp_path, capsys):
    s = run(_cfg(), tmp_path)
    assert _note_lines(capsys.readouterr().out) == []
    with h5py.File(tmp_path / "lca.h5") as f:
        assert bool(f.attrs["per_param"]) is True
        assert f["lca/param"].shape == (s["lca_rows"], f["reduce/param_helped"].shape[0])


def test_auto_drops_per_parameter_rows_over_max_gb_and_keeps_the_rest(tmp_path, capsys):
    full = run(_cfg("store.per_param=true"), tmp_path / "full")
    capsys.readouterr()
    s = run(_cfg(f"store.max_gb={BETWEEN_GB}"), tmp_path / "auto")
    (line,) = _note_lines(capsys.readouterr().out)  # one line, at start
    path = tmp_path / "auto" / "lca.h5"
    with open_run(path) as r:
        K, T, n_layers = sum(int(np.prod(sh)) for sh in r.param_shapes), r.n_rows, len(r.layer_names)
    with_rows, without = (
        estimate_bytes(K, T, True, False, n_layers),
        estimate_bytes(K, T, False, False, n_layers),
    )
    # the test's premise: the budget lies between the two files (the reducers' counters: 16 bytes per K)
    assert without + 16 * K <= BETWEEN_GB * 1e9 < with_rows + 16 * K
    assert (
        f"would be {(with_rows + 16 * K) / 1e9:.3g} GB, over store.max_gb={BETWEEN_GB};" in line
        and f"store.max_gb={BETWEEN_GB}" in line
    )
    assert "store.per_param=true store.max_gb=" in line
    assert path.stat().st_size <= BETWEEN_GB * 1e9 < (tmp_path / "full" / "lca.h5").stat().st_size

    with h5py.File(path) as f, h5py.File(tmp_path / "full" / "lca.h5") as g:
        assert f.attrs["status"] == "complete"
        assert bool(f.attrs["per_param"]) is False  # what the file holds, as resolved
        assert "per_param: auto" in f.attrs["config"]  # what was asked for
        assert "lca/param" not in f and "lca/param" in g
        # per-layer LCA and the reducers are computed on the device: identical with or without the rows
        for name in ("lca/layer", "lca/total", "lca/error", "train/loss", "reduce/frac_helping",
                     "reduce/layer_frac_helping", "reduce/param_helped", "reduce/param_hurt",
                     "reduce/motion_changes", "reduce/grad_sign_changes"):  # fmt: skip
            np.testing.assert_array_equal(f[name][:], g[name][:], err_msg=name)
        layer, total, err, loss = f["lca/layer"][:], f["lca/total"][:], f["lca/error"][:], f["train/loss"][:]
    assert T == s["lca_rows"] == full["lca_rows"] == 4
    np.testing.assert_allclose(layer.sum(1), total, atol=1e-9)  # conservation
    np.testing.assert_allclose(total - np.diff(loss), err, atol=1e-12)
    assert abs(err.sum()) < 0.01 * abs(loss[-1] - loss[0])
    assert s["frac_helping"] == full["frac_helping"] and s["layer_lca"] == full["layer_lca"]
    with open_run(path) as r, pytest.raises(Exception, match=r"store\.per_param=true"):
        r.param_lca(slice(0, 1))

    # the analysis and its figures work on the per-layer views alone
    rep = analyze(tmp_path / "auto", repeats=20, animation_frames=5)
    (g,) = rep["groups"]
    assert 0 < g["pct_helping"]["mean"] < 100 and "heavy_tails" not in g
    assert (tmp_path / "auto" / "layer_totals.png").exists()
    assert not list((tmp_path / "auto").glob("*heatmap*")) and not list((tmp_path / "auto").glob("*.gif"))


def test_true_over_max_gb_still_refuses_in_one_line(tmp_path, capsys):
    with pytest.raises(ConfigError) as e:
        run(_cfg("store.per_param=true", f"store.max_gb={BETWEEN_GB}"), tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("the run file would be") and "store.per_param=false" in msg
    assert not (tmp_path / "lca.h5").exists() and _note_lines(capsys.readouterr().out) == []


def test_auto_still_refuses_a_file_over_max_gb_without_the_rows(tmp_path, capsys):
    # 0.5 MB: less than the file without per-parameter rows (1.4 MB with the reducers' [K] counters),
    # more than its per-layer rows alone (0.07 MB)
    with pytest.raises(ConfigError) as e:
        run(_cfg("store.max_gb=0.0005"), tmp_path)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("the run file would be 0.00") and "store.max_gb=0.0005" in msg
    assert "store.per_param=false" not in msg  # already so: the other ways to shrink it are named
    assert len(_note_lines(capsys.readouterr().out)) == 1
    assert not (tmp_path / "lca.h5").exists()


class _SignalNow(PreemptionSignals):
    """As if SIGUSR1 had arrived before the first iteration: the run checkpoints after it and stops."""

    def __enter__(self):
        super().__enter__()
        self.signum = signal.SIGUSR1
        return self


def test_a_resumed_auto_run_continues_as_its_file_started(tmp_path, monkeypatch):
    """max_gb may change between a run and its continuation; the file cannot gain per-parameter rows."""
    with monkeypatch.context() as m:
        m.setattr(train_mod, "PreemptionSignals", _SignalNow)
        with pytest.raises(RunPreempted):
            run(_cfg(f"store.max_gb={BETWEEN_GB}"), tmp_path)
    with pytest.raises(ConfigError, match="store.per_param=true: the run file has no per-parameter rows"):
        run(_cfg("store.per_param=true"), tmp_path)
    s = run(_cfg("store.max_gb=20"), tmp_path)  # would keep the rows in a new run
    with open_run(tmp_path) as r:
        assert r.is_complete and not r.per_param and r.n_rows == s["lca_rows"] == 4


def test_a_checkpoint_of_an_explicit_value_continues_under_auto():
    """A checkpoint written with per_param: true (the old default) is not refused for the new default."""
    assert config_diff({"store": {"per_param": True}}, {"store": {"per_param": "auto"}}) == []
    assert config_diff({"store": {"per_param": "auto"}}, {"store": {"per_param": False}}) == []
    assert config_diff({"store": {"per_param": True}}, {"store": {"per_param": False}}) != []


def test_recompute_resolves_a_stored_auto_against_the_runs_max_gb(capsys):
    rf = SimpleNamespace(param_shapes=[(1000, 1000)], layer_names=["a", "b"])  # K = 1e6: 4 MB a row
    auto = {"store": {"per_param": "auto", "max_gb": 1}}
    assert _per_param(auto, None, rf, 100) is True  # 0.4 GB
    assert _note_lines(capsys.readouterr().err) == []
    assert _per_param(auto, None, rf, 1000) is False  # 4 GB
    (line,) = _note_lines(capsys.readouterr().err)
    assert "store.max_gb=1" in line and line.endswith("(to keep them: per_param=true)")
    assert _per_param(auto, True, rf, 1000) is True  # the recompute's own per_param decides
    assert _per_param({"store": {"per_param": False}}, None, rf, 10) is False
    assert _per_param({}, None, rf, 10_000) is True  # a config without the key: rows, as before
