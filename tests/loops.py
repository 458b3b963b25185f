"""Other people's training loops on one small problem, for the integration tests: the same network, data
and full-batch SGD steps as ``python -m lca_lab`` with ``CFG``, so every loop takes the same steps."""

from __future__ import annotations

import warnings

import h5py
import numpy as np
import torch
from torch.utils.data import DataLoader, TensorDataset

from lca_lab.bench_loops import DictRows, WithLoss, lightning_classifier  # noqa: F401  (the tests' HF model and items)
from lca_lab.parts import build_parts
from tests.test_train import _cfg

N, EPOCHS, LR = 60, 5, 0.3
CFG = ("data=synthetic", f"data.size={N}", f"batch_size={N}", f"epochs={EPOCHS}", "opt=sgd",
       f"opt.lr={LR}", "opt.momentum=0", "logger=none", "figures=false", "lca.tolerance=1e-5",
       "store.trajectory=true")  # fmt: skip


def problem():
    """(cfg, model at θ_0, x [N, ...], y [N]) as ``python -m lca_lab`` builds them for ``CFG``."""
    cfg = _cfg(*CFG)
    parts = build_parts(cfg, torch.device("cpu"))
    return cfg, parts.model, parts.data.train_x, parts.data.train_y


def rows(path) -> dict:
    with h5py.File(path, "r") as f:
        keys = ("lca/param", "lca/total", "lca/error", "lca/converged", "lca/iteration", "train/loss")
        out = {k: f[k][()] for k in keys if k in f}
        if "trajectory/theta" in f:
            out["theta"] = f["trajectory/theta"][()]
        return out | {"attrs": dict(f.attrs)}


def conserved(r: dict, tol: float) -> bool:
    """Σ LCA = ΔL within the tolerance at every converged row, and the stored error is that residual."""
    resid = r["lca/total"] - np.diff(r["train/loss"])
    within = (np.abs(r["lca/error"]) <= tol) | ~r["lca/converged"]  # or flagged at max_splits
    return bool(np.allclose(resid, r["lca/error"], atol=1e-12) and np.all(within))


def quiet() -> None:
    warnings.filterwarnings("ignore", message=".*(num_workers|does not have many workers|litlogger).*")


# -- Lightning ------------------------------------------------------------------------------------------


def lightning_module(net: torch.nn.Module, lr: float = LR, fail_at: int | None = None):
    return lightning_classifier(net, lr, fail_at)


def lightning_trainer(callbacks, **kw):
    import lightning as L

    quiet()
    opts = dict(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                enable_model_summary=False, max_epochs=EPOCHS)  # fmt: skip
    return L.Trainer(callbacks=callbacks, **{**opts, **kw})


def loader(x, y, batch_size=N) -> DataLoader:
    return DataLoader(TensorDataset(x, y), batch_size=batch_size, shuffle=False)


# -- Hugging Face ---------------------------------------------------------------------------------------


def hf_args(out, **kw):
    from transformers import TrainingArguments

    opts = dict(per_device_train_batch_size=N, num_train_epochs=EPOCHS, learning_rate=LR, optim="sgd",
                lr_scheduler_type="constant", weight_decay=0.0, max_grad_norm=0.0, warmup_steps=0,
                use_cpu=True, report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
                remove_unused_columns=False, dataloader_num_workers=0, seed=0)  # fmt: skip
    return TrainingArguments(str(out), **{**opts, **kw})
