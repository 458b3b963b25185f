"""net=gpt (lca_lab.transformer.GPT via lca_lab.nets.gpt): shapes, causality, tying, GPT-2 init, its LCA
layers and the ``lca_layers`` hook of nets.layer_groups, torch.func in float64, argument checks."""

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from torch import nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

from lca_lab import nets
from lca_lab.analyze import _heatmap_param
from lca_lab.config import ConfigError
from lca_lab.nets import entry_layer_index, layer_groups, param_layer_index
from lca_lab.parts import check_parts
from lca_lab.transformer import GPT

CONF = Path(__file__).resolve().parents[1] / "conf"
SMALL = {"depth": 2, "width": 16, "heads": 2}  # a few thousand parameters: every test here takes ms
V, T = 11, 8  # vocabulary, window


def _gpt(seed=0, **kw):
    torch.manual_seed(seed)
    return nets.gpt(n_classes=V, input_shape=(T,), **{**SMALL, **kw})


def _loss(logits, y):
    """Mean next-token cross-entropy over the counted (≠ -100) targets."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1), ignore_index=-100)


def test_logits_shape_and_shorter_sequences():
    m = _gpt()
    x = torch.randint(0, V, (3, T))
    assert m(x).shape == (3, T, V) and torch.isfinite(m(x)).all()
    assert m(x[:, :5]).shape == (3, 5, V)  # any T ≤ context
    with pytest.raises(ValueError, match="exceeds the model's context 8"):
        m(torch.randint(0, V, (3, T + 1)))


def test_default_gpt_is_the_documented_size():
    torch.manual_seed(0)
    m = nets.gpt(n_classes=256, input_shape=(64,))
    assert (m.context, m.depth, len(m.blocks), m.tok_emb.weight.shape) == (64, 2, 2, (256, 64))
    per_block = 2 * 64 + (64 * 192 + 192) + (64 * 64 + 64) + 2 * 64 + (64 * 256 + 256) + (256 * 64 + 64)
    assert sum(p.numel() for p in m.parameters()) == 256 * 64 + 64 * 64 + 2 * per_block + 2 * 64


def test_later_tokens_do_not_change_earlier_logits():
    m = _gpt()
    x = torch.randint(0, V, (2, T))
    x2 = x.clone()
    x2[:, 5] = (x[:, 5] + 1) % V
    a, b = m(x), m(x2)
    torch.testing.assert_close(a[:, :5], b[:, :5], rtol=0, atol=0)
    assert (a[:, 5:] - b[:, 5:]).abs().amax(dim=-1).gt(1e-6).all()  # position 5 on does see the change


def test_tied_head_is_one_tensor_untied_has_its_own():
    tied, untied = _gpt(), _gpt(tie=False)
    assert tied.head.weight is tied.tok_emb.weight
    assert "head.weight" not in dict(tied.named_parameters())
    own = dict(untied.named_parameters())["head.weight"]
    assert own is untied.head.weight and own is not untied.tok_emb.weight
    n_tied, n_untied = (sum(p.numel() for p in m.parameters()) for m in (tied, untied))
    assert n_untied - n_tied == V * SMALL["width"]
    # Tied, a gradient step on the head moves the embedding: it is the same tensor.
    x = torch.randint(0, V, (2, T))
    _loss(tied(x), torch.randint(0, V, (2, T))).backward()
    assert tied.tok_emb.weight.grad is tied.head.weight.grad


def test_init_is_seeded_and_gpt2_like():
    a, b, c = _gpt(1, width=64, heads=4, depth=4), _gpt(1, width=64, heads=4, depth=4), _gpt(2, width=64)
    for (n, pa), pb in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=0, atol=0, msg=n)
    assert not torch.equal(a.tok_emb.weight, c.tok_emb.weight)
    p = dict(a.named_parameters())
    assert p["tok_emb.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    assert p["blocks.0.mlp.fc.weight"].std().item() == pytest.approx(0.02, rel=0.05)
    # residual projections: 0.02 / sqrt(2 * depth) = 0.02 / sqrt(8)
    assert p["blocks.3.mlp.proj.weight"].std().item() == pytest.approx(0.02 / 8**0.5, rel=0.05)
    assert p["blocks.0.attn.proj.weight"].std().item() == pytest.approx(0.02 / 8**0.5, rel=0.1)
    assert torch.all(p["blocks.0.ln_1.weight"] == 1) and torch.all(p["ln_f.bias"] == 0)
    assert torch.all(p["blocks.1.attn.qkv.bias"] == 0)


def test_dropout_is_random_in_training_only():
    m = _gpt(dropout=0.5)
    x = torch.randint(0, V, (2, T))
    assert not torch.equal(m(x), m(x))
    m.eval()
    assert torch.equal(m(x), m(x))
    assert not any(isinstance(mod, nn.Dropout) for mod in _gpt().modules())  # dropout 0: none at all


# ----------------------------------------------------------------------------------------------------------
# layers


def _expected_layers(depth, tie):
    def wb(*modules):
        return [f"{m}.{p}" for m in modules for p in ("weight", "bias")]

    layers = [("embed", ["tok_emb.weight", "pos_emb.weight"])]
    for i in range(depth):
        b = f"blocks.{i}"
        layers.append((f"block{i}.attn", wb(f"{b}.ln_1", f"{b}.attn.qkv", f"{b}.attn.proj")))
        layers.append((f"block{i}.mlp", wb(f"{b}.ln_2", f"{b}.mlp.fc", f"{b}.mlp.proj")))
    layers.append(("head", wb("ln_f") + ([] if tie else ["head.weight"])))
    return layers


@pytest.mark.parametrize("tie", [True, False])
def test_layer_groups_of_gpt(tie):
    m = _gpt(depth=3, tie=tie)
    groups = layer_groups(m)
    assert groups == _expected_layers(3, tie)
    names = [p for _, ps in groups for p in ps]
    assert sorted(names) == sorted(n for n, _ in m.named_parameters())  # each tensor exactly once
    assert len(names) == len(set(names))
    # the flat-θ index covers every entry, the tied weight once, in the embedding's layer
    assert entry_layer_index(m).numel() == sum(p.numel() for p in m.parameters())
    assert param_layer_index(m)[0] == 0


def test_frozen_parameters_drop_out_of_hooked_layers():
    m = _gpt()
    m.ln_f.weight.requires_grad_(False)
    m.ln_f.bias.requires_grad_(False)
    groups = dict(layer_groups(m))
    assert "head" not in groups  # all its tensors frozen: the layer disappears
    m.pos_emb.weight.requires_grad_(False)
    assert dict(layer_groups(m))["embed"] == ["tok_emb.weight"]


class _Own(nn.Module):
    """A user's model with its own layers: ``a`` (lin1 + a tied copy lin2), ``b`` (the scale)."""

    def __init__(self, layers):
        super().__init__()
        self.lin1 = nn.Linear(3, 3)
        self.lin2 = nn.Linear(3, 3)
        self.lin2.weight = self.lin1.weight  # tied: named_parameters() lists lin1.weight only
        self.scale = nn.Parameter(torch.ones(3))
        self._layers = layers

    def lca_layers(self):
        return self._layers

    def forward(self, x):
        return self.lin2(self.lin1(x)) * self.scale


def test_own_model_layers_are_used_in_their_order_with_canonical_names():
    m = _Own([("b", ["scale"]), ("a", ["lin2.bias", "lin2.weight", "lin1.bias"])])
    # the alias lin2.weight names lin1.weight's tensor: accepted, named canonically, params in model order
    assert layer_groups(m) == [("b", ["scale"]), ("a", ["lin1.weight", "lin1.bias", "lin2.bias"])]


@pytest.mark.parametrize(
    "layers,match",
    [
        ([("a", ["lin1.weight", "lin1.bias", "lin2.bias"])], r"leaves out trainable parameters scale"),
        ([("a", ["lin1.weight", "lin1.bias", "lin2.bias", "nope"]), ("b", ["scale"])], r"names 'nope'"),
        ([("a", ["lin1.weight", "lin1.bias", "lin2.bias"]), ("b", ["scale", "lin1.bias"])], r"again in 'b'"),
        ([("a", ["lin1.weight", "lin1.bias", "lin2.bias"]), ("b", ["scale", "lin2.weight"])], r"same tensor"),
        ([("a", ["lin1.weight", "lin1.bias", "lin2.bias"]), ("a", ["scale"])], r"unique"),
        ([("a", ["lin1.weight", "lin1.bias", "lin2.bias", "scale"]), ("b", [])], r"'b' has no parameters"),
        ([("a", "lin1.weight")], r"each entry must be"),
        ({"a": ["lin1.weight"]}, r"must return a list"),
    ],
)
def test_own_layers_are_checked(layers, match):
    with pytest.raises(ValueError, match=match) as e:
        layer_groups(_Own(layers))
    assert "_Own.lca_layers()" in str(e.value) and "\n" not in str(e.value)


def test_own_layers_may_list_frozen_tensors():
    m = _Own([("a", ["lin1.weight", "lin1.bias", "lin2.bias"]), ("b", ["scale"])])
    m.scale.requires_grad_(False)
    assert layer_groups(m) == [("a", ["lin1.weight", "lin1.bias", "lin2.bias"])]


def test_models_without_the_hook_keep_the_module_rules():
    torch.manual_seed(0)
    assert [g for g, _ in layer_groups(nets.fc((1, 4, 4), 3))] == ["fc1", "fc2", "fc3"]


# ----------------------------------------------------------------------------------------------------------
# torch.func over the parameters, float64


def test_vmap_grad_over_parameters_in_float64_equals_autograd():
    m = _gpt(tie=True).double()
    x = torch.randint(0, V, (3, T))
    y = torch.randint(0, V, (3, T))
    y[0, :3] = -100  # left out of the loss
    params = {n: p.detach() for n, p in m.named_parameters()}

    def loss(p):
        return _loss(functional_call(m, p, (x,)), y)

    # two parameter points at once: θ and a perturbed θ
    torch.manual_seed(5)
    other = {n: p + 0.01 * torch.randn_like(p) for n, p in params.items()}
    stacked = {n: torch.stack([params[n], other[n]]) for n in params}
    gs = vmap(grad(loss))(stacked)
    for k, point in enumerate((params, other)):
        with torch.no_grad():
            for n, p in m.named_parameters():
                p.copy_(point[n])
        m.zero_grad()
        _loss(m(x), y).backward()
        for n, p in m.named_parameters():
            assert gs[n].dtype == torch.float64
            torch.testing.assert_close(gs[n][k], p.grad, rtol=1e-12, atol=1e-14, msg=n)
    # the tied head contributes to the embedding's gradient: it differs from the untied model's
    assert gs["tok_emb.weight"][0].abs().sum() > 0 and "head.weight" not in gs


def test_functional_call_honours_the_tie():
    m = _gpt().double()
    x = torch.randint(0, V, (2, T))
    params = {n: p.detach().clone() for n, p in m.named_parameters()}
    params["tok_emb.weight"] = params["tok_emb.weight"] * 2  # the head reads the new value too
    with torch.no_grad():
        m.tok_emb.weight.mul_(2)
    torch.testing.assert_close(functional_call(m, params, (x,)), m(x), rtol=0, atol=0)


# ----------------------------------------------------------------------------------------------------------
# arguments and config


@pytest.mark.parametrize(
    "kwargs,arg",
    [
        ({"depth": 0}, "depth"),
        ({"depth": 1.5}, "depth"),
        ({"heads": 0}, "heads"),
        ({"width": 30, "heads": 4}, "width"),
        ({"width": 0}, "width"),
        ({"dropout": 1.0}, "dropout"),
        ({"dropout": -0.1}, "dropout"),
        ({"tie": "yes"}, "tie"),
        ({"context": 0}, "context"),
        ({"context": True}, "context"),
    ],
)
def test_gpt_checks_its_arguments(kwargs, arg):
    with pytest.raises(ValueError, match=rf"^{arg} must"):
        nets.gpt.check_args(**kwargs)
    with pytest.raises(ValueError, match=rf"^{arg} must"):
        nets.gpt(n_classes=V, input_shape=(T,), **kwargs)


def test_context_follows_the_window_and_may_not_be_shorter():
    assert _gpt().context == T
    assert _gpt(context=2 * T).context == 2 * T
    with pytest.raises(ValueError, match=r"^context=4 is shorter than the data's window of 8.*net\.context"):
        _gpt(context=4)
    with pytest.raises(ValueError, match=r"^context=null needs"):
        nets.gpt(n_classes=V)
    assert nets.gpt(n_classes=V, context=5).context == 5
    with pytest.raises(ValueError, match="n_classes"):
        nets.gpt(n_classes=0, input_shape=(T,))
    with pytest.raises(ValueError, match="input_shape"):
        nets.gpt(n_classes=V, input_shape=(0,))


def test_config_files_pass_the_parts_check():
    net = yaml.safe_load((CONF / "net" / "gpt.yaml").read_text())
    data = yaml.safe_load((CONF / "data" / "text.yaml").read_text())
    assert {k: net[k] for k in ("depth", "width", "heads", "dropout", "tie", "context")} == {
        "depth": 2, "width": 64, "heads": 4, "dropout": 0.0, "tie": True, "context": None,
    }  # fmt: skip
    check_parts({"net": net, "data": data})  # every key is an argument of its target
    with pytest.raises(ConfigError, match=r"net\.width must"):
        check_parts({"net": {**net, "width": 66}})
    GPT(V, T)  # the class itself builds with its defaults


# ----------------------------------------------------------------------------------------------------------
# analyze: the heatmap / animation pick a weight that exists


@pytest.mark.parametrize(
    "shapes,expected",
    [
        ([(20, 1, 5, 5), (20,), (40, 20, 5, 5)], 0),  # the paper's nets: the first layer's weight
        ([(100, 784), (100,)], 0),
        ([(256, 64), (64, 64), (64,), (64,)], 0),  # a transformer: the token embedding
        ([(64,), (64,), (192, 64)], 2),  # a LayerNorm first: the first weight matrix
        ([(3,), ()], 0),  # vectors only: the first, as a strip
        ([(0, 4), (5,)], 1),  # empty tensors are skipped
        ([], None),
    ],
)
def test_heatmap_picks_a_weight_that_exists(shapes, expected):
    assert _heatmap_param(shapes) == expected


def test_heatmap_of_a_transformer_run(tmp_path):
    from lca_lab.analyze import _animation, _param_figures

    m = _gpt()
    shapes = [tuple(p.shape) for p in m.parameters()]
    names = [n for n, _ in m.named_parameters()]
    shapes = [(3,)] + shapes  # a leading vector: the heatmap must skip it and still find the embedding
    names = ["gain"] + names
    K = sum(int(np.prod(s)) for s in shapes)
    sample = np.random.default_rng(0).normal(size=(4, K))
    r = {"param_names": names, "param_shapes": shapes, "param_sample": sample, "param_sample_step": 1}
    (name, fig), *_ = _param_figures(r, "g0")
    assert name == "g0_heatmap_tok_emb.weight.png"
    np.testing.assert_array_equal(fig.axes[0].images[0].get_array().shape, (V, SMALL["width"]))
    assert _animation(r, tmp_path, "g0", 2) == "g0_animation_tok_emb.weight.gif"
    assert (tmp_path / "g0_animation_tok_emb.weight.gif").stat().st_size > 0
    scalar = {**r, "param_names": ["s"], "param_shapes": [()], "param_sample": sample[:, :1]}
    assert _animation(scalar, tmp_path, "g1", 2) == "g1_animation_s.gif"  # no 2-D weight: still drawn
