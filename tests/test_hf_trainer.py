"""``LCATrainerCallback``: LCA of a Hugging Face ``Trainer`` run (tiny models, CPU, offline)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.loops import conserved, hf_args, quiet, rows

pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback  # noqa: E402

from lca_lab.integrations.hf import LCATrainerCallback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def _lm(seed: int = 0) -> tuple[GPT2LMHeadModel, torch.Tensor, list[dict]]:
    """A tiny GPT-2 and 24 sequences of 8 tokens, the last 2 of each sequence's labels -100."""
    torch.manual_seed(seed)
    ids = torch.randint(0, 30, (24, 8))
    labels = ids.clone()
    labels[:, -2:] = -100
    cfg = GPT2Config(
        vocab_size=30, n_positions=8, n_embd=16, n_layer=1, n_head=2, bos_token_id=0, eos_token_id=0
    )
    items = [
        {"input_ids": i, "attention_mask": torch.ones_like(i), "labels": lab} for i, lab in zip(ids, labels)
    ]
    return GPT2LMHeadModel(cfg), labels, items


def _args(out, **kw):
    return hf_args(
        out, **{"per_device_train_batch_size": 4, "num_train_epochs": 1, "learning_rate": 0.05, **kw}
    )


def _own_loss(model, items) -> float:
    """The model's own loss (its forward with labels) over the whole set in one batch, eval mode."""
    batch = {k: torch.stack([it[k] for it in items]) for k in items[0]}
    model.eval()
    with torch.no_grad():
        return model(**batch).loss.item()


def test_gradient_accumulation_and_the_models_own_loss(tmp_path):
    quiet()
    model, _, items = _lm()
    own0 = _own_loss(model, items)
    cb = LCATrainerCallback(run_dir=tmp_path / "run", lca={"tolerance": 1e-5}, figures=False)
    args = _args(tmp_path / "out", gradient_accumulation_steps=2)  # 6 micro-batches → 3 optimizer steps
    trainer = Trainer(model=model, args=args, train_dataset=items, callbacks=[cb])
    trainer.train()
    assert trainer.state.global_step == 3
    r = rows(tmp_path / "run" / "lca.h5")
    np.testing.assert_array_equal(r["lca/iteration"], np.arange(3))
    assert r["attrs"]["status"] == "complete" and r["attrs"]["lca_loop"] == "hf" and conserved(r, 1e-5)
    # L is the causal LM's own loss: labels shifted by one token, -100 not counted, mean over tokens
    np.testing.assert_allclose(r["train/loss"][[0, -1]], [own0, _own_loss(model, items)], rtol=2e-6)
    from lca_lab.analyze import analyze

    assert analyze(tmp_path / "run", repeats=20)["n_runs"] == 1


class _StopAt(TrainerCallback):
    def __init__(self, step: int):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise RuntimeError(f"stopped by the test at step {self.step}")


def test_a_run_resumed_from_a_trainer_checkpoint_continues_the_run_file(tmp_path):
    quiet()
    kw = dict(save_strategy="steps", save_steps=2, num_train_epochs=2)

    def train(run, stop=None, resume=None):
        model, _, items = _lm()
        cb = LCATrainerCallback(run_dir=tmp_path / run, lca={"tolerance": 1e-5}, figures=False)
        callbacks = [cb] + ([_StopAt(stop)] if stop else [])
        trainer = Trainer(model=model, args=_args(tmp_path / f"{run}_out", **kw), train_dataset=items,
                          callbacks=callbacks)  # fmt: skip
        try:
            trainer.train(resume_from_checkpoint=resume)
        except RuntimeError as e:
            cb.close(e)  # in-process: the Trainer has no exception hook (a script's exit closes it)
            raise

    train("whole")
    with pytest.raises(RuntimeError, match="stopped by the test"):
        train("run", stop=5)
    cut = rows(tmp_path / "run" / "lca.h5")
    assert cut["attrs"]["status"].startswith("failed: RuntimeError") and len(cut["lca/total"]) == 5
    train("run", resume=str(tmp_path / "run_out" / "checkpoint-4"))
    got, whole = rows(tmp_path / "run" / "lca.h5"), rows(tmp_path / "whole" / "lca.h5")
    assert got["attrs"]["status"] == "complete" and "resumed" in got["attrs"]
    np.testing.assert_array_equal(got["lca/iteration"], np.arange(12))
    np.testing.assert_allclose(got["lca/param"], whole["lca/param"], rtol=1e-5, atol=1e-9)
    np.testing.assert_allclose(got["train/loss"], whole["train/loss"], rtol=1e-6)
    assert conserved(got, 1e-5)


def test_an_exception_that_ends_the_script_leaves_a_failed_status(tmp_path):
    script = textwrap.dedent(f"""
        from transformers import Trainer
        from lca_lab.integrations.hf import LCATrainerCallback
        from tests.test_hf_trainer import _StopAt, _args, _lm
        model, _, items = _lm()
        cb = LCATrainerCallback(run_dir={str(tmp_path / "run")!r}, figures=False)
        Trainer(model=model, args=_args({str(tmp_path / "out")!r}), train_dataset=items,
                callbacks=[cb, _StopAt(4)]).train()
    """)
    p = subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and "stopped by the test at step 4" in p.stderr
    r = rows(tmp_path / "run" / "lca.h5")
    assert r["attrs"]["status"] == "failed: RuntimeError: stopped by the test at step 4"
    assert len(r["lca/total"]) == 4 and conserved(r, 1e-3)


def test_items_without_labels_are_refused_in_one_line(tmp_path):
    model, _, items = _lm()
    cb = LCATrainerCallback(train_data=[{"input_ids": it["input_ids"]} for it in items], run_dir=tmp_path)
    trainer = Trainer(model=model, args=_args(tmp_path / "out"), train_dataset=items, callbacks=[cb])
    with pytest.raises(ValueError, match="not a dict with 'labels'"):
        trainer.train()


def test_the_series_go_into_the_trainers_wandb_run(tmp_path, monkeypatch):
    from tests.wandb_offline import read_run

    monkeypatch.setenv("WANDB_PROJECT", "hf-user")
    model, _, items = _lm()
    cb = LCATrainerCallback(run_dir=tmp_path / "run", figures=False)
    Trainer(model=model, args=_args(tmp_path / "out", report_to=["wandb"]), train_dataset=items,
            callbacks=[cb]).train()  # fmt: skip
    import wandb

    run_dir = Path(wandb.run.dir).parent  # the Trainer's run (W&B keeps its directory settings per process)
    wandb.finish()
    got = read_run(run_dir)
    r = rows(tmp_path / "run" / "lca.h5")
    lca_rows = [h for h in got["history"] if "lca_lab/lca/total" in h]
    assert got["project"] == "hf-user"
    np.testing.assert_allclose([h["lca_lab/lca/total"] for h in lca_rows], r["lca/total"], rtol=1e-12)
    assert any("train/" in k and not k.startswith("lca_lab/") for h in got["history"] for k in h)  # HF's own


def test_torchrun_shards_the_passes_over_the_trainers_ranks(tmp_path):
    """2 ranks under torchrun (gloo): one run file from rank 0, equal to the single-process LCA of the
    trajectory it stored."""
    import os

    from lca_lab.integrations.hf import ModelItems
    from lca_lab.lca import FullBatchLoss, LCAEngine
    from lca_lab.splits import bundle_from

    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "tests/hf_ddp.py",
           str(tmp_path / "run"), str(tmp_path / "out")]  # fmt: skip
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    r = rows(tmp_path / "run" / "lca.h5")
    assert r["attrs"]["status"] == "complete" and r["attrs"]["dist_world_size"] == 2
    assert len(r["lca/total"]) == 3 and conserved(r, 1e-5)  # 24 items, 4 per rank per step
    model, _, items = _lm()
    data = bundle_from(ModelItems(items, "labels", True), "items", torch.device("cpu"))
    engine = LCAEngine(FullBatchLoss(model, data.train, None, 24), "rk4", 1e-5, 32, True)
    theta = torch.as_tensor(r["theta"])
    for t in range(3):
        st = engine.step(theta[t], theta[t + 1])
        np.testing.assert_allclose(st.param.numpy(), r["lca/param"][t], rtol=1e-4, atol=1e-8)
        assert abs(st.loss1.item() - r["train/loss"][t + 1]) < 1e-5
