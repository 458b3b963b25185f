"""``lca_lab.track``: LCA inside a loop of your own, the same rows as ``python -m lca_lab``."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch

from lca_lab import track
from lca_lab.parts import build_parts
from lca_lab.train import run
from tests.test_train import _cfg


def _own_loop(cfg, run_dir, order, crash_at=None, **kwargs):
    """lca_lab's training loop written by hand (same init, optimizer, batches), with ``track()``."""
    parts = build_parts(cfg, torch.device("cpu"))
    model, opt, data = parts.model, parts.optimizer, parts.data
    bs = int(cfg["batch_size"])
    with track(model, train_data=(data.train_x, data.train_y), run_dir=run_dir, **kwargs) as lca:
        for t, idx in enumerate(_batches(order, bs)):
            if t == crash_at:
                raise KeyboardInterrupt("stopped by the test")
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(data.train_x[idx]), data.train_y[idx])
            loss.backward()
            opt.step()
            lca.step(loss)


def _batches(order, bs):
    for row in np.asarray(order):
        for s in range(0, len(row), bs):
            yield torch.as_tensor(row[s : s + bs], dtype=torch.int64)


def _rows(path):
    with h5py.File(path, "r") as f:
        keys = ("lca/param", "lca/total", "lca/error", "lca/splits", "lca/converged", "train/loss")
        out = {k: f[k][()] for k in keys}
        out["order"] = f["data/train_order"][()] if "data/train_order" in f else None
        return out | {"status": f.attrs["status"]}


CFG = ("data=synthetic", "data.size=90", "batch_size=30", "epochs=2", "logger=none", "figures=false",
       "opt.lr=0.05", "lca.tolerance=1e-4")  # fmt: skip


def test_track_gives_the_rows_of_python_m_lca_lab(tmp_path):
    cfg = _cfg(*CFG)
    run(cfg, tmp_path / "cli")
    ref = _rows(tmp_path / "cli" / "lca.h5")
    _own_loop(cfg, tmp_path / "own", ref["order"], lca={"tolerance": 1e-4})
    got = _rows(tmp_path / "own" / "lca.h5")
    assert got["status"] == "complete" and len(got["lca/total"]) == 6
    np.testing.assert_array_equal(got["lca/splits"], ref["lca/splits"])
    np.testing.assert_allclose(got["lca/param"], ref["lca/param"], rtol=1e-6, atol=1e-10)
    np.testing.assert_allclose(got["train/loss"], ref["train/loss"], rtol=1e-7)
    # conservation, and the file is a run file: analyze reads it
    assert np.all((np.abs(got["lca/error"]) <= 1e-4) | ~got["lca/converged"])  # or flagged at max_splits
    np.testing.assert_allclose(got["lca/total"] - np.diff(got["train/loss"]), got["lca/error"], atol=1e-12)
    from lca_lab.analyze import analyze

    rep = analyze(tmp_path / "own", repeats=20)
    assert rep["n_runs"] == 1 and rep["groups"][0]["pct_helping"]["mean"] > 0


def test_a_loop_that_crashes_keeps_its_rows_with_a_failed_status(tmp_path):
    cfg = _cfg(*CFG)
    order = np.stack([np.random.default_rng(e).permutation(90) for e in range(2)])
    with pytest.raises(KeyboardInterrupt):
        _own_loop(cfg, tmp_path, order, crash_at=4)
    got = _rows(tmp_path / "lca.h5")
    assert got["status"].startswith("failed: ") and len(got["lca/total"]) == 4


def test_track_refuses_unknown_options_and_data():
    model = torch.nn.Linear(2, 3)
    with pytest.raises(ValueError, match="lca keys \\['tol'\\] are unknown"):
        track(model, (torch.zeros(4, 2), torch.zeros(4, dtype=torch.int64)), "unused", lca={"tol": 1})
    with pytest.raises(TypeError, match="train_data must be a torch Dataset"):
        track(model, [1, 2, 3], "unused")


def test_track_takes_a_dict_input_pair_and_conserves(tmp_path):
    """Dict inputs and per-token targets with -100, given as an (inputs, targets) pair of tensors."""
    from tests.own_parts import TinyLM, lm_tensors

    x, y = lm_tensors(n=24)
    torch.manual_seed(0)
    model = TinyLM()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    with track(model, train_data=({"input_ids": x}, y), run_dir=tmp_path, lca={"tolerance": 1e-4}) as lca:
        for idx in torch.arange(24).split(8):
            logits = model(input_ids=x[idx])["logits"]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), y[idx].reshape(-1))
            loss.backward()
            opt.step()
            opt.zero_grad()
            lca.step(loss)
    got = _rows(tmp_path / "lca.h5")
    assert got["status"] == "complete" and len(got["lca/total"]) == 3
    assert np.all((np.abs(got["lca/error"]) <= 1e-4) | ~got["lca/converged"])
    np.testing.assert_allclose(got["lca/total"] - np.diff(got["train/loss"]), got["lca/error"], atol=1e-12)


def test_the_loops_autocast_does_not_reach_the_passes(tmp_path):
    """A step taken (and lca.step() called) under bfloat16 autocast: L is still measured in float32."""
    cfg = _cfg(*CFG)
    parts = build_parts(cfg, torch.device("cpu"))
    model, opt, x, y = parts.model, parts.optimizer, parts.data.train_x, parts.data.train_y
    with torch.no_grad():
        ref0 = torch.nn.functional.cross_entropy(model(x), y).item()  # float32 L(θ_0)
    bf16 = torch.autocast("cpu", torch.bfloat16)
    with track(model, (x, y), tmp_path, lca={"tolerance": 1e-4}) as lca, bf16:
        for idx in torch.arange(90).split(30):
            loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
            lca.step(loss)
    with torch.no_grad():
        ref1 = torch.nn.functional.cross_entropy(model(x), y).item()
    got = _rows(tmp_path / "lca.h5")
    np.testing.assert_allclose(got["train/loss"][[0, -1]], [ref0, ref1], rtol=1e-6)
    assert np.all((np.abs(got["lca/error"]) <= 1e-4) | ~got["lca/converged"])
