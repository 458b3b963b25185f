"""Every config file composes and passes validation; invalid values fail with a message naming the key."""

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lca_lab.config import ConfigError, validate

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
