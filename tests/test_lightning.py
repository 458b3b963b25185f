"""``LCACallback``: LCA of a PyTorch Lightning fit (tiny models, CPU, offline)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.loops import N, conserved, lightning_module, lightning_trainer, loader, problem, rows

pytest.importorskip("lightning")
from lca_lab.integrations.lightning import LCACallback  # noqa: E402


def _fit(run_dir, module=None, ckpt_path=None, callbacks=(), batch_size=N // 4, **trainer_kw):
    _, model, x, y = problem()
    cb = LCACallback(run_dir=run_dir, lca={"tolerance": 1e-5}, store={"trajectory": True}, figures=False)
    trainer = lightning_trainer([cb, *callbacks], **trainer_kw)
    trainer.fit(module or lightning_module(model), loader(x, y, batch_size), ckpt_path=ckpt_path)
    return trainer


def test_gradient_accumulation_gives_one_row_per_optimizer_step(tmp_path):
    trainer = _fit(tmp_path, accumulate_grad_batches=2, max_epochs=3)  # 4 batches → 2 steps per epoch
    assert trainer.global_step == 6
    r = rows(tmp_path / "lca.h5")
    np.testing.assert_array_equal(r["lca/iteration"], np.arange(6))
    assert r["attrs"]["status"] == "complete" and conserved(r, 1e-5)
    # each row's θ_{t+1} is the module's θ after that optimizer step (the last one: the final θ)
    final = torch.cat([p.detach().reshape(-1) for p in trainer.lightning_module.parameters()])
    np.testing.assert_array_equal(r["theta"][-1], final.numpy())
    from lca_lab.analyze import analyze

    rep = analyze(tmp_path, repeats=20)
    assert rep["n_runs"] == 1


def test_a_fit_that_raises_keeps_its_rows_with_a_failed_status(tmp_path):
    _, model, _, _ = problem()
    with pytest.raises(RuntimeError, match="stopped by the test"):
        _fit(tmp_path, module=lightning_module(model, fail_at=5))
    r = rows(tmp_path / "lca.h5")
    assert r["attrs"]["status"].startswith("failed: RuntimeError: stopped by the test")
    assert len(r["lca/total"]) == 5 and conserved(r, 1e-5)


def test_a_fit_resumed_from_its_checkpoint_continues_the_run_file(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    _fit(tmp_path / "whole", max_epochs=3)
    whole = rows(tmp_path / "whole" / "lca.h5")
    _, model, _, _ = problem()
    ck = ModelCheckpoint(dirpath=tmp_path / "ck", every_n_train_steps=4, save_top_k=-1)
    with pytest.raises(RuntimeError):
        _fit(
            tmp_path / "run",
            module=lightning_module(model, fail_at=6),
            callbacks=[ck],
            max_epochs=3,
            enable_checkpointing=True,
        )
    assert len(rows(tmp_path / "run" / "lca.h5")["lca/total"]) == 6  # rows 4, 5: after the checkpoint
    _, model, _, _ = problem()
    _fit(tmp_path / "run", module=lightning_module(model), ckpt_path=tmp_path / "ck" / "epoch=0-step=4.ckpt",
         max_epochs=3)  # fmt: skip
    got = rows(tmp_path / "run" / "lca.h5")
    assert got["attrs"]["status"] == "complete" and "resumed" in got["attrs"]
    np.testing.assert_array_equal(got["lca/iteration"], whole["lca/iteration"])
    np.testing.assert_array_equal(got["lca/param"], whole["lca/param"])  # the same bits on the CPU
    np.testing.assert_array_equal(got["train/loss"], whole["train/loss"])
    with (
        __import__("h5py").File(tmp_path / "run" / "lca.h5") as f,
        __import__("h5py").File(tmp_path / "whole" / "lca.h5") as g,
    ):
        np.testing.assert_array_equal(f["reduce/param_helped"][()], g["reduce/param_helped"][()])


def test_mixed_precision_does_not_reach_the_passes(tmp_path):
    _, model, x, y = problem()
    ref = torch.nn.functional.cross_entropy(model(x), y).item()  # float32 L(θ_0)
    _fit(tmp_path, module=lightning_module(model), precision="bf16-mixed", max_epochs=1)
    r = rows(tmp_path / "lca.h5")
    assert abs(r["train/loss"][0] - ref) < 1e-6 * abs(ref) and conserved(r, 1e-5)


def test_the_series_go_into_the_wandb_loggers_run(tmp_path, monkeypatch):
    from lightning.pytorch.loggers import WandbLogger

    from tests.wandb_offline import offline_runs, read_run

    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = WandbLogger(project="lightning-user", save_dir=str(tmp_path), offline=True)
    _fit(tmp_path / "run", logger=logger, max_epochs=1)
    logger.experiment.finish()
    (run_dir,) = offline_runs(tmp_path)
    got = read_run(run_dir)
    lca_rows = [h for h in got["history"] if "lca_lab/lca/total" in h]
    r = rows(tmp_path / "run" / "lca.h5")
    assert [h["lca_lab/iteration"] for h in lca_rows] == list(r["lca/iteration"])
    np.testing.assert_allclose([h["lca_lab/lca/total"] for h in lca_rows], r["lca/total"], rtol=1e-12)
    assert got["project"] == "lightning-user"  # the logger's own run, not one of lca_lab's
    assert got["summary"]["lca_lab/L_end"] == pytest.approx(r["train/loss"][-1], rel=1e-12)


def test_ddp_shards_the_passes_over_the_trainers_ranks(tmp_path):
    """2 DDP ranks (gloo): one run file, written by rank 0; its rows equal the single-process LCA of the
    trajectory it stored."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from lca_lab.lca import FullBatchLoss, LCAEngine

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "tests/lightning_ddp.py", str(tmp_path)], cwd=root, env=env,
                       capture_output=True, text=True, timeout=600)  # fmt: skip
    assert p.returncode == 0, p.stderr[-3000:]
    r = rows(tmp_path / "lca.h5")
    assert r["attrs"]["status"] == "complete" and r["attrs"]["dist_world_size"] == 2
    assert len(r["lca/total"]) == 6 and conserved(r, 1e-5)  # 4 batches of 15 over 2 ranks: 2 steps/epoch
    _, model, x, y = problem()
    engine = LCAEngine(FullBatchLoss(model, x, y, 16), "rk4", 1e-5, 32, True)
    theta = torch.as_tensor(r["theta"])
    for t in range(6):
        st = engine.step(theta[t], theta[t + 1])
        np.testing.assert_allclose(st.param.numpy(), r["lca/param"][t], rtol=1e-4, atol=1e-9)
        assert abs(st.loss1.item() - r["train/loss"][t + 1]) < 1e-6
