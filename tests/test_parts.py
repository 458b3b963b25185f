"""Parts built from ``_target_``: a user's own net, optimizer and data; stored configs checked against the
allowlist and upgraded from the old shape; the group-choice check with user config dirs; per-net lrs."""

import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from torch import nn

import lca_lab.recompute as rc
from lca_lab.cli_checks import check_group_choices
from lca_lab.config import ConfigError
from lca_lab.data import DataBundle
from lca_lab.parts import build_parts, check_parts, check_targets, upgrade_config
from lca_lab.train import run

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
HERE = __name__  # the module path of the parts defined below (tests/ is on sys.path under pytest)


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["device=cpu", "logger=none", "figures=false", *overrides]
        )
    return OmegaConf.to_container(cfg, resolve=True)


# ----------------------------------------------------------------------------------------------------------
# parts that exist only in this test module


class TinyNet(nn.Module):
    """Flatten → hidden → n_classes; ``input_shape`` and ``n_classes`` come from lca_lab (the hook)."""

    def __init__(self, input_shape, n_classes, hidden: int = 12):
        super().__init__()
        self.body = nn.Sequential(
            nn.Flatten(),
            nn.Linear(int(np.prod(input_shape)), hidden),
            nn.Tanh(),
            nn.Linear(hidden, n_classes),
        )

    def forward(self, x):
        return self.body(x)


class HeavyBall(torch.optim.Optimizer):
    """SGD with heavy-ball momentum, written out: v ← μ v + g, θ ← θ − lr v."""

    def __init__(self, params, lr: float = 0.05, momentum: float = 0.0):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                if p.grad is None:
                    continue
                v = self.state[p].setdefault("v", torch.zeros_like(p))
                v.mul_(g["momentum"]).add_(p.grad)
                p.sub_(g["lr"] * v)


def blobs(n: int = 96, dim: int = 6, classes: int = 3, split_seed: int = 0) -> DataBundle:
    """Gaussian blobs around random centres, ``n`` train + ``n // 4`` test, images of shape (1, 1, dim)."""
    g = torch.Generator().manual_seed(split_seed)
    centres = 2 * torch.randn(classes, dim, generator=g)
    m = n + n // 4
    y = torch.randint(0, classes, (m,), generator=g)
    x = (centres[y] + torch.randn(m, dim, generator=g)).view(m, 1, 1, dim)
    empty_x, empty_y = torch.empty(0, 1, 1, dim), torch.empty(0, dtype=torch.int64)
    return DataBundle(
        train_x=x[:n], train_y=y[:n], val_x=empty_x, val_y=empty_y, test_x=x[n:], test_y=y[n:],
        train_index=np.arange(n), source="blobs", n_classes=classes, input_shape=(1, 1, dim),
        test_index=np.arange(m - n), split_seed=split_seed,
    )  # fmt: skip


def _own_parts_cfg(*overrides):
    cfg = _cfg("batch_size=16", "epochs=2", "eval_every=1000", "store.trajectory=true", *overrides)
    cfg["net"] = {"_target_": f"{HERE}.TinyNet", "hidden": 10}
    cfg["data"] = {"_target_": f"{HERE}.blobs", "n": 96, "split_seed": 0}
    cfg["opt"] = {"_target_": f"{HERE}.HeavyBall", "lr": 0.1, "momentum": 0.5, "lr_decay_epochs": []}
    return cfg


@pytest.fixture(scope="module")
def own_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("own")
    summary = run(_own_parts_cfg("+layers.last.select=-1", "+layers.last.lr_scale=0.5"), d)
    return d, summary


def test_own_net_optimizer_and_data_from_targets_conserve(own_run):
    d, s = own_run
    with h5py.File(d / "lca.h5", "r") as f:
        loss, total, err = f["train/loss"][:], f["lca/total"][:], f["lca/error"][:]
        converged, param = f["lca/converged"][:], f["lca/param"][:]
        assert f.attrs["data_source"] == "blobs" and f.attrs["status"] == "complete"
        assert [n.decode() if isinstance(n, bytes) else n for n in f["layers/names"][:]] == [
            "body.1",
            "body.3",
        ]
    assert len(total) == 2 * 96 // 16
    # Σ LCA = ΔL per iteration, within the tolerance (or flagged), and over the whole run
    np.testing.assert_allclose(total - np.diff(loss), err, atol=1e-12)
    assert np.all((np.abs(err) <= 1e-3) | ~converged) and converged.all()
    assert abs(err.sum()) / abs(loss[-1] - loss[0]) < 0.01
    np.testing.assert_allclose(param.astype(np.float64).sum(1), total, rtol=1e-4, atol=1e-6)
    assert loss[-1] < loss[0] - 0.1  # it learned


def test_own_optimizer_gets_the_layer_groups():
    cfg = _own_parts_cfg("+layers.last.select=-1", "+layers.last.lr_scale=0.5", "+layers.last.momentum=0.25")
    parts = build_parts(cfg, torch.device("cpu"))
    assert isinstance(parts.optimizer, HeavyBall) and isinstance(parts.model, TinyNet)
    assert [g["layer"] for g in parts.optimizer.param_groups] == ["body.1", "body.3"]
    assert [g["lr"] for g in parts.optimizer.param_groups] == [0.1, 0.05]
    assert [g["momentum"] for g in parts.optimizer.param_groups] == [0.5, 0.25]
    assert parts.model.body[1].in_features == 6 and parts.model.body[3].out_features == 3  # the hook


def test_recompute_refuses_a_foreign_target_and_accepts_it_when_allowed(own_run, tmp_path):
    d, _ = own_run
    with pytest.raises(ConfigError) as e:
        rc.recompute(d, out_dir=tmp_path / "refused", progress=False)
    msg = str(e.value)
    assert msg.startswith(f"refusing data._target_={HERE}.blobs from ") and "\n" not in msg
    assert f"add allow_targets=[{HERE.split('.')[0]}.*] if you trust it" in msg
    assert not (tmp_path / "refused").exists()  # refused before anything was built or written
    res = rc.recompute(d, out_dir=tmp_path / "ok", progress=False, allow_targets=[f"{HERE}.*"])
    with h5py.File(d / "lca.h5", "r") as a, h5py.File(res["merged"], "r") as b:
        for name in ("lca/total", "lca/error", "train/loss", "lca/param"):
            np.testing.assert_array_equal(b[name][()], a[name][()], err_msg=name)


def test_recompute_cli_refuses_in_one_line(own_run, tmp_path):
    d, _ = own_run
    p = subprocess.run(
        [sys.executable, "-m", "lca_lab.recompute", str(d), f"out_dir={tmp_path / 'out'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, PYTHONPATH=str(ROOT)),  # the test module is not importable there, nor needed
    )  # fmt: skip
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr[-2000:]
    assert lines == [lines[-1]] and lines[-1].startswith("error: refusing data._target_="), lines
    assert "allow_targets=[" in lines[-1]


def test_check_targets_allowlist():
    ok = {"net": {"_target_": "lca_lab.nets.fc"}, "opt": {"_target_": "torch.optim.SGD"},
          "logger": {"_target_": None}, "x": [{"_target_": "torchvision.models.resnet18"}]}  # fmt: skip
    check_targets(ok, (), "f.h5")
    with pytest.raises(
        ConfigError, match=r"refusing x\[0\]\.y\._target_=os\.system from f\.h5: .*\[os\.\*\]"
    ):
        check_targets({"x": [{"y": {"_target_": "os.system"}}]}, (), "f.h5")
    # torch callables that load or run code named by their arguments are not trusted by default
    with pytest.raises(
        ConfigError, match=r"refusing net\._target_=torch\.hub\.load.*allow_targets=\[torch\.hub\.load\]"
    ):
        check_targets({"net": {"_target_": "torch.hub.load"}}, (), "f.h5")
    check_targets({"net": {"_target_": "torch.hub.load"}}, ["torch.hub.load"], "f.h5")
    check_targets({"net": {"_target_": "mypkg.sub.Net"}}, ["mypkg.*"], "f.h5")
    # the file's own allow_targets does not vouch for it
    with pytest.raises(ConfigError, match="mypkg"):
        check_targets({"allow_targets": ["mypkg.*"], "net": {"_target_": "mypkg.Net"}}, (), "f.h5")


# ----------------------------------------------------------------------------------------------------------
# checks before any data is loaded


def test_bad_net_width_fails_before_data_is_loaded(monkeypatch, tmp_path):
    import lca_lab.data

    def no_data(*a, **k):
        raise AssertionError("data was loaded")

    monkeypatch.setattr(lca_lab.data, "mnist5k", no_data)
    cfg = _cfg("data=mnist5k", "net=resnet20", "net.width=-3")
    with pytest.raises(ConfigError) as e:
        run(cfg, tmp_path)
    assert str(e.value) == "net.width must be an integer ≥ 1 (base channel count), got -3"
    assert not (tmp_path / "lca.h5").exists()


def test_bad_net_width_cli_exit_2_one_line(tmp_path):
    p = subprocess.run(
        [sys.executable, "-m", "lca_lab", "net=allcnn", "net.width=-3", "data=mnist", "data.download=false",
         "logger=none", "device=cpu", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env=dict(os.environ, LCA_LAB_DATA=str(tmp_path / "data")),
    )  # fmt: skip
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert p.returncode == 2, p.stderr[-2000:]
    assert lines == ["error: net.width must be a number > 0, got -3"], lines
    assert "mnist5k" not in p.stdout + p.stderr  # no data loaded (the offline fallback would say so)
    assert not (tmp_path / "run" / "lca.h5").exists()


@pytest.mark.parametrize(
    "section,override,needle",
    [
        ("net", {"_target_": "lca_lab.nets.fc", "hiden": [3]},
         "net.hiden is not an argument of lca_lab.nets.fc; valid keys: hidden"),
        ("net", {"_target_": f"{HERE}.TinyNet", "depth": 3}, "net.depth is not an argument of"),
        ("net", {"_target_": "mypkg_nowhere.Net"}, "net._target_=mypkg_nowhere.Net cannot be imported"),
        ("opt", {"_target_": "torch.optim.Adam", "lr": 0.1, "nesterov": True},
         "opt.nesterov is not an argument of torch.optim.Adam"),
        ("data", {"_target_": "lca_lab.data.synthetic", "sise": 3}, "data.sise is not an argument"),
        ("loss", {"_target_": "torch.nn.Softmax"}, "takes no 'reduction' argument"),
        ("loss", {"_target_": "torch.nn.CrossEntropyLoss", "smoothing": 0.1},
         "valid keys: weight, size_average"),
    ],
)  # fmt: skip
def test_check_parts_names_the_key(section, override, needle):
    cfg = _cfg()
    cfg[section] = override
    with pytest.raises(ConfigError) as e:
        check_parts(cfg)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_required_argument_and_layer_momentum_checks():
    cfg = _cfg()
    cfg["net"] = {"_target_": f"{HERE}.blobs_net_needs_depth"}
    with pytest.raises(ConfigError, match=r"net\.depth is required by .*: set \+net\.depth="):
        check_parts(cfg)
    cfg = _cfg("opt._target_=torch.optim.Adagrad", "~opt.momentum", "layers=last_momentum_delay")
    with pytest.raises(ConfigError, match="layers.last: torch.optim.Adagrad has neither momentum nor betas"):
        check_parts(cfg)


def blobs_net_needs_depth(input_shape, n_classes, depth):
    return TinyNet(input_shape, n_classes, hidden=depth)


def test_a_users_net_class_from_the_command_line():
    # python -m lca_lab net._target_=mypkg.MyNet +net.depth=4: nothing left over from the default net file
    cfg = _cfg(f"net._target_={HERE}.blobs_net_needs_depth", "+net.depth=4", "data=synthetic", "data.size=64")
    check_parts(cfg)
    model = build_parts(cfg, torch.device("cpu"), optimizer=False).model
    assert isinstance(model, TinyNet) and model.body[1].out_features == 4 and model.body[1].in_features == 784


# ----------------------------------------------------------------------------------------------------------
# any torch optimizer; the loss


def test_nadam_from_the_command_line_overrides(tmp_path):
    cfg = _cfg("opt._target_=torch.optim.NAdam", "opt.lr=1e-3", "~opt.momentum", "data=synthetic",
               "data.size=64",
               "batch_size=32", "epochs=1", "lca.window=[0,2]", "+layers.last.select=-1",
               "+layers.last.momentum_delay=3")  # fmt: skip
    assert cfg["opt"] == {
        "_target_": "torch.optim.NAdam",
        "lr": 1e-3,
        "lr_decay_epochs": [],
        "lr_decay_factor": 0.1,
    }
    parts = build_parts(cfg, torch.device("cpu"))
    assert isinstance(parts.optimizer, torch.optim.NAdam)
    assert parts.optimizer.param_groups[-1]["betas"] == (0.75, 0.999)
    s = run(cfg, tmp_path)
    assert s["lca_rows"] == 2 and s["max_abs_error"] <= 1e-3


def test_configured_loss_is_the_default_cross_entropy_bit_for_bit():
    parts = build_parts(_cfg("data=synthetic", "data.size=64"), torch.device("cpu"))
    out = parts.model(parts.data.train_x)
    y = parts.data.train_y
    for reduction in ("sum", "mean", "none"):
        expected = torch.nn.functional.cross_entropy(out, y, reduction=reduction)
        assert torch.equal(parts.loss_fn(out, y, reduction=reduction), expected)
    nll = build_parts(_cfg("data=synthetic", "data.size=64", "loss._target_=torch.nn.MultiMarginLoss"),
                      torch.device("cpu"))  # fmt: skip
    assert torch.equal(
        nll.loss_fn(out, y, reduction="sum"), torch.nn.functional.multi_margin_loss(out, y, reduction="sum")
    )


# ----------------------------------------------------------------------------------------------------------
# run files written before targets


# The config attribute of a run file written before targets (python -m lca_lab data=synthetic data.size=64
# batch_size=32 epochs=1 store.trajectory=true), as that version stored it.
OLD_CONFIG = """\
data:
  name: synthetic
  root: ~/.cache/lca_lab/data
  split_seed: 0
  fallback: null
  download: false
  shape: mnist
  size: 64
  normalize: true
net:
  name: fc
  lr:
    sgd: 0.1
    adam: 0.001
    rmsprop: 0.001
opt:
  name: sgd
  lr: 0.1
  momentum: 0.9
  lr_decay_epochs: []
  lr_decay_factor: 0.1
lca:
  enabled: true
  method: rk4
  adaptive: true
  tolerance: 0.001
  max_splits: 32
  chunk_size: auto
  precision: fp32
  channels_last: auto
  cuda_graph: false
  cudnn_benchmark: false
  compile: false
  window: null
  per_class: false
  test: false
layers: {}
logger:
  name: none
seed: 0
epochs: 1
batch_size: 32
device: cpu
eval_every: 50
deterministic: false
figures: false
resume: false
checkpoint:
  enabled: true
  every: null
  seconds: 600
store:
  per_param: true
  trajectory: true
  flush_every: 50
  max_gb: 20
"""


def test_upgrade_config_maps_the_old_shape():
    import yaml

    new = upgrade_config(yaml.safe_load(OLD_CONFIG))
    assert new["net"] == {"_target_": "lca_lab.nets.fc"} == _cfg()["net"]
    assert new["data"]["_target_"] == "lca_lab.data.synthetic" and "name" not in new["data"]
    assert new["opt"] == {"_target_": "torch.optim.SGD", "lr": 0.1, "momentum": 0.9, "lr_decay_epochs": [],
                          "lr_decay_factor": 0.1}  # fmt: skip
    assert new["loss"] == {"_target_": "torch.nn.CrossEntropyLoss"}
    old_lenet_adam = {"net": {"name": "lenet", "dropout": 0.5, "padding": 2, "lr": {"sgd": 0.01}},
                      "opt": {"name": "adam", "lr": 0.001, "momentum": None,
                              "betas": [0.9, 0.999]}}  # fmt: skip
    up = upgrade_config(old_lenet_adam)
    assert up["net"] == {"_target_": "lca_lab.nets.lenet", "dropout": 0.5, "padding": 2}
    old_vgg = {"net": {"name": "vgg", "width": 1.0, "batchnorm": False, "lr": {"sgd": 0.02}}}
    assert upgrade_config(old_vgg)["net"] == _cfg("net=vgg")["net"]  # what a resumed old checkpoint compares
    assert up["opt"] == {"_target_": "torch.optim.Adam", "lr": 0.001, "betas": [0.9, 0.999]}
    assert upgrade_config(new) == new  # today's shape is left alone
    check_parts(new)


OLD_OVERRIDES = ("data=synthetic", "data.size=64", "batch_size=32", "epochs=1", "store.trajectory=true")


def test_old_checkpoint_config_compares_equal_after_upgrade():
    # a checkpoint written before targets continues under the same command (plan_resume upgrades it)
    import yaml

    from lca_lab.checkpoint import config_diff

    old, cfg = upgrade_config(yaml.safe_load(OLD_CONFIG)), _cfg(*OLD_OVERRIDES)
    assert not config_diff({k: old[k] for k in PARTS}, {k: cfg[k] for k in PARTS})
    assert config_diff({"allow_targets": []}, {"allow_targets": ["x.*"]}) == []  # trust, not results


PARTS = ("data", "net", "opt", "loss")


def test_old_shape_run_file_recomputes(tmp_path):
    online = tmp_path / "online"
    run(_cfg(*OLD_OVERRIDES), online)
    with h5py.File(online / "lca.h5", "r+") as f:  # as a run written before targets stored its config
        f.attrs["config"] = OLD_CONFIG
    res = rc.recompute(online, progress=False)
    with h5py.File(online / "lca.h5", "r") as a, h5py.File(res["merged"], "r") as b:
        for name in ("lca/total", "lca/param", "train/loss"):
            np.testing.assert_array_equal(b[name][()], a[name][()], err_msg=name)
        assert "_target_: lca_lab.nets.fc" in b.attrs["config"]  # the recomputed file: today's shape


# ----------------------------------------------------------------------------------------------------------
# user config dirs on the command line


def test_group_choice_check_looks_in_user_config_dirs(tmp_path):
    (tmp_path / "net").mkdir()
    (tmp_path / "net" / "mine.yaml").write_text("_target_: lca_lab.nets.fc\nhidden: [20]\n")
    assert "net=mine does not exist; choose one of: allcnn, fc" in check_group_choices(["net=mine"], CONF)
    for argv in (
        [f"hydra.searchpath=[file://{tmp_path}]", "net=mine"],
        [f"hydra.searchpath=['file://{tmp_path}']", "net=fc,mine"],
        ["--config-dir", str(tmp_path), "net=mine"],
        ["-cd", str(tmp_path), "net=mine"],
        [f"--config-dir={tmp_path}", "net=mine"],
    ):
        assert check_group_choices(argv, CONF) is None, argv
    msg = check_group_choices([f"hydra.searchpath=[file://{tmp_path}]", "net=yours"], CONF)
    assert msg.startswith(
        "net=yours does not exist; choose one of: allcnn, fc, gpt, hf_gpt2, lenet, mine, resnet20, vgg"
    )
    assert check_group_choices(["hydra.searchpath=[pkg://somepkg.conf]", "net=mine"], CONF) is None


def test_cli_user_net_file_through_searchpath(tmp_path):
    user = tmp_path / "myconf"
    (user / "net").mkdir(parents=True)
    (user / "net" / "mine.yaml").write_text("_target_: lca_lab.nets.fc\nhidden: [20]\n")
    p = subprocess.run(
        [sys.executable, "-m", "lca_lab", f"hydra.searchpath=[file://{user}]", "net=mine", "data=synthetic",
         "data.size=64", "batch_size=32", "epochs=1", "lca.window=[0,2]", "logger=none", "figures=false",
         "device=cpu", f"hydra.run.dir={tmp_path / 'run'}"],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    with h5py.File(tmp_path / "run" / "lca.h5", "r") as f:
        shapes = [s.decode() if isinstance(s, bytes) else s for s in f["params/shapes"][:]]
    assert shapes[0] == "(20, 784)"


# ----------------------------------------------------------------------------------------------------------
# the paper's per-net learning rates of the Table 1 sweeps


LRS = {  # net: (sgd, adam, rmsprop), as the net files set them before targets
    "fc": (0.1, 0.001, 0.001), "lenet": (0.01, 0.001, 0.0005),
    "resnet20": (0.1, 0.001, 0.0005), "allcnn": (0.05, 0.001, 0.0005),
}  # fmt: skip


@pytest.mark.parametrize("experiment", ["table1", "table1_cifar"])
def test_table1_sweep_jobs_get_the_per_net_learning_rates(experiment):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        sweep = compose(
            config_name="config", overrides=[f"experiment={experiment}"], return_hydra_config=True
        )
        params = {k: str(v).split(",") for k, v in sweep.hydra.sweeper.params.items()}
        assert set(params) == {"net", "opt", "seed"}
        jobs = [(n, o) for n in params["net"] for o in params["opt"]]
        assert len(jobs) == 6
        for net, opt in jobs:
            cfg = compose(
                config_name="config", overrides=[f"experiment={experiment}", f"net={net}", f"opt={opt}"]
            )
            sgd, adam, rmsprop = LRS[net]
            expected = {"sgd": sgd, "sgd_nomomentum": sgd, "adam": adam, "rmsprop": rmsprop}[opt]
            assert cfg.opt.lr == expected, (net, opt)
            assert cfg.opt["_target_"] == ("torch.optim.Adam" if opt == "adam" else "torch.optim.SGD")
        # rmsprop (not in the sweep) keeps the per-net rate too; a command-line lr still wins
        net = params["net"][-1]
        cfg = compose(
            config_name="config", overrides=[f"experiment={experiment}", f"net={net}", "opt=rmsprop"]
        )
        assert cfg.opt.lr == LRS[net][2]
        cfg = compose(
            config_name="config", overrides=[f"experiment={experiment}", f"net={net}", "opt.lr=0.3"]
        )
        assert cfg.opt.lr == 0.3
        # outside the experiment the optimizer file's default applies
        assert compose(config_name="config", overrides=["net=lenet"]).opt.lr == 0.1


def test_opt_momentum_as_the_optimizer_takes_it():
    """The issue's own command: opt._target_=torch.optim.NAdam opt.lr=1e-3 from opt=sgd (momentum 0.9 becomes
    NAdam's betas[0]); an optimizer with neither momentum nor betas refuses a non-zero momentum in one line
    and drops a zero one."""
    cfg = _cfg("opt._target_=torch.optim.NAdam", "opt.lr=1e-3", "opt.momentum=0.8", "data=synthetic",
               "data.size=64", "batch_size=32")  # fmt: skip
    check_parts(cfg)
    opt = build_parts(cfg, torch.device("cpu")).optimizer
    assert isinstance(opt, torch.optim.NAdam)
    assert all(g["betas"] == (0.8, 0.999) and g["lr"] == 1e-3 for g in opt.param_groups)
    cfg = _cfg("opt._target_=torch.optim.Adagrad", "data=synthetic", "data.size=64", "batch_size=32")
    with pytest.raises(ConfigError, match=r"opt\.momentum=0\.9: Adagrad takes neither.*~opt\.momentum"):
        check_parts(cfg)
    cfg = _cfg("opt._target_=torch.optim.Adagrad", "opt.momentum=0", "data=synthetic", "data.size=64",
               "batch_size=32")  # fmt: skip
    check_parts(cfg)
    assert isinstance(build_parts(cfg, torch.device("cpu")).optimizer, torch.optim.Adagrad)
