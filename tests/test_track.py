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


def _sgd_loop(model, x, y, lca, steps, bs=30):
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    n = len(y)
    for t in range(steps):
        idx = torch.arange(t * bs, t * bs + bs) % n
        loss = torch.nn.functional.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        lca.step(loss)


def test_every_k_steps_gives_one_conserving_row_per_segment(tmp_path):
    """every=3 over 8 steps: rows for steps 0-2, 3-5 and 6-7 (the window's end closes the last one); each
    is the LCA of the straight segment between the stored points, so Σ over rows is L_end − L_0."""
    cfg = _cfg(*CFG)
    parts = build_parts(cfg, torch.device("cpu"))
    x, y = parts.data.train_x, parts.data.train_y
    lcfg = {"tolerance": 1e-4, "window": [0, 8]}
    with track(parts.model, (x, y), tmp_path, lca=lcfg, store={"trajectory": True}, every=3) as lca:
        _sgd_loop(parts.model, x, y, lca, steps=10)
    with h5py.File(tmp_path / "lca.h5") as f:
        it, total, theta = f["lca/iteration"][()], f["lca/total"][()], f["trajectory/theta"][()]
        loss, err = f["train/loss"][()], f["lca/error"][()]
        assert f.attrs["lca_every"] == 3
    np.testing.assert_array_equal(it, [0, 3, 6])
    np.testing.assert_allclose(total - np.diff(loss), err, atol=1e-12)
    assert np.all(np.abs(err) <= 1e-4)
    # the stored points are θ at steps 0, 3, 6 and 8: L there is the whole-set loss
    model = parts.model
    with torch.no_grad():
        for k, th in enumerate(theta):
            torch.nn.utils.vector_to_parameters(torch.as_tensor(th), model.parameters())
            ref = torch.nn.functional.cross_entropy(model(x), y).item()
            assert abs(ref - loss[k]) < 1e-6


def test_per_class_and_test_data(tmp_path):
    from lca_lab.data import synthetic

    cfg = _cfg(*CFG)
    parts = build_parts(cfg, torch.device("cpu"))
    x, y = parts.data.train_x, parts.data.train_y
    test = synthetic(shape="mnist", size=40, split_seed=1)
    tx, ty = test.train_x, test.train_y
    lcfg = {"tolerance": 1e-4, "per_class": True}
    with track(parts.model, (x, y), tmp_path, lca=lcfg, test_data=(tx, ty)) as lca:
        _sgd_loop(parts.model, x, y, lca, steps=4)
    with h5py.File(tmp_path / "lca.h5") as f:
        total, class_layer = f["lca/total"][()], f["lca/class_layer"][()]
        test_loss = f["test/loss"][()]
    # the classes' parts add up to the total; the held-out loss is the test set's at each point
    np.testing.assert_allclose(class_layer.sum(axis=(1, 2)), total, rtol=1e-6, atol=1e-9)
    with torch.no_grad():
        ref = torch.nn.functional.cross_entropy(parts.model(tx), ty).item()
    assert len(test_loss) == 5 and abs(test_loss[-1] - ref) < 1e-6


def test_track_logs_to_a_wandb_run_of_its_own(tmp_path):
    from tests.wandb_offline import offline_runs, read_run

    cfg = _cfg(*CFG)
    parts = build_parts(cfg, torch.device("cpu"))
    x, y = parts.data.train_x, parts.data.train_y
    logger = {"mode": "offline", "project": "own-loop", "dir": str(tmp_path / "w"), "log_every": 2}
    with track(parts.model, (x, y), tmp_path / "run", logger=logger) as lca:
        _sgd_loop(parts.model, x, y, lca, steps=4)
    (run_dir,) = offline_runs(tmp_path / "w")
    got = read_run(run_dir)
    totals = [h["lca/total"] for h in got["history"] if "lca/total" in h]
    with h5py.File(tmp_path / "run" / "lca.h5") as f:
        np.testing.assert_allclose(totals, f["lca/total"][()], rtol=1e-12)
        assert f.attrs["status"] == "complete"
    assert got["project"] == "own-loop" and got["exit_code"] == 0


def test_recompute_refuses_a_tracked_run_in_one_line(tmp_path):
    import subprocess
    import sys

    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    with track(model, (x, y), tmp_path, store={"trajectory": True}) as lca:
        _sgd_loop(model, x, y, lca, steps=2, bs=6)
    p = subprocess.run(
        [sys.executable, "-m", "lca_lab.recompute", str(tmp_path)], capture_output=True, text=True
    )
    err = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(err) == 1 and "lca_loop=track" in err[0], p.stderr


def test_an_existing_run_file_is_refused_naming_the_fix(tmp_path):
    model = torch.nn.Linear(3, 2)
    x, y = torch.randn(12, 3), torch.randint(0, 2, (12,))
    for overwrite in (False, True):  # the second run replaces the first only when asked
        with track(model, (x, y), tmp_path, overwrite=overwrite) as lca:
            _sgd_loop(model, x, y, lca, steps=2, bs=6)
    with pytest.raises(FileExistsError, match="give another run_dir, pass overwrite=True"):
        with track(model, (x, y), tmp_path):
            pass
    assert _rows(tmp_path / "lca.h5")["status"] == "complete"  # the refused run touched nothing
