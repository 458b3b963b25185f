"""The same trajectory through ``python -m lca_lab``, ``track()``, the Lightning callback and the Hugging
Face callback gives the same per-parameter LCA (full-batch SGD: every loop takes the same steps)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from lca_lab import track
from lca_lab.train import run
from tests.loops import (
    EPOCHS,
    LR,
    DictRows,
    WithLoss,
    conserved,
    hf_args,
    lightning_module,
    lightning_trainer,
    loader,
    problem,
    rows,
)

pytest.importorskip("lightning")
pytest.importorskip("transformers")
pytest.importorskip("accelerate")


def _track(tmp_path):
    _, model, x, y = problem()
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    with track(model, (x, y), tmp_path / "track", lca={"tolerance": 1e-5}, store={"trajectory": True}) as lca:
        for _ in range(EPOCHS):
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            lca.step(loss)


def _lightning(tmp_path):
    from lca_lab.integrations.lightning import LCACallback

    _, model, x, y = problem()
    cb = LCACallback(run_dir=tmp_path / "lightning", lca={"tolerance": 1e-5}, store={"trajectory": True},
                     figures=False)  # fmt: skip
    lightning_trainer([cb]).fit(lightning_module(model), loader(x, y))


def _hf(tmp_path):
    from transformers import Trainer

    from lca_lab.integrations.hf import LCATrainerCallback

    _, model, x, y = problem()
    cb = LCATrainerCallback(run_dir=tmp_path / "hf", lca={"tolerance": 1e-5}, store={"trajectory": True},
                            figures=False)  # fmt: skip
    Trainer(model=WithLoss(model), args=hf_args(tmp_path / "hf_out"), train_dataset=DictRows(x, y),
            callbacks=[cb]).train()  # fmt: skip


def test_four_loops_give_the_same_lca(tmp_path):
    cfg, _, x, _ = problem()
    assert len(x) == cfg["batch_size"]  # full batch: the order of the examples cannot change a step
    run(cfg, tmp_path / "cli")
    _track(tmp_path)
    _lightning(tmp_path)
    _hf(tmp_path)
    ref = rows(tmp_path / "cli" / "lca.h5")
    assert len(ref["lca/total"]) == EPOCHS and conserved(ref, 1e-5)
    for name in ("track", "lightning", "hf"):
        got = rows(tmp_path / name / "lca.h5")
        assert got["attrs"]["status"] == "complete", name
        assert got["attrs"]["lca_loop"] == name
        np.testing.assert_array_equal(got["lca/iteration"], ref["lca/iteration"])
        # the same steps (float rounding of the loops' own gradient sums aside) …
        np.testing.assert_allclose(got["theta"], ref["theta"], rtol=0, atol=1e-6, err_msg=name)
        # … give the same per-parameter LCA and the same L
        scale = np.abs(ref["lca/param"]).max()
        atol = 1e-5 * scale
        np.testing.assert_allclose(got["lca/param"], ref["lca/param"], rtol=1e-4, atol=atol, err_msg=name)
        np.testing.assert_allclose(got["train/loss"], ref["train/loss"], rtol=1e-6, err_msg=name)
        assert conserved(got, 1e-5), name
