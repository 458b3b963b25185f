"""Tests for lca_lab.nets: shapes on MNIST/CIFAR inputs, seeded init, layer grouping, selectors."""

import pytest
import torch
from torch import nn

from lca_lab import nets
from lca_lab.nets import (
    entry_layer_index,
    layer_groups,
    param_layer_index,
    resolve_layers,
)

MNIST, CIFAR = (1, 28, 28), (3, 32, 32)
NET_NAMES = ("fc", "lenet", "allcnn", "resnet20", "vgg")  # the built-in factories lca_lab.nets.<name>


def build_net(name, input_shape, n_classes, **kwargs):
    """The built-in net ``name`` as its config builds it (``_target_: lca_lab.nets.<name>``)."""
    return getattr(nets, name)(input_shape=input_shape, n_classes=n_classes, **kwargs)


# Small widths keep the conv nets fast on 2 CPU cores; architecture/layout is unchanged.
SMALL = {"fc": {}, "lenet": {}, "allcnn": {"width": 0.1}, "resnet20": {"width": 4}, "vgg": {"width": 0.125}}


def _build(name, shape, seed=0, n_classes=10):
    torch.manual_seed(seed)
    return build_net(name, shape, n_classes, **SMALL[name])


def _trainable(model):
    return [n for n, p in model.named_parameters() if p.requires_grad]


@pytest.mark.parametrize("shape", [MNIST, CIFAR], ids=["mnist", "cifar"])
@pytest.mark.parametrize("name", NET_NAMES)
def test_forward_shape(name, shape):
    model = _build(name, shape, n_classes=7)
    out = model(torch.randn(3, *shape))
    assert out.shape == (3, 7)
    assert torch.isfinite(out).all()


def test_full_size_nets_build():
    # Default widths: build only (no forward) to check the documented sizes without the compute.
    counts = {n: sum(p.numel() for p in build_net(n, CIFAR, 10).parameters()) for n in NET_NAMES}
    assert counts["fc"] == 3072 * 100 + 100 + 100 * 50 + 50 + 50 * 10 + 10
    assert 0.26e6 < counts["resnet20"] < 0.28e6  # ResNet-20 is ~0.27M parameters
    mnist_fc = build_net("fc", MNIST, 10)
    assert [m.weight.shape for m in mnist_fc if isinstance(m, nn.Linear)] == [(100, 784), (50, 100), (10, 50)]
    lenet = build_net("lenet", MNIST, 10)
    assert lenet.fc1.in_features == 40 * 4 * 4 and lenet.conv2.weight.shape == (40, 20, 5, 5)


@pytest.mark.parametrize("name", NET_NAMES)
def test_init_is_seeded(name):
    a, b, c = _build(name, CIFAR, seed=1), _build(name, CIFAR, seed=1), _build(name, CIFAR, seed=2)
    for (na, pa), (_, pb), (_, pc) in zip(a.named_parameters(), b.named_parameters(), c.named_parameters()):
        assert torch.equal(pa, pb), na
        if na.endswith("weight") and pa.dim() > 1:
            assert not torch.equal(pa, pc), na


def test_init_is_he_normal_with_zero_bias():
    torch.manual_seed(0)
    model = build_net("fc", MNIST, 10, hidden=(400, 50))
    w = model.fc1.weight
    assert abs(w.std().item() - (2 / 784) ** 0.5) < 0.003
    assert torch.count_nonzero(model.fc1.bias) == 0
    bn = _build("resnet20", CIFAR).bn1
    assert torch.all(bn.weight == 1) and torch.all(bn.bias == 0)


def test_unknown_net():
    from lca_lab.config import ConfigError
    from lca_lab.parts import check_parts

    cfg = {"net": {"_target_": "lca_lab.nets.resnet18"}}
    with pytest.raises(ConfigError, match="resnet20"):
        check_parts(cfg)


@pytest.mark.parametrize(
    "name,kwargs,arg",
    [
        ("fc", {"hidden": [100, 0]}, "hidden"),
        ("fc", {"hidden": 100}, "hidden"),
        ("lenet", {"dropout": 1.0}, "dropout"),
        ("lenet", {"padding": -1}, "padding"),
        ("allcnn", {"width": 0}, "width"),
        ("resnet20", {"width": -3}, "width"),
        ("resnet20", {"width": 2.5}, "width"),
        ("vgg", {"width": -1.0}, "width"),
        ("vgg", {"batchnorm": "yes"}, "batchnorm"),
        ("vgg", {"hidden": 0}, "hidden"),
    ],
)
def test_factories_check_their_arguments(name, kwargs, arg):
    factory = getattr(nets, name)
    with pytest.raises(ValueError, match=rf"^{arg} must"):
        factory.check_args(**kwargs)
    with pytest.raises(ValueError, match=rf"^{arg} must"):
        factory(input_shape=MNIST, n_classes=10, **kwargs)
    with pytest.raises(ValueError, match="input_shape"):
        factory(input_shape=(28, 28), n_classes=10)
    with pytest.raises(ValueError, match="n_classes"):
        factory(input_shape=MNIST, n_classes=0)


def test_fc_layers():
    model = _build("fc", MNIST)
    groups = layer_groups(model)
    assert groups == [
        ("fc1", ["fc1.weight", "fc1.bias"]),
        ("fc2", ["fc2.weight", "fc2.bias"]),
        ("fc3", ["fc3.weight", "fc3.bias"]),
    ]
    assert param_layer_index(model) == [0, 0, 1, 1, 2, 2]
    assert layer_groups(_build("fc", CIFAR, seed=5)) == groups  # names do not depend on shape or seed


def test_entry_layer_index_repeats_each_tensors_layer_over_its_entries():
    """The layer of every entry of the flat θ: fc1's 784·100 + 100 entries, then fc2's, then fc3's; a tensor
    that does not train drops out, as it does from θ."""
    model = _build("fc", MNIST)
    sizes = [p.numel() for p in model.parameters()]
    idx = entry_layer_index(model)
    assert idx.dtype == torch.int64 and idx.numel() == sum(sizes)
    assert idx.tolist() == [li for li, n in zip([0, 0, 1, 1, 2, 2], sizes) for _ in range(n)]
    model.fc2.bias.requires_grad_(False)
    assert entry_layer_index(model).numel() == sum(sizes) - sizes[3]


def test_lenet_layers():
    assert [n for n, _ in layer_groups(_build("lenet", MNIST))] == ["conv1", "conv2", "fc1", "fc2"]


def _check_partition(model):
    groups = layer_groups(model)
    flat = [p for _, ps in groups for p in ps]
    assert sorted(flat) == sorted(_trainable(model)) and len(flat) == len(set(flat))
    # Layers are contiguous runs of named_parameters() for these nets, so the index is non-decreasing.
    idx = param_layer_index(model)
    assert len(idx) == len(_trainable(model))
    for li, (_, ps) in enumerate(groups):
        for p in ps:
            assert idx[_trainable(model).index(p)] == li
    return groups


def test_resnet20_layers():
    model = _build("resnet20", CIFAR)
    groups = _check_partition(model)
    names = [n for n, _ in groups]
    # stem + 9 blocks x 2 convs + 2 projection shortcuts + fc
    assert len(groups) == 1 + 18 + 2 + 1 == 22
    assert names[0] == "conv1" and names[-1] == "fc"
    d = dict(groups)
    assert d["conv1"] == ["conv1.weight", "bn1.weight", "bn1.bias"]
    assert d["layer1.0.conv2"] == ["layer1.0.conv2.weight", "layer1.0.bn2.weight", "layer1.0.bn2.bias"]
    assert d["layer2.0.shortcut.conv"] == [
        "layer2.0.shortcut.conv.weight",
        "layer2.0.shortcut.bn.weight",
        "layer2.0.shortcut.bn.bias",
    ]
    assert "layer3.0.shortcut.conv" in d and "layer1.0.shortcut.conv" not in d
    pos = names.index
    assert pos("layer2.0.conv1") < pos("layer2.0.shortcut.conv") < pos("layer2.1.conv1")
    assert param_layer_index(model) == sorted(param_layer_index(model))


@pytest.mark.parametrize("name", ["allcnn", "vgg"])
def test_other_nets_partition(name):
    groups = _check_partition(_build(name, CIFAR))
    assert len(groups) == {"allcnn": 9, "vgg": 10}[name]
    torch.manual_seed(0)
    bn_groups = layer_groups(build_net("vgg", CIFAR, 10, width=0.125, batchnorm=True))
    conv1 = ["features.conv1.weight", "features.bn1.weight", "features.bn1.bias"]
    assert bn_groups[0] == ("features.conv1", conv1)


class _Custom(nn.Module):
    """A module with a bare top-level parameter, an unknown parametrised submodule, a BN first."""

    def __init__(self):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bn0 = nn.BatchNorm1d(4)  # BN before any Linear: own layer
        self.lin = nn.Linear(4, 3)
        self.bn = nn.BatchNorm1d(3)
        self.emb = nn.Embedding(5, 2)  # unknown parametrised module type
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)
        self.head = nn.Linear(3, 2, bias=False)
        self.head_bias = nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return self.head(self.frozen(self.bn(self.lin(self.bn0(x))))) * self.scale + self.head_bias


def test_custom_module_grouping():
    model = _Custom()
    groups = _check_partition(model)
    assert groups == [
        ("scale", ["scale"]),
        ("head_bias", ["head_bias"]),
        ("bn0", ["bn0.weight", "bn0.bias"]),
        ("lin", ["lin.weight", "lin.bias", "bn.weight", "bn.bias"]),
        ("emb", ["emb.weight"]),
        ("head", ["head.weight"]),
    ]


def test_shared_parameter_counted_once():
    lin = nn.Linear(2, 2)
    model = nn.Sequential(lin, nn.ReLU(), lin)
    assert layer_groups(model) == [("0", ["0.weight", "0.bias"])]


def test_resolve_layers():
    groups = layer_groups(_build("resnet20", CIFAR))
    n = len(groups)
    assert resolve_layers(groups, ["fc", "conv1"]) == [n - 1, 0]
    assert resolve_layers(groups, [-1, -2, 0, 3]) == [n - 1, n - 2, 0, 3]
    assert resolve_layers(groups, ["-1", " 2 "]) == [n - 1, 2]
    assert resolve_layers(groups, "fc") == [n - 1]
    assert resolve_layers(groups, []) == []
    with pytest.raises(ValueError) as err:
        resolve_layers(groups, ["fc", "layer9.conv"])
    msg = str(err.value)
    assert "layer9.conv" in msg and "layer2.0.shortcut.conv" in msg and "conv1" in msg and "fc" in msg
    with pytest.raises(ValueError, match="layer1.0.conv1"):
        resolve_layers(groups, [n])
    with pytest.raises(ValueError, match="out of range"):
        resolve_layers(groups, [-n - 1])
    with pytest.raises(ValueError):
        resolve_layers(groups, [1.5])
