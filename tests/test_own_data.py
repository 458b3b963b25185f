"""Your own model and data: dict inputs, per-token targets with -100, tied weights, streamed passes.

Every path is compared with a float64 autograd reference on a tiny problem (``tests/own_parts.py``).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch.nn.utils import parameters_to_vector, vector_to_parameters

from lca_lab.examples import CachedExamples, StreamedExamples, fingerprint_stream, fingerprint_tensors
from lca_lab.lca import FullBatchLoss, LCAEngine
from lca_lab.parts import build_loss
from tests.own_parts import ItemDataset, TinyLM, lm_tensors, reference_loss

ROOT = Path(__file__).resolve().parents[1]


def _tiny_lm(seed: int = 0) -> TinyLM:
    torch.manual_seed(seed)
    return TinyLM().double()


def _reference_grad(model: TinyLM, theta: torch.Tensor, x, y) -> tuple[float, torch.Tensor]:
    """L and ∇L at θ by plain autograd on the model's own parameters (tied weight once)."""
    params = list(model.parameters())  # deduplicated: the tied weight once, in named_parameters order
    vector_to_parameters(theta.clone(), params)
    loss = reference_loss(model, x, y)
    grads = torch.autograd.grad(loss, params)
    return float(loss.detach()), torch.cat([g.reshape(-1) for g in grads])


def _simpson_reference(model, theta0, theta1, x, y, splits: int) -> torch.Tensor:
    """Per-parameter LCA of θ0 → θ1 by composite Simpson with ``splits`` sub-intervals: ḡ · Δ."""
    delta = theta1 - theta0
    w = torch.ones(splits + 1, dtype=torch.float64)
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    gbar = sum(
        w[k] * _reference_grad(model, theta0 + (k / splits) * delta, x, y)[1] for k in range(splits + 1)
    )
    return gbar / (3 * splits) * delta


def test_tiny_transformer_lca_equals_float64_autograd_reference():
    model = _tiny_lm()
    x, y = lm_tensors()
    assert (y == -100).any() and model.head.weight is model.tok.weight
    fbl = FullBatchLoss(model, {"input_ids": x}, y, chunk_size=4)  # 13 windows in chunks of 4, 3 and 1
    theta0 = fbl.flat_params()
    assert theta0.numel() == parameters_to_vector(model.parameters()).numel()  # the tied weight once
    theta1 = theta0 + 0.05 * torch.randn(
        theta0.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64
    )
    step = LCAEngine(fbl, "rk4", tolerance=1e-9, max_splits=16).step(theta0, theta1)
    ref = _simpson_reference(_tiny_lm(), theta0, theta1, x, y, step.splits)
    torch.testing.assert_close(step.param, ref, rtol=1e-10, atol=1e-13)
    # L over counted targets only, and conservation within the tolerance
    l0, _ = _reference_grad(_tiny_lm(), theta0, x, y)
    l1, _ = _reference_grad(_tiny_lm(), theta1, x, y)
    assert float(fbl.loss(theta0)) == pytest.approx(l0, rel=1e-12)
    residual = float(step.param.sum()) - (l1 - l0)
    assert residual == pytest.approx(step.host_error, abs=1e-12) and abs(residual) < 1e-7 * abs(l1 - l0) * 100


def test_ignored_targets_are_not_counted_whatever_the_loss():
    """A loss without ignore_index gets the -100 targets masked: the same L as cross-entropy's own skip."""
    model = _tiny_lm()
    x, y = lm_tensors()

    def plain_ce(logits, target, reduction="sum"):  # no ignore_index: -100 would index out of range
        return -torch.log_softmax(logits, -1).gather(1, target.unsqueeze(1)).sum()

    a = FullBatchLoss(model, {"input_ids": x}, y, chunk_size=5, loss_fn=build_loss(None))  # skips -100 itself
    b = FullBatchLoss(model, {"input_ids": x}, y, chunk_size=5, loss_fn=plain_ce)
    theta = a.flat_params()
    assert b.mask_ignored and not a.mask_ignored
    la, ga = a.loss_and_grad(theta)
    lb, gb = b.loss_and_grad(theta)
    assert a.n_counted == int((y != -100).sum()) < y.numel()
    torch.testing.assert_close(lb, la, rtol=1e-12, atol=0)
    torch.testing.assert_close(gb, ga, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("workers", [0, 2])
def test_streamed_and_cached_passes_give_the_same_L_and_grad(workers):
    model = _tiny_lm()
    x, y = lm_tensors(n=23)
    ds = ItemDataset(x, y)
    fp, n_targets, top = fingerprint_stream(ds, batch=5)
    assert fp == fingerprint_tensors({"input_ids": x}, y)  # the same data hashes the same either way
    streamed = StreamedExamples(ds, "cpu", fp["n_counted"], n_targets, (x.shape[1],), workers=workers)
    cached = CachedExamples({"input_ids": x}, y)
    a = FullBatchLoss(model, cached, None, chunk_size=4)
    b = FullBatchLoss(model, streamed, None, chunk_size=4)
    theta = a.flat_params() + 0.01
    la, ga = a.loss_and_grad(theta)
    lb, gb = b.loss_and_grad(theta)
    assert float(lb) == float(la) and torch.equal(gb, ga)  # same chunks, same order: identical numbers
    assert float(b.loss(theta)) == float(a.loss(theta))


def _run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "lca_lab", "device=cpu", "logger=none", "figures=false",
           f"hydra.run.dir={tmp_path}", *args]  # fmt: skip
    tmp_path.mkdir(parents=True, exist_ok=True)
    env = {"PYTHONPATH": str(ROOT), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    return subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def _rows(path: Path) -> dict[str, np.ndarray]:
    with h5py.File(path, "r") as f:
        out = {k: f[k][()] for k in ("lca/param", "lca/total", "lca/error", "train/loss", "data/train_order")}
        out["attrs"] = dict(f.attrs)
    return out


def test_own_dict_input_lm_runs_streamed_and_cached_with_the_same_rows(tmp_path):
    common = ["net._target_=tests.own_parts.TinyLM", "data._target_=tests.own_parts.lm_data",
              "+data.streamed_items=true", "batch_size=10", "epochs=2", "opt.lr=0.1",
              "lca.tolerance=1e-4"]  # fmt: skip
    runs = {}
    for stream in ("true", "false"):
        r = _run(tmp_path / stream, *common, f"lca.stream={stream}")
        assert r.returncode == 0, r.stderr[-2000:]
        runs[stream] = _rows(tmp_path / stream / "lca.h5")
    a, b = runs["true"], runs["false"]
    assert a["attrs"]["lca_stream"] and not b["attrs"]["lca_stream"]
    np.testing.assert_allclose(a["lca/param"], b["lca/param"], rtol=1e-5, atol=1e-7)
    np.testing.assert_array_equal(a["train/loss"], b["train/loss"])
    # conservation per iteration, L = mean over counted tokens
    assert np.all(np.abs(a["lca/error"]) <= 1e-4)
    np.testing.assert_allclose(a["lca/total"] - np.diff(a["train/loss"]), a["lca/error"], atol=1e-12)
    fp = json.loads(a["attrs"]["data_fingerprint"])
    assert fp == json.loads(b["attrs"]["data_fingerprint"]) and fp["train"]["n"] == 40
    assert fp["train"]["n_counted"] < 40 * 6  # the -100 targets are not counted
    order = a["data/train_order"]
    assert order.shape == (2, 40) and all(sorted(row) == list(range(40)) for row in order.tolist())


def test_train_order_is_the_order_trained(tmp_path, monkeypatch):
    """The recorded epoch orders are the batches the trainer took (the batch order of a seed)."""
    import lca_lab.train as train

    seen = []
    orig = CachedExamples.take

    def spy(self, idx):
        seen.append(idx.clone())
        return orig(self, idx)

    monkeypatch.setattr(CachedExamples, "take", spy)
    from tests.test_train import _cfg

    cfg = _cfg("data=synthetic", "data.size=60", "batch_size=25", "epochs=2", "lca=off", "logger=none",
               "figures=false")  # fmt: skip
    train.run(cfg, tmp_path)
    with h5py.File(tmp_path / "lca.h5", "r") as f:
        order = f["data/train_order"][()]
    expect = [torch.as_tensor(order[e][s : s + 25]) for e in range(2) for s in (0, 25, 50)]
    probe, trained = seen[0], seen[1:]  # the model probe reads examples 0 and 1 once, before training
    assert torch.equal(probe, torch.arange(2))
    assert len(trained) == len(expect) and all(
        torch.equal(a.long(), b.long()) for a, b in zip(trained, expect)
    )


def _own_cfg(net: dict, data: dict, *overrides: str) -> dict:
    from tests.test_train import _cfg

    cfg = _cfg("logger=none", "figures=false", "epochs=1", "batch_size=10", *overrides)
    cfg["net"], cfg["data"] = net, data
    return cfg


@pytest.mark.parametrize(
    "net, data, match",
    [
        ("tests.own_parts.NoLogits", "tests.own_parts.blobs", "neither a tensor of logits nor has `logits`"),
        (
            "tests.own_parts.MLP",
            "tests.own_parts.pair_targets",
            r"targets must match the logits' leading dims",
        ),
        ("tests.own_parts.MLP", "tests.own_parts.bare_items", r"an item must be \(inputs, target\)"),
        ("tests.own_parts.TinyLM", "tests.own_parts.blobs", "failed on the first training examples"),
    ],
)
def test_bad_model_or_data_fails_before_training_in_one_line(tmp_path, net, data, match):
    from lca_lab.config import ConfigError
    from lca_lab.train import run

    with pytest.raises(ConfigError, match=match) as e:
        run(_own_cfg({"_target_": net}, {"_target_": data}), tmp_path)
    assert "\n" not in str(e.value)
    assert not (tmp_path / "lca.h5").exists()  # nothing started


def test_per_class_lca_on_token_targets_is_refused_in_one_line(tmp_path):
    from lca_lab.config import ConfigError
    from lca_lab.train import run

    cfg = _own_cfg(
        {"_target_": "tests.own_parts.TinyLM"}, {"_target_": "tests.own_parts.lm_data"}, "lca.per_class=true"
    )
    with pytest.raises(ConfigError, match="lca.per_class=true needs one class index per example"):
        run(cfg, tmp_path)


def test_a_missing_text_file_exits_2_in_one_line(tmp_path):
    r = _run(tmp_path, "net=gpt", "data=text", f"data.path={tmp_path / 'nope.txt'}")
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "data.path=" in err[0] and "does not exist" in err[0], r.stderr


def test_a_new_target_takes_plus_keys_and_drops_the_group_files_keys(tmp_path):
    from lca_lab.cli_checks import upsert_new_target_keys
    from lca_lab.parts import inherited_keys

    args = ["data._target_=tests.own_parts.blobs", "+data.n=90", "+net.hidden=4", "++data.items=false"]
    assert upsert_new_target_keys(args) == [args[0], "++data.n=90", "+net.hidden=4", "++data.items=false"]
    cfg = {"data": {"_target_": "tests.own_parts.blobs", "root": "x", "split_seed": 0, "n": 90}}
    assert inherited_keys(cfg, ["data._target_=tests.own_parts.blobs", "++data.n=90"]) == {
        "data": ["root", "split_seed"]
    }
    assert inherited_keys(cfg, ["data._target_=tests.own_parts.blobs", "data.root=y"]) == {
        "data": ["split_seed"]
    }
    assert inherited_keys(cfg, ["data.n=3"]) == {}  # the target was not replaced: nothing dropped
    # end to end: the default data=mnist's keys are dropped with a note, the run completes
    r = _run(tmp_path, "net._target_=tests.own_parts.MLP", "data._target_=tests.own_parts.blobs",
             "+data.n=90", "batch_size=30", "epochs=1")  # fmt: skip
    assert r.returncode == 0, r.stderr[-2000:]
    assert "note: data: root, split_seed, fallback, download, normalize not passed" in r.stdout
    with h5py.File(tmp_path / "lca.h5", "r") as f:
        assert json.loads(f.attrs["data_fingerprint"])["train"]["n"] == 90


def test_recompute_of_an_own_dict_input_run_needs_allow_targets_and_gives_the_same_rows(tmp_path):
    from lca_lab import recompute as rc
    from lca_lab.config import ConfigError
    from lca_lab.train import run

    cfg = _own_cfg({"_target_": "tests.own_parts.TinyLM"}, {"_target_": "tests.own_parts.lm_data"},
                   "store.trajectory=true", "lca.tolerance=1e-4", "opt.lr=0.1")  # fmt: skip
    run(cfg, tmp_path / "run")
    with pytest.raises((ConfigError, ValueError), match=r"allow_targets=\[tests\.\*\]"):
        rc.recompute(tmp_path / "run", out_dir=tmp_path / "r0", progress=False)
    rc.recompute(tmp_path / "run", out_dir=tmp_path / "r1", progress=False, allow_targets=["tests.*"])
    with h5py.File(tmp_path / "run" / "lca.h5", "r") as a, h5py.File(tmp_path / "r1" / "lca.h5", "r") as b:
        np.testing.assert_allclose(b["lca/param"][()], a["lca/param"][()], rtol=1e-4, atol=1e-7)
        np.testing.assert_allclose(b["lca/total"][()], a["lca/total"][()], rtol=1e-6, atol=1e-9)


def test_gpt_on_text_conserves_and_groups_its_layers(tmp_path):
    """net=gpt data=text end to end (a small one): every iteration within the tolerance, Σ layers = total,
    the transformer's layers, the corpus' provenance and the per-token L recorded."""
    from lca_lab.train import run
    from tests.test_train import _cfg

    cfg = _cfg("net=gpt", "data=text", "data.max_bytes=4096", "data.window=16", "net.width=16", "net.depth=1",
               "net.heads=2", "batch_size=16", "epochs=1", "logger=none", "figures=false")  # fmt: skip
    s = run(cfg, tmp_path)
    assert s["lca_rows"] >= 10
    with h5py.File(tmp_path / "lca.h5", "r") as f:
        err, total, loss = f["lca/error"][()], f["lca/total"][()], f["train/loss"][()]
        layer = f["lca/layer"][()]
        names = [n.decode() if isinstance(n, bytes) else n for n in f["layers/names"][()]]
        info = json.loads(f.attrs["data_info"])
        fp = json.loads(f.attrs["data_fingerprint"])
    assert np.all(np.abs(err) <= 1e-3)
    np.testing.assert_allclose(total - np.diff(loss), err, atol=1e-12)
    np.testing.assert_allclose(layer.sum(1), total, atol=1e-9)
    assert names == ["embed", "block0.attn", "block0.mlp", "head"]
    assert info["corpus"] == "pydoc_data.topics" and len(info["sha256"]) == 64
    assert fp["train"]["n_counted"] == fp["train"]["n"] * 16  # one target per byte of every window
    assert loss[-1] < loss[0]


@pytest.mark.parametrize(
    "override", ["net._target_=tests.own_parts.Nope", "net=hf_gpt2", "data._target_=nopkg.make"]
)
def test_a_target_that_cannot_be_imported_exits_2_in_one_line(tmp_path, override):
    extra = ["net.config._target_=tests.own_parts.NopeConfig"] if override == "net=hf_gpt2" else []
    r = _run(tmp_path, override, *extra)
    assert r.returncode == 2
    err = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(err) == 1 and "cannot be imported" in err[0], r.stderr


def test_a_dataset_that_transforms_its_items_is_read_item_by_item():
    """Whole-tensor attributes are used only where ds[0] returns them unchanged."""
    from lca_lab.examples import read_all

    x, y = lm_tensors(n=5)

    class Shifted(ItemDataset):
        inputs, targets = None, None

        def __init__(self):
            super().__init__(x, y)
            self.inputs, self.targets = {"input_ids": x}, y

        def __getitem__(self, i):
            inputs, target = super().__getitem__(i)
            return {"input_ids": inputs["input_ids"] + 1}, target  # a transform in __getitem__

    got_x, _ = read_all(Shifted())
    assert torch.equal(got_x["input_ids"], x + 1)  # the items, not the raw attribute
    plain = ItemDataset(x, y)
    plain.inputs, plain.targets = {"input_ids": x}, y
    assert read_all(plain)[0]["input_ids"] is x  # no per-item read where the attributes are the items
