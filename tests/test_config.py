"""Every config file composes and passes validation; invalid values fail with a message naming the key."""

import copy
import dataclasses
import os
import re
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir
from hydra.core.global_hydra import GlobalHydra
from omegaconf import OmegaConf

from lca_lab.config import ConfigError, run_cli, validate, validate_recompute
from lca_lab.schema import RECOMPUTE_LCA_KEYS, SWITCH_KEYS, LCAConfig, Method, RecomputeLCAConfig, RunConfig

CONF = Path(__file__).resolve().parents[1] / "conf"
GROUPS = sorted(p.name for p in CONF.iterdir() if p.is_dir())
OPTIONS = [(g, f.stem) for g in GROUPS for f in sorted((CONF / g).glob("*.yaml"))]


def _compose(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def test_default_config_is_valid():
    cfg = _compose()
    validate(cfg)
    assert cfg["data"]["_target_"] == "lca_lab.data.mnist" and cfg["net"]["_target_"] == "lca_lab.nets.fc"
    assert cfg["opt"]["momentum"] == 0.9
    assert cfg["lca"]["tolerance"] == 1e-3 and cfg["lca"]["max_splits"] == 32


@pytest.mark.parametrize("group,option", OPTIONS, ids=[f"{g}={o}" for g, o in OPTIONS])
def test_every_config_file_composes(group, option):
    cfg = _compose([f"{group}={option}"])
    validate(cfg)


def test_cudnn_benchmark_with_deterministic_names_both_fixes():
    validate(_compose(["lca.cudnn_benchmark=true"]))
    with pytest.raises(ConfigError, match="set lca.cudnn_benchmark=false or deterministic=false"):
        validate(_compose(["lca.cudnn_benchmark=true", "deterministic=true"]))


def test_compile_with_cuda_graph_is_refused_naming_the_fix():
    validate(_compose(["lca.compile=true"]))
    validate(_compose(["lca.cuda_graph=true"]))
    with pytest.raises(ConfigError, match="set one of them to false"):
        validate(_compose(["lca.compile=true", "lca.cuda_graph=true"]))


def test_momentum_delay_from_command_line():
    cfg = _compose(["layers=last_momentum_delay", "layers.last.momentum_delay=3"])
    assert cfg["layers"]["last"] == {"select": -1, "momentum_delay": 3}


@pytest.mark.parametrize(
    "override,key",
    [
        ("lca.method=simpson3", "lca.method"),
        ("lca.tolerance=0", "lca.tolerance"),
        ("lca.tolerance=-1e-3", "lca.tolerance"),
        ("lca.chunk_size=0", "lca.chunk_size"),
        ("lca.max_splits=12", "lca.max_splits"),
        ("lca.cuda_graph=maybe", "lca.cuda_graph"),
        ("lca.cudnn_benchmark=maybe", "lca.cudnn_benchmark"),
        ("lca.compile=maybe", "lca.compile"),
        ("device=tpu", "device"),
        ("opt.lr=-0.1", "opt.lr"),
        ("opt.momentum=1.5", "opt.momentum"),
        ("epochs=0", "epochs"),
        ("batch_size=0", "batch_size"),
        ("data.fallback=cifar10", "data.fallback"),
        ("lca.window=[5,2]", "lca.window"),
        ("store.max_gb=0", "store.max_gb"),
        ("+layers.x.select=0", None),
        ("+layers.x.lr_scal=0.1", "layers.x"),
    ],
)
def test_invalid_values_name_the_key(override, key):
    cfg = _compose([override])
    if key is None:
        validate(cfg)
        return
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


# ----------------------------------------------------------------------------------------------------------
# the typed schema (lca_lab.schema)

ROOT = CONF.parent
EXPERIMENTS = sorted(f.stem for f in (CONF / "experiment").glob("*.yaml"))


def _sweep_corners(exp):
    """Each swept key's first and last value of an experiment's Hydra sweep, as single overrides."""
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        params = compose(config_name="config", overrides=[f"experiment={exp}"], return_hydra_config=True)
    out = []
    for key, spec in params.hydra.sweeper.params.items():
        spec = str(spec)
        m = re.fullmatch(r"range\((\d+)\)", spec)
        values = [str(v) for v in range(int(m.group(1)))] if m else spec.split(",")
        out += [f"{key}={values[0]}", f"{key}={values[-1]}"]
    return out


@pytest.mark.parametrize("exp", EXPERIMENTS)
def test_schema_accepts_every_experiment_and_its_sweep(exp):
    validate(_compose([f"experiment={exp}"]))
    for override in _sweep_corners(exp):
        validate(_compose([f"experiment={exp}", override]))


def test_validate_keeps_plain_yaml_values_and_the_config_text():
    cfg = _compose()
    text = yaml.safe_dump(copy.deepcopy(cfg), sort_keys=False)
    out = validate(cfg)
    assert out is cfg  # checked in place: what the run receives
    assert yaml.safe_dump(cfg, sort_keys=False) == text  # the run file's config text is unchanged
    assert type(cfg["lca"]["method"]) is str and type(cfg["lca"]["precision"]) is str
    assert type(cfg["logger"]["mode"]) is str
    # A DictConfig is resolved and checked into a plain dict; values take the schema's types.
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        dc = compose(config_name="config", overrides=["lca.tolerance=1", "figures='false'", "epochs='3'"])
    out = validate(dc)
    assert isinstance(out, dict) and out["lca"]["tolerance"] == 1 and out["figures"] is False
    assert out["epochs"] == 3 and type(out["lca"]["method"]) is str


def test_schema_defaults_are_the_shipped_defaults():
    """The dataclasses' defaults (the ConfigStore node) equal conf/ (the speed keys' default: auto)."""
    shipped = _compose()
    schema = OmegaConf.to_container(OmegaConf.structured(RunConfig), enum_to_str=True)
    for section in ("checkpoint", "store", "lca"):
        for key, value in schema[section].items():
            if section == "lca" and key in SWITCH_KEYS:
                assert value == "auto"  # conf/lca/rk4.yaml's are the speed policy's (auto, true or false)
                continue
            assert value == shipped[section][key], (section, key)
    for key in ("seed", "epochs", "batch_size", "device", "eval_every", "deterministic", "figures", "resume"):
        assert schema[key] == shipped[key], key
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        wandb = OmegaConf.to_container(compose(config_name="config", overrides=["logger=wandb"]).logger)
    for key, value in wandb.items():
        if key not in ("_target_", "_partial_"):
            assert schema["logger"][key] == value, key
    assert set(wandb) <= set(schema["logger"])


def test_schema_is_registered_with_hydra(tmp_path):
    """A user's own config can use the registered schema as its base: Hydra then checks the types."""
    (tmp_path / "mine.yaml").write_text("defaults:\n  - lca_lab_schema\n  - _self_\nepochs: 3\n")
    with initialize_config_dir(config_dir=str(tmp_path), version_base="1.3"):
        cfg = compose(config_name="mine")
        assert cfg.epochs == 3 and cfg.lca.method == Method.rk4
        with pytest.raises(Exception, match="epochs"):
            compose(config_name="mine", overrides=["epochs=abc"])
        assert compose(config_name="lca_lab_recompute_schema").lca.tolerance is None


@pytest.mark.parametrize(
    "override,key,valid",
    [
        ("epochs=abc", "epochs", "epochs=5"),
        ("epochs=0", "epochs", "≥ 1"),
        ("epochs=1.5", "epochs", "epochs=5"),
        ("lca.method=rk5", "lca.method", "rk4"),
        ("lca.tolerance=-1", "lca.tolerance", "> 0"),
        ("lca.tolerance=abc", "lca.tolerance", "> 0"),
        ("lca.precision=fp16", "lca.precision", "tf32"),
        ("lca.chunk_size=abc", "lca.chunk_size", "auto"),
        ("lca.chunk_size=1.5", "lca.chunk_size", "auto"),
        ("lca.channels_last=maybe", "lca.channels_last", "true or false (or auto)"),
        ("lca.window=[a,2]", "lca.window", "list of integers"),
        ("store.per_param=maybe", "store.per_param", "true or false"),
        ("store.flush_every=0", "store.flush_every", "store.flush_every=50"),
        ("checkpoint.every=0", "checkpoint.every", "≥ 1"),
        ("checkpoint.seconds=-5", "checkpoint.seconds", "> 0"),
        ("device=gpu", "device", "cuda:N"),
        ("seed=-1", "seed", "≥ 0"),
        ("logger.mode=sometimes", "logger.mode", "offline"),
        ("logger.log_every=0", "logger.log_every", "≥ 1"),
        ("logger.tags=x", "logger.tags", "list of strings"),
        ("+lca.methd=rk4", "lca.methd", "did you mean lca.method?"),
        ("+foo=1", "foo", "valid: seed, epochs"),
        ("~lca.compile", "lca.compile", "+lca.compile=auto"),
        ("~store.max_gb", "store.max_gb", "+store.max_gb=20"),
        ("~net._target_", "net", "net._target_="),
    ],
)
def test_bad_values_fail_in_one_line_naming_key_and_a_valid_value(override, key, valid):
    cfg = _compose([override])
    with pytest.raises(ConfigError) as e:
        validate(cfg)
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(key) and valid in msg, msg


def test_a_typed_section_must_be_a_mapping():
    cfg = _compose()
    cfg["lca"] = None
    with pytest.raises(ConfigError, match=r"^lca must be a mapping \(key: value\), got None$"):
        validate(cfg)


def _run_cli_in_process(monkeypatch, capsys, entry, argv):
    """``python -m lca_lab ARGS`` (or ``lca_lab.recompute``) in this process: (exit code, stderr)."""
    monkeypatch.setenv("HYDRA_FULL_ERROR", "0")  # restored afterwards (run_cli sets it for Hydra)
    monkeypatch.setattr(sys, "argv", argv)
    try:
        with pytest.raises(SystemExit) as e:
            entry()
    finally:
        GlobalHydra.instance().clear()
    return e.value.code, capsys.readouterr().err


@pytest.mark.parametrize(
    "arg,needle",
    [
        ("lca.methd=rk4", "lca.methd is not a setting of lca; did you mean lca.method?"),
        ("net.widht=3", "net.widht is not a key of net; to add it, write +net.widht=3"),
        ("epochs=[1", "cannot parse the override epochs=[1"),
        ("epochs=abc", "epochs must be an integer ≥ 1, got 'abc' (e.g. epochs=5)"),
        ("epochs=0", "epochs must be an integer ≥ 1, got 0"),
        ("lca.method=rk5", "lca.method must be one of rk4, trapezoid, first_order, got 'rk5'"),
        ("lca.tolerance=-1", "lca.tolerance must be > 0"),
        ("store.per_param=maybe", "store.per_param must be true or false (or auto), got 'maybe'"),
        ("device=gpu", "device must be auto, cpu, cuda or cuda:N, got 'gpu'"),
        ("logger.mode=sometimes", "logger.mode must be one of auto, online, offline, disabled"),
    ],
)
def test_cli_errors_are_one_line_with_exit_code_2(monkeypatch, capsys, tmp_path, arg, needle):
    """Hydra's own errors while composing (an unknown key, an override it cannot parse) and the schema's
    are one line and exit code 2, before any data is loaded."""
    import hydra

    from lca_lab.__main__ import main

    # As python -m lca_lab runs it (there, Hydra finds conf/ relative to the __main__ script).
    task = hydra.main(version_base="1.3", config_path=str(CONF), config_name="config")(main.__wrapped__)
    code, err = _run_cli_in_process(
        monkeypatch, capsys, lambda: run_cli(task, RunConfig),
        ["lca_lab", "data=synthetic", arg, f"hydra.run.dir={tmp_path / 'run'}"],
    )  # fmt: skip
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "run" / "lca.h5").exists()


def test_cli_composition_error_in_a_subprocess(tmp_path):
    """The real command line: Hydra's error for a key that does not exist is one line, exit code 2."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), LCA_LAB_DATA=str(tmp_path / "data"))
    p = subprocess.run(
        [sys.executable, "-m", "lca_lab", "lca.tolerence=1e-4", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr
    assert lines[0].startswith("error: lca.tolerence is not a setting of lca; did you mean lca.tolerance?")


@pytest.mark.parametrize(
    "arg,needle",
    [
        ("shard=abc", "shard must be an integer ≥ 0, got 'abc'"),
        ("lca.tolerance=-1", "lca.tolerance must be > 0"),
        ("lca.method=rk5", "lca.method must be one of rk4, trapezoid, first_order"),
        ("lca.cuda_graph=maybe", "lca.cuda_graph must be true or false"),
        ("lca.batch_points=0", "lca.batch_points must be an integer ≥ 1"),
        ("lca.window=[0,2]", "lca.window is not a setting of lca"),
    ],
)
def test_recompute_cli_errors_are_one_line_with_exit_code_2(monkeypatch, capsys, tmp_path, arg, needle):
    from lca_lab import recompute as rc

    code, err = _run_cli_in_process(monkeypatch, capsys, rc.main, ["recompute", str(tmp_path), arg])
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], err
    assert not (tmp_path / "recompute").exists()


def _recompose(overrides=()):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="recompute", overrides=list(overrides))
    return OmegaConf.to_container(cfg, resolve=True)


def test_recompute_schema_shares_the_lca_types():
    from lca_lab import recompute as rc

    cfg = validate_recompute(_recompose(["run_dir=/x", "lca.method=trapezoid", "lca.compile=auto"]))
    assert cfg["lca"]["method"] == "trapezoid" and type(cfg["lca"]["method"]) is str
    assert cfg["lca"]["tolerance"] is None and cfg["lca"]["compile"] == "auto"
    assert (
        tuple(f.name for f in dataclasses.fields(RecomputeLCAConfig)) == RECOMPUTE_LCA_KEYS == rc.ENGINE_KEYS
    )
    run_types = typing.get_type_hints(LCAConfig)
    for name, tp in typing.get_type_hints(RecomputeLCAConfig).items():
        assert tp == (run_types.get(name, int) | None), name
    # The library call checks the run's settings with the same schema (one line, RecomputeError).
    run_cfg = {"lca": {"method": "rk4", "tolerance": 1e-3, "max_splits": 32, "chunk_size": "auto"}}
    assert rc.engine_settings(run_cfg, {"precision": "tf32"})["precision"] == "tf32"
    with pytest.raises(
        rc.RecomputeError, match=r"^lca\.precision must be one of fp32, tf32 or null, got 'fp16'$"
    ):
        rc.engine_settings(run_cfg, {"precision": "fp16"})
    with pytest.raises(rc.RecomputeError, match=r"^lca\.chunk_size must be auto or an integer ≥ 1"):
        rc.engine_settings(run_cfg, {"chunk_size": 0})
    with pytest.raises(rc.RecomputeError, match=r"^lca\.max_splits must be a power of two"):
        rc.engine_settings(run_cfg, {"max_splits": 12})
