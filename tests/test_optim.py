"""Per-layer overrides reach the optimizer exactly as specified."""

import pytest
import torch
import torch.nn.functional as F

from lca_lab.lca import FullBatchLoss, LCAEngine
from lca_lab.nets import fc, layer_groups
from lca_lab.optim import apply_freezes, build_optimizer, momentum_from_delay, plan_layers

TARGETS = {"sgd": "torch.optim.SGD", "adam": "torch.optim.Adam", "rmsprop": "torch.optim.RMSprop"}


def _opt(name, lr, momentum=0.9):
    """The ``opt`` config of conf/opt/<name>.yaml with this lr (and momentum where the optimizer has one)."""
    cfg = {"_target_": TARGETS[name], "lr": lr, "lr_decay_epochs": [], "lr_decay_factor": 0.1}
    if name == "adam":
        return {**cfg, "betas": [0.9, 0.999]}
    return {**cfg, "momentum": momentum}


def _fc():
    torch.manual_seed(0)
    model = fc(input_shape=(1, 28, 28), n_classes=10)
    return model, layer_groups(model)


def _train_steps(model, opt, n=5, start=0):
    g = torch.Generator().manual_seed(0)
    for it in range(start, start + n):
        apply_freezes(opt, it)
        x = torch.randn(32, 1, 28, 28, generator=g)
        y = torch.randint(0, 10, (32,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("opt_name", ["sgd", "adam", "rmsprop"])
def test_frozen_layer_does_not_move_and_has_zero_lca(opt_name):
    model, groups = _fc()
    plans = plan_layers(groups, {"first": {"select": 0, "freeze": True}})
    opt = build_optimizer(model, groups, _opt(opt_name, 0.05), plans)
    first = [p.detach().clone() for p in opt.param_groups[0]["params"]]
    second = opt.param_groups[1]["params"][0].detach().clone()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g)
    fbl = FullBatchLoss(model, x, y, chunk_size=64)
    theta0 = fbl.flat_params()
    _train_steps(model, opt)
    for before, p in zip(first, opt.param_groups[0]["params"]):
        assert torch.equal(before, p)
    assert not torch.equal(second, opt.param_groups[1]["params"][0])  # the others did train
    st = LCAEngine(fbl).step(theta0, fbl.flat_params())
    n_first = sum(p.numel() for p in opt.param_groups[0]["params"])
    assert torch.count_nonzero(st.param[:n_first]) == 0
    assert torch.count_nonzero(st.param[n_first:]) > 0


def test_freeze_from_iteration_k():
    model, groups = _fc()
    plans = plan_layers(groups, {"last": {"select": -1, "freeze": True, "freeze_from": 3}})
    opt = build_optimizer(model, groups, _opt("sgd", 0.05), plans)
    last = opt.param_groups[-1]["params"][0]
    start = last.detach().clone()
    _train_steps(model, opt, n=3)
    assert not torch.equal(last, start)  # moved during iterations 0..2
    at3 = last.detach().clone()
    _train_steps(model, opt, n=4, start=3)
    assert torch.equal(last, at3)
    assert opt.param_groups[-1]["lr"] == 0.0


def test_lr_scale_and_momentum_delay_reach_param_groups():
    model, groups = _fc()
    plans = plan_layers(
        groups,
        {
            "last": {"select": -1, "lr_scale": 0.1, "momentum_delay": 3},
            "mid": {"select": "1", "momentum": 0.5},
        },
    )
    opt = build_optimizer(model, groups, _opt("sgd", 0.2), plans)
    pg = opt.param_groups
    assert [g["layer"] for g in pg] == [name for name, _ in groups]
    assert pg[-1]["lr"] == pytest.approx(0.02) and pg[-1]["momentum"] == pytest.approx(0.75)
    assert pg[1]["momentum"] == 0.5 and pg[1]["lr"] == pytest.approx(0.2)
    assert pg[0]["momentum"] == 0.9 and pg[0]["lr"] == pytest.approx(0.2)
    adam = build_optimizer(model, groups, _opt("adam", 1e-3), plans)
    assert adam.param_groups[-1]["betas"][0] == pytest.approx(0.75)
    assert adam.param_groups[-1]["betas"][1] == 0.999 and adam.param_groups[0]["betas"] == (0.9, 0.999)


def test_any_torch_optimizer_from_its_target():
    model, groups = _fc()
    plans = plan_layers(groups, {"last": {"select": -1, "lr_scale": 0.5, "momentum": 0.5}})
    nadam = build_optimizer(model, groups, {"_target_": "torch.optim.NAdam", "lr": 1e-3}, plans)
    assert isinstance(nadam, torch.optim.NAdam)
    assert nadam.param_groups[-1]["lr"] == pytest.approx(5e-4) and nadam.param_groups[0]["lr"] == 1e-3
    assert nadam.param_groups[-1]["betas"] == (0.5, 0.999)  # per-layer momentum → beta1
    _train_steps(model, nadam, n=2)
    # an optimizer with neither momentum nor betas: the per-layer momentum is refused, naming the entry
    with pytest.raises(ValueError, match="layers.last: torch.optim.Adagrad has neither momentum nor betas"):
        build_optimizer(model, groups, {"_target_": "torch.optim.Adagrad", "lr": 0.01}, plans)
    plain = plan_layers(groups, {"last": {"select": -1, "lr_scale": 0.5}})
    ada = build_optimizer(model, groups, {"_target_": "torch.optim.Adagrad", "lr": 0.01}, plain)
    assert ada.param_groups[-1]["lr"] == pytest.approx(0.005)


def test_built_like_the_torch_class_itself():
    # the config route builds the same optimizer as calling the class: same steps, bit for bit
    a, groups = _fc()
    b, _ = _fc()
    opt_a = build_optimizer(a, groups, _opt("sgd", 0.1))
    opt_b = torch.optim.SGD([p for p in b.parameters()], lr=0.1, momentum=0.9)
    _train_steps(a, opt_a, n=3)
    _train_steps(b, opt_b, n=3)
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_momentum_delay_formula():
    assert momentum_from_delay(9) == pytest.approx(0.9)
    assert momentum_from_delay(0) == 0.0
    with pytest.raises(ValueError):
        momentum_from_delay(-1)


def test_unknown_layer_name_lists_valid_names():
    model, groups = _fc()
    with pytest.raises(ValueError) as e:
        plan_layers(groups, {"x": {"select": "conv99", "freeze": True}})
    for name, _ in groups:
        assert name in str(e.value)
    assert "layers.x.select" in str(e.value)


def test_bad_override_values():
    model, groups = _fc()
    with pytest.raises(ValueError, match="unknown key"):
        plan_layers(groups, {"x": {"select": 0, "lr_scal": 2}})
    with pytest.raises(ValueError, match="lr_scale"):
        plan_layers(groups, {"x": {"select": 0, "lr_scale": -1}})
    with pytest.raises(ValueError, match="momentum"):
        plan_layers(groups, {"x": {"select": 0, "momentum": 1.5}})
    with pytest.raises(ValueError, match="select"):
        plan_layers(groups, {"x": {"freeze": True}})
    with pytest.raises(ValueError, match="out of range|valid"):
        plan_layers(groups, {"x": {"select": 7}})
