"""Hugging Face models through lca_lab: a tiny GPT-2 built from a config (conf/net/hf_gpt2.yaml, no
download) trained on byte-level text with dict inputs (``data=text data.dict_inputs=true``: items
``({"input_ids": x}, y)``, called as ``model(**inputs)``, logits read from ``.logits``).

Skipped where ``transformers`` is not installed (``pip install -e ".[hf]"``; CI installs it).
"""

import math
import socket
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from lca_lab.lca import lca_eval_mode, tied_aliases
from lca_lab.nets import layer_groups
from lca_lab.store import open_run
from lca_lab.train import run

transformers = pytest.importorskip("transformers")

CONF = Path(__file__).resolve().parents[1] / "conf"
WINDOW_BYTES = 65  # data=text's default window (64) + the byte it predicts
# 40 windows of the bundled corpus: int(40 × 0.1) = 4 held out, 36 to train on, 3 batches of 12 per epoch.
TEXT = ["net=hf_gpt2", "data=text", "data.dict_inputs=true", f"data.max_bytes={40 * WINDOW_BYTES}"]


def _cfg(*overrides):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(
            config_name="config", overrides=["device=cpu", "logger=none", "figures=false", *overrides]
        )
    return OmegaConf.to_container(cfg, resolve=True)


def _build(net_cfg):
    """The net as lca_lab instantiates it (nested ``config: {_target_: GPT2Config}`` built first)."""
    return instantiate(net_cfg, _convert_="all")


def _n_params(c) -> int:
    """GPT-2's trainable scalars with the head tied to the token embedding (counted once):
    embeddings V·d + P·d; per block 2 LayerNorms (4d), qkv (3d² + 3d), attention proj (d² + d),
    MLP (2·d·4d + 4d + d); final LayerNorm 2d."""
    d = c.n_embd
    block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (8 * d * d + 5 * d)
    return c.vocab_size * d + c.n_positions * d + c.n_layer * block + 2 * d


@pytest.fixture
def no_network(monkeypatch):
    """Any IPv4/IPv6 connection or DNS look-up fails the test (Unix sockets stay usable)."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access while building a model from a config: {args[:2]}")

    real_connect = socket.socket.connect

    def connect(self, address):
        if self.family in (socket.AF_INET, socket.AF_INET6):
            refuse(address)
        return real_connect(self, address)

    monkeypatch.setattr(socket.socket, "connect", connect)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)


def test_hf_gpt2_builds_from_its_config_offline(no_network):
    cfg = _cfg(*TEXT)
    model = _build(cfg["net"])
    c = model.config
    assert isinstance(model, transformers.GPT2LMHeadModel)
    assert c.vocab_size == 256  # data=text's byte vocabulary: lca_lab passes a GPT2LMHeadModel nothing
    assert c.n_positions >= cfg["data"]["window"]
    assert (c.resid_pdrop, c.embd_pdrop, c.attn_pdrop) == (0.0, 0.0, 0.0)
    x = torch.randint(0, 256, (2, cfg["data"]["window"]))
    out = model(**{"input_ids": x})
    assert out.logits.shape == (2, cfg["data"]["window"], 256)
    assert list(out.keys()) == ["logits"]  # use_cache: false, no labels: nothing else is computed


def test_tied_head_is_one_tensor_in_exactly_one_layer():
    model = _build(_cfg("net=hf_gpt2")["net"])
    names = [n for n, _ in model.named_parameters()]
    assert "lm_head.weight" not in names and "transformer.wte.weight" in names
    assert model.lm_head.weight is model.transformer.wte.weight
    # L's passes give the head its value under its own name too (functional_call, tie_weights=False)
    assert tied_aliases(model, names) == [("lm_head.weight", "transformer.wte.weight")]
    assert sum(p.numel() for p in model.parameters()) == _n_params(model.config)
    grouped = [p for _, ps in layer_groups(model) for p in ps]
    assert sorted(grouped) == sorted(names)  # each tensor once, the tied one included once


def test_attention_dropout_is_off_in_lca_passes():
    """L(θ) is defined with dropout off. GPT-2's attention-probability dropout is not an nn.Dropout call:
    it follows the attention module's own ``training`` flag, so switching only the nn.Dropout modules to
    eval leaves it on and L would change from pass to pass."""
    drop = [f"net.config.{k}=0.1" for k in ("resid_pdrop", "embd_pdrop", "attn_pdrop")]
    model = _build(_cfg("net=hf_gpt2", *drop)["net"]).train()
    x = torch.randint(0, 256, (4, 64))
    torch.manual_seed(0)
    with torch.no_grad(), lca_eval_mode(model):
        a, b = model(input_ids=x).logits, model(input_ids=x).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert all(m.training for m in model.modules())  # the training step's mode is restored after


def test_hf_gpt2_on_text_conserves_per_iteration(tmp_path):
    cfg = _cfg(*TEXT, "batch_size=12", "epochs=2", "eval_every=1000")
    run(cfg, tmp_path)
    tol = cfg["lca"]["tolerance"]
    with open_run(tmp_path) as r:
        assert r.is_complete, r.status
        loss, total, err, conv = r.train_loss, r.lca_total, r.lca_error, r.lca_converged
        layer, names, K = r.lca_layer, r.param_names, r.n_params
        param = r.param_lca()
    assert len(total) == 6  # 36 training windows / 12 per batch × 2 epochs
    # |Σ LCA − ΔL| within the tolerance at every iteration (GELU and LayerNorm are smooth: no kinks)
    np.testing.assert_allclose(total - np.diff(loss), err, atol=1e-12)
    assert np.all(np.abs(err) <= tol) and conv.all(), err
    np.testing.assert_allclose(layer.sum(1), total, atol=1e-9)
    np.testing.assert_allclose(param.astype(np.float64).sum(1), total, rtol=1e-4, atol=1e-5)
    # the tied head is stored once, under the embedding's name
    torch.manual_seed(cfg["seed"])  # as lca_lab does just before building the net: the same θ_0
    model = _build(cfg["net"])
    assert "lm_head.weight" not in names and K == _n_params(model.config)
    # L(θ_0) = Σ per-token cross-entropy over the train split / its number of tokens, computed here with
    # the Hugging Face model itself, one window at a time
    train = instantiate(cfg["data"], _convert_="all")["train"]
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(len(train)):
            inputs, y = train[i]
            logits = model(**{k: v[None] for k, v in inputs.items()}).logits[0]
            nll += torch.nn.functional.cross_entropy(logits.double(), y, reduction="sum").item()
            count += y.numel()
    assert count == 36 * 64
    assert loss[0] == pytest.approx(nll / count, rel=1e-5)
    # at GPT-2's small initial weights every byte is about equally likely: a mean over tokens, not a sum
    assert abs(loss[0] - math.log(256)) < 0.1, loss[0]
    assert loss[-1] < loss[0] - 0.5  # it learned (SGD, lr 0.1, momentum 0.9: about 5.5 → 3.7 nats)
